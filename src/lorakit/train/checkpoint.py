"""Checkpoints: the trained weights, optimizer and scheduler state, RNG states and data position of a run, written
atomically (a checkpoint folder exists whole or not at all) and read back for exact resume.

A checkpoint folder, checkpoints/step-N/, is also an adapter folder (load_adapter and eval accept it), plus
trainable.safetensors (exact parameter names), optimizer.safetensors/.json, scheduler.json, rng.safetensors/.json,
trainer_state.json (step, micro-batch position, best metric) and config.yaml. No file holding a NaN or inf is written.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.fsutil import atomic_directory, require_finite, write_json
from lorakit.train import distributed as dist
from lorakit.train.layout import CONFIG_FILE, checkpoint_dir, checkpoint_step, checkpoints

if TYPE_CHECKING:
    from lorakit.train.config import TrainConfig


def trainable_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters with requires_grad, each once (tied weights appear under their first name)."""
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
    require_finite(dict(trainable_params(model)), f"the trained weights for {path}")
    if _has_lorakit_adapter(model):
        return save_adapter(model, path, extra=extra)
    with atomic_directory(path) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable_params(model)},
                  str(tmp / "trainable.safetensors"))
        write_json(tmp / "lorakit_training.json", extra)
    return path


# ---------------------------------------------------------------------------------------------------- optimizer, RNG
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


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Put a checkpoint's optimizer state (moments, step counts, param groups with their lrs) into `optimizer`."""
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


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore the torch, Python and NumPy generators saved in a checkpoint."""
    torch.set_rng_state(tensors["torch"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------- folders
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
            save_file({n: p.detach().cpu().contiguous() for n, p in trainable_params(model)},
                      str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "optimizer.json", opt_meta)
        write_json(tmp / "scheduler.json", scheduler.state_dict())
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        write_json(tmp / "rng.json", rng_meta)
        write_json(tmp / "trainer_state.json", position)
        (tmp / CONFIG_FILE).write_text(config.to_yaml(), encoding="utf-8")
    return path


def save_run_checkpoint(run_dir: Path, model: nn.Module, engine: nn.Module, optimizer, scheduler,
                        position: dict[str, Any], config: TrainConfig) -> Path:
    """checkpoints/step-N/ of a run, keeping the newest `config.keep_last`. Every rank calls this (FSDP2 gathers
    shards); rank 0 writes, and the others wait until the folder is whole."""
    with dist.full_params(engine):
        path = save_checkpoint(checkpoint_dir(run_dir, position["step"]), model, optimizer, scheduler, position,
                               config)
    if dist.is_main():
        for old in checkpoints(run_dir)[:-config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in (run_dir / "checkpoints").glob(".step-*.tmp-*"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's tensors and state: trainable, optimizer, scheduler, rng, position."""
    from safetensors.torch import load_file

    position = json.loads((path / "trainer_state.json").read_text())
    if position.get("step") != checkpoint_step(path):
        raise LorakitError(f"{path}/trainer_state.json says step {position.get('step')!r}, not the folder's step.")
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": (load_file(str(path / "optimizer.safetensors")),
                      json.loads((path / "optimizer.json").read_text())),
        "scheduler": json.loads((path / "scheduler.json").read_text()),
        "rng": (load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text())),
        "position": position,
    }


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint that reads back completely; a damaged newer one is skipped with a warning."""
    found = checkpoints(run_dir)
    if not found:
        raise LorakitError(f"{run_dir} has no checkpoints to resume from (looked in {Path(run_dir) / 'checkpoints'}).")
    for path in reversed(found):
        try:
            return path, read_checkpoint(path)
        except Exception as e:  # a damaged checkpoint: fall back to the previous one
            warnings.warn(f"Checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying the previous one.")
    raise LorakitError(f"No readable checkpoint in {run_dir}/checkpoints ({len(found)} found, all damaged).")
