"""The Runs page's data: every run folder under the runs directory, its status, config, summary and metrics.

A run folder is what `lorakit train` writes (see lorakit.train.layout): config.yaml, metrics.jsonl, checkpoints/,
adapter/, summary.json. Its status is read from those files alone, so runs started from a terminal show up too:

- finished: summary.json and adapter/ exist and nothing was written after the summary;
- stopped: summary.json without adapter/ (Ctrl-C), or files untouched for `stale_s` seconds without a summary
  (killed); resumable when it has a checkpoint;
- running: started from this UI and its process is alive, or metrics/checkpoints newer than the summary and
  written within the last `stale_s` seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from lorakit.train.layout import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, checkpoint_step, checkpoints
from lorakit.train.runlog import dir_size, read_history
from lorakit.validation import ADAPTER_NAME

SERIES = ("loss", "eval_loss", "eval_ppl", "accuracy", "exact_match", "lr", "grad_norm", "tokens_per_s")
"""Numeric keys of metrics.jsonl records the page plots (others are ignored)."""


def run_folders(runs_dir: Path) -> list[Path]:
    """Run folders directly inside `runs_dir` (holding config.yaml, or a UI launch still starting), by name."""
    if not runs_dir.is_dir():
        return []
    return sorted(p for p in runs_dir.iterdir()
                  if p.is_dir() and ADAPTER_NAME.fullmatch(p.name)
                  and ((p / CONFIG_FILE).is_file() or (p / "launch.yaml").is_file()))


def run_folder(runs_dir: Path, name: str) -> Path | None:
    """The folder of run `name` (a plain folder name inside runs_dir), or None."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        return None
    folder = (runs_dir / name).resolve()
    return folder if folder.parent == runs_dir.resolve() and folder in [p.resolve() for p in run_folders(runs_dir)] \
        else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def run_status(folder: Path, process_alive: bool = False, stale_s: float = 120.0, now: float | None = None
               ) -> dict[str, Any]:
    """{"status": running | finished | stopped | starting, "why": ..., "resume": command or None}."""
    now = time.time() if now is None else now
    ckpts = checkpoints(folder)
    last_write = max([_mtime(folder / METRICS_FILE), _mtime(folder / CONFIG_FILE)]
                     + [_mtime(c) for c in ckpts[-1:]])
    summary_at = _mtime(folder / SUMMARY_FILE)
    resume = f"lorakit train --resume {folder}" if ckpts else None
    if process_alive:
        status, why = ("running", "its process (started from this page) is alive") if (folder / CONFIG_FILE).is_file() \
            else ("starting", "its process (started from this page) is loading the model and data")
        return {"status": status, "why": why, "resume": None}
    if summary_at and summary_at >= last_write:
        if (folder / "adapter").is_dir():
            return {"status": "finished", "why": "summary.json and adapter/ are written", "resume": None}
        return {"status": "stopped", "why": "interrupted (Ctrl-C): summary.json without a final adapter/",
                "resume": resume}
    if last_write and now - last_write < stale_s:
        return {"status": "running", "why": f"metrics written {now - last_write:.0f} s ago", "resume": None}
    if not (folder / CONFIG_FILE).is_file():
        return {"status": "stopped", "why": "launched, but training never started (see train.log)", "resume": None}
    why = f"no file written for {now - last_write:.0f} s and no summary.json (killed or crashed)"
    if not ckpts:
        why += "; no checkpoint to resume from: start it again"
    return {"status": "stopped", "why": why, "resume": resume}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def run_overview(folder: Path, process_alive: bool = False, stale_s: float = 120.0) -> dict[str, Any]:
    """What the runs list shows for one run."""
    summary = _read_json(folder / SUMMARY_FILE) or {}
    history = read_history(folder / METRICS_FILE)
    config = _read_yaml(folder / CONFIG_FILE) or {}
    total = (config.get("optim") or {}).get("max_steps")
    ckpts = checkpoints(folder)
    last = history[-1] if history else {}
    return {
        "name": folder.name,
        "path": str(folder),
        **run_status(folder, process_alive, stale_s),
        "step": last.get("step", 0),
        "max_steps": total,
        "last_loss": next((r["loss"] for r in reversed(history) if "loss" in r), None),
        "checkpoints": [checkpoint_step(c) for c in ckpts],
        "model": config.get("model"),
        "adapter": str(folder / "adapter") if (folder / "adapter").is_dir() else None,
        "updated": max(_mtime(folder / METRICS_FILE), _mtime(folder / SUMMARY_FILE), _mtime(folder / CONFIG_FILE)),
        "trainable_params": summary.get("trainable params"),
        "trainable_pct": summary.get("trainable %"),
        "adapter_bytes": dir_size(folder / "adapter") if (folder / "adapter").is_dir() else None,
        "peak_memory_mb": summary.get("peak memory (MB)"),
        "wall_time_s": summary.get("wall time (s)"),
    }


def run_detail(folder: Path, process_alive: bool = False, stale_s: float = 120.0) -> dict[str, Any]:
    """The run page: the overview, the resolved config (as written), the summary and the launch log's tail."""
    log = folder / "train.log"
    tail = None
    if log.is_file():
        with open(log, "rb") as fh:
            fh.seek(max(0, log.stat().st_size - 4000))
            tail = fh.read().decode("utf-8", "replace")
    return {**run_overview(folder, process_alive, stale_s),
            "config_yaml": (folder / CONFIG_FILE).read_text(encoding="utf-8") if (folder / CONFIG_FILE).is_file()
            else None,
            "summary": _read_json(folder / SUMMARY_FILE), "log_tail": tail}


def run_metrics(folder: Path) -> dict[str, Any]:
    """The plotted series: {"step": [...], "wall": [...], key: [value or None, ...]} from metrics.jsonl.

    Wall time is seconds since the run started: a record's own "time" (Unix seconds) where it has one; otherwise it
    is estimated, spreading the records evenly between config.yaml's and metrics.jsonl's modification times
    ("wall_estimated": true), which is exact for a steady run that was never resumed."""
    history = [r for r in read_history(folder / METRICS_FILE) if isinstance(r, dict) and isinstance(r.get("step"), int)]
    start, end = _mtime(folder / CONFIG_FILE), _mtime(folder / METRICS_FILE)
    estimated = not all(isinstance(r.get("time"), (int, float)) for r in history)
    if estimated:
        n = len(history)
        wall = [round((end - start) * (i + 1) / n, 3) if start and end >= start else None for i in range(n)]
    else:
        t0 = min(start or history[0]["time"], history[0]["time"]) if history else 0
        wall = [round(r["time"] - t0, 3) for r in history]
    out: dict[str, Any] = {"step": [r["step"] for r in history], "wall": wall, "wall_estimated": estimated}
    for key in SERIES:
        values = [r.get(key) if isinstance(r.get(key), (int, float)) else None for r in history]
        if any(v is not None for v in values):
            out[key] = values
    return out
