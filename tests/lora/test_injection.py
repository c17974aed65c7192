import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.lora.injection import find_targets, lora_layers
from lorakit.lora.layers import LoraLinear, ModulesToSave

from conftest import MODEL_FACTORIES, randomize_lora_B, tiny_bert, tiny_gpt2, tiny_llama

MODELS = list(MODEL_FACTORIES)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", MODELS)
def test_unmerged_merged_unloaded_reloaded_all_agree_and_differ_from_base(arch, ids, tmp_path):
    model = MODEL_FACTORIES[arch]()
    base = logits(model, ids)
    config = lk.LoraConfig(r=4, alpha=8, modules_to_save=["classifier"] if arch == "bert" else None)
    lk.add_lora(model, config)
    assert torch.equal(logits(model, ids), base)  # B = 0: exactly the base
    randomize_lora_B(model)
    unmerged = logits(model, ids)
    assert (unmerged - base).abs().max() > 1e-2
    with lk.disable_adapters(model):
        assert torch.equal(logits(model, ids), base)  # bit for bit
    lk.save_adapter(model, tmp_path / "ad")

    lk.merge(model)
    merged = logits(model, ids)
    lk.merge(model)  # idempotent
    assert torch.equal(logits(model, ids), merged)
    assert (merged - unmerged).abs().max() < 1e-5
    lk.unmerge(model)
    lk.unmerge(model)
    assert (logits(model, ids) - unmerged).abs().max() < 1e-5

    fresh = MODEL_FACTORIES[arch]()
    lk.load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(logits(fresh, ids), unmerged)  # reloaded: identical tensors, identical math

    plain = lk.unload(model)
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in plain.modules())
    assert not hasattr(plain, "lora_configs")
    assert (logits(plain, ids) - unmerged).abs().max() < 1e-5


@pytest.mark.parametrize("arch", MODELS)
def test_parameter_counts_are_r_times_d_plus_k(arch):
    model = MODEL_FACTORIES[arch]()
    total = sum(p.numel() for p in model.parameters())
    lk.add_lora(model, lk.LoraConfig(r=3, target_modules="all-linear"))
    report = lk.trainable_parameters(model)
    expected = 0
    for name, layer in lora_layers(model):
        assert dict((n, c) for n, c, _ in report.per_module)[name] == 3 * (layer.in_features + layer.out_features)
        expected += 3 * (layer.in_features + layer.out_features)
    assert report.trainable == expected
    assert report.total == total + expected
    assert report.trainable_bytes == 4 * expected
    assert f"{report.trainable:,}" in str(report)


def test_gradients_reach_only_lora_and_modules_to_save(ids):
    model = tiny_bert()
    lk.add_lora(model, lk.LoraConfig(r=2, modules_to_save=["classifier"]))
    randomize_lora_B(model)
    model.train()
    out = model(input_ids=ids, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad, "no gradient at all"
    for n in with_grad:
        assert ".lora_A." in n or ".lora_B." in n or ".modules_to_save.default." in n, n
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == with_grad
    assert any("classifier.modules_to_save.default.weight" in n for n in with_grad)


def test_target_selection_styles():
    model = tiny_llama()
    names = lambda cfg: [n for n, _ in find_targets(model, cfg)]  # noqa: E731
    assert names(lk.LoraConfig(target_modules=["q_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert names(lk.LoraConfig(target_modules=["model.layers.1.self_attn.v_proj"])) == ["model.layers.1.self_attn.v_proj"]
    assert names(lk.LoraConfig(target_modules=r".*\.(k|o)_proj")) == [
        "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj"]
    all_linear = names(lk.LoraConfig(target_modules="all-linear"))
    assert len(all_linear) == 14 and "lm_head" not in all_linear  # 7 linears × 2 blocks, not the output head
    assert names(lk.LoraConfig(target_modules=["q_proj", "v_proj"], layers=[1])) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert names(lk.LoraConfig(target_modules=["embed_tokens"])) == ["model.embed_tokens"]


def test_gpt2_conv1d_and_default_targets(ids):
    model = tiny_gpt2()
    lk.add_lora(model, lk.LoraConfig(r=2))
    assert model.lora_configs["default"].target_modules == ["c_attn"]  # resolved default saved
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (32, 96)


def test_rank_and_alpha_patterns():
    model = tiny_llama()
    config = lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                           alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32})
    lk.add_lora(model, config)
    attn0, attn1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    assert attn0.q_proj.r["default"] == 4 and attn0.v_proj.r["default"] == 2
    assert attn0.q_proj.scaling["default"] == 2.0 and attn1.q_proj.scaling["default"] == 8.0
    assert attn1.v_proj.scaling["default"] == 4.0  # alpha 8 / r 2


def test_no_match_lists_existing_modules():
    with pytest.raises(LorakitError) as e:
        lk.add_lora(tiny_llama(), lk.LoraConfig(target_modules=["query"]))
    msg = str(e.value)
    assert "matched no module" in msg and "q_proj (×2)" in msg and "model.layers.0.self_attn.q_proj" in msg


@pytest.mark.parametrize("bad, fragment", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=-2), "r must be a positive integer"),
    (dict(alpha=0), "alpha must be a positive number"),
    (dict(dropout=1.5), "dropout must be in [0, 1)"),
    (dict(init="xavier"), "init must be one of"),
    (dict(target_modules="(unclosed"), "not a valid regex"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern['q_proj']"),
])
def test_bad_config_values(bad, fragment):
    with pytest.raises(LorakitError) as e:
        lk.LoraConfig(**bad)
    assert fragment in str(e.value)


def test_bad_config_collects_all_problems_and_unknown_keys():
    with pytest.raises(LorakitError) as e:
        lk.LoraConfig(r=0, alpha=-1)
    assert "r must be" in str(e.value) and "alpha must be" in str(e.value)
    with pytest.raises(LorakitError, match=r"Unknown LoraConfig key\(s\) \['rank'\]"):
        lk.LoraConfig.from_dict({"rank": 8})


def test_multiple_adapters_switch_delete_disable(ids):
    model = tiny_llama()
    base = logits(model, ids)
    lk.add_lora(model, lk.LoraConfig(r=2), adapter="a")
    lk.add_lora(model, lk.LoraConfig(r=4, target_modules="all-linear"), adapter="b")
    randomize_lora_B(model, "a", seed=1)
    randomize_lora_B(model, "b", seed=2)
    assert lk.active_adapter(model) == "a" and lk.adapter_names(model) == ["a", "b"]
    out_a = logits(model, ids)
    lk.set_adapter(model, "b")
    out_b = logits(model, ids)
    assert (out_a - out_b).abs().max() > 1e-2
    with lk.disable_adapters(model):
        assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model, ids), out_b)
    with pytest.raises(LorakitError, match="already exists"):
        lk.add_lora(model, lk.LoraConfig(), adapter="a")
    with pytest.raises(LorakitError, match="adapters present"):
        lk.set_adapter(model, "zzz")
    lk.delete_adapter(model, "b")
    assert lk.adapter_names(model) == ["a"] and lk.active_adapter(model) == "a"
    assert torch.equal(logits(model, ids), out_a)
    assert all("b" not in layer.adapters for _, layer in lora_layers(model))


def test_merged_adapters_are_guarded(ids):
    model = tiny_llama()
    lk.add_lora(model, lk.LoraConfig(r=2), adapter="a")
    lk.add_lora(model, lk.LoraConfig(r=2), adapter="b")
    lk.merge(model, "a")
    with pytest.raises(LorakitError, match="unmerge"):
        with lk.disable_adapters(model):
            pass
    with pytest.raises(LorakitError, match="already merged"):
        lk.merge(model, "b")
    with pytest.raises(LorakitError, match="unmerge"):
        lk.set_adapter(model, "b")
    with pytest.raises(LorakitError, match="unmerge"):
        lk.delete_adapter(model, "a")
    with pytest.raises(LorakitError, match="unmerged"):
        with lk.adapters_per_row(model, ["a", "b", None]):
            pass
    lk.unmerge(model)
    lk.set_adapter(model, "b")


@pytest.mark.parametrize("arch", MODELS)
def test_mixed_batch_equals_each_row_alone(arch, ids):
    model = MODEL_FACTORIES[arch]()
    extra = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    lk.add_lora(model, lk.LoraConfig(r=2, **extra), adapter="a")
    lk.add_lora(model, lk.LoraConfig(r=3, target_modules="all-linear", **extra), adapter="b")
    randomize_lora_B(model, "a", seed=1)
    randomize_lora_B(model, "b", seed=2)
    rows = ["b", None, "a"]
    with lk.adapters_per_row(model, rows):
        mixed = logits(model, ids)
    for i, name in enumerate(rows):
        if name is None:
            with lk.disable_adapters(model):
                alone = logits(model, ids[i:i + 1])
        else:
            lk.set_adapter(model, name)
            alone = logits(model, ids[i:i + 1])
        assert (mixed[i] - alone[0]).abs().max() < 1e-5, (arch, i, name)
    with pytest.raises(LorakitError, match="one name"):
        with lk.adapters_per_row(model, ["a", "b"]):
            logits(model, ids)
    with pytest.raises(LorakitError, match="Unknown adapter"):
        with lk.adapters_per_row(model, ["a", "nope", None]):
            pass


def test_mixed_batch_does_not_loop_over_rows(ids):
    """The LoRA path runs once per distinct adapter in the batch, not once per row."""
    model = tiny_llama()
    lk.add_lora(model, lk.LoraConfig(r=2), adapter="a")
    lk.add_lora(model, lk.LoraConfig(r=2), adapter="b")
    calls = []
    layer = model.model.layers[0].self_attn.q_proj
    original = layer.lora_delta
    layer.lora_delta = lambda name, x: (calls.append((name, x.shape[0])), original(name, x))[1]
    batch = torch.cat([ids, ids, ids])  # 9 rows
    with lk.adapters_per_row(model, ["a", "b", "a", "a", None, "b", "a", "a", "b"]):
        logits(model, batch)
    assert sorted(calls) == [("a", 5), ("b", 3)]


def test_modules_to_save_head_trains_and_is_restored_by_unload(ids):
    model = tiny_bert()
    original_head = model.classifier.weight.detach().clone()
    lk.add_lora(model, lk.LoraConfig(r=2, modules_to_save=["classifier"]))
    assert isinstance(model.classifier, ModulesToSave)
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
    plain = lk.unload(model)
    assert torch.equal(plain.classifier.weight, original_head + 1.0)
    with pytest.raises(LorakitError, match="matched no module"):
        lk.add_lora(tiny_bert(), lk.LoraConfig(modules_to_save=["score"]))


def test_adapter_name_validation():
    with pytest.raises(LorakitError, match="without dots"):
        lk.add_lora(tiny_llama(), lk.LoraConfig(), adapter="a.b")


def test_fresh_model_unknown_architecture_needs_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(LorakitError, match="No default target modules"):
        lk.add_lora(model, lk.LoraConfig())
    lk.add_lora(model, lk.LoraConfig(r=2, target_modules=["0"]))
    assert isinstance(model[0], LoraLinear)


def test_cast_base_keeps_lora_fp32_and_ties(ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    lk.add_lora(model, lk.LoraConfig(r=2))
    randomize_lora_B(model)
    full = logits(model, ids)
    lk.cast_base(model, torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers untouched
    low = logits(model, ids).float()
    assert (low - full).abs().max() < 0.1  # bf16 rounding only
