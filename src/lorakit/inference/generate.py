"""Text generation with one frozen base and any number of LoRA adapters: prompts, files of prompts, chat, streaming.

`generate_rows` is the one decoding loop (used by the CLI, the server and the benchmarks). Every row of a batch names
its own adapter (or None for the base) and its own sampling settings; each step is ONE forward pass over the whole
batch inside `lorakit.adapters_per_row`, with left padding, an attention mask and position ids counted from each
row's first real token, so a row decodes to the same tokens whether it runs alone or beside other adapters.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.injection import adapters_per_row, lora_layers

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass
class Sampling:
    """How one row picks its next tokens."""

    max_new_tokens: int = 64
    """Stop after this many new tokens (finish_reason "length")."""
    temperature: float = 0.0
    """0 means greedy decoding; above 0, sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = all)."""
    seed: int | None = None
    """Seed of this row's own random generator, so a sampled answer does not depend on its batch neighbours."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the answer (not included in it; finish_reason "stop")."""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            problems.append(f"temperature must be a number in [0, 100] (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            problems.append(f"stop must be non-empty strings, got {self.stop!r}")
        if problems:
            raise LorakitError("Invalid sampling settings:\n  - " + "\n  - ".join(problems))


@dataclass
class Row:
    """One generation request: prompt token ids, the adapter to use (None = base) and its sampling settings."""

    prompt_ids: list[int]
    adapter: str | None = None
    sampling: Sampling = field(default_factory=Sampling)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end token or stop string) or "length"
    prompt_tokens: int


# ---------------------------------------------------------------------------------------------------- prompts
def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer(prompt).input_ids)


def encode_chat(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template, ending with the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise LorakitError("This tokenizer has no chat template, so chat messages cannot be formatted; "
                           "send a plain prompt (completions) instead.")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line) or JSONL (per line: a string, or an object with a "prompt" string)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"Prompts file {path} does not exist.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for i, line in enumerate(lines, 1):
        item = json.loads(line)
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            item = item["prompt"]
        if not isinstance(item, str):
            raise LorakitError(f"{path}:{i}: expected a JSON string or an object with a string \"prompt\", "
                               f"got {line!r}.")
        prompts.append(item)
    return prompts


def resolve_adapter_dir(name_or_path: str, adapters_dir: str | os.PathLike | None) -> Path:
    """An adapter folder given by path, or by name under `adapters_dir` (names cannot escape that folder)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if adapters_dir is not None and ADAPTER_NAME.fullmatch(name_or_path):
        candidate = Path(adapters_dir) / name_or_path
        if candidate.is_dir():
            return candidate
    where = f" or a name of a folder in {adapters_dir}" if adapters_dir is not None else ""
    raise LorakitError(f"Adapter {name_or_path!r} not found: expected an adapter folder path{where}.")


# ---------------------------------------------------------------------------------------------------- decoding
def _routing(model: nn.Module, names: list[str | None]):
    """Per-row adapters; or, when an adapter is merged into the weights, plain forwards for rows that all ask for it."""
    merged = {n for _, layer in lora_layers(model) for n in getattr(layer, "merged_adapters", [])}
    if not merged:
        return adapters_per_row(model, names)
    if set(names) != merged:
        raise LorakitError(f"Adapter(s) {sorted(merged)} are merged into the weights, so every row must use it; "
                           f"got {sorted(set(names), key=str)}. Unmerge to mix adapters in a batch.")
    return contextlib.nullcontext()


def _end_token_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(source)
    return ids


def _pick_tokens(logits: torch.Tensor, samplings: list[Sampling], generators: list) -> list[int]:
    """Next token per row: argmax for greedy rows, else temperature / top-k / top-p sampling (row's own generator)."""
    picked = logits.argmax(-1).tolist()  # (B,)
    for i, s in enumerate(samplings):
        if s.temperature == 0:
            continue
        scores = logits[i] / s.temperature  # (V,)
        if s.top_k:
            kth = torch.topk(scores, min(s.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, -1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= s.top_p  # tokens after the nucleus is full
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        picked[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return picked


class _RowText:
    """Turns a row's growing token list into text deltas, holding back what may still become a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; return (new text safe to show, whether a stop string ended the row)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._emit(text[:cut]), True
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return "", False
        return self._emit(text[:len(text) - self.hold] if self.hold else text), False

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._emit(text.rstrip("\ufffd"))  # a character cut off by the length limit is dropped

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


def _cache_argument(model: nn.Module) -> str:
    """The name of the KV cache in the model's forward and output: `cache` in current transformers; older releases
    (and remote-code models written for them) call it `past_key_values`, which transformers now warns about."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate_rows(model: nn.Module, tokenizer, rows: Sequence[Row],
                  on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Decode all rows together: one forward pass per step over the whole batch, each row with its own adapter.

    `on_text(row_index, text)` receives each row's text as it grows (for streaming).
    """
    from transformers import DynamicCache

    rows = list(rows)
    if not rows:
        return []
    for i, row in enumerate(rows):
        if not row.prompt_ids:
            raise LorakitError(f"Row {i} has an empty prompt; give at least one token.")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    end_ids = _end_token_ids(model, tokenizer)
    width = max(len(r.prompt_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)  # (B, T), left padded
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids, device=device)
        mask[i, width - len(row.prompt_ids):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its own first real token
    generators = [torch.Generator().manual_seed(r.sampling.seed) if r.sampling.seed is not None else None
                  for r in rows]
    texts = [_RowText(tokenizer, r.sampling.stop) for r in rows]
    finish: list[str | None] = [None] * len(rows)
    cache = DynamicCache()
    cache_arg = _cache_argument(model)
    step_ids = input_ids
    with _routing(model, [r.adapter for r in rows]):
        for step in range(max(r.sampling.max_new_tokens for r in rows)):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **{cache_arg: cache})
            if out.get(cache_arg) is not None:
                cache = out[cache_arg]
            picked = _pick_tokens(out.logits[:, -1, :].float(), [r.sampling for r in rows], generators)  # (B,)
            for i, token in enumerate(picked):
                if finish[i] is not None:
                    continue
                if token in end_ids:
                    finish[i] = "stop"
                    continue
                delta, stopped = texts[i].add(token)
                if stopped:
                    finish[i] = "stop"
                elif len(texts[i].ids) >= rows[i].sampling.max_new_tokens:
                    finish[i] = "length"
                    delta += texts[i].finish()
                if delta and on_text is not None:
                    on_text(i, delta)
            if all(f is not None for f in finish):
                break
            step_ids = torch.tensor([[t if f is None else pad_id] for t, f in zip(picked, finish)], device=device)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)  # (B, T + step + 1)
            positions = positions[:, -1:] + 1
    return [Completion(t.emitted, t.ids, f or "length", len(r.prompt_ids)) for t, f, r in zip(texts, finish, rows)]


def generate(model: nn.Module, tokenizer, prompts: Sequence[str], adapters: Sequence[str | None] | str | None = None,
             sampling: Sampling | None = None, chat: bool = False,
             on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Generate for plain prompts (or, with `chat=True`, single user messages rendered with the chat template).

    `adapters` is one name for all rows, or one name (or None for the base) per prompt.
    """
    sampling = sampling or Sampling()
    if adapters is None or isinstance(adapters, str):
        adapters = [adapters] * len(prompts)
    if len(adapters) != len(prompts):
        raise LorakitError(f"Got {len(prompts)} prompts but {len(adapters)} adapter names; give one per prompt.")
    def encode(prompt: str) -> list[int]:
        if chat:
            return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
        return encode_prompt(tokenizer, prompt)

    rows = [Row(encode(p), a, sampling) for p, a in zip(prompts, adapters)]
    return generate_rows(model, tokenizer, rows, on_text)
