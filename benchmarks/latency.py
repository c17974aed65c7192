"""The LoRA paper's Table 1 on our default model: forward latency at batch 1 for a few sequence lengths.

Variants: the base model, LoRA merged (plain weights again), LoRA unmerged (extra low-rank path), and adapter layers
(Houlsby bottlenecks after attention and MLP, benchmarks/baselines.py). All four live in memory at once and are timed
in turn (the order rotates each repeat) so that load from other processes hits them alike; the table gives the median
of the per-repeat ratios to the base, plus median milliseconds.

    .venv/bin/python benchmarks/latency.py               # results to benchmarks/results/latency.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from lorakit.hardware import cpu_info, cpu_line  # noqa: E402
import lorakit as lk
from baselines import add_adapter_layers

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("base", "lora_merged", "lora_unmerged", "adapter_layers")


def build_variants(model_name: str, rank: int, bottleneck: int, seed: int):
    base, _ = lk.load_model(model_name)
    base.eval()
    unmerged = lk.add_lora(copy.deepcopy(base), lk.LoraConfig(r=rank, alpha=2 * rank))  # W_q, W_v as in the paper
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking adapter: B non-zero
        for _, layer in lk.lora_layers(unmerged):
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
    merged = lk.unload(copy.deepcopy(unmerged))  # merged and unwrapped: the same modules as the base
    adapters = copy.deepcopy(base)
    adapter_params = add_adapter_layers(adapters, bottleneck)
    lora_params = lk.trainable_parameters(unmerged).trainable
    return {"base": base, "lora_merged": merged, "lora_unmerged": unmerged, "adapter_layers": adapters}, \
        {"lora": lora_params, "adapter_layers": adapter_params}


@torch.no_grad()
def forward_ms(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-lens", default="16,64,256", help="comma-separated sequence lengths")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--bottleneck", type=int, default=8, help="adapter-layer bottleneck width")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 suffers least from other jobs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "latency.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seq_lens = [int(x) for x in args.seq_lens.split(",")]

    models, params = build_variants(args.model, args.rank, args.bottleneck, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = models["base"].config.vocab_size
    inputs = {n: torch.randint(0, vocab, (1, n), generator=gen) for n in seq_lens}
    with torch.no_grad():  # the merged model must compute what base + unmerged adapter computes
        check = inputs[seq_lens[0]]
        merge_diff = float((models["lora_merged"](input_ids=check).logits
                            - models["lora_unmerged"](input_ids=check).logits).abs().max())

    times = {n: {v: [] for v in VARIANTS} for n in seq_lens}
    for rep in range(args.warmup + args.repeats):
        order = VARIANTS[rep % 4:] + VARIANTS[:rep % 4]
        for n in seq_lens:
            for v in order:
                ms = forward_ms(models[v], inputs[n])
                if rep >= args.warmup:
                    times[n][v].append(ms)

    rows = []
    for n in seq_lens:
        base = times[n]["base"]
        for v in VARIANTS:
            ratios = [t / b for t, b in zip(times[n][v], base)]  # paired with the base timing of the same repeat
            rows.append({"seq_len": n, "variant": v, "median_ms": statistics.median(times[n][v]),
                         "ratio_to_base": statistics.median(ratios),
                         "ratio_of_fastest": min(times[n][v]) / min(base),  # other jobs only ever add time
                         "ratio_q1_q3": [statistics.quantiles(ratios, n=4)[0], statistics.quantiles(ratios, n=4)[2]],
                         "times_ms": times[n][v]})
    result = {"benchmark": "forward latency, batch 1 (LoRA paper Table 1 style)", "model": args.model,
              "lora": {"r": args.rank, "targets": "q_proj,v_proj", "params": params["lora"]},
              "adapter_layers": {"bottleneck": args.bottleneck, "params": params["adapter_layers"]},
              "merged_vs_unmerged_max_logit_diff": merge_diff, "repeats": args.repeats, "threads": args.threads,
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "load_average_at_end": os.getloadavg(),
              "note": "shared 2-core machine, other jobs running: medians of paired ratios, not absolute speeds",
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result["cpu"] = cpu_info()
    print(cpu_line())
    lk.fsutil.atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")

    print(f"LoRA r={args.rank} q,v: {params['lora']:,} params; adapter layers d={args.bottleneck}: "
          f"{params['adapter_layers']:,} params; merged vs unmerged max logit diff {merge_diff:.2g}")
    print(f"load average at end: {os.getloadavg()[0]:.2f} (shared machine)")
    print("median ms (median of paired ratios to base; ratio of fastest runs)")
    print("| seq len | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for n in seq_lens:
        cells = [f"{r['median_ms']:.1f} ms ({r['ratio_to_base']:.3f}×; {r['ratio_of_fastest']:.3f}×)"
                 for r in rows if r["seq_len"] == n]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
