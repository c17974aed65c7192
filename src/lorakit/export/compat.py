"""Will a LoRA adapter folder load in llama.cpp, vLLM or PEFT and behave as it does in lorakit? `adapter_compatibility`
returns the findings, errors first, each saying what differs and what to do instead."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from lorakit.errors import LorakitError
from lorakit.export.gguf import (SUPPORTED_ARCHITECTURES, SUPPORTED_TEXT, base_info, gguf_tensor_name, module_scale,
                                 normalise_lora_keys)
from lorakit.lora.adapter_io import CONFIG_FILE, PREFIX, WEIGHTS_FILE, peek_adapter_config, read_adapter_weights

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_LORA_MODULES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj",
                     "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


class Finding(NamedTuple):
    level: str
    """"error": will not load or will behave differently; "warning": may differ, check; "info": fine, for the record."""
    message: str


TARGETS = ("llama.cpp", "vllm", "peft")


def adapter_compatibility(adapter_dir: str | os.PathLike, target: str = "llama.cpp",
                          base_name_or_path: str | os.PathLike | None = None) -> list[Finding]:
    """Will the adapter folder load in `target` ("llama.cpp", "vllm" or "peft") and behave as in lorakit?

    Checks module coverage and names, DoRA, PiSSA/OLoRA, ranks, scaling (rsLoRA, rank/alpha patterns), dtype,
    modules_to_save and embedding LoRA. Errors come first.
    """
    if target not in TARGETS:
        raise LorakitError(f"target must be one of {TARGETS}, got {target!r}.")
    adapter_dir = Path(adapter_dir)
    config = peek_adapter_config(adapter_dir)
    weights = normalise_lora_keys(read_adapter_weights(adapter_dir / WEIGHTS_FILE))
    peft_cfg = json.loads((adapter_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    modules: dict[str, dict[str, Any]] = {}
    others = []
    for key, t in weights.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, kind in ((".lora_A.weight", "linear"), (".lora_embedding_A", "embedding")):
            if name.endswith(suffix):
                modules[name[: -len(suffix)]] = {"kind": kind, "rank": int(t.shape[0]), "dtype": str(t.dtype)}
                break
        else:
            if not (name.endswith(".lora_B.weight") or name.endswith(".lora_embedding_B")):
                others.append(name)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in weights.values()})
    ranks = sorted({m["rank"] for m in modules.values()})
    scales = {m: module_scale(config, m, v["rank"]) for m, v in modules.items()}
    info = None
    with contextlib.suppress(LorakitError, OSError, KeyError, ValueError):
        info = base_info(base_name_or_path, adapter_dir)
    out: list[Finding] = []
    add = lambda level, msg: out.append(Finding(level, msg))  # noqa: E731
    keys_prefixed = all(k.startswith(PREFIX) for k in weights)
    unmatched = [m for m in modules if gguf_tensor_name(m) is None]
    if target == "llama.cpp":
        _llama_cpp_findings(add, config, modules, scales, info, peft_cfg, others, unmatched, dtypes, adapter_dir)
    elif target == "vllm":
        _vllm_findings(add, config, modules, scales, info, peft_cfg, others, keys_prefixed, ranks, dtypes)
    else:
        _peft_findings(add, config, modules, peft_cfg, others, dtypes)
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(out, key=lambda f: order[f.level])


def _scale_differs(scales: dict[str, float]) -> bool:
    values = list(scales.values())
    return any(abs(v - values[0]) > 1e-9 * abs(values[0]) for v in values)


def _llama_cpp_findings(add, config, modules, scales, info, peft_cfg, others, unmatched, dtypes, adapter_dir) -> None:
    if info is not None and info.arch not in SUPPORTED_ARCHITECTURES:
        add("error", f"base architecture {info.arch!r}: lorakit's GGUF export supports {SUPPORTED_TEXT}")
    elif info is None:
        add("warning", "base model not found (pass base_name_or_path): architecture, head counts and tied "
                       "embeddings not checked")
    if peft_cfg.get("fan_in_fan_out"):
        add("error", f"GPT-2 Conv1D adapter: lorakit's GGUF export supports {SUPPORTED_TEXT}")
    if config.use_dora:
        add("error", "DoRA: llama.cpp applies plain LoRA only (y = Wx + s·BAx); the magnitude vector would be "
                     "dropped. "
                     "Export the merged model (`lorakit merge ADAPTER --format gguf`).")
    if config.modules_to_save or others:
        add("error", f"modules_to_save / extra tensors ({', '.join((config.modules_to_save or []) + others[:3])}): a "
                     "GGUF LoRA holds only A/B pairs; llama.cpp would use the base's modules. Export the merged model.")
    if unmatched:
        add("error", f"{len(unmatched)} module(s) have no llama.cpp tensor (e.g. {unmatched[0]}); llama.cpp refuses an "
                     "adapter with tensors missing from the base ('does not exist in base model')")
    embed = [m for m, v in modules.items() if v["kind"] == "embedding"]
    if embed:
        if info is not None and info.tied_embeddings:
            add("error", "embedding LoRA on a base with tied embeddings: llama.cpp also applies it to the tied "
                         "output head (same tensor name, token_embd.weight), where the shapes do not fit, and aborts "
                         "(GGML_ASSERT ggml_can_mul_mat). Export the merged model.")
        else:
            add("info", "embedding LoRA: exported as token_embd.weight.lora_a = Aᵀ, lora_b = B (llama.cpp's layout)")
    if "lm_head" in modules and info is not None and info.tied_embeddings:
        add("error", "lm_head LoRA on a base with tied embeddings: the base GGUF has no output.weight to adapt")
    if config.changes_base:
        add("warning", f"init={config.init!r}: the adapter belongs to the residual base W − s·B0A0. lorakit's "
                       "export "
                       "converts it to an exact rank-2r plain LoRA (needs the base weights); llama.cpp's own "
                       "convert_lora_to_gguf.py would apply B·A to the original base: wrong outputs.")
    if config.use_rslora:
        add("info", "rsLoRA: llama.cpp scales by alpha/r; lorakit's export stores alpha·√r so the scale is "
                    "alpha/√r "
                    "(llama.cpp's convert_lora_to_gguf.py ignores use_rslora: scale off by √r)")
    if config.alpha_pattern or config.rank_pattern:
        folded = _scale_differs({m: s * modules[m]["rank"] for m, s in scales.items()})
        add("info" if not folded else "warning",
            "rank_pattern/alpha_pattern: llama.cpp uses one alpha with each tensor's own rank; "
            + ("lorakit's export folds the differing scales into B (convert_lora_to_gguf.py ignores the patterns: "
               "wrong scale for those modules)" if folded else "every module's alpha/r already matches one alpha"))
    if config.init == "loftq":
        add("warning", "LoftQ: A and B compensate one quantization of the base; on a llama.cpp base quantized "
                       "differently (Q4_1, Q8_0, ...) that compensation does not apply")
    rank_list = ", ".join(map(str, sorted({v["rank"] for v in modules.values()})))
    add("info", f"{len(modules)} LoRA modules, ranks {rank_list}"
                f", stored as {', '.join(dtypes)}; llama.cpp's LoRA types are f32, f16, bf16, q8_0 (B of rank < 32 "
                "stays f16 with q8_0)")
    add("info", "llama.cpp applies the adapter to whatever GGUF base it is given: use the same base (a quantized GGUF "
                "of it is fine, results then differ by the quantization)")


def _vllm_findings(add, config, modules, scales, info, peft_cfg, others, keys_prefixed, ranks, dtypes) -> None:
    if config.use_dora:
        add("error", "DoRA: vLLM refuses DoRA adapters ('vLLM does not yet support DoRA'). Serve the merged model.")
    if config.modules_to_save:
        add("error", f"modules_to_save {config.modules_to_save}: vLLM refuses them ('only supports modules_to_save "
                     "being None'). Serve the merged model.")
    if info is not None and info.arch != "llama":
        add("warning", f"base architecture {info.arch!r}: module naming checked for Llama only")
    suffixes = {m.split(".")[-1] for m, v in modules.items() if v["kind"] == "linear"}
    unknown = sorted(suffixes - set(VLLM_LORA_MODULES) - {"lm_head"})
    bad_path = [m for m, v in modules.items() if v["kind"] == "linear" and gguf_tensor_name(m) is None]
    if unknown or bad_path or not keys_prefixed:
        add("error", "module names vLLM will not match: "
            + (f"unsupported modules {unknown}; " if unknown else "")
            + (f"{len(bad_path)} module path(s) not of the form model.layers.N.(self_attn|mlp).X "
               f"(e.g. {bad_path[0]!r}); " if bad_path else "")
            + ("keys without PEFT's 'base_model.model.' prefix; " if not keys_prefixed else "")
            + "vLLM accepts such adapters and SILENTLY serves the base model (vLLM issue #34186): requests succeed "
              "with base-model output. Re-save the adapter from the CausalLM model class vLLM loads.")
    else:
        packed = sorted({VLLM_LORA_MODULES[s] for s in suffixes if s in VLLM_LORA_MODULES})
        add("info", f"module names match vLLM's Llama LoRA modules ({', '.join(packed)}); if the server is started "
                    "with --lora-target-modules, it must include these or vLLM again silently serves the base")
    if "lm_head" in suffixes or any(v["kind"] == "embedding" for v in modules.values()):
        add("warning", "embed_tokens/lm_head LoRA: supported only by some vLLM versions and models; others ignore or "
                       "refuse it. Test with the vLLM version you deploy, or merge.")
    if config.alpha_pattern:
        add("error", "alpha_pattern: vLLM reads only lora_alpha and r (one scale for all modules), so modules with "
                     "their own alpha get the wrong scale. Merge, or re-train without alpha_pattern.")
    if config.rank_pattern and _scale_differs(scales) is False and not config.alpha_pattern:
        add("info", "rank_pattern: per-module ranks come from the tensors; the scale is the same for every module")
    elif config.rank_pattern:
        add("error", "rank_pattern: vLLM computes one scale from the config's r (alpha/r or alpha/√r) for every "
                     "module, so modules with another rank get the wrong scale. Merge, or drop rank_pattern.")
    if config.use_rslora:
        add("info", "rsLoRA: vLLM reads use_rslora and scales by alpha/√r")
    if config.changes_base:
        add("error", f"init={config.init!r}: vLLM applies B·A to the original base, but this adapter belongs to the "
                     "residual base. Save it with save_adapter(..., convert_to_lora=True) (rank 2r) and serve that.")
    if ranks:
        need = next((c for c in VLLM_MAX_LORA_RANKS if c >= ranks[-1]), None)
        if need is None:
            add("error", f"rank {ranks[-1]} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")
        else:
            add("info" if need <= 16 else "warning",
                f"largest rank {ranks[-1]}: vLLM's default --max-lora-rank 16 covers it" if need <= 16 else
                f"largest rank {ranks[-1]}: start vLLM with --enable-lora --max-lora-rank {need} or it refuses the "
                f"adapter (choices {', '.join(map(str, VLLM_MAX_LORA_RANKS))}; default 16)")
    add("info", f"weights stored as {', '.join(dtypes)}; vLLM casts LoRA weights to --lora-dtype (default: the "
                "model's dtype, e.g. bf16): tiny ΔW lose precision there")


def _peft_findings(add, config, modules, peft_cfg, others, dtypes) -> None:
    add("info", "lorakit writes PEFT's adapter_config.json and key names: PeftModel.from_pretrained loads it "
                "(lorakit's tests compare logits with PEFT for LoRA, DoRA, PiSSA, OLoRA)")
    if config.init.startswith("pissa_niter_"):
        add("warning", f"init={config.init!r}: PEFT re-derives the residual base with an unseeded randomized SVD, so "
                       "it gets a different residual than lorakit. Save it as 'pissa' or with convert_to_lora=True.")
    elif config.changes_base:
        add("info", f"init={config.init!r}: PEFT re-derives the residual base from the original one, as lorakit does")
    if config.init == "loftq":
        add("warning", "LoftQ: load it on the same quantized base (PEFT's loftq_config); lorakit records the base "
                       "quantization in lorakit.json")
    if peft_cfg.get("fan_in_fan_out"):
        add("info", "GPT-2 Conv1D: fan_in_fan_out=true is set, as PEFT expects")
    add("info", f"weights stored as {', '.join(dtypes)}")

