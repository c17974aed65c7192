"""Who runs each step: admission, the KV-cache slots, and the token budget of a step (continuous batching).

A request row waits in FIFO order until a KV-cache slot is free; then it is prefilled in fixed chunks of
`prefill_chunk` tokens and decodes one token per step until it finishes and leaves, freeing its slot for the next
row at the very next step. A step holds every decoding row (one token each) plus as many prompt chunks as fit in
`max_step_tokens`. Running rows always occupy the lowest slots: when a row leaves, the row in the highest slot moves
into the hole, so the decode batch reads one contiguous block of the cache.

This module decides; it touches no tensors. `lorakit.serve.engine` executes the plan it returns.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from lorakit.inference.sampling import RowText, Sampling


@dataclass
class Seq:
    """One row of a request and its progress."""

    prompt_ids: list[int]
    adapter: str | None
    sampling: Sampling
    job: Any  # the engine's Job this row reports to
    index: int  # the row's index in its job
    text: RowText
    generator: Any = None
    arrival: float = field(default_factory=time.monotonic)
    slot: int | None = None
    computed: int = 0  # prompt tokens already in the KV cache
    output: list[int] = field(default_factory=list)
    history: Counter = field(default_factory=Counter)
    logprobs: list = field(default_factory=list)
    finish: str | None = None
    last_token_at: float | None = None

    @property
    def reserved(self) -> int:
        """KV positions this row may need: its prompt plus every token it may generate."""
        return len(self.prompt_ids) + self.sampling.max_new_tokens

    @property
    def prefilled(self) -> bool:
        return self.computed == len(self.prompt_ids)

    @property
    def cached(self) -> int:
        """Positions in the KV cache; the newest output token is not there yet (it is the next input)."""
        return self.computed + max(0, len(self.output) - 1)


@dataclass
class Step:
    """What the engine runs now: one decode token for each of `decode`, then the prompt `chunks` (row, start, n)."""

    decode: list[Seq]
    chunks: list[tuple[Seq, int, int]]
    moves: list[tuple[int, int, Seq]]  # (from slot, to slot, row) to apply before anything else

    @property
    def tokens(self) -> int:
        return len(self.decode) + sum(n for _, _, n in self.chunks)


class Scheduler:
    def __init__(self, slots: int, max_step_tokens: int, prefill_chunk: int, max_row_tokens: int):
        self.slots, self.max_step_tokens, self.prefill_chunk = slots, max_step_tokens, prefill_chunk
        self.max_row_tokens = max_row_tokens  # longest prompt + max_tokens one slot holds
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq | None] = [None] * slots  # by slot
        self.moves: list[tuple[int, int, Seq]] = []

    # -- admission -----------------------------------------------------------------------------------------------
    def refusal(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a row of this size can never run (None: it fits once a slot is free)."""
        if prompt_tokens + max_tokens > self.max_row_tokens:
            return (f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}, but one row of this "
                    f"server's KV cache holds at most {self.max_row_tokens} tokens")
        return None

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running > 0

    # -- one step ------------------------------------------------------------------------------------------------
    def schedule(self) -> Step:
        """Admit waiting rows into free slots (FIFO), then fill the step's token budget."""
        while self.waiting and None in self.running:
            seq = self.waiting.popleft()
            seq.slot = self.running.index(None)
            self.running[seq.slot] = seq
        live = [s for s in self.running if s is not None]
        decode = [s for s in live if s.prefilled]
        budget = self.max_step_tokens - len(decode)
        chunks = []
        for seq in sorted((s for s in live if not s.prefilled), key=lambda s: s.arrival):
            n = min(self.prefill_chunk, len(seq.prompt_ids) - seq.computed)
            if n > budget:
                break  # FIFO: a later prompt does not overtake an earlier one
            chunks.append((seq, seq.computed, n))
            budget -= n
        moves, self.moves = self.moves, []
        return Step(decode, chunks, moves)

    def leave(self, seq: Seq) -> None:
        """Free a finished (or failed) row's slot; the row in the highest slot moves into it."""
        hole = seq.slot
        if hole is None or self.running[hole] is not seq:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return
        self.running[hole] = None
        seq.slot = None
        last = max((i for i, s in enumerate(self.running) if s is not None), default=-1)
        if last > hole:
            mover = self.running[last]
            self.running[hole], self.running[last] = mover, None
            mover.slot = hole
            self.moves.append((last, hole, mover))  # its cached length is read when the move runs: the row may
            # still take this step's token after this call
