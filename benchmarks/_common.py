"""Shared benchmark harness: which parameters train for each method, fixed-step training on `lorakit train`'s own step,
data batching for E2E and GLUE, and result files. The scripts here compare methods under one identical run (same
examples, order, steps, schedule): they build the batches and count the steps here, and each step is the library's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from lorakit.hardware import cpu_info, cpu_line  # noqa: E402
from lorakit import LoraConfig, add_lora  # noqa: E402
from lorakit.data.benchmarks import DEFAULT_DATA_DIR, load_e2e, load_glue  # noqa: E402,F401
from lorakit.eval.evaluate import e2e_prompt, results_table  # noqa: E402
from lorakit.fsutil import atomic_write_text  # noqa: E402

RESULTS = ROOT / "results"
RUNS = ROOT / "runs"  # adapters saved for `lorakit analyze`; git-ignored


def base_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / DEFAULT_DATA_DIR),
                        help="shared benchmark data folder (default: ../shared/data next to the repo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                        help="bfloat16 autocast for training (master weights stay fp32). Off by default: on this CPU "
                             "some bf16 backward GEMMs hit a slow fallback. Decoding always runs in fp32.")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    return parser


# ---------------------------------------------------------------------------------------------------- methods
def prepare(model: torch.nn.Module, method: str, lora: LoraConfig | None = None, adapter_bottleneck: int = 8) -> None:
    """Set which parameters train. lora: add_lora; full: everything; bitfit: biases, plus the norm weights on models
    without biases (Llama/SmolLM2 has none, so there BitFit means RMSNorm weights); adapter: Houlsby bottleneck layers
    of width `adapter_bottleneck` after each block's attention and MLP output projections (Llama-style blocks), the
    base frozen; base: nothing."""
    if method == "lora":
        add_lora(model, lora)
        return
    if method == "adapter":  # Houlsby bottlenecks (benchmarks/baselines.py); only they train
        from baselines import add_adapter_layers

        for p in model.parameters():
            p.requires_grad_(False)
        add_adapter_layers(model, bottleneck=adapter_bottleneck)
        return
    for name, p in model.named_parameters():
        if method == "full":
            p.requires_grad_(True)
        elif method == "bitfit":
            p.requires_grad_(name.endswith(".bias") or "norm" in name.lower() or name.endswith("classifier.weight"))
        elif method == "base":
            p.requires_grad_(False)
        else:
            raise ValueError(f"unknown method {method!r}")


def trainable_count(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())  # shared (tied) tensors appear once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------------- loop
def train(model, batches: Iterator[dict[str, torch.Tensor]], steps: int, lr: float, bf16: bool, warmup: int = 10,
          log_every: int = 10, tag: str = "") -> dict[str, Any]:
    """`steps` optimizer steps of `lorakit train`'s own step (lorakit.train.loop.train_step) on the batches built
    here, one batch per step: AdamW with weight decay 0, linear warm-up over `warmup` steps then linear decay to 0,
    gradient clipping at 1.0, bf16 autocast with `bf16` (the frozen base stays fp32); the loss is the library's
    (causal-LM, or classification when the batches carry one label per row), and a non-finite step stops the run.

    The results files written before this went through the library were measured by a loop of this file's own,
    which differed in: warm-up factor (s+1)/warmup, now lorakit's (s+1)/(warmup+1), so the peak lr comes one step
    later (with steps < warmup the old one also decayed); the causal-LM loss from model(**batch).loss, now lorakit's
    fused cross-entropy (equal to float rounding); a non-finite step was applied; and gated MLPs (SmolLM2) now run
    lorakit's fused forward (bit-identical values, less memory).
    """
    from lorakit.train import OptimConfig, TrainConfig, build_model_run, train_step

    first = next(batches)
    batches = itertools.chain([first], batches)
    config = TrainConfig(precision="bf16" if bf16 else "fp32", base_dtype="fp32", progress=False, tensorboard=False,
                         output_dir=str(RUNS / (tag or "train")),
                         optim=OptimConfig(lr=lr, weight_decay=0.0, schedule="linear", warmup_steps=warmup,
                                           max_grad_norm=1.0, batch_size=len(first["input_ids"]), max_steps=steps))
    run = build_model_run(model, config, task="seq-cls" if first["labels"].dim() == 1 else "causal-lm")
    model.train()
    losses, t0 = [], time.time()
    for step in range(steps):
        losses.append(train_step(run, [next(batches)])["loss"])
        if (step + 1) % log_every == 0 or step == 0:
            recent = losses[-log_every:]
            print(f"  [{tag}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                  f"({(time.time() - t0) / (step + 1):.2f} s/step)", flush=True)
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return {"steps": steps, "train_seconds": round(time.time() - t0, 1), "first_loss": round(losses[0], 4),
            "final_loss": round(sum(tail) / len(tail), 4), "seconds_per_step": round((time.time() - t0) / steps, 3)}


# ---------------------------------------------------------------------------------------------------- data
def e2e_batches(tokenizer, data_dir: str, examples: int, batch_size: int, seed: int,
                max_length: int = 160) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of (prompt, target) pairs from `examples` train pairs drawn with `seed`; loss on the target and
    the end token only. Every method sees the same pairs in the same order."""
    rows = load_e2e("train", data_dir)
    rng = random.Random(seed)
    rows = rng.sample(rows, min(examples, len(rows)))
    pairs = [(e2e_prompt(r["mr"]), r["references"][0]) for r in rows]
    return pair_batches(tokenizer, pairs, batch_size, seed, max_length)


def pair_batches(tokenizer, pairs: list[tuple[str, str]], batch_size: int, seed: int,
                 max_length: int = 160) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of (prompt, target) text pairs, reshuffled each epoch with `seed`; the target is " " + target +
    the end token, and only its tokens carry labels (the prompt is masked)."""
    eos = tokenizer.eos_token
    encoded = []
    for prompt_text, target_text in pairs:
        prompt = tokenizer(prompt_text)["input_ids"]
        target = tokenizer(" " + target_text + eos)["input_ids"]
        ids = (prompt + target)[:max_length]
        encoded.append((ids, ([-100] * len(prompt) + target)[:max_length]))
    pad = tokenizer.pad_token_id
    epoch = 0
    while True:
        order = list(range(len(encoded)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [encoded[i] for i in order[start:start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            yield {
                "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk]),
                "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]),
                "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk]),
            }
        epoch += 1


def glue_batches(tokenizer, task: str, data_dir: str, examples: int, batch_size: int, seed: int,
                 max_length: int = 128) -> Iterator[dict[str, torch.Tensor]]:
    rows = load_glue(task, "train", data_dir)
    rows = random.Random(seed).sample(rows, min(examples, len(rows)))
    return labelled_batches(tokenizer, rows, batch_size, seed, max_length)


def labelled_batches(tokenizer, rows: list[dict], batch_size: int, seed: int,
                     max_length: int = 128) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of GLUE rows ({"texts": (str, ...), "label"}), reshuffled each epoch with `seed`."""
    epoch = 0
    while True:
        order = list(range(len(rows)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [rows[i] for i in order[start:start + batch_size]]
            enc = tokenizer(*zip(*[r["texts"] for r in chunk]), return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            labels = [r["label"] for r in chunk]
            enc["labels"] = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
            yield dict(enc)
        epoch += 1


# ---------------------------------------------------------------------------------------------------- results
def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "cpu": cpu_info(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write(name: str, out: str | Path, report: dict[str, Any], table_rows: dict[str, dict[str, Any]],
          columns: list[str], header: str) -> None:
    """benchmarks/results/<name>.json (everything) and <name>.md (header + the table)."""
    out = Path(out)
    report = {**report, "environment": environment()}
    atomic_write_text(out / f"{name}.json", json.dumps(report, indent=2) + "\n")
    header = header.rstrip() + "\n\n" + cpu_line()
    atomic_write_text(out / f"{name}.md", header + "\n\n" + results_table(table_rows, columns))
    print(cpu_line())
    print(results_table(table_rows, columns))


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, n))


def budget_line(**items: Any) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in items.items())



def pct(trainable: int, total: int) -> float:
    return round(100 * trainable / total, 4) if total else math.nan


# ---------------------------------------------------------------------------------------------------- E2E runs
def e2e_arguments(parser: argparse.ArgumentParser, steps: int, eval_limit: int) -> None:
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-examples", type=int, default=None, help="distinct train pairs (default steps×batch)")
    parser.add_argument("--eval-limit", type=int, default=eval_limit, help="dev MRs scored (0 = all 547)")
    parser.add_argument("--decoding", default="greedy", choices=["greedy", "beam"])
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--full-size", action="store_true",
                        help="the paper's scale: all 42,061 train pairs, 5 epochs, all 547 dev MRs, beam 10 (GPU)")


def e2e_apply_full_size(args: argparse.Namespace) -> None:
    if args.full_size:
        args.train_examples, args.eval_limit, args.decoding, args.num_beams = 42061, 0, "beam", 10
        args.steps = 5 * 42061 // args.batch_size
    args.train_examples = args.train_examples or args.steps * args.batch_size


def e2e_budget(args: argparse.Namespace, runs: int) -> str:
    return budget_line(runs=runs, steps_per_run=args.steps, batch=args.batch_size,
                       train_pairs=args.train_examples, dev_MRs=args.eval_limit or 547,
                       decoding=f"{args.decoding}" + (f"×{args.num_beams}" if args.decoding == "beam" else ""),
                       max_new_tokens=args.max_new_tokens,
                       precision="bf16 autocast training, fp32 decoding" if args.bf16 else "fp32")


def e2e_run(args: argparse.Namespace, method: str, lr: float, lora: LoraConfig | None = None,
            save_to: Path | None = None, tag: str | None = None) -> dict[str, Any]:
    """Load SmolLM2-135M fresh, make `method`'s parameters trainable, train on the shared E2E pairs, score the dev MRs."""
    from lorakit import load_model, save_adapter
    from lorakit.eval.evaluate import EvalConfig, GenerationConfig, evaluate_model

    torch.manual_seed(args.seed)
    model, tokenizer = load_model("smollm2-135m")
    prepare(model, method, lora)
    trainable, total = trainable_count(model)
    row: dict[str, Any] = {"trainable_params": trainable, "trainable_pct": pct(trainable, total)}
    if method != "base":
        batches = e2e_batches(tokenizer, args.data_dir, args.train_examples, args.batch_size, args.seed)
        row.update(train(model, batches, args.steps, lr, args.bf16, tag=tag or method))
        row["lr"] = lr
    if save_to is not None and method == "lora":
        save_adapter(model, save_to)
    config = EvalConfig(task="e2e", limit=args.eval_limit or None, data_dir=args.data_dir,
                        generation=GenerationConfig(decoding=args.decoding, num_beams=args.num_beams,
                                                    max_new_tokens=args.max_new_tokens,
                                                    batch_size=args.eval_batch_size))
    scores, outputs = evaluate_model(model, tokenizer, config)
    row.update(scores)
    row["eval_seconds"] = row.pop("seconds")
    row["samples"] = outputs[:3]
    print(f"  [{tag or method}] {scores}", flush=True)
    return row


COMPARABLE = ["seed", "steps", "batch_size", "train_examples", "eval_limit", "decoding", "max_new_tokens", "bf16"]


def comparable(args: argparse.Namespace, other: dict[str, Any], lr_key: str = "lr") -> list[str]:
    """The settings on which `other` (the args of an earlier results file) differs from this run; [] = comparable."""
    mine = vars(args)
    diff = [k for k in COMPARABLE if mine.get(k) != other.get(k)]
    if mine.get("decoding") == "beam" and mine.get("num_beams") != other.get("num_beams"):
        diff.append("num_beams")
    if "alpha" in other and mine.get("alpha") != other["alpha"]:
        diff.append("alpha")
    if mine.get("lr") != other.get(lr_key):
        diff.append(lr_key)
    return diff


def earlier_rows(args: argparse.Namespace, name: str) -> dict[str, dict[str, Any]]:
    """With --merge: the rows of <out>/<name>.json from an earlier run with the same settings, so a script can add runs
    (e.g. another rank) without redoing the ones already measured. Different settings are an error, not a silent mix."""
    path = Path(args.out) / f"{name}.json"
    if not getattr(args, "merge", False) or not path.exists():
        return {}
    old = json.loads(path.read_text())
    diff = comparable(args, old["args"])
    if diff:
        raise SystemExit(f"--merge: {path} was measured with different settings ({', '.join(diff)}: "
                         f"{[old['args'].get(k) for k in diff]} vs {[vars(args).get(k) for k in diff]}); "
                         "run with the same settings or without --merge")
    return old["results"]


def reused_row(args: argparse.Namespace, spec: str) -> tuple[str, dict[str, Any]]:
    """--reuse ROW=FILE:KEY: take run KEY from an earlier results file measured with the same settings (checked) as
    row ROW instead of training it again; the row records where it came from."""
    row, _, source = spec.rpartition("=")  # row names may hold "=" (r=4), file paths here do not
    file, _, key = source.rpartition(":")
    old = json.loads(Path(file).read_text())
    lr_key = "lr" if "lr" in old["args"] else f"lr_{key}"
    diff = comparable(args, old["args"], lr_key)
    if diff:
        raise SystemExit(f"--reuse {spec}: measured with different settings ({', '.join(diff)})")
    return row, {**old["results"][key], "reused_from": f"{Path(file).name}:{key}"}


def merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an earlier results file with the same settings and add this run's")
    parser.add_argument("--reuse", action="append", default=[], metavar="ROW=FILE:KEY",
                        help="take row ROW from run KEY of an earlier results file with the same settings")


def write_e2e(name: str, args: argparse.Namespace, budget: str, rows: dict[str, dict[str, Any]], header: str,
              plot_title: str) -> None:
    """The E2E scripts' results: <name>.json, <name>.md and a bar chart <name>.png."""
    header = (f"{header}\n\nBudget: {budget}.\nBLEU, METEOR, ROUGE-L ×100; NIST, CIDEr raw "
              "(implementations: src/lorakit/evaluation.py).")
    reused = [f"{row} = {values['reused_from']}" for row, values in rows.items() if "reused_from" in values]
    if reused:
        header += f"\nReused from earlier runs with the same settings (checked), not trained again: {', '.join(reused)}."
    write(name, args.out, {"benchmark": name, "budget": budget, "args": vars(args), "results": rows}, rows,
          E2E_COLUMNS, header)
    plot_metric_bars(rows, ["bleu", "rouge_l", "meteor"], f"{args.out}/{name}.png", plot_title)


E2E_COLUMNS = ["trainable_params", "trainable_pct", "bleu", "nist", "meteor", "rouge_l", "cider", "final_loss",
               "train_seconds"]


def plot_metric_bars(rows: dict[str, dict[str, Any]], metrics: list[str], path: str | Path, title: str) -> None:
    """Grouped bars: one group per run, one bar per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 3.6))
    for k, metric in enumerate(metrics):
        ax.bar([i + k * width for i in range(len(names))], [rows[n].get(metric) or 0 for n in names], width,
               label=metric)
    ax.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(names))], names)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
