"""The memory-saving gated MLP gives bit-identical losses and gradients, and keeps fewer tensors for backward."""

from __future__ import annotations

import torch

import lorakit as lk
from lorakit.models.fused import fuse_gated_mlp, unfuse_gated_mlp

from conftest import randomize_lora_B, tiny_gpt2, tiny_llama


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _saved_bytes(model, ids):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss
    return sum(seen.values())


def test_fused_gated_mlp_is_bit_identical_and_saves_memory():
    model = tiny_llama()
    lk.add_lora(model, lk.LoraConfig(r=4, target_modules="all-linear"))  # LoRA on gate/up/down too
    randomize_lora_B(model, std=0.1)
    ids = torch.randint(1, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    bytes_ref = _saved_bytes(model, ids)
    assert fuse_gated_mlp(model) == 2 and fuse_gated_mlp(model) == 2  # idempotent
    loss, grads = _loss_and_grads(model, ids)
    assert torch.equal(loss, loss_ref)
    assert all(torch.equal(grads[n], grads_ref[n]) for n in grads_ref)
    saved = _saved_bytes(model, ids)
    one_activation = 3 * 16 * model.config.intermediate_size * 4  # one (tokens × intermediate) fp32 tensor
    # per layer, silu(gate(x)) and the product down's LoRA A kept (x.to(fp32) is the product itself in fp32)
    assert bytes_ref - saved == 2 * 2 * one_activation
    with torch.no_grad():
        fused_logits = model(input_ids=ids).logits
    assert unfuse_gated_mlp(model) == 2
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fused_logits)
    assert _saved_bytes(model, ids) == bytes_ref


def test_models_without_gated_mlp_are_left_alone():
    assert fuse_gated_mlp(tiny_gpt2()) == 0


def _bf16_llama_with_lora(**lora):
    from lorakit.lora.injection import cast_base

    model = tiny_llama()
    model.config._attn_implementation = "eager"
    lk.add_lora(model, lk.LoraConfig(r=4, target_modules="all-linear", **lora))
    randomize_lora_B(model, std=0.1)
    return cast_base(model, torch.bfloat16).train()


def test_low_precision_inputs_are_bit_identical_and_keep_bf16_not_fp32_copies():
    from lorakit.models.fused import keep_low_precision_inputs

    model = _bf16_llama_with_lora()
    ids = torch.randint(1, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    bytes_ref = _saved_bytes(model, ids)
    # 2 layers × (2 norms + 7 LoRA layers) + the final norm; idempotent
    assert keep_low_precision_inputs(model) == 2 * 9 + 1 and keep_low_precision_inputs(model) == 19
    loss, grads = _loss_and_grads(model, ids)
    assert torch.equal(loss, loss_ref)
    assert all(torch.equal(grads[n], grads_ref[n]) for n in grads_ref)
    lean = _saved_bytes(model, ids)
    fuse_gated_mlp(model)  # with LoRA on down: its bf16 input is recomputed, not kept
    loss, grads = _loss_and_grads(model, ids)
    assert torch.equal(loss, loss_ref)
    assert all(torch.equal(grads[n], grads_ref[n]) for n in grads_ref)
    assert lean - _saved_bytes(model, ids) == 2 * 2 * 3 * 16 * model.config.intermediate_size * 2  # and silu(gate)
    unfuse_gated_mlp(model)
    tokens, hidden, inter = 3 * 16, model.config.hidden_size, model.config.intermediate_size
    # per layer at least: the 2 norms' and o's and down's fp32 input copies (4 bytes) become bf16 inputs (2 bytes);
    # q, k, v (and gate, up) keep one bf16 input between them (here, or in LoRA's SharedInput where it is on)
    assert bytes_ref - lean >= 2 * tokens * (2 * 2 * hidden + 2 * hidden + 2 * inter)


def test_low_precision_inputs_leave_fp32_bases_dropout_and_dora_to_their_own_forward():
    from lorakit.models.fused import keep_low_precision_inputs

    ids = torch.randint(1, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    for model in (_bf16_llama_with_lora(use_dora=True), tiny_llama()):
        loss_ref, grads_ref = _loss_and_grads(model, ids)
        keep_low_precision_inputs(model)
        loss, grads = _loss_and_grads(model, ids)
        assert torch.equal(loss, loss_ref) and all(torch.equal(grads[n], grads_ref[n]) for n in grads_ref)
    torch.manual_seed(0)
    model = _bf16_llama_with_lora(dropout=0.5)
    keep_low_precision_inputs(model)
    torch.manual_seed(1)
    loss, _ = _loss_and_grads(model, ids)
    torch.manual_seed(1)
    for module in model.modules():  # back to the class's own methods
        module.__dict__.pop("delta", None), module.__dict__.pop("forward", None)
    assert torch.equal(_loss_and_grads(model, ids)[0], loss)
