"""What the machine is: the CPU's name, the kernels PyTorch picked for it and the instruction sets that change the
numbers (AVX2, AVX-512, AVX512-BF16, AMX). Benchmarks put this in their header and JSON, because results differ by CPU.
"""

from __future__ import annotations

import math
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


@lru_cache(maxsize=None)
def bf16_speedup(device: str = "cpu") -> float:
    """How much faster a bf16 matmul runs than an fp32 one on `device`, measured now (a few milliseconds).

    Where bf16 is emulated (AVX2-only CPUs: ~70x slower) this is far below 1; with AVX512-BF16 about 2, with AMX
    4-8; on CUDA with bf16 support it is taken as the hardware reports it. The best of eight interleaved repetitions of
    a 128 x 512 x 512 product (~1 ms of work on a quiet CPU), so a busy machine rarely flips the answer.
    """
    import time

    dev = torch.device(device)
    if dev.type == "cuda":
        return 2.0 if torch.cuda.is_bf16_supported() else 0.0
    if dev.type != "cpu":
        return 0.0  # mps and others: keep fp32, the safe choice
    gen = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(128, 512, generator=gen), torch.randn(512, 512, generator=gen)
    pairs = {torch.float32: (a32, b32), torch.bfloat16: (a32.bfloat16(), b32.bfloat16())}
    best = dict.fromkeys(pairs, math.inf)
    for dtype, (a, b) in pairs.items():
        torch.mm(a, b)  # warm-up: first-call kernel selection and packing
    for _ in range(8):  # interleaved, so a burst of load elsewhere hits both dtypes alike
        for dtype, (a, b) in pairs.items():
            t0 = time.perf_counter()
            torch.mm(a, b)
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def auto_base_dtype(device: str = "cpu") -> tuple[str, str]:
    """("bf16" | "fp32", why): bf16 for the frozen base where this device multiplies bf16 clearly faster than fp32."""
    speedup = bf16_speedup(device)
    if speedup >= 1.3:
        return "bf16", f"bf16 matmul measured {speedup:.1f}x fp32 on this {device}"
    return "fp32", f"bf16 matmul measured {speedup:.2f}x fp32 on this {device} (no fast bf16)"
