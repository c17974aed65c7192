"""Ollama Modelfiles (lorakit.export.ollama): the chat template translated to Ollama's TEMPLATE / SYSTEM / stop, and
FROM / ADAPTER references relative to the Modelfile."""

from __future__ import annotations

from lorakit.export.ollama import ollama_template, write_ollama_modelfile


def test_ollama_modelfiles(tmp_path):
    chatml = ("{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
              "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}"
              "{% endfor %}")
    template, stops, system = ollama_template(chatml)
    assert "{{ .Content }}<|im_end|>" in template and "<|im_end|>" in stops
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert ollama_template(chatml.replace("\\n", "\n"))[2] == system  # a real newline in the template source
    (tmp_path / "base.gguf").write_bytes(b"")
    path = write_ollama_modelfile(tmp_path / "Modelfile.adapter", tmp_path / "base.gguf",
                                  adapter=tmp_path / "ad.gguf")
    text = path.read_text()
    assert "FROM ./base.gguf" in text and "ADAPTER ./ad.gguf" in text
    text = write_ollama_modelfile(tmp_path / "M2", "smollm2:135m", adapter=tmp_path / "ad.gguf").read_text()
    assert "FROM smollm2:135m\n" in text
    assert ollama_template("{{ bos_token }}{{ messages }}")[0] is None
