"""lorakit.memory: the glibc mmap threshold, and what it does to memory kept after activations are freed."""

import platform
import subprocess
import sys

import pytest

from lorakit.errors import LorakitError
from lorakit.memory import MAX_MMAP_THRESHOLD, peak_rss_mb, set_mmap_threshold
from lorakit.train import TrainConfig

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Free a 20 MB block (glibc then raises its mmap threshold to 20 MB), then allocate 96 blocks of 1 MiB, touch them and
# free all but the last (which pins the heap top): print how many MB the process kept.
KEPT = """
import sys, torch
from lorakit.memory import set_mmap_threshold
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) / 1024
if sys.argv[1] == 'tuned':
    assert set_mmap_threshold(128 * 1024)
big = torch.ones(5 * 1024 * 1024); del big
before = rss()
blocks = [torch.ones(256 * 1024) for _ in range(96)]
del blocks[:-1]
print(rss() - before)
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_fixed_threshold_returns_freed_activations_to_the_os():
    kept = {mode: float(subprocess.run([sys.executable, "-c", KEPT, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "tuned")}
    assert kept["default"] > 60, kept  # glibc's moving threshold keeps ~95 MB of freed 1 MiB blocks
    assert kept["tuned"] < 8, kept  # only the one live block


def test_bad_thresholds_are_refused():
    for bad in (0, -1, MAX_MMAP_THRESHOLD + 1, 1.5, True, "128k"):
        with pytest.raises(ValueError, match="mmap threshold"):
            set_mmap_threshold(bad)
    with pytest.raises(LorakitError, match="malloc_mmap_threshold_kb must be an integer in 0..32768"):
        TrainConfig(malloc_mmap_threshold_kb=-5)
    assert TrainConfig(malloc_mmap_threshold_kb=0).malloc_mmap_threshold_kb == 0


def test_peak_rss_is_in_megabytes():
    assert 20 < peak_rss_mb() < 100_000


THP_MODE = open("/sys/kernel/mm/transparent_hugepage/enabled").read() if GLIBC else "[never]"
HUGE = """
import lorakit, torch
x = torch.ones(16 * 1024 * 1024)  # 64 MB
print(sum(int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')) // 1024)
"""


@pytest.mark.skipif("[never]" in THP_MODE, reason="transparent huge pages are disabled in this kernel")
def test_import_lorakit_turns_on_huge_pages_unless_the_user_chose():
    import os

    def huge_mb(env: dict) -> int:
        env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
        return int(subprocess.run([sys.executable, "-c", HUGE], capture_output=True, text=True, check=True,
                                  env=env).stdout)

    assert huge_mb({"THP_MEM_ALLOC_ENABLE": None}) >= 32  # the 64 MB tensor sits (mostly) in 2 MB pages
    assert huge_mb({"THP_MEM_ALLOC_ENABLE": "0"}) == 0  # the user's choice wins


def test_mmap_threshold_is_opt_in():
    assert TrainConfig().malloc_mmap_threshold_kb == 0
