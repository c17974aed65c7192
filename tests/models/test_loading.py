"""Loading a bf16 base from a mapped safetensors file: the same weights as casting the loaded fp32 model, bit for bit,
without reading the whole fp32 file into the process."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.lora.injection import cast_base
from lorakit.models.loading import cast_mapped_weights, load_model
from tiny_text import save_tiny_lm


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


@pytest.mark.parametrize("with_lora", [False, True])
def test_cast_mapped_weights_equals_cast_base_bit_for_bit(tmp_path, with_lora):
    folder = save_tiny_lm(tmp_path / "tiny")
    models = []
    for lean in (False, True):
        model, _ = load_model(str(folder))
        model.requires_grad_(False)  # the frozen base (add_lora freezes it too)
        if with_lora:
            torch.manual_seed(0)
            lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        if lean:
            assert cast_mapped_weights(model, torch.bfloat16) > 0  # transformers mapped the file: weights went through
        cast_base(model, torch.bfloat16)
        models.append(_tensors(model))
    old, new = models
    assert old.keys() == new.keys()
    for name in old:
        assert old[name].dtype == new[name].dtype, name
        assert torch.equal(old[name], new[name]), name
    frozen = [t for n, t in new.items() if "lora_" not in n and t.is_floating_point() and "inv_freq" not in n]
    assert frozen and all(t.dtype == torch.bfloat16 for t in frozen)
    assert all(t.dtype == torch.float32 for n, t in new.items() if "lora_" in n)  # LoRA stays fp32


def test_cast_mapped_weights_leaves_trainable_and_unmapped_weights_alone(tmp_path):
    folder = save_tiny_lm(tmp_path / "tiny")
    model, _ = load_model(str(folder))
    model.requires_grad_(False)
    head = model.get_output_embeddings().weight
    head.requires_grad_(True)  # tied to the embedding: trainable, so neither is cast
    fresh = torch.nn.Linear(4, 4)  # not from the file
    fresh.requires_grad_(False)
    model.add_module("extra", fresh)
    cast_mapped_weights(model, torch.bfloat16)
    assert head.dtype == torch.float32 and fresh.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
