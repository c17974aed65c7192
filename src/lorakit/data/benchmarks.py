"""Readers for the staged benchmark files (see `../shared/data/README.md`): E2E NLG and five GLUE tasks.

Data is read in place from the data folder (default `../shared/data`, relative to the working directory); nothing is
copied. E2E dev rows group all references of one meaning representation (MR); E2E train rows are single pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LorakitError

DEFAULT_DATA_DIR = Path("../shared/data")
E2E_SPLITS = ("train", "dev")
GLUE_SPLITS = ("train", "validation")


@dataclass(frozen=True)
class GlueTask:
    text_fields: tuple[str, ...]
    num_labels: int  # 1 means regression (STS-B)
    metrics: tuple[str, ...]  # the paper's metric first


GLUE_TASKS = {
    "sst2": GlueTask(("sentence",), 2, ("accuracy",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("accuracy", "f1")),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
    "cola": GlueTask(("sentence",), 2, ("matthews", "accuracy")),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, ("pearson", "spearman")),
}
TASKS = ("e2e",) + tuple(GLUE_TASKS)


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    if not path.is_file():
        raise LorakitError(f"Benchmark file {path} not found. Point --data-dir at the shared data folder "
                           f"(default {DEFAULT_DATA_DIR}, which must contain e2e/ and glue/).")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def load_e2e(split: str = "dev", data_dir: str | Path = DEFAULT_DATA_DIR, limit: int | None = None) -> list[dict]:
    """E2E rows as {"mr": str, "references": [str, ...]} (train rows have one reference each), in file order."""
    if split not in E2E_SPLITS:
        raise LorakitError(f"E2E split must be one of {E2E_SPLITS}, got {split!r} (the test set is held out).")
    rows = _read_jsonl(Path(data_dir) / "e2e" / f"{split}.jsonl", limit)
    if split == "train":
        return [{"mr": r["meaning_representation"], "references": [r["target"]]} for r in rows]
    return [{"mr": r["meaning_representation"], "references": list(r["references"])} for r in rows]


def load_glue(task: str, split: str = "validation", data_dir: str | Path = DEFAULT_DATA_DIR,
              limit: int | None = None) -> list[dict]:
    """GLUE rows as {"idx", "texts": (str, ...), "label": int | float}, in file order."""
    if task not in GLUE_TASKS:
        raise LorakitError(f"GLUE task must be one of {sorted(GLUE_TASKS)}, got {task!r}.")
    if split not in GLUE_SPLITS:
        raise LorakitError(f"GLUE split must be one of {GLUE_SPLITS}, got {split!r} (the other dev half is held out).")
    spec = GLUE_TASKS[task]
    rows = _read_jsonl(Path(data_dir) / "glue" / task / f"{split}.jsonl", limit)
    return [{"idx": r["idx"], "texts": tuple(r[f] for f in spec.text_fields), "label": r["label"]} for r in rows]
