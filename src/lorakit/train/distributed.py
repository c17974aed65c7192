"""Training on several processes with PyTorch's own engines: DistributedDataParallel and FSDP2 (`fully_shard`).

Launch with torchrun (or `lorakit train --nproc N`, which runs torchrun for you):

    torchrun --nproc_per_node 2 -m lorakit train --config cfg.yaml --set distributed=ddp

`optim.batch_size` stays the *global* micro-batch: each of the N ranks computes the loss of its b = batch_size / N
rows and the gradients are summed across ranks, so N processes take the same optimizer steps as one process with
the whole batch (and a checkpoint resumes on any N that divides the batch). Rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import LorakitError
from lorakit.train.layout import checkpoints

MODES = ("none", "ddp", "fsdp")


def launched() -> bool:
    """True when this process was started by torchrun (it sets WORLD_SIZE, RANK, MASTER_ADDR ...)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(mode: str, timeout_s: float = 600.0) -> bool:
    """Join the process group torchrun described (gloo on CPU, nccl on CUDA); False when not distributed."""
    if mode not in MODES:
        raise LorakitError(f"distributed must be one of {MODES}, got {mode!r}.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        if launched() and world > 1:
            raise LorakitError(f"Started by torchrun with {world} processes but the config says distributed: none. "
                               "Set distributed: ddp (adapter replicated) or fsdp (base sharded).")
        return False
    if not launched():
        return False  # a plain `lorakit train`: one process, nothing to set up
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64); the identity on one process."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when the flag is set on any rank: keeps stop decisions identical everywhere."""
    return all_sum([float(flag)])[0] > 0


def local_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's contiguous share of a global batch. An epoch's last, smaller batch may split unevenly (the loss
    weights count targets, so that stays exact), but every rank needs at least one row."""
    n, w = batch["input_ids"].shape[0], world_size()
    if w == 1:
        return batch
    if n < w:
        raise LorakitError(f"A micro-batch of {n} rows cannot be split over {w} processes (each needs a row). Use "
                           f"an optim.batch_size that is a multiple of {w} and a number of training examples whose "
                           f"last batch has at least {w} rows, or fewer processes.")
    return {k: torch.tensor_split(v, w)[rank()] for k, v in batch.items()}


class LossModule(nn.Module):
    """Wraps the model so the whole loss computation is one forward call, as DDP and FSDP2 hooks require."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def wrap(model: nn.Module, loss_fn, mode: str) -> nn.Module:
    """The engine that computes the loss: the model itself, DDP over its trainable parameters, or FSDP2."""
    if mode == "fsdp":
        check_shardable(model)
    engine = LossModule(model, loss_fn)
    if mode == "none" or not dist.is_initialized():
        return engine
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        # DDP registers only parameters with requires_grad: the frozen base is never all-reduced.
        return DistributedDataParallel(engine, device_ids=device, forward_sync_buffers=False)
    from torch.distributed.fsdp import fully_shard

    for module in shard_units(model):
        fully_shard(module)
    fully_shard(engine)  # the root: embeddings, final norm, output head, and everything not in a unit
    return engine


def check_shardable(model: nn.Module) -> None:
    """FSDP2 shards floating-point parameters only: refuse a quantized base clearly instead of failing deep inside."""
    from lorakit.lora.layers import is_quantized_weight

    quantized = [n for n, p in model.named_parameters() if is_quantized_weight(p)]
    if getattr(model, "hf_quantizer", None) is not None or quantized:
        raise LorakitError(f"distributed: fsdp cannot shard this quantized base ({len(quantized)} quantized parameter "
                           f"tensor(s), e.g. {quantized[:2]}; FSDP2 shards float tensors only, bitsandbytes 4/8-bit "
                           "weights are not DTensor-compatible, and lorakit does not shard torchao weights). Use "
                           "distributed: ddp (each rank holds the "
                           "quantized base and the adapter is all-reduced) or fsdp with an unquantized or bf16 base (base_dtype: bf16).")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (Hugging Face's `_no_split_modules` classes), each its own FSDP2 unit."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


@contextlib.contextmanager
def no_sync(engine: nn.Module, skip: bool):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP2) for micro-batches before the last one."""
    if not skip or not dist.is_initialized():
        yield
        return
    if hasattr(engine, "no_sync"):  # DDP
        with engine.no_sync():
            yield
        return
    engine.set_requires_gradient_sync(False)  # FSDP2
    try:
        yield
    finally:
        engine.set_requires_gradient_sync(True)


@contextlib.contextmanager
def full_params(model: nn.Module):
    """Under FSDP2, swap every sharded parameter for a gathered full copy for the duration (saving the adapter with
    its base fingerprint, evaluation through the unwrapped model); a no-op otherwise. Every rank must enter it.

    The full base is materialised on each rank meanwhile, so peak memory while saving is that of an unsharded model.
    (FSDP2's own unshard() is not used: safetensors/numpy views pin its buffers and its reshard then fails.)
    """
    from torch.distributed.tensor import DTensor

    swapped, gathered = [], {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in gathered:  # tied weights stay tied
                    gathered[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                module._parameters[name] = gathered[id(p)]
                swapped.append((module, name, p))
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor shard gathered to the full tensor (collective: all ranks call it); plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `like` (a DTensor parameter or state: this rank's shard); plain tensors pass through."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements)
    return full


def teardown(active: bool) -> None:
    if active and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """`python -m torch.distributed.run --nproc_per_node N --standalone -m lorakit ARGS` (one machine, a free port)."""
    if nproc < 1:
        raise LorakitError(f"--nproc must be a positive integer, got {nproc}.")
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
            "--monitor-interval", "0.5", "-m", "lorakit", *args]


def launch(nproc: int, args: list[str], run_dir: str | os.PathLike) -> int:
    """Run `lorakit ARGS` on N local processes through torchrun; its exit code. If any rank fails, torchrun stops
    the others and names the failed rank; this adds where the run can continue from."""
    import subprocess

    code = subprocess.call(torchrun_command(nproc, args))
    if code != 0:
        last = checkpoints(run_dir) if run_dir else []
        print(f"error: training failed on at least one of {nproc} processes (exit code {code}); the failed rank's "
              "error is above and torchrun stopped the others. "
              + (f"The last checkpoint is {last[-1]}; continue with `lorakit train --resume {run_dir} --nproc N`."
                 if last else "No checkpoint was written."), file=sys.stderr)
    return code


def without_option(argv: list[str], name: str) -> list[str]:
    """argv without `NAME VALUE` / `NAME=VALUE` (the launcher removes --nproc before re-running the command)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out
