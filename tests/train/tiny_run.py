"""What the training tests share: a tiny instruction data file, a config for short runs, a tiny Llama with LoRA."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

WORDS = "cat dog bird fish tree house car road city river".split()


def write_data(path: Path, rows: int = 24) -> Path:
    """`rows` seeded records "the A and the B" -> "B A" as JSONL."""
    rng = random.Random(0)
    lines = []
    for _ in range(rows):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        lines.append(json.dumps({"prompt": f"the {a} and the {b}", "completion": f"{b} {a}"}) + "\n")
    path.write_text("".join(lines))
    return path


def config(out, data_file, **over):
    """A TrainConfig for 8 short steps (batch 4, grad_accum 2, 3 epochs of 18 examples); `section__key=value` or
    `key=value` overrides."""
    from lorakit.train import TrainConfig

    base = {"output_dir": str(out), "tensorboard": False, "progress": False,
            "data": {"train_file": str(data_file), "eval_fraction": 0.25},
            "optim": {"lr": 1e-2, "batch_size": 4, "grad_accum": 2, "epochs": 3, "warmup_steps": 2},
            "save_every": 3, "eval_every": 4}
    for key, value in over.items():
        section, _, name = key.partition("__")
        (base.setdefault(section, {}).__setitem__(name, value) if name else base.__setitem__(key, value))
    return TrainConfig.from_dict(base)


def lora_model(dropout: float = 0.2, **lora):
    """The tiny Llama (seed 0) with a LoRA adapter r=4, alpha=8 on its default targets (q_proj, v_proj)."""
    import lorakit as lk
    from conftest import tiny_llama

    model = tiny_llama()
    lk.add_lora(model, lk.LoraConfig(**{"r": 4, "alpha": 8, "dropout": dropout, **lora}))
    return model


# fixtures: import them into a test module to use them there
from conftest import single_threaded  # noqa: E402

one_thread = pytest.fixture(autouse=True, name="one_thread")(single_threaded)


@pytest.fixture(scope="module")
def tok():
    from tiny_text import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data") / "train.jsonl")
