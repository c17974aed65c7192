import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.errors import LorakitError
from lorakit.lora.layers import LoraEmbedding, LoraLinear, merge_layer, unmerge_layer
from lorakit.lora.variants import LoraVariant


def test_fresh_adapter_reproduces_base_exactly():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    x = torch.randn(4, 6)
    expected = base(x)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=2, alpha=4)
    layer.active_adapter = "a"
    assert torch.equal(layer(x), expected)
    assert torch.count_nonzero(layer.lora_A["a"].weight) > 0  # A random, B zero
    assert torch.count_nonzero(layer.lora_B["a"].weight) == 0


def test_hand_checkable_merge():
    base = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    layer = LoraLinear(base)
    layer.add_adapter("a", r=1, alpha=2)  # scale = 2
    with torch.no_grad():
        layer.lora_A["a"].weight.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
        layer.lora_B["a"].weight.copy_(torch.tensor([[0.5], [1.0]]))
    layer.active_adapter = "a"
    # ΔW = 2 · [[0.5],[1]] @ [[1,0,-1]] = [[1,0,-1],[2,0,-2]]
    merge_layer(layer, "a")
    assert torch.equal(base.weight, torch.tensor([[2.0, 2.0, 2.0], [6.0, 5.0, 4.0]]))
    x = torch.tensor([[1.0, 1.0, 1.0]])
    assert torch.equal(layer(x), torch.tensor([[6.0, 15.0]]))  # merged: no double counting
    unmerge_layer(layer, "a")
    assert torch.equal(base.weight, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    assert torch.equal(layer(x), torch.tensor([[6.0, 15.0]]))  # unmerged: base 6,15 + ΔW x = 0,0


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merged_equals_unmerged(kind):
    torch.manual_seed(0)
    base = nn.Linear(16, 12) if kind == "linear" else Conv1D(12, 16)  # Conv1D(nf=out, nx=in)
    layer = LoraLinear(base)
    assert (layer.in_features, layer.out_features) == (16, 12)
    layer.add_adapter("a", r=4, alpha=8)
    nn.init.normal_(layer.lora_B["a"].weight)
    layer.active_adapter = "a"
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        unmerged = layer(x)
        assert not torch.allclose(unmerged, base(x))
        merge_layer(layer, "a")
        merged = layer(x)
        merge_layer(layer, "a")  # idempotent
        assert torch.equal(layer(x), merged)
    assert (merged - unmerged).abs().max() < 1e-5
    assert layer.delta_weight("a").shape == base.weight.shape


def test_embedding_layer():
    torch.manual_seed(0)
    base = nn.Embedding(20, 8, padding_idx=0)
    layer = LoraEmbedding(base)
    layer.add_adapter("a", r=3, alpha=3)
    layer.active_adapter = "a"
    ids = torch.randint(0, 20, (2, 6))
    assert torch.equal(layer(ids), base(ids))  # A starts at zero
    assert torch.count_nonzero(layer.lora_embedding_A["a"]) == 0
    assert torch.count_nonzero(layer.lora_embedding_B["a"]) > 0
    nn.init.normal_(layer.lora_embedding_A["a"])
    with torch.no_grad():
        plain = base(ids)
        unmerged = layer(ids)
        merge_layer(layer, "a")
        merged = layer(ids)
    assert not torch.allclose(unmerged, plain)
    assert (merged - unmerged).abs().max() < 1e-5


def test_scaling_and_init_options():
    base = nn.Linear(64, 32)
    layer = LoraLinear(base)
    layer.add_adapter("k", r=8, alpha=16)
    layer.add_adapter("g", r=8, alpha=16, init="gaussian")
    layer.add_adapter("rs", r=16, alpha=16, use_rslora=True)
    assert layer.scaling["k"] == 2.0
    assert layer.scaling["rs"] == pytest.approx(16 / math.sqrt(16))
    std = layer.lora_A["g"].weight.std().item()
    assert abs(std - 1 / 8) < 0.03
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a=√5 gives U(-1/√fan_in, 1/√fan_in)
    assert layer.lora_A["k"].weight.abs().max() <= bound + 1e-6


def test_dropout_zero_is_identity_and_counts():
    layer = LoraLinear(nn.Linear(10, 7))
    layer.add_adapter("a", r=3, alpha=3, dropout=0.0)
    layer.add_adapter("b", r=3, alpha=3, dropout=0.1)
    assert isinstance(layer.lora_dropout["a"], nn.Identity)
    assert isinstance(layer.lora_dropout["b"], nn.Dropout)
    assert sum(p.numel() for p in layer.adapter_state("a").values()) == 3 * (10 + 7)


def test_low_precision_base_keeps_fp32_lora():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=2, alpha=2)
    layer.active_adapter = "a"
    assert layer.lora_A["a"].weight.dtype == torch.float32
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_wrong_base_type():
    with pytest.raises(LorakitError, match="got LayerNorm"):
        LoraLinear(nn.LayerNorm(4))
    with pytest.raises(LorakitError, match="nn.Embedding"):
        LoraEmbedding(nn.Linear(2, 2))


def test_embedding_refuses_options_it_cannot_honour():
    layer = LoraEmbedding(nn.Embedding(20, 8, padding_idx=0))
    for option, shown in (({"dropout": 0.1}, "dropout=0.1"), ({"init": "gaussian"}, "init='gaussian'"),
                          ({"use_dora": True}, "use_dora=True")):
        with pytest.raises(LorakitError, match=rf"Embedding\(20, 8, padding_idx=0\) cannot honour {shown}"):
            layer.add_adapter("a", r=2, alpha=2, **option)
    assert layer.adapters == []  # nothing half-added
    layer.add_adapter("a", r=2, alpha=2, dropout=0.0, init="kaiming", use_dora=False)  # the defaults are fine
    assert set(dict(layer.named_parameters())) == {"base_layer.weight", "lora_embedding_A.a", "lora_embedding_B.a"}


def test_base_changing_init_keeps_the_layer_to_itself():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 6))
    layer.add_adapter("p", r=2, alpha=2, init="pissa")
    with pytest.raises(LorakitError, match="fresh copy"):
        layer.add_adapter("b", r=2, alpha=2)
    other = LoraLinear(nn.Linear(8, 6))
    other.add_adapter("b", r=2, alpha=2)
    with pytest.raises(LorakitError, match="fresh copy"):
        other.add_adapter("p", r=2, alpha=2, init="olora")
    assert layer.adapters == ["p"] and other.adapters == ["b"]


def test_a_new_variant_overrides_only_what_differs():
    """The variant interface: a variant whose merged change does not read W needs only `delta` and `merged_delta`."""

    class Halved(LoraVariant):  # ΔW/2
        def delta(self, layer, name, x, y):
            return 0.5 * super().delta(layer, name, x, y)

        def merged_delta(self, layer, name):
            return 0.5 * layer.delta_weight(name)

    base = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    layer = LoraLinear(base)
    layer.add_adapter("a", r=1, alpha=2)  # scale = 2
    layer.variants["a"] = Halved()
    with torch.no_grad():
        layer.lora_A["a"].weight.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
        layer.lora_B["a"].weight.copy_(torch.tensor([[0.5], [1.0]]))
    layer.active_adapter = "a"
    x = torch.tensor([[1.0, 2.0, 4.0]])
    # ΔW/2 = [[0.5, 0, -0.5], [1, 0, -1]]: base 17, 38 plus ΔW/2 x = -1.5, -3
    assert torch.equal(layer(x), torch.tensor([[15.5, 35.0]]))
    layer.merge("a")
    layer.merge("a")  # idempotent
    assert torch.equal(base.weight, torch.tensor([[1.5, 2.0, 2.5], [5.0, 5.0, 5.0]]))
    assert torch.equal(layer(x), torch.tensor([[15.5, 35.0]]))
    assert torch.equal(layer.unmerged_weight("a", base.weight), torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    layer.unmerge("a")
    layer.unmerge("a")  # idempotent
    assert torch.equal(base.weight, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    assert torch.equal(layer(x), torch.tensor([[15.5, 35.0]]))
