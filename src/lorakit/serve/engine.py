"""Runs the steps: one thread owns the model and loops scheduler → runner → sampler → detokenizer → events.

That thread is the only one that runs the model's operators: adapter loads and unloads asked for over HTTP are
handed to it (`Engine.call`), and `lorakit serve` runs the loop on the thread that loaded the model. Each thread that
runs a parallel torch operator gets its own OpenMP thread team, and once libgomp manages more threads than there are
cores its idle threads stop spinning and sleep at once, so every operator pays a wake-up: measured on a 2-core EPYC,
a batch-1 SmolLM2 decode step took 46–47 ms on a second thread against 37–41 ms on the thread that loaded the model.

Continuous (default): each loop is one step of `Scheduler.schedule()` (rows join and leave between steps), run by
`SlotRunner`. Static: the earlier micro-batcher, kept for comparison: collect the requests that arrive within
`batch_wait_ms` and decode them to the end with `generate_rows`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from typing import Any, Callable

import torch
from torch import nn

from lorakit.inference.generate import Completion, Row, end_token_ids, generate_rows
from lorakit.inference.sampling import RowText, pick_tokens
from lorakit.serve.adapters import AdapterCache
from lorakit.serve.config import ServeConfig, ServeError
from lorakit.serve.metrics import Metrics
from lorakit.serve.runner import Chunk, Decode, SlotRunner
from lorakit.serve.scheduler import Scheduler, Seq


class Job:
    """Rows of one HTTP request; the engine thread reports (row, kind, payload) events to its asyncio queue:
    ("text", delta), ("done", Completion) or ("error", ServeError)."""

    def __init__(self, rows: list[Row], loop: asyncio.AbstractEventLoop):
        self.rows, self.loop = rows, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.arrival = time.monotonic()
        self.cancelled = False  # set by HTTP when the client is gone or the request failed: its rows leave

    def report(self, row: int, kind: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (row, kind, payload))


def _shutting_down() -> ServeError:
    return ServeError(503, "The server is shutting down.", "shutting_down")


class _Call:
    """A function to run on the engine's thread, between steps; its caller waits for `done`."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn, self.done = fn, concurrent.futures.Future()

    def run(self) -> None:
        try:
            self.done.set_result(self.fn())
        except Exception as e:  # the caller re-raises it (a ServeError becomes its 4xx)
            self.done.set_exception(e)
        except BaseException as e:  # Ctrl-C on the engine's thread: the caller is told, the loop still stops
            self.done.set_exception(e)
            raise


class Engine:
    """The model, its adapter cache and the thread that runs every forward. All model access holds `self.lock`.

    start=True runs the loop on a new thread; start=False leaves it to the caller, who calls `run()` (on the thread
    that loaded the model, as `lorakit serve` does)."""

    def __init__(self, model: nn.Module, tokenizer, config: ServeConfig, start: bool = True):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")  # the base's, for the banner
        self.lock = threading.Lock()
        self.metrics = Metrics()
        self.owner: int | None = None  # the ident of the thread running the loop, once it runs
        self.stopped = False
        self.adapters = AdapterCache(model, config, self.lock, self.metrics, call=self.call)
        self.base_name = self.adapters.base_name
        self.end_ids = end_token_ids(model, tokenizer)
        self.jobs: queue.Queue[Job | _Call | None] = queue.Queue()
        self.stats = {"steps": 0, "rows": 0, "largest_batch": 0, "mixed_adapter_steps": 0}
        self.scheduler = self.runner = None
        if config.scheduler == "continuous":
            self.runner = SlotRunner(model, config.max_batch_size, pack=config.pack_weights,
                                     native_attention=config.native_attention)
            row_tokens = self.context
            if config.kv_cache_mb is not None:
                row_tokens = min(row_tokens, int(config.kv_cache_mb * 1e6 / self.runner.bytes_per_token)
                                 // config.max_batch_size)
            self.scheduler = Scheduler(config.max_batch_size, config.max_step_tokens, config.prefill_chunk, row_tokens)
        self.metrics.gauge("lorakit_requests_waiting", "Rows waiting for a KV-cache slot (static: for a batch).",
                           lambda: len(self.scheduler.waiting) if self.scheduler else self.jobs.qsize())
        self.metrics.gauge("lorakit_requests_running", "Rows in the running batch.",
                           lambda: self.scheduler.num_running if self.scheduler else self._static_rows)
        self.metrics.gauge("lorakit_batch_occupancy_ratio", "Running rows / max_batch_size.",
                           lambda: (self.scheduler.num_running if self.scheduler else self._static_rows)
                           / config.max_batch_size)
        self.metrics.gauge("lorakit_kv_cache_bytes", "Bytes allocated for the KV cache (continuous scheduler).",
                           lambda: self.runner.bytes_per_token * self.runner.capacity * self.runner.slots
                           if self.runner else 0)
        self.metrics.gauge("lorakit_packed_weight_bytes", "Bytes of the oneDNN-packed base weight copies "
                           "(continuous scheduler on a CPU).", lambda: self.runner.packed_bytes if self.runner else 0)
        self.metrics.gauge("lorakit_adapters_resident", "Adapters loaded on the base.", lambda: len(self.loaded()))
        self._static_rows = 0
        self.worker = threading.Thread(target=self.run, name="lorakit-engine", daemon=True) if start else None
        if self.worker is not None:
            self.worker.start()

    def run(self) -> None:
        """The loop, on the calling thread, until `close()`; rows still running or waiting then get a 503."""
        self.owner = threading.get_ident()
        try:
            if self.runner is not None:  # pack the base before the first request, not during it
                with self.lock:
                    self.runner.refresh_weights()
            self._run_continuous() if self.scheduler else self._run_static()
        finally:
            self.stopped = True
            self._drain()

    def call(self, fn: Callable[[], Any]) -> Any:
        """fn() on the engine's thread (between steps), so that one thread runs every model operator."""
        if self.owner is None or self.owner == threading.get_ident():
            return fn()  # the loop has not started (start-up adapters) or this is the loop's own thread
        if self.stopped:
            raise _shutting_down()
        call = _Call(fn)
        self.jobs.put(call)
        if self.stopped:  # the loop may have drained the queue just before this put
            self._fail_queued()
        return call.done.result()

    # -- what HTTP needs -----------------------------------------------------------------------------------------
    def loaded(self) -> list[str]:
        return self.adapters.loaded()

    def check_length(self, prompt_ids: list[int], max_tokens: int) -> None:
        """400 for a row that can never run: longer than the context or than one KV-cache slot."""
        if len(prompt_ids) + max_tokens > self.context:
            raise ServeError(400, f"This model's context is {self.context} tokens, but the prompt has "
                                  f"{len(prompt_ids)} tokens and max_tokens is {max_tokens}; shorten the prompt or "
                                  "lower max_tokens.", "context_length_exceeded", "prompt")
        reason = self.scheduler.refusal(len(prompt_ids), max_tokens) if self.scheduler else None
        if reason:
            raise ServeError(400, f"This request can never fit: {reason} (kv_cache_mb / max_batch_size); shorten "
                                  "the prompt or lower max_tokens.", "context_length_exceeded", "prompt")

    def submit(self, job: Job) -> None:
        self.jobs.put(job)
        if self.stopped:  # as in call(): nothing will run it, so it gets its 503 now
            self._fail_queued()

    def close(self) -> None:
        self.jobs.put(None)
        if self.worker is not None:
            self.worker.join(timeout=30)

    def _drain(self) -> None:
        """After the loop: every row still running or waiting, and every queued job or call, gets a 503."""
        if self.scheduler is not None:
            for seq in [s for s in self.scheduler.running if s is not None] + list(self.scheduler.waiting):
                self.scheduler.leave(seq)
                self._failed(seq.job, seq.index, _shutting_down(), seq.adapter)
        self._fail_queued()

    def _fail_queued(self) -> None:
        error = _shutting_down()
        while True:
            try:
                item = self.jobs.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Call):
                item.done.set_exception(error)
            elif item is not None:
                for i, row in enumerate(item.rows):
                    self._failed(item, i, error, row.adapter)

    def _count(self, adapters: list[str | None]) -> None:
        self.stats["steps"] += 1
        self.stats["rows"] += len(adapters)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(adapters))
        self.stats["mixed_adapter_steps"] += len(set(adapters)) > 1
        self.metrics.inc("lorakit_steps_total")
        self.metrics.observe("lorakit_batch_occupancy_rows", len(adapters))

    def _finished(self, job: Job, index: int, completion: Completion, adapter: str | None) -> None:
        """Release the row's adapter before the answer goes out, so a client that has its answer sees it idle."""
        self.adapters.release([adapter])
        self.metrics.inc("lorakit_requests_total", label='outcome="ok"')
        self.metrics.inc("lorakit_prompt_tokens_total", completion.prompt_tokens)
        job.report(index, "done", completion)

    def _failed(self, job: Job, index: int, error: ServeError, adapter: str | None) -> None:
        self.adapters.release([adapter])
        self.metrics.inc("lorakit_requests_total", label='outcome="error"')
        job.report(index, "error", error)

    # -- continuous ----------------------------------------------------------------------------------------------
    def _intake(self, block: bool) -> bool:
        """Move submitted jobs into the scheduler; False when the engine is closing."""
        while True:
            try:
                job = self.jobs.get(block=block)
            except queue.Empty:
                return True
            if job is None:
                return False
            if isinstance(job, _Call):
                job.run()
                block = False
                continue
            for i, row in enumerate(job.rows):
                s = row.sampling
                seq = Seq(row.prompt_ids, row.adapter, s, job, i, RowText(self.tokenizer, s.stop),
                          torch.Generator().manual_seed(s.seed) if s.seed is not None else None, arrival=job.arrival)
                self.scheduler.add(seq)
            block = False

    def _run_continuous(self) -> None:
        while self._intake(block=not self.scheduler.has_work()):
            step = self.scheduler.schedule()
            try:
                self._step(step)
            except Exception as e:  # report to the rows of this step instead of killing the engine
                error = ServeError(500, f"Generation failed: {type(e).__name__}: {e}", "generation_failed")
                for seq in {id(s): s for s in step.decode + [c[0] for c in step.chunks]}.values():
                    self.scheduler.leave(seq)
                    self._failed(seq.job, seq.index, error, seq.adapter)

    def _step(self, step) -> None:
        rows, logits = [], []
        with self.lock:
            loaded = set(self.loaded())
            for seq in [s for s in step.decode + [c[0] for c in step.chunks] if s.job.cancelled]:
                self.scheduler.leave(seq)
                self._failed(seq.job, seq.index, ServeError(499, "The client went away.", "cancelled"), seq.adapter)
            for seq in [s for s in step.decode + [c[0] for c in step.chunks]
                        if s.slot is not None and s.adapter not in loaded | {None}]:
                self.scheduler.leave(seq)  # unloaded by an admin while it waited or ran
                self._failed(seq.job, seq.index, ServeError(404, f"Adapter {seq.adapter!r} was unloaded before the "
                                                                 "request finished.", "model_not_found", "model"),
                             seq.adapter)
            for src, dst, seq in step.moves:
                self.runner.move(src, dst, seq.cached)
            live = [s for s in self.scheduler.running if s is not None]
            if not live:
                return
            self.runner.ensure_capacity(max(s.reserved for s in live), self.scheduler.max_row_tokens)
            if self.adapters.version != self.runner.tables_version:  # the server changes base weights only by
                self.runner.refresh_adapters(self.adapters.version)  # loading adapters (PiSSA/OLoRA residuals), so
                self.runner.refresh_weights()  # repacking is checked then, not by walking every layer each step
            decode = [s for s in step.decode if s.slot is not None]
            chunks = [(seq, start, n) for seq, start, n in step.chunks if seq.slot is not None]
            decoded, prefilled = self.runner.step(
                [Decode(s.slot, s.output[-1], s.cached, s.adapter) for s in decode],
                [Chunk(seq.slot, seq.prompt_ids[start:start + n], start, seq.adapter, start + n == len(seq.prompt_ids))
                 for seq, start, n in chunks])
            if decode:
                logits.append(decoded)
                rows += decode
                self._count([s.adapter for s in decode])
            for (seq, _, n), out in zip(chunks, prefilled):
                seq.computed += n
                if out is not None:  # the prompt's last chunk: its logits give the first output token
                    logits.append(out[None])
                    rows.append(seq)
        if rows:
            self._sample(rows, torch.cat(logits))

    def _sample(self, rows: list[Seq], logits: torch.Tensor) -> None:
        """Pick each row's next token, turn it into text, report it; finished rows leave the batch."""
        forbidden = [self.end_ids if s.sampling.ignore_eos or len(s.output) < s.sampling.min_tokens else set()
                     for s in rows]
        picked, chosen = pick_tokens(logits, [s.sampling for s in rows], [s.generator for s in rows],
                                     [s.history for s in rows], forbidden)
        now = time.monotonic()
        for seq, token, lp in zip(rows, picked, chosen):
            if seq.last_token_at is None:
                self.metrics.observe("lorakit_time_to_first_token_seconds", now - seq.arrival)
            else:
                self.metrics.observe("lorakit_time_per_output_token_seconds", now - seq.last_token_at)
            seq.last_token_at = now
            if token in self.end_ids and not seq.sampling.ignore_eos:
                seq.finish = "stop"
                delta = seq.text.finish()
            else:
                seq.output.append(token)
                seq.history[token] += 1
                self.metrics.inc("lorakit_generation_tokens_total")
                if lp is not None:
                    seq.logprobs.append(lp)
                delta, stopped = seq.text.add(token)
                if stopped:
                    seq.finish = "stop"
                elif len(seq.output) >= seq.sampling.max_new_tokens:
                    seq.finish = "length"
                    delta += seq.text.finish()
            if delta:
                seq.job.report(seq.index, "text", delta)
            if seq.finish is not None:
                self.scheduler.leave(seq)
                completion = Completion(seq.text.emitted_text, seq.output, seq.finish, len(seq.prompt_ids),
                                        seq.logprobs if seq.sampling.logprobs is not None else None)
                self._finished(seq.job, seq.index, completion, seq.adapter)

    # -- static --------------------------------------------------------------------------------------------------
    def _collect(self, first: Job) -> list[Job]:
        batch, rows = [first], len(first.rows)
        deadline = time.monotonic() + self.config.batch_wait_ms / 1000
        while rows < self.config.max_batch_size:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)
                break
            if isinstance(job, _Call):
                job.run()
                continue
            batch.append(job)
            rows += len(job.rows)
        return batch

    def _run_static(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            if isinstance(first, _Call):
                first.run()
                continue
            self._run_batch(self._collect(first))

    def _run_batch(self, jobs: list[Job]) -> None:
        with self.lock:
            loaded = set(self.loaded())
            live = []
            for job in jobs:
                gone = sorted({r.adapter for r in job.rows if r.adapter is not None} - loaded)
                if gone:
                    error = ServeError(404, f"Adapter(s) {gone} were unloaded before the request ran.",
                                       "model_not_found", "model")
                    for i, row in enumerate(job.rows):
                        self._failed(job, i, error, row.adapter)
                else:
                    live.append(job)
            slots = [(job, i) for job in live for i in range(len(job.rows))]  # batch row -> (job, row in job)
            if not slots:
                return
            self._static_rows = len(slots)
            first_token: set[int] = set()

            def on_text(b: int, text: str) -> None:
                job, i = slots[b]
                if b not in first_token:
                    first_token.add(b)
                    self.metrics.observe("lorakit_time_to_first_token_seconds", time.monotonic() - job.arrival)
                job.report(i, "text", text)

            started = time.monotonic()
            try:
                done = generate_rows(self.model, self.tokenizer, [job.rows[i] for job, i in slots], on_text=on_text)
            except Exception as e:  # report to every waiting client instead of killing the batcher
                error = ServeError(500, f"Generation failed: {type(e).__name__}: {e}", "generation_failed")
                for job, i in slots:
                    self._failed(job, i, error, job.rows[i].adapter)
                return
            finally:
                self._static_rows = 0
            steps = max(len(c.token_ids) for c in done) or 1
            for _ in range(steps):
                self._count([job.rows[i].adapter for job, i in slots])
            per_token = (time.monotonic() - started) / steps
        for (job, i), completion in zip(slots, done):
            self.metrics.inc("lorakit_generation_tokens_total", len(completion.token_ids))
            for _ in range(max(0, len(completion.token_ids) - 1)):
                self.metrics.observe("lorakit_time_per_output_token_seconds", per_token)
            self._finished(job, i, completion, job.rows[i].adapter)
