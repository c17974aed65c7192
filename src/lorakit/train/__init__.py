"""Fine-tuning: the config, the loop and its phases, checkpoints and exact resume, distributed training.

    from lorakit.train import TrainConfig, train

    result = train(TrainConfig.from_yaml("cfg.yaml", {"optim.lr": "2e-4"}))

Modules: config (TrainConfig, OptimConfig, overrides), loop (train() and its phases), checkpoint (checkpoint and RNG /
optimizer state I/O), optim (AdamW groups incl. LoRA+, schedule), metrics (validation), runlog (metrics.jsonl, loss
curve, summary), layout (a run folder's files), distributed (DDP / FSDP2 under torchrun), losses, plan (memory
estimates). The names below are imported on first use, so `import lorakit.train` loads no torch. (The loop's
checkpoint phase is `lorakit.train.loop.checkpoint`: here `checkpoint` is the module.)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_PUBLIC = {
    **dict.fromkeys(["TrainConfig", "OptimConfig", "apply_override"], "lorakit.train.config"),
    **dict.fromkeys(["TrainResult", "train", "prepare", "build_run", "build_model_run", "restore", "train_step",
                     "validate", "finish", "load_data"], "lorakit.train.loop"),
    **dict.fromkeys(["save_checkpoint", "read_checkpoint", "latest_checkpoint", "save_trained"],
                    "lorakit.train.checkpoint"),
    "checkpoints": "lorakit.train.layout",
    **dict.fromkeys(["evaluate", "exact_match"], "lorakit.train.metrics"),
    **dict.fromkeys(["summary_table", "plot_loss"], "lorakit.train.runlog"),
    "build_optimizer": "lorakit.train.optim",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:  # looked up each time (not cached here), so a test's monkeypatch of the module is seen
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lorakit.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from lorakit.train.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint, save_trained  # noqa: F401
    from lorakit.train.config import OptimConfig, TrainConfig, apply_override  # noqa: F401
    from lorakit.train.layout import checkpoints  # noqa: F401
    from lorakit.train import (  # noqa: F401
        TrainResult, build_model_run, build_run, finish, load_data, prepare, restore, train, train_step, validate)
    from lorakit.train.metrics import evaluate, exact_match  # noqa: F401
    from lorakit.train.optim import build_optimizer  # noqa: F401
    from lorakit.train.runlog import plot_loss, summary_table  # noqa: F401
