"""One rank of a distributed test run (launched by tests/test_distributed.py through torchrun): `lorakit train`
plus a hook that makes one rank fail.

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/dist_worker.py CONFIG.yaml [--fail-at RANK:STEP]
    python tests/dist_worker.py CONFIG.yaml            # the single-process reference
    ... --resume RUN_DIR                               # continue a run (its saved config)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from lorakit.train import TrainConfig, train


class InjectedFailure(RuntimeError):
    """Stands for a rank dying mid-run (out of memory, a hardware fault ...)."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?")
    parser.add_argument("--resume")
    parser.add_argument("--fail-at", help="RANK:STEP: raise on that rank after that optimizer step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    on_step = None
    if args.fail_at:
        fail_rank, fail_step = map(int, args.fail_at.split(":"))

        def on_step(step, record):
            if step == fail_step and int(os.environ.get("RANK", "0")) == fail_rank:
                raise InjectedFailure(f"injected failure on rank {fail_rank} after step {step}")

    config = TrainConfig.from_yaml(args.config) if args.config else None
    train(config, resume=args.resume, on_step=on_step)  # loads config.model (a folder) as `lorakit train` does
    from lorakit.train import distributed

    distributed.teardown(True)


if __name__ == "__main__":
    main()
