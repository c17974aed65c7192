"""Serving many adapters from one base: N distinct adapters over a batch of 16 requests, three ways.

- mixed batch: all 16 requests decoded together, each row through its own adapter (`lorakit.adapters_per_row`),
  one forward pass per step — what `lorakit serve` does;
- switch per request: the requests one after another, each with its adapter (batch 1);
- merge one at a time: for each adapter, merge it into the base, decode its requests as one batch, unmerge.

All three run the same greedy decoding loop (`lorakit.inference.generate.generate_rows`) and the same prompts (E2E dev meaning
representations), alternating strategies within each repeat; tokens/s counts generated tokens. The table reports
median tokens/s and ratios to the mixed batch, and how many requests got the same tokens as under "switch per request".

    .venv/bin/python benchmarks/multi_adapter.py         # results to benchmarks/results/multi_adapter.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from lorakit.hardware import cpu_info, cpu_line  # noqa: E402
import lorakit as lk
from lorakit.inference.generate import Row, Sampling, encode_prompt, generate_rows

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
STRATEGIES = ("mixed_batch", "switch_per_request", "merge_one_at_a_time")


def read_prompts(data_dir: Path, count: int) -> list[str]:
    path = data_dir / "e2e" / "dev.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found; pass --data-dir pointing at the shared benchmark data.")
    with path.open(encoding="utf-8") as fh:
        mrs = [json.loads(line)["meaning_representation"] for _, line in zip(range(count), fh)]
    return [f"{mr}\nDescription:" for mr in mrs]


def add_random_adapters(model, count: int, rank: int, seed: int) -> list[str]:
    """`count` distinct LoRA adapters (r, W_q and W_v) with small random B, standing in for trained task adapters."""
    names = [f"task{i}" for i in range(count)]
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        lk.add_lora(model, lk.LoraConfig(r=rank, alpha=2 * rank), adapter=name)
        with torch.no_grad():
            for _, layer in lk.lora_layers(model):
                if name in layer.adapters:
                    b = layer.lora_B[name].weight
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
    return names


def run(strategy: str, model, tokenizer, rows: list[Row]) -> tuple[float, list[list[int]]]:
    """Seconds taken and the generated tokens per request (in request order)."""
    start = time.perf_counter()
    if strategy == "mixed_batch":
        outputs = [c.token_ids for c in generate_rows(model, tokenizer, rows)]
    elif strategy == "switch_per_request":
        outputs = [generate_rows(model, tokenizer, [row])[0].token_ids for row in rows]
    else:
        outputs = [[] for _ in rows]
        for name in dict.fromkeys(r.adapter for r in rows):
            index = [i for i, r in enumerate(rows) if r.adapter == name]
            lk.merge(model, name)
            for i, c in zip(index, generate_rows(model, tokenizer, [rows[i] for i in index])):
                outputs[i] = c.token_ids
            lk.unmerge(model)
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=str(ROOT.parent.parent / "shared" / "data"),
                        help="shared benchmark data folder (default: ../shared/data next to the repo)")
    parser.add_argument("--adapters", default="1,4,16", help="numbers of distinct adapters N")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 suffers least from other jobs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "multi_adapter.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(x) for x in args.adapters.split(",")]

    model, tokenizer = lk.load_model(args.model)
    model.eval()
    names = add_random_adapters(model, max(counts), args.rank, args.seed)
    prompts = [encode_prompt(tokenizer, p) for p in read_prompts(Path(args.data_dir), args.requests)]
    sampling = Sampling(max_new_tokens=args.new_tokens)  # greedy

    measured = {n: {s: [] for s in STRATEGIES} for n in counts}
    agreement = {n: {} for n in counts}
    for rep in range(args.repeats):
        for n in counts:
            rows = [Row(ids, names[i % n], sampling) for i, ids in enumerate(prompts)]
            order = STRATEGIES[rep % 3:] + STRATEGIES[:rep % 3]
            outputs = {}
            for s in order:
                seconds, outputs[s] = run(s, model, tokenizer, rows)
                tokens = sum(len(o) for o in outputs[s])
                measured[n][s].append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
                print(f"rep {rep} N={n:2d} {s:20s} {tokens} tokens in {seconds:6.2f} s", flush=True)
            for s in STRATEGIES:  # greedy outputs should not depend on how requests are grouped
                same = sum(a == b for a, b in zip(outputs[s], outputs["switch_per_request"]))
                agreement[n][s] = min(same, agreement[n].get(s, same))

    rows_out = []
    for n in counts:
        mixed = statistics.median(m["tokens_per_s"] for m in measured[n]["mixed_batch"])
        for s in STRATEGIES:
            tps = statistics.median(m["tokens_per_s"] for m in measured[n][s])
            rows_out.append({"adapters": n, "strategy": s, "tokens_per_s": tps, "ratio_to_mixed": tps / mixed,
                             "same_tokens_as_alone": f"{agreement[n][s]}/{args.requests}", "runs": measured[n][s]})
    result = {"benchmark": f"{args.requests} requests, greedy, {args.new_tokens} new tokens each", "model": args.model,
              "lora": {"r": args.rank, "targets": "q_proj,v_proj"}, "repeats": args.repeats, "threads": args.threads,
              "torch": torch.__version__, "load_average_at_end": os.getloadavg(),
              "note": "shared 2-core machine with other jobs running: medians and ratios, not absolute speeds",
              "rows": rows_out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result["cpu"] = cpu_info()
    print(cpu_line())
    lk.fsutil.atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")

    print(f"load average at end: {os.getloadavg()[0]:.2f} (shared machine)")
    print("| N adapters | strategy | tokens/s | ratio to mixed batch | same tokens as alone |")
    print("|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['adapters']} | {r['strategy']} | {r['tokens_per_s']:.1f} | {r['ratio_to_mixed']:.2f} | "
              f"{r['same_tokens_as_alone']} |")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
