import pytest
import torch

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.lora.injection import lora_layers

from conftest import randomize_lora_B, tiny_gpt2, tiny_llama


def two_adapters(model_factory=tiny_llama, rank_b=4):
    model = model_factory()
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8), adapter="a")
    lk.add_lora(model, lk.LoraConfig(r=rank_b, alpha=3, use_rslora=True), adapter="b")
    randomize_lora_B(model, "a", seed=1)
    randomize_lora_B(model, "b", seed=2)
    return model


def deltas(model, adapter):
    return {n: l.delta_weight(adapter).detach() for n, l in lora_layers(model) if adapter in l.adapters}


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_cat_is_the_exact_weighted_sum(factory):
    model = two_adapters(factory, rank_b=2)
    lk.combine_adapters(model, ["a", "b"], [0.7, -1.5], "c", method="cat")
    da, db, dc = deltas(model, "a"), deltas(model, "b"), deltas(model, "c")
    for name in da:
        assert (dc[name] - (0.7 * da[name] - 1.5 * db[name])).abs().max() < 1e-5
    assert model.model.layers[0].self_attn.q_proj.r["c"] == 6 if factory is tiny_llama else True


def test_svd_full_rank_is_exact_and_low_rank_is_best_approximation():
    model = two_adapters()
    lk.combine_adapters(model, ["a", "b"], [1.0, 0.5], "full", method="svd", r=8)
    lk.combine_adapters(model, ["a", "b"], [1.0, 0.5], "low", method="svd", r=2)
    da, db = deltas(model, "a"), deltas(model, "b")
    full, low = deltas(model, "full"), deltas(model, "low")
    for name in da:
        target = da[name] + 0.5 * db[name]
        assert (full[name] - target).abs().max() < 1e-5
        s = torch.linalg.svdvals(target)
        # Eckart–Young: the rank-2 error equals the energy of the discarded singular values.
        assert torch.linalg.matrix_norm(low[name] - target) == pytest.approx(s[2:].norm().item(), rel=1e-4)
    with pytest.raises(LorakitError, match="pass r="):
        lk.combine_adapters(model, ["a", "b"], [1.0, 1.0], "x", method="svd")


def test_linear_interpolates_parameters(ids):
    model = two_adapters()
    lk.combine_adapters(model, ["a"], [1.0], "same", method="linear")
    da, same = deltas(model, "a"), deltas(model, "same")
    for name in da:
        assert (same[name] - da[name]).abs().max() < 1e-6
    lk.combine_adapters(model, ["a", "a"], [0.25, 0.75], "avg", method="linear")
    for name, d in deltas(model, "avg").items():
        assert (d - da[name]).abs().max() < 1e-5
    lk.set_adapter(model, "avg")
    with torch.no_grad():
        out_avg = model(input_ids=ids).logits
    lk.set_adapter(model, "a")
    with torch.no_grad():
        assert (model(input_ids=ids).logits - out_avg).abs().max() < 1e-4


def test_combination_errors():
    model = two_adapters(rank_b=2)
    with pytest.raises(LorakitError, match="one rank"):
        lk.combine_adapters(model, ["a", "b"], [0.5, 0.5], "x", method="linear")
    with pytest.raises(LorakitError, match="one weight per adapter"):
        lk.combine_adapters(model, ["a", "b"], [0.5], "x", method="cat")
    with pytest.raises(LorakitError, match="not one of"):
        lk.combine_adapters(model, ["a", "b"], [0.5, 0.5], "x", method="ties")
    with pytest.raises(LorakitError, match="adapters present"):
        lk.combine_adapters(model, ["a", "zz"], [0.5, 0.5], "x", method="cat")


def test_combined_adapter_saves_and_reloads(ids, tmp_path):
    model = two_adapters(rank_b=2)
    lk.combine_adapters(model, ["a", "b"], [1.0, 1.0], "c", method="cat")
    lk.set_adapter(model, "c")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    lk.save_adapter(model, tmp_path / "c")
    again = lk.load_adapter(tiny_llama(), tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, expected)
