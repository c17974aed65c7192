"""Memory savers of a training run keep its numbers: a bf16 base cast weight by weight from the mapped file trains
exactly as the fp32 model cast at once; the fused loss under no_grad (validation) is the same loss; malloc_trim changes
nothing but memory; train() limits oneDNN's primitive cache unless the user chose."""

from __future__ import annotations

import os

import torch

import lorakit as lk
from lorakit.lora.adapter_io import read_adapter_weights
from lorakit.train import train
from tiny_run import config, data_file, one_thread  # noqa: F401  (fixtures)
from tiny_text import save_tiny_lm


def test_a_bf16_base_loaded_by_train_trains_exactly_as_the_fp32_load_cast_afterwards(tmp_path, data_file):
    folder = str(save_tiny_lm(tmp_path / "tiny"))
    # train() loads the model itself: its frozen weights are cast from the mapped file (cast_mapped_weights)
    lean = train(config(tmp_path / "lean", data_file, model=folder, base_dtype="bf16", optim__max_steps=4,
                        save_every=0))
    # the old way: the fp32 model with its adapter handed to train(), which casts the whole base (cast_base)
    cfg = config(tmp_path / "old", data_file, model=folder, base_dtype="bf16", optim__max_steps=4, save_every=0)
    model, tokenizer = lk.load_model(folder, attn_implementation="eager")  # as train() loads for a bf16 base
    torch.manual_seed(cfg.seed)
    lk.add_lora(model, cfg.lora)
    old = train(cfg, model, tokenizer)
    assert [r["loss"] for r in lean.history if "loss" in r] == [r["loss"] for r in old.history if "loss" in r]
    assert lean.metrics == old.metrics
    a, b = (read_adapter_weights(r.adapter_dir / "adapter_model.safetensors") for r in (lean, old))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_malloc_trim_after_each_step_changes_no_number(tmp_path, data_file, monkeypatch):
    import lorakit.train.loop as loop
    from tiny_run import lora_model
    from tiny_text import tiny_tokenizer

    trims = []
    monkeypatch.setattr(loop, "trim_heap", lambda: trims.append(1) or True)
    runs = {}
    for trim in (False, True):
        result = train(config(tmp_path / f"t{trim}", data_file, base_dtype="fp32", malloc_trim=trim,
                              optim__max_steps=3, save_every=0), lora_model(dropout=0.0), tiny_tokenizer())
        runs[trim] = [r["loss"] for r in result.history if "loss" in r]
    assert runs[True] == runs[False] and len(trims) == 3


def test_trim_heap_returns_memory_on_glibc():
    import platform

    from lorakit.memory import trim_heap

    blocks = [bytearray(64 * 1024) for _ in range(512)]  # 32 MB in the heap (below glibc's mmap threshold)
    kept = blocks[1::2]
    del blocks  # every other block freed: free pages inside the heap, which only a trim hands back
    assert trim_heap() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    del kept


def test_the_fused_loss_under_no_grad_is_the_same_loss_without_gradient_work():
    from lorakit.train.losses import fused_linear_cross_entropy

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        hidden = torch.randn(50, 16, dtype=dtype, requires_grad=True)
        weight = torch.randn(300, 16, dtype=dtype)
        targets = torch.randint(0, 300, (50,))
        trained = fused_linear_cross_entropy(hidden, weight, targets, chunk=16)
        with torch.no_grad():
            evaluated = fused_linear_cross_entropy(hidden, weight, targets, chunk=16)
        assert torch.equal(trained.detach(), evaluated) and evaluated.grad_fn is None


def test_train_limits_the_onednn_cache_unless_the_user_chose(tmp_path, data_file, monkeypatch):
    from lorakit.memory import ONEDNN_CACHE_ENV, limit_onednn_cache
    from tiny_run import lora_model
    from tiny_text import tiny_tokenizer

    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    train(config(tmp_path / "c", data_file, base_dtype="fp32", optim__max_steps=1, save_every=0), lora_model(),
          tiny_tokenizer())
    assert os.environ[ONEDNN_CACHE_ENV] == "64"
    monkeypatch.setenv(ONEDNN_CACHE_ENV, "5")
    assert limit_onednn_cache() is False and os.environ[ONEDNN_CACHE_ENV] == "5"
