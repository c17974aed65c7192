"""Which weight matrices to adapt at a fixed parameter budget (the paper's Table 5), SmolLM2-135M-Instruct on E2E.

SmolLM2 uses grouped-query attention: W_q, W_o are 576×576 but W_k, W_v are 576→192, so one rank costs 1,152
parameters per layer on W_q/W_o and 768 on W_k/W_v. The budget is LoRA r=4 on W_q+W_v (7,680 per layer, 230,400 in
all); each setting gets the rank that comes closest: W_q 7, W_k 10, W_v 10, W_o 7, W_q+W_v 4, all four 2.

Default budget (2 shared CPU cores, ~45 min): 6 runs × 60 steps × batch 8 (the same 480 pairs), first 40 dev MRs,
greedy. `--full-size` is the paper's scale.

Writes benchmarks/results/ablation_targets.{json,md,png}.
"""

from __future__ import annotations

import _common as C
from lorakit import LoraConfig

SETTINGS = {
    "W_q": (["q_proj"], 7), "W_k": (["k_proj"], 10), "W_v": (["v_proj"], 10), "W_o": (["o_proj"], 7),
    "W_q+W_v": (["q_proj", "v_proj"], 4), "W_q+W_k+W_v+W_o": (["q_proj", "k_proj", "v_proj", "o_proj"], 2),
}


def select(settings: str) -> list[str]:
    """--settings: comma-separated names (they hold "+", never ","), returned in table order."""
    given = [s for s in settings.split(",") if s]
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; allowed: {', '.join(SETTINGS)}")
    return [s for s in SETTINGS if s in given]


def main() -> None:
    parser = C.base_parser(__doc__)
    C.e2e_arguments(parser, steps=60, eval_limit=40)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="subset of: " + " ".join(SETTINGS))
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    C.merge_arguments(parser)
    args = parser.parse_args()
    C.e2e_apply_full_size(args)
    C.set_threads(args.threads)
    chosen = select(args.settings)
    rows = C.earlier_rows(args, "ablation_targets")
    rows.update(C.reused_row(args, spec) for spec in args.reuse)
    print(f"Budget: {C.e2e_budget(args, runs=len(chosen))}", flush=True)
    for name in chosen:
        targets, r = SETTINGS[name]
        lora = LoraConfig(r=r, alpha=args.alpha, target_modules=targets)
        rows[f"{name} (r={r})"] = C.e2e_run(args, "lora", args.lr, lora, tag=name)
        write(args, rows)  # after every run, so a stopped run keeps what it measured
    if not chosen:
        write(args, rows)


def write(args, rows: dict) -> None:
    ordered = {k: rows[k] for k in (f"{n} (r={SETTINGS[n][1]})" for n in SETTINGS) if k in rows}
    if not ordered:
        raise SystemExit("nothing to write: give --settings and/or --reuse/--merge")
    C.write_e2e("ablation_targets", args, C.e2e_budget(args, runs=len(ordered)), ordered,
                f"# Which weights to adapt at a fixed budget (Table 5), SmolLM2-135M-Instruct, E2E dev subset\n\n"
                f"alpha {args.alpha}, lr {args.lr}. Ranks chosen so every setting trains ~230k parameters "
                "(W_k, W_v are 576→192 under grouped-query attention).", "E2E dev subset vs adapted weights (equal budget)")


if __name__ == "__main__":
    main()
