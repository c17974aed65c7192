"""Fused LoRA on projections that share an input (q, k, v; gate, up): the same numbers as the layers alone."""

import copy

import pytest
import torch

import lorakit as lk
from lorakit.lora.injection import cast_base, lora_layers
from lorakit.lora.layers import LoraLinear

from conftest import randomize_lora_B, tiny_bert, tiny_llama

one_thread = pytest.fixture(autouse=True, name="one_thread")(__import__("conftest").single_threaded)


def unfused(model):
    """A copy of `model` whose LoRA layers each run their own A."""
    copy_ = copy.deepcopy(model)
    for _, layer in lora_layers(copy_):
        layer.shared_input = None
    return copy_


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(grads, grads_alone, tolerance=1e-4):
    """Equal up to float summation order: within `tolerance` of each gradient's largest entry."""
    assert grads.keys() == grads_alone.keys()
    for name, grad in grads.items():
        scale = max(1e-6, float(grads_alone[name].abs().max()))
        assert (grad - grads_alone[name]).abs().max() < tolerance * scale, name


def a_calls(model):
    """Count the forward calls of every lora_A module (the separate A matmuls)."""
    calls = []
    for _, layer in lora_layers(model):
        for a in layer.lora_A.values():
            a.register_forward_hook(lambda *args: calls.append(1))
    return calls


def all_linear_llama(**config):
    model = tiny_llama()
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, target_modules="all-linear", **config))
    randomize_lora_B(model)
    return model.train()


def test_groups_are_the_projections_that_share_an_input():
    model = all_linear_llama()
    groups = {id(layer.shared_input): [n.rsplit(".", 1)[1] for n, l in lora_layers(model) if l.shared_input is
                                       layer.shared_input]
              for _, layer in lora_layers(model) if layer.shared_input is not None}
    assert sorted(map(tuple, groups.values())) == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    assert all(l.shared_input is None for n, l in lora_layers(model) if n.endswith(("o_proj", "down_proj")))


def test_fused_equals_separate_outputs_and_lora_gradients(ids):
    model = all_linear_llama()
    separate = unfused(model)
    calls, separate_calls = a_calls(model), a_calls(separate)
    logits, grads = loss_and_grads(model, ids)
    logits_alone, grads_alone = loss_and_grads(separate, ids)
    assert len(separate_calls) == 2 * 7 and len(calls) == 2 * 2  # fused: only o_proj and down_proj run their own A
    assert (logits - logits_alone).abs().max() < 1e-5 * max(1.0, float(logits_alone.abs().max()))
    assert len(grads) == 2 * 7 * 2
    assert_same_grads(grads, grads_alone)
    assert all(float(g.abs().max()) > 0 for n, g in grads.items() if "lora_A" in n)  # every A learns through the group


def test_bf16_base_group_keeps_its_input_once_and_equals_separate_layers():
    """On a bf16 base the group casts the bf16 input once and keeps it (not an fp32 copy) for backward. Compared on
    one attention block with a loss linear in q, k, v, so that no bf16 rounding downstream amplifies the float
    summation order (through a whole bf16 model both paths round y + delta to bf16 at slightly different places)."""
    model = all_linear_llama()
    cast_base(model, torch.bfloat16)
    attention = model.model.layers[0].self_attn
    separate = unfused(attention)
    torch.manual_seed(1)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    weights = [torch.randn(2, 5, p.out_features) for p in (attention.q_proj, attention.k_proj, attention.v_proj)]
    grads = []
    for block in (attention, separate):
        x.grad = None
        block.zero_grad(set_to_none=True)
        outs = [block.q_proj(x), block.k_proj(x), block.v_proj(x)]
        sum((o.float() * w).sum() for o, w in zip(outs, weights)).backward()
        grads.append((x.grad.float(), [p.grad for p in block.parameters() if p.grad is not None]))
    (x_grad, lora_grads), (x_grad_alone, lora_grads_alone) = grads
    # x's gradient is bf16: the separate layers add three bf16 parts, the group one fp32 sum (a bf16 ulp apart)
    assert torch.allclose(x_grad, x_grad_alone, rtol=2 ** -6, atol=2 ** -6 * float(x_grad_alone.abs().max()))
    assert len(lora_grads) == 6
    for fused, alone in zip(lora_grads, lora_grads_alone):
        assert torch.allclose(fused, alone, rtol=1e-5, atol=1e-6 * float(alone.abs().max()))


def test_no_grad_and_gradient_checkpointing_agree(ids):
    model = all_linear_llama()
    separate = unfused(model)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, separate(input_ids=ids).logits, atol=1e-5)
    model.config.use_cache = False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    _, grads = loss_and_grads(model, ids)
    _, grads_alone = loss_and_grads(separate, ids)
    assert_same_grads(grads, grads_alone)


@pytest.mark.parametrize("config", [{"use_dora": True}, {"dropout": 0.1}])
def test_dora_and_dropout_run_each_layer_alone(config, ids):
    model = all_linear_llama(**config)
    separate = unfused(model)
    calls = a_calls(model)
    assert not any(l.shared_input.fuses(l, "default") for _, l in lora_layers(model) if l.shared_input is not None)
    torch.manual_seed(0)
    _, grads = loss_and_grads(model, ids)
    torch.manual_seed(0)
    _, grads_alone = loss_and_grads(separate, ids)
    assert len(calls) == 2 * 7
    for name, grad in grads.items():
        assert torch.equal(grad, grads_alone[name]), name


def test_a_group_with_one_dora_member_fuses_the_others(ids):
    model = all_linear_llama()
    attention = model.model.layers[0].self_attn
    attention.k_proj.remove_adapter("default")
    attention.k_proj.add_adapter("default", r=4, alpha=8, use_dora=True)
    attention.k_proj.active_adapter = "default"
    randomize_lora_B(model, seed=3)
    group = attention.q_proj.shared_input
    assert group.fuses(attention.q_proj, "default") and not group.fuses(attention.k_proj, "default")
    logits, grads = loss_and_grads(model, ids)
    logits_alone, grads_alone = loss_and_grads(unfused(model), ids)
    assert torch.allclose(logits, logits_alone, atol=1e-5)
    assert_same_grads(grads, grads_alone)


def test_mixed_batch_and_second_adapter(ids):
    model = all_linear_llama()
    lk.add_lora(model, lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), adapter="qv")
    randomize_lora_B(model, adapter="qv", seed=5)
    separate = unfused(model)
    names = ["default", "qv", None]
    with torch.no_grad():
        for adapter in ("default", "qv"):
            lk.set_adapter(model, adapter)
            lk.set_adapter(separate, adapter)
            assert torch.allclose(model(input_ids=ids).logits, separate(input_ids=ids).logits, atol=1e-5)
        with lk.adapters_per_row(model, names), lk.adapters_per_row(separate, names):
            assert torch.allclose(model(input_ids=ids).logits, separate(input_ids=ids).logits, atol=1e-5)


def test_adapter_files_and_state_dict_unchanged(tmp_path):
    model = all_linear_llama()
    separate = unfused(model)
    assert list(model.state_dict()) == list(separate.state_dict())
    lk.save_adapter(model, tmp_path / "fused")
    lk.save_adapter(separate, tmp_path / "separate")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "fused" / name).read_bytes() == (tmp_path / "separate" / name).read_bytes()


def test_cache_keeps_nothing_after_the_forward_and_follows_in_place_changes(ids):
    model = all_linear_llama()
    attention = model.model.layers[0].self_attn
    group = attention.q_proj.shared_input
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        q = attention.q_proj(x)
        k_before = attention.k_proj(x)
        x.mul_(2)  # same tensor, new contents: k and v must see them
        v = attention.v_proj(x)
        k_after = attention.k_proj(x)
        assert group._after_a is None or group._key[0] is x
        assert torch.allclose(v, unfused(attention).v_proj(x), atol=1e-6)
        assert torch.allclose(k_after, unfused(attention).k_proj(x), atol=1e-6)
        assert not torch.allclose(k_before, k_after)
        assert torch.allclose(q, unfused(attention).q_proj(x / 2), atol=1e-6)
        x = x.clone()  # a new input: q, k, v each take their part of one matmul
        attention.q_proj(x)
        attention.k_proj(x)
        assert group._key[0] is x
        attention.v_proj(x)
    assert group._after_a is None and group._key is None  # every member served: nothing kept


def test_bert_query_key_value(ids):
    model = tiny_bert()
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, target_modules=["query", "key", "value"]))
    randomize_lora_B(model)
    layer = model.bert.encoder.layer[0].attention.self
    assert isinstance(layer.query, LoraLinear) and layer.query.shared_input is layer.value.shared_input
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, unfused(model)(input_ids=ids).logits, atol=1e-5)
