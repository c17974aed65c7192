"""The benchmark scripts' own logic: which target settings can be selected, that they share one parameter budget,
that --merge/--reuse refuse results measured with other settings, and that their training takes lorakit's step (on
tiny in-process models)."""

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _common as C  # noqa: E402
import ablation_targets  # noqa: E402
import glue  # noqa: E402

# SmolLM2-135M: hidden 576, grouped-query attention with 3 KV heads × 64, 30 layers
SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576)}


def test_every_target_setting_is_selectable_and_in_table_order():
    names = list(ablation_targets.SETTINGS)
    assert ablation_targets.select(",".join(reversed(names))) == names
    assert ablation_targets.select("W_q+W_v,W_k") == ["W_k", "W_q+W_v"]
    with pytest.raises(SystemExit, match="unknown"):
        ablation_targets.select("W_q,W_v,W_x")


def test_target_settings_share_the_parameter_budget():
    counts = {name: 30 * r * sum(sum(SHAPES[t]) for t in targets)
              for name, (targets, r) in ablation_targets.SETTINGS.items()}
    assert counts["W_q+W_v"] == 230_400
    assert all(abs(c - 230_400) / 230_400 < 0.06 for c in counts.values()), counts


def _args(tmp_path, **over):
    base = {"seed": 0, "steps": 30, "batch_size": 8, "train_examples": 240, "eval_limit": 24, "decoding": "greedy",
            "num_beams": 4, "max_new_tokens": 32, "bf16": False, "alpha": 32.0, "lr": 1e-3, "out": str(tmp_path),
            "merge": True}
    return argparse.Namespace(**{**base, **over})


def test_merge_and_reuse_keep_rows_only_from_the_same_settings(tmp_path):
    earlier = _args(tmp_path)
    (tmp_path / "ablation_rank.json").write_text(json.dumps({"args": vars(earlier), "results": {"r=1": {"bleu": 1.0}}}))
    e2e_args = {k: v for k, v in vars(earlier).items() if k not in ("alpha", "lr")} | {"lr_lora": 1e-3}
    (tmp_path / "e2e.json").write_text(json.dumps({"args": e2e_args, "results": {"lora": {"bleu": 2.0}}}))

    assert C.earlier_rows(_args(tmp_path), "ablation_rank") == {"r=1": {"bleu": 1.0}}
    assert C.earlier_rows(_args(tmp_path, merge=False), "ablation_rank") == {}
    with pytest.raises(SystemExit, match="steps"):
        C.earlier_rows(_args(tmp_path, steps=60), "ablation_rank")

    row, values = C.reused_row(_args(tmp_path), f"r=4={tmp_path / 'e2e.json'}:lora")
    assert row == "r=4" and values == {"bleu": 2.0, "reused_from": "e2e.json:lora"}
    with pytest.raises(SystemExit, match="lr_lora"):
        C.reused_row(_args(tmp_path, lr=5e-3), f"r=4={tmp_path / 'e2e.json'}:lora")


def test_glue_merge_keeps_rows_only_from_the_same_settings_and_counts_them_in_the_budget(tmp_path):
    def args(**over):
        base = {"seed": 0, "steps": 60, "batch_size": 16, "train_examples": None, "full_size": False, "bf16": False,
                "lr_lora": 5e-3, "lr_full": 5e-5, "lora_heads": "classifier", "out": str(tmp_path), "name": "glue_x",
                "merge": True}
        return argparse.Namespace(**{**base, **over})

    rows = {"sst2 lora": {"accuracy": 79.1}, "rte lora": {"accuracy": 50.4}}
    older = {k: v for k, v in vars(args()).items() if k != "lora_heads"}  # written before --lora-heads existed
    (tmp_path / "glue_x.json").write_text(json.dumps({"args": older, "results": rows}))
    assert glue.earlier_rows(args()) == rows
    with pytest.raises(SystemExit, match="lora_heads classifier vs classifier,pooler"):
        glue.earlier_rows(args(lora_heads="classifier,pooler"))
    assert glue.earlier_rows(args(merge=False)) == {}
    with pytest.raises(SystemExit, match="lr_lora 0.005 vs 0.001"):
        glue.earlier_rows(args(lr_lora=1e-3))
    with pytest.raises(SystemExit, match="steps"):
        glue.earlier_rows(args(steps=150))
    assert glue.budget(args(), {**rows, "cola lora": {}, "cola full": {}}).startswith("tasks 3, methods 2, steps 60")
    assert list(glue.ordered({"stsb full": {}, "cola lora": {}, "sst2 full": {}, "stsb lora": {}})) == [
        "sst2 full", "cola lora", "stsb lora", "stsb full"]


def test_e2e_markdown_names_the_reused_rows(tmp_path):
    rows = {"r=2": {"bleu": 62.0}, "r=4": {"bleu": 61.5, "reused_from": "e2e_nlg.json:lora"}}
    C.write_e2e("rank_x", _args(tmp_path), "steps 30", rows, "# Rank", "title")
    md = (tmp_path / "rank_x.md").read_text()
    assert "not trained again: r=4 = e2e_nlg.json:lora." in md
    assert "| r=4 | – | – | 61.50 |" in md
    assert json.loads((tmp_path / "rank_x.json").read_text())["results"] == rows


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_train_takes_lorakits_step_on_the_scripts_batches(monkeypatch, capsys):
    import lorakit.train.loop as loop
    from conftest import tiny_llama
    from lorakit import LoraConfig

    calls = []
    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda run, batches=None: calls.append(len(batches)) or
                        real_step(run, batches))
    torch.manual_seed(0)
    ids = torch.randint(1, 97, (4, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model = tiny_llama()
    C.prepare(model, "lora", LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        loss0 = float(model(**batch).loss)
    out = C.train(model, iter([batch] * 5), steps=5, lr=1e-2, bf16=False, warmup=2, log_every=2, tag="t")
    assert list(out) == ["steps", "train_seconds", "first_loss", "final_loss", "seconds_per_step"]
    assert out["steps"] == 5 and calls == [1] * 5 and not model.training
    assert out["first_loss"] == pytest.approx(loss0, abs=1e-4) and out["final_loss"] < out["first_loss"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  [t] step")]
    assert [line.split()[2] for line in lines] == ["1/5", "2/5", "4/5"]


def test_train_trains_a_classifier_fully_with_its_sentence_pairs():
    from conftest import tiny_bert

    torch.manual_seed(0)
    ids = torch.randint(1, 97, (4, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "token_type_ids": torch.tensor([[0] * 5 + [1] * 5] * 4), "labels": torch.tensor([0, 1, 2, 1])}
    model = _no_dropout(tiny_bert())
    with torch.no_grad():  # segments and head large enough for the loss to tell whether token_type_ids arrived
        model.bert.embeddings.token_type_embeddings.weight.normal_(0, 1.0)
        model.classifier.weight.normal_(0, 1.0)
    C.prepare(model, "full")
    with torch.no_grad():
        loss0 = float(model(**batch).loss)
        without_pairs = float(model(**{k: v for k, v in batch.items() if k != "token_type_ids"}).loss)
    assert abs(loss0 - without_pairs) > 1e-3  # so the first loss shows the segments reached the model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = C.train(model, iter([batch] * 3), steps=3, lr=1e-3, bf16=False, warmup=0, log_every=10, tag="cls")
    assert out["first_loss"] == pytest.approx(loss0, abs=1e-4)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.endswith("weight")
               and "embeddings" not in n)
