"""`lorakit eval --data`: the user's own instruction, chat and classification files read as training reads them, the
base and several adapters in one table, per-example JSONL, the bar chart, metric values against the libraries called
directly, and bad files reported by file and line."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import lorakit as lk
from conftest import tiny_bert
from lorakit.cli.main import main
from lorakit.data.benchmarks import GLUE_TASKS
from lorakit.data.records import prompt_ids
from lorakit.errors import LorakitError
from lorakit.eval.evaluate import (EvalConfig, GenerationConfig, evaluate_many, generate, generation_metrics,
                                   label_metrics, predict_choices)
from lorakit.inference.generate import encode_chat
from test_evaluation import one_thread, random_adapters  # noqa: F401 (one_thread: a fixture; tiny matrices run faster on one thread)
from tiny_text import save_tiny_lm, tiny_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny causal LM folder and two adapters that change its outputs."""
    root = tmp_path_factory.mktemp("lm")
    folder = save_tiny_lm(root / "tiny")
    return str(folder), random_adapters(root)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


INSTRUCTIONS = [{"prompt": "the cat is", "completion": "on the road"},
                {"prompt": "where is the pub", "completion": ["near the river", "by the river"]},
                {"prompt": "what is the price", "completion": "low"}]


def test_instruction_file_base_and_adapters_in_one_table(tmp_path, lm):
    folder, adapters = lm
    data = write_jsonl(tmp_path / "val.jsonl", INSTRUCTIONS)
    config = EvalConfig(data=str(data), metrics=["exact_match", "bleu", "chrf", "rouge_l"],
                        generation=GenerationConfig(max_new_tokens=6))
    report = evaluate_many(config, model=folder, adapters=adapters, out_dir=tmp_path / "out")
    assert list(report["results"]) == ["base", "ad1", "ad2"]
    assert report["format"] == "instruction" and report["metrics"] == ["exact_match", "bleu", "chrf", "rouge_l"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert all(f"| {name} |" in table for name in ("base", "ad1", "ad2"))
    assert json.loads((tmp_path / "out" / "results.json").read_text())["results"]["ad2"]["examples"] == 3
    assert (tmp_path / "out" / "results.png").read_bytes()[:8] == PNG

    model, tok = lk.load_model(folder)
    prompts = [prompt_ids(tok, r["prompt"]) for r in INSTRUCTIONS]  # training's prompt: the chat template
    by_name = {}
    for name in ("base", "ad1", "ad2"):
        rows = [json.loads(line) for line in (tmp_path / "out" / "outputs" / f"{name}.jsonl").read_text().splitlines()]
        assert [r["source"] for r in rows] == [f"{data}:{i}" for i in (1, 2, 3)]
        assert rows[1]["references"] == ["near the river", "by the river"]
        by_name[name] = [r["output"] for r in rows]
    assert by_name["base"] == generate(model, tok, prompts, GenerationConfig(max_new_tokens=6), first_line=False)
    assert by_name["ad1"] != by_name["base"] and by_name["ad2"] != by_name["ad1"]

    import sacrebleu
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    hyps = by_name["ad1"]
    streams = [["on the road", "near the river", "low"], [None, "by the river", None]]
    scores = report["results"]["ad1"]
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, streams, lowercase=True).score, abs=1e-4)
    assert scores["chrf"] == pytest.approx(CHRF(lowercase=True).corpus_score(hyps, streams).score, abs=1e-4)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    refs = [["on the road"], ["near the river", "by the river"], ["low"]]
    rouge = sum(scorer.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / 3
    assert scores["rouge_l"] == pytest.approx(100 * rouge, abs=1e-4)


def test_exact_match_and_chrf_by_hand():
    # exact match ignores case and spacing, and any reference counts: 2 of 3.
    scores = generation_metrics(["Near  the river", "low", "high"], [["by the river", "near the river"], ["low"],
                                                                      ["low"]], ["exact_match"])
    assert scores["exact_match"] == pytest.approx(200 / 3)
    assert generation_metrics(["a b"], [["a b"]], ["chrf"])["chrf"] == pytest.approx(100.0)


def test_chat_file_scores_the_last_assistant_turn(tmp_path, lm):
    folder, adapters = lm
    chats = [{"messages": [{"role": "system", "content": "be good"}, {"role": "user", "content": "hello"},
                           {"role": "assistant", "content": "hello world"}]},
             {"messages": [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "is big"},
                           {"role": "user", "content": "and the cat"}, {"role": "assistant", "content": "is small"}]}]
    data = write_jsonl(tmp_path / "chat.jsonl", chats)
    config = EvalConfig(data=str(data), generation=GenerationConfig(max_new_tokens=5))
    report = evaluate_many(config, model=folder, adapters=adapters[:1], out_dir=tmp_path / "out")
    assert report["format"] == "chat" and list(report["results"]) == ["base", "ad1"]
    assert report["metrics"] == ["exact_match", "bleu", "chrf", "rouge_l"]  # the generation defaults
    rows = [json.loads(line) for line in (tmp_path / "out" / "outputs" / "base.jsonl").read_text().splitlines()]
    assert [r["references"] for r in rows] == [["hello world"], ["is small"]]
    assert [r["prompt"] for r in rows] == ["hello", "and the cat"]
    model, tok = lk.load_model(folder)
    prompts = [encode_chat(tok, c["messages"][:-1]) for c in chats]
    assert [r["output"] for r in rows] == generate(model, tok, prompts, GenerationConfig(max_new_tokens=5),
                                                   first_line=False)


def test_classification_by_label_choice_matches_a_hand_computation(tmp_path, lm):
    folder, adapters = lm
    data = tmp_path / "cls.csv"
    rows = [("the cat is happy", "good"), ("the dog is sad", "bad"), ("a big red car", "good"), ("cold night", "bad")]
    with open(data, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sentence", "sentiment"])
        writer.writerows(rows)
    config = EvalConfig(data=str(data), format="classification", text_field="sentence", label_field="sentiment",
                        metrics=["accuracy", "f1", "matthews"])
    report = evaluate_many(config, model=folder, adapters=adapters, out_dir=tmp_path / "out")
    assert report["classify"] == "choice" and list(report["results"]) == ["base", "ad1", "ad2"]
    assert (tmp_path / "out" / "results.png").read_bytes()[:8] == PNG

    model, tok = lk.load_model(folder)
    lk.load_adapter(model, adapters[0], adapter="ad1")
    lk.set_adapter(model, "ad1")
    expected = []
    with torch.no_grad():
        for text, _ in rows:  # log p(label tokens + EOS | chat-templated text), labels in sorted order
            prompt = prompt_ids(tok, text)
            totals = []
            for label in ("bad", "good"):
                answer = tok(label, add_special_tokens=False).input_ids + [tok.eos_token_id]
                logp = model(input_ids=torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
                totals.append(sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(answer)))
            expected.append(("bad", "good")[max(range(2), key=totals.__getitem__)])
    out = [json.loads(line) for line in (tmp_path / "out" / "outputs" / "ad1.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in out] == expected
    assert [r["label"] for r in out] == [label for _, label in rows]
    assert predict_choices(model, tok, [prompt_ids(tok, t) for t, _ in rows], ["bad", "good"], batch_size=1) == \
        [("bad", "good").index(e) for e in expected]

    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    gold = [("bad", "good").index(label) for _, label in rows]
    pred = [("bad", "good").index(e) for e in expected]
    scores = report["results"]["ad1"]
    assert scores["accuracy"] == pytest.approx(100 * accuracy_score(gold, pred), abs=1e-4)
    assert scores["f1"] == pytest.approx(100 * f1_score(gold, pred), abs=1e-4)
    assert scores["matthews"] == pytest.approx(100 * matthews_corrcoef(gold, pred), abs=1e-4)


def test_classification_with_a_sequence_classification_head(tmp_path):
    folder = tmp_path / "bert"
    model = tiny_bert(num_labels=3)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    rows = [{"text": "the cat", "pair": "a dog", "label": "b"}, {"text": "big red car", "pair": "old house",
                                                                "label": "a"},
            {"text": "hello", "pair": "world", "label": "c"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    # A sequence-classification folder (or an adapter saved from one) is classified with its head by default.
    report = evaluate_many(EvalConfig(data=str(data), text_pair_field="pair", metrics=["accuracy", "f1"]),
                           model=str(folder), out_dir=tmp_path / "out")
    assert report["classify"] == "head"
    tok = tiny_tokenizer()
    with torch.no_grad():
        expected = [model(**tok(r["text"], r["pair"], return_tensors="pt")).logits.argmax().item() for r in rows]
    out = [json.loads(line) for line in (tmp_path / "out" / "outputs" / "base.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in out] == [("a", "b", "c")[i] for i in expected]
    gold = [("a", "b", "c").index(r["label"]) for r in rows]
    assert report["results"]["base"]["f1"] == pytest.approx(label_metrics(expected, gold, ["f1"])["f1"], abs=1e-4)
    from sklearn.metrics import f1_score
    assert label_metrics(expected, gold, ["f1"])["f1"] == pytest.approx(100 * f1_score(gold, expected, average="macro"))


def test_sampling_is_seeded(tmp_path, lm):
    folder, _ = lm
    data = write_jsonl(tmp_path / "val.jsonl", INSTRUCTIONS)

    def outputs(seed):
        config = EvalConfig(data=str(data), metrics=["bleu"],
                            generation=GenerationConfig(max_new_tokens=6, temperature=1.5, seed=seed))
        evaluate_many(config, model=folder, out_dir=tmp_path / f"s{seed}")
        return (tmp_path / f"s{seed}" / "outputs" / "base.jsonl").read_text()

    first = outputs(3)
    assert outputs(3) == first
    assert any(outputs(seed) != first for seed in (4, 5, 6))
    with pytest.raises(LorakitError, match="beam search does not"):
        EvalConfig(generation=GenerationConfig(decoding="beam", temperature=0.7))


def test_bad_files_name_the_file_line_and_fields(tmp_path, lm):
    folder, _ = lm
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "answer": "d"}])
    with pytest.raises(LorakitError) as err:
        evaluate_many(EvalConfig(data=str(missing), format="instruction"), model=folder)
    assert f"{missing}:2" in str(err.value) and "['answer', 'prompt']" in str(err.value)
    assert "--completion-field" in str(err.value)

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", \n')
    with pytest.raises(LorakitError, match=f"{broken}:2: malformed JSON"):
        evaluate_many(EvalConfig(data=str(broken)), model=folder)

    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(LorakitError, match=r"unknown.jsonl:1: cannot tell the data format from the fields \['answer', "
                                           r"'question'\]"):
        evaluate_many(EvalConfig(data=str(unknown)), model=folder)

    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "the cat"}])
    with pytest.raises(LorakitError, match="'text' format.*allowed.*instruction"):
        evaluate_many(EvalConfig(data=str(text)), model=folder)

    no_answer = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(LorakitError, match=r"chat.jsonl:1: no assistant message.*\['user'\]"):
        evaluate_many(EvalConfig(data=str(no_answer)), model=folder)

    refs = write_jsonl(tmp_path / "refs.jsonl", [{"prompt": "a", "completion": ["ok", 3]}])
    with pytest.raises(LorakitError, match="refs.jsonl:1: field 'completion' must be a string or a non-empty list"):
        evaluate_many(EvalConfig(data=str(refs)), model=folder)

    good = write_jsonl(tmp_path / "good.jsonl", INSTRUCTIONS)
    with pytest.raises(LorakitError, match=r"metrics \['accuracy'\] do not apply to instruction data"):
        evaluate_many(EvalConfig(data=str(good), metrics=["accuracy"]), model=folder)
    with pytest.raises(LorakitError) as err:
        EvalConfig(data=str(good), task="sst2", format="yaml", metrics=["bleurt"])
    for part in ("not both", "format must be one of", "bleurt"):
        assert part in str(err.value)
    with pytest.raises(LorakitError, match="does not exist"):
        evaluate_many(EvalConfig(data=str(tmp_path / "nope.jsonl")), model=folder)


def test_cli_eval_data_several_adapters(tmp_path, lm, capsys):
    folder, adapters = lm
    data = write_jsonl(tmp_path / "val.jsonl", INSTRUCTIONS)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", *adapters, "--model", folder, "--data", str(data), "--metrics", "exact_match,bleu",
              "--metrics", "chrf", "--max-new-tokens", "4", "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert exit_.value.code == 0, out.err
    assert "| ad1 |" in out.out and "| base |" in out.out and "chrf" in out.out
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["metrics"] == ["exact_match", "bleu", "chrf"] and saved["data"] == str(data)
    assert (tmp_path / "out" / "results.png").read_bytes()[:8] == PNG
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", folder, "--data", str(tmp_path / "missing.jsonl")])
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_glue_presets_are_the_same_path_with_a_head(tmp_path):
    from lorakit.eval.evaluate import classification_metrics, predict_classes

    rows = {"sst2": [{"idx": i, "sentence": s, "label": y} for i, (s, y) in
                     enumerate([("the cat", 1), ("a bad day", 0), ("hello world", 1), ("cold", 0)])],
            "stsb": [{"idx": i, "sentence1": a, "sentence2": b, "label": y} for i, (a, b, y) in
                     enumerate([("the cat", "a cat", 4.5), ("red car", "old house", 0.5), ("sun", "moon", 2.0)])]}
    for task, num_labels in (("sst2", 2), ("stsb", 1)):
        (tmp_path / "data" / "glue" / task).mkdir(parents=True)
        write_jsonl(tmp_path / "data" / "glue" / task / "validation.jsonl", rows[task])
        folder = tmp_path / task
        model = tiny_bert(num_labels=num_labels)
        model.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        report = evaluate_many(EvalConfig(task=task, data_dir=str(tmp_path / "data")), model=str(folder))
        assert report["classify"] == "head" and report["metrics"] == list(GLUE_TASKS[task].metrics)
        texts = [tuple(r[k] for k in r if k.startswith("sentence")) for r in rows[task]]
        expected = classification_metrics(task, predict_classes(model, tiny_tokenizer(), texts),
                                          [r["label"] for r in rows[task]])
        got = {k: v for k, v in report["results"]["base"].items() if k in expected}
        assert got == pytest.approx(expected, abs=1e-4)


def test_adapters_saved_from_a_classifier_choose_the_head(tmp_path, lm):
    from lorakit.eval.evaluate import has_head

    folder, adapters = lm
    bert = tiny_bert(num_labels=2)
    lk.add_lora(bert, lk.LoraConfig(r=2, alpha=4, target_modules=["query", "value"]))
    classifier = str(lk.save_adapter(bert, tmp_path / "cls"))
    assert has_head(folder, [adapters[0], classifier]) and not has_head(folder, adapters)
