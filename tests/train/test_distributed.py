"""Distributed training with 2 processes on CPU (gloo): DDP and FSDP2 equal one process with the whole batch, a
failing rank stops all ranks, and a run checkpointed on 2 processes resumes on 1.

The ranks are real processes started by `python -m torch.distributed.run --standalone` (a free port each time), not
forked from pytest; every launch has a timeout so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_llama
from lorakit.errors import LorakitError
from lorakit.train import TrainConfig, latest_checkpoint
from tiny_text import tiny_tokenizer

TESTS = Path(__file__).resolve().parents[1]
WORKER = TESTS / "dist_worker.py"
WORDS = "cat dog bird fish tree house car road city river".split()
TIMEOUT = 120


def write_config(path: Path, data_file: Path, mode: str, **over) -> Path:
    cfg = {"model": str(data_file.parent / "tiny-llama"), "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "output_dir": str(path.with_suffix("")), "tensorboard": False, "progress": False, "distributed": mode,
           "data": {"train_file": str(data_file), "eval_fraction": 0.25}, "save_every": 2, "eval_every": 2,
           "optim": {"lr": 1e-2, "batch_size": 4, "grad_accum": 2, "max_steps": 4, "warmup_steps": 1}, **over}
    path.write_text(yaml.safe_dump(cfg))
    return path


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)])}


def launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    prefix = [sys.executable]
    if nproc > 1:
        prefix += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
                   "--monitor-interval", "0.2"]
    return subprocess.run([*prefix, str(WORKER), *args], env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def adapter(run_dir: Path, sub: str = "adapter") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / sub / "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": f"the {a} and the {b}", "completion": f"{b} {a}"}
            for a, b in ((rng.choice(WORDS), rng.choice(WORDS)) for _ in range(25))]  # 19 for training: each epoch ends with 3 rows, split 2 + 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_llama()  # a model folder, so the ranks load it exactly as `lorakit train --model DIR` does
    model.save_pretrained(path.parent / "tiny-llama")
    tiny_tokenizer().save_pretrained(path.parent / "tiny-llama")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_file) -> Path:
    """One process, micro-batch 4 (the 2-process runs compute 2 rows per rank)."""
    cfg = write_config(tmp_path_factory.mktemp("ref") / "single.yaml", data_file, "none")
    proc = launch(1, str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cfg.with_suffix("")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path, data_file, reference, mode):
    cfg = write_config(tmp_path / f"{mode}.yaml", data_file, mode if mode == "fsdp" else "none")
    if mode == "ddp":  # through the command line: --nproc runs torchrun, and ddp is its default mode
        proc = subprocess.run([sys.executable, "-m", "lorakit", "train", "--config", str(cfg), "--nproc", "2"],
                              env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    else:
        proc = launch(2, str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = cfg.with_suffix("")
    assert f"{mode} over 2 processes" in proc.stdout
    diff = max_diff(adapter(run), adapter(reference))
    print(f"{mode}: 2 ranks x 2 rows vs 1 process x 4 rows, adapter max |diff| after 4 steps = {diff:.3e}")
    assert diff < 1e-6
    assert max_diff(adapter(run, "best"), adapter(reference, "best")) < 1e-6
    ours = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert len(ours) == len(ref) == 5  # rank 0 alone logged: one line per step plus the final evaluation
    for a, b in zip(ours, ref):
        assert a.get("loss", 0) == pytest.approx(b.get("loss", 0), abs=1e-5)
        assert a.get("eval_loss", 0) == pytest.approx(b.get("eval_loss", 0), abs=1e-5)
    # the checkpoint holds full (gathered) optimizer moments, identical to the single-process ones
    ours_opt = load_file(str(run / "checkpoints" / "step-000004" / "optimizer.safetensors"))
    ref_opt = load_file(str(reference / "checkpoints" / "step-000004" / "optimizer.safetensors"))
    assert max_diff(ours_opt, ref_opt) < 1e-6


def test_a_failing_rank_stops_all_ranks_and_the_run_resumes_on_one_process(tmp_path, data_file, reference):
    cfg = write_config(tmp_path / "fail.yaml", data_file, "fsdp")
    run = cfg.with_suffix("")
    proc = launch(2, str(cfg), "--fail-at", "1:3")  # rank 1 dies after step 3; the last checkpoint is step 2
    assert proc.returncode != 0
    assert "injected failure on rank 1 after step 3" in proc.stderr
    assert "ChildFailedError" in proc.stderr  # torchrun's summary names the failed rank
    assert not (run / "adapter").exists()
    path, state = latest_checkpoint(run)
    assert path.name == "step-000002"
    assert max_diff(state["trainable"], load_file(str(reference / "checkpoints" / "step-000002" /
                                                      "trainable.safetensors"))) < 1e-6
    # resume on a different number of processes (1): the same adapter as the uninterrupted run
    proc = launch(1, "--resume", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    assert max_diff(adapter(run), adapter(reference)) < 1e-6


def test_global_batch_rows_are_split_over_ranks(monkeypatch):
    from lorakit.train import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.local_rows({"input_ids": torch.arange(8).view(4, 2)})["input_ids"].tolist() == [[4, 5], [6, 7]]
    assert distributed.local_rows({"input_ids": torch.arange(6).view(3, 2)})["input_ids"].tolist() == [[4, 5]]
    with pytest.raises(LorakitError, match="1 rows cannot be split over 2 processes"):
        distributed.local_rows({"input_ids": torch.arange(2).view(1, 2)})


def test_distributed_key_is_validated():
    with pytest.raises(LorakitError, match="distributed must be one of"):
        TrainConfig.from_dict({"distributed": "deepspeed"})


def test_fsdp_refuses_a_quantized_base():
    from lorakit.train import distributed

    model = tiny_llama()
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(LorakitError, match="fsdp cannot shard this quantized base.*Use distributed: ddp"):
        distributed.wrap(model, lambda m, b: None, "fsdp")
    assert isinstance(distributed.wrap(tiny_llama(), lambda m, b: None, "fsdp"), distributed.LossModule)  # 1 process
