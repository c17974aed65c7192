"""The training config: `TrainConfig` (run, model and loop settings) with its sections `data` (DataConfig), `lora`
(LoraConfig) and `optim` (OptimConfig); read from YAML plus dotted overrides, saved as the run's config.yaml.

    config = TrainConfig.from_yaml("cfg.yaml", {"optim.lr": "2e-4", "optim.max_steps": 100})

Every config validates itself the same way (see lorakit.validation): unknown keys and bad values anywhere in the
tree are reported together in one LorakitError.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.data.config import DataConfig
from lorakit.errors import LorakitError
from lorakit.lora.config import LoraConfig
from lorakit.memory import MAX_MMAP_THRESHOLD
from lorakit.validation import build, check, float_like, is_int, is_number

PRECISIONS = ("fp32", "bf16")
BASE_DTYPES = ("auto", "fp32", "bf16")
SCHEDULES = ("linear", "constant", "cosine")
METRICS = (None, "accuracy", "exact_match")
DISTRIBUTED = ("none", "ddp", "fsdp")
NONFINITE = ("stop", "skip")
QUANTIZE = (None, "nf4", "int8", "int8-wo")
TITLE = "Invalid training config"
HINT = "Fix these keys in the YAML file or on the command line."


@dataclass
class OptimConfig:
    """AdamW with warmup and decay, as in the LoRA paper's recipes."""

    lr: float = 2e-4
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.01
    """Applied to matrices only (not to biases or norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment decay rates."""
    eps: float = 1e-8
    """AdamW's denominator term."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (Hayou et al. 2024): the adapters' B matrices (linear and embedding) learn at lr × this ratio, the A
    matrices and everything else at lr (the paper suggests 2-16, with a somewhat lower lr). null: plain LoRA."""
    schedule: str = "linear"
    """linear (decay to 0 after warmup), cosine, or constant."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of all steps (used when warmup_steps is 0)."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is averaged over all their target tokens."""
    max_batch_tokens: int | None = 448
    """Activation memory bound: at most this many tokens (rows × padded length) per forward/backward pass. A
    micro-batch above it is split, its rows sorted by length, into passes whose gradients add up in the same
    optimizer step, weighted by target tokens as grad_accum's are: same loss and update as the whole micro-batch, to
    float rounding. A single example longer than the budget runs alone. null: never split. Sorted passes also pad
    less: on SmolLM2-135M (batch 8, bf16 base, 2 CPU threads) 448 was faster than whole micro-batches and leaner,
    on E2E (~8 × 90 tokens) and on long chat examples alike (benchmarks/README.md, "Training speed and memory")."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this (None: no clipping)."""
    epochs: int = 1
    """Passes over the training data."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):  # YAML has no tuples
            self.betas = tuple(self.betas)
        check(self, TITLE, HINT)

    def problems(self, prefix: str = "optim.") -> list[str]:
        """Every invalid value, each naming its key (`prefix` + field)."""
        out = []
        if not is_number(self.lr) or self.lr <= 0:
            out.append(f"{prefix}lr must be a positive number, got {self.lr!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            out.append(f"{prefix}weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2
                and all(is_number(b) and 0 <= b < 1 for b in self.betas)):
            out.append(f"{prefix}betas must be two numbers in [0, 1), got {self.betas!r}")
        if not is_number(self.eps) or self.eps <= 0:
            out.append(f"{prefix}eps must be a positive number, got {self.eps!r}")
        if self.loraplus_lr_ratio is not None and (not is_number(self.loraplus_lr_ratio) or self.loraplus_lr_ratio <= 0):
            out.append(f"{prefix}loraplus_lr_ratio must be a positive number (B's lr / A's lr, e.g. 16) or null, "
                       f"got {self.loraplus_lr_ratio!r}")
        if self.schedule not in SCHEDULES:
            out.append(f"{prefix}schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            out.append(f"{prefix}warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            out.append(f"{prefix}warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        for name in ("batch_size", "grad_accum", "epochs"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                out.append(f"{prefix}{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_batch_tokens is not None and (not is_int(self.max_batch_tokens) or self.max_batch_tokens < 1):
            out.append(f"{prefix}max_batch_tokens must be a positive integer (tokens per forward pass, e.g. 1024) or "
                       f"null (never split a micro-batch), got {self.max_batch_tokens!r}")
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps < 1):
            out.append(f"{prefix}max_steps must be a positive integer or null, got {self.max_steps!r}")
        if self.max_grad_norm is not None and (not is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            out.append(f"{prefix}max_grad_norm must be a positive number or null, got {self.max_grad_norm!r}")
        return out


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as config.yaml in the run folder."""

    model: str = "smollm2-135m"
    """Embedded model name, local folder or hub id (ignored when train() is given a model)."""
    task: str = "auto"
    """causal-lm, seq-cls, or auto (seq-cls for classification data)."""
    output_dir: str = "runs/lorakit"
    """The run folder."""
    seed: int = 0
    """Seeds Python, NumPy and PyTorch (adapter init, dropout, data order)."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast)."""
    base_dtype: str = "auto"
    """The frozen base's weights: bf16 (cast once; LoRA weights stay fp32), fp32, or auto: bf16 where this device
    multiplies bf16 clearly faster than fp32 (measured at start-up: CPUs with AVX512-BF16 or AMX, CUDA with bf16),
    else fp32. The run's config.yaml records the choice and why."""
    quantize: str | None = None
    """nf4 or int8: the frozen base's linear layers in bitsandbytes 4-/8-bit (QLoRA); int8-wo: torchao int8
    weight-only. LoRA weights stay fp32."""
    gradient_checkpointing: bool = False
    """Keep only each block's input for backward and recompute the rest (less memory, slower steps)."""
    compile: bool = False
    """torch.compile each transformer block for training, with dynamic shapes (batches of other lengths reuse the
    compiled code). The first steps pay the compile time, which the summary reports. Where torch cannot compile (no
    C++ compiler for CPU, no Triton for CUDA, an unsupported Python) the run stops at start-up saying so."""
    malloc_mmap_threshold_kb: int = 0
    """CPU memory, opt-in: glibc serves blocks of at least this many KiB with mmap, so freed activations return to the
    OS (128: ~30% lower peak RSS, but slower steps; see lorakit.memory). 0 leaves glibc at its defaults."""
    malloc_trim: bool = False
    """CPU memory: after each optimizer step, hand the memory the step freed back to the OS (glibc's malloc_trim), so
    the heap does not grow past the largest step's needs over an epoch (see lorakit.memory.trim_heap)."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only at the end, when there is validation data)."""
    save_every: int = 0
    """Write a checkpoint every N optimizer steps (0: none; a final checkpoint is always written)."""
    keep_last: int = 2
    """Keep the newest K checkpoints (the best adapter is kept separately in best/)."""
    log_every: int = 1
    """Write a metrics.jsonl line every N optimizer steps."""
    metric: str | None = None
    """Task metric on validation data: accuracy (classification) or exact_match (generation), or null."""
    eval_batch_size: int = 16
    """Examples per validation batch."""
    max_new_tokens: int = 64
    """Generation length for exact_match."""
    tensorboard: bool = True
    """Also log to TensorBoard (the run's tb/ folder)."""
    progress: bool = True
    """Show a progress bar and print the summary table."""
    distributed: str = "none"
    """none, ddp (adapter replicated) or fsdp (FSDP2: base sharded) when launched by torchrun; see lorakit.train.distributed."""
    on_nonfinite: str = "stop"
    """A step whose loss or gradient norm is NaN/inf is never applied. stop: end the run with a message (the last
    checkpoint stays good); skip: drop that step and go on, stopping after max_skipped_steps skips in a row."""
    max_skipped_steps: int = 5
    """With on_nonfinite=skip: how many non-finite steps in a row are tolerated before the run stops."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the training data is and how to read it."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter added to the model (when train() loads config.model)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, schedule, batch size and length of training."""

    def __post_init__(self) -> None:
        check(self, TITLE, HINT)

    def problems(self, prefix: str = "") -> list[str]:
        """Every invalid value here and in the sections, each naming its dotted key."""
        out = []
        if self.task not in ("auto", "causal-lm", "seq-cls"):
            out.append(f"{prefix}task must be auto, causal-lm or seq-cls, got {self.task!r}")
        if self.precision not in PRECISIONS:
            out.append(f"{prefix}precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.base_dtype not in BASE_DTYPES:
            out.append(f"{prefix}base_dtype must be one of {BASE_DTYPES}, got {self.base_dtype!r}")
        for name in ("model", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                out.append(f"{prefix}{name} must be a non-empty string, got {getattr(self, name)!r}")
        if not is_int(self.malloc_mmap_threshold_kb) or not 0 <= self.malloc_mmap_threshold_kb <= MAX_MMAP_THRESHOLD // 1024:
            out.append(f"{prefix}malloc_mmap_threshold_kb must be an integer in 0..{MAX_MMAP_THRESHOLD // 1024} (0: "
                       f"allocator defaults), got {self.malloc_mmap_threshold_kb!r}")
        for name in ("eval_every", "save_every", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                out.append(f"{prefix}{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("keep_last", "log_every", "eval_batch_size", "max_new_tokens"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                out.append(f"{prefix}{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("gradient_checkpointing", "compile", "malloc_trim", "tensorboard", "progress"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{prefix}{name} must be true or false, got {getattr(self, name)!r}")
        if self.quantize not in QUANTIZE:
            out.append(f"{prefix}quantize must be nf4, int8, int8-wo or null, got {self.quantize!r}")
        for name, allowed in (("metric", METRICS), ("on_nonfinite", NONFINITE), ("distributed", DISTRIBUTED)):
            if getattr(self, name) not in allowed:
                out.append(f"{prefix}{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not is_int(self.max_skipped_steps) or self.max_skipped_steps < 1:
            out.append(f"{prefix}max_skipped_steps must be a positive integer, got {self.max_skipped_steps!r}")
        wrong = [(name, section) for name, section in (("data", DataConfig), ("lora", LoraConfig),
                                                        ("optim", OptimConfig)) if not isinstance(getattr(self, name), section)]
        if wrong:
            return out + [f"{prefix}{name} must be a {section.__name__}, got {type(getattr(self, name)).__name__} "
                          "(TrainConfig.from_dict builds the sections from mappings)" for name, section in wrong]
        out += self._quantization_problems(prefix)
        if self.data.packing is True and (self.task == "seq-cls" or self.distributed != "none"):
            out.append(f"{prefix}data.packing applies to causal-LM training in one process; got task={self.task!r}, "
                       f"distributed={self.distributed!r}: set data.packing=false")
        return (out + self.data.problems(prefix + "data.") + self.lora.problems(prefix + "lora.")
                + self.optim.problems(prefix + "optim."))

    def _quantization_problems(self, prefix: str) -> list[str]:
        """LoftQ initialises the adapter for a quantized base: it needs a bitsandbytes quantization of its width."""
        out = []
        if self.lora.init == "loftq" and self.quantize == "int8-wo":
            out.append(f"{prefix}lora.init=loftq quantizes through bitsandbytes: use quantize nf4 or int8 with it, or "
                       "another init with int8-wo")
        if self.lora.init == "loftq" and self.quantize is None:
            out.append(f"{prefix}lora.init=loftq initialises the adapter for a quantized base: also set quantize (nf4 "
                       "or int8)")
        bits = self.lora.loftq_config.get("loftq_bits") if isinstance(self.lora.loftq_config, dict) else None
        if self.quantize in ("nf4", "int8") and bits is not None and bits != {"nf4": 4, "int8": 8}[self.quantize]:
            out.append(f"{prefix}lora.loftq_config.loftq_bits={bits} does not match quantize={self.quantize} (nf4: 4, "
                       "int8: 8)")
        return out

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from nested dicts; every unknown key and every bad value is reported in one error."""
        return build(cls, {} if data is None else data, TITLE, HINT)

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Read a YAML file (optional) and apply overrides given as dotted keys: {"optim.lr": 1e-3, "seed": 1}."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise LorakitError(f"Config file {path} does not exist.")
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise LorakitError(f"{path}: not valid YAML ({e}).") from None
            except RecursionError:
                raise LorakitError(f"{path}: not a config: YAML nested too deeply.") from None
            if not isinstance(data, dict):
                raise LorakitError(f"{path}: the config must be a mapping of keys to values, got {type(data).__name__}.")
        for key, value in (overrides or {}).items():
            apply_override(data, key, value)
        return cls.from_dict(data)

    def to_yaml(self, note: str | None = None) -> str:
        """The config as YAML; `note` (e.g. why base_dtype auto chose bf16) goes first as a comment."""
        head = "".join(f"# {line}\n" for line in note.splitlines()) if note else ""
        return head + yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolve_auto(self, device: str) -> tuple["TrainConfig", str | None]:
        """This config with base_dtype auto replaced by what `device` runs fastest, and the reason (None if not auto)."""
        if self.base_dtype != "auto":
            return self, None
        from lorakit.hardware import auto_base_dtype

        chosen, why = auto_base_dtype(device)
        return dataclasses.replace(self, base_dtype=chosen), f"base_dtype auto -> {chosen}: {why}"


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key ("optim.lr") in nested dicts; string values are parsed as YAML scalars ("1e-3" -> 0.001)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
        if isinstance(value, str) and float_like(value):  # YAML 1.1 reads "2e-4" as a string
            value = float(value)
    *parents, last = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise LorakitError(f"Cannot set {key!r}: {p!r} is not a section.")
    node[last] = value
