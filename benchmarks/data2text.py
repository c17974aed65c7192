"""The data-to-text tasks of the sweeps (benchmarks/sweep.py): E2E, WebNLG 2017 and DART, read in place from the shared
data folder, each cut into fixed train / select / test parts, and their metrics (BLEU, METEOR, TER, ...).

Only official dev files of WebNLG and DART are staged (see ../shared/data/README.md), so their train and test halves
are cut from them here, by entry (a WebNLG entry or a DART triple set, with all its references), never by reference:
the same input never appears on both sides. The cut is a seeded shuffle (random.Random(data_seed)) of the entries in
file order; the first half (rounded down) is the test half, the rest the train half, from which `select` entries are
held out for choosing the learning rate. WebNLG: the categories listed as unseen go to the test half whole (the
"unseen" rows; WebNLG 2017's own unseen categories are only in its test set, which is not staged), and only the other
categories' entries are halved ("seen" test rows come from categories the model was trained on).

E2E: the official train pairs are the training pool; the 547 dev MRs are shuffled with `data_seed`, the first
`select` are the select set and the next `test` the test set, disjoint.

A task is a dict: "train" [(prompt, target)], "select"/"test" [{"prompt", "references", "group"}].
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

from _common import load_e2e  # noqa: F401  (also puts src/ on sys.path)
from lorakit.eval.evaluate import e2e_prompt, generation_metrics

TRIPLES_PROMPT = "Write one sentence stating these facts.\nFacts: {facts}\nSentence:"


def triples_prompt(triples: Sequence[Sequence[str]]) -> str:
    """The prompt for WebNLG and DART: "subject : property : object" triples joined by " | " (DBpedia's underscores
    as spaces), in the E2E prompt's form."""
    facts = " | ".join(" : ".join(str(x).replace("_", " ").strip() for x in t) for t in triples)
    return TRIPLES_PROMPT.format(facts=facts)


def read_webnlg(data_dir: str | Path) -> list[dict[str, Any]]:
    """webnlg/dev.json entries: {"id", "category", "triples", "references"} (English lexicalisations), file order."""
    raw = json.loads((Path(data_dir) / "webnlg" / "dev.json").read_text(encoding="utf-8"))["entries"]
    out = []
    for item in raw:
        ((key, e),) = item.items()
        triples = [(t["subject"], t["property"], t["object"]) for t in e["modifiedtripleset"]]
        refs = [lex["lex"] for lex in e["lexicalisations"] if lex.get("lang", "") in ("", "en")]
        out.append({"id": f"{e['category']}/{e['xml_id']}/{key}", "category": e["category"], "triples": triples,
                    "references": refs})
    return out


def read_dart(data_dir: str | Path) -> list[dict[str, Any]]:
    """dart-v1.1.1-full-dev.json triple sets: {"id", "triples", "references", "sources"}, file order."""
    raw = json.loads((Path(data_dir) / "dart" / "dart-v1.1.1-full-dev.json").read_text(encoding="utf-8"))
    return [{"id": str(i), "triples": [tuple(t) for t in e["tripleset"]],
             "references": [a["text"] for a in e["annotations"]],
             "sources": sorted({a["source"] for a in e["annotations"]})} for i, e in enumerate(raw)]


def split_entries(entries: list[dict], data_seed: int, select: int, unseen: Sequence[str] = ()
                  ) -> dict[str, list[dict]]:
    """train / select / test entries (see the module docstring); every entry lands in exactly one part."""
    unknown = set(unseen) - {e.get("category") for e in entries}
    if unknown:
        raise ValueError(f"unseen categories {sorted(unknown)} are not in the data")
    held = [e for e in entries if e.get("category") in unseen]
    rest = [e for e in entries if e.get("category") not in unseen]
    rest = rest[:]
    random.Random(data_seed).shuffle(rest)
    half = len(rest) // 2
    test, train = rest[:half], rest[half:]
    if select >= len(train):
        raise ValueError(f"select={select} leaves no training entries (train half has {len(train)})")
    return {"test": [*test, *held], "select": train[:select], "train": train[select:]}


def _eval_rows(entries: list[dict], unseen: Sequence[str] = ()) -> list[dict[str, Any]]:
    return [{"id": e["id"], "prompt": triples_prompt(e["triples"]), "references": e["references"],
             "group": ("unseen" if e.get("category") in unseen else "seen") if "category" in e else None}
            for e in entries]


def load_task(task: str, data_dir: str | Path, split: dict[str, Any]) -> dict[str, list]:
    """The train pairs and the select/test rows of `task` (e2e, webnlg, dart) under the settings `split`: data_seed,
    select, test (E2E: the number of test MRs; WebNLG/DART: a cap on the test rows, the first of the seeded order;
    WebNLG's unseen rows are always all kept), unseen (WebNLG categories held out of training), train_examples (a cap
    on training pairs, drawn with data_seed from the pool)."""
    seed, select = int(split.get("data_seed", 0)), int(split["select"])
    if task == "e2e":
        dev = load_e2e("dev", data_dir)
        order = list(range(len(dev)))
        random.Random(seed).shuffle(order)
        pick = [dev[i] for i in order]
        to_row = lambda r: {"id": r["mr"], "prompt": e2e_prompt(r["mr"]), "references": r["references"],  # noqa: E731
                            "group": None}
        test_n = int(split["test"])
        if select + test_n > len(dev):
            raise ValueError(f"select + test = {select + test_n} exceeds the {len(dev)} E2E dev MRs")
        pool = [(e2e_prompt(r["mr"]), r["references"][0]) for r in load_e2e("train", data_dir)]
        parts = {"select": [to_row(r) for r in pick[:select]],
                 "test": [to_row(r) for r in pick[select:select + test_n]]}
    elif task in ("webnlg", "dart"):
        unseen = tuple(split.get("unseen", ())) if task == "webnlg" else ()
        entries = read_webnlg(data_dir) if task == "webnlg" else read_dart(data_dir)
        cut = split_entries(entries, seed, select, unseen)
        # every reference of a training entry is one training pair
        pool = [(triples_prompt(e["triples"]), ref) for e in cut["train"] for ref in e["references"]]
        test = _eval_rows(cut["test"], unseen)
        if "test" in split:  # a cap on the test rows: on the seen ones only, the unseen categories stay whole
            seen = [r for r in test if r["group"] != "unseen"][:int(split["test"])]
            test = seen + [r for r in test if r["group"] == "unseen"]
        parts = {"select": _eval_rows(cut["select"], unseen), "test": test}
    else:
        raise ValueError(f"unknown data-to-text task {task!r}")
    cap = split.get("train_examples")
    if cap is not None and cap < len(pool):
        pool = random.Random(seed).sample(pool, int(cap))
    return {"train": pool, **parts}


def ter(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus TER ×100 (sacrebleu, case-insensitive), each hypothesis against all its references (lower is better);
    the LoRA paper prints it as a fraction (0.46 = 46 here)."""
    from sacrebleu.metrics import TER

    hyps = [" ".join(h.split()) for h in hypotheses]
    refs = [[" ".join(r.split()) for r in rs] for rs in references]
    most = max(len(rs) for rs in refs)
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(most)]  # sacrebleu's layout
    return float(TER(case_sensitive=False).corpus_score(hyps, streams).score)


def nlg_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str]
               ) -> dict[str, float]:
    """generation_metrics (lorakit.eval) plus "ter"."""
    scores = generation_metrics(hypotheses, references, [m for m in metrics if m != "ter"])
    if "ter" in metrics:
        scores["ter"] = ter(hypotheses, references)
    return scores
