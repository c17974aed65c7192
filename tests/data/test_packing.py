"""Padding-free packing: the same targets, loss and LoRA gradients as the padded batch; no attention across examples."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from conftest import randomize_lora_B, tiny_llama
from lorakit.data.config import DataConfig
from lorakit.data.packing import collate_packed, pack_rows, packing_problem, resolve_packing
from lorakit.data.records import IGNORE_INDEX, Example, collate, loss_tokens
from lorakit.errors import LorakitError
from lorakit.train.losses import causal_lm_loss


def examples(lengths, prompt=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 97, (n,), generator=gen).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * min(prompt, n) + ids[prompt:], "test", prompt))
    return out


def test_rows_are_filled_first_fit_decreasing_within_the_width():
    assert pack_rows([5, 3, 8, 2, 6], 8) == [[2], [4, 3], [0, 1]]
    lengths = [17, 3, 9, 30, 12, 1, 5, 22]
    rows = pack_rows(lengths, 30)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 30 for row in rows) and len(rows) == 4  # 99 tokens: 4 rows of 30


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_has_the_loss_and_lora_gradients_of_the_padded_batch(attn):
    batch = examples([21, 5, 9, 14, 3, 30, 11, 7])
    grads = {}
    for mode in ("padded", "packed"):
        model = lk.add_lora(tiny_llama(), lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        model.set_attn_implementation(attn)
        randomize_lora_B(model, std=0.1)
        if mode == "padded":
            b = collate(batch, pad_id=0)
            loss = causal_lm_loss(model, b["input_ids"], b["labels"], b["attention_mask"])
        else:
            b = collate_packed(batch, pad_id=0)
            loss = causal_lm_loss(model, b["input_ids"], b["labels"], None, position_ids=b["position_ids"], use_cache=False)
        loss.backward()
        grads[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                       loss_tokens(b), b["input_ids"].numel())
    (l1, g1, t1, cells1), (l2, g2, t2, cells2) = grads["padded"], grads["packed"]
    assert t1 == t2 and cells2 < cells1  # the same targets in fewer cells
    assert torch.allclose(l1, l2, rtol=1e-6, atol=1e-6), (l1, l2)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:
        assert torch.allclose(g1[name], g2[name], rtol=1e-4, atol=1e-6), (name, (g1[name] - g2[name]).abs().max())


def test_no_token_attends_across_examples():
    model = tiny_llama()
    batch = examples([6, 5, 4])
    b = collate_packed(batch, pad_id=0, width=15)
    assert b["input_ids"].shape == (1, 15) and int(b["num_tokens"]) == 15
    with torch.no_grad():
        before = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        changed = b["input_ids"].clone()
        changed[0, :6] = (changed[0, :6] + 1) % 97  # the first example only (the longest is placed first)
        after = model(input_ids=changed, position_ids=b["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([batch[1].input_ids])).logits  # the 5-token example on its own
    assert not torch.allclose(before[0, :6], after[0, :6])
    assert torch.equal(before[0, 6:], after[0, 6:])  # the other examples do not see the first one
    assert torch.allclose(before[0, 6:11], alone[0], atol=1e-5)  # and compute as if alone, from position 0


def test_classification_batches_are_refused():
    with pytest.raises(ValueError, match="per-token labels"):
        collate_packed([Example([1, 2, 3], 1, "x")], pad_id=0)


def tiny_opt():
    """A tiny OPT: its attention masks by the padding mask alone, so it cannot keep packed examples apart."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_dim=48, word_embed_proj_dim=32, max_position_embeddings=64))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_probe_passes_models_that_keep_packed_examples_apart(attn):
    model = lk.add_lora(tiny_llama(), lk.LoraConfig(r=4, alpha=8, dropout=0.1))
    model.set_attn_implementation(attn)
    model.train()
    assert packing_problem(model) is None
    assert model.training  # the probe runs in eval mode and gives the mode back
    assert packing_problem(tiny_llama().to(torch.bfloat16)) is None


def test_the_probe_finds_a_model_whose_attention_crosses_examples():
    assert "attention crosses packed examples" in packing_problem(tiny_opt())

    class NoPositions(torch.nn.Module):  # a forward without position_ids
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, use_cache=False):
            return self.embed(input_ids)

    assert packing_problem(NoPositions()).startswith("a packed forward of this model fails (TypeError")


def test_auto_packs_causal_lm_training_in_one_process_and_says_why():
    data, note = resolve_packing(DataConfig(packing="auto"), "causal-lm", "none", tiny_llama())
    assert data.packing is True and note.startswith("data.packing auto -> true: causal-LM training in one process")
    assert DataConfig().packing is False and DataConfig().group_by_length is False  # the defaults
    for task, distributed, why in (("seq-cls", "none", "task seq-cls"), ("causal-lm", "ddp", "distributed=ddp"),
                                   ("causal-lm", "none", "its attention crosses packed examples")):
        model = tiny_opt() if why.startswith("its attention") else tiny_llama()
        data, note = resolve_packing(DataConfig(packing="auto"), task, distributed, model)
        assert data.packing is False and note.startswith(f"data.packing auto -> false: {why}"), note


def test_explicit_values_stay_and_an_explicit_true_on_a_model_that_cannot_pack_is_an_error():
    for value in (True, False):
        config = DataConfig(packing=value)
        assert resolve_packing(config, "causal-lm", "none", tiny_llama()) == (config, None)
    with pytest.raises(LorakitError, match="data.packing=true, but its attention crosses packed examples"):
        resolve_packing(DataConfig(packing=True), "causal-lm", "none", tiny_opt())


@pytest.mark.parametrize("value", ["yes", "AUTO", 1, None])
def test_packing_accepts_true_false_or_auto_only(value):
    with pytest.raises(LorakitError, match=f"data.packing must be true, false or auto, got {value!r}"):
        DataConfig(packing=value)


def test_an_auto_run_packs_says_why_and_saves_the_choice(tmp_path, capsys):
    import json

    import yaml

    from lorakit.train import TrainConfig, train
    from tiny_text import tiny_tokenizer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the {a} and the {b}", "completion": f"{b} {a}"}) + "\n"
                            for a in ("cat", "dog", "bird") for b in ("tree", "house", "car red big")))
    config = TrainConfig.from_dict({"output_dir": str(tmp_path / "run"), "tensorboard": False, "progress": False,
                                    "base_dtype": "fp32", "save_every": 0, "eval_every": 0,
                                    "data": {"train_file": str(data), "packing": "auto"},
                                    "optim": {"batch_size": 4, "max_steps": 2}})
    result = train(config, lk.add_lora(tiny_llama(), lk.LoraConfig(r=4, alpha=8)), tiny_tokenizer())
    why = "data.packing auto -> true: causal-LM training in one process, and the model keeps packed examples apart"
    assert why in capsys.readouterr().out
    saved = (result.run_dir / "config.yaml").read_text()
    assert f"# {why}" in saved and yaml.safe_load(saved)["data"]["packing"] is True
    assert yaml.safe_load(saved)["data"]["group_by_length"] is False
