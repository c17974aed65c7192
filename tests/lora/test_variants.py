"""LoRA variants: DoRA, PiSSA/OLoRA inits — exactness, merge/unmerge, PEFT parity both ways, safe saving."""

import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit.lora.adapter_io import CONFIG_FILE, META_FILE
from lorakit.errors import LorakitError
from lorakit.lora.injection import lora_layers
from lorakit.lora.layers import LoraLinear, merge_layer, unmerge_layer

from conftest import randomize_lora_B, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb(model, adapter="default", seed=5):
    """Move every adapter tensor (A, B and DoRA's magnitude) as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in layer.adapter_state(adapter).values():
                p.add_(torch.randn(p.shape, generator=gen) * 0.3 * (p.abs().mean() + 0.1))


def perturb_peft(peft_model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3 * (p.abs().mean() + 0.1))


def dora_layer(kind, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(16, 12) if kind == "linear" else Conv1D(12, 16)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=4, alpha=8, use_dora=True)
    layer.active_adapter = "a"
    return layer


# ---------------------------------------------------------------------------------------------------- DoRA, one layer
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_layer_exact_at_init_matches_formula_and_merges_exactly(kind):
    layer = dora_layer(kind)
    base = layer.base_layer
    W = (base.weight.T if kind == "conv1d" else base.weight).detach().clone()  # (out, in)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert (layer(x) - base(x)).abs().max() < 1e-6  # m = ‖W‖ rows, B = 0: the base exactly
        assert torch.allclose(layer.lora_magnitude_vector["a"], W.norm(dim=1))
        nn.init.normal_(layer.lora_B["a"].weight)
        layer.lora_magnitude_vector["a"].mul_(torch.linspace(0.5, 1.5, 12))
        V = W + 2.0 * layer.lora_B["a"].weight @ layer.lora_A["a"].weight  # s = 8/4
        expected = x @ (layer.lora_magnitude_vector["a"][:, None] * V / V.norm(dim=1, keepdim=True)).T + base.bias
        unmerged = layer(x)
        assert (unmerged - expected).abs().max() < 1e-5
        merge_layer(layer, "a")
        merged = layer(x)
        merge_layer(layer, "a")  # idempotent
        assert torch.equal(layer(x), merged)
        unmerge_layer(layer, "a")
        W_back = base.weight.T if kind == "conv1d" else base.weight
        again = layer(x)
    print(f"DoRA {kind}: |merged-unmerged| {(merged - unmerged).abs().max():.2e}, |W back - W| "
          f"{(W_back - W).abs().max():.2e}")
    assert (merged - unmerged).abs().max() < 1e-5
    assert (W_back - W).abs().max() < 1e-5
    assert (again - unmerged).abs().max() < 1e-5
    assert (unmerged - base(x)).abs().max() > 1e-2


def test_dora_gradients_and_dropout_match_peft():
    """Same weights in lorakit and PEFT: same training-mode output with dropout (same RNG) and the same gradients
    for A, B and m — which holds only if the weight norm is detached the same way."""
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(lora_alpha=8, lora_dropout=0.2, **cfg))
    perturb_peft(theirs)
    ours = tiny_llama()
    lk.add_lora(ours, lk.LoraConfig(alpha=8, dropout=0.2, **cfg))
    with torch.no_grad():
        peft_params = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            if p.requires_grad:
                key = "base_model.model." + name.replace("lora_magnitude_vector.default", "lora_magnitude_vector.default.weight")
                p.copy_(peft_params[key])
    theirs.train(), ours.train()
    grads = []
    for model in (theirs, ours):
        torch.manual_seed(11)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append({n.replace("base_model.model.", "").replace(".default.weight", ".default"): p.grad
                      for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 12  # 4 layers × (A, B, m)
    worst = max(((grads[0][n] - grads[1][n]).abs().max() / grads[0][n].abs().max()).item() for n in grads[0])
    print(f"DoRA train-mode grads vs PEFT (dropout 0.2): max relative diff {worst:.2e}")
    assert worst < 1e-4
    assert all(g.abs().max() > 0 for g in grads[1].values())


def test_dora_mixed_batch_rows_match_single_adapter_runs():
    model = tiny_llama()
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]), "dora")
    lk.add_lora(model, lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), "plain")
    perturb(model, "dora")
    perturb(model, "plain", seed=6)
    ids = torch.randint(1, 97, (3, 8), generator=torch.Generator().manual_seed(1))
    single = {}
    for name in ("dora", "plain"):
        lk.set_adapter(model, name)
        single[name] = logits(model, ids)
    with lk.disable_adapters(model):
        single[None] = logits(model, ids)
    names = ["plain", "dora", None]
    with lk.adapters_per_row(model, names):
        mixed = logits(model, ids)
    for i, name in enumerate(names):
        assert (mixed[i] - single[name][i]).abs().max() < 1e-5, name
    assert (single["dora"] - single[None]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------- DoRA, PEFT parity
@pytest.mark.parametrize("arch", list(MODELS))
def test_dora_parity_with_peft_both_ways(arch, ids, tmp_path):
    ours = MODELS[arch]()
    lk.add_lora(ours, lk.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=TARGETS[arch]))
    perturb(ours)
    expected = logits(ours, ids)
    lk.save_adapter(ours, tmp_path / "lk")
    assert json.loads((tmp_path / "lk" / CONFIG_FILE).read_text())["use_dora"] is True
    loaded = peft.PeftModel.from_pretrained(MODELS[arch](), tmp_path / "lk").eval()
    d1 = (logits(loaded, ids) - expected).abs().max().item()
    # merged in PEFT and in lorakit: still the same model
    d_merge_peft = (logits(loaded.merge_and_unload(), ids) - expected).abs().max().item()
    lk.merge(ours)
    d_merge_ours = (logits(ours, ids) - expected).abs().max().item()
    lk.save_adapter(ours, tmp_path / "from-merged")  # the fingerprint is taken of the unmerged base
    assert (logits(lk.load_adapter(MODELS[arch](), tmp_path / "from-merged"), ids) - expected).abs().max() < 1e-5

    theirs = peft.get_peft_model(MODELS[arch](), peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS[arch], fan_in_fan_out=arch == "gpt2")).eval()
    perturb_peft(theirs)
    expected2 = logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "peft")
    back = lk.load_adapter(MODELS[arch](), tmp_path / "peft")
    d2 = (logits(back, ids) - expected2).abs().max().item()
    print(f"DoRA {arch}: lorakit->PEFT {d1:.2e}, PEFT->lorakit {d2:.2e}, merged PEFT {d_merge_peft:.2e}, "
          f"merged lorakit {d_merge_ours:.2e}")
    assert max(d1, d2, d_merge_peft, d_merge_ours) < 1e-5
    assert (expected - logits(MODELS[arch](), ids)).abs().max() > 1e-2
    assert (expected2 - logits(MODELS[arch](), ids)).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------- PiSSA / OLoRA
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_base_changing_inits_are_exact_at_init_and_give_the_base_back(arch, init, ids):
    model = MODELS[arch]()
    before = logits(model, ids)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, init=init, target_modules=TARGETS[arch]))
    after = logits(model, ids)
    layer = next(l for _, l in lora_layers(model))
    top = layer.delta_weight("default")
    weight_name = next(n for n in original if n.endswith(TARGETS[arch][0] + ".weight"))
    moved = (top.norm() / original[weight_name].norm()).item()
    print(f"{init} {arch}: |logits - base| {(after - before).abs().max():.2e}; s·BA holds {moved:.2f} of ‖W‖")
    assert (after - before).abs().max() < 1e-5
    assert moved > 0.3  # the adapter really holds a large part of W, the base only the residual
    if init == "pissa":  # s·BA is W's best rank-r approximation
        W = layer.weight_oi().float() + (top.T if layer.fan_in_fan_out else top)
        U, S, Vh = torch.linalg.svd(W)
        assert (U[:, :4] @ torch.diag(S[:4]) @ Vh[:4] - (top.T if layer.fan_in_fan_out else top)).abs().max() < 1e-5
    perturb(model)
    adapted = logits(model, ids)
    assert (adapted - before).abs().max() > 1e-2
    with lk.disable_adapters(model):  # the original base, not the residual
        assert (logits(model, ids) - before).abs().max() < 1e-5
    with lk.adapters_per_row(model, ["default", None, "default"]):
        mixed = logits(model, ids)
    assert (mixed[[0, 2]] - adapted[[0, 2]]).abs().max() < 1e-5 and (mixed[1] - before[1]).abs().max() < 1e-5
    lk.unload(model, merge_adapter=False)  # the residual never leaks out as "the base"
    assert max((p - original[n]).abs().max().item() for n, p in model.named_parameters()) < 1e-5


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_parity_with_peft_both_ways(init, ids, tmp_path):
    targets = TARGETS["llama"]
    ours = tiny_llama()
    lk.add_lora(ours, lk.LoraConfig(r=4, alpha=8, init=init, target_modules=targets))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                               target_modules=targets)).eval()
    ours_A = ours.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    theirs_A = theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert (ours_A - theirs_A).abs().max() < 1e-5  # the same init
    perturb(ours)
    expected = logits(ours, ids)
    lk.save_adapter(ours, tmp_path / "lk")
    assert json.loads((tmp_path / "lk" / CONFIG_FILE).read_text())["init_lora_weights"] == init
    d1 = (logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lk").eval(), ids) - expected).abs().max()
    d1_lk = (logits(lk.load_adapter(tiny_llama(), tmp_path / "lk"), ids) - expected).abs().max()
    perturb_peft(theirs)
    expected2 = logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "peft")
    d2 = (logits(lk.load_adapter(tiny_llama(), tmp_path / "peft"), ids) - expected2).abs().max()
    print(f"{init}: lorakit->PEFT {d1:.2e}, lorakit->lorakit {d1_lk:.2e}, PEFT->lorakit {d2:.2e}")
    assert max(d1, d1_lk, d2) < 1e-5
    assert (expected - logits(tiny_llama(), ids)).abs().max() > 1e-2


def test_pissa_dora_together_match_peft(ids, tmp_path):
    ours = tiny_llama()
    lk.add_lora(ours, lk.LoraConfig(r=4, alpha=8, init="pissa", use_dora=True, target_modules=["q_proj", "v_proj"]))
    assert (logits(ours, ids) - logits(tiny_llama(), ids)).abs().max() < 1e-5
    perturb(ours)
    lk.save_adapter(ours, tmp_path / "ad")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad").eval()
    assert (logits(loaded, ids) - logits(ours, ids)).abs().max() < 1e-5
    with pytest.raises(LorakitError, match="DoRA"):
        lk.save_adapter(ours, tmp_path / "conv", convert_to_lora=True)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_convert_to_plain_lora_on_the_original_base(use_rslora, ids, tmp_path):
    model = tiny_llama()
    cfg = lk.LoraConfig(r=4, alpha=8, init="pissa", target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                        use_rslora=use_rslora)
    lk.add_lora(model, cfg)
    perturb(model)
    expected = logits(model, ids)
    lk.save_adapter(model, tmp_path / "lora", convert_to_lora=True)
    peft_cfg = json.loads((tmp_path / "lora" / CONFIG_FILE).read_text())
    assert (peft_cfg["r"], peft_cfg["init_lora_weights"], peft_cfg["rank_pattern"]) == (8, True, {"v_proj": 4})
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    in_lk = lk.load_adapter(tiny_llama(), tmp_path / "lora")
    d_peft = (logits(in_peft, ids) - expected).abs().max().item()
    d_lk = (logits(in_lk, ids) - expected).abs().max().item()
    print(f"PiSSA->LoRA(2r) rslora={use_rslora}: PEFT {d_peft:.2e}, lorakit {d_lk:.2e}")
    assert max(d_peft, d_lk) < 1e-5
    with pytest.raises(LorakitError, match="PiSSA/OLoRA"):
        plain = tiny_llama()
        lk.save_adapter(lk.add_lora(plain, lk.LoraConfig(r=2)), tmp_path / "x", convert_to_lora=True)


def test_residual_adapter_never_lands_silently_on_the_wrong_base(ids, tmp_path):
    model = tiny_llama()
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, init="pissa", target_modules=["q_proj", "v_proj"]))
    perturb(model)
    lk.save_adapter(model, tmp_path / "pissa")
    lk.save_adapter(model, tmp_path / "lora", convert_to_lora=True)
    meta = json.loads((tmp_path / "pissa" / META_FILE).read_text())
    assert meta["config"]["init"] == "pissa"
    # A base that already is the residual (e.g. saved from the PiSSA model's weights): both files are refused.
    residual = tiny_llama()
    residual.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                              if "lora_" not in k})
    untouched = logits(residual, ids)
    for folder in ("pissa", "lora"):
        with pytest.raises(LorakitError, match="different base model"):
            lk.load_adapter(residual, tmp_path / folder)
        assert lk.adapter_names(residual) == []
    assert (logits(residual, ids) - untouched).abs().max() < 1e-5  # the failed load gave its SVD share back
    # The PiSSA folder declares its init, so a loader that skipped it would be caught by the same fingerprint.
    assert json.loads((tmp_path / "pissa" / CONFIG_FILE).read_text())["init_lora_weights"] == "pissa"


# ---------------------------------------------------------------------------------------------------- config rules
def test_variant_config_rules():
    assert lk.LoraConfig(init="pissa_niter_16").changes_base
    assert not lk.LoraConfig(use_dora=True).changes_base
    for bad in ({"init": "pissa_niter_0"}, {"init": "svd"}, {"use_dora": "yes"}):
        with pytest.raises(LorakitError):
            lk.LoraConfig(**bad)
    parsed = lk.LoraConfig.from_peft_dict({"peft_type": "LORA", "use_dora": True, "init_lora_weights": "olora"})
    assert parsed.use_dora and parsed.init == "olora"
    assert lk.LoraConfig.from_peft_dict({"init_lora_weights": False}).init == "kaiming"
    with pytest.raises(LorakitError, match="corda"):
        lk.LoraConfig.from_peft_dict({"init_lora_weights": "corda"})
    with pytest.raises(LorakitError, match="linear layers only"):
        lk.add_lora(tiny_llama(), lk.LoraConfig(use_dora=True, target_modules=["q_proj", "embed_tokens"]))
    model = lk.add_lora(tiny_llama(), lk.LoraConfig(r=2))
    with pytest.raises(LorakitError, match="fresh copy"):
        lk.add_lora(model, lk.LoraConfig(r=2, init="olora"), "second")
    model = lk.add_lora(tiny_llama(), lk.LoraConfig(r=2, init="pissa"))
    with pytest.raises(LorakitError, match="fresh copy"):
        lk.add_lora(model, lk.LoraConfig(r=2), "second")


def test_export_merges_dora_pissa_adapter_into_plain_model(tmp_path):
    from lorakit.export.merged import merge_to_directory
    from tiny_text import save_tiny_lm

    save_tiny_lm(tmp_path / "base")
    model, _ = lk.load_model(str(tmp_path / "base"))
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, init="pissa", use_dora=True, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    lk.save_adapter(model, tmp_path / "ad")
    report = merge_to_directory(str(tmp_path / "base"), tmp_path / "ad", tmp_path / "merged")
    print(f"export DoRA+PiSSA fp32: drift {report.max_logit_diff:.2e}, effect {report.adapter_effect:.2e}, "
          f"lost {report.delta_lost:.2e}")
    assert report.max_logit_diff < 1e-5 and report.adapter_effect > 1e-2 and report.delta_lost < 1e-6
    with pytest.raises(LorakitError, match="DoRA or a PiSSA/OLoRA init"):
        lk.combine_adapters(model, ["default"], [1.0], "combo")


def test_pissa_niter_reload_finds_the_same_residual(ids, tmp_path):
    model = tiny_llama()
    torch.manual_seed(1)
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, init="pissa_niter_2", target_modules=["q_proj", "v_proj"]))
    perturb(model)
    lk.save_adapter(model, tmp_path / "ad")
    torch.manual_seed(2)  # another global random state: the residual must not depend on it
    again = lk.load_adapter(tiny_llama(), tmp_path / "ad")
    assert torch.equal(again.model.layers[0].self_attn.q_proj.base_layer.weight,
                       model.model.layers[0].self_attn.q_proj.base_layer.weight)
    assert (logits(again, ids) - logits(model, ids)).abs().max() < 1e-6


def test_dora_on_low_precision_and_quantized_bases():
    torch.manual_seed(0)
    base = nn.Linear(8, 6).to(torch.bfloat16)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=2, alpha=2, use_dora=True)
    layer.active_adapter = "a"
    assert layer.lora_magnitude_vector["a"].dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, base(x))  # exact at init, in the base's dtype
    int_base = nn.Linear(8, 6)
    int_base.weight = nn.Parameter(torch.zeros(6, 8, dtype=torch.uint8), requires_grad=False)  # a packed weight
    for kwargs in ({"use_dora": True}, {"init": "pissa"}):
        with pytest.raises(LorakitError, match="quantized"):
            LoraLinear(int_base).add_adapter("a", r=2, alpha=2, **kwargs)
