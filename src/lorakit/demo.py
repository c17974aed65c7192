"""`make demo`: teach SmolLM2-135M-Instruct a skill it lacks, in a few minutes on a CPU, and prove it.

The skill: turn a person record whose fields come in random order ("job=nurse; city=Oslo; name=Ava; age=34") into
one sentence in a strict house format ("Ava (34) is a nurse in Oslo."), with the right article (a/an). The base model
answers helpfully but never in exactly this format. The data is generated here, deterministically; the held-out
records use names and cities that never occur in training, so the adapter must copy fields, not memorise them.

Steps: base answers and exact match on held-out prompts -> LoRA training (lorakit.train.train) -> the saved
adapter reloaded into a fresh base -> adapted answers and exact match -> merge, and check merged == unmerged.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.fsutil import atomic_write_text

NAMES = ("Ava Liam Noah Emma Olivia Mia Lucas Sofia Mateo Amelia Elena Hugo Ines Jonas Lea Marco Nora Oscar Paula "
         "Rafael Sara Tomas Uma Victor Wanda Yusuf Zoe Aaron Bianca Carlos Dara Emil Fatima Greta Hana Ivan Julia "
         "Kenji Lara Milan Nadia Omar Priya Quinn Rosa Stefan Tara Ugo Vera Wei").split()
CITIES = ("Oslo Lisbon Vienna Prague Dublin Madrid Berlin Warsaw Athens Riga Porto Lyon Milan Zurich Bergen Ghent "
          "Krakow Seville Turin Munich Leeds Malmo Tallinn Bilbao Bordeaux Geneva Helsinki Naples Salzburg Utrecht "
          "Valencia Aarhus Bristol Cork Delft").split()
JOBS = ("nurse architect teacher engineer baker pilot editor actor farmer dentist artist chef lawyer optician "
        "economist plumber inspector writer analyst carpenter surgeon astronomer mechanic officer librarian").split()
INSTRUCTION = "Summarise this record in one line."


def sentence(record: dict[str, Any]) -> str:
    article = "an" if record["job"][0] in "aeiou" else "a"
    return f"{record['name']} ({record['age']}) is {article} {record['job']} in {record['city']}."


def make_dataset(n_train: int = 300, n_test: int = 50, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic prompt/completion pairs; test names and cities are disjoint from training ones."""
    rng = random.Random(seed)
    names, cities = list(NAMES), list(CITIES)
    rng.shuffle(names)
    rng.shuffle(cities)
    split_n, split_c = len(names) * 4 // 5, len(cities) * 4 // 5

    def draw(n: int, names: list[str], cities: list[str]) -> list[dict]:
        rows = []
        for _ in range(n):
            record = {"name": rng.choice(names), "age": rng.randint(19, 79), "job": rng.choice(JOBS),
                      "city": rng.choice(cities)}
            keys = list(record)
            rng.shuffle(keys)
            fields = "; ".join(f"{k}={record[k]}" for k in keys)
            rows.append({"prompt": f"{INSTRUCTION}\nRecord: {fields}", "completion": sentence(record)})
        return rows

    return draw(n_train, names[:split_n], cities[:split_c]), draw(n_test, names[split_n:], cities[split_c:])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _answers(model, tokenizer, prompts: list[str], adapter: str | None, batch_size: int = 30) -> list[str]:
    from lorakit.inference.generate import Sampling, generate

    out = []
    for s in range(0, len(prompts), batch_size):
        out += [c.text.strip() for c in generate(model, tokenizer, prompts[s:s + batch_size], adapter,
                                                 sampling=Sampling(max_new_tokens=20), chat=True)]
    return out


def _exact(answers: list[str], rows: list[dict]) -> float:
    return sum(a == r["completion"] for a, r in zip(answers, rows)) / len(rows)


@torch.no_grad()
def _logits(model, tokenizer, rows: list[dict]) -> torch.Tensor:
    """Logits over held-out prompt + reference answer, padded batch (compared merged vs unmerged)."""
    from lorakit.data.records import DataConfig, Record, collate, tokenize

    data = tokenize([Record(r, "heldout") for r in rows], tokenizer, DataConfig(format="instruction"))
    batch = collate(data.examples, tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    return logits[batch["attention_mask"].bool()]  # (tokens, V)


def _pick_threads() -> int:
    """Threads for torch: all cores on an idle machine, one when other jobs already keep every core busy (then
    several threads mostly wait for each other at every barrier: measured here, 2.6 s/step with 1 thread vs 24 s
    with 2 on 2 busy cores). OMP_NUM_THREADS, if set, wins."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] >= cores - 0.5 else cores


@dataclass
class DemoResult:
    exact_match_base: float
    exact_match_adapted: float
    train_seconds: float
    total_seconds: float
    merge_max_abs_diff: float
    merged_equals_unmerged_text: bool
    adapter_dir: str


def run_demo(out_dir: str | Path = "runs/demo", n_train: int = 300, n_test: int = 30, steps: int = 40,
             model_name: str = "smollm2-135m", show: int = 4) -> DemoResult:
    import lorakit as lk
    from lorakit.train import TrainConfig, summary_table, train

    started = time.perf_counter()
    threads = _pick_threads()
    torch.set_num_threads(threads)
    print(f"torch threads: {threads} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    out = Path(out_dir)
    train_rows, test_rows = make_dataset(n_train, n_test)
    _write_jsonl(out / "data" / "train.jsonl", train_rows)
    _write_jsonl(out / "data" / "heldout.jsonl", test_rows)
    print(f"dataset: {len(train_rows)} training and {len(test_rows)} held-out records -> {out / 'data'}")
    print(f"example: {train_rows[0]['prompt']!r} -> {train_rows[0]['completion']!r}")
    prompts = [r["prompt"] for r in test_rows]

    base, tokenizer = lk.load_model(model_name)
    base_answers = _answers(base, tokenizer, prompts, None)
    em_base = _exact(base_answers, test_rows)
    print(f"base model exact match on held-out: {em_base:.1%}")
    del base

    run = out / "run"
    config = TrainConfig.from_dict({
        "model": model_name, "output_dir": str(run), "seed": 0, "save_every": 20,
        "keep_last": 1, "tensorboard": True,
        "data": {"train_file": str(out / "data" / "train.jsonl"), "eval_file": str(out / "data" / "heldout.jsonl"),
                 "max_length": 128},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "optim": {"lr": 2e-3, "batch_size": 4, "max_steps": steps, "warmup_steps": 4, "weight_decay": 0.0},
    })
    if run.exists():
        import shutil

        shutil.rmtree(run)  # the demo always starts a fresh run
    t0 = time.perf_counter()
    result = train(config)
    train_seconds = time.perf_counter() - t0

    # The user's path: a fresh fp32 base with the saved adapter loaded from disk.
    model, tokenizer = lk.load_model(model_name)
    lk.load_adapter(model, result.adapter_dir, adapter="default")
    adapted_answers = _answers(model, tokenizer, prompts, "default")
    em_adapted = _exact(adapted_answers, test_rows)

    unmerged = _logits(model, tokenizer, test_rows)
    unmerged_text = adapted_answers[:show]
    lk.merge(model)
    merged = _logits(model, tokenizer, test_rows)
    merged_text = _answers(model, tokenizer, prompts[:show], "default")
    diff = float((merged - unmerged).abs().max())

    print("\nheld-out prompts (names and cities unseen in training):")
    for row, b, a in list(zip(test_rows, base_answers, adapted_answers))[:show]:
        print(f"  record:   {row['prompt'].splitlines()[1]}")
        print(f"  expected: {row['completion']}")
        print(f"  base:     {b[:110]!r}")
        print(f"  adapted:  {a!r}\n")
    total = time.perf_counter() - started
    res = DemoResult(em_base, em_adapted, round(train_seconds, 1), round(total, 1), diff,
                     merged_text == unmerged_text, str(result.adapter_dir))
    table = {
        f"exact match, base ({len(test_rows)} held-out)": f"{em_base:.1%}",
        f"exact match, adapted ({len(test_rows)} held-out)": f"{em_adapted:.1%}",
        "training steps": result.steps, "training time (s)": round(train_seconds, 1),
        "trainable params": f"{result.summary['trainable params']:,} ({result.summary['trainable %']}%)",
        "adapter size on disk (bytes)": result.summary["adapter size on disk (bytes)"],
        "merged vs unmerged max |logit diff|": f"{diff:.2e}",
        "merged greedy text == unmerged": str(res.merged_equals_unmerged_text),
        "demo wall time (s)": round(total, 1), "torch threads": threads, "adapter": str(result.adapter_dir),
    }
    print(summary_table(table, title="lorakit demo"))
    atomic_write_text(out / "demo_report.json", json.dumps({**res.__dict__, "table": table,
                                                            "base_answers": base_answers,
                                                            "adapted_answers": adapted_answers}, indent=2) + "\n")
    return res
