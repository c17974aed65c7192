"""lorakit's C++ decode-attention kernel (`lorakit.serve.native`): each row attends over exactly its own cached
length, equal to attention computed in float64; a row's result is bit for bit the same alone and in any batch; bad
inputs are refused with a message; without a working compiler the runner keeps SDPA."""

from __future__ import annotations

import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from lorakit.serve import native
from lorakit.serve.runner import SlotRunner

op = native.decode_attention_op()
needs_kernel = pytest.mark.skipif(op is None, reason="the C++ kernel cannot be built here (no working C++ compiler)")


def caches(slots: int, kv: int, capacity: int, dim: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(slots, kv, capacity, dim, generator=gen).to(dtype)
    values = torch.randn(slots, kv, capacity, dim, generator=gen).to(dtype)
    return keys, values


def reference(q, keys, values, slots, lengths, scale):
    """Attention of each row over its own first `length` positions, in float64."""
    out = []
    for i, (slot, n) in enumerate(zip(slots.tolist(), lengths.tolist())):
        k, v = keys[slot, :, :n].double(), values[slot, :, :n].double()  # (KV, n, D)
        out.append(F.scaled_dot_product_attention(q[i].double(), k, v, scale=scale))  # (KV, G, D)
    return torch.stack(out)


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("kv,groups,dim", [(3, 3, 64), (1, 1, 16), (2, 4, 128), (4, 7, 32)])
def test_each_row_attends_over_its_own_length_as_float64_attention_does(dtype, tol, kv, groups, dim):
    keys, values = caches(6, kv, 80, dim, dtype)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([1, 80, 4, 17, 63, 33])
    slots = torch.tensor([5, 0, 3, 1, 2, 4])  # rows need not sit in slot order
    q = torch.randn(6, kv, groups, dim, generator=gen).to(dtype)
    scale = dim ** -0.5
    got = op(q, keys, values, slots, lengths, scale)
    want = reference(q, keys, values, slots, lengths, scale)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # what lies past a row's length is never read
    keys[:, :, 80 - 1:] = float("nan")
    values[:, :, 80 - 1:] = float("nan")
    short = lengths.clamp(max=79)
    assert torch.isfinite(op(q, keys, values, slots, short, scale).float()).all()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_is_bit_for_bit_the_same_alone_and_in_any_batch(dtype):
    keys, values = caches(16, 3, 300, 64, dtype, seed=2)
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 301, (16,), generator=gen)
    slots = torch.randperm(16, generator=gen)
    q = torch.randn(16, 3, 3, 64, generator=gen).to(dtype)
    batch = op(q, keys, values, slots, lengths, 0.125)
    for i in range(16):
        alone = op(q[i:i + 1], keys, values, slots[i:i + 1], lengths[i:i + 1], 0.125)
        assert torch.equal(alone[0], batch[i]), i
    part = torch.tensor([3, 9, 4])
    assert torch.equal(op(q[part], keys, values, slots[part], lengths[part], 0.125), batch[part])


@needs_kernel
def test_bad_inputs_are_refused_with_what_was_received():
    keys, values = caches(2, 1, 8, 16, torch.float32)
    q = torch.randn(1, 1, 1, 16)
    one = torch.tensor([1])
    with pytest.raises(RuntimeError, match=r"length 9 outside 1\.\.8"):
        op(q, keys, values, torch.tensor([0]), torch.tensor([9]), 1.0)
    with pytest.raises(RuntimeError, match=r"length 0 outside"):
        op(q, keys, values, torch.tensor([0]), torch.tensor([0]), 1.0)
    with pytest.raises(RuntimeError, match=r"slot 2 outside the cache's 2 slots"):
        op(q, keys, values, torch.tensor([2]), one, 1.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 expected"):
        op(q.double(), keys.double(), values.double(), torch.tensor([0]), one, 1.0)
    with pytest.raises(RuntimeError, match="not a multiple of 16"):
        k, v = caches(1, 1, 8, 8, torch.float32)
        op(torch.randn(1, 1, 1, 8), k, v, torch.tensor([0]), one, 1.0)


@needs_kernel
def test_the_kernel_is_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    first = native.build("decode_attention")
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path / "kernels" and native.build("decode_attention") == first
    assert first.stat().st_mtime_ns == stamp and [p.name for p in first.parent.iterdir()] == [first.name]


def test_without_a_working_compiler_the_runner_keeps_sdpa(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with pytest.raises(subprocess.CalledProcessError):
        native.build("decode_attention")
    assert not list((tmp_path / "kernels").iterdir())  # nothing half-built left behind
    monkeypatch.setenv("LORAKIT_NATIVE", "0")
    native._op.cache_clear()
    try:
        assert native.decode_attention_op() is None
        model = tiny_llama(seed=1)
        runner = SlotRunner(model, 2)
        assert runner.attend is None
        runner.ensure_capacity(16)
        assert runner.prefill(0, [3, 4, 5], 0, None, True).shape[-1] == model.config.vocab_size
        assert runner.decode([0], [7], [3], [None]).shape == (1, model.config.vocab_size)
    finally:
        monkeypatch.delenv("LORAKIT_NATIVE")
        native._op.cache_clear()


@needs_kernel
def test_the_runner_decodes_through_the_kernel_as_through_sdpa():
    """Greedy tokens of rows of different lengths agree between the kernel and SDPA over whole KV blocks."""
    model = tiny_llama(seed=4, hidden_size=64)  # head size 16: the kernel takes multiples of 16 (8 keeps SDPA)
    assert SlotRunner(tiny_llama(seed=4), 1).attend is None
    prompts = [[5, 17, 33, 2, 81, 40, 7], [60, 61, 3], [12, 90, 44, 44, 8, 19, 70, 71, 72, 1, 2, 9, 9, 30, 31, 4, 5]]

    def tokens(runner):
        runner.ensure_capacity(40)
        outs = [[int(runner.prefill(i, p, 0, None, True).argmax())] for i, p in enumerate(prompts)]
        for step in range(12):
            logits = runner.decode([0, 1, 2], [o[-1] for o in outs], [len(p) + step for p in prompts], [None] * 3)
            for o, row in zip(outs, logits):
                o.append(int(row.argmax()))
        return outs

    fast, slow = SlotRunner(model, 3), SlotRunner(model, 3, native_attention=False)
    assert fast.attend is not None and slow.attend is None
    assert tokens(fast) == tokens(slow)


rows_op = native.linear_rows_op()
needs_rows_kernel = pytest.mark.skipif(rows_op is None, reason="the C++ kernel cannot be built here")


@needs_rows_kernel
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_linear_rows_is_the_linears_outputs_side_by_side(rows):
    gen = torch.Generator().manual_seed(rows)
    weights = [torch.randn(n, 96, generator=gen) for n in (64, 24, 7, 16)]  # whole and partial 16-row blocks
    x = torch.randn(rows, 96, generator=gen)
    got = rows_op(x, weights)
    want = torch.cat([x.double() @ w.double().T for w in weights], -1)
    assert got.shape == (rows, 111) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


@needs_rows_kernel
def test_linear_rows_refuses_what_it_cannot_multiply():
    w = torch.randn(8, 32)
    with pytest.raises(RuntimeError, match="float32 CPU matrix"):
        rows_op(torch.randn(1, 32).double(), [w])
    with pytest.raises(RuntimeError, match="not a multiple of 16"):
        rows_op(torch.randn(1, 24), [torch.randn(8, 24)])
    with pytest.raises(RuntimeError, match=r"contiguous float32 CPU matrices \(out, 32\)"):
        rows_op(torch.randn(1, 32), [w, torch.randn(32, 8).T])


@needs_rows_kernel
def test_a_packed_fp32_linear_runs_one_or_two_rows_through_the_kernel():
    from torch import nn

    from lorakit.serve import kernels

    if not kernels.packing_works(torch.float32):
        pytest.skip("oneDNN cannot pack fp32 here")
    torch.manual_seed(0)
    layers = [nn.Linear(64, 48, bias=True), nn.Linear(64, 32, bias=False)]
    packed = kernels.pack(layers)
    assert packed.few_rows is not None
    for rows in (1, 2, 3):
        x = torch.randn(rows, 1, 64)
        want = torch.cat([l(x) for l in layers], -1)
        torch.testing.assert_close(packed(x), want, rtol=1e-5, atol=1e-5)
    assert kernels.pack([nn.Linear(64, 48).to(torch.bfloat16)]).few_rows is None  # bf16 rows stay oneDNN's
