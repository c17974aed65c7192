"""Supply chain: loading an adapter or a model never runs code from the files read: no pickle (a booby-trapped
pickle next to or instead of the weights is never opened), no remote code unless trust_remote_code=True is asked."""

from __future__ import annotations

import ast
import builtins
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch

import lorakit as lk
from conftest import tiny_llama
from lorakit.errors import LorakitError
from tiny_text import make_adapter, save_tiny_lm

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"


class Trap:
    """Unpickling this creates the file `path`: proof that code from the file ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, f = [], node.func
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name):
                parts.append(f.id)
            yield ".".join(reversed(parts)), node


def test_source_never_unpickles_or_trusts_remote_code():
    banned = {"torch.load", "pickle.load", "pickle.loads", "pickle.Unpickler", "joblib.load", "eval", "exec",
              "dill.load", "cloudpickle.load"}
    found, files = [], sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        for name, node in calls(ast.parse(path.read_text(), str(path))):
            if name in banned:
                found.append(f"{path.name}:{node.lineno} {name}")
            for kw in node.keywords:
                if kw.arg in ("trust_remote_code", "allow_pickle") and isinstance(kw.value, ast.Constant) \
                        and kw.value.value is True:
                    found.append(f"{path.name}:{node.lineno} {kw.arg}=True")
                if kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is False:
                    found.append(f"{path.name}:{node.lineno} weights_only=False")
    assert not found, found
    import inspect

    assert inspect.signature(lk.load_model).parameters["trust_remote_code"].default is False


def test_pickled_adapter_weights_are_refused_not_loaded(tmp_path, no_unpickling):
    folder = lk.save_adapter(make_adapter(tiny_llama(), "a", seed=1), tmp_path / "ad", adapter="a")
    marker = tmp_path / "pwned"
    torch.save({"base_model.model.x.lora_A.weight": Trap(marker)}, folder / "adapter_model.bin")
    with pytest.warns(UserWarning, match=r"ignoring \['adapter_model.bin'\].*never reads them"):
        lk.load_adapter(tiny_llama(), folder)  # the safetensors weights load; the pickle is never opened
    (folder / "adapter_model.safetensors").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(LorakitError, match="has no adapter_model.safetensors .*never reads pickled weights"):
            lk.load_adapter(tiny_llama(), folder)
    assert not marker.exists()


def test_pickled_model_weights_are_refused_not_loaded(tmp_path, no_unpickling):
    folder = save_tiny_lm(tmp_path / "model")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": Trap(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(LorakitError, match=r"never unpickles \['pytorch_model.bin'\]"):
        lk.load_model(str(folder))
    assert not marker.exists()


def test_remote_code_in_a_model_folder_does_not_run(tmp_path, no_unpickling):
    folder = save_tiny_lm(tmp_path / "model")
    marker = tmp_path / "pwned"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "from transformers import LlamaForCausalLM as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        model, _ = lk.load_model(str(folder))
        assert type(model).__module__.startswith("transformers.")  # the built-in class, not the folder's code
    except LorakitError as e:
        assert "trust_remote_code" in str(e)
    assert not marker.exists()
