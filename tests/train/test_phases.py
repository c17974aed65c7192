"""The loop's phases, each on its own: prepare, build_run, restore, train_step, validate, checkpoint, finish."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama
from lorakit.data.records import read_records, split_records, tokenize
from lorakit.errors import LorakitError
from lorakit.train import build_run, checkpoints, finish, prepare, read_checkpoint, restore, train_step, validate
from lorakit.train.checkpoint import trainable_params
from lorakit.train.loop import Run, checkpoint
from tiny_run import config, data_file, lora_model, one_thread, tok  # noqa: F401 (fixtures)
from tiny_text import save_tiny_lm, tiny_tokenizer


def make_run(out, data_file, tok, dropout: float = 0.0, model=None, **over) -> Run:
    cfg = config(out, data_file, **over)
    run = build_run(cfg, prepare(cfg, model if model is not None else lora_model(dropout=dropout), tok), out)
    run.engine.train()  # as train() does before its loop (the tiny models start in inference mode)
    return run


def snapshot(run: Run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.params}


def nan_gradient(run: Run):
    """Every gradient of one LoRA B becomes NaN (until the returned handle is removed)."""
    param = next(p for n, p in run.params if "lora_B" in n)
    return param.register_hook(lambda g: torch.full_like(g, float("nan")))


def test_prepare_loads_the_tokenizer_once_then_the_model_with_it(tmp_path, data_file, monkeypatch):
    from transformers import AutoTokenizer

    model_dir = save_tiny_lm(tmp_path / "tiny")
    calls, original = [], AutoTokenizer.from_pretrained

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", counting)
    cfg = config(tmp_path / "run", data_file, model=str(model_dir), lora__r=2)
    prepared = prepare(cfg)
    assert calls == [str(model_dir)]
    assert prepared.task == "causal-lm" and prepared.tokenizer.pad_token is not None
    assert (len(prepared.train_data.examples), len(prepared.eval_data.examples)) == (18, 6)
    expected = tokenize(split_records(read_records(data_file), 0.25, 0)[0], tiny_tokenizer(), cfg.data)
    assert [e.input_ids for e in prepared.train_data.examples] == [e.input_ids for e in expected.examples]
    trainable = trainable_params(prepared.model)
    assert len(trainable) == 2 * 2 * 2 and all(".lora_" in n for n, _ in trainable)  # 2 layers x (q, v) x (A, B)
    assert sum(p.numel() for _, p in trainable) == 2 * 2 * (32 + 32 + 32 + 16)  # layers x r x (q: 32->32, v: 32->16)


def test_prepare_refuses_a_model_without_tokenizer_or_without_trainable_parameters(tmp_path, data_file, tok):
    cfg = config(tmp_path / "run", data_file)
    with pytest.raises(LorakitError, match="pass the model's tokenizer together with model="):
        prepare(cfg, tiny_llama())
    frozen = tiny_llama().requires_grad_(False)
    with pytest.raises(LorakitError, match="Nothing to train"):
        prepare(cfg, frozen, tok)


def test_build_run_sizes_the_schedule_and_writes_the_config(tmp_path, data_file, tok):
    run = make_run(tmp_path / "run", data_file, tok)
    assert (run.micro_per_epoch, run.total_steps) == (5, 8)  # ceil(18 / 4); ceil(5 * 3 epochs / 2 per step)
    assert (run.run_dir / "config.yaml").read_text() == run.config.to_yaml()
    assert [len(g["params"]) for g in run.optimizer.param_groups] == [8]  # all LoRA matrices, with weight decay
    assert run.scheduler.get_last_lr() == [pytest.approx(1e-2 / 3)]  # warmup 2: factor (0 + 1) / (2 + 1)


def test_train_step_applies_a_finite_step_and_refuses_a_nonfinite_one(tmp_path, data_file, tok):
    run = make_run(tmp_path / "run", data_file, tok)
    before = snapshot(run)
    record = train_step(run)
    assert (record["step"], run.step, run.micro, record["epoch"]) == (1, 1, 2, 0.4)
    assert record["lr"] == pytest.approx(1e-2 / 3) and math.isfinite(record["loss"]) and record["grad_norm"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in run.params)

    before = snapshot(run)
    nan_gradient(run)
    with pytest.raises(LorakitError, match=r"gradient norm became nan at step 2; the step was not applied and "
                                           r"training stopped. The last good checkpoint is none \(no checkpoint yet\)"):
        train_step(run)
    assert all(torch.equal(p, before[n]) for n, p in run.params)  # never applied
    assert all(p.grad is None for _, p in run.params) and run.step == 1


def test_train_step_in_skip_mode_drops_the_step_and_goes_on(tmp_path, data_file, tok):
    run = make_run(tmp_path / "run", data_file, tok, on_nonfinite="skip", max_skipped_steps=2)
    train_step(run)
    before = snapshot(run)
    hook = nan_gradient(run)
    record = train_step(run)
    assert record["skipped"] and "grad_norm" not in record
    assert (run.step, run.micro, run.skipped_total, run.skipped_in_a_row, run.scheduler.last_epoch) == (2, 4, 1, 1, 2)
    assert all(torch.equal(p, before[n]) for n, p in run.params)
    hook.remove()
    record = train_step(run)
    assert "skipped" not in record and run.skipped_in_a_row == 0 and run.skipped_total == 1
    assert any(not torch.equal(p, before[n]) for n, p in run.params)


def test_restore_continues_exactly_where_the_checkpoint_left_off(tmp_path, data_file, tok):
    a = make_run(tmp_path / "a", data_file, tok, dropout=0.2)  # dropout: the restored RNG state matters
    train_step(a)
    train_step(a)
    path = checkpoint(a)
    assert path == tmp_path / "a" / "checkpoints" / "step-000002"
    third = train_step(a)

    b = make_run(tmp_path / "b", data_file, tok, dropout=0.2)
    restore(b, read_checkpoint(path))
    assert (b.step, b.micro, b.best, b.scheduler.last_epoch) == (2, 4, None, 2)
    again = train_step(b)
    assert again["loss"] == third["loss"] and again["lr"] == third["lr"]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(a.params, b.params))

    bitfit = tiny_llama()
    for name, p in bitfit.named_parameters():
        p.requires_grad_("norm" in name)
    c = make_run(tmp_path / "c", data_file, tok, model=bitfit)
    with pytest.raises(LorakitError, match="does not hold 5 of the parameters that train now.*same model preparation"):
        restore(c, read_checkpoint(path))


def test_validate_measures_and_keeps_the_best_adapter(tmp_path, data_file, tok):
    run = make_run(tmp_path / "run", data_file, tok)
    first = validate(run)
    assert first["eval_ppl"] == pytest.approx(math.exp(first["eval_loss"])) and run.best == first["eval_loss"]
    assert run.best_dir == run.run_dir / "best" and run.metrics == first
    assert run.engine.training  # evaluation puts the model back into training mode
    for _ in range(3):
        train_step(run)
    second = validate(run)
    assert second["eval_loss"] < first["eval_loss"] and run.best == second["eval_loss"]
    best = load_file(str(run.best_dir / "adapter_model.safetensors"))
    current = {n: p.detach() for n, p in run.params}
    assert len(best) == len(current) == 8
    for key, saved in best.items():  # PEFT's file names: base_model.model.<module>.lora_A.weight
        name = key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        assert torch.equal(saved, current[name]), key


def test_finish_writes_the_final_checkpoint_adapter_and_summary(tmp_path, data_file, tok, capsys):
    run = make_run(tmp_path / "run", data_file, tok, progress=True)
    train_step(run)
    result = finish(run, started=time.perf_counter())
    assert result.adapter_dir == run.run_dir / "adapter" and not result.interrupted and result.steps == 1
    assert [p.name for p in checkpoints(run.run_dir)] == ["step-000001"]
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert list(summary) == ["steps", "trainable params", "trainable %", "adapter size on disk (bytes)",
                             "wall time (s)", "peak memory (MB)", "examples", "truncated examples", "run folder",
                             "loss curve"]
    assert summary["steps"] == 1 and summary["trainable params"] == sum(p.numel() for _, p in run.params) == 896
    assert summary["examples"] == 18 and summary["loss curve"] == "none"  # nothing was logged: no curve
    assert summary["adapter size on disk (bytes)"] > 1024 * 4
    assert "training summary" in capsys.readouterr().out


def test_a_model_run_takes_the_same_step_on_the_callers_batches(tmp_path, data_file, tok):
    from lorakit.train import OptimConfig, TrainConfig, build_model_run
    from lorakit.train.loop import _next_micro_batches

    a = make_run(tmp_path / "a", data_file, tok)
    batches = _next_micro_batches(a)  # what a's first step trains on
    a.micro = 0
    optim = dataclasses.replace(a.config.optim, max_steps=a.total_steps)
    b = build_model_run(lora_model(dropout=0.0), dataclasses.replace(a.config, output_dir=str(tmp_path / "b"),
                                                                     optim=optim), task="causal-lm")
    b.engine.train()
    ours, theirs = train_step(a), train_step(b, batches)
    assert (theirs["loss"], theirs["lr"], theirs["grad_norm"]) == (ours["loss"], ours["lr"], ours["grad_norm"])
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(a.params, b.params))
    assert (b.step, b.micro, b.total_steps, theirs["epoch"]) == (1, 2, 8, None)
    assert not (tmp_path / "b").exists()  # nothing written

    nan_gradient(b)
    with pytest.raises(LorakitError, match="gradient norm became nan at step 2; the step was not applied"):
        train_step(b, batches)
    with pytest.raises(LorakitError, match="set optim.max_steps"):
        build_model_run(lora_model(), TrainConfig(optim=OptimConfig()), task="causal-lm")
