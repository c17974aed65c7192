"""`lorakit plan`: parameter counts of the presets, how each mode divides memory, and bad input."""

from __future__ import annotations

import json

import pytest

from lorakit.errors import LorakitError
from lorakit.train.plan import GIB, PRESETS, Shape, estimate, load_shape, plan_table


def test_presets_have_the_published_parameter_counts():
    assert load_shape("llama-2-7b").params() == 6_738_415_616
    assert load_shape("llama-2-70b").params() == 68_976_648_192


def test_config_json_and_lora_count(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**PRESETS["llama-2-7b"], "tie_word_embeddings": True}))
    shape = load_shape(str(path))
    assert shape.params() == 6_738_415_616 - 32000 * 4096
    res = estimate(shape, "none", 1, "fp32", r=8, targets=("q_proj", "v_proj"), batch=1, seq=16)
    assert res["LoRA params"] == 32 * 2 * 8 * (4096 + 4096) * 4  # 4.19 M fp32 parameters
    assert res["AdamW states"] == 2 * res["LoRA params"]


def test_fsdp_divides_the_sharded_terms_and_ddp_does_not():
    shape = load_shape("llama-2-70b")
    one = estimate(shape, "none", 1, "bf16", batch=8, seq=512)
    ddp = estimate(shape, "ddp", 8, "bf16", batch=8, seq=512)
    fsdp = estimate(shape, "fsdp", 8, "bf16", batch=8, seq=512)
    assert ddp["base weights"] == one["base weights"] == shape.params() * 2
    assert fsdp["base weights"] == pytest.approx(shape.params() * 2 / 8 + 2 * shape.block_params() * 2 * 7 / 8)
    assert fsdp["AdamW states"] == one["AdamW states"] / 8
    assert ddp["activations"] == fsdp["activations"] < one["activations"] / 4  # 1 example per device instead of 8
    nf4 = estimate(shape, "fsdp", 8, "nf4", batch=8, seq=512)
    assert nf4["base weights"] < fsdp["base weights"] / 3
    ckpt = estimate(shape, "fsdp", 8, "bf16", batch=8, seq=512, gradient_checkpointing=True)
    assert ckpt["activations"] < fsdp["activations"] / 5


def test_bad_input_is_refused():
    with pytest.raises(LorakitError, match="Unknown model 'llama-9b'"):
        load_shape("llama-9b")
    with pytest.raises(LorakitError, match="Unknown target module"):
        estimate(load_shape("llama-2-7b"), targets=("query",))
    with pytest.raises(LorakitError, match="dtype must be one of"):
        estimate(load_shape("llama-2-7b"), dtype="int3")
    with pytest.raises(LorakitError, match="lacks 'hidden_size'"):
        Shape.from_config({"vocab_size": 3})


def test_table_has_every_term_per_mode():
    table = plan_table("llama-2-7b", devices=8, gradient_checkpointing=True)
    assert "| term | 1 device | DDP x8 | FSDP2 x8 |" in table
    total = estimate(load_shape("llama-2-7b"), "fsdp", 8, "bf16", batch=8, seq=2048, gradient_checkpointing=True)["total"]
    assert f"{total / GIB:,.2f} |" in table.splitlines()[-1]
