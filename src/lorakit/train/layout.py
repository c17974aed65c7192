"""The files of a run folder: config.yaml (resolved), checkpoints/step-N/, best/, adapter/, metrics.jsonl, tb/,
loss_curve.png and summary.json. Only paths here: this module imports nothing of lorakit, so every part of training
(including the torchrun launcher) can find a run's checkpoints without importing the loop.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder's name says (step-000012 -> 12)."""
    return int(path.name.split("-")[1])


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-")), key=checkpoint_step)
