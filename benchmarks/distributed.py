"""One process x 2 threads vs 2 processes (DDP or FSDP2, gloo) x 1 thread on the default model: step time and peak RSS per rank.

    PYTHONPATH=src python benchmarks/distributed.py --steps 6 --batch 8 --seq 128

Both runs train the same LoRA (r=8, W_q and W_v) on the same global batch (B x T tokens, synthetic text truncated to
T tokens, so every step sees exactly B*T tokens) through `lorakit train`. The step time is the median over steps 2..N
(step 1 includes warm-up). Writes benchmarks/results/distributed.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from lorakit.hardware import cpu_info, cpu_line  # noqa: E402
WORDS = "the a cat dog bird fish tree house car road city river sky sun moon star red blue green big small".split()


def run(name: str, nproc: int, threads: int, args: argparse.Namespace, data: Path, work: Path,
        mode: str = "ddp") -> dict:
    out = work / mode / str(nproc)
    cmd = [sys.executable, "-m", "lorakit", "train", "--model", args.model, "--train-file", str(data), "--format",
           "text", "--max-length", str(args.seq), "--batch-size", str(args.batch), "--max-steps", str(args.steps),
           "--output-dir", str(out), "--set", "tensorboard=false", "--set", "progress=false", "--nproc", str(nproc)]
    if nproc > 1:
        cmd += ["--distributed", mode]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = args.batch * args.seq
    step_s = [tokens / r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    summary = json.loads((out / "summary.json").read_text())
    peaks = summary.get("peak memory per rank (MB)", str(summary["peak memory (MB)"]))
    return {"name": name, "processes": nproc, "threads_per_process": threads, "median_step_s": statistics.median(step_s),
            "step_s": step_s, "peak_rss_mb_per_rank": [float(p) for p in str(peaks).split()],
            "final_loss": records[-1]["loss"], "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="global micro-batch")
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorakit-dist-"))
    try:
        rng = random.Random(0)
        data = work / "text.jsonl"
        data.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(3 * args.seq))}) + "\n"
                                for _ in range(args.batch * args.steps)))
        load = os.getloadavg()
        rows = [run("1 process x 2 threads", 1, 2, args, data, work),
                run("2 processes (DDP) x 1 thread", 2, 1, args, data, work),
                run("2 processes (FSDP2) x 1 thread", 2, 1, args, data, work, "fsdp")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"model": args.model, "steps": args.steps, "global_batch": args.batch, "seq": args.seq,
              "load_average_at_start": load, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    report["cpu"] = cpu_info()
    print(cpu_line())
    (RESULTS / "distributed.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.model}, global batch {args.batch} x {args.seq} tokens, {args.steps} steps, load average at start "
          f"{load[0]:.2f}\n")
    print("| setup | median step (s) | peak RSS per rank (MB) | final loss |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['median_step_s']:.2f} | {' / '.join(f'{p:.0f}' for p in r['peak_rss_mb_per_rank'])} "
              f"| {r['final_loss']:.4f} |")


if __name__ == "__main__":
    main()
