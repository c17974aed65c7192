"""E2E NLG with SmolLM2-135M-Instruct: the paper's GPT-2 table (Table 3) at CPU scale.

Methods, all trained on the same train pairs in the same order for the same steps and schedule:
  base    the instruct model prompted (no training)
  lora    LoRA r=4 on W_q, W_v (alpha 32, as in the paper's E2E setup)
  full    full fine-tuning (every parameter)
  bitfit  BitFit; SmolLM2 (Llama) has no biases, so the RMSNorm weights train instead (stated in the results)

Default budget (2 shared CPU cores, ~30 min): 60 steps × batch 8 (480 train pairs) per trained method, the first
40 dev MRs scored with greedy decoding (40 new tokens at most), fp32.
`--full-size` is the paper's scale (42,061 pairs × 5 epochs, all 547 dev MRs, beam 10): a GPU job.

Writes benchmarks/results/e2e_nlg.{json,md}; the LoRA adapter goes to benchmarks/runs/e2e/lora (not committed).
"""

from __future__ import annotations

import _common as C
from lorakit import LoraConfig

LR = {"lora": 1e-3, "full": 5e-5, "bitfit": 1e-3}


def main() -> None:
    parser = C.base_parser(__doc__)
    C.e2e_arguments(parser, steps=60, eval_limit=40)
    parser.add_argument("--methods", default="base,lora,full,bitfit")
    for method, lr in LR.items():
        parser.add_argument(f"--lr-{method}", type=float, default=lr)
    args = parser.parse_args()
    C.e2e_apply_full_size(args)
    C.set_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    budget = C.e2e_budget(args, runs=len(methods))
    print(f"Budget: {budget}", flush=True)

    rows = {}
    for method in methods:
        lora = LoraConfig(r=4, alpha=32, target_modules=["q_proj", "v_proj"]) if method == "lora" else None
        lr = getattr(args, f"lr_{method}", None) if method != "base" else None
        rows[method] = C.e2e_run(args, method, lr, lora, save_to=C.RUNS / "e2e" / "lora")
        lrs = ", ".join(f"{m} {getattr(args, 'lr_' + m)}" for m in LR if m in methods)
        C.write_e2e("e2e_nlg", args, budget, rows,  # after every method, so a stopped run keeps what it measured
                    "# E2E NLG, SmolLM2-135M-Instruct (dev subset)\n\nBitFit on SmolLM2 trains the RMSNorm weights "
                    f"(the model has no biases). Learning rates: {lrs}.", "E2E dev subset: base, LoRA, full, BitFit")


if __name__ == "__main__":
    main()
