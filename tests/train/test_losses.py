import warnings

import pytest
import torch

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.train.losses import causal_lm_loss, fused_linear_cross_entropy

from conftest import randomize_lora_B, tiny_gpt2, tiny_llama


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_equals_the_models_own_loss_and_gradients(factory):
    model = factory()
    lk.add_lora(model, lk.LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora_B(model, std=0.1)
    torch.manual_seed(0)
    ids = torch.randint(1, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on row 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :6] = -100  # a masked prompt
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    reference.backward()
    expected = lora_grads(model)
    model.zero_grad()
    ours = causal_lm_loss(model, ids, labels, attention_mask=mask, chunk=5)  # several chunks
    ours.backward()
    got = lora_grads(model)
    assert abs(ours.item() - reference.item()) < 1e-5
    for name in expected:
        assert (got[name] - expected[name]).abs().max() < 1e-5, name


def test_trainable_head_gets_the_right_gradient():
    torch.manual_seed(0)
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    y = torch.randint(0, 30, (10,))
    ref = torch.nn.functional.cross_entropy(h @ w.T, y)
    gh, gw = torch.autograd.grad(ref, (h, w))
    ours = fused_linear_cross_entropy(h, w, y, chunk=3)
    oh, ow = torch.autograd.grad(ours * 1.0, (h, w))
    assert abs(ours.item() - ref.item()) < 1e-6
    assert (oh - gh).abs().max() < 1e-6 and (ow - gw).abs().max() < 1e-6


def test_no_labelled_tokens_is_a_clear_error():
    with pytest.raises(LorakitError, match="every label is -100"):
        fused_linear_cross_entropy(torch.zeros(0, 4), torch.zeros(5, 4), torch.zeros(0, dtype=torch.long))


def test_default_chunking_and_repeated_target_rows_match_cross_entropy():
    torch.manual_seed(0)
    vocab = 70_000  # the default chunk is then 59 rows, so 150 rows take three chunks, the last one partial
    h = torch.randn(150, 8, requires_grad=True)
    w = torch.randn(vocab, 8) * 0.5
    y = torch.randint(0, 5, (150,))  # many rows share a target
    ref = torch.nn.functional.cross_entropy(h @ w.T, y)
    (gh,) = torch.autograd.grad(ref, (h,))
    ours = fused_linear_cross_entropy(h, w, y)
    (oh,) = torch.autograd.grad(ours, (h,))
    assert abs(ours.item() - ref.item()) < 1e-5
    assert (oh - gh).abs().max() < 1e-6


def test_bf16_head_matches_fp32_reference_of_the_same_values():
    torch.manual_seed(0)
    h = torch.randn(20, 16).to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(50, 16).to(torch.bfloat16)
    y = torch.randint(0, 50, (20,))
    ref = torch.nn.functional.cross_entropy(h.float() @ w.float().T, y)
    ours = fused_linear_cross_entropy(h, w, y, chunk=7)
    (oh,) = torch.autograd.grad(ours, (h,))
    assert oh.dtype == torch.bfloat16
    assert abs(ours.item() - ref.item()) < 2e-2


def test_a_peft_prefix_tuning_model_trains_through_its_own_forward():
    """PEFT puts prefix-tuning's virtual tokens into past_key_values in its own forward: the loss must come from it,
    else the prefix is not in the graph and training silently does nothing."""
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(0)
    ids = torch.randint(1, 97, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    with warnings.catch_warnings():  # PEFT's own calls: transformers deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lorakit's path through PEFT prints nothing
        ours = causal_lm_loss(model, ids, labels, attention_mask=mask)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)
    assert abs(ours.item() - base.item()) > 1e-4  # the prefix changes the loss
    ours.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
