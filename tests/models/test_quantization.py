"""Quantized frozen bases (QLoRA): bitsandbytes NF4 / int8 (and torchao int8-wo where shared) under LoRA, training,
merging, LoftQ init. torchao-only checks: test_quantization_torchao.py."""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

import lorakit as lk  # noqa: E402
from conftest import quantizable_llama, randomize_lora_B, tiny_llama as tiny_llama_with  # noqa: E402
from lorakit.errors import LorakitError  # noqa: E402
from lorakit.export.merged import merge_to_directory  # noqa: E402
from lorakit.models.quantization import (dequantize_weight, loftq_init, merge_quantized, quantization_of,  # noqa: E402
                                  quantize_linear, quantize_model, weight_bytes)
from lorakit.train import TrainConfig, train  # noqa: E402
from tiny_text import save_tiny_lm, tiny_tokenizer  # noqa: E402

# Max |quantized − fp32| logits relative to max |fp32 logits| on the tiny Llama: NF4 (4-bit, blocks of 64) measured
# ~0.11, int8 (per-row absmax) ~0.005, int8-wo (torchao, per-row scale, float activations) 0.0071; the bounds leave
# room for other seeds.
RELATIVE_DRIFT = {"nf4": 0.25, "int8": 0.02, "int8-wo": 0.02}
# merge_quantized in fp32 vs the quantized base + adapter: NF4 and torchao int8-wo layers compute with the dequantized
# weight (exact up to fp32 rounding; int8-wo measured 8.9e-8); bitsandbytes' int8 layer in eval mode also rounds the
# activations to int8 (measured 1.9e-3 here, with an adapter effect of 0.22).
MERGE_DRIFT = {"nf4": 1e-5, "int8": 1e-2, "int8-wo": 1e-5}
# The quantized layer's class: bitsandbytes' own, or lorakit's nn.Linear subclass holding a torchao Int8Tensor weight.
LAYER_CLASS = {"nf4": "Linear4bit", "int8": "Linear8bitLt", "int8-wo": "Int8WeightOnlyLinear"}
METHODS = ["nf4", "int8", pytest.param("int8-wo", marks=pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="quantize='int8-wo' needs torchao"))]


@pytest.fixture
def ids():
    return torch.randint(1, 97, (3, 9), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", METHODS)
def test_quantized_base_is_close_to_fp32_trains_lora_only_and_disabled_is_the_quantized_base(method, ids):
    fp32 = quantizable_llama()
    reference = logits(fp32, ids)
    model = quantize_model(quantizable_llama(), method)
    attn = model.model.layers[0].self_attn
    assert type(attn.q_proj).__name__ == LAYER_CLASS[method] and quantization_of(model) == method
    assert type(model.lm_head) is nn.Linear  # the output head stays full precision
    size = weight_bytes(model)
    assert quantization_of(model) == method and size < weight_bytes(fp32)
    quantized = logits(model, ids)
    assert weight_bytes(model) == size  # int8 scales move from the weight to the layer state on the first forward
    drift = float((quantized - reference).abs().max()) / float(reference.abs().max())
    assert 0 < drift < RELATIVE_DRIFT[method]

    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    layer = model.model.layers[0].self_attn.q_proj
    assert (layer.in_features, layer.out_features) == (64, 64)  # from the layer, not the packed weight
    randomize_lora_B(model, std=0.05)
    with lk.disable_adapters(model):
        assert torch.equal(logits(model, ids), quantized)  # exactly the quantized base
    assert float((logits(model, ids) - quantized).abs().max()) > 1e-2
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if "lora_" in n}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


def test_lora_weights_in_a_chosen_dtype_on_a_quantized_base(ids):
    model = quantize_model(quantizable_llama(), "nf4")
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8), dtype=torch.bfloat16)
    randomize_lora_B(model, std=0.05)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.bfloat16 for p in lora.values())
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.float32  # the base computes in fp32; the bf16 LoRA output is cast back
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in lora.values())


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    words = "cat dog bird fish tree house car road city river".split()
    rows = [{"prompt": f"the {a} and the {b}", "completion": f"{b} {a}"} for a in words[:5] for b in words[5:]]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_qlora_training_lowers_the_loss_like_fp32_lora_and_the_adapter_loads_on_a_fp32_base(tmp_path, data_file):
    def run(name, quantize):
        config = TrainConfig.from_dict({"output_dir": str(tmp_path / name), "tensorboard": False, "progress": False,
                                        "quantize": quantize, "data": {"train_file": str(data_file)},
                                        "optim": {"lr": 5e-2, "batch_size": 5, "epochs": 3, "warmup_steps": 1}})
        model = lk.add_lora(quantizable_llama(), lk.LoraConfig(r=4, alpha=8))
        result = train(config, model, tiny_tokenizer())
        return model, result, [r["loss"] for r in result.history if "loss" in r]

    model, result, losses = run("nf4", "nf4")
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    assert len(losses) == 15 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    _, _, fp32_losses = run("fp32", None)
    assert abs(losses[-1] - fp32_losses[-1]) < 0.05 * fp32_losses[-1]  # same learning curve within 5%
    meta = json.loads((result.adapter_dir / "lorakit.json").read_text())
    assert meta["base_fingerprint"]["quantization"] == "nf4"
    with pytest.warns(UserWarning, match="trained on a nf4 base"):  # the fp32 base differs by design
        lk.load_adapter(quantizable_llama(), result.adapter_dir)
    nf4 = quantize_model(quantizable_llama(), "nf4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same quantized base: the fingerprint matches exactly
        lk.load_adapter(nf4, result.adapter_dir)


def test_cli_train_quantize_int8_with_loftq_init_and_bad_settings(tmp_path, data_file, capsys):
    from lorakit.cli.main import main

    model_dir = save_tiny_lm(tmp_path / "tiny", hidden_size=64, intermediate_size=128)
    with pytest.raises(SystemExit) as ex:
        main(["train", "--model", str(model_dir), "--train-file", str(data_file), "--output-dir",
              str(tmp_path / "run"), "--max-steps", "2", "--quantize", "int8", "--set", "progress=false",
              "--set", "tensorboard=false", "--set", "lora.init=loftq"])
    assert ex.value.code == 0 and "adapter:" in capsys.readouterr().out
    assert TrainConfig.from_yaml(tmp_path / "run" / "config.yaml").quantize == "int8"
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 1}
    with pytest.raises(LorakitError, match="quantize must be nf4, int8, int8-wo or null, got 'fp8'"):
        TrainConfig.from_dict({"quantize": "fp8"})
    with pytest.raises(LorakitError, match="lora.init=loftq .* also set quantize"):
        TrainConfig.from_dict({"lora": {"init": "loftq"}})
    with pytest.raises(LorakitError, match="loftq_bits=8 does not match quantize=nf4"):
        TrainConfig.from_dict({"quantize": "nf4", "lora": {"init": "loftq", "loftq_config": {"loftq_bits": 8}}})


# ---------------------------------------------------------------------------------------------------- merging
def qlora_model(method: str = "nf4"):
    model = quantize_model(quantizable_llama(), method)
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8))
    randomize_lora_B(model, std=0.05)
    return model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated")  # PEFT's torchao layer cannot merge: fine
def test_peft_loads_a_qlora_adapter_on_the_same_quantized_base_with_the_same_logits(method, tmp_path, ids):
    from peft import PeftModel

    model = qlora_model(method)
    lk.save_adapter(model, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(quantize_model(quantizable_llama(), method), tmp_path / "adapter")
    assert torch.equal(logits(theirs, ids), logits(model, ids))


def test_plain_merge_on_a_quantized_base_says_what_to_do():
    model = qlora_model()
    with pytest.raises(LorakitError, match="Cannot merge into a quantized base .*merge_quantized"):
        lk.merge(model)
    assert not model.model.layers[0].self_attn.q_proj.merged_adapters


@pytest.mark.parametrize("method", METHODS)
def test_merge_quantized_dequantizes_merges_and_reports_the_drift(method, ids):
    model = qlora_model(method)
    expected = logits(model, ids)
    plain, report = merge_quantized(model, ids)
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear and not hasattr(plain, "lora_configs")
    assert report.method == method and report.dtype == "float32" and report.adapter_effect > 1e-2
    assert report.max_logit_diff < MERGE_DRIFT[method]
    assert float((logits(plain, ids) - expected).abs().max()) == pytest.approx(report.max_logit_diff)

    plain16, report16 = merge_quantized(qlora_model(method), ids, dtype="bfloat16")
    assert plain16.dtype == torch.bfloat16 and 1e-4 < report16.max_logit_diff < report16.adapter_effect


def test_merging_back_into_4bit_needs_force_and_prints_the_drift(ids, capsys):
    with pytest.raises(LorakitError, match="rounds ΔW .*force=True"):
        merge_quantized(qlora_model(), ids, requantize=True)
    model = qlora_model()
    expected = logits(model, ids)
    plain, report = merge_quantized(model, ids, requantize=True, force=True)
    assert report.requantized and report.dtype == "nf4" and quantization_of(plain) == "nf4"
    assert report.max_logit_diff > 1e-3  # the 4-bit grid loses part of ΔW
    assert float((logits(plain, ids) - expected).abs().max()) == pytest.approx(report.max_logit_diff)
    assert f"max logit difference vs base+adapter {report.max_logit_diff:.3g}" in capsys.readouterr().out


@pytest.mark.parametrize("method", [m for m in METHODS if m != "int8"])  # bnb int8: covered by merge_quantized
def test_export_merges_a_qlora_adapter_into_the_dequantized_base(method, tmp_path, ids):
    save_tiny_lm(tmp_path / "base", hidden_size=64, intermediate_size=128)
    model, _ = lk.load_model(str(tmp_path / "base"), quantize=method)
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8))
    randomize_lora_B(model, std=0.05)
    expected = logits(model, ids)
    lk.save_adapter(model, tmp_path / "adapter")
    report = merge_to_directory(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "merged", quantize=method)
    assert report.quantize == method and report.max_logit_diff < 1e-5 and report.adapter_effect > 1e-2
    assert f"vs {method} base+adapter" in str(report)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert float((logits(merged, ids) - expected).abs().max()) < 1e-5
    saved = json.loads((tmp_path / "merged" / "lorakit_merge.json").read_text())
    assert saved["quantize"] == method


# ---------------------------------------------------------------------------------------------------- LoftQ
def approximation_errors(fp32: nn.Module, model: nn.Module) -> tuple[float, float]:
    """Σ‖W − dequant(quant(W))‖² and Σ‖W − (Q + scale·BA)‖² over the adapted layers."""
    plain = with_lora = 0.0
    for name, layer in model.named_modules():
        if isinstance(layer, lk.LoraLinear):
            w = fp32.get_submodule(name).weight.detach()
            q = dequantize_weight(layer.base_layer)
            plain += float((w - dequantize_weight(quantize_linear(fp32.get_submodule(name), "nf4"))).pow(2).sum())
            with_lora += float((w - q - layer.delta_weight("default").detach()).pow(2).sum())
    return plain, with_lora


def test_loftq_lowers_the_quantization_error_and_is_saved_in_peft_fields(tmp_path, ids):
    fp32 = quantizable_llama()
    models, errors = {}, {}
    for iters in (1, 4):
        models[iters] = quantizable_llama()
        lk.add_lora(models[iters], lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        loftq_init(models[iters], bits=4, iters=iters)
        errors[iters] = approximation_errors(fp32, models[iters])
    plain, one = errors[1]
    assert one < 0.9 * plain  # the rank-4 SVD of the residual removes part of the quantization error
    assert errors[4][1] < one  # more alternations: a better pair (Q, BA)
    # The starting point of training: Q + BA is closer to the fp32 model than Q alone.
    model = models[1]
    reference = logits(fp32, ids)
    with lk.disable_adapters(model):
        only_q = float((logits(model, ids) - reference).abs().max())
    assert float((logits(model, ids) - reference).abs().max()) < only_q

    lk.save_adapter(model, tmp_path / "loftq1")
    peft_cfg = json.loads((tmp_path / "loftq1" / "adapter_config.json").read_text())
    assert peft_cfg["init_lora_weights"] == "loftq" and peft_cfg["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    from peft import LoraConfig as PeftLoraConfig

    assert PeftLoraConfig.from_pretrained(tmp_path / "loftq1").loftq_config["loftq_bits"] == 4
    # One iteration quantizes W itself, so the adapter fits any NF4 copy of the base (loaded, not re-initialised).
    reloaded = lk.load_adapter(quantize_model(quantizable_llama(), "nf4"), tmp_path / "loftq1")
    assert reloaded.lora_configs["default"].init == "loftq"
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    # More iterations quantize W − BA: that base is not NF4(W), and the fingerprint check says so.
    lk.save_adapter(models[4], tmp_path / "loftq4")
    with pytest.raises(LorakitError, match="trained on a different base model"):
        lk.load_adapter(quantize_model(quantizable_llama(), "nf4"), tmp_path / "loftq4")


def test_layers_too_narrow_for_nf4_stay_full_precision_with_one_warning_on_every_cpu(ids):
    # hidden 64 (attention quantizes), MLP width 48: gate/up give 48 outputs, down takes 48 inputs; nf4 needs inputs
    # in whole blocks of 64 and outputs in groups of 32. The rule does not depend on the CPU the test runs on.
    narrow = lk.add_lora(tiny_llama_with(hidden_size=64, intermediate_size=48), lk.LoraConfig(r=4, alpha=8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(narrow, "nf4")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert messages[0].startswith("quantize='nf4': 6 layer(s) kept in full precision")
    assert "model.layers.0.mlp.down_proj (48→64: nf4 needs an input width that is a multiple of 64" in messages[0]
    layer = narrow.model.layers[0]
    assert type(layer.mlp.down_proj) is nn.Linear and type(layer.mlp.gate_proj) is nn.Linear
    assert type(layer.self_attn.q_proj.base_layer).__name__ == "Linear4bit" and quantization_of(narrow) == "nf4"
    randomize_lora_B(narrow)
    out = logits(narrow, ids)  # eval-mode, no-grad forward: the path that crashed inside bitsandbytes
    assert torch.isfinite(out).all()

    with pytest.raises(LorakitError, match=r"quantize='nf4' can quantize none of this model's linear layers: "
                                           r"model.layers.0.self_attn.q_proj \(32→32: nf4 needs"):
        quantize_model(tiny_llama_with(hidden_size=32, intermediate_size=48), "nf4")
    with pytest.raises(LorakitError, match=r"Cannot quantize this layer \(48→64.*use quantize='int8'"):
        quantize_linear(nn.Linear(48, 64), "nf4")
    assert quantization_of(quantize_model(tiny_llama_with(hidden_size=32, intermediate_size=48), "int8")) == "int8"
