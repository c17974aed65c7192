"""The happy path prints only lorakit's own output: a CLI training run and a generation, each in a fresh process (as a
user runs them, with Python's default warning filters), show no warnings, deprecations, tracebacks or failed loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_text import save_tiny_lm

SRC = Path(__file__).resolve().parents[1] / "src"
NOISE = ("Warning", "warning:", "Traceback", "Failed to load", "deprecated", "Loading weights")


def lorakit(*args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny model: one thread is fastest on a shared machine
    done = subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, done.stdout
    return done.stdout


def noise(output: str) -> list[str]:
    return [line for line in output.splitlines() if any(word in line for word in NOISE)]


def test_train_and_generate_print_no_warnings(tmp_path):
    model_dir = save_tiny_lm(tmp_path / "tiny")
    data = tmp_path / "train.jsonl"
    words = "cat dog bird fish tree house car road".split()
    data.write_text("".join(json.dumps({"prompt": f"the {a} and the {b}", "completion": f"{b} {a}"}) + "\n"
                            for a in words for b in words[:2]))
    out = lorakit("train", "--model", str(model_dir), "--train-file", str(data), "--output-dir", str(tmp_path / "run"),
                  "--max-steps", "2", "--batch-size", "4", "--r", "2", cwd=tmp_path)
    assert "adapter:" in out
    assert noise(out) == [], out

    out = lorakit("generate", "the cat and the dog", "--model", str(model_dir), "--adapter", str(tmp_path / "run" /
                  "adapter"), "--max-new-tokens", "4", cwd=tmp_path)
    assert out.strip()
    assert noise(out) == [], out
