"""Choosing each row's next token, and turning a row's tokens into text as they come.

Shared by both decoding loops (`generate_rows`, the static one, and the server's continuous engine), so a request
samples and detokenizes the same way whichever loop runs it.

torch is imported inside the functions that pick tokens, so the `Sampling` settings load without it (the CLI builds
its options from them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lorakit.errors import LorakitError

if TYPE_CHECKING:
    import torch


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
    frequency_penalty: float = 0.0
    """OpenAI's: subtract penalty × (times the token was generated so far) from its logit; in [-2, 2]."""
    presence_penalty: float = 0.0
    """OpenAI's: subtract penalty from the logit of every token generated so far; in [-2, 2]."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> bias in [-100, 100] added to its logit before choosing."""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the chosen token's log-probability and the k most likely tokens'."""
    ignore_eos: bool = False
    """Keep generating past end tokens (vLLM's field; for benchmarks with a fixed output length)."""
    min_tokens: int = 0
    """End tokens cannot end the answer before this many new tokens."""

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
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                problems.append(f"{name} must be a number in [-2, 2], got {value!r}")
        if not all(isinstance(k, int) and isinstance(v, (int, float)) and -100 <= v <= 100
                   for k, v in (self.logit_bias or {}).items()):
            problems.append(f"logit_bias maps token ids to numbers in [-100, 100], got {self.logit_bias!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):
            problems.append(f"logprobs must be None or an integer in 0..20, got {self.logprobs!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            problems.append(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            problems.append(f"stop must be non-empty strings, got {self.stop!r}")
        if problems:
            raise LorakitError("Invalid sampling settings:\n  - " + "\n  - ".join(problems))

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.logit_bias)


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives (token id -> log-probability)."""

    token: int
    logprob: float
    top: dict[int, float]


def adjust_logits(logits: torch.Tensor, sampling: Sampling, generated: Counter) -> torch.Tensor:
    """One row's logits (V,) after logit_bias and OpenAI's frequency/presence penalties."""
    import torch

    logits = logits.clone()
    for token, bias in sampling.logit_bias.items():
        if 0 <= token < logits.numel():
            logits[token] += bias
    if generated and (sampling.frequency_penalty or sampling.presence_penalty):
        ids = torch.tensor(list(generated), dtype=torch.long)
        counts = torch.tensor(list(generated.values()), dtype=logits.dtype)
        logits[ids] -= counts * sampling.frequency_penalty + sampling.presence_penalty
    return logits


def pick_tokens(logits: torch.Tensor, samplings: list[Sampling], generators: list,
                histories: list[Counter] | None = None, forbidden: list[set[int]] | None = None,
                ) -> tuple[list[int], list[TokenLogprob | None]]:
    """Next token per row of `logits` (B, V): argmax for greedy rows, else temperature / top-k / top-p sampling with
    the row's own generator; plus each row's log-probabilities when it asked for them.

    `histories[i]` counts row i's generated tokens (for the penalties); `forbidden[i]` are tokens it may not pick yet
    (end tokens under ignore_eos or min_tokens): they are excluded from the choice, not from the log-probabilities.
    """
    import torch

    if histories is not None and any(s.adjusts_logits for s in samplings):
        logits = torch.stack([adjust_logits(logits[i], s, histories[i]) if s.adjusts_logits else logits[i]
                              for i, s in enumerate(samplings)])
    reported = logits  # what log-probabilities are computed from
    if forbidden and any(forbidden):
        logits = logits.clone()
        for i, tokens in enumerate(forbidden):
            if tokens:
                logits[i, list(tokens)] = float("-inf")
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
    logprobs: list[TokenLogprob | None] = [None] * len(samplings)
    for i, s in enumerate(samplings):
        if s.logprobs is None:
            continue
        # Log-probabilities of the model's distribution after penalties and biases, before temperature (as vLLM).
        logp = torch.log_softmax(reported[i].float(), -1)  # (V,)
        top = torch.topk(logp, s.logprobs) if s.logprobs else None
        logprobs[i] = TokenLogprob(picked[i], float(logp[picked[i]]),
                                   dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {})
    return picked, logprobs


class RowText:
    """Turns a row's growing token list into text deltas, decoding only the newest tokens each step.

    The delta of a step is decode(ids[prefix:]) minus decode(ids[prefix:read]) (the offsets trail the end by the
    tokens already shown), so a step costs the same at token 5 and token 500. Text that may still become a stop
    string is held back; an incomplete multi-byte character waits for the next token.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (shown and held back)
        self.emitted = 0  # characters of self.text already returned
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; return (new text safe to show, whether a stop string ended the row)."""
        self.ids.append(token)
        now = self._decode(self.ids[self.prefix:])
        if now.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return "", False
        return self._absorb(now, self.hold)

    def finish(self) -> str:
        """The rest of the text at the end of the row (held-back characters; a cut-off character is dropped)."""
        delta, _ = self._absorb(self._decode(self.ids[self.prefix:]).rstrip("\ufffd"), 0)
        return delta

    def _absorb(self, now: str, hold: int) -> tuple[str, bool]:
        before = self._decode(self.ids[self.prefix:self.read])
        if len(now) <= len(before):  # nothing new to show yet (e.g. a token that decodes to nothing)
            return "", False
        start = max(0, len(self.text) - self.hold)  # a stop string may begin in the held-back tail
        self.text += now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        if self.stop:
            cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                return self._emit(len(self.text)), True
        return self._emit(len(self.text) - hold), False

    @property
    def emitted_text(self) -> str:
        return self.text[:self.emitted]

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted:upto], upto
        return delta
