"""ΔW analysis: normalised subspace similarity on hand-checkable subspaces, the amplification factor on a matrix with
known singular values, and the analyze workflow on saved tiny adapters."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lorakit as lk
from conftest import randomize_lora_B, tiny_llama
from lorakit.lora.analysis import amplification, amplification_report, analyze, compare_adapters, subspace_similarity
from lorakit.errors import LorakitError


def test_same_subspace_is_one_everywhere_and_invariant_to_mixing_rows():
    torch.manual_seed(0)
    A = torch.randn(4, 20)
    assert torch.allclose(subspace_similarity(A, A), torch.ones(4, 4), atol=1e-5)
    mixed = torch.randn(4, 4) @ A  # same row space, different basis and singular values
    assert subspace_similarity(A, mixed)[-1, -1].item() == pytest.approx(1.0, abs=1e-5)


def test_orthogonal_subspaces_are_zero_and_a_45_degree_pair_is_half():
    eye = torch.eye(6)
    assert torch.allclose(subspace_similarity(eye[:2], eye[2:5]), torch.zeros(2, 3), atol=1e-7)
    # A1 spans e0; A2's top direction is (e0 + e1)/√2: cos² = 1/2. Adding e2 to A2 keeps φ(1, 2) = 1/2.
    A1 = eye[:1]
    A2 = torch.stack([(eye[0] + eye[1]) * 2.0, eye[2]])  # larger singular value first
    phi = subspace_similarity(A1, A2)
    assert phi.shape == (1, 2)
    assert phi[0, 0].item() == pytest.approx(0.5, abs=1e-6)
    assert phi[0, 1].item() == pytest.approx(0.5, abs=1e-6)


def test_subspace_similarity_needs_the_same_input_dimension():
    with pytest.raises(LorakitError, match="input dimension"):
        subspace_similarity(torch.randn(2, 5), torch.randn(2, 6))


def test_amplification_on_known_singular_values():
    # W = diag(10, 5, 1, 0.5); ΔW along the third axis only: ‖UᵀWV‖ = 1, so the factor is ‖ΔW‖ / 1.
    W = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.5]))
    delta = torch.zeros(4, 4)
    delta[2, 2] = 3.0
    out = amplification(W, delta, r=1, random_draws=50)
    assert out["delta_norm"] == pytest.approx(3.0)
    assert out["W_in_delta_dirs"] == pytest.approx(1.0)
    assert out["amplification"] == pytest.approx(3.0)
    assert out["W_in_W_dirs"] == pytest.approx(10.0)
    assert out["W_norm"] == pytest.approx(math.sqrt(100 + 25 + 1 + 0.25))
    assert 0 < out["W_in_random_dirs"] < 10.0


def _saved(tmp_path, name: str, r: int, seed: int):
    model = tiny_llama()
    lk.add_lora(model, lk.LoraConfig(r=r, alpha=2 * r))
    torch.manual_seed(seed)
    for _, layer in lk.lora_layers(model):
        torch.nn.init.normal_(layer.lora_A["default"].weight)
    randomize_lora_B(model, seed=seed)
    return lk.save_adapter(model, tmp_path / name), model


def test_analyze_two_adapters_and_amplification(tmp_path):
    p2, model2 = _saved(tmp_path, "r2", 2, 1)
    p4, _ = _saved(tmp_path, "r4", 4, 2)
    grids = compare_adapters(p2, p4)
    assert len(grids) == 4  # q_proj and v_proj in 2 layers
    assert all(g.shape == (2, 4) and (g >= -1e-6).all() and (g <= 1 + 1e-6).all() for g in grids.values())
    same = compare_adapters(p2, p2, matrix="delta")
    assert all(torch.allclose(g, torch.ones(2, 2), atol=1e-4) for g in same.values())

    report = analyze(p2, p4, out_dir=tmp_path / "out")
    assert (tmp_path / "out" / "subspace_similarity.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert set(saved["similarity"]) == set(grids)
    assert "φ(1,1)" in report["markdown"]

    base = tiny_llama()
    amp = amplification_report(base, p2)
    name = "model.layers.0.self_attn.q_proj"
    layer = model2.get_submodule(name)
    expected = amplification(base.get_submodule(name).weight, layer.delta_weight("default"), 2)
    assert amp[name]["amplification"] == pytest.approx(expected["amplification"], rel=1e-5)
    report = analyze(p2, base=base, base_name="tiny-llama")  # the caller loads the base; analysis takes the model
    assert report["amplification"][name]["amplification"] == pytest.approx(expected["amplification"], rel=1e-5)
    assert "on tiny-llama)" in report["markdown"]
    with pytest.raises(LorakitError, match="loaded model"):
        analyze(p2, base="smollm2-135m")
    with pytest.raises(LorakitError, match="Nothing to analyse"):
        analyze(p2)
