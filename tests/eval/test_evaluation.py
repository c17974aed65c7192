"""Evaluation: metric wrappers against hand-checkable cases and the reference implementations' own values, decoding,
classification prediction, and evaluating base + adapters (+ merged) in one call."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import lorakit as lk
from conftest import single_threaded, randomize_lora_B, tiny_bert, tiny_llama
from lorakit.errors import LorakitError
from lorakit.eval.evaluate import (EvalConfig, GenerationConfig, classification_metrics, evaluate_many, generate,
                                generation_metrics, predict_classes, results_table)
from tiny_text import save_tiny_lm, tiny_tokenizer

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR 1.5 needs Java")


one_thread = pytest.fixture(autouse=True, name="one_thread")(single_threaded)


def test_bleu_matches_sacrebleu_documented_example():
    # sacrebleu's README: two reference streams, corpus BLEU 48.53.
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [["The dog bit the man.", "The dog had bit the man."], ["It was not unexpected.", "No one was surprised."],
            ["The man bit him first.", "The man had bitten the dog."]]
    assert generation_metrics(hyps, refs, ["bleu"])["bleu"] == pytest.approx(48.53, abs=0.01)


def test_nist_matches_nltk_and_uses_every_reference():
    from nltk.translate.nist_score import corpus_nist

    hyps = ["the pub is near the river .", "a cheap cafe in the city centre"]
    refs = [["the pub is by the river .", "near the river there is a pub ."], ["a cheap cafe is in the centre"]]
    expected = corpus_nist([[r.split() for r in rs] for rs in refs], [h.split() for h in hyps], n=5)
    assert generation_metrics(hyps, refs, ["nist"])["nist"] == pytest.approx(expected)
    one_ref = generation_metrics(hyps, [rs[:1] for rs in refs], ["nist"])["nist"]
    assert one_ref != pytest.approx(expected)  # the second reference counts


@needs_java
def test_identical_and_disjoint_hypotheses():
    same = generation_metrics(["the cat sat on the mat today"], [["The cat sat on the mat today"]])
    assert same["bleu"] == pytest.approx(100)
    assert same["rouge_l"] == pytest.approx(100)
    assert same["meteor"] == pytest.approx(100)
    assert same["nist"] > 0
    disjoint = generation_metrics(["xx yy zz ww"], [["aa bb cc dd"]], ["bleu", "nist", "rouge_l", "cider"])
    assert disjoint == {"bleu": 0.0, "nist": 0.0, "rouge_l": 0.0, "cider": 0.0}


def test_rouge_l_by_hand_and_max_over_references():
    # LCS("a b c d", "a c d e") = 3: P = R = 3/4, F = 75. With a second, better reference the max wins.
    assert generation_metrics(["a b c d"], [["a c d e"]], ["rouge_l"])["rouge_l"] == pytest.approx(75.0)
    assert generation_metrics(["a b c d"], [["a c d e", "a b c x"]], ["rouge_l"])["rouge_l"] == pytest.approx(75.0)
    assert generation_metrics(["a b c d"], [["a c d e", "a b c d"]], ["rouge_l"])["rouge_l"] == pytest.approx(100.0)


def test_cider_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    hyps = ["the pub is near the river", "a cheap cafe", "an old pub"]
    refs = [["the pub is by the river", "a pub near the river"], ["a cheap cafe in town"], ["the old pub", "an old inn"]]
    expected = Cider().compute_score({i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})[0]
    assert generation_metrics(hyps, refs, ["cider"])["cider"] == pytest.approx(expected)


def test_generation_metric_errors():
    with pytest.raises(LorakitError, match="allowed"):
        generation_metrics(["a"], [["a"]], ["bleurt"])
    with pytest.raises(LorakitError, match="one reference list per hypothesis"):
        generation_metrics(["a", "b"], [["a"]])


def test_classification_metrics_by_hand():
    # preds vs labels: TP 2, TN 1, FP 1, FN 0 -> accuracy 75, F1 = 2·2/(2·2+1) = 80, MCC = 2/√12.
    preds, labels = [1, 0, 1, 1], [1, 0, 0, 1]
    assert classification_metrics("mrpc", preds, labels) == pytest.approx({"accuracy": 75.0, "f1": 80.0})
    assert classification_metrics("cola", preds, labels)["matthews"] == pytest.approx(100 * 2 / 12 ** 0.5)
    sts = classification_metrics("stsb", [0.5, 1.0, 4.0], [1.0, 2.0, 3.0])
    assert sts["spearman"] == pytest.approx(100.0)
    assert sts["pearson"] == pytest.approx(100 * 3.5 / (43 / 6 * 2) ** 0.5)  # cov 3.5, Σdx² 43/6, Σdy² 2


def test_eval_config_collects_problems_and_rejects_unknown_keys():
    with pytest.raises(LorakitError) as err:
        EvalConfig(task="squad", limit=0, generation=GenerationConfig(decoding="sample", batch_size=0))
    message = str(err.value)
    for part in ("task", "limit", "decoding", "batch_size"):
        assert part in message
    with pytest.raises(LorakitError, match="allowed keys"):
        EvalConfig.from_dict({"task": "e2e", "beams": 3})


def _greedy_by_hand(model, tok, prompt: str, steps: int) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    for _ in range(steps):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        if nxt.item() == tok.eos_token_id:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tok.decode(ids[0, len(tok(prompt)["input_ids"]):], skip_special_tokens=True).split("\n")[0].strip()


def test_batched_greedy_matches_a_hand_loop_and_beam_runs():
    model, tok = tiny_llama(), tiny_tokenizer()
    prompts = ["the cat is", "a big red car and the dog", "hello"]
    cfg = GenerationConfig(max_new_tokens=6, batch_size=3)
    batched = generate(model, tok, prompts, cfg)
    assert batched == [_greedy_by_hand(model, tok, p, 6) for p in prompts]
    assert generate(model, tok, prompts, GenerationConfig(max_new_tokens=6, batch_size=1)) == batched
    beams = generate(model, tok, prompts, GenerationConfig(decoding="beam", num_beams=3, max_new_tokens=6))
    assert len(beams) == 3 and all(isinstance(b, str) for b in beams)
    assert tok.padding_side == "right" or tok.padding_side == tiny_tokenizer().padding_side  # restored


def test_predict_classes_matches_model_and_ignores_batching():
    model, tok = tiny_bert(num_labels=3), tiny_tokenizer()
    texts = [("the cat", "a dog"), ("big red car", "the old house is near"), ("hello", "world")]
    preds = predict_classes(model, tok, texts, batch_size=2)
    with torch.no_grad():
        for (a, b), p in zip(texts, preds):
            assert model(**tok(a, b, return_tensors="pt")).logits.argmax().item() == p
    assert predict_classes(model, tok, texts, batch_size=1) == preds


def random_adapters(root, seeds=(1, 2)) -> list[str]:
    """Adapter folders root/ad<seed> on the tiny Llama, each with random B so that it changes the outputs."""
    paths = []
    for seed in seeds:
        model = tiny_llama()
        lk.add_lora(model, lk.LoraConfig(r=2, alpha=4))
        randomize_lora_B(model, std=2.0, seed=seed)
        paths.append(str(lk.save_adapter(model, root / f"ad{seed}")))
    return paths


def test_evaluate_many_base_adapters_and_merged(tmp_path):
    folder = save_tiny_lm(tmp_path / "tiny")
    data = tmp_path / "data" / "e2e"
    data.mkdir(parents=True)
    rows = [{"meaning_representation": "name[the pub], near[the river]", "references": ["the pub is near the river",
                                                                                          "near the river is a pub"]},
            {"meaning_representation": "name[a cafe], price[low]", "references": ["a cafe with a low price"]}]
    (data / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = random_adapters(tmp_path)
    config = EvalConfig(task="e2e", data_dir=str(tmp_path / "data"), metrics=["bleu", "rouge_l"],
                        generation=GenerationConfig(max_new_tokens=5))
    report = evaluate_many(config, model=str(folder), adapters=paths, out_dir=tmp_path / "out")
    assert list(report["results"]) == ["base", "ad1", "ad2"]
    outputs = {n: (tmp_path / "out" / "outputs" / f"{n}.jsonl").read_text() for n in report["results"]}
    assert outputs["ad1"] != outputs["base"] and outputs["ad2"] != outputs["ad1"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"]["ad1"]["examples"] == 2
    assert "| ad2 |" in (tmp_path / "out" / "results.md").read_text()
    merged = evaluate_many(config, model=str(folder), adapters=paths, include_base=False, merge=True,
                           out_dir=tmp_path / "merged")
    for name in ("ad1", "ad2"):
        assert (tmp_path / "merged" / "outputs" / f"{name}.jsonl").read_text() == outputs[name]
        assert merged["results"][name]["bleu"] == pytest.approx(report["results"][name]["bleu"])
    with pytest.raises(LorakitError, match="does not exist"):
        evaluate_many(config, model=str(folder), adapters=[str(tmp_path / "nope")])


def test_results_table_formats_numbers():
    table = results_table({"base": {"bleu": 12.3456, "trainable_params": 1234567}}, ["bleu", "trainable_params"])
    assert "| base | 12.35 | 1,234,567 |" in table
