"""Kill -9 a tiny training run at random moments many times in a row, resuming after each; the final adapter must equal
an uninterrupted run's exactly. Prints a table and writes benchmarks/results/faults.json.

    PYTHONPATH=src python benchmarks/faults.py --kills 25
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT.parent / "src"))

import fault_worker as fw  # noqa: E402
from lorakit.hardware import cpu_info, cpu_line  # noqa: E402
from lorakit.fsutil import atomic_write_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (a checkpoint after every one)")
    parser.add_argument("--window", type=float, default=4.0,
                        help="kill timing scale in seconds (see tests/fault_worker.py: kill_until_done)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = fw.write_data(tmp / "train.jsonl")
        ref = fw.run(tmp / "ref", data, args.steps)
        started = time.perf_counter()
        counts = fw.kill_until_done(tmp / "killed", data, args.steps, args.kills, args.window, args.seed)
        wall = time.perf_counter() - started
        A = load_file(str(ref.adapter_dir / "adapter_model.safetensors"))
        B = load_file(str(tmp / "killed" / "adapter" / "adapter_model.safetensors"))
        equal = A.keys() == B.keys() and all(torch.equal(A[k], B[k]) for k in A)
    result = {**counts, "steps": args.steps, "window_s": args.window, "seed": args.seed,
              "final_adapter_equal": equal, "wall_s": round(wall, 1)}
    print("| kills injected | kills landed (process still running) | runs | final adapter == uninterrupted | wall s |")
    print("|---|---|---|---|---|")
    print(f"| {counts['kills_injected']} | {counts['kills_landed']} | {counts['runs']} | {equal} | {wall:.0f} |")
    result["cpu"] = cpu_info()
    print(cpu_line())
    atomic_write_text(Path(args.out) / "faults.json", json.dumps(result, indent=2) + "\n")
    if not equal:
        raise SystemExit("FAILED: the resumed adapter differs from the uninterrupted run")


if __name__ == "__main__":
    main()
