"""Process memory on CPU: huge pages for PyTorch's large tensors, oneDNN's primitive cache, glibc's mmap threshold
and trimming its heaps.

Huge pages (on by default from `import lorakit`): PyTorch's CPU allocator aligns tensors of 2 MB and more to 2 MB and
asks the kernel for transparent huge pages for them when the environment variable THP_MEM_ALLOC_ENABLE=1 is set before
its first allocation. On SmolLM2-135M (batch 8 × 128, LoRA r=8 on W_q,W_v, 1 thread) that lowered the peak RSS of a
training step from ~2.52 to ~2.07 GB at unchanged step time (`benchmarks/train_speed.py`, variants lorakit and
lk-plain). `import lorakit` sets it unless the variable is already set (THP_MEM_ALLOC_ENABLE=0 turns it off); it has
no effect if tensors were created before lorakit was imported, nor where the kernel has THP disabled.

mmap threshold (opt-in, `TrainConfig.malloc_mmap_threshold_kb`):

A training step allocates and frees thousands of activation-sized blocks (0.1-10 MB). glibc serves blocks above its
mmap threshold with mmap and returns them on free, but it raises that threshold on its own to the size of the
largest block freed so far (up to 32 MB), after which every activation lands in the heap arenas, where freed memory
is kept and fragments. Fixing the threshold stops that: on SmolLM2-135M (batch 8 × 128, LoRA r=8 on W_q,W_v) the
peak RSS of a training step drops from ~2.5 to ~1.77 GB at 128 KiB, but every activation is then a fresh mmap whose
pages the kernel faults in and zeroes, which made steps ~20-50% slower on this 2-core CPU. Hence opt-in: the leanest
setting, for when memory is what runs out. GPU memory is untouched; other C libraries (musl, macOS, Windows) are left
alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's limit on 64-bit systems (HEAP_MAX_SIZE / 2)


THP_ENV = "THP_MEM_ALLOC_ENABLE"  # read once by PyTorch's CPU allocator (c10/core/impl/alloc_cpu.cpp)


def enable_huge_pages() -> bool:
    """Ask PyTorch's CPU allocator for transparent huge pages (tensors of 2 MB and more), unless the user chose.

    Returns True when the variable is (now) "1". Takes effect only if PyTorch has not allocated a CPU tensor yet.
    """
    os.environ.setdefault(THP_ENV, "1")
    return os.environ[THP_ENV] == "1"


def set_mmap_threshold(nbytes: int) -> bool:
    """Make glibc serve every allocation of at least `nbytes` with mmap, and stop it moving that threshold.

    Returns True when applied; False where the C library is not glibc (nothing changes then). The setting is
    process-wide and lasts until the process ends or the function is called again.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 < nbytes <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"mmap threshold must be an integer number of bytes in 1..{MAX_MMAP_THRESHOLD}, got {nbytes!r}")
    libc = _glibc()
    return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes)) if libc is not None else False


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"  # read once, when oneDNN first caches a primitive


def limit_onednn_cache(entries: int = 64) -> bool:
    """Keep at most `entries` oneDNN primitives (PyTorch's bf16 matmuls on x86 CPUs), unless the user chose.

    oneDNN caches a compiled primitive per operation shape, 1024 by default. Training batches of varying length give
    every matmul a new shape each step, so over an epoch the cache fills with primitives that are never used again:
    on SmolLM2-135M (E2E, batch 8, 1 epoch, bf16 base) the peak RSS grew by ~270 MB that way (2.06 -> 1.79 GiB with
    64 entries, at the same step time: a step's own shapes, ~20, stay cached for its 30 layers). Returns True when
    the capacity is (now) `entries`; takes effect only if oneDNN has not cached a primitive yet in this process.
    """
    os.environ.setdefault(ONEDNN_CACHE_ENV, str(entries))
    return os.environ[ONEDNN_CACHE_ENV] == str(entries)


def trim_heap() -> bool:
    """Hand the free memory glibc keeps in its heaps back to the OS (malloc_trim(0): every arena, free pages inside
    the heap included, not only its top). Returns True when memory was released; False where nothing was, or the C
    library is not glibc (nothing changes then).

    A training step frees its activations at the end of backward, but glibc keeps the freed blocks for reuse, and
    batches of other shapes fit them badly: over an epoch the heap grows past the largest step's live set (see the
    module docstring). Trimming after each step returns those pages, so each step's peak is its own live memory.
    """
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def _glibc():
    """The C library when it is glibc (malloc_trim, mallopt), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    import resource  # POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 ** 2 if platform.system() == "Darwin" else peak / 1024
