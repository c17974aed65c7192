"""What a run reports: metrics.jsonl (one object a line) and TensorBoard, the loss curve, the summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.fsutil import atomic_write_text
from lorakit.train.layout import METRICS_FILE


class MetricsLog:
    """metrics.jsonl (appended, one object a line) and TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        """False on ranks other than 0: they log nothing."""
        self.writer = None
        if tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["step"])

    def history(self) -> list[dict[str, Any]]:
        return read_history(self.path)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint, which the resumed run will log again."""
        kept = [r for r in self.history() if r["step"] <= step]
        if self.enabled:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_history(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a line torn by a crash mid-write is skipped: the resumed run logs that
    step again)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training (and validation) loss over optimizer steps as a PNG; None without training losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def summary_table(summary: dict[str, Any], title: str = "training summary") -> str:
    """A two-column table as text (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k, v in summary.items():
        table.add_row(k, f"{v:,.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
    console = Console(width=100, record=True, force_terminal=False)
    with console.capture() as cap:
        console.print(table)
    return cap.get()


def dir_size(path: Path | None) -> int:
    """Bytes of all files below `path` (0 for None or a missing folder)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path and path.exists() else 0
