"""The training loop: `train()` reads top to bottom and calls named phases, each usable alone —
prepare (tokenizer, data, model), build_run (engine, optimizer, schedule; build_model_run for a model and batches the
caller supplies), restore (resume), train_step (one optimizer step with the non-finite guard), validate (metrics and
best/), checkpoint, finish (adapter, summary).

    from lorakit.train import TrainConfig, train

    config = TrainConfig.from_yaml("cfg.yaml", {"optim.lr": 2e-4, "optim.max_steps": 100})
    result = train(config)                      # loads config.model, adds LoRA from config.lora
    print(result.adapter_dir, result.metrics)

    # or on a model you prepared yourself: exactly the parameters with requires_grad train
    model, tok = lorakit.load_model()
    for n, p in model.named_parameters(): p.requires_grad_(n.endswith("bias"))   # BitFit
    train(TrainConfig(data=DataConfig(train_file="train.jsonl"), output_dir="runs/bitfit"), model=model, tokenizer=tok)

    # or the step alone, on batches you build (the benchmarks do this): no data file, nothing written
    run = build_model_run(model, TrainConfig(optim=OptimConfig(lr=1e-3, max_steps=100)), task="causal-lm")
    for batch in my_batches:                    # dicts of input_ids, attention_mask, labels
        record = train_step(run, [batch])

A run folder holds: config.yaml (resolved), checkpoints/step-N/ (adapter, optimizer and scheduler state, RNG states,
data position), best/ (the best adapter by the validation metric), adapter/ (the final adapter), metrics.jsonl,
tb/ (TensorBoard), loss_curve.png and summary.json. `train(config, resume=RUN_DIR)` continues from the newest valid
checkpoint and ends with the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lorakit.data.packing import collate_packed, resolve_packing
from lorakit.data.records import (TokenizedData, collate, epoch_batches, loss_tokens, read_records, show_example,
                                  split_records, tokenize)
from lorakit.errors import LorakitError
from lorakit.fsutil import atomic_write_text
from lorakit.memory import limit_onednn_cache, peak_rss_mb, set_mmap_threshold, trim_heap
from lorakit.train import distributed as dist
from lorakit.train.checkpoint import (latest_checkpoint, load_optimizer_state, save_run_checkpoint, save_trained,
                                      set_rng_state, trainable_params)
from lorakit.train.config import OptimConfig, TrainConfig
from lorakit.train.layout import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, checkpoints
from lorakit.train.losses import batch_loss
from lorakit.train.metrics import autocast, evaluate
from lorakit.train.optim import build_optimizer, grad_norm, lr_factor
from lorakit.train.runlog import MetricsLog, dir_size, plot_loss, read_history, summary_table


@dataclass
class TrainResult:
    run_dir: Path
    """The run folder (see the module docstring for what it holds)."""
    adapter_dir: Path | None
    """The final adapter (lorakit adapter folder, or trainable.safetensors for models without lorakit adapters)."""
    best_dir: Path | None
    """The adapter with the best validation metric (None without validation data)."""
    steps: int
    """Optimizer steps taken, counting those before a resume."""
    metrics: dict[str, float]
    """The last validation metrics (empty without validation data)."""
    history: list[dict[str, Any]]
    """The records of metrics.jsonl."""
    summary: dict[str, Any]
    """What summary.json holds."""
    interrupted: bool = False
    """Stopped by Ctrl-C (a checkpoint was saved; resume to finish)."""


@dataclass
class Prepared:
    """What a run trains: the model and its tokenizer, the tokenized data, and the task."""

    model: nn.Module
    tokenizer: Any
    train_data: TokenizedData | None
    """None in a run whose caller supplies the batches (build_model_run)."""
    eval_data: TokenizedData | None
    task: str
    """causal-lm or seq-cls."""
    config: TrainConfig | None = None
    """The config with `base_dtype: auto` and `data.packing: auto` resolved (what the run uses and saves)."""
    note: str | None = None
    """Why auto chose that base dtype and packing (printed, and written atop config.yaml)."""


@dataclass
class Run:
    """A run between optimizer steps: what trains and how, and how far it got (what a checkpoint saves)."""

    config: TrainConfig
    run_dir: Path
    prepared: Prepared
    engine: nn.Module
    """What computes the loss: the model in a LossModule, under DDP or FSDP2 when distributed."""
    params: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    micro_per_epoch: int
    """0 in a run whose caller supplies the batches (build_model_run): it has no epochs (its records' epoch is None)."""
    distributed: bool = False
    say: Callable[[str], None] = print
    """Prints on rank 0; silent on the other ranks."""
    step: int = 0
    micro: int = 0
    """Micro-batches consumed: the position in the seeded data order."""
    best: float | None = None
    best_dir: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    skipped_in_a_row: int = 0
    skipped_total: int = 0
    tick: float = field(default_factory=time.perf_counter)
    """When the previous step's record was made (for tokens/s)."""
    compile_seconds_before: float = field(default_factory=lambda: compile_seconds())
    """torch.compile's time in this process before the run (the summary reports the run's own, with compile: true)."""

    @property
    def position(self) -> dict[str, Any]:
        return {"step": self.step, "micro": self.micro, "best": self.best, "total_steps": self.total_steps}


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
    started = time.perf_counter()
    limit_onednn_cache()  # before the first bf16 matmul (the bf16 speed probe): batch shapes vary every step
    config, run_dir, resumed = _open_run(config, resume)
    _seed_everything(config.seed)
    if config.malloc_mmap_threshold_kb:
        set_mmap_threshold(config.malloc_mmap_threshold_kb * 1024)
    distributed = dist.setup(config.distributed)
    say = print if dist.is_main() else _silent

    prepared = prepare(config, model, tokenizer)
    config = prepared.config
    if prepared.note:
        say(prepared.note)
    if show_example_first:
        say(show_example(prepared.train_data.examples[0], prepared.tokenizer))
    run = build_run(config, prepared, run_dir, distributed, say, prepared.note)
    with MetricsLog(run_dir, config.tensorboard, enabled=dist.is_main()) as log:
        if resumed is not None:
            restore(run, resumed[1])
            log.truncate_after(run.step)
            say(f"resuming from {resumed[0]} (step {run.step}/{run.total_steps})")
        else:
            log.truncate_after(0)  # a fresh start in a folder a crashed run (killed before its first checkpoint) used
        say(_describe(run))

        with _CtrlC() as ctrl_c, _progress(run.total_steps, run.step, config.progress and dist.is_main()) as bar:
            run.engine.train()
            while run.step < run.total_steps and not dist.any_rank(ctrl_c.pressed):
                record = train_step(run)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if prepared.eval_data is not None and _due(config.eval_every, run):
                    record.update(validate(run))
                if run.step % config.log_every == 0 or "eval_loss" in record:
                    log.log(record)
                if _due(config.save_every, run):
                    checkpoint(run)
                if on_step is not None:
                    on_step(run.step, record)
            interrupted = run.step < run.total_steps  # the loop ends early only on Ctrl-C (on any rank)
            if interrupted:
                path = checkpoint(run)
                say(f"interrupted: checkpoint saved to {path}; continue with `lorakit train --resume {run_dir}`")
        if not interrupted and prepared.eval_data is not None:
            log.log({"step": run.step, **validate(run)})
    return finish(run, started, interrupted)


def _due(every: int, run: Run) -> bool:
    """Every N steps (0: never), except at the last step, which finish() covers."""
    return bool(every) and run.step % every == 0 and run.step < run.total_steps


# ---------------------------------------------------------------------------------------------------- phases
def prepare(config: TrainConfig, model: nn.Module | None = None, tokenizer=None) -> Prepared:
    """The tokenized data and the model ready to train. Without `model`: load the tokenizer (once), read the data (its
    format decides the task: classification -> seq-cls), load `config.model` with that tokenizer and add the LoRA
    adapter. Then the base-side options: bf16 cast, quantization, fused MLP, gradient checkpointing."""
    if model is not None and tokenizer is None:
        raise LorakitError("train(): pass the model's tokenizer together with model=.")
    if model is None:
        tokenizer = _load_tokenizer(config.model)
    train_data, eval_data = load_data(config, tokenizer)
    task = _resolve_task(config, train_data.format)
    config, note = _resolve_base_dtype(config, model, task)
    if model is None:
        model = _load_adapted_model(config, tokenizer, task, train_data)
    data, packing_note = resolve_packing(config.data, task, config.distributed, model)  # probes the model once
    config, note = dataclasses.replace(config, data=data), "\n".join(n for n in (note, packing_note) if n) or None
    _prepare_base(model, config)
    if not trainable_params(model):
        raise LorakitError("Nothing to train: no parameter has requires_grad. Add an adapter (add_lora) or unfreeze "
                           "the parameters you want to train.")
    return Prepared(model, tokenizer, train_data, eval_data, task, config, note)


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


def build_run(config: TrainConfig, prepared: Prepared, run_dir: Path, distributed: bool = False,
              say: Callable[[str], None] = print, note: str | None = None) -> Run:
    """The loss engine (DDP/FSDP2 when distributed), AdamW and its schedule; writes the run's config.yaml (with
    `note`, e.g. what base_dtype auto chose and why, as a comment at its top)."""
    o = config.optim
    if o.batch_size % dist.world_size():
        raise LorakitError(f"optim.batch_size={o.batch_size} is the global micro-batch and must be a multiple of the "
                           f"{dist.world_size()} processes.")
    micro_per_epoch = math.ceil(len(prepared.train_data.examples) / o.batch_size)
    total_steps = o.max_steps or math.ceil(micro_per_epoch * o.epochs / o.grad_accum)
    engine, params, optimizer, scheduler = _optimization(prepared, o, total_steps,
                                                         config.distributed if distributed else "none")
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG_FILE, config.to_yaml(note))
    dist.barrier()
    return Run(config, run_dir, prepared, engine, params, optimizer, scheduler, total_steps, micro_per_epoch,
               distributed, say)


def build_model_run(model: nn.Module, config: TrainConfig, task: str, say: Callable[[str], None] = print) -> Run:
    """A run for a model you prepared, fed with micro-batches you build: `train_step(run, [batch, ...])` then takes
    train()'s step on them. For callers that measure the step itself (the benchmarks), in one process.

    The model gets prepare()'s base-side options (base_dtype, quantize, fused MLP, gradient checkpointing); exactly
    the parameters with requires_grad train, with AdamW and the schedule of `config.optim` over `optim.max_steps`
    steps (required: such a run has no data to count epochs of). `task` (causal-lm or seq-cls) picks the loss, as in
    train(). No data file is read and nothing is written; `config.output_dir` is only named in the message of a
    non-finite stop. The batches are dicts of input_ids, attention_mask and labels (padded labels -100; one label per
    row for seq-cls, which may add token_type_ids).
    """
    if task not in ("causal-lm", "seq-cls"):
        raise LorakitError(f"build_model_run(): task must be causal-lm or seq-cls, got {task!r}.")
    if config.optim.max_steps is None:
        raise LorakitError("build_model_run(): set optim.max_steps; a run fed by its caller has no epochs to count.")
    config, note = _resolve_base_dtype(config, model, task)
    if note:
        say(note)
    _prepare_base(model, config)
    if not trainable_params(model):
        raise LorakitError("Nothing to train: no parameter has requires_grad. Add an adapter (add_lora) or unfreeze "
                           "the parameters you want to train.")
    prepared = Prepared(model, None, None, None, task, config, note)
    total_steps = config.optim.max_steps
    engine, params, optimizer, scheduler = _optimization(prepared, config.optim, total_steps, "none")
    return Run(config, Path(config.output_dir), prepared, engine, params, optimizer, scheduler, total_steps, 0,
               say=say)


def _optimization(prepared: Prepared, optim: OptimConfig, total_steps: int, mode: str
                  ) -> tuple[nn.Module, list[tuple[str, nn.Parameter]], torch.optim.Optimizer,
                             torch.optim.lr_scheduler.LambdaLR]:
    """The loss engine (wrapped for `mode`: none, ddp or fsdp), the parameters that train, AdamW and its schedule."""
    engine = dist.wrap(prepared.model, functools.partial(batch_loss, task=prepared.task), mode)
    params = trainable_params(prepared.model)  # after wrapping: FSDP2 replaced them with sharded parameters
    optimizer = build_optimizer(prepared.model, params, optim)
    return engine, params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim, total_steps))


def restore(run: Run, state: dict[str, Any]) -> None:
    """Continue from a checkpoint's state (see checkpoint.read_checkpoint): weights, optimizer, schedule, data
    position, best metric and RNG states, so the run goes on exactly as if never stopped."""
    missing = [name for name, _ in run.params if name not in state["trainable"]]
    if missing:
        raise LorakitError(f"The checkpoint does not hold {len(missing)} of the parameters that train now (e.g. "
                           f"{missing[:2]}); it holds {sorted(state['trainable'])[:4]}... Resume with the same model "
                           "preparation (adapter, trainable parameters) as the run that wrote it.")
    with torch.no_grad():
        for name, p in run.params:
            p.copy_(dist.shard_like(state["trainable"][name], p))
    load_optimizer_state(run.optimizer, *state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    position = state["position"]
    run.step, run.micro, run.best = position["step"], position["micro"], position.get("best")
    run.best_dir = run.run_dir / "best" if (run.run_dir / "best").is_dir() else None
    set_rng_state(*state["rng"])


def train_step(run: Run, micro_batches: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """One optimizer step over `grad_accum` micro-batches; returns its metrics record.

    `micro_batches`: the step's micro-batches from the caller (see build_model_run) instead of the run's data; they
    are weighted, guarded and stepped exactly like the run's own.

    A step whose loss or gradient norm is NaN/inf is never applied, so the weights and every later checkpoint stay
    finite: with on_nonfinite=stop (or too many skips in a row) it raises a LorakitError naming the last good
    checkpoint; with skip it is dropped (the record says "skipped") and the schedule and data move on.
    """
    config = run.config
    if micro_batches is None:
        micro_batches = _next_micro_batches(run)
    else:
        run.micro += len(micro_batches)
    try:
        loss, bad_loss, tokens = _accumulate_gradients(run, micro_batches)
    except Exception as e:
        if config.compile and _is_compile_failure(e):
            raise LorakitError(f"compile: true: torch.compile failed on this machine ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}). Train "
                               "without it: --set compile=false.") from e
        raise
    norm = None if bad_loss is not None else grad_norm(run.params, config.optim.max_grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    problem = (f"loss became {bad_loss}" if bad_loss is not None else
               f"gradient norm became {norm}" if not math.isfinite(norm) else None)
    if problem is None:
        run.optimizer.step()
        run.skipped_in_a_row = 0
    else:
        run.skipped_in_a_row += 1
        run.skipped_total += 1
        if config.on_nonfinite == "stop" or run.skipped_in_a_row >= config.max_skipped_steps:
            run.optimizer.zero_grad(set_to_none=True)
            raise LorakitError(_nonfinite_message(problem, run.step + 1, run))
        run.say(f"step {run.step + 1}: the {problem}; step skipped ({run.skipped_in_a_row} in a row, "
                f"{config.max_skipped_steps} allowed)")
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if config.malloc_trim:
        trim_heap()
    run.step += 1

    now = time.perf_counter()
    record = {"step": run.step, "epoch": round(run.micro / run.micro_per_epoch, 4) if run.micro_per_epoch else None,
              "loss": loss, "lr": lr, "tokens_per_s": tokens / max(now - run.tick, 1e-9), "time": round(time.time(), 3)}
    if norm is not None and math.isfinite(norm):
        record["grad_norm"] = norm
    if problem is not None:
        record["skipped"] = True
    run.tick = now
    return record


def _next_micro_batches(run: Run) -> list[dict[str, torch.Tensor]]:
    """The step's micro-batches, in the seeded order of the epoch each falls in (the same after a resume)."""
    config, examples = run.config, run.prepared.train_data.examples
    lengths = [len(e.input_ids) for e in examples]
    pad_id = run.prepared.tokenizer.pad_token_id if run.prepared.tokenizer.pad_token_id is not None else 0
    out = []
    for _ in range(config.optim.grad_accum):
        epoch, index = divmod(run.micro, run.micro_per_epoch)
        order = epoch_batches(lengths, config.optim.batch_size, config.seed, epoch, config.data.group_by_length)
        batch = [examples[i] for i in order[index]]
        out.append(collate_packed(batch, pad_id) if config.data.packing else collate(batch, pad_id))
        run.micro += 1
    return out


def _accumulate_gradients(run: Run, micro_batches: list[dict[str, torch.Tensor]]
                          ) -> tuple[float, float | str | None, int]:
    """Forward and backward over the micro-batches, each split into passes of at most `optim.max_batch_tokens`
    tokens, weighting each pass by its share of the step's target tokens.
    Returns (loss, the non-finite loss that stopped it or None, tokens seen on all ranks)."""
    n_targets = sum(loss_tokens(b) for b in micro_batches)
    budget, world = run.config.optim.max_batch_tokens, dist.world_size()
    passes = [p for b in micro_batches for p in split_batch(b, budget, world)]
    step_loss, bad_loss = 0.0, None
    for i, b in enumerate(passes):
        b = dist.local_rows(b)  # under torchrun: this rank's rows of the global pass
        with autocast(run.config), dist.no_sync(run.engine, skip=i < len(passes) - 1):
            loss = run.engine(b)
            share = loss_tokens(b) / n_targets
            if share == 0:  # no targets in this rank's rows: contribute zero gradient, but take part
                loss = torch.nan_to_num(loss, nan=0.0) * 0.0
            weighted, bad = dist.all_sum([float(loss.detach()) * share, float(not torch.isfinite(loss))])
            if bad:  # decided from all ranks' losses, so every rank leaves the step here together
                bad_loss = float(loss.detach()) if not torch.isfinite(loss) else "non-finite on another rank"
                break
            # DDP and FSDP2 average gradients over ranks; the sum over ranks is the full-batch gradient
            (loss * (share * world)).backward()
        step_loss += weighted
    tokens_seen = sum(int(b["num_tokens"] if "num_tokens" in b else b["attention_mask"].sum()) for b in micro_batches)
    return step_loss, bad_loss, tokens_seen


def split_batch(batch: dict[str, torch.Tensor], max_tokens: int | None, world: int = 1
                ) -> list[dict[str, torch.Tensor]]:
    """A micro-batch as forward passes of at most `max_tokens` tokens (rows × padded length) per process.

    Unchanged (one pass, the same tensors) when it fits or `max_tokens` is None. Otherwise its rows, longest first,
    fill passes in turn; each pass is cut after the last unmasked column of its rows and holds at least `world` rows,
    so every process of a distributed run gets a row of each pass. A row longer than the budget makes a pass alone.
    Packed batches (no attention mask) keep their width. The passes' losses, weighted by their target tokens
    (`loss_tokens`), add up to the micro-batch's.
    """
    ids = batch["input_ids"]
    n_rows, width = ids.shape
    if max_tokens is None or math.ceil(n_rows / world) * width <= max_tokens:
        return [batch]
    mask = batch.get("attention_mask")  # a row's extent: up to its last unmasked position (packed rows: all)
    lengths = ((mask != 0) * torch.arange(1, width + 1)).amax(dim=1).tolist() if mask is not None else [width] * n_rows
    order = sorted(range(n_rows), key=lambda r: -lengths[r])
    groups: list[list[int]] = [[]]
    for r in order:
        group = groups[-1]
        if len(group) >= world and math.ceil((len(group) + 1) / world) * lengths[group[0]] > max_tokens:
            groups.append(group := [])
        group.append(r)
    if len(groups) > 1 and len(groups[-1]) < world:  # too few rows left for every process: join the previous pass
        groups[-2] += groups.pop()
    if len(groups) == 1:
        return [batch]
    return [_rows_of(batch, rows, lengths[rows[0]]) for rows in groups]


def _rows_of(batch: dict[str, torch.Tensor], rows: list[int], width: int) -> dict[str, torch.Tensor]:
    """The given rows of a batch, its (rows, T) tensors cut to `width` columns; per-batch scalars (num_tokens) are
    left out: tokens are counted on the whole micro-batch."""
    index, full = torch.tensor(rows), batch["input_ids"].shape[1]
    out = {}
    for key, value in batch.items():
        if value.dim() == 0:
            continue
        value = value.index_select(0, index)
        out[key] = value[:, :width] if value.dim() == 2 and value.shape[1] == full else value
    return out


def validate(run: Run) -> dict[str, float]:
    """Validation metrics of the current weights; the adapter with the best metric so far is kept in best/."""
    prepared = run.prepared
    # two separate gathers: FSDP2's forward hooks put their shards back into the modules it runs
    with dist.full_params(run.engine), torch.no_grad():  # nothing kept for a backward that never comes
        metrics = evaluate(prepared.model, prepared.tokenizer, prepared.eval_data, prepared.task, run.config)
    key = run.config.metric or "eval_loss"
    value = metrics[key]
    if run.best is None or (value < run.best if key == "eval_loss" else value > run.best):
        with dist.full_params(run.engine):
            run.best_dir = save_trained(prepared.model, run.run_dir / "best",
                                        {"train_config": run.config.to_dict(), "step": run.step, "metrics": metrics})
        run.best = value
    run.metrics = metrics
    return metrics


def checkpoint(run: Run) -> Path:
    """checkpoints/step-N/ for the run's current state (every rank calls this; the newest keep_last are kept)."""
    return save_run_checkpoint(run.run_dir, run.prepared.model, run.engine, run.optimizer, run.scheduler,
                               run.position, run.config)


def finish(run: Run, started: float, interrupted: bool = False) -> TrainResult:
    """The final checkpoint and adapter/ (unless interrupted), loss_curve.png, summary.json and the summary table."""
    config, run_dir, model = run.config, run.run_dir, run.prepared.model
    adapter_dir = None
    if not interrupted:
        checkpoint(run)
        with dist.full_params(run.engine):
            adapter_dir = save_trained(model, run_dir / "adapter", {"train_config": config.to_dict(),
                                                                    "step": run.step, "metrics": run.metrics})
    dist.barrier()
    main = dist.is_main()
    history = read_history(run_dir / METRICS_FILE)
    plot = plot_loss(history, run_dir / "loss_curve.png") if main else None
    peak_mb = round(peak_rss_mb(), 1)
    peaks = dist.all_sum([peak_mb if r == dist.rank() else 0.0 for r in range(dist.world_size())])
    trainable, share = _param_report(model)
    data = run.prepared.train_data
    summary = {
        "steps": run.step, "trainable params": trainable, "trainable %": share,
        "adapter size on disk (bytes)": dir_size(adapter_dir), "wall time (s)": round(time.perf_counter() - started, 1),
        "peak memory (MB)": peak_mb,
        **({"compile time (s)": round(compile_seconds() - run.compile_seconds_before, 1)} if config.compile else {}),
        **({"peak memory per rank (MB)": " ".join(f"{p:.0f}" for p in peaks)} if run.distributed else {}),
        "examples": len(data.examples), "truncated examples": data.truncated,
        **({"skipped steps (non-finite)": run.skipped_total} if run.skipped_total else {}),
        **run.metrics, "run folder": str(run_dir), "loss curve": str(plot) if plot else "none",
    }
    if main:
        atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    if config.progress and main:
        print(summary_table(summary))
    return TrainResult(run_dir, adapter_dir, run.best_dir, run.step, run.metrics, history, summary, interrupted)


# ---------------------------------------------------------------------------------------------------- helpers
def _resolve_base_dtype(config: TrainConfig, model: nn.Module | None, task: str) -> tuple[TrainConfig, str | None]:
    """base_dtype auto: measured on the device training runs on (a given model's, else the CPU load_model uses).
    fp32 without measuring where a bf16 base would meet full-precision trained modules: a model the caller prepared
    without lorakit adapters (whatever they unfroze), and classification (its head trains in fp32 on the base's
    output; encoders are small, so the cast would gain little); and for a quantized base, whose adapter must load on
    the fp32 model it was trained from (rounding W to bf16 before quantizing would change the quantized base)."""
    if config.base_dtype == "auto":
        if model is not None and not getattr(model, "lora_configs", None):
            why = "the model was prepared by the caller without lorakit adapters"
        elif task == "seq-cls":
            why = "classification trains its head in fp32 on the base's output"
        elif config.quantize:
            why = f"the base is stored quantized (quantize={config.quantize}); its layers compute in fp32"
        else:
            return config.resolve_auto(next(model.parameters()).device.type if model is not None else "cpu")
        return dataclasses.replace(config, base_dtype="fp32"), f"base_dtype auto -> fp32: {why}"
    return config, None


def _open_run(config: TrainConfig | None, resume: str | Path | None
              ) -> tuple[TrainConfig, Path, tuple[Path, dict[str, Any]] | None]:
    """The config and run folder; on resume also the newest readable checkpoint (path, state) and the saved config."""
    if resume is not None:
        run_dir = Path(resume)
        found = latest_checkpoint(run_dir)
        saved = TrainConfig.from_yaml(run_dir / CONFIG_FILE)
        return (saved if config is None else config), run_dir, found
    if config is None:
        raise LorakitError("train(): give a TrainConfig (or resume=RUN_DIR to reuse a run's saved config).")
    run_dir = Path(config.output_dir)
    if (run_dir / CONFIG_FILE).exists() and checkpoints(run_dir):
        raise LorakitError(f"{run_dir} already holds a run with checkpoints; use `--resume {run_dir}` to continue it "
                           "or choose another output_dir.")
    return config, run_dir, None


def _load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    from lorakit.models.loading import resolve_model_path

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise LorakitError(f"Could not load the tokenizer of model {name_or_path!r} from {path}: {e}. Set model to an "
                           "embedded model name, a local Hugging Face model folder, or a hub id.") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _resolve_task(config: TrainConfig, fmt: str) -> str:
    if config.task != "auto":
        return config.task
    return "seq-cls" if fmt == "classification" else "causal-lm"


def _load_adapted_model(config: TrainConfig, tokenizer, task: str, train_data: TokenizedData) -> nn.Module:
    """config.model with the tokenizer already loaded, plus config.lora (a classifier head trains with it). A bf16
    base is cast here already, weight by weight from the mapped file, so that the fp32 file is never resident at
    once (see cast_mapped_weights: the values are _prepare_base's cast's)."""
    from lorakit.lora.injection import add_lora
    from lorakit.models.loading import cast_mapped_weights, load_model

    attn = "eager" if "bf16" in (config.base_dtype, config.precision) else None
    model, _ = load_model(config.model, task=task, attn_implementation=attn, tokenizer=tokenizer,
                          num_labels=len(train_data.label_names) if train_data.label_names else None)
    lora = config.lora
    if task == "seq-cls" and lora.modules_to_save is None:
        lora = dataclasses.replace(lora, modules_to_save=[n for n in ("classifier", "score") if hasattr(model, n)])
    add_lora(model, lora)
    if config.base_dtype == "bf16" and not lora.changes_base:  # PiSSA/OLoRA wrote into the mapped weights
        cast_mapped_weights(model, torch.bfloat16)
    if task == "seq-cls" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _prepare_base(model: nn.Module, config: TrainConfig) -> None:
    """The frozen base as configured: bf16 weights, quantized linear layers, fused MLP, gradient checkpointing."""
    from lorakit.lora.injection import cast_base
    from lorakit.models.fused import fuse_gated_mlp, keep_low_precision_inputs

    if config.base_dtype == "bf16":
        cast_base(model, torch.bfloat16)
    if config.quantize:
        _quantize_base(model, config)
    fuse_gated_mlp(model)  # exact: bit-identical gradients, one activation per MLP fewer kept for backward
    keep_low_precision_inputs(model)  # same ops: a bf16 base's norms and LoRA keep bf16 inputs, not fp32 copies
    if config.compile:
        compile_blocks(model)
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False


def _quantize_base(model: nn.Module, config: TrainConfig) -> None:
    """QLoRA: LoftQ-initialise the fresh adapter if asked (it quantizes the adapted layers), then the other layers."""
    from lorakit.models.quantization import loftq_init, quantization_of, quantize_model

    compute = torch.bfloat16 if config.base_dtype == "bf16" else torch.float32
    if config.lora.init == "loftq" and quantization_of(model) is None:
        loftq_init(model, bits=4 if config.quantize == "nf4" else 8,
                   iters=config.lora.loftq_config.get("loftq_iter", 1), compute_dtype=compute)
    quantize_model(model, config.quantize, compute_dtype=compute)


def compile_blocks(model: nn.Module) -> int:
    """compile: true. torch.compile each repeated block of `model` in place (the classes transformers names in
    `_no_split_modules`, e.g. LlamaDecoderLayer; the whole forward for other models), with dynamic shapes so that
    batches of other lengths reuse the compiled code. Parameter names do not change (checkpoints and adapters are
    the same). Compilation itself happens at the first forward and backward. Returns how many modules were compiled.
    Raises a LorakitError where torch cannot compile (nothing is changed then)."""
    problem = compile_problem(next(model.parameters()).device.type)
    if problem:
        raise LorakitError(f"compile: true cannot work here: {problem}. Train without it: --set compile=false.")
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names] or [model]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def compile_problem(device: str = "cpu") -> str | None:
    """Why torch.compile (TorchDynamo + Inductor) cannot run on `device` in this process, or None if it can."""
    try:
        from torch._dynamo.eval_frame import check_if_inductor_supported

        check_if_inductor_supported()  # e.g. a Python version this torch's Dynamo does not support
    except Exception as e:  # noqa: BLE001  torch's own reason is the message
        return f"torch.compile is not supported with this Python/torch ({e})"
    if device == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001
            return f"Inductor needs a C++ compiler for CPU code and found none ({e}); install g++ or set CXX"
    elif device == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Inductor needs Triton for CUDA code; install the triton package matching this torch"
    else:
        return f"lorakit compiles for CPU and CUDA, not {device}"
    return None


def compile_seconds() -> float:
    """Seconds torch.compile has spent in this process (Dynamo's frame compilation, forward and backward graphs)."""
    if "torch._dynamo" not in sys.modules:  # never imported: nothing was compiled
        return 0.0
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


def _is_compile_failure(error: BaseException) -> bool:
    """An error raised by torch.compile's machinery (Dynamo or Inductor), not by the model's own computation."""
    module = type(error).__module__
    return module.startswith(("torch._dynamo", "torch._inductor"))


def _describe(run: Run) -> str:
    train_data, eval_data, config = run.prepared.train_data, run.prepared.eval_data, run.config
    return (f"{len(train_data.examples)} training examples ({train_data.format}), {train_data.truncated} truncated to "
            f"{config.data.max_length} tokens, {train_data.dropped} dropped; "
            f"{len(eval_data.examples) if eval_data else 0} validation examples; {run.total_steps} steps"
            + (f"; {config.distributed} over {dist.world_size()} processes" if run.distributed else ""))


def _nonfinite_message(problem: str, step: int, run: Run) -> str:
    last = checkpoints(run.run_dir)
    config = run.config
    skipped = (f" after {run.skipped_in_a_row} non-finite steps in a row (max_skipped_steps={config.max_skipped_steps})"
               if config.on_nonfinite == "skip" else "")
    return (f"The {problem} at step {step}; the step was not applied and training stopped{skipped}. The last good "
            f"checkpoint is {last[-1] if last else 'none (no checkpoint yet)'}. Try a lower optim.lr, fp32 precision, "
            "optim.max_grad_norm, or check the data; on_nonfinite=skip drops such steps instead of stopping.")


def _param_report(model: nn.Module) -> tuple[int, float]:
    """Trainable parameters and their share of all parameters (%), tied weights counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    trainable = sum(p.numel() for _, p in trainable_params(model))
    return trainable, round(100.0 * trainable / max(total, 1), 4)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _silent(*args, **kwargs) -> None:
    """`say` on ranks other than 0."""


class _CtrlC:
    """While active (main thread only): the first Ctrl-C sets `pressed` (the loop finishes its step and saves a
    checkpoint), a second one aborts without saving."""

    def __init__(self):
        self.pressed = False
        self._previous = None

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        print("\ninterrupt: finishing this step, saving a checkpoint (Ctrl-C again to abort without saving)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
