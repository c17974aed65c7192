"""`lorakit export --format gguf`, `lorakit merge --format gguf` and `lorakit adapter-info --for` on a tiny Llama."""

import pytest

import lorakit as lk
from lorakit.cli.main import main

from conftest import randomize_lora_B, tiny_llama

gguf = pytest.importorskip("gguf")


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def adapter(tmp_path, name="ad", **config):
    """A tiny Llama base folder (weights only) and an adapter on it that records that folder as its base."""
    model = tiny_llama()
    base = tmp_path / "base"
    if not base.is_dir():
        model.save_pretrained(base)
    model.config._name_or_path = str(base)
    lk.add_lora(model, lk.LoraConfig(r=4, alpha=8, **config))
    randomize_lora_B(model)
    lk.save_adapter(model, tmp_path / name)
    return base, tmp_path / name


def kv_and_tensors(path):
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def test_export_adapter_as_gguf(tmp_path, capsys):
    _, ad = adapter(tmp_path)
    code, out, err = run(["export", str(ad), "--format", "gguf", "--out", str(tmp_path / "a.gguf"), "--dtype", "f16"],
                         capsys)
    assert code == 0, err
    assert "GGUF LoRA adapter written to" in out and "(f16, 4 modules, alpha 8)" in out
    kv, tensors = kv_and_tensors(tmp_path / "a.gguf")
    assert kv["general.type"] == "adapter" and kv["adapter.lora.alpha"] == 8
    assert {"blk.0.attn_q.weight.lora_a", "blk.1.attn_v.weight.lora_b"} <= set(tensors) and len(tensors) == 8
    for argv, message in ((["--format", "onnx"], "--format must be gguf, got 'onnx'"),
                          (["--dtype", "q4_0"], "dtype must be one of ('f32', 'f16', 'bf16', 'q8_0')")):
        code, _, err = run(["export", str(ad), "--out", str(tmp_path / "b.gguf"), *argv], capsys)
        assert code == 2 and message in err
    assert not (tmp_path / "b.gguf").exists()


def test_merge_as_gguf_writes_the_model_and_a_modelfile(tmp_path, capsys):
    base, ad = adapter(tmp_path)
    out_file = tmp_path / "m" / "merged.gguf"
    code, out, err = run(["merge", str(ad), "--model", str(base), "--format", "gguf", "--quant", "q8_0",
                          "--placeholder-vocab", "--out", str(out_file)], capsys)
    assert code == 0, err
    assert out.startswith(f"GGUF model written to {out_file} (q8_0")
    kv, tensors = kv_and_tensors(out_file)
    assert kv["general.architecture"] == "llama" and kv["lorakit.merged_adapter"] == str(ad)
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert "FROM ./merged.gguf" in (tmp_path / "m" / "Modelfile").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--format", "gguf", "--dtype", "bfloat16", "--force"], "--dtype, --force: not used with --format gguf"),
    (["--quant", "f16"], "--quant: not used with --format hf"),
    (["--placeholder-vocab"], "--placeholder-vocab: not used with --format hf"),
    (["--format", "onnx"], "--format must be hf (a transformers model folder) or gguf, got 'onnx'"),
    (["--format", "gguf", "--quant", "q4_k"], "quant must be one of"),
])
def test_merge_refuses_options_of_the_other_format(tmp_path, capsys, argv, message):
    base, ad = adapter(tmp_path)
    code, _, err = run(["merge", str(ad), "--model", str(base), "--out", str(tmp_path / "out"), *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_adapter_info_for_a_runtime_lists_findings_and_fails_on_errors(tmp_path, capsys):
    _, plain = adapter(tmp_path)
    code, out, _ = run(["adapter-info", str(plain), "--for", "llama.cpp"], capsys)
    assert code == 0 and out.splitlines()[-1] == "llama.cpp: 0 error(s), 0 warning(s)"
    assert all(line.startswith(("info: ", "warning: ")) for line in out.splitlines()[:-1])
    _, dora = adapter(tmp_path, "dora", use_dora=True)
    code, out, _ = run(["adapter-info", str(dora), "--for", "llama.cpp"], capsys)
    assert code == 1 and out.startswith("error: ") and "DoRA" in out
    code, out, _ = run(["adapter-info", str(dora), "--for", "peft"], capsys)
    assert code == 0 and "peft: 0 error(s)" in out
    code, _, err = run(["adapter-info", str(plain), "--for", "onnx"], capsys)
    assert code == 2 and "target must be one of ('llama.cpp', 'vllm', 'peft'), got 'onnx'" in err
    code, _, err = run(["adapter-info", str(plain), "--model", "x"], capsys)
    assert code == 2 and "--model only applies with --for" in err
    code, out, _ = run(["adapter-info", str(plain)], capsys)  # without --for: the summary as before
    assert code == 0 and "8 tensors, 896 parameters" in out
