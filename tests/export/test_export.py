import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import lorakit as lk
from lorakit.cli.main import app
from lorakit.errors import LorakitError
from lorakit.export.merged import REPORT_FILE, check_mergeable, merge_to_directory

from conftest import tiny_llama
from tiny_text import make_adapter, save_tiny_lm

# Loads a merged folder with plain transformers while `import lorakit` is impossible, and prints its logits.
PLAIN_LOAD = """
import json, sys
sys.modules["lorakit"] = None  # any attempt to import lorakit now fails
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert not any("lora" in n for n, _ in model.named_parameters())
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    print(json.dumps({"dtype": str(model.dtype), "logits": model(input_ids=ids).logits.float().tolist()}))
"""
IDS = [1, 7, 20, 10, 34, 57, 58]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    save_tiny_lm(root / "base")
    model, _ = lk.load_model(str(root / "base"))
    make_adapter(model, "default", seed=3, std=0.05)
    lk.save_adapter(model, root / "adapter")
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([IDS])).logits
        with lk.disable_adapters(model):
            base = model(input_ids=torch.tensor([IDS])).logits
    return root, expected, base


def plain_logits(path):
    out = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(path), json.dumps(IDS)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["dtype"], torch.tensor(result["logits"])


def test_fp32_merge_loads_without_lorakit_and_matches_base_plus_adapter(trained):
    root, expected, base = trained
    report = merge_to_directory(str(root / "base"), root / "adapter", root / "merged")
    assert report.max_logit_diff < 1e-5 and report.adapter_effect > 1e-2 and report.delta_lost < 1e-6
    dtype, logits = plain_logits(root / "merged")
    assert dtype == "torch.float32"
    assert (logits - expected).abs().max() < 1e-5
    assert (logits - base).abs().max() > 1e-2  # the adapter is in there
    saved = json.loads((root / "merged" / REPORT_FILE).read_text())
    assert saved["max_logit_diff"] == report.max_logit_diff and saved["dtype"] == "float32"


def test_lossy_bf16_merge_is_refused_unless_forced(trained):
    root, expected, _ = trained
    with pytest.raises(LorakitError) as info:
        merge_to_directory(str(root / "base"), root / "adapter", root / "merged16", dtype="bfloat16")
    assert "lossy" in str(info.value) and "force" in str(info.value)
    assert not (root / "merged16").exists()
    report = merge_to_directory(str(root / "base"), root / "adapter", root / "merged16", dtype="bfloat16", force=True)
    assert report.forced and report.max_logit_diff > 1e-3 and report.delta_lost > 0
    dtype, logits = plain_logits(root / "merged16")
    assert dtype == "torch.bfloat16"
    drift = float((logits - expected).abs().max())  # on other inputs than the report's probes: same scale
    assert report.max_logit_diff / 10 < drift < 10 * report.max_logit_diff


def test_merging_into_a_tied_or_quantized_weight_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lk.add_lora(model, lk.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(LorakitError, match="tied"):
        check_mergeable(model)
    quantized = lk.add_lora(tiny_llama(), lk.LoraConfig(r=2))
    q_proj = quantized.model.layers[0].self_attn.q_proj.base_layer
    q_proj.weight = torch.nn.Parameter(q_proj.weight.to(torch.int8), requires_grad=False)
    with pytest.raises(LorakitError, match="quantized"):
        check_mergeable(quantized)


def test_merge_command_prints_the_difference(trained, tmp_path):
    root, _, _ = trained
    result = CliRunner().invoke(app, ["merge", str(root / "adapter"), "--out", str(tmp_path / "m"),
                                      "--model", str(root / "base")])
    assert result.exit_code == 0, result.output
    assert "max logit difference vs base+adapter" in result.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
