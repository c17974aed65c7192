"""Fine-tuning: a typed config (YAML + overrides), the training loop, evaluation, checkpoints and exact resume.

    from lorakit.train.loop import TrainConfig, train

    config = TrainConfig.from_yaml("cfg.yaml", {"optim.lr": 2e-4, "max_steps": 100})
    result = train(config)                      # loads config.model, adds LoRA from config.lora
    print(result.adapter_dir, result.metrics)

    # or on a model you prepared yourself: exactly the parameters with requires_grad train
    model, tok = lorakit.load_model()
    for n, p in model.named_parameters(): p.requires_grad_(n.endswith("bias"))   # BitFit
    train(TrainConfig(data=DataConfig(train_file="train.jsonl"), output_dir="runs/bitfit"), model=model, tokenizer=tok)

A run folder holds: config.yaml (resolved), checkpoints/step-N/ (adapter, optimizer and scheduler state, RNG states,
data position), best/ (the best adapter by the validation metric), adapter/ (the final adapter), metrics.jsonl,
tb/ (TensorBoard), loss_curve.png and summary.json. `train(config, resume=RUN_DIR)` continues from the newest valid
checkpoint and ends with the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn

from lorakit.lora.config import LoraConfig
from lorakit.train import distributed as dist
from lorakit.data.records import (DataConfig, TokenizedData, collate, epoch_batches, iterate_batches,
                          loss_tokens, read_records, show_example, split_records, tokenize)
from lorakit.errors import LorakitError
from lorakit.fsutil import atomic_directory, atomic_write_text, require_finite, write_json
from lorakit.memory import MAX_MMAP_THRESHOLD, peak_rss_mb, set_mmap_threshold

PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("linear", "constant", "cosine")
METRICS = (None, "accuracy", "exact_match")
DISTRIBUTED = ("none", "ddp", "fsdp")
NONFINITE = ("stop", "skip")
CONFIG_FILE = "config.yaml"


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class OptimConfig:
    """AdamW with warmup and decay, as in the LoRA paper's recipes."""

    lr: float = 2e-4
    weight_decay: float = 0.01
    """Applied to matrices only (not to biases or norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "linear"
    """linear (decay to 0 after warmup), cosine, or constant."""
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Warmup as a fraction of all steps (used when warmup_steps is 0)."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is averaged over all their target tokens."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this (None: no clipping)."""
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""

    def problems(self) -> list[str]:
        out = []
        if not _num(self.lr) or self.lr <= 0:
            out.append(f"optim.lr must be a positive number, got {self.lr!r}")
        if not _num(self.weight_decay) or self.weight_decay < 0:
            out.append(f"optim.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.betas, (list, tuple)) and len(self.betas) == 2 and all(_num(b) and 0 <= b < 1
                                                                                       for b in self.betas)):
            out.append(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.schedule not in SCHEDULES:
            out.append(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("warmup_steps",):
            if not _int(getattr(self, name)) or getattr(self, name) < 0:
                out.append(f"optim.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not _num(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            out.append(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        for name in ("batch_size", "grad_accum", "epochs"):
            if not _int(getattr(self, name)) or getattr(self, name) < 1:
                out.append(f"optim.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_steps is not None and (not _int(self.max_steps) or self.max_steps < 1):
            out.append(f"optim.max_steps must be a positive integer or null, got {self.max_steps!r}")
        if self.max_grad_norm is not None and (not _num(self.max_grad_norm) or self.max_grad_norm <= 0):
            out.append(f"optim.max_grad_norm must be a positive number or null, got {self.max_grad_norm!r}")
        return out


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as config.yaml in the run folder."""

    model: str = "smollm2-135m"
    """Embedded model name, local folder or hub id (ignored when train() is given a model)."""
    task: str = "auto"
    """causal-lm, seq-cls, or auto (seq-cls for classification data)."""
    output_dir: str = "runs/lorakit"
    seed: int = 0
    precision: str = "fp32"
    """fp32, or bf16 (autocast)."""
    base_dtype: str = "fp32"
    """bf16 casts the frozen base weights once (faster on CPUs with AMX); LoRA weights stay fp32."""
    quantize: str | None = None
    """nf4 or int8: the frozen base's linear layers in bitsandbytes 4-/8-bit (QLoRA); int8-wo: torchao int8
    weight-only. LoRA weights stay fp32."""
    gradient_checkpointing: bool = False
    malloc_mmap_threshold_kb: int = 0
    """CPU memory, opt-in: glibc serves blocks of at least this many KiB with mmap, so freed activations return to the
    OS (128: ~30% lower peak RSS, but slower steps; see lorakit.memory). 0 leaves glibc at its defaults."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only at the end, when there is validation data)."""
    save_every: int = 0
    """Write a checkpoint every N optimizer steps (0: none; a final checkpoint is always written)."""
    keep_last: int = 2
    """Keep the newest K checkpoints (the best adapter is kept separately in best/)."""
    log_every: int = 1
    metric: str | None = None
    """Task metric on validation data: accuracy (classification) or exact_match (generation), or null."""
    eval_batch_size: int = 16
    max_new_tokens: int = 64
    """Generation length for exact_match."""
    tensorboard: bool = True
    progress: bool = True
    distributed: str = "none"
    """none, ddp (adapter replicated) or fsdp (FSDP2: base sharded) when launched by torchrun; see lorakit.train.distributed."""
    on_nonfinite: str = "stop"
    """A step whose loss or gradient norm is NaN/inf is never applied. stop: end the run with a message (the last
    checkpoint stays good); skip: drop that step and go on, stopping after max_skipped_steps skips in a row."""
    max_skipped_steps: int = 5
    """With on_nonfinite=skip: how many non-finite steps in a row are tolerated before the run stops."""
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise LorakitError("Invalid training config:\n  - " + "\n  - ".join(problems)
                               + "\nFix these keys in the YAML file or on the command line.")

    def problems(self) -> list[str]:
        out = []
        if self.task not in ("auto", "causal-lm", "seq-cls"):
            out.append(f"task must be auto, causal-lm or seq-cls, got {self.task!r}")
        for name in ("precision", "base_dtype"):
            if getattr(self, name) not in PRECISIONS:
                out.append(f"{name} must be one of {PRECISIONS}, got {getattr(self, name)!r}")
        if (not _int(self.malloc_mmap_threshold_kb)
                or not 0 <= self.malloc_mmap_threshold_kb <= MAX_MMAP_THRESHOLD // 1024):
            out.append(f"malloc_mmap_threshold_kb must be an integer in 0..{MAX_MMAP_THRESHOLD // 1024} (0: allocator "
                       f"defaults), got {self.malloc_mmap_threshold_kb!r}")
        for name in ("eval_every", "save_every", "seed"):
            if not _int(getattr(self, name)) or getattr(self, name) < 0:
                out.append(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("keep_last", "log_every", "eval_batch_size", "max_new_tokens"):
            if not _int(getattr(self, name)) or getattr(self, name) < 1:
                out.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.metric not in METRICS:
            out.append(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.quantize not in (None, "nf4", "int8", "int8-wo"):
            out.append(f"quantize must be nf4, int8, int8-wo or null, got {self.quantize!r}")
        if self.lora.init == "loftq" and self.quantize == "int8-wo":
            out.append("lora.init=loftq quantizes through bitsandbytes: use quantize nf4 or int8 with it, or another "
                       "init with int8-wo")
        if self.lora.init == "loftq" and self.quantize is None:
            out.append("lora.init=loftq initialises the adapter for a quantized base: also set quantize (nf4 or int8)")
        bits = self.lora.loftq_config.get("loftq_bits")
        if self.quantize in ("nf4", "int8") and bits is not None and bits != {"nf4": 4, "int8": 8}[self.quantize]:
            out.append(f"lora.loftq_config.loftq_bits={bits} does not match quantize={self.quantize} (nf4: 4, int8: 8)")
        if self.on_nonfinite not in NONFINITE:
            out.append(f"on_nonfinite must be one of {NONFINITE}, got {self.on_nonfinite!r}")
        if not _int(self.max_skipped_steps) or self.max_skipped_steps < 1:
            out.append(f"max_skipped_steps must be a positive integer, got {self.max_skipped_steps!r}")
        if self.distributed not in DISTRIBUTED:
            out.append(f"distributed must be one of {DISTRIBUTED}, got {self.distributed!r}")
        return out + self.data.problems() + self.optim.problems()

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from nested dicts; every unknown key and every bad value is reported in one error."""
        problems: list[str] = []
        top = _known(cls, data or {}, "", problems)
        sections = {}
        for name, section_cls in (("data", DataConfig), ("optim", OptimConfig)):
            values = _known(section_cls, top.pop(name, None) or {}, name + ".", problems)
            sections[name] = section_cls(**values)
        lora_values = _known(LoraConfig, top.pop("lora", None) or {}, "lora.", problems)
        try:
            sections["lora"] = LoraConfig(**lora_values)
        except LorakitError as e:
            problems += ["lora: " + line.strip("- ") for line in str(e).splitlines()[1:]]
            sections["lora"] = LoraConfig()
        config = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            setattr(config, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        for k, v in {**top, **sections}.items():
            setattr(config, k, v)
        if isinstance(config.optim.betas, list):
            config.optim.betas = tuple(config.optim.betas)
        problems += config.problems()
        if problems:
            raise LorakitError("Invalid training config:\n  - " + "\n  - ".join(problems)
                               + "\nFix these keys in the YAML file or on the command line.")
        return config

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

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key ("optim.lr") in nested dicts; string values are parsed as YAML scalars ("1e-3" -> 0.001)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
        if isinstance(value, str) and _float_like(value):  # YAML 1.1 reads "2e-4" as a string
            value = float(value)
    *parents, last = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise LorakitError(f"Cannot set {key!r}: {p!r} is not a section.")
    node[last] = value


def _float_like(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _known(cls, values: Any, prefix: str, problems: list[str]) -> dict[str, Any]:
    if not isinstance(values, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
        return {}
    allowed = [f.name for f in dataclasses.fields(cls)]
    floats = {f.name for f in dataclasses.fields(cls) if "float" in str(f.type)}
    values = {k: float(v) if k in floats and isinstance(v, str) and _float_like(v) else v for k, v in values.items()}
    unknown = [k for k in values if k not in allowed]
    if unknown:
        problems.append(f"unknown key(s) {[prefix + k for k in unknown]}; allowed in "
                        f"{prefix.rstrip('.') or 'the top level'}: {allowed}")
    return {k: v for k, v in values.items() if k in allowed}


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path | None
    """The final adapter (lorakit adapter folder, or trainable.safetensors for models without lorakit adapters)."""
    best_dir: Path | None
    steps: int
    metrics: dict[str, float]
    """The last validation metrics (empty without validation data)."""
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    interrupted: bool = False


class TrainingInterrupted(Exception):
    """Raised inside the loop on Ctrl-C (after the first one); the loop saves a checkpoint and returns."""


# ---------------------------------------------------------------------------------------------------- state I/O
def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _has_lorakit_adapter(model: nn.Module) -> bool:
    return bool(getattr(model, "lora_configs", None))


def save_trained(model: nn.Module, path: Path, extra: dict[str, Any]) -> Path:
    """The trained weights: a lorakit adapter folder, or (no lorakit adapter) trainable.safetensors + config."""
    from safetensors.torch import save_file

    from lorakit.lora.adapter_io import save_adapter

    if not dist.is_main():  # under torchrun, rank 0 alone writes (the others hold the same adapter)
        return path
    require_finite(dict(_trainable(model)), f"the trained weights for {path}")
    if _has_lorakit_adapter(model):
        return save_adapter(model, path, extra=extra)
    with atomic_directory(path) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model)}, str(tmp / "trainable.safetensors"))
        write_json(tmp / "lorakit_training.json", extra)
    return path


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):  # FSDP2 states are shards: gather (a collective; every rank is here)
                tensors[f"{idx}.{key}"] = dist.full_tensor(value.detach()).cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        if torch.is_tensor(value) and value.ndim:  # moments: this rank's shard under FSDP2
            value = dist.shard_like(value, params[int(idx)])
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    np_state = np.random.get_state()
    return ({"torch": torch.get_rng_state()},
            {"python": _jsonable(random.getstate()),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]})


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, position: dict[str, Any],
                    config: TrainConfig) -> Path:
    """One complete checkpoint folder, written atomically (it exists whole or not at all)."""
    from safetensors.torch import save_file

    opt_tensors, opt_meta = _optimizer_state(optimizer)
    rng_tensors, rng_meta = _rng_state()
    if not dist.is_main():
        return path
    require_finite(opt_tensors, f"the optimizer state for {path}")
    run_dir = path.parent.parent
    previous = [p for p in checkpoints(run_dir) if p != path]
    hint = (f"The previous checkpoint {previous[-1]} is intact: free disk space, then continue with "
            f"`lorakit train --resume {run_dir}`." if previous else "There is no earlier checkpoint; free disk space "
            "and start the run again.")
    with atomic_directory(path, hint=hint) as tmp:
        # The checkpoint folder is itself an adapter folder (load_adapter / eval accept it): the adapter is written
        # first, atomically replacing the still-empty temporary folder (atomic_directory keeps folders flat).
        save_trained(model, tmp, {"train_config": config.to_dict(), "step": position["step"]})
        if _has_lorakit_adapter(model):  # exact parameter names for resume (save_trained wrote them otherwise)
            save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model)},
                      str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "optimizer.json", opt_meta)
        write_json(tmp / "scheduler.json", scheduler.state_dict())
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        write_json(tmp / "rng.json", rng_meta)
        write_json(tmp / "trainer_state.json", position)
        (tmp / CONFIG_FILE).write_text(config.to_yaml(), encoding="utf-8")
    return path


def _read_checkpoint(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    position = json.loads((path / "trainer_state.json").read_text())
    if position.get("step") != int(path.name.split("-")[1]):
        raise LorakitError(f"{path}/trainer_state.json says step {position.get('step')!r}, not the folder's step.")
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": (load_file(str(path / "optimizer.safetensors")),
                      json.loads((path / "optimizer.json").read_text())),
        "scheduler": json.loads((path / "scheduler.json").read_text()),
        "rng": (load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text())),
        "position": position,
    }


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-")),
                  key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint that reads back completely; a damaged newer one is skipped with a warning."""
    found = checkpoints(run_dir)
    if not found:
        raise LorakitError(f"{run_dir} has no checkpoints to resume from (looked in {Path(run_dir) / 'checkpoints'}).")
    for path in reversed(found):
        try:
            return path, _read_checkpoint(path)
        except Exception as e:  # a damaged checkpoint: fall back to the previous one
            warnings.warn(f"Checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying the previous one.")
    raise LorakitError(f"No readable checkpoint in {run_dir}/checkpoints ({len(found)} found, all damaged).")


# ---------------------------------------------------------------------------------------------------- helpers
def _resolve_task(config: TrainConfig, fmt: str) -> str:
    if config.task != "auto":
        return config.task
    return "seq-cls" if fmt == "classification" else "causal-lm"


def _schedule(config: OptimConfig, total_steps: int) -> Callable[[int], float]:
    warmup = config.warmup_steps or int(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


def _optimizer(params: list[tuple[str, nn.Parameter]], config: OptimConfig) -> torch.optim.Optimizer:
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=tuple(config.betas),
                             eps=config.eps, foreach=False)


def _autocast(config: TrainConfig):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16")


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Mean loss of one batch: next-token cross-entropy over labelled tokens, or classification loss."""
    if task == "seq-cls":
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    from lorakit.train.losses import causal_lm_loss

    return causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, data: TokenizedData, task: str, config: TrainConfig) -> dict[str, float]:
    """Validation loss (and perplexity for language models) plus the configured task metric."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count, correct = 0.0, 0, 0
    with _autocast(config):
        for batch in iterate_batches(data, config.eval_batch_size, pad):
            n = loss_tokens(batch)
            if task == "seq-cls":
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                total += float(out.loss) * n
            else:
                total += float(batch_loss(model, batch, task)) * n
            count += n
    metrics = {"eval_loss": total / max(count, 1)}
    if task == "causal-lm":
        metrics["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50.0))
    if config.metric == "accuracy":
        if task != "seq-cls":
            raise LorakitError("metric: accuracy needs classification data (task seq-cls); use exact_match instead.")
        metrics["accuracy"] = correct / len(data.examples)
    elif config.metric == "exact_match":
        metrics["exact_match"] = exact_match(model, tokenizer, data, config.max_new_tokens, config.eval_batch_size)
    model.train(was_training)
    return metrics


def exact_match(model: nn.Module, tokenizer, data: TokenizedData, max_new_tokens: int, batch_size: int = 16) -> float:
    """Share of examples whose greedy completion equals the reference completion (whitespace-stripped)."""
    from lorakit.inference.generate import Row, Sampling, generate_rows

    examples = [e for e in data.examples if e.target_text is not None]
    if not examples:
        raise LorakitError("metric: exact_match needs instruction data (prompt + completion) for validation.")
    from lorakit.lora.injection import active_adapter

    sampling = Sampling(max_new_tokens=max_new_tokens)
    adapter = active_adapter(model)  # the adapter being trained (None: a model without lorakit adapters)
    hits = 0
    for s in range(0, len(examples), batch_size):
        part = examples[s:s + batch_size]
        outs = generate_rows(model, tokenizer, [Row(e.input_ids[:e.prompt_len], adapter, sampling) for e in part])
        hits += sum(o.text.strip() == e.target_text.strip() for o, e in zip(outs, part))
    return hits / len(examples)


# ---------------------------------------------------------------------------------------------------- logging
class _Logger:
    """metrics.jsonl (appended, one object a line) and TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        """False on ranks other than 0: they log nothing."""
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["step"])

    def history(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a crash mid-write (the resumed run logs that step again)
                continue
        return records

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint, which the resumed run will log again."""
        kept = [r for r in self.history() if r["step"] <= step]
        if self.enabled:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_loss(history: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def summary_table(summary: dict[str, Any], title: str = "training summary") -> str:
    """A two-column table as text (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k, v in summary.items():
        table.add_row(k, f"{v:,.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
    console = Console(width=100, record=True, force_terminal=False)
    with console.capture() as cap:
        console.print(table)
    return cap.get()


def _dir_size(path: Path | None) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path and path.exists() else 0


# ---------------------------------------------------------------------------------------------------- data
def load_data(config: TrainConfig, tokenizer) -> tuple[TokenizedData, TokenizedData | None]:
    """Tokenised training data and (if any) validation data."""
    if not config.data.train_file:
        raise LorakitError("No training data: set data.train_file (or --train-file) to a JSONL/JSON/CSV/Parquet file.")
    records = read_records(config.data.train_file, config.data.split)
    eval_records = read_records(config.data.eval_file, config.data.split) if config.data.eval_file else []
    if not eval_records and config.data.eval_fraction > 0:
        records, eval_records = split_records(records, config.data.eval_fraction, config.seed)
    train_data = tokenize(records, tokenizer, config.data)
    eval_data = None
    if eval_records:
        eval_data = tokenize(eval_records, tokenizer, config.data, fmt=train_data.format,
                             label_ids=train_data.label_ids)
    return train_data, eval_data


# ---------------------------------------------------------------------------------------------------- the loop
def train(config: TrainConfig | None, model: nn.Module | None = None, tokenizer=None, resume: str | Path | None = None,
          on_step: Callable[[int, dict[str, Any]], None] | None = None, show_example_first: bool = False
          ) -> TrainResult:
    """Train and return where everything went. See the module docstring for an example.

    Without `model`, loads `config.model` and adds a LoRA adapter from `config.lora`. With `model` (and its
    `tokenizer`), trains exactly the parameters that have requires_grad. `resume` is a run folder: training continues
    from its newest readable checkpoint (its saved config is used; pass the same `model` preparation if you gave one).
    `on_step(step, record)` is called after every optimizer step (tests use it to simulate interruptions).
    """
    from lorakit.lora.injection import cast_base
    from lorakit.models.loading import load_model

    started = time.perf_counter()
    run_dir = Path(resume) if resume is not None else Path(config.output_dir)
    resumed = None
    if resume is not None:
        ckpt_path, resumed = latest_checkpoint(run_dir)
        saved = TrainConfig.from_yaml(run_dir / CONFIG_FILE)
        config = saved if config is None else config
    elif config is None:
        raise LorakitError("train(): give a TrainConfig (or resume=RUN_DIR to reuse a run's saved config).")
    elif (run_dir / CONFIG_FILE).exists() and checkpoints(run_dir):
        raise LorakitError(f"{run_dir} already holds a run with checkpoints; use `--resume {run_dir}` to continue it "
                           "or choose another output_dir.")
    _seed_everything(config.seed)
    if config.malloc_mmap_threshold_kb:
        set_mmap_threshold(config.malloc_mmap_threshold_kb * 1024)
    distributed = dist.setup(config.distributed)
    main = dist.is_main()
    say = print if main else (lambda *args, **kwargs: None)

    if model is not None and tokenizer is None:
        raise LorakitError("train(): pass the model's tokenizer together with model=.")
    probe_tok = tokenizer
    if model is None:
        # The data format decides the task (classification -> seq-cls), so read the data with the tokenizer first.
        from transformers import AutoTokenizer

        from lorakit.models.loading import resolve_model_path

        probe_tok = AutoTokenizer.from_pretrained(resolve_model_path(config.model))
        if probe_tok.pad_token is None:
            probe_tok.pad_token = probe_tok.eos_token
    train_data, eval_data = load_data(config, probe_tok)
    task = _resolve_task(config, train_data.format)
    if model is None:
        attn = "eager" if "bf16" in (config.base_dtype, config.precision) else None
        model, tokenizer = load_model(config.model, task=task, attn_implementation=attn,
                                      num_labels=len(train_data.label_names) if train_data.label_names else None)
        lora = config.lora
        if task == "seq-cls" and lora.modules_to_save is None:
            heads = [n for n in ("classifier", "score") if hasattr(model, n)]
            lora = dataclasses.replace(lora, modules_to_save=heads)
        from lorakit.lora.injection import add_lora

        add_lora(model, lora)
        if task == "seq-cls" and model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    if config.base_dtype == "bf16":
        cast_base(model, torch.bfloat16)
    if config.quantize:
        _quantize_base(model, config)
    from lorakit.models.fused import fuse_gated_mlp

    fuse_gated_mlp(model)  # exact: bit-identical gradients, one activation per MLP fewer kept for backward
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False
    params = _trainable(model)
    if not params:
        raise LorakitError("Nothing to train: no parameter has requires_grad. Add an adapter (add_lora) or unfreeze "
                           "the parameters you want to train.")
    if show_example_first:
        say(show_example(train_data.examples[0], tokenizer))
    engine = dist.wrap(model, lambda m, b: batch_loss(m, b, task), config.distributed if distributed else "none")
    params = _trainable(model)  # FSDP2 replaced them with sharded parameters

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lengths = [len(e.input_ids) for e in train_data.examples]
    o = config.optim
    if o.batch_size % dist.world_size():
        raise LorakitError(f"optim.batch_size={o.batch_size} is the global micro-batch and must be a multiple of the "
                           f"{dist.world_size()} processes.")
    micro_per_epoch = math.ceil(len(lengths) / o.batch_size)
    total_steps = o.max_steps or math.ceil(micro_per_epoch * o.epochs / o.grad_accum)
    optimizer = _optimizer(params, o)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(o, total_steps))

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG_FILE, config.to_yaml())
    dist.barrier()
    logger = _Logger(run_dir, config.tensorboard and main, enabled=main)
    step, micro, best, best_dir = 0, 0, None, None
    if resumed is not None:
        with torch.no_grad():
            for name, p in params:
                p.copy_(dist.shard_like(resumed["trainable"][name], p))
        _load_optimizer_state(optimizer, *resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        pos = resumed["position"]
        step, micro, best = pos["step"], pos["micro"], pos.get("best")
        best_dir = run_dir / "best" if (run_dir / "best").is_dir() else None
        _set_rng_state(*resumed["rng"])
        logger.truncate_after(step)
        say(f"resuming from {ckpt_path} (step {step}/{total_steps})")
    else:
        logger.truncate_after(0)  # a fresh start in a folder a crashed run (killed before its first checkpoint) used

    report = _param_report(model)
    stats = {"examples": len(train_data.examples), "truncated": train_data.truncated, "dropped": train_data.dropped}
    say(f"{stats['examples']} training examples ({train_data.format}), {stats['truncated']} truncated to "
          f"{config.data.max_length} tokens, {stats['dropped']} dropped; "
          f"{len(eval_data.examples) if eval_data else 0} validation examples; {total_steps} steps"
          + (f"; {config.distributed} over {dist.world_size()} processes" if distributed else ""))

    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        if interrupted["flag"]:
            raise KeyboardInterrupt
        interrupted["flag"] = True
        print("\ninterrupt: finishing this step, saving a checkpoint (Ctrl-C again to abort without saving)")

    old_handler = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    bar = _progress(total_steps, step, config.progress and main)
    metrics: dict[str, float] = {}
    tokens_seen, tick = 0, time.perf_counter()
    skipped_in_a_row, skipped_total = 0, 0
    engine.train()
    try:
        while step < total_steps and not dist.any_rank(interrupted["flag"]):
            micro_batches = []
            for _ in range(o.grad_accum):
                epoch, index = divmod(micro, micro_per_epoch)
                order = epoch_batches(lengths, o.batch_size, config.seed, epoch, config.data.group_by_length)
                micro_batches.append(collate([train_data.examples[i] for i in order[index]], pad_id))
                micro += 1
            n_targets = sum(loss_tokens(b) for b in micro_batches)
            step_loss, bad_loss = 0.0, None
            for i, b in enumerate(micro_batches):
                b = dist.local_rows(b)  # under torchrun: this rank's rows of the global micro-batch
                with _autocast(config), dist.no_sync(engine, skip=i < len(micro_batches) - 1):
                    loss = engine(b)
                    share = loss_tokens(b) / n_targets
                    if share == 0:  # no targets in this rank's rows: contribute zero gradient, but take part
                        loss = torch.nan_to_num(loss, nan=0.0) * 0.0
                    weighted, bad, tokens = dist.all_sum([float(loss.detach()) * share, float(not torch.isfinite(loss)),
                                                          float(b["attention_mask"].sum())])
                    if bad:  # decided from all ranks' losses, so every rank leaves the step here together
                        bad_loss = float(loss.detach()) if not torch.isfinite(loss) else "non-finite on another rank"
                        break
                    # DDP and FSDP2 average gradients over ranks; the sum over ranks is the full-batch gradient
                    (loss * (share * dist.world_size())).backward()
                step_loss += weighted
                tokens_seen += int(tokens)  # over all ranks
            grad_norm = None if bad_loss is not None else _grad_norm(params, o.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            problem = (f"loss became {bad_loss}" if bad_loss is not None else
                       f"gradient norm became {grad_norm}" if not math.isfinite(grad_norm) else None)
            if problem is None:
                optimizer.step()
                skipped_in_a_row = 0
            else:  # never step on non-finite gradients: the weights (and any later checkpoint) stay finite
                skipped_in_a_row += 1
                skipped_total += 1
                if config.on_nonfinite == "stop" or skipped_in_a_row >= config.max_skipped_steps:
                    optimizer.zero_grad(set_to_none=True)
                    raise LorakitError(_nonfinite_message(problem, step + 1, run_dir, config, skipped_in_a_row))
                say(f"step {step + 1}: the {problem}; step skipped ({skipped_in_a_row} in a row, "
                    f"{config.max_skipped_steps} allowed)")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            now = time.perf_counter()
            record = {"step": step, "epoch": round(micro / micro_per_epoch, 4), "loss": step_loss, "lr": lr,
                      "tokens_per_s": tokens_seen / max(now - tick, 1e-9)}
            if grad_norm is not None and math.isfinite(grad_norm):
                record["grad_norm"] = grad_norm
            if problem is not None:
                record["skipped"] = True
            tokens_seen, tick = 0, now
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if eval_data is not None and config.eval_every and step % config.eval_every == 0 and step < total_steps:
                # two separate gathers: FSDP2's forward hooks put their shards back into the modules it runs
                with dist.full_params(engine):
                    metrics = evaluate(model, tokenizer, eval_data, task, config)
                record.update(metrics)
                with dist.full_params(engine):
                    best, best_dir = _maybe_best(model, run_dir, config, metrics, best, best_dir, step)
            if step % config.log_every == 0 or "eval_loss" in record:
                logger.log(record)
            position = {"step": step, "micro": micro, "best": best, "total_steps": total_steps}
            if config.save_every and step % config.save_every == 0 and step < total_steps:
                _checkpoint(run_dir, model, engine, optimizer, scheduler, position, config)
            if on_step is not None:
                on_step(step, record)
        interrupted["flag"] = dist.any_rank(interrupted["flag"])
        if interrupted["flag"] and step < total_steps:
            path = _checkpoint(run_dir, model, engine, optimizer, scheduler,
                               {"step": step, "micro": micro, "best": best, "total_steps": total_steps}, config)
            say(f"interrupted: checkpoint saved to {path}; continue with `lorakit train --resume {run_dir}`")
    finally:
        bar.close()
        logger.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)

    if not interrupted["flag"] and eval_data is not None:
        with dist.full_params(engine):
            metrics = evaluate(model, tokenizer, eval_data, task, config)
        _Logger(run_dir, False, enabled=main).log({"step": step, **metrics})
        with dist.full_params(engine):
            best, best_dir = _maybe_best(model, run_dir, config, metrics, best, best_dir, step)
    adapter_dir = None
    if not interrupted["flag"]:
        _checkpoint(run_dir, model, engine, optimizer, scheduler,
                    {"step": step, "micro": micro, "best": best, "total_steps": total_steps}, config)
        with dist.full_params(engine):
            adapter_dir = save_trained(model, run_dir / "adapter", {"train_config": config.to_dict(), "step": step,
                                                                    "metrics": metrics})
    dist.barrier()
    history = _Logger(run_dir, False).history()
    plot = plot_loss(history, run_dir / "loss_curve.png") if main else None
    peak_mb = round(peak_rss_mb(), 1)
    peaks = dist.all_sum([peak_mb if r == dist.rank() else 0.0 for r in range(dist.world_size())])
    summary = {
        "steps": step, "trainable params": report[0], "trainable %": report[1],
        "adapter size on disk (bytes)": _dir_size(adapter_dir), "wall time (s)": round(time.perf_counter() - started, 1),
        "peak memory (MB)": peak_mb,
        **({"peak memory per rank (MB)": " ".join(f"{p:.0f}" for p in peaks)} if distributed else {}),
        "examples": stats["examples"], "truncated examples": stats["truncated"],
        **({"skipped steps (non-finite)": skipped_total} if skipped_total else {}),
        **{k: v for k, v in metrics.items()}, "run folder": str(run_dir), "loss curve": str(plot) if plot else "none",
    }
    if main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if config.progress and main:
        print(summary_table(summary))
    return TrainResult(run_dir, adapter_dir, best_dir, step, metrics, history, summary, interrupted["flag"])


def _grad_norm(params: list[tuple[str, nn.Parameter]], max_norm: float | None) -> float:
    """The global gradient norm (over all ranks), clipping to max_norm when set. Non-finite iff some gradient is."""
    # max_norm=inf measures without clipping (the scale factor clamps to exactly 1)
    norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], math.inf if max_norm is None else max_norm)
    return float(dist.full_tensor(norm))


def _nonfinite_message(problem: str, step: int, run_dir: Path, config: TrainConfig, in_a_row: int) -> str:
    last = checkpoints(run_dir)
    skipped = (f" after {in_a_row} non-finite steps in a row (max_skipped_steps={config.max_skipped_steps})"
               if config.on_nonfinite == "skip" else "")
    return (f"The {problem} at step {step}; the step was not applied and training stopped{skipped}. The last good "
            f"checkpoint is {last[-1] if last else 'none (no checkpoint yet)'}. Try a lower optim.lr, fp32 precision, "
            "optim.max_grad_norm, or check the data; on_nonfinite=skip drops such steps instead of stopping.")


def _quantize_base(model: nn.Module, config: TrainConfig) -> None:
    """QLoRA: LoftQ-initialise the fresh adapter if asked (it quantizes the adapted layers), then the other layers."""
    from lorakit.models.quantization import loftq_init, quantization_of, quantize_model

    compute = torch.bfloat16 if config.base_dtype == "bf16" else torch.float32
    if config.lora.init == "loftq" and quantization_of(model) is None:
        loftq_init(model, bits=4 if config.quantize == "nf4" else 8,
                   iters=config.lora.loftq_config.get("loftq_iter", 1), compute_dtype=compute)
    quantize_model(model, config.quantize, compute_dtype=compute)


def _checkpoint(run_dir: Path, model: nn.Module, engine: nn.Module, optimizer, scheduler, position: dict[str, Any],
                config: TrainConfig) -> Path:
    """Every rank calls this (FSDP2 gathers shards); rank 0 writes, and the others wait until the folder is whole."""
    with dist.full_params(engine):
        path = save_checkpoint(run_dir / "checkpoints" / f"step-{position['step']:06d}", model, optimizer, scheduler,
                               position, config)
    if dist.is_main():
        for old in checkpoints(run_dir)[:-config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in (run_dir / "checkpoints").glob(".step-*.tmp-*"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return path


def _maybe_best(model, run_dir: Path, config: TrainConfig, metrics: dict[str, float], best, best_dir, step: int):
    """Keep the adapter with the best validation metric (the task metric if set, else the lowest loss) in best/."""
    key = config.metric or "eval_loss"
    value = metrics[key]
    better = best is None or (value < best if key == "eval_loss" else value > best)
    if better:
        best_dir = save_trained(model, run_dir / "best", {"train_config": config.to_dict(), "step": step,
                                                          "metrics": metrics})
        best = value
    return best, best_dir


def _param_report(model: nn.Module) -> tuple[int, float]:
    params = _trainable(model)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    trainable = sum(p.numel() for _, p in params)
    return trainable, round(100.0 * trainable / max(total, 1), 4)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
