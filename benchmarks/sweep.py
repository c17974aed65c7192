"""Config-driven sweeps of the paper's comparisons: one YAML file per experiment (benchmarks/experiments/<name>.yaml)
names the model, the tasks, the methods with a learning-rate grid each, the budget, the seeds and the evaluation.

    nice -n 19 .venv/bin/python benchmarks/sweep.py run benchmarks/experiments/glue.yaml     # runs what is missing
    .venv/bin/python benchmarks/sweep.py status benchmarks/experiments/glue.yaml             # done / pending runs
    .venv/bin/python benchmarks/sweep.py report benchmarks/experiments/glue.yaml             # results/<name>.{md,json}

How a sweep runs:
- Stage "grid": every method × every learning rate of its grid, at each of `select_seeds`. Runs go task by task and
  method by method (the config's order): a method's grid, then its seed runs, then the next method.
- The learning rate of a method is the one with the best mean *select* metric over those seeds (`select_metric`, by
  default the task's first metric: BLEU for data-to-text, accuracy / Pearson for GLUE). The select split is carved
  from training data (GLUE: rows of the train file kept out of training; E2E: dev MRs disjoint from the test MRs;
  WebNLG/DART: entries of the train half), so the test split is never looked at to choose anything.
- Stage "seeds": each method again at its chosen learning rate with the remaining `seeds`.
- Every run trains through lorakit's own step (_common.train: lorakit.train.build_model_run + train_step) on
  batches built here, and is scored on the select and the test split.

Resuming: each finished run appends one JSON line to benchmarks/results/<name>.runs.jsonl (flushed and fsynced), and
`run` skips the runs already there, so a killed sweep continues with the run it was in. A row carries a hash of every
setting that shaped it (model, task, budget, split, eval, the method's settings, lr, seed); after a change of
settings, the old rows are kept in the file but no longer count. Two workers may share one sweep: a run is claimed by
creating benchmarks/runs/<name>/claims/<run> (holding the worker's pid) exclusively, and a claim whose process is
gone is taken over. Adapters (LoRA) and every generated output go to benchmarks/runs/<name>/<run>/ (git-ignored).

Config keys: name, model, kind (glue | nlg), tasks, methods ({method: {lr: [...], lora: {...LoraConfig fields},
bottleneck: n, type: lora | full | bitfit | adapter (default: the method's name)}}), budget (steps or epochs, batch_size, max_length, warmup, precision: fp32 | bf16 autocast with fp32 weights), split (data_seed, select, test, unseen,
train_examples), eval (max_new_tokens, decoding, num_beams, batch_size, metrics), seeds, select_seeds, select_metric,
reuse ({method: "<other experiment>.yaml:<its method>"}: that method's runs are taken from the other sweep's runs file
instead of being run again; allowed only where every setting that shapes a run is the same, checked by hash; the
reused rows keep `reused_from`), compare_to (the method every other is tested against in the report: the difference
of the seed means and Welch's t-test p per test metric; default the first method).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import _common as C

KEYS = {"name", "model", "kind", "tasks", "methods", "budget", "split", "eval", "seeds", "select_seeds",
        "select_metric", "notes", "reuse", "compare_to"}
REQUIRED = {"name", "model", "kind", "tasks", "methods", "budget", "split", "seeds"}
METHODS = ("lora", "full", "bitfit", "adapter")
BUDGET_KEYS = {"steps", "epochs", "batch_size", "max_length", "warmup", "precision"}
PRECISIONS = ("fp32", "bf16")
LOWER_IS_BETTER = {"ter"}
NLG_METRICS = ("bleu", "meteor", "ter", "rouge_l", "nist", "cider")


# ---------------------------------------------------------------------------------------------------- config
def load_config(path: str | Path) -> dict[str, Any]:
    """The experiment's YAML as a dict; unknown or missing keys and unknown methods are errors."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    problems = []
    if not isinstance(cfg, dict):
        raise SystemExit(f"{path}: expected a mapping of settings")
    if set(cfg) - KEYS:
        problems.append(f"unknown keys {sorted(set(cfg) - KEYS)} (allowed: {sorted(KEYS)})")
    if REQUIRED - set(cfg):
        problems.append(f"missing keys {sorted(REQUIRED - set(cfg))}")
    if cfg.get("kind") not in ("glue", "nlg"):
        problems.append(f"kind must be glue or nlg, got {cfg.get('kind')!r}")
    for method, spec in (cfg.get("methods") or {}).items():
        if method_type(method, spec) not in METHODS:
            problems.append(f"method {method!r}: type {method_type(method, spec)!r} unknown (allowed: {list(METHODS)}; "
                            "a method named otherwise gives its type, e.g. lora_r1: {type: lora, ...})")
        if not isinstance(spec, dict) or not spec.get("lr"):
            problems.append(f"method {method!r} needs an lr grid (lr: [...])")
    budget = cfg.get("budget") or {}
    if ("steps" in budget) == ("epochs" in budget):
        problems.append("budget needs exactly one of steps or epochs")
    if set(budget) - BUDGET_KEYS:
        problems.append(f"unknown budget keys {sorted(set(budget) - BUDGET_KEYS)} (allowed: {sorted(BUDGET_KEYS)})")
    if budget.get("precision", "fp32") not in PRECISIONS:
        problems.append(f"budget precision must be one of {list(PRECISIONS)}, got {budget['precision']!r}")
    if problems:
        raise SystemExit(f"{path}: " + "; ".join(problems))
    cfg.setdefault("select_seeds", cfg["seeds"][:1])
    cfg.setdefault("eval", {})
    if not set(cfg["select_seeds"]) <= set(cfg["seeds"]):
        raise SystemExit(f"{path}: select_seeds {cfg['select_seeds']} must be among seeds {cfg['seeds']}")
    return cfg


def method_type(name: str, spec: Any) -> str:
    """What a method entry trains: its `type`, or its name (lora, full, bitfit, adapter) when it has none."""
    return spec.get("type", name) if isinstance(spec, dict) else name


def select_metric(cfg: dict[str, Any], task: str) -> str:
    if cfg.get("select_metric"):
        return cfg["select_metric"]
    if cfg["kind"] == "glue":
        from lorakit.data.benchmarks import GLUE_TASKS

        return GLUE_TASKS[task].metrics[0]
    return "bleu"


def _run_settings(cfg: dict[str, Any], task: str, method: str, drop: tuple[str, ...]) -> dict[str, Any]:
    """The settings that shape a run of `method` on `task`, its method entry without the keys in `drop`."""
    spec = {k: v for k, v in cfg["methods"][method].items() if k not in drop}
    return {"model": cfg["model"], "kind": cfg["kind"], "task": task, "spec": spec, "budget": cfg["budget"],
            "split": cfg["split"], "eval": cfg.get("eval", {})}


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def settings_hash(cfg: dict[str, Any], task: str, method: str) -> str:
    """A hash of every setting that shapes a run of `method` on `task`, except its lr and seed (in the run id)."""
    return _digest({**_run_settings(cfg, task, method, ("lr",)), "method": method})


def shape_hash(cfg: dict[str, Any], task: str, method: str) -> str:
    """A hash of what a run of `method` on `task` trains and how it is scored, whatever the method is called."""
    return _digest({**_run_settings(cfg, task, method, ("lr", "type")),
                    "type": method_type(method, cfg["methods"][method])})


def reused_rows(cfg: dict[str, Any], config_dir: Path, results: Path) -> list[dict[str, Any]]:
    """The rows `reuse` takes from other sweeps, renamed to this config's method and carrying its settings hash; an
    error when the other sweep's method is not the same run (another budget, split, rank...)."""
    out = []
    for method, source in (cfg.get("reuse") or {}).items():
        if method not in cfg["methods"] or not isinstance(source, str) or ":" not in source:
            raise SystemExit(f"reuse: {method!r}: {source!r} must map a method of this config to "
                             f"'<experiment>.yaml:<method>' (methods here: {list(cfg['methods'])})")
        other_path, other_method = source.rsplit(":", 1)
        other = load_config(config_dir / other_path)
        if other_method not in other["methods"]:
            raise SystemExit(f"reuse: {source!r}: {other_path} has no method {other_method!r} "
                             f"(it has {list(other['methods'])})")
        rows = current_rows(other, read_rows(results / f"{other['name']}.runs.jsonl"))
        for task in cfg["tasks"]:
            if task not in other["tasks"]:
                continue
            if shape_hash(other, task, other_method) != shape_hash(cfg, task, method):
                raise SystemExit(f"reuse: {method!r} <- {source!r} on {task}: the runs differ in a setting (model, "
                                 "budget, split, eval or the method's settings); make them equal or drop the reuse")
            for row in rows:
                if row["task"] == task and row["method"] == other_method:
                    spec = RunSpec(task, method, float(row["lr"]), int(row["seed"]), row.get("stage", "grid"))
                    out.append({**row, "run_id": spec.run_id, "method": method, "experiment": cfg["name"],
                                "settings": settings_hash(cfg, task, method),
                                "reused_from": f"{other['name']}/{row['run_id']}"})
    return out


# ---------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class RunSpec:
    task: str
    method: str
    lr: float
    seed: int
    stage: str  # "grid" (choosing the lr) or "seeds" (the chosen lr, more seeds)

    @property
    def run_id(self) -> str:
        return f"{self.task}/{self.method}/lr={self.lr:g}/seed={self.seed}"


def _score(row: dict[str, Any], metric: str) -> float:
    """The row's select metric, oriented so that higher is better; NaN (e.g. a constant regressor's Pearson) is worst."""
    value = (row.get("select") or {}).get(metric)
    if value is None or not math.isfinite(value):
        return -math.inf
    return -value if metric in LOWER_IS_BETTER else value


def choose_lr(cfg: dict[str, Any], rows: list[dict[str, Any]], task: str, method: str
              ) -> tuple[float | None, dict[float, float]]:
    """(the lr with the best mean select metric over select_seeds, {lr: that mean}); None until the whole grid is
    measured. Ties go to the lr listed first. Only the select split is read, never the test split."""
    metric = select_metric(cfg, task)
    grid = [float(x) for x in cfg["methods"][method]["lr"]]
    by_lr: dict[float, list[float]] = {lr: [] for lr in grid}
    for row in rows:
        if row["task"] == task and row["method"] == method and row["seed"] in cfg["select_seeds"] \
                and float(row["lr"]) in by_lr:
            by_lr[float(row["lr"])].append(_score(row, metric))
    means = {lr: sum(v) / len(v) for lr, v in by_lr.items() if v}
    if any(len(by_lr[lr]) < len(cfg["select_seeds"]) for lr in grid):
        return None, means
    best = max(grid, key=lambda lr: (means[lr], -grid.index(lr)))
    return best, means


def plan(cfg: dict[str, Any], rows: list[dict[str, Any]]) -> list[RunSpec]:
    """Every run known now, in order: per task and method (in the config's order), its lr grid, then, once the grid
    is complete and its lr chosen, its seed runs. So a sweep cut short has whole methods (all seeds) rather than many
    methods at one seed."""
    out = []
    for task in cfg["tasks"]:
        for method in cfg["methods"]:
            out += [RunSpec(task, method, float(lr), seed, "grid")
                    for seed in cfg["select_seeds"] for lr in cfg["methods"][method]["lr"]]
            lr, _ = choose_lr(cfg, rows, task, method)
            if lr is not None:
                out += [RunSpec(task, method, lr, seed, "seeds") for seed in cfg["seeds"]
                        if seed not in cfg["select_seeds"]]
    return out


# ---------------------------------------------------------------------------------------------------- rows file
def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a runs file; a last line cut short by a kill is ignored (that run is simply run again)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    """One line, flushed to disk; after a line cut short by a kill, on a line of its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as fh:
        cut_short = fh.tell() > 0 and (fh.seek(-1, os.SEEK_END), fh.read(1))[1] != b"\n"
        fh.write((("\n" if cut_short else "") + json.dumps(row) + "\n").encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def current_rows(cfg: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows measured with this config's settings (same hash), the last one per run id."""
    keep: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("task") in cfg["tasks"] and row.get("method") in cfg["methods"] \
                and row.get("settings") == settings_hash(cfg, row["task"], row["method"]):
            keep[row["run_id"]] = row
    return list(keep.values())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(claims: Path, spec: RunSpec) -> Path | None:
    """Claim a run for this process (an exclusively created file holding our pid); None if a live process has it."""
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / spec.run_id.replace("/", "__")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and (pid == os.getpid() or _alive(pid)):
                return None
            path.unlink(missing_ok=True)  # its worker is gone: take the run over
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return path
    return None


def sweep(cfg: dict[str, Any], rows_file: Path, claims: Path, execute: Callable[[dict, RunSpec], dict],
          max_runs: int | None = None, wait_s: float = 30.0, say: Callable[[str], None] = print,
          reused: list[dict[str, Any]] = ()) -> int:
    """Run every missing run of the plan (re-planned after each run, so seed runs start once their grid is done),
    counting the `reused` rows (reused_rows) as run; returns the number of runs this call finished."""
    done = 0
    while max_runs is None or done < max_runs:
        rows = current_rows(cfg, read_rows(rows_file) + list(reused))
        finished = {r["run_id"] for r in rows}
        todo = [s for s in plan(cfg, rows) if s.run_id not in finished]
        spec, held = None, None
        for candidate in todo:
            held = claim(claims, candidate)
            if held is not None:
                spec = candidate
                break
        if spec is None:
            if todo:  # everything left is being run by another worker; its results may unlock seed runs
                say(f"{len(todo)} run(s) in other workers' hands; waiting {wait_s:.0f} s")
                time.sleep(wait_s)
                continue
            break
        try:
            if spec.run_id in {r["run_id"] for r in current_rows(cfg, read_rows(rows_file) + list(reused))}:
                continue  # finished by another worker between our read and our claim
            say(f"run {spec.run_id} ({spec.stage}); {len(todo) - 1} more known")
            t0 = time.time()
            measured = execute(cfg, spec)
            row = {"run_id": spec.run_id, "experiment": cfg["name"], "task": spec.task, "method": spec.method,
                   "lr": spec.lr, "seed": spec.seed, "stage": spec.stage,
                   "settings": settings_hash(cfg, spec.task, spec.method), **measured,
                   "wall_seconds": round(time.time() - t0, 1),
                   "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
            append_row(rows_file, row)
            done += 1
        finally:
            held.unlink(missing_ok=True)
    return done


# ---------------------------------------------------------------------------------------------------- one run
def _steps(budget: dict[str, Any], n_train: int) -> int:
    if "steps" in budget:
        return int(budget["steps"])
    return max(1, int(float(budget["epochs"]) * n_train) // int(budget["batch_size"]))


def glue_data(task: str, data_dir: str, split: dict[str, Any]) -> dict[str, list[dict]]:
    """GLUE: `select` rows of the train file (seeded) kept out of training for choosing the lr; the training pool is
    the rest (capped at train_examples, drawn with data_seed); the test split is the visible validation half."""
    rows = C.load_glue(task, "train", data_dir)
    order = list(range(len(rows)))
    random.Random(int(split.get("data_seed", 0))).shuffle(order)
    n = int(split["select"])
    select, pool = [rows[i] for i in order[:n]], [rows[i] for i in order[n:]]
    cap = split.get("train_examples")
    if cap is not None and cap < len(pool):
        pool = pool[:int(cap)]  # already in a seeded random order
    return {"train": pool, "select": select, "test": C.load_glue(task, "validation", data_dir)}


def execute(cfg: dict[str, Any], spec: RunSpec, data_dir: str, runs_dir: Path) -> dict[str, Any]:
    """Load the model fresh, make `spec.method`'s parameters trainable, train, score select and test."""
    import torch
    from lorakit import LoraConfig, load_model, save_adapter

    budget, method_cfg = cfg["budget"], cfg["methods"][spec.method]
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    kind = method_type(spec.method, method_cfg)
    lora = LoraConfig(**method_cfg["lora"]) if kind == "lora" else None
    out_dir = runs_dir / cfg["name"] / spec.run_id.replace("/", "__")
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg["kind"] == "glue":
        from lorakit.data.benchmarks import GLUE_TASKS

        data = glue_data(spec.task, data_dir, cfg["split"])
        model, tokenizer = load_model(cfg["model"], task="seq-cls", num_labels=GLUE_TASKS[spec.task].num_labels)
        torch.manual_seed(spec.seed)  # the new head's init is part of the seed
    else:
        import data2text

        data = data2text.load_task(spec.task, data_dir, cfg["split"])
        model, tokenizer = load_model(cfg["model"])
    C.prepare(model, kind, lora, adapter_bottleneck=int(method_cfg.get("bottleneck", 8)))
    trainable, total = C.trainable_count(model)
    steps = _steps(budget, len(data["train"]))
    max_length = int(budget.get("max_length", 128 if cfg["kind"] == "glue" else 160))
    if cfg["kind"] == "glue":
        batches = C.labelled_batches(tokenizer, data["train"], int(budget["batch_size"]), spec.seed, max_length)
    else:
        batches = C.pair_batches(tokenizer, data["train"], int(budget["batch_size"]), spec.seed, max_length)
    row: dict[str, Any] = {"trainable_params": trainable, "total_params": total,
                           "trainable_pct": C.pct(trainable, total), "train_pairs": len(data["train"]),
                           "epochs": round(steps * int(budget["batch_size"]) / len(data["train"]), 3)}
    bf16 = budget.get("precision", "fp32") == "bf16"
    row.update(C.train(model, batches, steps, spec.lr, bf16, warmup=int(budget.get("warmup", 10)),
                       tag=f"{cfg['name']}/{spec.run_id}"))
    if kind == "lora":
        save_adapter(model, out_dir / "adapter")
    t0 = time.time()
    evaluate = _evaluate_glue if cfg["kind"] == "glue" else _evaluate_nlg
    row.update(evaluate(cfg, spec, model, tokenizer, data, out_dir))
    row["eval_seconds"] = round(time.time() - t0, 1)
    row["environment"] = C.environment()
    return row


def _evaluate_glue(cfg, spec, model, tokenizer, data, out_dir) -> dict[str, Any]:
    from lorakit.eval.evaluate import classification_metrics, predict_classes

    out = {}
    for part in ("select", "test"):
        rows = data[part]
        preds = predict_classes(model, tokenizer, [r["texts"] for r in rows],
                                max_length=int(cfg["budget"].get("max_length", 128)))
        out[part] = classification_metrics(spec.task, preds, [r["label"] for r in rows])
        out[f"{part}_rows"] = len(rows)
    return out


def _evaluate_nlg(cfg, spec, model, tokenizer, data, out_dir) -> dict[str, Any]:
    import data2text
    from lorakit.eval.evaluate import GenerationConfig, generate

    ev = cfg.get("eval", {})
    gen = GenerationConfig(decoding=ev.get("decoding", "greedy"), num_beams=int(ev.get("num_beams", 4)),
                           max_new_tokens=int(ev.get("max_new_tokens", 40)), batch_size=int(ev.get("batch_size", 16)))
    metrics = ev.get("metrics", ["bleu", "meteor", "ter"])
    parts = ["test"] if spec.stage == "seeds" and not ev.get("select_on_every_run", False) else ["select", "test"]
    out: dict[str, Any] = {}
    for part in parts:
        rows = data[part]
        hyps = generate(model, tokenizer, [r["prompt"] for r in rows], gen, first_line=True)
        refs = [r["references"] for r in rows]
        out[part] = data2text.nlg_scores(hyps, refs, metrics)
        out[f"{part}_rows"] = len(rows)
        groups = sorted({r["group"] for r in rows if r["group"] is not None})
        if part == "test" and groups:
            out["test_groups"] = {}
            for g in groups:
                idx = [i for i, r in enumerate(rows) if r["group"] == g]
                out["test_groups"][g] = {**data2text.nlg_scores([hyps[i] for i in idx], [refs[i] for i in idx],
                                                                 metrics), "rows": len(idx)}
        C.atomic_write_text(out_dir / f"{part}_outputs.json", json.dumps(
            [{"id": r["id"], "output": h, "references": r["references"]} for r, h in zip(rows, hyps)], indent=1) + "\n")
    out["samples"] = hyps[:3]
    return out


# ---------------------------------------------------------------------------------------------------- report
def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (n-1; 0 for one value), n) of the finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def aggregate(cfg: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task and method: the lr chosen on the select split, the test metrics at that lr over every seed measured
    (mean ± std), the parameter count and the times; plus the grid and the runs still missing."""
    rows = current_rows(cfg, rows)
    results: dict[str, Any] = {}
    for task in cfg["tasks"]:
        for method in cfg["methods"]:
            lr, means = choose_lr(cfg, rows, task, method)
            entry: dict[str, Any] = {"task": task, "method": method, "select_metric": select_metric(cfg, task),
                                     "grid": {f"{k:g}": v for k, v in means.items()}, "chosen_lr": lr}
            mine = [r for r in rows if r["task"] == task and r["method"] == method]
            if mine:
                entry["trainable_params"] = mine[0]["trainable_params"]
                entry["trainable_pct"] = mine[0]["trainable_pct"]
            if lr is not None:
                at_lr = sorted((r for r in mine if float(r["lr"]) == lr), key=lambda r: r["seed"])
                entry["seeds"] = [r["seed"] for r in at_lr]
                entry["per_seed"] = {m: [r["test"].get(m) for r in at_lr]
                                     for m in sorted({m for r in at_lr for m in r["test"]})}
                entry["test"] = {m: mean_std(values) for m, values in entry["per_seed"].items()}
                groups = sorted({g for r in at_lr for g in r.get("test_groups", {})})
                if groups:
                    entry["test_groups"] = {g: {m: mean_std(r["test_groups"][g].get(m) for r in at_lr
                                                            if g in r.get("test_groups", {}))
                                                for m in sorted(at_lr[0]["test_groups"][g]) if m != "rows"}
                                            for g in groups}
                for key in ("train_seconds", "wall_seconds", "final_loss", "seconds_per_step"):
                    entry[key] = mean_std(r.get(key) for r in at_lr)
            results[f"{task} {method}"] = entry
    finished = {r["run_id"] for r in rows}
    missing = [s.run_id for s in plan(cfg, rows) if s.run_id not in finished]
    compared = compare(cfg, results)
    unplanned = [f"{t} {m}: seeds {[s for s in cfg['seeds'] if s not in cfg['select_seeds']]} wait for the lr grid"
                 for t in cfg["tasks"] for m in cfg["methods"] if choose_lr(cfg, rows, t, m)[0] is None
                 and len(cfg["seeds"]) > len(cfg["select_seeds"])]
    return {"results": results, "comparisons": compared, "missing_runs": missing, "not_yet_planned": unplanned,
            "runs": len(rows)}


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p of Welch's t-test (unequal variances) between two sets of seed results; NaN below 2 each."""
    from scipy import stats

    a, b = [float(x) for x in a if x is not None], [float(x) for x in b if x is not None]
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def compare(cfg: dict[str, Any], results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every method against `compare_to` (default the first method) on the same task, per test metric: the two
    seed means' difference (method − reference) and Welch's p over the seeds at each one's chosen lr."""
    reference = cfg.get("compare_to") or next(iter(cfg["methods"]))
    if reference not in cfg["methods"]:
        raise SystemExit(f"compare_to: {reference!r} is not a method of this config (methods: {list(cfg['methods'])})")
    out = []
    for task in cfg["tasks"]:
        ref = results.get(f"{task} {reference}", {})
        for method in cfg["methods"]:
            mine = results.get(f"{task} {method}", {})
            if method == reference or "per_seed" not in mine or "per_seed" not in ref:
                continue
            metrics = {m: {"delta": mine["test"][m][0] - ref["test"][m][0],
                           "p": welch_p(mine["per_seed"][m], ref["per_seed"][m])}
                       for m in mine["per_seed"] if m in ref["per_seed"]}
            out.append({"task": task, "method": method, "reference": reference, "metrics": metrics})
    return out


def _pm(stat: tuple[float, float, int] | None, digits: int = 2) -> str:
    if not stat or not stat[2]:
        return "–"
    mean, std, n = stat
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f} (1 seed)"


def _delta(d: dict[str, float]) -> str:
    """`+1.23 (0.045)`: a difference of means and its Welch p; `(1 seed)` in place of a p that needs two each."""
    return f"{d['delta']:+.2f} ({d['p']:.3f})" if math.isfinite(d["p"]) else f"{d['delta']:+.2f} (1 seed)"


def _table(header: list[str], rows: list[list[str]], right: int) -> list[str]:
    """A markdown table whose last `right` columns are right-aligned."""
    align = ["---"] * (len(header) - right) + ["---:"] * right
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def report_markdown(cfg: dict[str, Any], agg: dict[str, Any], config_path: str) -> str:
    metrics = (list(NLG_METRICS) if cfg["kind"] == "nlg" else ["accuracy", "f1", "matthews", "pearson", "spearman"])
    present = [m for m in metrics if any(m in e.get("test", {}) for e in agg["results"].values())]
    lines = [f"# Sweep {cfg['name']}: {cfg['model']}, {', '.join(cfg['tasks'])}", "",
             f"Config: `{config_path}`. Budget: {json.dumps(cfg['budget'])}; split: {json.dumps(cfg['split'])}; "
             f"eval: {json.dumps(cfg.get('eval', {}))}. Seeds {cfg['seeds']}; the lr grid ran at seeds "
             f"{cfg['select_seeds']} and the lr with the best mean select-split metric was kept (never the test "
             "split). Test metrics: mean ± sample std (n−1) over the seeds at the chosen lr"
             + (" (TER: lower is better)." if cfg["kind"] == "nlg" else ".")
             + "".join(f" {m}: its runs are {src}'s (the same settings, checked by hash), not run again."
                       for m, src in (cfg.get("reuse") or {}).items()), ""]
    body = []
    for entry in agg["results"].values():
        lr = entry["chosen_lr"]
        chosen = (f"{lr:g} ({entry['select_metric']} {entry['grid'][f'{lr:g}']:.2f})" if lr is not None
                  else "grid not complete")
        params = (f"{entry['trainable_params']:,} ({entry['trainable_pct']:.2f}%)" if "trainable_params" in entry
                  else "–")
        body.append([entry["task"], entry["method"], params, chosen,
                     ",".join(map(str, entry.get("seeds", []))) or "–"]
                    + [_pm(entry.get("test", {}).get(m)) for m in present]
                    + [_pm(entry.get("train_seconds"), 0), _pm(entry.get("wall_seconds"), 0)])
    lines += _table(["task", "method", "trainable params (%)", "chosen lr (select metric)", "seeds"]
                    + [f"test {m}" for m in present] + ["train s / run", "wall s / run"], body, len(present) + 2)
    grouped = [e for e in agg["results"].values() if e.get("test_groups")]
    if grouped:
        lines += ["", "Test split by group (WebNLG: categories seen in training vs held out):", ""]
        lines += _table(["task", "method", "group"] + present,
                        [[e["task"], e["method"], g] + [_pm(stats.get(m)) for m in present]
                         for e in grouped for g, stats in e["test_groups"].items()], len(present))
    if agg.get("comparisons"):
        ref = agg["comparisons"][0]["reference"]
        first = present[0]
        lines += ["", f"Per seed and against {ref} (difference of the seed means, method − {ref}; Welch's t-test p "
                  "over the seeds, two-sided; TER: lower is better):", ""]
        against = {(c["task"], c["method"]): c["metrics"] for c in agg["comparisons"]}
        body = []
        for e in agg["results"].values():
            if "per_seed" not in e:
                continue
            deltas = against.get((e["task"], e["method"]))
            body.append([e["task"], e["method"], " / ".join(f"{v:.2f}" for v in e["per_seed"][first])]
                        + [("—" if deltas is None else _delta(deltas[m]) if m in deltas else "–") for m in present])
        lines += _table(["task", "method", f"test {first} per seed"] + [f"Δ{m} (p)" for m in present], body,
                        len(present))
    lines += ["", "The lr grid (mean select-split metric over the grid seeds):", ""]
    lines += _table(["task", "method", "lr: select metric"],
                    [[e["task"], e["method"], ", ".join(f"{lr}: {v:.2f}" if math.isfinite(v) else f"{lr}: n/a"
                                                        for lr, v in e["grid"].items()) or "not run"]
                     for e in agg["results"].values()], 0)
    if agg["missing_runs"] or agg["not_yet_planned"]:
        lines += ["", f"Not measured yet ({len(agg['missing_runs'])} planned runs missing): "
                  + ", ".join(agg["missing_runs"][:40]) + (" …" if len(agg["missing_runs"]) > 40 else "")
                  + ("; " + "; ".join(agg["not_yet_planned"]) if agg["not_yet_planned"] else "") + "."]
    return "\n".join(lines) + "\n"


def write_report(cfg: dict[str, Any], rows_file: Path, out_dir: Path, config_path: str,
                 reused: list[dict[str, Any]] = ()) -> dict[str, Any]:
    agg = aggregate(cfg, read_rows(rows_file) + list(reused))

    def plain(x):  # (mean, std, n) tuples as dicts in the JSON
        if isinstance(x, tuple) and len(x) == 3:
            return {"mean": x[0], "std": x[1], "n": x[2]}
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list):
            return [plain(v) for v in x]
        return x

    report = {"benchmark": cfg["name"], "config": cfg, "config_path": config_path, **plain(agg)}
    C.atomic_write_text(out_dir / f"{cfg['name']}.json", json.dumps(report, indent=2, default=str) + "\n")
    text = report_markdown(cfg, agg, config_path)
    C.atomic_write_text(out_dir / f"{cfg['name']}.md", text)
    return report


# ---------------------------------------------------------------------------------------------------- CLI
def check_precision(cfg: dict[str, Any], config_path: str, speedup: Callable[[], float] | None = None) -> None:
    """Refuse a bf16 budget where this CPU has no fast bf16 (AVX2-only: bf16 matmuls are emulated, ~70x slower than
    fp32, so a one-hour run would take days)."""
    if cfg["budget"].get("precision", "fp32") != "bf16":
        return
    from lorakit.hardware import bf16_speedup

    measured = (speedup or bf16_speedup)()
    if measured < 1.0:
        raise SystemExit(f"{config_path}: budget precision is bf16, but a bf16 matmul runs at {measured:.2f}x the "
                         "speed of fp32 on this CPU (no AVX512-BF16 or AMX); set `precision: fp32` in the budget "
                         "(its runs get their own settings hash) or run this sweep on a CPU or GPU with fast bf16")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "status", "report"])
    parser.add_argument("config", help="benchmarks/experiments/<name>.yaml")
    parser.add_argument("--data-dir", default=str(C.ROOT.parent / C.DEFAULT_DATA_DIR),
                        help="shared benchmark data folder (default: ../shared/data next to the repo)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=str(C.RESULTS), help="results folder (runs file, report)")
    parser.add_argument("--runs-dir", default=str(C.RUNS), help="adapters, outputs and claims (git-ignored)")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    rows_file = Path(args.out) / f"{cfg['name']}.runs.jsonl"
    reused = reused_rows(cfg, Path(args.config).parent, Path(args.out))
    if args.command == "run":
        C.set_threads(args.threads)
        print(C.cpu_line(), flush=True)
        check_precision(cfg, args.config)
        n = sweep(cfg, rows_file, Path(args.runs_dir) / cfg["name"] / "claims",
                  lambda c, s: execute(c, s, args.data_dir, Path(args.runs_dir)), max_runs=args.max_runs,
                  say=lambda m: print(m, flush=True), reused=reused)
        print(f"{n} run(s) finished; rows in {rows_file}")
        write_report(cfg, rows_file, Path(args.out), args.config, reused)
    elif args.command == "status":
        rows = current_rows(cfg, read_rows(rows_file) + reused)
        finished = {r["run_id"] for r in rows}
        taken = {r["run_id"] for r in reused}
        for spec in plan(cfg, rows):
            state = "reused " if spec.run_id in taken else "done   " if spec.run_id in finished else "pending"
            print(f"{state} {spec.stage:5} {spec.run_id}")
        print(f"{len(finished)} finished with the current settings")
    else:
        report = write_report(cfg, rows_file, Path(args.out), args.config, reused)
        print((Path(args.out) / f"{cfg['name']}.md").read_text())
        print(f"{report['runs']} runs; {len(report['missing_runs'])} planned runs missing")


if __name__ == "__main__":
    main()
