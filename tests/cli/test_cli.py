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


def test_generate_prompt_and_chat_run_the_library_with_the_sampling_flags(tmp_path, capsys, monkeypatch):
    import io

    from lorakit.inference.chat import chat_turn
    from lorakit.inference.generate import generate
    from lorakit.inference.sampling import Sampling
    from tiny_text import save_tiny_lm

    model_dir = save_tiny_lm(tmp_path / "tiny")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello cat\n"))  # then end of input (Ctrl-D) ends the chat
    code, out, err = run(["generate", "--chat", "--model", str(model_dir), "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    model, tokenizer = lk.load_model(str(model_dir))
    expected = chat_turn(model, tokenizer, [], "hello cat", sampling=Sampling(max_new_tokens=3)).text
    assert f"model: {expected}\n" in out
    code, _, err = run(["generate", "hi", "--chat", "--model", str(model_dir)], capsys)
    assert code == 2 and "Give exactly one of" in err

    sampling = Sampling(max_new_tokens=5, temperature=0.8, seed=3, stop=["zzz"], presence_penalty=1.5)
    code, out, err = run(["generate", "hello cat", "--model", str(model_dir), "--max-new-tokens", "5",
                          "--temperature", "0.8", "--seed", "3", "--stop", "zzz", "--presence-penalty", "1.5"], capsys)
    assert code == 0, err
    assert out == generate(model, tokenizer, ["hello cat"], sampling=sampling, chat=True)[0].text + "\n"
    code, _, err = run(["generate", "hello", "--model", str(model_dir), "--top-p", "0"], capsys)
    assert code == 2 and "top_p must be in (0, 1], got 0.0" in err


def test_inspect_counts_what_the_lora_flags_ask_for(tmp_path, capsys):
    from tiny_text import save_tiny_lm

    model_dir = save_tiny_lm(tmp_path / "tiny")
    code, out, err = run(["inspect", "--model", str(model_dir), "--r", "2", "--target-modules", "q_proj,o_proj"],
                         capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if "self_attn" in line]
    assert len(lines) == 4 and all(line.split()[1] == "128" for line in lines)  # 2 layers x (q, o): 2 * (32 + 32)
    code, _, err = run(["inspect", "--model", str(model_dir), "--r", "0"], capsys)
    assert code == 2 and "r must be a positive integer, got 0" in err
