"""Ollama Modelfiles for exported GGUF files: FROM the model, ADAPTER a GGUF LoRA, and TEMPLATE / SYSTEM / stop
parameters translated from the model's Jinja chat template when it is a known family (ChatML, Llama 3)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from lorakit.export.gguf import gguf_field


CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
LLAMA3_TEMPLATE = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""


def ollama_template(chat_template: str | None) -> tuple[str | None, list[str], str | None]:
    """(Ollama TEMPLATE, stop strings, default SYSTEM) for a Jinja chat template. Ollama's TEMPLATE is a Go template,
    not Jinja, so only known families are translated (ChatML, Llama 3); otherwise None, and Ollama falls back to
    detecting the template from the GGUF's tokenizer.chat_template itself."""
    if not chat_template:
        return None, [], None
    if "<|im_start|>" in chat_template:
        system = None
        for marker in ("<|im_start|>system\n", "<|im_start|>system\\n"):  # a newline, or an escaped one
            start = chat_template.find(marker)
            if start >= 0:
                end = chat_template.find("<|im_end|>", start)
                text = chat_template[start + len(marker):end] if end > start else ""
                system = text if text and "{{" not in text and "{%" not in text and "'" not in text else None
                break
        return CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"], system
    if "<|start_header_id|>" in chat_template:
        return LLAMA3_TEMPLATE, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], None
    return None, [], None


def write_ollama_modelfile(path: str | os.PathLike, model: str | os.PathLike, adapter: str | os.PathLike | None = None,
                           chat_template: str | None = None) -> Path:
    """An Ollama Modelfile: FROM the model (a GGUF path relative to the Modelfile, or an Ollama model name), ADAPTER
    the GGUF LoRA (Ollama requires it to be made for exactly that base), TEMPLATE/SYSTEM/stop from the chat template."""
    path = Path(path)

    def ref(p):
        p = Path(p)
        if not p.suffix == ".gguf":
            return str(p)  # an Ollama model name
        with contextlib.suppress(ValueError):
            return "./" + str(p.resolve().relative_to(path.parent.resolve()))
        return str(p.resolve())

    template, stops, system = ollama_template(chat_template)
    lines = ["# Written by lorakit. Create the Ollama model with: ollama create NAME -f " + path.name,
             f"FROM {ref(model)}"]
    if adapter is not None:
        lines.append(f"ADAPTER {ref(adapter)}")
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    elif chat_template:
        lines.append("# The chat template has no Ollama translation here; Ollama detects it from the GGUF metadata.")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_adapter_modelfile(path: str | os.PathLike, base_gguf: str | os.PathLike,
                            adapter_gguf: str | os.PathLike) -> Path:
    """The base + adapter Modelfile variant (FROM base, ADAPTER ./adapter.gguf), template taken from the base GGUF."""
    template = None
    if str(base_gguf).endswith(".gguf") and Path(base_gguf).is_file():
        import gguf

        template = gguf_field(gguf.GGUFReader(str(base_gguf)), "tokenizer.chat_template")
    return write_ollama_modelfile(path, base_gguf, adapter=adapter_gguf, chat_template=template)

