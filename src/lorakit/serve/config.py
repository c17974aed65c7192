"""Settings of `lorakit serve` and the error type the server answers with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from lorakit.errors import LorakitError
from lorakit.validation import ADAPTER_NAME


@dataclass
class ServeConfig:
    """Settings of `lorakit serve`."""

    model: str = "smollm2-135m"
    """Base model: embedded name, local model folder or hub id."""
    adapters_dir: str = "adapters"
    """The only place adapters are loaded from: a request's adapter name is a folder directly inside it."""
    adapters: Optional[list[str]] = None
    """Adapter names to load at start; None loads every adapter folder in adapters_dir."""
    base_name: Optional[str] = None
    """The `model` id that selects the bare base; default: the last part of `model`."""
    host: str = "127.0.0.1"
    """Interface to listen on (127.0.0.1 keeps the server local)."""
    port: int = 8000
    """TCP port."""
    admin_token: Optional[str] = None
    """Bearer token for /admin endpoints; without one the admin endpoints are disabled."""
    scheduler: str = "continuous"
    """continuous: every step, finished rows leave and waiting requests join (iteration-level batching); static:
    batch the requests that arrive within batch_wait_ms and decode that batch to its end (the earlier batcher)."""
    max_batch_size: int = 16
    """Most rows decoded together in one step (continuous: KV-cache slots; static: rows per batch)."""
    max_step_tokens: int = 512
    """Continuous: token budget of one step, decode rows (one token each) plus prompt chunks being prefilled."""
    prefill_chunk: int = 256
    """Continuous: prompts are prefilled in chunks of this many tokens (fixed, so a row computes the same numbers
    whatever runs beside it)."""
    kv_cache_mb: Optional[float] = None
    """Continuous: KV-cache budget. Each of the max_batch_size slots holds one row's prompt + max_tokens, so a row
    may be at most kv_cache_mb / max_batch_size long (a longer request gets 400). None: up to the model's context."""
    batch_wait_ms: float = 10.0
    """Static: how long the batcher waits for more requests after the first one arrives."""
    max_tokens_limit: int = 512
    """Largest max_tokens a request may ask for."""
    dtype: str = "float32"
    """Base weights' dtype: float32 (default: the numbers training and evaluation compute), bfloat16, or auto
    (bfloat16 where this CPU/GPU multiplies bf16 at least 1.3x faster than fp32, measured at start-up, as
    lorakit.hardware.auto_base_dtype decides for training; else float32). A bf16 base halves the weights' memory
    and, on CPUs with AVX512-BF16 or AMX, speeds decoding up (~1.4x on a 2-core AVX512-BF16 EPYC); its outputs
    differ from the fp32 base's by bf16 rounding. The continuous scheduler then runs the LoRA deltas in bf16 too (as
    vLLM does), so on such CPUs a row's logits are bit for bit the same whatever rows are decoded beside it; the
    static scheduler keeps the adapters' fp32 LoRA math and its rows can change with their batch."""
    pack_weights: bool = True
    """Continuous scheduler on a CPU: run the frozen base linears from oneDNN-packed copies of their weights
    (q|k|v and gate|up fused), ~1.4x faster batch-1 decode steps; costs one more copy of those weights
    (SmolLM2-135M: +538 MB fp32, +269 MB bf16). Ignored where oneDNN cannot pack (GPUs, quantized bases)."""
    native_attention: bool = True
    """Continuous scheduler on a CPU: decode rows attend through lorakit's C++ kernel (`lorakit.serve.native`,
    compiled on first use, ~10 s), each row over exactly its own cached length: ~3x faster than SDPA over the
    batch's longest row at 96 rows. Falls back to SDPA where it cannot be built (no C++ compiler) or run (GPUs)."""
    max_body_bytes: int = 1_000_000
    """Largest request body; a bigger one gets 413 (a POST without Content-Length gets 411)."""
    max_prompt_tokens: Optional[int] = None
    """Largest prompt in tokens (None: only the model's context limits it); a longer one gets 400."""
    max_adapter_mb: Optional[float] = None
    """Adapter cache: the resident adapters' weights stay under this many MB. A request for an adapter folder that
    is not loaded loads it, evicting the least recently used adapters that no request is using. None: no cache
    (only start-up and admin-loaded adapters are served; no eviction)."""
    adapter_wait_s: float = 30.0
    """A request for an adapter that is not resident while every resident one is in use waits this long for one to
    go idle (then 503 adapter_cache_full)."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            problems.append(f"port must be in 0..65535, got {self.port!r}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            problems.append(f"max_batch_size must be a positive integer, got {self.max_batch_size!r}")
        if self.scheduler not in ("continuous", "static"):
            problems.append(f"scheduler must be 'continuous' or 'static', got {self.scheduler!r}")
        if not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1:
            problems.append(f"prefill_chunk must be a positive integer, got {self.prefill_chunk!r}")
        elif not isinstance(self.max_step_tokens, int) or self.max_step_tokens < self.max_batch_size + self.prefill_chunk:
            problems.append(f"max_step_tokens must be at least max_batch_size + prefill_chunk "
                            f"({self.max_batch_size} + {self.prefill_chunk}) so a prompt chunk always fits beside a "
                            f"full batch of decode rows, got {self.max_step_tokens!r}")
        if self.kv_cache_mb is not None and (not isinstance(self.kv_cache_mb, (int, float)) or not self.kv_cache_mb > 0):
            problems.append(f"kv_cache_mb must be a positive number or None, got {self.kv_cache_mb!r}")
        if not isinstance(self.batch_wait_ms, (int, float)) or not 0 <= self.batch_wait_ms <= 10_000:
            problems.append(f"batch_wait_ms must be in [0, 10000], got {self.batch_wait_ms!r}")
        if not isinstance(self.max_tokens_limit, int) or self.max_tokens_limit < 1:
            problems.append(f"max_tokens_limit must be a positive integer, got {self.max_tokens_limit!r}")
        if self.dtype not in ("float32", "bfloat16", "auto"):
            problems.append(f"dtype must be float32, bfloat16 or auto, got {self.dtype!r}")
        if not isinstance(self.pack_weights, bool):
            problems.append(f"pack_weights must be true or false, got {self.pack_weights!r}")
        if not isinstance(self.native_attention, bool):
            problems.append(f"native_attention must be true or false, got {self.native_attention!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            problems.append(f"max_body_bytes must be a positive integer, got {self.max_body_bytes!r}")
        if self.max_prompt_tokens is not None and (not isinstance(self.max_prompt_tokens, int)
                                                   or self.max_prompt_tokens < 1):
            problems.append(f"max_prompt_tokens must be a positive integer or None, got {self.max_prompt_tokens!r}")
        if self.max_adapter_mb is not None and (not isinstance(self.max_adapter_mb, (int, float))
                                                or not self.max_adapter_mb > 0):
            problems.append(f"max_adapter_mb must be a positive number or None, got {self.max_adapter_mb!r}")
        if not isinstance(self.adapter_wait_s, (int, float)) or not 0 <= self.adapter_wait_s <= 3600:
            problems.append(f"adapter_wait_s must be in [0, 3600], got {self.adapter_wait_s!r}")
        if self.admin_token is not None and len(self.admin_token) < 8:
            problems.append("admin_token must be at least 8 characters")
        for name in self.adapters or []:
            if not ADAPTER_NAME.fullmatch(name):
                problems.append(f"adapter name {name!r} is not a plain folder name ({ADAPTER_NAME.pattern})")
        if problems:
            raise LorakitError("Invalid serve settings:\n  - " + "\n  - ".join(problems))


class ServeError(Exception):
    """An error answered to the client as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
