"""lorakit's own C++ CPU kernels (`csrc/`), compiled on first use with the machine's C++ compiler and loaded as torch
operators (`torch.ops.lorakit.*`).

`decode_attention` (csrc/decode_attention.cpp): the decode rows of a serving step attend over exactly their own
cached lengths. SDPA's CPU kernel is made for long queries: given one token per row it ran at ~20 GFLOP/s (96 rows,
~380 positions, SmolLM2's 3 KV heads × 3 query heads each: 3.7–5 ms per layer in bf16, 44% of a bf16 decode step on a
2-core AVX512 EPYC), and it reads every row to the batch's longest length. This kernel reads each row only to its own
length, reads a KV head once for all the query heads that share it, and computes a row by the same instructions
whatever else is in the batch, so a row's attention is bit for bit the same alone and in any batch (fp32 and bf16).

`linear_rows` (csrc/linear_rows.cpp): fp32 products of one or two rows (a batch-1 decode step) by the modules' own
weights, 16 output rows at a time: SmolLM2-135M's weights streamed at ~31 GB/s against ~21 GB/s through oneDNN's
packed kernel (batch-1 fp32 step 36 -> 28 ms on a 2-core EPYC); used by `kernels.PackedLinear`.

Each shared object is built once per source, torch version and CPU (`-O3 -march=native`, OpenMP from torch's own
runtime) into `$LORAKIT_CACHE` (default `~/.cache/lorakit`)/kernels and reused from there; building takes ~20 s.
Where no compiler works (or `LORAKIT_NATIVE=0`) the `*_op()` functions return None and the runner keeps SDPA
and oneDNN.
`python -m lorakit.serve.native` builds it ahead of time (`make setup` does) and says where it is.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

SOURCES = Path(__file__).parent / "csrc"
KERNELS = ("decode_attention", "linear_rows")


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit") / "kernels"


def _cpu_signature() -> str:
    """The CPU the code is compiled for (-march=native): model name and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [l for l in info.splitlines() if l.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _compile_command(source: Path, output: Path) -> list[str]:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, "-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(source), "-o", str(output),
            *[f"-L{p}" for p in libs], "-lc10", "-ltorch_cpu", *[f"-Wl,-rpath,{p}" for p in libs]]


def build(name: str) -> Path:
    """The compiled shared object of csrc/<name>.cpp, built now if this source, torch and CPU have none yet.
    Raises OSError or subprocess.CalledProcessError when it cannot be built."""
    source = SOURCES / f"{name}.cpp"
    headers = [h.read_text() for h in sorted(SOURCES.glob("*.h"))]
    key = hashlib.sha256("\n".join([source.read_text(), *headers, torch.__version__, sys.version, _cpu_signature(),
                                    " ".join(_compile_command(Path("s"), Path("o"))[1:])]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: never half a library
        built = Path(tmp) / target.name
        subprocess.run(_compile_command(source, built), check=True, capture_output=True, text=True)
        os.replace(built, target)
    return target


@functools.lru_cache(maxsize=None)
def _op(name: str) -> Callable | None:
    """torch.ops.lorakit.<name>, built and loaded on first use; None where it cannot be built here."""
    if os.environ.get("LORAKIT_NATIVE", "1") == "0":
        return None
    try:
        if not hasattr(torch.ops.lorakit, name):
            torch.ops.load_library(str(build(name)))
        return getattr(torch.ops.lorakit, name)
    except (OSError, RuntimeError, subprocess.CalledProcessError):
        return None


def decode_attention_op() -> Callable | None:
    """torch.ops.lorakit.decode_attention(q (B, KV, G, D), keys, values (S, KV, C, D), slots (B,), lengths (B,),
    scale) -> (B, KV, G, D), or None where it cannot be built here (the caller keeps SDPA)."""
    return _op("decode_attention")


def linear_rows_op() -> Callable | None:
    """torch.ops.lorakit.linear_rows(x (M, in) fp32, [W_i (out_i, in) fp32]) -> (M, Σ out_i), or None where it
    cannot be built here (the caller keeps oneDNN)."""
    return _op("linear_rows")


def main() -> None:
    """Build the kernels now (instead of at the first serving step) and say where they are."""
    for name in KERNELS:
        try:
            path = build(name)
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"lorakit: the C++ kernel {name} did not compile; serving falls back to torch's "
                             f"operators.\n{' '.join(e.cmd)}\n{e.stderr[-3000:]}") from None
        except OSError as e:
            raise SystemExit(f"lorakit: no C++ compiler ({e}); serving falls back to torch's operators.") from None
        print(f"lorakit: {name} kernel at {path}")


if __name__ == "__main__":
    main()
