"""Which rank r suffices (the paper's Table 6): LoRA on W_q + W_v of SmolLM2-135M-Instruct with r ∈ {1, 2, 4, 8, 64},
alpha fixed at 32 for every r (the paper sets alpha once and does not tune it), E2E NLG.

Default budget (2 shared CPU cores, ~35 min): 5 runs × 60 steps × batch 8 (the same 480 train pairs for every r), the
first 40 dev MRs scored greedily (40 new tokens at most). `--full-size` is
the paper's scale. Adapters go to benchmarks/runs/rank/r<r> (not committed) for
`lorakit analyze benchmarks/runs/rank/r8 benchmarks/runs/rank/r64`.

Writes benchmarks/results/ablation_rank.{json,md,png}.
"""

from __future__ import annotations

import _common as C
from lorakit import LoraConfig


def main() -> None:
    parser = C.base_parser(__doc__)
    C.e2e_arguments(parser, steps=60, eval_limit=40)
    parser.add_argument("--ranks", default="1,2,4,8,64")
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    C.merge_arguments(parser)
    args = parser.parse_args()
    C.e2e_apply_full_size(args)
    C.set_threads(args.threads)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    rows = C.earlier_rows(args, "ablation_rank")
    rows.update(C.reused_row(args, spec) for spec in args.reuse)
    print(f"Budget: {C.e2e_budget(args, runs=len(ranks))}", flush=True)
    for r in ranks:
        lora = LoraConfig(r=r, alpha=args.alpha, target_modules=["q_proj", "v_proj"])
        rows[f"r={r}"] = C.e2e_run(args, "lora", args.lr, lora, save_to=C.RUNS / "rank" / f"r{r}", tag=f"r={r}")
        write(args, rows)  # after every run, so a stopped run keeps what it measured
    if not ranks:
        write(args, rows)


def write(args, rows: dict) -> None:
    if not rows:
        raise SystemExit("nothing to write: give --ranks and/or --reuse")
    rows = dict(sorted(rows.items(), key=lambda kv: int(kv[0].split("=")[1])))
    C.write_e2e("ablation_rank", args, C.e2e_budget(args, runs=len(rows)), rows,
                f"# Rank ablation (Table 6), LoRA on W_q+W_v, SmolLM2-135M-Instruct, E2E dev subset\n\n"
                f"alpha {args.alpha} for every r, lr {args.lr}.", "E2E dev subset vs LoRA rank (W_q+W_v)")


if __name__ == "__main__":
    main()
