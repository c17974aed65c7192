"""GLUE with a pretrained encoder (all-MiniLM-L6-v2, 22.7M parameters): LoRA vs full fine-tuning (the paper's
Table 2 at small scale) on SST-2, MRPC, RTE, CoLA and STS-B.

LoRA: r=8 on query and value (alpha 16) plus the classification head (trained fully, as in the paper's GLUE setup,
where the head is always trained). Full: every parameter. Same examples, order, steps and schedule for both.

Default budget (2 shared CPU cores, ~30 min): per task and method 150 steps × batch 32 (4,800 train examples, fewer
if the task has fewer), max 128 tokens, scored on the shared validation half (all rows).
`--full-size`: whole train sets, 10 epochs.

Writes benchmarks/results/glue.{json,md,png}.
"""

from __future__ import annotations

import json
from pathlib import Path

import _common as C
import torch
from lorakit import LoraConfig
from lorakit.data.benchmarks import GLUE_TASKS

LR = {"lora": 1e-3, "full": 5e-5}


def run(args, task: str, method: str) -> dict:
    from lorakit import load_model
    from lorakit.eval.evaluate import EvalConfig, evaluate_model

    torch.manual_seed(args.seed)
    model, tokenizer = load_model("minilm-l6", task="seq-cls", num_labels=GLUE_TASKS[task].num_labels)
    C.prepare(model, method, LoraConfig(r=8, alpha=16, target_modules=["query", "value"],
                                        modules_to_save=args.lora_heads.split(",")))
    trainable, total = C.trainable_count(model)
    row = {"trainable_params": trainable, "trainable_pct": C.pct(trainable, total), "lr": getattr(args, f"lr_{method}")}
    steps = args.steps
    if args.full_size:
        steps = 10 * len(C.load_glue(task, "train", args.data_dir)) // args.batch_size
    batches = C.glue_batches(tokenizer, task, args.data_dir, args.train_examples or steps * args.batch_size,
                             args.batch_size, args.seed)
    row.update(C.train(model, batches, steps, row["lr"], args.bf16, tag=f"{task}/{method}"))
    scores, _ = evaluate_model(model, tokenizer, EvalConfig(task=task, data_dir=args.data_dir))
    row.update(scores)
    print(f"  [{task}/{method}] {scores}", flush=True)
    return row


def main() -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--tasks", default="sst2,mrpc,rte,cola,stsb")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-examples", type=int, default=None)
    parser.add_argument("--full-size", action="store_true")
    for method, lr in LR.items():
        parser.add_argument(f"--lr-{method}", type=float, default=lr)
    parser.add_argument("--name", default="glue", help="results file stem under --out (e.g. to keep runs with other "
                                                         "settings next to glue.*)")
    parser.add_argument("--lora-heads", default="classifier",
                        help="modules LoRA trains fully (modules_to_save), e.g. classifier,pooler: BERT's [CLS] pooler "
                             "is outside `classifier`, while the paper's RoBERTa head holds that dense layer")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an earlier <name>.json with the same settings and add this run's")
    args = parser.parse_args()
    C.set_threads(args.threads)
    tasks = args.tasks.split(",")
    methods = args.methods.split(",")
    rows = earlier_rows(args)
    print(f"Budget: {budget(args, [f'{t} {m}' for t in tasks for m in methods])}", flush=True)
    for task in tasks:
        for method in methods:
            rows[f"{task} {method}"] = run(args, task, method)
            write(args, budget(args, rows), rows)  # after every run, so a stopped run keeps what it measured


SETTINGS = ["seed", "steps", "batch_size", "train_examples", "full_size", "bf16", "lr_lora", "lr_full", "lora_heads"]
OLDER = {"lora_heads": "classifier"}  # settings that results files written before the option existed had implicitly


def earlier_rows(args) -> dict:
    """With --merge: the rows of <out>/<name>.json if it was measured with the same settings (else an error)."""
    path = Path(args.out) / f"{args.name}.json"
    if not args.merge or not path.exists():
        return {}
    old = json.loads(path.read_text())
    before, now = {**OLDER, **old["args"]}, vars(args)
    diff = ", ".join(f"{k} {before.get(k)} vs {now.get(k)}" for k in SETTINGS if before.get(k) != now.get(k))
    if diff:
        raise SystemExit(f"--merge: {path} was measured with different settings ({diff}); "
                         "run with the same settings or without --merge")
    return old["results"]


def budget(args, rows) -> str:
    """The budget line, counting the tasks and methods of `rows` (keys "<task> <method>")."""
    tasks, methods = ({key.split()[i] for key in rows} for i in (0, 1))
    return C.budget_line(tasks=len(tasks), methods=len(methods),
                         steps=args.steps if not args.full_size else "10 epochs", batch=args.batch_size,
                         precision="bf16 autocast" if args.bf16 else "fp32")


def ordered(rows: dict) -> dict:
    """Rows "<task> <method>" in GLUE_TASKS order, then lora before full, whatever order they were measured in."""
    tasks, methods = list(GLUE_TASKS), list(LR)
    return dict(sorted(rows.items(), key=lambda kv: (tasks.index(kv[0].split()[0]), methods.index(kv[0].split()[1]))))


def write(args, budget_text: str, rows: dict) -> None:
    rows = ordered(rows)
    columns = ["trainable_params", "trainable_pct", "accuracy", "f1", "matthews", "pearson", "spearman",
               "final_loss", "train_seconds"]
    header = (f"# GLUE, all-MiniLM-L6-v2, LoRA vs full fine-tuning (validation half)\n\nBudget: {budget_text}. "
              f"lr: lora {args.lr_lora}, full {args.lr_full}. LoRA r=8 on query,value; trained fully with it: "
              f"{args.lora_heads}. Metrics ×100.")
    C.write(args.name, args.out, {"benchmark": "glue", "budget": budget_text, "args": vars(args), "results": rows}, rows,
            columns, header)
    main_metric = {k: {"score": v.get(GLUE_TASKS[k.split()[0]].metrics[0])} for k, v in rows.items()}
    C.plot_metric_bars(main_metric, ["score"], f"{args.out}/{args.name}.png", "GLUE (main metric per task)")


if __name__ == "__main__":
    main()
