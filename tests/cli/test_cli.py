import json

import pytest

import lorakit as lk
from lorakit.cli.main import main

from conftest import randomize_lora_B, tiny_llama


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_adapter_info_and_inspect(tmp_path, capsys):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    lk.add_lora(model, lk.LoraConfig(r=4))
    randomize_lora_B(model)
    lk.save_adapter(model, tmp_path / "ad")
    code, out, _ = run(["adapter-info", str(tmp_path / "ad")], capsys)
    assert code == 0
    assert json.JSONDecoder().raw_decode(out)[0]["r"] == 4
    assert "8 tensors, 896 parameters" in out


def test_errors_are_one_clear_line(tmp_path, capsys):
    code, _, err = run(["adapter-info", str(tmp_path / "missing")], capsys)
    assert code == 2
    assert err.startswith("error: ") and "no adapter_config.json" in err and "Traceback" not in err
