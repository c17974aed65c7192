"""What the machine is: the CPU's name, the kernels PyTorch picked for it and the instruction sets that change the
numbers (AVX2, AVX-512, AVX512-BF16, AMX). Benchmarks put this in their header and JSON, because results differ by CPU.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any

import torch

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """{"model", "capability", "flags", "cores", "threads", "torch", "machine"} of this process's CPU."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the name platform gives, no flags
        pass
    return {
        "model": model,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [f for f in FLAGS if f in flags],
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def cpu_line() -> str:
    """One line for a benchmark header, e.g. `CPU: AMD EPYC (torch kernels AVX512; avx2 avx512f avx512_bf16), 2 cores`."""
    info = cpu_info()
    flags = " ".join(info["flags"]) or "no AVX flags read"
    return (f"CPU: {info['model']} (torch kernels {info['capability']}; {flags}), {info['cores']} cores, "
            f"{torch.get_num_threads()} threads, torch {info['torch']}")
