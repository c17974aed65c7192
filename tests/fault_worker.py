"""A tiny training run that can be killed with SIGKILL and resumed, for tests/test_faults.py and benchmarks/faults.py.

    python tests/fault_worker.py RUN_DIR DATA_FILE                      # start, or resume if RUN_DIR has checkpoints
    python tests/fault_worker.py RUN_DIR DATA_FILE --kill-at forward:5  # SIGKILL itself inside the 5th forward pass
    python tests/fault_worker.py RUN_DIR DATA_FILE --kill-at write:4    # ... half-way through the 4th safetensors write

It prints `ready` once the model is built and `step N` after every optimizer step, so an outside killer can time its
SIGKILL against training rather than imports. `kill_until_done` drives it: random SIGKILLs from outside, a resume after
each, until a run completes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = "cat dog bird fish tree house car road city river".split()


def write_data(path: Path) -> Path:
    rng = random.Random(0)
    rows = [{"prompt": f"the {rng.choice(WORDS)} and the {rng.choice(WORDS)}", "completion": "yes"} for _ in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(run_dir: Path, data_file: Path, max_steps: int):
    from lorakit.train import TrainConfig

    return TrainConfig.from_dict({
        "output_dir": str(run_dir), "tensorboard": False, "progress": False, "save_every": 1, "keep_last": 2,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the resumed RNG state matters
        "data": {"train_file": str(data_file)},
        "optim": {"lr": 1e-2, "batch_size": 4, "grad_accum": 2, "max_steps": max_steps, "warmup_steps": 2}})


def run(run_dir: Path, data_file: Path, max_steps: int, kill_at: str | None = None):
    """Train (or resume) the tiny Llama; returns the TrainResult."""
    import torch

    sys.path.insert(0, str(HERE))
    import lorakit as lk
    from conftest import tiny_llama
    from lorakit.train import checkpoints, train
    from tiny_text import tiny_tokenizer

    torch.set_num_threads(1)
    model = tiny_llama()
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, dropout=0.1))
    if kill_at:
        _arm(model, *kill_at.split(":"))
    print("ready", flush=True)

    def on_step(step, record):
        print(f"step {step}", flush=True)

    if checkpoints(run_dir):
        return train(None, model, tiny_tokenizer(), resume=run_dir, on_step=on_step)
    return train(config(run_dir, data_file, max_steps), model, tiny_tokenizer(), on_step=on_step)


def _arm(model, kind: str, n: str) -> None:
    """SIGKILL this process in the n-th training forward pass (mid-step; forwards without gradients, such as the
    start-up packing check, do not count), or half-way through writing the n-th safetensors file (4 per checkpoint:
    adapter, trainable, optimizer, rng)."""
    n, calls = int(n), [0]

    def count() -> bool:
        calls[0] += 1
        return calls[0] == n

    if kind == "forward":
        import torch

        def hook(module, args):
            if torch.is_grad_enabled() and count():
                os.kill(os.getpid(), signal.SIGKILL)

        model.get_submodule("model.layers.0").register_forward_pre_hook(hook)  # once per micro-batch forward
    elif kind == "write":
        import safetensors.torch as st

        real = st.save_file

        def torn_save(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            if count():  # leave a torn file behind, as a crash in the middle of write() would
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)

        st.save_file = torn_save  # lorakit imports save_file at call time, so this is what it calls
    else:
        raise SystemExit(f"--kill-at KIND:N with KIND forward or write, got {kind!r}")


def launch(run_dir: Path, data_file: Path, max_steps: int, kill_at: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__)), str(run_dir), str(data_file), "--max-steps", str(max_steps)]
    if kill_at:
        cmd += ["--kill-at", kill_at]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.wait()
        raise RuntimeError(f"worker failed to start (rc {proc.returncode}): {line}{proc.stderr.read()[-3000:]}")


def kill_until_done(run_dir: Path, data_file: Path, max_steps: int, kills: int, window_s: float, seed: int = 0,
                    timeout_s: float = 120.0) -> dict:
    """SIGKILL the worker up to `kills` times, resuming after each, then let it finish. A third of the kills land at
    a uniform moment within `window_s` s of `ready` (start-up, resume, first step); the others at a uniform moment
    within `window_s / 10` s after the first `step` line (inside a step or a checkpoint write). Returns counts: kills
    injected, kills that landed while the process ran, runs (a run that completes ends the experiment early)."""
    rng = random.Random(seed)
    injected = landed = 0
    while True:
        proc = launch(run_dir, data_file, max_steps)
        wait_ready(proc)
        if injected < kills:
            if rng.random() < 1 / 3:
                time.sleep(rng.uniform(0, window_s))
            else:
                proc.stdout.readline()  # the first `step` line (or EOF if the run was already complete)
                time.sleep(rng.uniform(0, window_s / 10))
            injected += 1
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                landed += 1
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RuntimeError(f"worker hung for {timeout_s}s in {run_dir}") from None
        if proc.returncode not in (0, -signal.SIGKILL):
            raise RuntimeError(f"worker failed after {injected} kills (rc {proc.returncode}):\n{err[-3000:]}")
        if proc.returncode == 0:
            return {"kills_injected": injected, "kills_landed": landed, "runs": injected + 1}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("data_file", type=Path)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--kill-at")
    args = parser.parse_args()
    run(args.run_dir, args.data_file, args.max_steps, args.kill_at)
