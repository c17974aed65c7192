import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.lora.adapter_io import CONFIG_FILE, META_FILE, WEIGHTS_FILE
from lorakit.errors import LorakitError

from conftest import MODEL_FACTORIES, randomize_lora_B, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

CASES = {  # arch -> (lorakit config kwargs, PEFT LoraConfig kwargs) describing the same adapter
    "llama": (dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2},
                   alpha_pattern={"v_proj": 5.0}, use_rslora=True),
              dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2},
                   alpha_pattern={"v_proj": 5.0}, use_rslora=True, task_type="CAUSAL_LM")),
    "gpt2": (dict(r=4, alpha=16, target_modules=["c_attn", "c_proj"]),
             dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM")),
    "bert": (dict(r=2, alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"], layers=[1]),
             dict(r=2, lora_alpha=4, target_modules=["query", "value"], layers_to_transform=[1], task_type="SEQ_CLS")),
}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_lorakit(arch):
    model = MODEL_FACTORIES[arch]()
    lk.add_lora(model, lk.LoraConfig(**CASES[arch][0]))
    randomize_lora_B(model)
    return model


@pytest.mark.parametrize("arch", list(CASES))
def test_lorakit_adapter_loads_in_peft_with_same_logits(arch, ids, tmp_path):
    model = trained_lorakit(arch)
    expected = logits(model, ids)
    lk.save_adapter(model, tmp_path / "ad")
    assert {p.name for p in (tmp_path / "ad").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, META_FILE}
    peft_model = peft.PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path / "ad").eval()
    got = logits(peft_model, ids)
    diff = (got - expected).abs().max().item()
    print(f"lorakit->PEFT {arch}: max abs diff {diff:.3e}")
    assert diff < 1e-5
    assert (got - logits(MODEL_FACTORIES[arch](), ids)).abs().max() > 1e-3  # the adapter really acts


@pytest.mark.parametrize("arch", list(CASES))
def test_peft_adapter_loads_in_lorakit_with_same_logits(arch, ids, tmp_path):
    peft_model = peft.get_peft_model(MODEL_FACTORIES[arch](), peft.LoraConfig(**CASES[arch][1])).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    model = lk.load_adapter(MODEL_FACTORIES[arch](), tmp_path / "peft")
    got = logits(model, ids)
    diff = (got - expected).abs().max().item()
    print(f"PEFT->lorakit {arch}: max abs diff {diff:.3e}")
    assert diff < 1e-5
    assert (got - logits(MODEL_FACTORIES[arch](), ids)).abs().max() > 1e-3


def test_peft_dropout_and_init_reach_linear_layers_only(ids, tmp_path):
    """PEFT ignores lora_dropout and init_lora_weights on embeddings; such an adapter loads here and trains alike:
    same training-mode logits (same dropout masks on q_proj, none on the embedding) and the same gradients."""
    targets = ["q_proj", "embed_tokens"]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                                               init_lora_weights="gaussian", target_modules=targets))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(tiny_llama(), tmp_path / "peft", trainable=True)
    assert lk.active_adapter(ours) == "default" and ours.lora_configs["default"].dropout == 0.3
    assert isinstance(ours.model.layers[0].self_attn.q_proj.lora_dropout["default"], torch.nn.Dropout)
    assert not hasattr(ours.model.embed_tokens, "lora_dropout")
    outs, grads = [], []
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(11)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append(out.logits.detach())
        grads.append({n.replace("base_model.model.", "").replace(".default.weight", ".default"): p.grad
                      for n, p in model.named_parameters() if p.requires_grad})
    with torch.no_grad():
        evaluated = ours.train(False)(input_ids=ids).logits
    diff = (outs[0] - outs[1]).abs().max().item()
    worst = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    print(f"PEFT dropout 0.3 + embedding, train mode: logits diff {diff:.2e}, grads diff {worst:.2e}")
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 2 * 2 + 2  # q_proj A, B in 2 layers; embedding A, B
    assert diff < 1e-5 and worst < 1e-5
    assert (outs[1] - evaluated).abs().max() > 1e-3  # dropout really acted on q_proj


def test_saved_keys_and_config_fields_match_peft(tmp_path):
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")
    model = tiny_llama()
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    lk.save_adapter(model, tmp_path / "lk")
    peft_keys = {k: tuple(v.shape) for k, v in load_file(tmp_path / "peft" / WEIGHTS_FILE).items()}
    ours = {k: tuple(v.shape) for k, v in load_file(tmp_path / "lk" / WEIGHTS_FILE).items()}
    assert ours == peft_keys
    peft_cfg = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    our_cfg = json.loads((tmp_path / "lk" / CONFIG_FILE).read_text())
    for field in ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "bias", "init_lora_weights"):
        assert our_cfg[field] == peft_cfg[field], field
    assert sorted(our_cfg["target_modules"]) == sorted(peft_cfg["target_modules"])


def test_metadata_records_version_config_and_fingerprint(tmp_path):
    model = trained_lorakit("llama")
    lk.save_adapter(model, tmp_path / "ad", extra={"train": {"lr": 1e-3}})
    meta = json.loads((tmp_path / "ad" / META_FILE).read_text())
    assert meta["lorakit_version"] == lk.__version__
    assert meta["config"] == model.lora_configs["default"].to_dict()
    assert meta["extra"] == {"train": {"lr": 1e-3}}
    assert len(meta["base_fingerprint"]["modules"]) == 5  # 2 q + 2 v + embed_tokens


def test_different_base_is_an_error_or_a_warning(ids, tmp_path):
    lk.save_adapter(trained_lorakit("llama"), tmp_path / "ad")
    other = tiny_llama(seed=99)
    with pytest.raises(LorakitError, match="different base model"):
        lk.load_adapter(other, tmp_path / "ad")
    assert not hasattr(other, "lora_configs") or lk.adapter_names(other) == []  # left unchanged
    with pytest.warns(UserWarning, match="different base model"):
        lk.load_adapter(other, tmp_path / "ad", strict=False)
    # The same base in bf16 is the same model: accepted.
    lk.load_adapter(tiny_llama().to(torch.bfloat16), tmp_path / "ad")


def test_shape_mismatch_names_module_and_shapes(tmp_path):
    lk.save_adapter(trained_lorakit("llama"), tmp_path / "ad")
    weights = load_file(tmp_path / "ad" / WEIGHTS_FILE)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    weights[key] = torch.zeros(4, 7)
    save_file(weights, tmp_path / "ad" / WEIGHTS_FILE)
    model = tiny_llama()
    with pytest.raises(LorakitError) as e:
        lk.load_adapter(model, tmp_path / "ad")
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in str(e.value)
    assert "(4, 7)" in str(e.value) and "(4, 32)" in str(e.value)
    assert lk.adapter_names(model) == []


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    lk.save_adapter(trained_lorakit("llama"), tmp_path / "ad")
    weights = load_file(tmp_path / "ad" / WEIGHTS_FILE)
    del weights["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    weights["base_model.model.model.layers.1.self_attn.zzz.lora_A.weight"] = torch.zeros(1)
    save_file(weights, tmp_path / "ad" / WEIGHTS_FILE)
    with pytest.raises(LorakitError) as e:
        lk.load_adapter(tiny_llama(), tmp_path / "ad")
    msg = str(e.value)
    assert "1 missing key(s) ['model.layers.1.self_attn.v_proj.lora_B.weight']" in msg
    assert "1 unexpected key(s) ['model.layers.1.self_attn.zzz.lora_A.weight']" in msg
    with pytest.warns(UserWarning, match="missing key"):
        lk.load_adapter(tiny_llama(), tmp_path / "ad", strict=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "huge_header"])
def test_corrupt_weights_are_clear_errors(damage, tmp_path):
    lk.save_adapter(trained_lorakit("llama"), tmp_path / "ad")
    f = tmp_path / "ad" / WEIGHTS_FILE
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}",
                   "empty": b"", "huge_header": (10**12).to_bytes(8, "little") + data[8:]}[damage])
    model = tiny_llama()
    with pytest.raises(LorakitError, match="corrupt|truncated"):
        lk.load_adapter(model, tmp_path / "ad")
    assert lk.adapter_names(model) == []


def test_bad_folders_and_configs(tmp_path):
    with pytest.raises(LorakitError, match="does not exist"):
        lk.load_adapter(tiny_llama(), tmp_path / "nope")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / CONFIG_FILE).write_text("{}")
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(LorakitError, match="never reads pickled"):
        lk.load_adapter(tiny_llama(), tmp_path / "bin")
    lk.save_adapter(trained_lorakit("llama"), tmp_path / "ad")
    (tmp_path / "ad" / CONFIG_FILE).write_text("{broken")
    with pytest.raises(LorakitError, match="not valid JSON"):
        lk.load_adapter(tiny_llama(), tmp_path / "ad")
    (tmp_path / "ad" / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "lora_bias": True, "r": 4}))
    (tmp_path / "ad" / META_FILE).unlink()
    with pytest.raises(LorakitError, match="lora_bias=True"):
        lk.load_adapter(tiny_llama(), tmp_path / "ad")
    (tmp_path / "ad" / CONFIG_FILE).write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(LorakitError, match="only LORA"):
        lk.load_adapter(tiny_llama(), tmp_path / "ad")


def test_crash_mid_save_keeps_previous_adapter(ids, tmp_path, monkeypatch):
    model = trained_lorakit("llama")
    lk.save_adapter(model, tmp_path / "ad")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}

    import safetensors.torch

    def exploding_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", exploding_save)
    randomize_lora_B(model, seed=11)
    with pytest.raises(OSError, match="No space"):
        lk.save_adapter(model, tmp_path / "ad")
    after = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temp debris
    lk.load_adapter(tiny_llama(), tmp_path / "ad")


def test_load_twice_needs_a_new_name_and_trainable_flag(tmp_path):
    lk.save_adapter(trained_lorakit("gpt2"), tmp_path / "ad")
    model = lk.load_adapter(tiny_gpt2(), tmp_path / "ad")
    assert lk.trainable_parameters(model).trainable == 0  # inference by default
    with pytest.raises(LorakitError, match="already loaded"):
        lk.load_adapter(model, tmp_path / "ad")
    lk.load_adapter(model, tmp_path / "ad", adapter="again", trainable=True)
    assert lk.trainable_parameters(model).trainable > 0


def test_seq_cls_head_roundtrip(ids, tmp_path):
    model = trained_lorakit("bert")
    expected = logits(model, ids)
    lk.save_adapter(model, tmp_path / "ad")
    keys = load_file(tmp_path / "ad" / WEIGHTS_FILE)
    assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys
    again = lk.load_adapter(tiny_bert(), tmp_path / "ad")
    assert torch.equal(logits(again, ids), expected)
