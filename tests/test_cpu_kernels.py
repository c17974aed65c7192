"""The suite must hold on every CPU this project meets (AVX2-only, AVX-512 with BF16, AMX). The main run uses the
kernels PyTorch picks for this CPU; on a newer CPU this test re-runs the numerically sensitive tests on the AVX2
kernels (ATEN_CPU_CAPABILITY=avx2), so one machine covers both kernel families."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.hardware import cpu_info

TESTS = Path(__file__).parent
# Exact-equality LoRA math (merge/unmerge/disable), NaN handling and quantization: where kernels differ.
SENSITIVE = ["lora/test_layers.py", "train/test_training.py::test_nan_loss_stops_with_message_and_keeps_last_checkpoint",
             "train/test_training.py::test_nan_gradient_with_finite_loss_is_never_applied_and_stops",
             "models/test_quantization.py::test_layers_too_narrow_for_nf4_stay_full_precision_with_one_warning_on_every_cpu",
             "models/test_quantization.py::test_quantized_base_is_close_to_fp32_trains_lora_only_and_disabled_is_the_quantized_"
             "base",
             "train/test_losses.py"]


def test_cpu_info_names_the_cpu_and_its_kernels():
    info = cpu_info()
    assert info["model"] and info["capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(info["flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
                    reason="this CPU already runs the AVX2 (or only) kernels: the main run covers them")
def test_sensitive_tests_pass_on_the_avx2_kernels_too():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "AVX2"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          *[str(TESTS / t) for t in SENSITIVE]], env=env, capture_output=True, text=True, cwd=TESTS.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
