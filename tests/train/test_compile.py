"""compile: true trains the same model to the same losses, reports its compile time, and stops clearly where torch
cannot compile."""

from __future__ import annotations

import pytest

import lorakit.train.loop as loop
from lorakit.errors import LorakitError
from lorakit.train import train
from tiny_run import config, data_file, lora_model, one_thread, tok  # noqa: F401  (fixtures)


@pytest.mark.slow  # Inductor compiles C++ for the block's forward and backward: ~30-60 s on a shared 2-core CPU
def test_compiled_training_has_the_eager_runs_losses_and_reports_its_compile_time(tmp_path, tok, data_file):
    runs = {}
    for compiled in (False, True):
        model = lora_model(dropout=0.0)
        result = train(config(tmp_path / f"c{compiled}", data_file, base_dtype="fp32", compile=compiled,
                              optim__max_steps=4, save_every=0), model, tok)
        runs[compiled] = result
    losses = {c: [r["loss"] for r in result.history if "loss" in r] for c, result in runs.items()}
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
    assert runs[True].metrics["eval_loss"] == pytest.approx(runs[False].metrics["eval_loss"], rel=1e-4)
    assert runs[True].summary["compile time (s)"] > 0
    assert "compile time (s)" not in runs[False].summary
    # compiled in place: the parameter names, so the adapter files, are the eager model's
    assert sorted(p.name for p in (runs[True].adapter_dir).iterdir()) == \
        sorted(p.name for p in (runs[False].adapter_dir).iterdir())


def test_compile_stops_with_the_reason_where_torch_cannot_compile(tmp_path, tok, data_file, monkeypatch):
    monkeypatch.setattr(loop, "compile_problem", lambda device="cpu": "Inductor needs a C++ compiler for CPU code")
    with pytest.raises(LorakitError, match="compile: true cannot work here: Inductor needs a C.. compiler.*"
                                           "--set compile=false"):
        train(config(tmp_path / "x", data_file, compile=True, optim__max_steps=1), lora_model(), tok)


def test_compile_is_a_validated_boolean():
    with pytest.raises(LorakitError, match="compile must be true or false"):
        config("out", "train.jsonl", compile="yes")
