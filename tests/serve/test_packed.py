"""The continuous runner's packed base weights (`lorakit.serve.kernels`): the packed linear computes what F.linear
computes, every row of a mixed batch (plain LoRA, DoRA, the base) decodes greedily as it does alone, a changed base
weight is repacked, and where packing is unavailable the runner runs plain F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from conftest import randomize_lora_B, tiny_llama
from lorakit.serve import kernels
from lorakit.serve.runner import Chunk, Decode, SlotRunner
from lorakit.serve.runner import SlotRunner as Runner

needs_packing = pytest.mark.skipif(not kernels.packing_works(torch.float32),
                                   reason="oneDNN packed linear unavailable in this torch build/CPU")
PROMPTS = [[5, 17, 33, 2, 81, 40, 7], [60, 61, 3], [12, 90, 44, 44, 8, 19, 70, 71, 72, 1, 2], [9, 9, 30, 31]]


@needs_packing
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_linear_equals_f_linear(dtype, tol):
    if not kernels.packing_works(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} here")
    torch.manual_seed(0)
    layers = [nn.Linear(96, n, bias=bias).to(dtype) for n, bias in ((64, False), (32, True), (48, False))]
    packed = kernels.pack(layers)
    assert packed is not None and packed.sizes == [64, 32, 48]
    for shape in ((1, 96), (5, 96), (2, 3, 96), (1, 300, 96)):
        x = torch.randn(shape).to(dtype)
        want = torch.cat([F.linear(x, l.weight, l.bias) for l in layers], -1)
        got = packed(x)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_pack_refuses_what_it_cannot_pack():
    assert kernels.pack([nn.Linear(8, 8).double()]) is None  # a dtype oneDNN does not pack
    assert kernels.pack([nn.Linear(8, 8), nn.Linear(16, 8)]) is None  # different inputs
    assert kernels.pack([]) is None


def model_with_adapters():
    model = tiny_llama(seed=3)
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), adapter="lora")
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
                adapter="dora")
    lk.add_lora(model, lk.LoraConfig(r=2, alpha=8, target_modules=["gate_proj", "down_proj", "v_proj"]),
                adapter="mlp")
    for seed, name in enumerate(("lora", "dora", "mlp"), 1):
        randomize_lora_B(model, name, std=0.5, seed=seed)
    return model


def greedy(runner: SlotRunner, rows: list[tuple[list[int], str | None]], steps: int) -> list[list[int]]:
    """Prefill each row alone into its slot, then decode all rows together `steps` tokens, greedily."""
    runner.ensure_capacity(max(len(p) for p, _ in rows) + steps + 1)
    runner.refresh_adapters(0)
    runner.refresh_weights()
    out = [[int(runner.prefill(i, p, 0, a, True).argmax())] for i, (p, a) in enumerate(rows)]
    for _ in range(steps - 1):
        logits = runner.decode(list(range(len(rows))), [o[-1] for o in out],
                               [len(p) + len(o) - 1 for (p, _), o in zip(rows, out)], [a for _, a in rows])
        for o, token in zip(out, logits.argmax(-1).tolist()):
            o.append(token)
    return out


@needs_packing
def test_every_row_of_a_mixed_batch_decodes_as_alone_with_packed_weights():
    model = model_with_adapters()
    rows = list(zip(PROMPTS, ["lora", "dora", None, "mlp"]))
    runner = SlotRunner(model, len(rows), pack=True)
    together = greedy(runner, rows, 12)
    assert runner.packed_bytes > 0 and runner.packed_head is not None
    alone = [greedy(SlotRunner(model, 1, pack=True), [row], 12)[0] for row in rows]
    assert together == alone
    plain = [greedy(SlotRunner(model, 1, pack=False), [row], 12)[0] for row in rows]
    assert plain == alone  # the packed weights compute what F.linear computes
    # a batch without the DoRA row takes the packed path in every layer and still agrees
    no_dora = [r for r in rows if r[1] != "dora"]
    assert greedy(SlotRunner(model, 3, pack=True), no_dora, 12) == [a for a, r in zip(alone, rows) if r[1] != "dora"]
    assert len({tuple(a) for a in alone}) == len(rows)  # the adapters really differ, so the equality can fail


@needs_packing
def test_a_changed_base_weight_is_repacked_and_a_pissa_layer_keeps_its_own_forward():
    model = model_with_adapters()
    runner, plain = SlotRunner(model, 1, pack=True), SlotRunner(model, 1, pack=False)
    def logits(r: SlotRunner) -> torch.Tensor:
        r.ensure_capacity(16)
        r.refresh_weights()
        return r.prefill(0, PROMPTS[0], 0, None, True)

    before = logits(runner)
    first = runner.packed[0]["qkv"]
    runner.refresh_weights()
    assert runner.packed[0]["qkv"] is first  # unchanged weights are not packed again
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.base_layer.weight.mul_(-3.0)
    changed = logits(runner)
    assert runner.packed[1]["qkv"] is not first
    torch.testing.assert_close(changed, logits(plain), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed, before, rtol=1e-3, atol=1e-3)
    # PiSSA moves the top of W into B A: its layers' bases differ from the original, so they run their own forward
    # (served alone: its residual base cannot be shared with other adapters)
    model = tiny_llama(seed=4)
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, init="pissa", target_modules=["q_proj", "up_proj"]),
                adapter="pissa")
    rows = [(PROMPTS[1], "pissa"), (PROMPTS[2], None)]
    runner = SlotRunner(model, 2, pack=True)
    assert greedy(runner, rows, 8) == greedy(SlotRunner(model, 2, pack=False), rows, 8)
    assert runner.packed[0]["qkv"] is not None  # packed, but not used where the layer's base is a residual


def test_without_packing_the_runner_runs_plain_f_linear(monkeypatch):
    model = model_with_adapters()
    rows = list(zip(PROMPTS, ["lora", "dora", None, "mlp"]))
    want = greedy(SlotRunner(model, len(rows), pack=False), rows, 8)
    monkeypatch.setattr(kernels, "packing_works", lambda dtype: False)  # e.g. no oneDNN in this build, or a GPU
    runner = SlotRunner(model, len(rows), pack=True)
    assert greedy(runner, rows, 8) == want
    assert runner.packed_head is None and runner.packed_bytes == 0
    assert all(p is None for group in runner.packed for p in group.values())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_runner_logits_equal_the_models_own_forward(dtype, tol):
    """Prefill and batch-1 decode (no attention mask) with the runner's fused RMSNorm and rolled rotary compute the
    logits of transformers' forward of the whole sequence, with an adapter on."""
    model = model_with_adapters().to(dtype)
    prompt, adapter = PROMPTS[2], "lora"
    runner = SlotRunner(model, 1, pack=False)
    runner.ensure_capacity(len(prompt) + 4)
    runner.refresh_adapters(0)
    got = [runner.prefill(0, prompt, 0, adapter, True)]
    tokens = [11, 23, 5]
    for i, token in enumerate(tokens):
        got.append(runner.decode([0], [token], [len(prompt) + i], [adapter])[0])
    with torch.no_grad(), lk.adapters_per_row(model, [adapter]):
        want = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:].float()
    torch.testing.assert_close(torch.stack(got), want, rtol=tol, atol=tol)


def test_the_kv_cache_keeps_its_rows_when_it_grows():
    """A cache grown between decode steps (one layer at a time) holds what it held: the logits equal a runner that
    had room from the start."""
    model, rows = model_with_adapters(), [([(7 * i) % 97 + 1 for i in range(60)], "lora"), (PROMPTS[1], "mlp")]
    roomy = SlotRunner(model, 2, pack=False)
    want = greedy(roomy, rows, 12)
    small = SlotRunner(model, 2, pack=False)
    small.refresh_adapters(0)
    small.ensure_capacity(max(len(p) for p, _ in rows) + 1)
    out = [[int(small.prefill(i, p, 0, a, True).argmax())] for i, (p, a) in enumerate(rows)]
    for _ in range(11):
        lengths = [len(p) + len(o) - 1 for (p, _), o in zip(rows, out)]
        small.ensure_capacity(max(lengths) + 1)  # grows past 64 positions while rows are cached
        logits = small.decode([0, 1], [o[-1] for o in out], lengths, [a for _, a in rows])
        for o, token in zip(out, logits.argmax(-1).tolist()):
            o.append(token)
    assert out == want and small.capacity > 64


def mixed_steps(runner: SlotRunner, rows: list[tuple[list[int], str | None]], chunk: int, new: int
                ) -> list[torch.Tensor]:
    """Serve `rows` the way the engine's steps do, one runner.step per step: row i joins at step i; a step decodes
    every prefilled row (greedy) and puts the next `chunk` prompt tokens of every row still prefilling beside them.
    Returns each row's logits for its `new` output positions."""
    runner.ensure_capacity(max(len(p) for p, _ in rows) + new + 1)
    runner.refresh_adapters(0)
    runner.refresh_weights()
    done = [0] * len(rows)  # prompt tokens in the cache
    out: list[list[torch.Tensor]] = [[] for _ in rows]
    step = 0
    while any(len(o) < new for o in out):
        decode = [i for i, (p, _) in enumerate(rows) if done[i] == len(p) and out[i] and len(out[i]) < new]
        filling = [i for i, (p, _) in enumerate(rows) if i <= step and done[i] < len(p)]
        chunks = [Chunk(i, rows[i][0][done[i]:done[i] + chunk], done[i], rows[i][1],
                        done[i] + chunk >= len(rows[i][0])) for i in filling]
        decoded, prefilled = runner.step(
            [Decode(i, int(out[i][-1].argmax()), len(rows[i][0]) + len(out[i]) - 1, rows[i][1]) for i in decode],
            chunks)
        for j, i in enumerate(decode):
            out[i].append(decoded[j])
        for c, logits in zip(chunks, prefilled):
            done[c.slot] += len(c.ids)
            if logits is not None:
                out[c.slot].append(logits)
        step += 1
    return [torch.stack(o) for o in out]


@pytest.mark.skipif(not kernels.packing_works(torch.bfloat16),
                    reason="no oneDNN bf16 kernels on this CPU (AVX2-only): bf16 serving is not the default here")
@pytest.mark.parametrize("native_attention", [True, False], ids=["kernel", "sdpa"])
def test_bf16_rows_decode_bit_for_bit_as_alone(native_attention):
    """On a bf16 base every row's logits, at every step, are bit for bit those of the row decoded alone: the LoRA
    tables run in bf16 through the same batch-invariant kernels as the base, and decode attention reads each row's
    own length (lorakit's kernel) or whole KV blocks (SDPA; rows of 3..20 tokens cross 16- and 32-position block
    edges while they decode)."""
    model = tiny_llama(seed=5, hidden_size=64, intermediate_size=1152)  # down_proj reads 1152 > ONE_ROW_SUMS_ALIKE
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), adapter="qv")
    lk.add_lora(model, lk.LoraConfig(r=2, alpha=8, target_modules=["gate_proj", "down_proj", "v_proj", "o_proj"]),
                adapter="mlp")
    lk.add_lora(model, lk.LoraConfig(r=8, alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"]),
                adapter="rs")
    for seed, name in enumerate(("qv", "mlp", "rs"), 1):
        randomize_lora_B(model, name, std=0.5, seed=seed)
    model = model.to(torch.bfloat16)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2] + PROMPTS[3] + [3, 4, 5, 6, 7], PROMPTS[3]]
    rows = list(zip(prompts, ["qv", "mlp", None, "rs"]))

    def logits(runner, rows, steps=14):
        runner.ensure_capacity(max(len(p) for p, _ in rows) + steps + 1)
        runner.refresh_adapters(0)
        runner.refresh_weights()
        out = [[runner.prefill(i, p, 0, a, True)] for i, (p, a) in enumerate(rows)]
        for step in range(steps):
            got = runner.decode(list(range(len(rows))), [int(o[-1].argmax()) for o in out],
                                [len(p) + step for p, _ in rows], [a for _, a in rows])
            for o, row in zip(out, got):
                o.append(row)
        return [torch.stack(o) for o in out]

    def SlotRunner(model, slots):  # noqa: N802 - the runner under test, with or without the kernel
        return Runner(model, slots, native_attention=native_attention)

    together = logits(SlotRunner(model, len(rows)), rows)
    for row, got in zip(rows, together):
        alone = logits(SlotRunner(model, 1), [row])[0]
        assert torch.equal(got, alone), (row[1], (got - alone).abs().max())
    # one forward per step, as the engine runs it: rows decode while the later rows' prompts go in, in chunks of 5
    # (the chunk boundaries a row's prompt gets alone too), each step holding several chunks beside the decode rows
    mixed = mixed_steps(SlotRunner(model, len(rows)), rows, chunk=5, new=10)
    for row, got in zip(rows, mixed):
        alone = mixed_steps(SlotRunner(model, 1), [row], chunk=5, new=10)[0]
        assert torch.equal(got, alone), (row[1], (got - alone).abs().max())
    on_base = logits(SlotRunner(model, 1), [(prompts[0], None)])[0]
    assert not torch.equal(on_base, together[0])  # the adapters really change the logits


@pytest.mark.skipif(not kernels.packing_works(torch.bfloat16), reason="oneDNN cannot pack bf16 on this CPU")
def test_a_long_single_row_multiplies_as_it_does_in_a_batch():
    """oneDNN's single-row kernel sums inputs longer than ONE_ROW_SUMS_ALIKE in another order; the packed bf16
    linear multiplies such a row as two, so each row alone equals its row of the batch."""
    dtype = torch.bfloat16
    torch.manual_seed(0)
    layer = nn.Linear(1536, 576, bias=False).to(dtype)
    packed = kernels.pack([layer])
    x = torch.randn(64, 1, 1536).to(dtype)
    batch = packed(x)
    assert all(torch.equal(packed(x[i:i + 1]), batch[i:i + 1]) for i in range(64))
    assert packed(x[0, 0]).shape == (576,)
