"""GGUF export (lorakit.export.gguf, lorakit.export.gguf_model): names, shapes, metadata and scales read back with
gguf.GGUFReader, refusals, compatibility findings (lorakit.export.compat), and (marked llamacpp) llama.cpp itself
running the exported files (lorakit.export.llamacpp)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.lora.injection import lora_layers
from conftest import randomize_lora_B, tiny_gpt2, tiny_llama

gguf = pytest.importorskip("gguf")
import lorakit.export.gguf as gguf_export  # noqa: E402
from lorakit.export.compat import TARGETS, Finding, adapter_compatibility  # noqa: E402
from lorakit.export.gguf import base_info, export_adapter_gguf  # noqa: E402
from lorakit.export.gguf_model import export_merged_gguf  # noqa: E402
from lorakit.export.llamacpp import llama_cpp_python, run_llama_cpp  # noqa: E402

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_HEAD, N_KV = 4, 2  # tiny_llama
GGUF_OF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute, written out independently of lorakit's helper."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(module: str) -> str:
    parts = module.split(".")
    if module == "model.embed_tokens":
        return "token_embd.weight"
    if module == "lm_head":
        return "output.weight"
    return f"blk.{parts[2]}.{GGUF_OF['.'.join(parts[3:])]}.weight"


def make_adapter(tmp_path: Path, config: lk.LoraConfig, tied: bool = False, seed: int = 0, std: float = 0.3,
                 name: str = "adapter"):
    model = tiny_llama(seed)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    base = tmp_path / f"base-{name}"
    model.save_pretrained(base)
    model.config._name_or_path = str(base)
    lk.add_lora(model, config)
    randomize_lora_B(model, std=std)
    lk.save_adapter(model, tmp_path / name)
    return model, tmp_path / name, base


def read(path: Path):
    reader = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return kv, tensors


def as_float(t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy layout (rows = ne[1])."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])


def expected_deltas(model) -> dict[str, np.ndarray]:
    """lorakit's ΔW per module in llama.cpp's layout (q/k rows permuted; embeddings as (vocab, dim))."""
    out = {}
    for name, layer in lora_layers(model):
        delta = layer.delta_weight("default").detach().numpy()
        if name.endswith("q_proj"):
            delta = llama_cpp_permute(delta, N_HEAD)
        elif name.endswith("k_proj"):
            delta = llama_cpp_permute(delta, N_KV)
        out[gguf_name(name)] = delta
    return out


def gguf_deltas(kv, tensors) -> dict[str, np.ndarray]:
    """ΔW as llama.cpp computes it: scale = alpha / r with r from lora_b's shape, ΔW = scale·B·A (embeddings:
    lora_a (vocab, r) rows times lora_b (dim, r)ᵀ)."""
    alpha = kv["adapter.lora.alpha"]
    out = {}
    for name in {n.rsplit(".", 1)[0] for n in tensors}:
        a, b = as_float(tensors[name + ".lora_a"]), as_float(tensors[name + ".lora_b"])
        rank = b.shape[1]
        scale = alpha / rank if alpha else 1.0
        out[name] = scale * (a @ b.T if name == "token_embd.weight" else b @ a)
    return out


# ---------------------------------------------------------------------------------------------------- adapter files
def test_adapter_names_shapes_and_metadata(tmp_path):
    model, adir, _ = make_adapter(tmp_path, lk.LoraConfig(r=4, alpha=8, target_modules=LINEAR))
    report = export_adapter_gguf(adir, tmp_path / "a.gguf")
    kv, tensors = read(tmp_path / "a.gguf")
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == "llama" and kv["adapter.lora.alpha"] == 8.0
    expected = {f"blk.{i}.{t}.weight.lora_{x}" for i in range(2) for t in GGUF_OF.values() for x in "ab"}
    assert set(tensors) == expected and report.tensors == len(expected) and not report.folded
    for name, layer in lora_layers(model):
        a, b = tensors[gguf_name(name) + ".lora_a"], tensors[gguf_name(name) + ".lora_b"]
        # ggml shapes (ne0, ne1): lora_a = (in, r), lora_b = (r, out), as llama-adapter.cpp validates
        assert [int(x) for x in a.shape] == [layer.in_features, 4]
        assert [int(x) for x in b.shape] == [4, layer.out_features]
        assert a.tensor_type == gguf.GGMLQuantizationType.F32
    assert not list(tmp_path.glob(".a.gguf.*"))  # no temp file left


@pytest.mark.parametrize("config", [
    lk.LoraConfig(r=4, alpha=8, target_modules=LINEAR),
    lk.LoraConfig(r=4, alpha=8, target_modules=LINEAR, use_rslora=True),
    lk.LoraConfig(r=4, alpha=8, target_modules=LINEAR, rank_pattern={"v_proj": 2, "down_proj": 8},
                  alpha_pattern={"o_proj": 3.0}),
    lk.LoraConfig(r=4, alpha=8, target_modules=LINEAR, use_rslora=True, rank_pattern={"v_proj": 2},
                  alpha_pattern={"up_proj": 5.0}),
], ids=["plain", "rslora", "patterns", "rslora+patterns"])
def test_delta_w_matches_lorakit_with_qk_permutation(tmp_path, config):
    model, adir, _ = make_adapter(tmp_path, config)
    report = export_adapter_gguf(adir, tmp_path / "a.gguf")
    kv, tensors = read(tmp_path / "a.gguf")
    got, want = gguf_deltas(kv, tensors), expected_deltas(model)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    if config.use_rslora:
        assert kv["adapter.lora.alpha"] == pytest.approx(8 * math.sqrt(4))
    has_patterns = bool(config.rank_pattern or config.alpha_pattern)
    assert bool(report.folded) == (has_patterns and (config.use_rslora or bool(config.alpha_pattern)))
    # q/k B rows really are permuted (the check above would also pass for a symmetric permutation otherwise)
    q_b = as_float(tensors["blk.0.attn_q.weight.lora_b"])
    raw_b = model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.detach().numpy()
    assert not np.allclose(q_b, raw_b * (q_b[0, 0] / raw_b[0, 0] if raw_b[0, 0] else 1))


def test_lossy_dtypes_and_q8_fallback(tmp_path):
    model, adir, _ = make_adapter(tmp_path, lk.LoraConfig(r=4, alpha=8, target_modules=LINEAR))
    want = expected_deltas(model)
    for dtype, rtol in (("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)):
        report = export_adapter_gguf(adir, tmp_path / f"{dtype}.gguf", dtype=dtype)
        kv, tensors = read(tmp_path / f"{dtype}.gguf")
        got = gguf_deltas(kv, tensors)
        for name in want:
            scale = np.abs(want[name]).max()
            assert np.abs(got[name] - want[name]).max() <= rtol * scale, (dtype, name)
        if dtype == "q8_0":  # A (r, 32|48 wide rows): Q8_0 where 32 divides the row; B (rank-4 rows) -> f16
            assert tensors["blk.0.attn_q.weight.lora_a"].tensor_type == gguf.GGMLQuantizationType.Q8_0
            assert tensors["blk.0.attn_q.weight.lora_b"].tensor_type == gguf.GGMLQuantizationType.F16
            assert "blk.0.attn_q.weight.lora_b" in report.fallback_f16
    with pytest.raises(LorakitError, match="dtype must be one of"):
        export_adapter_gguf(adir, tmp_path / "x.gguf", dtype="q4_0")


def test_embedding_and_lm_head_lora_on_untied_base(tmp_path):
    model, adir, _ = make_adapter(tmp_path, lk.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens", "q_proj",
                                                                                           "lm_head"]))
    export_adapter_gguf(adir, tmp_path / "a.gguf")
    kv, tensors = read(tmp_path / "a.gguf")
    assert [int(x) for x in tensors["token_embd.weight.lora_a"].shape] == [4, 97]  # numpy (vocab, r)
    assert [int(x) for x in tensors["token_embd.weight.lora_b"].shape] == [4, 32]  # numpy (dim, r)
    assert "output.weight.lora_a" in tensors
    got, want = gguf_deltas(kv, tensors), expected_deltas(model)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_embedding_lora_on_tied_base_is_refused(tmp_path):
    _, adir, _ = make_adapter(tmp_path, lk.LoraConfig(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]),
                              tied=True)
    with pytest.raises(LorakitError, match="tied"):
        export_adapter_gguf(adir, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
    assert any(f.level == "error" and "tied" in f.message for f in adapter_compatibility(adir, "llama.cpp"))


def test_dora_is_refused_with_pointer_to_merged_export(tmp_path):
    _, adir, _ = make_adapter(tmp_path, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(LorakitError, match="DoRA.*merged"):
        export_adapter_gguf(adir, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
    for target in ("llama.cpp", "vllm"):
        assert any(f.level == "error" and "DoRA" in f.message for f in adapter_compatibility(adir, target))


def test_unsupported_architectures_are_refused(tmp_path):
    model = tiny_gpt2()
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8))
    lk.save_adapter(model, tmp_path / "gpt2")
    with pytest.raises(LorakitError, match="Llama"):
        export_adapter_gguf(tmp_path / "gpt2", tmp_path / "a.gguf", base_name_or_path=None)
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(LorakitError, match="supports Llama"):
        base_info(folder)
    _, adir, _ = make_adapter(tmp_path, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    with pytest.raises(LorakitError, match="qwen2"):
        export_adapter_gguf(adir, tmp_path / "a.gguf", base_name_or_path=folder)


def test_missing_base_is_a_clear_error(tmp_path):
    _, adir, base = make_adapter(tmp_path, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    (base / "config.json").unlink()
    with pytest.raises(LorakitError, match="base_name_or_path"):
        export_adapter_gguf(adir, tmp_path / "a.gguf")


def test_pissa_adapter_is_exported_as_exact_plain_lora(tmp_path):
    model, adir, base = make_adapter(tmp_path, lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"],
                                                              init="pissa"), std=0.0)
    with torch.no_grad():  # "train": move B and A away from their init
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.add_(0.05 * torch.randn_like(layer.lora_B["default"].weight))
            layer.lora_A["default"].weight.add_(0.05 * torch.randn_like(layer.lora_A["default"].weight))
    lk.save_adapter(model, adir)
    report = export_adapter_gguf(adir, tmp_path / "a.gguf")
    assert "pissa" in report.notes[0]
    kv, tensors = read(tmp_path / "a.gguf")
    assert int(tensors["blk.0.attn_q.weight.lora_b"].shape[0]) == 4  # rank 2r
    original = tiny_llama(0)  # the original base; the PiSSA model's effective weight is residual + s·BA
    got = gguf_deltas(kv, tensors)
    for name, layer in lora_layers(model):
        effective = (layer.base_layer.weight + layer.delta_weight("default")).detach().numpy()
        delta = effective - original.get_submodule(name).weight.detach().numpy()
        if name.endswith("q_proj"):
            delta = llama_cpp_permute(delta, N_HEAD)
        np.testing.assert_allclose(got[gguf_name(name)], delta, atol=2e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------------- merged files
def test_merged_gguf_weights_metadata_and_modelfile(tmp_path):
    model, adir, base = make_adapter(tmp_path, lk.LoraConfig(r=4, alpha=8, target_modules=LINEAR))
    report = export_merged_gguf(base, tmp_path / "out" / "m.gguf", quant="f32", adapter=adir,
                                placeholder_vocab=True)
    kv, tensors = read(tmp_path / "out" / "m.gguf")
    assert kv["general.architecture"] == "llama" and kv["llama.block_count"] == 2
    assert kv["llama.attention.head_count"] == N_HEAD and kv["llama.attention.head_count_kv"] == N_KV
    assert kv["llama.embedding_length"] == 32 and kv["llama.vocab_size"] == 97
    assert kv["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert len(tensors) == 1 + 1 + 1 + 2 * 9  # token_embd, output_norm, output, 9 per block
    merged = lk.unload(model)
    state = merged.state_dict()
    for key, t in state.items():
        module = key[: -len(".weight")]
        want = t.detach().numpy()
        if module.endswith("q_proj"):
            want = llama_cpp_permute(want, N_HEAD)
        elif module.endswith("k_proj"):
            want = llama_cpp_permute(want, N_KV)
        name = {"model.norm": "output_norm.weight"}.get(module) or (
            gguf_name(module) if not module.endswith("layernorm") else
            f"blk.{module.split('.')[2]}.{'attn_norm' if 'input' in module else 'ffn_norm'}.weight")
        np.testing.assert_array_equal(as_float(tensors[name]), want, err_msg=name)
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "FROM ./m.gguf" in modelfile and report.modelfile
    with pytest.raises(LorakitError, match="quant must be one of"):
        export_merged_gguf(base, tmp_path / "x.gguf", quant="q4_k", placeholder_vocab=True)
    with pytest.raises(LorakitError, match="tokenizer"):
        export_merged_gguf(base, tmp_path / "x.gguf", quant="f32")


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"init": "pissa"}], ids=["dora", "pissa"])
def test_merged_export_of_dora_and_pissa_adapters(tmp_path, variant):
    model, adir, base = make_adapter(tmp_path, lk.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"],
                                                              **variant), std=0.1)
    export_merged_gguf(base, tmp_path / "m.gguf", quant="f32", adapter=adir, placeholder_vocab=True,
                       modelfile=False)
    _, tensors = read(tmp_path / "m.gguf")
    merged = lk.unload(model)
    for i in range(2):
        q = merged.model.layers[i].self_attn.q_proj.weight.detach().numpy()
        v = merged.model.layers[i].self_attn.v_proj.weight.detach().numpy()
        np.testing.assert_allclose(as_float(tensors[f"blk.{i}.attn_q.weight"]), llama_cpp_permute(q, N_HEAD),
                                   atol=1e-6)
        np.testing.assert_allclose(as_float(tensors[f"blk.{i}.attn_v.weight"]), v, atol=1e-6)


def test_merged_export_keeps_the_callers_model_and_quantizes(tmp_path):
    model, _, base = make_adapter(tmp_path, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = export_merged_gguf(model, tmp_path / "q.gguf", quant="q8_0", placeholder_vocab=True, modelfile=False)
    assert report.types["q8_0"] > 0 and report.modelfile is None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and any(True for _ in lora_layers(model))


def test_write_is_atomic(tmp_path, monkeypatch):
    _, adir, _ = make_adapter(tmp_path, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    out = tmp_path / "a.gguf"
    export_adapter_gguf(adir, out)
    before = out.read_bytes()

    def broken(path, *args, **kwargs):
        Path(path).write_bytes(b"GGUF partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_export, "write_gguf", broken)
    with pytest.raises(LorakitError, match="nothing was half-written"):
        export_adapter_gguf(adir, out, dtype="f16")
    assert out.read_bytes() == before and not list(tmp_path.glob(".a.gguf.*"))


# ---------------------------------------------------------------------------------------------------- compatibility
def test_compatibility_findings(tmp_path):
    _, adir, _ = make_adapter(tmp_path, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    for target in TARGETS:
        findings = adapter_compatibility(adir, target)
        assert findings and all(isinstance(f, Finding) for f in findings)
        assert not [f for f in findings if f.level == "error"], (target, findings)
    with pytest.raises(LorakitError, match="target must be one of"):
        adapter_compatibility(adir, "tgi")
    # keys saved from the inner LlamaModel (no "model." level): vLLM silently serves the base
    inner = tiny_llama().model
    lk.add_lora(inner, lk.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    lk.save_adapter(inner, tmp_path / "inner")
    errors = [f.message for f in adapter_compatibility(tmp_path / "inner", "vllm") if f.level == "error"]
    assert errors and "SILENTLY" in errors[0] and "34186" in errors[0]
    # big rank: vLLM needs --max-lora-rank; patterns: vLLM's single scale is wrong
    _, big, _ = make_adapter(tmp_path, lk.LoraConfig(r=20, alpha=8, target_modules=["q_proj"],
                                                     alpha_pattern={"q_proj": 4.0}), name="big")
    vllm = adapter_compatibility(big, "vllm")
    assert any("--max-lora-rank 32" in f.message for f in vllm)
    assert any(f.level == "error" and "alpha_pattern" in f.message for f in vllm)


# ---------------------------------------------------------------------------------------------------- llama.cpp itself
@pytest.mark.llamacpp
def test_llama_cpp_runs_exported_files_like_lorakit(tmp_path):
    python = llama_cpp_python()
    if python is None:
        print("SKIP reason: no llama-cpp-python venv (/work/venvs/llama or $LORAKIT_LLAMA_PYTHON)")
        pytest.skip("llama-cpp-python not installed: create /work/venvs/llama or set LORAKIT_LLAMA_PYTHON")
    config = lk.LoraConfig(r=4, alpha=8, target_modules=LINEAR + ["embed_tokens", "lm_head"], use_rslora=True,
                           rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3.0})
    model, adir, base = make_adapter(tmp_path, config, std=0.3)
    export_adapter_gguf(adir, tmp_path / "adapter.gguf")
    export_merged_gguf(base, tmp_path / "base.gguf", quant="f32", placeholder_vocab=True, modelfile=False)
    export_merged_gguf(base, tmp_path / "merged.gguf", quant="f32", adapter=adir, placeholder_vocab=True,
                       modelfile=False)
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(1, 97, (12,), generator=gen).tolist() for _ in range(4)]
    n = 6  # compare the logits predicting the last n tokens of each sequence
    runs = [{"name": "base", "model": str(tmp_path / "base.gguf"), "kv_f32": True},
            {"name": "base+adapter", "model": str(tmp_path / "base.gguf"), "lora": str(tmp_path / "adapter.gguf"),
             "kv_f32": True},
            {"name": "merged", "model": str(tmp_path / "merged.gguf"), "kv_f32": True}]
    result = run_llama_cpp(runs, [s[:-n] for s in seqs], n_new=n, forced=seqs, n_forced=n, threads=1, n_ctx=64)
    with torch.no_grad():
        ids = torch.tensor(seqs)
        with lk.disable_adapters(model):
            ref_base = model(input_ids=ids).logits[:, -n - 1:-1].numpy()
        ref_adapter = model(input_ids=ids).logits[:, -n - 1:-1].numpy()
    diffs = {name: float(np.abs(result["runs"][name]["logits"] - ref).max())
             for name, ref in (("base", ref_base), ("base+adapter", ref_adapter), ("merged", ref_adapter))}
    effect = float(np.abs(ref_adapter - ref_base).max())
    print(f"llama.cpp vs lorakit max |logit diff|: {diffs}; adapter effect {effect:.3g}; "
          f"max |logit| {np.abs(ref_adapter).max():.3g}")
    assert effect > 0.1
    assert all(d < 1e-4 for d in diffs.values()), diffs
