"""LoRA variants on E2E NLG with SmolLM2-135M-Instruct: what DoRA, a PiSSA init (and QLoRA-NF4) cost and buy here.

Every variant: r=4, alpha 32 on W_q, W_v (e2e_nlg.py's LoRA), the same train pairs in the same order, the same steps,
schedule and learning rate, scored by the same harness (benchmarks/_common.py). Each variant runs in its own process
so its peak RSS is its own.
  lora         plain LoRA (Kaiming A, zero B)
  dora         + use_dora (magnitude vector; weight norm recomputed every forward)
  pissa        init="pissa" (top-4 SVD of W in B, A; the frozen base keeps the residual)
  qlora-nf4    plain LoRA on a 4-bit NF4 base (bitsandbytes, `load_model(quantize="nf4")`)

Default budget (1 thread, modest): 30 steps × batch 8, the first 24 dev MRs, greedy decoding, 32 new tokens at most.
Writes benchmarks/results/variants.{json,md,png}.
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
from lorakit import LoraConfig

VARIANTS = {
    "lora": {},
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa"},
    "qlora-nf4": {},
}
COLUMNS = ["trainable_params", "bleu", "nist", "meteor", "rouge_l", "cider", "final_loss", "median_step_s",
           "peak_rss_train_mb", "peak_rss_mb"]


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _timed_batches(probe: dict):
    """Wrap the harness's batch stream: the gap between two batch requests is one optimizer step."""
    original = C.e2e_batches

    def batches(*args, **kwargs):
        for batch in original(*args, **kwargs):
            probe["times"].append(time.perf_counter())
            probe["rss"] = _peak_rss_mb()  # peak so far: model load + the training steps before this one
            yield batch

    return batches


def _use_quantized_base(kind: str) -> None:
    import lorakit
    from lorakit.models import loading as models

    if "quantize" not in inspect.signature(models.load_model).parameters:
        raise SystemExit(f"qlora-{kind}: this lorakit's load_model has no `quantize` option yet (issue 7b adds it). "
                         "Re-run with --variants including qlora-nf4 once it has landed.")
    original = models.load_model

    def load_quantized(*args, **kwargs):
        return original(*args, quantize=kind, **kwargs)

    lorakit.load_model = load_quantized


def run_one(args, variant: str) -> dict:
    """One variant in this process (the parent starts one process per variant)."""
    C.set_threads(args.threads)
    if variant.startswith("qlora-"):
        _use_quantized_base(variant.split("-", 1)[1])
    probe = {"times": [], "rss": 0.0}
    C.e2e_batches = _timed_batches(probe)
    lora = LoraConfig(r=4, alpha=32, target_modules=["q_proj", "v_proj"], **VARIANTS[variant])
    row = C.e2e_run(args, "lora", args.lr, lora, tag=variant)
    steps = [b - a for a, b in zip(probe["times"], probe["times"][1:])]
    row["median_step_s"] = round(statistics.median(steps), 3) if steps else None
    row["peak_rss_train_mb"] = probe["rss"]
    row["peak_rss_mb"] = _peak_rss_mb()  # including greedy decoding of the dev MRs
    return row


def main() -> None:
    parser = C.base_parser(__doc__)
    C.e2e_arguments(parser, steps=30, eval_limit=24)
    parser.set_defaults(threads=1, max_new_tokens=32)
    parser.add_argument("--variants", default="lora,dora,pissa",
                        help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--lr", type=float, default=1e-3, help="one learning rate for every variant")
    parser.add_argument("--combine", nargs="+", metavar="RESULTS_JSON",
                        help="write one table from the rows of earlier variants.json files (e.g. variants run as "
                             "parallel processes with --out elsewhere) instead of running anything")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--row-file", help=argparse.SUPPRESS)  # internal: where that run writes its row (JSON)
    args = parser.parse_args()
    C.e2e_apply_full_size(args)
    if args.one:
        row = run_one(args, args.one)
        Path(args.row_file).write_text(json.dumps(row))
        return

    if args.combine:
        reports = [json.loads(Path(f).read_text()) for f in args.combine]
        rows = {name: row for r in reports for name, row in r["results"].items()}
        budgets = {r["budget"] for r in reports}
        if len(budgets) != 1:
            parser.error(f"the files were run with different budgets: {sorted(budgets)}")
        _write(args, budgets.pop(), rows, note=f" Combined from {len(reports)} separate runs (--combine), which may "
               "have overlapped in time.")
        return

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    budget = C.e2e_budget(args, runs=len(variants)) + f", threads {args.threads}, lr {args.lr}"
    print(f"Budget: {budget}", flush=True)
    rows = {}
    for variant in variants:
        with tempfile.TemporaryDirectory() as tmp:
            row_file = Path(tmp) / "row.json"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", variant, "--row-file", str(row_file)]
            done = subprocess.run(cmd)
            if done.returncode != 0:
                print(f"  [{variant}] failed (exit {done.returncode}); not in the table", flush=True)
                continue
            rows[variant] = json.loads(row_file.read_text())
        _write(args, budget, rows)  # after every variant, so a stopped run keeps what it measured


def _write(args, budget: str, rows: dict, note: str = "") -> None:
    C.write("variants", args.out, {"benchmark": "variants", "budget": budget, "args": vars(args), "results": rows},
            rows, COLUMNS,
            "# LoRA variants on E2E NLG, SmolLM2-135M-Instruct (dev subset)\n\n"
            f"Budget: {budget}. r=4, alpha 32 on q_proj, v_proj for every variant.{note}\nBLEU, METEOR, ROUGE-L "
            "×100; NIST, CIDEr raw. median_step_s: median optimizer step (forward, backward, AdamW) in seconds; "
            "peak_rss_train_mb: peak RSS up to the last training step; peak_rss_mb: including decoding.")
    C.plot_metric_bars(rows, ["bleu", "rouge_l", "meteor"], f"{args.out}/variants.png", "E2E dev subset: LoRA variants")


if __name__ == "__main__":
    main()
