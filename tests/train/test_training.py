"""Training: the config schema, determinism, exact resume (crash and Ctrl-C), checkpoints, NaN stop, caller models."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorakit as lk
from conftest import tiny_bert, tiny_llama
from lorakit.errors import LorakitError
from lorakit.train import TrainConfig, checkpoints, latest_checkpoint, train
from tiny_run import WORDS, config, data_file, lora_model, one_thread, tok  # noqa: F401 (fixtures)


class Crash(Exception):
    """Stands for the process dying (no checkpoint is written on the way out)."""


def crash_at(n: int):
    def on_step(step, record):
        if step == n:
            raise Crash

    return on_step


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------- config
def test_cli_overrides_resume_conflict_and_set_syntax(tmp_path):
    from lorakit.cli.main import main

    with pytest.raises(SystemExit) as ex:
        main(["train", "--set", "optim.lr"])
    assert ex.value.code == 2
    with pytest.raises(SystemExit) as ex:
        main(["train", "--resume", str(tmp_path), "--lr", "1e-3"])
    assert ex.value.code == 2


# ---------------------------------------------------------------------------------------------------- the loop
@pytest.fixture(scope="module")
def full(tmp_path_factory, tok, data_file):
    """One uninterrupted run, the reference for the determinism and resume tests."""
    torch.set_num_threads(1)
    return train(config(tmp_path_factory.mktemp("full") / "run", data_file), lora_model(), tok)


def test_same_seed_same_adapter_and_loss_goes_down(tmp_path, tok, data_file, full):
    a = full
    b = train(config(tmp_path / "b", data_file), lora_model(), tok)
    A, B = adapter(a.run_dir), adapter(b.run_dir)
    assert A.keys() == B.keys() and all(torch.equal(A[k], B[k]) for k in A)
    losses = [r["loss"] for r in a.history if "loss" in r]
    assert len(losses) == a.steps == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert a.metrics["eval_loss"] > 0 and a.metrics["eval_ppl"] == pytest.approx(torch.tensor(a.metrics["eval_loss"]).exp().item())
    assert (a.run_dir / "loss_curve.png").stat().st_size > 1000 and (a.run_dir / "best").is_dir()
    summary = json.loads((a.run_dir / "summary.json").read_text())
    assert summary["trainable params"] == sum(p.numel() for n, p in lora_model().named_parameters() if "lora_" in n)
    assert [p.name for p in checkpoints(a.run_dir)] == ["step-000006", "step-000008"]  # keep_last=2


def test_crash_after_checkpoint_then_resume_equals_uninterrupted(tmp_path, tok, data_file, full):

    with pytest.raises(Crash):
        train(config(tmp_path / "cut", data_file), lora_model(), tok, on_step=crash_at(7))
    assert latest_checkpoint(tmp_path / "cut")[1]["position"]["step"] == 6  # mid-epoch: 5 micro-batches per epoch, 2 per step
    resumed = train(None, lora_model(), tok, resume=tmp_path / "cut")
    A, B = adapter(full.run_dir), adapter(resumed.run_dir)
    assert all(torch.equal(A[k], B[k]) for k in A), max(float((A[k] - B[k]).abs().max()) for k in A)
    assert [r["loss"] for r in resumed.history if "loss" in r] == [r["loss"] for r in full.history if "loss" in r]


def test_ctrl_c_saves_checkpoint_and_resume_is_exact(tmp_path, tok, data_file, full):

    def interrupt(step, record):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = train(config(tmp_path / "cut", data_file), lora_model(), tok, on_step=interrupt)
    assert stopped.interrupted and stopped.steps == 5 and stopped.adapter_dir is None
    assert checkpoints(tmp_path / "cut")[-1].name == "step-000005"
    resumed = train(None, lora_model(), tok, resume=tmp_path / "cut")
    A, B = adapter(full.run_dir), adapter(resumed.run_dir)
    assert all(torch.equal(A[k], B[k]) for k in A)


def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path, tok, data_file):
    train(config(tmp_path / "r", data_file, optim__max_steps=7, keep_last=3), lora_model(), tok)
    newest = checkpoints(tmp_path / "r")[-1]
    (newest / "optimizer.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        path, state = latest_checkpoint(tmp_path / "r")
    assert path == checkpoints(tmp_path / "r")[-2] and state["position"]["step"] == 6


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, tok, data_file):
    model = lora_model()

    def poison(step, record):
        if step == 3:  # after the step-3 checkpoint
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    # Whether a NaN weight gives a NaN loss or only NaN gradients depends on the CPU's kernels (AVX2 vs AVX-512):
    # either way the step is refused.
    with pytest.raises(LorakitError, match=r"(loss|gradient norm) became nan at step 4.*step-000003"):
        train(config(tmp_path / "n", data_file), model, tok, on_step=poison)
    path, state = latest_checkpoint(tmp_path / "n")
    assert path.name == "step-000003" and all(torch.isfinite(t).all() for t in state["trainable"].values())


def poison_gradients(model, steps: set[int]):
    """A hook that turns one LoRA gradient into NaN during the given optimizer steps (1-based), on any CPU."""
    state = {"step": 1}
    param = next(p for n, p in model.named_parameters() if "lora_B" in n)
    param.register_hook(lambda g: torch.full_like(g, float("nan")) if state["step"] in steps else g)

    def on_step(step, record):
        state["step"] = step + 1
    return param, on_step


def test_nan_gradient_with_finite_loss_is_never_applied_and_stops(tmp_path, tok, data_file):
    model = lora_model()
    param, on_step = poison_gradients(model, {5})
    seen = {}

    def remember(step, record):
        on_step(step, record)
        seen[step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    with pytest.raises(LorakitError, match=r"gradient norm became nan at step 5; the step was not applied.*"
                                           r"last good checkpoint is .*step-000003"):
        train(config(tmp_path / "g", data_file), model, tok, on_step=remember)
    for name, p in model.named_parameters():  # the weights are those after step 4: the poisoned step did nothing
        if p.requires_grad:
            assert torch.isfinite(p).all() and torch.equal(p.detach(), seen[4][name]), name
    assert [c.name for c in checkpoints(tmp_path / "g")][-1] == "step-000003"


def test_skip_mode_drops_nonfinite_steps_counts_them_and_stops_after_too_many_in_a_row(tmp_path, tok, data_file):
    model = lora_model()
    _, on_step = poison_gradients(model, {2, 4})
    result = train(config(tmp_path / "s", data_file, on_nonfinite="skip", max_skipped_steps=2), model, tok,
                   on_step=on_step)
    assert result.summary["skipped steps (non-finite)"] == 2
    assert [r["step"] for r in result.history if r.get("skipped")] == [2, 4]
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())

    model = lora_model()
    _, on_step = poison_gradients(model, {3, 4, 5})
    with pytest.raises(LorakitError, match=r"at step 4.*after 2 non-finite steps in a row \(max_skipped_steps=2\)"):
        train(config(tmp_path / "s2", data_file, on_nonfinite="skip", max_skipped_steps=2, save_every=0), model, tok,
              on_step=on_step)


def test_nonfinite_weights_are_never_written_over_a_good_adapter(tmp_path):
    model = lora_model()
    lk.save_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n)[0, 0] = float("inf")
    with pytest.raises(LorakitError, match=r"Not writing adapter 'default'.*NaN or inf.*lora_A.*intact"):
        lk.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before


def test_caller_prepared_model_trains_exactly_requires_grad(tmp_path, tok, data_file):
    model = tiny_llama()
    for name, p in model.named_parameters():  # BitFit-style: only norms train (this Llama has no biases)
        p.requires_grad_("norm" in name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(config(tmp_path / "bitfit", data_file, optim__max_steps=3), model, tok)
    saved = load_file(str(result.adapter_dir / "trainable.safetensors"))
    assert set(saved) == {n for n, p in model.named_parameters() if "norm" in n}
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != ("norm" in name), name
        if name in saved:
            assert torch.equal(saved[name], p.detach())


def test_classification_with_head_in_modules_to_save(tmp_path, tok):
    rows = [{"text": f"the {w}", "label": "animal" if w in ("cat", "dog", "bird", "fish") else "thing"}
            for w in WORDS * 2]
    path = tmp_path / "cls.csv"
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)
    model = tiny_bert(num_labels=2)
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    result = train(TrainConfig.from_dict({
        "output_dir": str(tmp_path / "cls"), "tensorboard": False, "progress": False, "metric": "accuracy",
        "data": {"train_file": str(path), "eval_file": str(path)},
        "optim": {"lr": 2e-2, "batch_size": 4, "epochs": 15, "weight_decay": 0.0}}), model, tok)
    assert result.metrics["accuracy"] >= 0.9
    assert any("classifier" in k for k in load_file(str(result.adapter_dir / "adapter_model.safetensors")))


def test_cli_train_from_yaml_with_overrides_on_a_model_folder(tmp_path, data_file, capsys):
    from lorakit.cli.main import main
    from tiny_text import save_tiny_lm

    model_dir = save_tiny_lm(tmp_path / "tiny")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(model_dir), "output_dir": str(tmp_path / "run"), "progress": False,
                                   "data": {"train_file": str(data_file)}, "lora": {"r": 2},
                                   "optim": {"lr": 0.5, "max_steps": 50}}))
    with pytest.raises(SystemExit) as ex:
        main(["train", "--config", str(cfg), "--lr", "1e-2", "--max-steps", "2", "--set", "lora.alpha=4",
              "--show-example"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert "with loss (masked spans in ⟦…⟧)" in out and "adapter:" in out
    saved = TrainConfig.from_yaml(tmp_path / "run" / "config.yaml")
    assert (saved.optim.lr, saved.optim.max_steps, saved.lora.r, saved.lora.alpha) == (1e-2, 2, 2, 4)
    assert list((tmp_path / "run" / "tb").iterdir())  # TensorBoard events
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    loaded = lk.load_adapter(tiny_llama(), tmp_path / "run" / "adapter")
    assert loaded is not None


def test_gradient_checkpointing_and_bf16_options_train(tmp_path, tok, data_file, full):
    ckpt = train(config(tmp_path / "gc", data_file, gradient_checkpointing=True), lora_model(), tok)
    A, B = adapter(full.run_dir), adapter(ckpt.run_dir)
    assert max(float((A[k] - B[k]).abs().max()) for k in A) < 1e-5  # same maths, recomputed activations
    bf16 = train(config(tmp_path / "bf16", data_file, precision="bf16", base_dtype="bf16", optim__max_steps=3),
                 lora_model(), tok)
    assert all(v.dtype == torch.float32 for v in adapter(bf16.run_dir).values())  # LoRA weights stay fp32
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in bf16.history if "loss" in r)


def test_exact_match_generates_with_the_trained_adapter(tok):
    from conftest import randomize_lora_B
    from lorakit.data.records import DataConfig, Record, tokenize
    from lorakit.inference.generate import Sampling, generate
    from lorakit.train import exact_match

    model = lora_model(dropout=0.0)
    randomize_lora_B(model, std=2.0)
    prompts = ["the cat and the dog", "hello world", "the sun is hot"]
    adapted = [c.text for c in generate(model, tok, prompts, "default", Sampling(max_new_tokens=4), chat=True)]
    base = [c.text for c in generate(model, tok, prompts, None, Sampling(max_new_tokens=4), chat=True)]
    assert adapted != base
    data = tokenize([Record({"prompt": p, "completion": a}, "x") for p, a in zip(prompts, adapted)], tok, DataConfig())
    assert exact_match(model, tok, data, max_new_tokens=4) == 1.0
    with lk.disable_adapters(model):
        assert exact_match(model, tok, data, max_new_tokens=4) < 1.0


@pytest.mark.slow
def test_real_model_resume_equals_uninterrupted(tmp_path):
    """SmolLM2-135M, 4 steps with LoRA on q/v: crash after the step-2 checkpoint, resume, same adapter exactly."""
    from lorakit.demo import make_dataset

    rows, _ = make_dataset(8, 1)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def cfg(name):
        return TrainConfig.from_dict({"output_dir": str(tmp_path / name), "tensorboard": False, "progress": False,
                                      "save_every": 2, "data": {"train_file": str(path)},
                                      "lora": {"r": 4, "dropout": 0.1},
                                      "optim": {"lr": 1e-3, "batch_size": 2, "max_steps": 4}})

    full = train(cfg("full"))

    with pytest.raises(Crash):
        train(cfg("cut"), on_step=crash_at(3))
    resumed = train(None, resume=tmp_path / "cut")
    A, B = adapter(full.run_dir), adapter(resumed.run_dir)
    assert len(A) == 30 * 2 * 2  # 30 layers x (q, v) x (A, B)
    assert all(torch.equal(A[k], B[k]) for k in A), max(float((A[k] - B[k]).abs().max()) for k in A)
