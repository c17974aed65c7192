"""Training-speed options that must not change the math: base_dtype auto's choice, and padding-free packing."""

from __future__ import annotations

import pytest
import torch
import yaml

import lorakit.hardware
from lorakit.train import train
from tiny_run import config, data_file, lora_model, one_thread, tok  # noqa: F401  (fixtures)


@pytest.mark.parametrize("speedup, chosen", [(2.5, "bf16"), (0.02, "fp32")])
def test_auto_base_dtype_follows_the_measured_bf16_speed_and_records_why(tmp_path, tok, data_file, monkeypatch, capsys,
                                                                         speedup, chosen):
    monkeypatch.setattr(lorakit.hardware, "bf16_speedup", lambda device="cpu": speedup)
    model = lora_model(dropout=0.0)
    result = train(config(tmp_path / "r", data_file, optim__max_steps=2, eval_every=0, save_every=0), model, tok)
    why = f"base_dtype auto -> {chosen}: bf16 matmul measured {speedup:.{1 if speedup >= 1.3 else 2}f}x fp32 on this cpu"
    assert why in capsys.readouterr().out
    saved = (result.run_dir / "config.yaml").read_text()
    assert saved.startswith(f"# {why}") and yaml.safe_load(saved)["base_dtype"] == chosen
    base = model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert base.dtype == (torch.bfloat16 if chosen == "bf16" else torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # LoRA stays fp32


def test_auto_keeps_fp32_for_a_caller_prepared_model_without_adapters_and_explicit_values_stay(tmp_path, tok,
                                                                                              data_file, capsys):
    from conftest import tiny_llama

    model = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name)
    result = train(config(tmp_path / "c", data_file, optim__max_steps=1, eval_every=0, save_every=0), model, tok)
    assert "base_dtype auto -> fp32: the model was prepared by the caller without lorakit adapters" in \
        capsys.readouterr().out
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["base_dtype"] == "fp32"
    explicit = config(tmp_path / "e", data_file, base_dtype="fp32")
    assert explicit.resolve_auto("cpu") == (explicit, None)


def test_packed_training_has_the_padded_runs_losses_and_resumes_exactly(tmp_path, tok, data_file):
    runs = {}
    for packing in (False, True):
        result = train(config(tmp_path / f"p{packing}", data_file, base_dtype="fp32", data__packing=packing,
                              optim__max_steps=5, save_every=0), lora_model(dropout=0.0), tok)
        runs[packing] = [r["loss"] for r in result.history if "loss" in r]
    assert len(runs[True]) == 5
    assert runs[True] == pytest.approx(runs[False], rel=1e-5, abs=1e-6)

    class Stop(Exception):
        pass

    def crash(step, record):
        if step == 3:
            raise Stop

    cfg = config(tmp_path / "resume", data_file, base_dtype="fp32", data__packing=True, optim__max_steps=5)
    with pytest.raises(Stop):
        train(cfg, lora_model(dropout=0.0), tok, on_step=crash)
    resumed = train(None, lora_model(dropout=0.0), tok, resume=tmp_path / "resume")
    assert [r["loss"] for r in resumed.history if "loss" in r] == pytest.approx(runs[True], rel=0, abs=0)


def test_packing_is_refused_where_it_does_not_apply():
    from lorakit.errors import LorakitError
    from lorakit.train import TrainConfig

    with pytest.raises(LorakitError, match="data.packing applies to causal-LM training in one process"):
        TrainConfig.from_dict({"task": "seq-cls", "data": {"packing": True}})
