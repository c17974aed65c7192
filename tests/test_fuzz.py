"""Fuzzing (hypothesis, derandomized, fixed budget) of everything that reads user files: the adapter loader
(safetensors bytes and headers, adapter_config.json, lorakit.json), the config parsers (dicts and YAML) and the data
loaders (JSONL, JSON, CSV). Every input must end in a clean success or a LorakitError: never another exception type.

Budget: LORAKIT_FUZZ_EXAMPLES examples per test (default 100); the totals run are printed at the end (pytest -s).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakit as lk
from conftest import randomize_lora_B, tiny_llama
from lorakit.lora.adapter_io import CONFIG_FILE, META_FILE, WEIGHTS_FILE
from lorakit.lora.config import LoraConfig
from lorakit.data.records import DataConfig, read_records, tokenize
from lorakit.errors import LorakitError
from lorakit.train import TrainConfig
from tiny_text import tiny_tokenizer

N = int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=N, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
CASES: Counter = Counter()  # examples run per target, printed at the end of the module


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nfuzz cases run:", dict(CASES), "total", sum(CASES.values()))


def outcome(target: str, fn, *args, **kwargs):
    """Run fn; success and LorakitError are the only allowed endings. Returns 'ok' or 'error'."""
    CASES[target] += 1
    try:
        fn(*args, **kwargs)
        return "ok"
    except LorakitError:
        return "error"


scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                           max_size=4), max_leaves=12)


def fuzzed_dict(known: list[str]):
    """Mostly known keys (so validation is reached), with arbitrary JSON values, plus the odd unknown key."""
    return st.dictionaries(st.sampled_from(known) | st.text(max_size=8), json_values, max_size=6)


# ---------------------------------------------------------------------------------------------------- configs
LORA_KEYS = ["r", "alpha", "dropout", "target_modules", "layers", "rank_pattern", "alpha_pattern", "init",
             "use_rslora", "modules_to_save", "bias"]
PEFT_KEYS = ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform", "rank_pattern",
             "alpha_pattern", "init_lora_weights", "use_rslora", "use_dora", "modules_to_save", "bias"]
TRAIN_KEYS = ["model", "task", "seed", "precision", "eval_every", "save_every", "keep_last", "metric", "data", "lora",
              "optim", "distributed", "max_new_tokens"]
SECTION_KEYS = {"data": ["train_file", "format", "max_length", "eval_fraction", "split"],
                "optim": ["lr", "betas", "batch_size", "grad_accum", "max_steps", "schedule", "warmup_ratio"],
                "lora": LORA_KEYS}


@FUZZ
@given(fuzzed_dict(LORA_KEYS), fuzzed_dict(PEFT_KEYS))
def test_fuzz_lora_config(data, peft):
    outcome("LoraConfig.from_dict", LoraConfig.from_dict, data)
    outcome("LoraConfig.from_peft_dict", LoraConfig.from_peft_dict, peft)


train_dicts = st.fixed_dictionaries({}, optional={
    k: (fuzzed_dict(SECTION_KEYS[k]) | json_values) if k in SECTION_KEYS else json_values for k in TRAIN_KEYS})


@FUZZ
@given(train_dicts, st.text(max_size=200))
def test_fuzz_train_config_dicts_and_yaml(data, text):
    outcome("TrainConfig.from_dict", TrainConfig.from_dict, data)
    with tempfile.TemporaryDirectory() as tmp:
        for i, content in enumerate([text, yaml.safe_dump(data, allow_unicode=True)]):
            path = Path(tmp) / f"c{i}.yaml"
            path.write_text(content, encoding="utf-8")
            outcome("TrainConfig.from_yaml", TrainConfig.from_yaml, path)


@pytest.mark.parametrize("text", ["[" * 1500, "a: " + "[" * 1500, "a: &x [*x]", "{" * 1500, "!!python/object:os.system {}",
                                  "a: !!binary AAAA", "\0\1\2"])
def test_pathological_yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(LorakitError):
        TrainConfig.from_yaml(path)


# ---------------------------------------------------------------------------------------------------- data files
TOK = tiny_tokenizer()
FIELDS = ["prompt", "completion", "messages", "text", "label", "role", "content"]
records = st.dictionaries(st.sampled_from(FIELDS), json_values | st.lists(fuzzed_dict(["role", "content"]), max_size=3),
                          max_size=3)


def jsonl(rows: list, junk: str) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows) + junk


def csv_text(rows: list[dict], junk: str) -> str:
    import csv
    import io

    out = io.StringIO()
    keys = sorted({k for r in rows for k in r}) or ["text"]
    w = csv.DictWriter(out, keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if not isinstance(v, str) else v for k, v in r.items()})
    return out.getvalue() + junk


def load_and_tokenize(path: Path) -> None:
    tokenize(read_records(path), TOK, DataConfig(max_length=16))


@FUZZ
@given(st.lists(records, max_size=4), st.text(max_size=40), st.binary(max_size=40),
       st.sampled_from(["jsonl", "json", "csv"]), st.sampled_from(["structured", "text", "bytes"]))
def test_fuzz_data_loaders(rows, junk, junk_bytes, suffix, kind):
    if kind == "structured":
        content = {"jsonl": jsonl(rows, junk), "json": json.dumps(rows) + junk[:2], "csv": csv_text(rows, junk)}[suffix]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d.{suffix}"
        path.write_bytes(junk_bytes if kind == "bytes" else (content if kind == "structured" else junk).encode())
        outcome(f"data .{suffix}", load_and_tokenize, path)


@pytest.mark.parametrize("suffix,content", [("jsonl", "[" * 100_000), ("json", "{\"data\": " + "[" * 100_000),
                                            ("csv", "text\n\"" + "x" * 200_000), ("jsonl", "\ud800")])
def test_pathological_data_files(tmp_path, suffix, content):
    path = tmp_path / f"d.{suffix}"
    path.write_text(content, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(LorakitError):
        load_and_tokenize(path)


# ---------------------------------------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory) -> Path:
    model = tiny_llama()
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8))
    randomize_lora_B(model)
    return lk.save_adapter(model, tmp_path_factory.mktemp("fuzz") / "ad")


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def try_load(model, folder: Path, target: str) -> str:
    result = outcome(target, lk.load_adapter, model, folder, strict=True)
    if result == "ok":
        lk.delete_adapter(model, "default")
    assert not getattr(model, "lora_configs", {}), "a failed load left an adapter behind"
    return result


def copy(saved: Path) -> tuple[tempfile.TemporaryDirectory, Path]:
    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name) / "ad"
    shutil.copytree(saved, folder)
    return tmp, folder


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6), st.integers(0, 10**6),
       st.sampled_from(["flip", "truncate", "insert"]))
def test_fuzz_safetensors_bytes(saved_adapter, model, edits, cut, how):
    tmp, folder = copy(saved_adapter)
    with tmp:
        f = folder / WEIGHTS_FILE
        data = bytearray(f.read_bytes())
        for pos, byte in edits:
            pos %= len(data)
            if how == "insert":
                data[pos:pos] = bytes([byte])
            else:
                data[pos] = byte
        if how == "truncate":
            data = data[: cut % len(data)]
        f.write_bytes(bytes(data))
        try_load(model, folder, "safetensors bytes")


big_ints = st.integers(-2, 2**64) | st.sampled_from([0, 1, 2**31, 2**40, 2**63 - 1, 2**64])
entry_values = {"dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X"]) | json_values,
                "shape": st.lists(big_ints, max_size=4) | json_values,
                "data_offsets": st.lists(big_ints, min_size=2, max_size=2) | json_values}


@FUZZ
@given(st.data())
def test_fuzz_safetensors_header(saved_adapter, model, data):
    """Structural header mutations: dtypes, shapes and offsets (huge ones included), added and removed entries."""
    tmp, folder = copy(saved_adapter)
    with tmp:
        f = folder / WEIGHTS_FILE
        raw = f.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
        names = sorted(k for k in header if k != "__metadata__")
        for _ in range(data.draw(st.integers(1, 3))):
            name = data.draw(st.sampled_from(names + ["new.tensor", "__metadata__"]))
            field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete", "replace"]))
            if field == "delete":
                header.pop(name, None)
            elif field == "replace" or not isinstance(header.get(name), dict):
                header[name] = data.draw(json_values)
            else:
                header[name][field] = data.draw(entry_values[field])
        text = json.dumps(header).encode()
        length = data.draw(st.sampled_from([len(text), len(text)]) | big_ints)
        f.write_bytes(struct.pack("<Q", length % 2**64) + text + body)
        try_load(model, folder, "safetensors header")


@FUZZ
@given(fuzzed_dict(PEFT_KEYS), st.one_of(st.none(), fuzzed_dict(["config", "base_fingerprint", "adapter"]),
                                         st.builds(lambda c: {"config": c}, fuzzed_dict(LORA_KEYS))),
       st.sampled_from(["json", "raw"]), st.text(max_size=30))
def test_fuzz_adapter_config_json(saved_adapter, model, peft, meta, mode, raw):
    tmp, folder = copy(saved_adapter)
    with tmp:
        original = json.loads((folder / CONFIG_FILE).read_text())
        (folder / CONFIG_FILE).write_text(json.dumps({**original, **peft}) if mode == "json" else raw)
        if meta is None:
            (folder / META_FILE).unlink()
        else:
            (folder / META_FILE).write_text(json.dumps(meta))
        try_load(model, folder, "adapter_config.json + lorakit.json")


def test_huge_tensor_claim_is_refused_before_allocation(saved_adapter, model, monkeypatch, tmp_path):
    """A header that claims a 2**40-element tensor (4 TiB) is refused from the header alone: safetensors is never asked
    to read the file."""
    import safetensors.torch

    folder = tmp_path / "ad"
    shutil.copytree(saved_adapter, folder)
    f = folder / WEIGHTS_FILE
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    name = sorted(k for k in header if k != "__metadata__")[0]
    header[name] = {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4 * 2**40]}
    text = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + body)

    def never(*args, **kwargs):
        raise AssertionError("load_file must not be reached")

    monkeypatch.setattr(safetensors.torch, "load_file", never)
    with pytest.raises(LorakitError, match=r"data offsets \[0, 4398046511104\] outside the file's \d+ data bytes"):
        lk.load_adapter(model, folder)
    header[name] = {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 64]}  # shape and range disagree
    text = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + body)
    with pytest.raises(LorakitError, match=r"claims shape \[1048576, 1048576\] \(4398046511104 bytes\)"):
        lk.load_adapter(model, folder)


def test_huge_rank_in_config_is_refused_before_allocation(saved_adapter, model, tmp_path):
    folder = tmp_path / "ad"
    shutil.copytree(saved_adapter, folder)
    meta = json.loads((folder / META_FILE).read_text())
    meta["config"]["r"] = 10**9  # add_lora would allocate 10**9 x 32 floats per module
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(LorakitError, match="asks for rank 1000000000, but the largest LoRA matrix .* has rank 4"):
        lk.load_adapter(model, folder)
    assert not getattr(model, "lora_configs", {})


@pytest.mark.stress
def test_fuzz_with_a_large_budget():
    """The whole module again with LORAKIT_FUZZ_EXAMPLES (default here 2000) examples per fuzz test."""
    import subprocess
    import sys

    env = {**os.environ, "LORAKIT_FUZZ_EXAMPLES": os.environ.get("LORAKIT_FUZZ_EXAMPLES_STRESS", "2000")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "fuzz cases run:" in proc.stdout


@pytest.mark.parametrize("labels", [[0, 10**12], ["0", "99999999999"], [-1, 1]])
def test_huge_or_negative_integer_labels_are_refused_not_allocated(tmp_path, labels):
    """Found by fuzzing: labels {0, 10**12} used to build a 10**12-entry class table (the process was OOM-killed)."""
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl([{"text": "the cat", "label": v} for v in labels], ""))
    with pytest.raises(LorakitError, match="Integer labels are class ids and must be in 0..99999"):
        load_and_tokenize(path)
