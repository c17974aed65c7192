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
    assert bytes_ref - saved == 2 * one_activation  # one tensor per layer fewer
    with torch.no_grad():
        fused_logits = model(input_ids=ids).logits
    assert unfuse_gated_mlp(model) == 2
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fused_logits)
    assert _saved_bytes(model, ids) == bytes_ref


def test_models_without_gated_mlp_are_left_alone():
    assert fuse_gated_mlp(tiny_gpt2()) == 0
