"""torchao int8 weight-only frozen base ("int8-wo") under LoRA: the checks specific to it. The checks shared with
bitsandbytes (close to fp32, disabled == quantized base, gradients on A/B only, PEFT parity, merge_quantized drift) are
parametrized over int8-wo in test_quantization.py."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("torchao", reason="quantize='int8-wo' needs torchao (pip install 'lorakit[quant]')")

import lorakit as lk  # noqa: E402
from conftest import quantizable_llama, randomize_lora_B  # noqa: E402
from lorakit.errors import LorakitError  # noqa: E402
from lorakit.models.quantization import (dequantize_weight, merge_quantized, quantization_of, quantize_linear,  # noqa: E402
                                  quantize_model, weight_bytes)
from lorakit.train import TrainConfig, train  # noqa: E402
from tiny_text import tiny_tokenizer  # noqa: E402



def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def int8wo_lora():
    model = quantize_model(quantizable_llama(), "int8-wo")
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8))
    randomize_lora_B(model, std=0.05)
    return model


def test_int8wo_layer_forward_and_backward_use_the_dequantized_weight_without_keeping_it():
    torch.manual_seed(0)
    linear = nn.Linear(32, 48)
    q = quantize_linear(linear, "int8-wo")
    w = dequantize_weight(q)  # (48, 32)
    assert type(q.weight).__name__ == "Int8Tensor" and not q.weight.requires_grad
    # int8 data 48×32 + fp32 scale and int8 zero point per row + fp32 bias 48, vs fp32 weight and bias
    assert weight_bytes(q) == 48 * 32 + 48 * 4 + 48 + 48 * 4 and weight_bytes(linear) == 48 * 32 * 4 + 48 * 4
    error, row_max = (w - linear.weight).detach().abs(), linear.weight.detach().abs().amax(1, keepdim=True)
    assert 0 < float(error.max()) and bool((error <= row_max / 254 + 1e-7).all())  # ≤ half a step of max|row|/127
    x = torch.randn(4, 5, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)  # (4, 5, 48)
    assert saved == []  # backward rebuilds the float weight; torchao's own linear would keep a float copy of it
    torch.testing.assert_close(y, nn.functional.linear(x, w, linear.bias), rtol=0, atol=1e-6)
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad @ w, rtol=0, atol=1e-6)


def test_optimizer_steps_change_a_b_only_and_the_adapter_reloads_with_the_same_logits(tmp_path, ids):
    model = int8wo_lora()
    base = {n: (p.qdata.clone(), p.scale.clone()) for n, p in model.named_parameters() if not p.requires_grad
            and type(p).__name__ == "Int8Tensor"}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(base) == 14 and len(lora) == 8  # 2 layers × 7 linears; A, B on q_proj, v_proj
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n].detach(), before) for n, before in lora.items())
    assert all(torch.equal(params[n].qdata, q) and torch.equal(params[n].scale, s) for n, (q, s) in base.items())

    lk.save_adapter(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "lorakit.json").read_text())
    assert meta["base_fingerprint"]["quantization"] == "int8-wo"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same int8-wo base: the fingerprint (dequantized weights) matches exactly
        reloaded = lk.load_adapter(quantize_model(quantizable_llama(), "int8-wo"), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    with pytest.warns(UserWarning, match="trained on a int8-wo base"):  # the fp32 base differs by design
        lk.load_adapter(quantizable_llama(), tmp_path / "adapter")


def test_merge_dora_and_fsdp_are_refused_with_what_to_do_instead():
    model = int8wo_lora()
    with pytest.raises(LorakitError, match="Cannot merge into a quantized base .*Int8Tensor.*merge_quantized"):
        lk.merge(model)
    assert not model.model.layers[0].self_attn.q_proj.merged_adapters
    with pytest.raises(LorakitError, match="stored quantized here .*Int8Tensor.*unquantized base"):
        lk.add_lora(quantize_model(quantizable_llama(), "int8-wo"), lk.LoraConfig(r=4, use_dora=True))
    from lorakit.train.distributed import check_shardable

    with pytest.raises(LorakitError, match="fsdp cannot shard this quantized base .*torchao"):
        check_shardable(model)
    with pytest.raises(LorakitError, match="loftq quantizes through bitsandbytes"):
        TrainConfig.from_dict({"quantize": "int8-wo", "lora": {"init": "loftq"}})


def test_forced_merge_back_into_int8wo_prints_the_drift(ids, capsys):
    with pytest.raises(LorakitError, match="rounds ΔW .*force=True"):
        merge_quantized(int8wo_lora(), ids, requantize=True)
    plain, report = merge_quantized(int8wo_lora(), ids, requantize=True, force=True)
    assert quantization_of(plain) == "int8-wo" and report.dtype == "int8-wo" and report.max_logit_diff > 0
    assert f"max logit difference vs base+adapter {report.max_logit_diff:.3g}" in capsys.readouterr().out


def test_train_with_quantize_int8wo(tmp_path):
    rows = [{"prompt": f"the {a} and", "completion": f" {b}"} for a in ("cat", "dog", "bird") for b in ("tree", "car")]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig.from_dict({"output_dir": str(tmp_path / "run"), "tensorboard": False, "progress": False,
                                    "quantize": "int8-wo", "data": {"train_file": str(data)},
                                    "optim": {"lr": 5e-2, "batch_size": 3, "max_steps": 3}})
    model = lk.add_lora(quantizable_llama(), lk.LoraConfig(r=4, alpha=8))
    result = train(config, model, tiny_tokenizer())
    assert quantization_of(model) == "int8-wo" and result.steps == 3
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)  # steps through the torchao base
    saved = json.loads((result.adapter_dir / "lorakit.json").read_text())
    assert saved["base_fingerprint"]["quantization"] == "int8-wo"
