"""Merged models as standalone GGUF files for llama.cpp / Ollama: a Llama-architecture model, with an adapter merged in
when given, written with llama.cpp's tensor names and layouts (`lorakit.export.gguf`) and metadata copied from the
embedded model's own GGUF file or built from config.json and tokenizer.json."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.export.gguf import (FILE_TYPES, SUPPORTED_TEXT, BaseInfo, base_info, embedded_gguf_file, embedded_name_of,
                                 encode_tensor, gguf_field, gguf_tensor_name, info_from_gguf, load_fp32_base,
                                 permute_qk_rows, write_atomically, write_gguf)
from lorakit.export.ollama import write_ollama_modelfile
from lorakit.lora.adapter_io import load_adapter
from lorakit.lora.injection import lora_layers, unload

MERGED_QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")


@dataclass
class MergedExport:
    path: str
    quant: str
    tensors: int
    metadata_from: str
    types: dict[str, int] = field(default_factory=dict)
    modelfile: str | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        types = ", ".join(f"{k} {v}" for k, v in sorted(self.types.items()))
        return f"GGUF model written to {self.path} ({self.quant}: {types}; metadata from {self.metadata_from})"


def _merged_model(model_or_dir, adapter) -> tuple[nn.Module, str | None]:
    from lorakit.export.merged import check_mergeable

    if isinstance(model_or_dir, nn.Module):
        model = model_or_dir
        if any(True for _ in lora_layers(model)) or adapter is not None:
            model = copy.deepcopy(model)  # never change the caller's model
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
    else:
        name = str(model_or_dir)
        model = load_fp32_base(name)
    if adapter is not None:
        load_adapter(model, adapter, adapter="gguf_export")
    if any(True for _ in lora_layers(model)):
        check_mergeable(model)
        model = unload(model)
    return model.float().train(False), name


def _hf_config_kv(config: dict[str, Any], arch: str, source: str) -> list[tuple]:
    import gguf

    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    problems = []
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias (bias tensors)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.get('hidden_act')!r}")
    rope = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or legacy.get("rope_type") or legacy.get("type") or "default"
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if rope_type not in ("default", "linear"):
        problems.append(f"RoPE type {rope_type!r} (needs llama.cpp's rope_freqs tensor or scaling keys)")
    if problems:
        raise LorakitError(f"{source}: cannot build GGUF metadata for {', '.join(problems)}; lorakit's GGUF export "
                           f"supports {SUPPORTED_TEXT}.")
    n_head = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    kv = [(f"{arch}.block_count", config["num_hidden_layers"], u32),
          (f"{arch}.context_length", config.get("max_position_embeddings", 2048), u32),
          (f"{arch}.embedding_length", config["hidden_size"], u32),
          (f"{arch}.feed_forward_length", config["intermediate_size"], u32),
          (f"{arch}.attention.head_count", n_head, u32),
          (f"{arch}.attention.head_count_kv", config.get("num_key_value_heads") or n_head, u32),
          (f"{arch}.rope.freq_base", float(theta), f32),
          (f"{arch}.attention.layer_norm_rms_epsilon", float(config.get("rms_norm_eps", 1e-6)), f32),
          (f"{arch}.vocab_size", config["vocab_size"], u32),
          (f"{arch}.rope.dimension_count", head_dim, u32)]
    if head_dim * n_head != config["hidden_size"]:
        kv += [(f"{arch}.attention.key_length", head_dim, u32), (f"{arch}.attention.value_length", head_dim, u32)]
    if rope_type == "linear":
        factor = rope.get("factor", legacy.get("factor"))
        kv += [(f"{arch}.rope.scaling.type", "linear", gguf.GGUFValueType.STRING),
               (f"{arch}.rope.scaling.factor", float(factor), f32)]
    return [(k, int(v) if t == u32 else v, t, None) for k, v, t in kv]


def _tokenizer_kv(folder: Path | None, vocab_size: int, tokenizer_pre: str | None, placeholder_vocab: bool,
                  source: str) -> tuple[list[tuple], str | None]:
    """GGUF tokenizer keys from a HF folder's tokenizer.json (byte-level BPE only); returns (kv, chat template)."""
    import gguf

    S, A, I32, U32, B = (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32,
                         gguf.GGUFValueType.UINT32, gguf.GGUFValueType.BOOL)
    tok_file = folder / "tokenizer.json" if folder is not None else None
    if tok_file is None or not tok_file.is_file():
        if placeholder_vocab:
            # llama.cpp's "none" vocabulary: vocab_size dummy tokens; the model is driven with token ids only.
            return [("tokenizer.ggml.model", "none", S, None)], None
        raise LorakitError(f"{source} has no tokenizer.json, so the GGUF file would have no tokenizer. Pass a folder "
                           "with the tokenizer (or placeholder_vocab=True for a file driven by token ids only).")
    tok = json.loads(tok_file.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    blob = json.dumps([tok.get("pre_tokenizer"), tok.get("decoder")])
    if model.get("type") != "BPE" or "ByteLevel" not in blob:
        raise LorakitError(f"{tok_file}: only byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3 use) "
                           f"are converted; this one is {model.get('type')!r}. Use llama.cpp's convert_hf_to_gguf.py.")
    if not tokenizer_pre:
        raise LorakitError(f"{source}: llama.cpp needs the name of the pre-tokenizer (tokenizer.ggml.pre, e.g. "
                           "'llama-bpe' for Llama 3, 'smollm' for SmolLM/SmolLM2, 'gpt-2'); a wrong one tokenizes "
                           "differently without an error, so lorakit does not guess. Pass tokenizer_pre=NAME.")
    added = {int(t["id"]): t for t in tok.get("added_tokens", [])}
    n = max([vocab_size, *(v + 1 for v in model["vocab"].values()), *(k + 1 for k in added)])
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [int(gguf.TokenType.UNUSED)] * n
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, int(gguf.TokenType.NORMAL)
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    kv = [("tokenizer.ggml.model", "gpt2", S, None), ("tokenizer.ggml.pre", tokenizer_pre, S, None),
          ("tokenizer.ggml.tokens", tokens, A, S), ("tokenizer.ggml.token_type", types, A, I32)]
    if merges:
        kv.append(("tokenizer.ggml.merges", merges, A, S))
    tcfg_file = folder / "tokenizer_config.json"
    tcfg = json.loads(tcfg_file.read_text(encoding="utf-8")) if tcfg_file.is_file() else {}
    ids = {t: i for i, t in enumerate(tokens)}
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        value = tcfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value in ids:
            kv.append((f"tokenizer.ggml.{name}_token_id", ids[value], U32, None))
    kv.append(("tokenizer.ggml.add_bos_token", bool(tcfg.get("add_bos_token", False)), B, None))
    template = tcfg.get("chat_template")
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str) and template:
        kv.append(("tokenizer.chat_template", template, S, None))
    return kv, template if isinstance(template, str) else None


def _reference_kv(gguf_file: str, quant: str) -> tuple[list[tuple], str | None, Any]:
    """All metadata of the base's own GGUF file except what describes its tensors' storage."""
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    kv = []
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type",
                                              "general.quantization_version"):
            continue
        main = f.types[0]
        sub = f.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        kv.append((key, f.contents(), main, sub))
    return kv, gguf_field(reader, "tokenizer.chat_template"), reader


def _llama_tensors(model: nn.Module, info: BaseInfo) -> Iterable[tuple[str, torch.Tensor]]:
    state = model.state_dict()
    for key, t in state.items():
        if not key.endswith(".weight"):
            raise LorakitError(f"Unexpected tensor {key!r} in the model (biases are not supported): lorakit's GGUF "
                               f"export supports {SUPPORTED_TEXT}.")
        module = key[: -len(".weight")]
        if module == "lm_head" and info.tied_embeddings:
            continue
        name = gguf_tensor_name(module)
        if name is None:
            raise LorakitError(f"The model has a tensor {key!r} that llama.cpp's Llama graph does not use; lorakit's "
                               f"GGUF export supports {SUPPORTED_TEXT}.")
        t = t.detach().float().cpu()
        if module.endswith("self_attn.q_proj"):
            t = permute_qk_rows(t, info.n_head)
        elif module.endswith("self_attn.k_proj"):
            t = permute_qk_rows(t, info.n_head_kv)
        yield name, t


def export_merged_gguf(model_or_dir: str | os.PathLike | nn.Module, out_file: str | os.PathLike, quant: str = "f16",
                       adapter: str | os.PathLike | None = None, tokenizer_pre: str | None = None,
                       placeholder_vocab: bool = False, modelfile: bool = True) -> MergedExport:
    """Write a standalone GGUF model of a Llama-architecture model, with `adapter` (a LoRA/DoRA/PiSSA folder) merged
    in when given; a model object that carries lorakit adapters is merged with its active one (on a copy).

    `quant`: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 (what gguf-py can quantize). Norms stay f32; with the 4/5-bit
    types token_embd (and output) are q8_0, and a matrix whose rows cannot be split into blocks falls back to f16.

    Metadata: for the embedded default model (or its cached folder) every key of its own GGUF file — hyper-parameters
    and the tokenizer exactly as llama.cpp's converter wrote them — is copied. For another Hugging Face folder it is
    built from config.json and tokenizer.json (byte-level BPE; `tokenizer_pre` names llama.cpp's pre-tokenizer);
    `placeholder_vocab=True` writes a vocabulary-less file for models without a tokenizer (driven by token ids).

    With `modelfile`, an Ollama `Modelfile` is written next to the GGUF file (FROM ./<file>, plus TEMPLATE / stop
    parameters when the chat template is one Ollama's template language can express).
    """
    import gguf

    out_file = Path(out_file)
    if quant not in MERGED_QUANTS:
        raise LorakitError(f"quant must be one of {MERGED_QUANTS} (the types gguf-py can write), got {quant!r}.")
    model, name = _merged_model(model_or_dir, adapter)
    info = base_info(model)
    embedded = embedded_name_of(name) or embedded_name_of(getattr(model.config, "_name_or_path", None))
    reference = str(embedded_gguf_file(embedded)) if embedded else None
    notes = []
    if reference:
        kv, template, reader = _reference_kv(reference, quant)
        ref = info_from_gguf(Path(reference))
        if (ref.n_layer, ref.n_embd, ref.vocab_size) != (info.n_layer, info.n_embd, info.vocab_size):
            raise LorakitError(f"The model does not match the metadata source {reference}.")
        metadata_from = reference
    else:
        folder = None
        if not isinstance(model_or_dir, nn.Module):
            with contextlib.suppress(Exception):
                from lorakit.models.loading import resolve_model_path

                folder = Path(resolve_model_path(str(model_or_dir)))
        elif name and Path(name).is_dir():
            folder = Path(name)
        kv = _hf_config_kv(info.config, info.arch, str(folder or name))
        tkv, template = _tokenizer_kv(folder, info.vocab_size, tokenizer_pre, placeholder_vocab, str(folder or name))
        kv += tkv
        kv += [("general.type", "model", gguf.GGUFValueType.STRING, None),
               ("general.name", Path(str(name or "model")).name, gguf.GGUFValueType.STRING, None)]
        has_tok = folder is not None and (folder / "tokenizer.json").is_file()
        metadata_from = "config.json + " + ("tokenizer.json" if has_tok else "placeholder vocabulary (no tokenizer)")
    kv = [k for k in kv if k[0] != "general.file_type"]
    kv += [("general.file_type", int(gguf.LlamaFileType[FILE_TYPES[quant]]), gguf.GGUFValueType.UINT32, None),
           ("general.quantization_version", gguf.GGML_QUANT_VERSION, gguf.GGUFValueType.UINT32, None)]
    if adapter is not None:
        kv.append(("lorakit.merged_adapter", str(adapter), gguf.GGUFValueType.STRING, None))

    types: dict[str, int] = {}

    def tensors():
        for tname, t in _llama_tensors(model, info):
            want = quant
            if quant in LOW_BIT and tname in ("token_embd.weight", "output.weight"):
                want = "q8_0"
            data, raw, used = encode_tensor(t.numpy(), want)
            types[used] = types.get(used, 0) + 1
            yield tname, data, raw

    write_atomically(out_file, lambda tmp: write_gguf(tmp, info.arch, kv, tensors()))
    report = MergedExport(str(out_file), quant, sum(types.values()), metadata_from, types, notes=notes)
    if modelfile:
        report.modelfile = str(write_ollama_modelfile(out_file.parent / "Modelfile", out_file, chat_template=template))
    return report

