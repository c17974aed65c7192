"""Text generation with one frozen base and any number of LoRA adapters: prompts, files of prompts, chat, streaming.

`generate_rows` is the one decoding loop (used by the CLI, the server and the benchmarks). Every row of a batch names
its own adapter (or None for the base) and its own sampling settings; each step is ONE forward pass over the whole
batch inside `lorakit.adapters_per_row`, with left padding, an attention mask and position ids counted from each
row's first real token, so a row decodes to the same tokens whether it runs alone or beside other adapters.
"""

from __future__ import annotations

import contextlib
from collections import Counter
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.inference.sampling import RowText, Sampling, TokenLogprob, pick_tokens
from lorakit.lora.injection import adapters_per_row, merged_adapters
from lorakit.validation import ADAPTER_NAME


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
    logprobs: list[TokenLogprob] | None = None  # one per token, when the row's sampling asked for them


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
    merged = set(merged_adapters(model))
    if not merged:
        return adapters_per_row(model, names)
    if set(names) != merged:
        raise LorakitError(f"Adapter(s) {sorted(merged)} are merged into the weights, so every row must use it; "
                           f"got {sorted(set(names), key=str)}. Unmerge to mix adapters in a batch.")
    return contextlib.nullcontext()


def end_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """The token ids that end a completion: the model's generation-config `eos_token_id` (one id or a list) and the
    tokenizer's `eos_token_id`, whichever are set."""
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(source)
    return ids


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
    end_ids = end_token_ids(model, tokenizer)
    width = max(len(r.prompt_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)  # (B, T), left padded
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids, device=device)
        mask[i, width - len(row.prompt_ids):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its own first real token
    generators = [torch.Generator().manual_seed(r.sampling.seed) if r.sampling.seed is not None else None
                  for r in rows]
    samplings = [r.sampling for r in rows]
    texts = [RowText(tokenizer, s.stop) for s in samplings]
    histories = [Counter() for _ in rows]
    logprobs: list[list] = [[] for _ in rows]
    finish: list[str | None] = [None] * len(rows)
    cache = DynamicCache()
    cache_arg = _cache_argument(model)
    step_ids = input_ids
    with _routing(model, [r.adapter for r in rows]):
        for step in range(max(s.max_new_tokens for s in samplings)):
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1, **{cache_arg: cache})
            if out.get(cache_arg) is not None:
                cache = out[cache_arg]
            forbidden = [end_ids if s.ignore_eos or step < s.min_tokens else set() for s in samplings]
            picked, chosen = pick_tokens(out.logits[:, -1, :].float(), samplings, generators, histories, forbidden)
            for i, token in enumerate(picked):
                if finish[i] is not None:
                    continue
                if token in end_ids and not samplings[i].ignore_eos:
                    finish[i] = "stop"
                    continue
                histories[i][token] += 1
                if chosen[i] is not None:
                    logprobs[i].append(chosen[i])
                delta, stopped = texts[i].add(token)
                if stopped:
                    finish[i] = "stop"
                elif len(texts[i].ids) >= samplings[i].max_new_tokens:
                    finish[i] = "length"
                    delta += texts[i].finish()
                if delta and on_text is not None:
                    on_text(i, delta)
            if all(f is not None for f in finish):
                break
            step_ids = torch.tensor([[t if f is None else pad_id] for t, f in zip(picked, finish)], device=device)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)  # (B, T + step + 1)
            positions = positions[:, -1:] + 1
    return [Completion(t.emitted_text, t.ids, f or "length", len(r.prompt_ids),
                       lp if r.sampling.logprobs is not None else None)
            for t, f, r, lp in zip(texts, finish, rows, logprobs)]


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
