"""An OpenAI-compatible HTTP server: one frozen base in memory, many LoRA adapters resident on it.

The request's `model` field picks an adapter (or the base). A micro-batcher collects requests that arrive within
`batch_wait_ms` of each other (up to `max_batch_size` rows) and decodes them together with
`lorakit.inference.generate.generate_rows`: one forward pass per step for the whole batch, each row through its own adapter.
Adapters are loaded and unloaded at runtime through token-protected admin endpoints; adapter names map only to
folders directly under the configured adapters directory.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lorakit.errors import LorakitError
from lorakit.inference.generate import ADAPTER_NAME, Row, Sampling, encode_chat, encode_prompt, generate_rows


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
    max_batch_size: int = 16
    """Most rows decoded together in one batch."""
    batch_wait_ms: float = 10.0
    """How long the batcher waits for more requests after the first one arrives."""
    max_tokens_limit: int = 512
    """Largest max_tokens a request may ask for."""
    dtype: str = "float32"
    """Base weights' dtype (float32 or bfloat16); LoRA weights stay fp32."""
    max_body_bytes: int = 1_000_000
    """Largest request body; a bigger one gets 413 (a POST without Content-Length gets 411)."""
    max_prompt_tokens: Optional[int] = None
    """Largest prompt in tokens (None: only the model's context limits it); a longer one gets 400."""
    max_adapter_mb: Optional[float] = None
    """Adapter cache: the resident adapters' weights stay under this many MB. A request for an adapter folder that
    is not loaded loads it, evicting the least recently used adapters that no request is using. None: no cache
    (only start-up and admin-loaded adapters are served; no eviction)."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            problems.append(f"port must be in 0..65535, got {self.port!r}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            problems.append(f"max_batch_size must be a positive integer, got {self.max_batch_size!r}")
        if not isinstance(self.batch_wait_ms, (int, float)) or not 0 <= self.batch_wait_ms <= 10_000:
            problems.append(f"batch_wait_ms must be in [0, 10000], got {self.batch_wait_ms!r}")
        if not isinstance(self.max_tokens_limit, int) or self.max_tokens_limit < 1:
            problems.append(f"max_tokens_limit must be a positive integer, got {self.max_tokens_limit!r}")
        if self.dtype not in ("float32", "bfloat16"):
            problems.append(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            problems.append(f"max_body_bytes must be a positive integer, got {self.max_body_bytes!r}")
        if self.max_prompt_tokens is not None and (not isinstance(self.max_prompt_tokens, int)
                                                   or self.max_prompt_tokens < 1):
            problems.append(f"max_prompt_tokens must be a positive integer or None, got {self.max_prompt_tokens!r}")
        if self.max_adapter_mb is not None and (not isinstance(self.max_adapter_mb, (int, float))
                                                or not self.max_adapter_mb > 0):
            problems.append(f"max_adapter_mb must be a positive number or None, got {self.max_adapter_mb!r}")
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


# ---------------------------------------------------------------------------------------------------- engine
class Job:
    """Rows of one HTTP request; the batcher thread reports (row, kind, payload) events to its asyncio queue."""

    def __init__(self, rows: list[Row], loop: asyncio.AbstractEventLoop):
        self.rows, self.loop = rows, loop
        self.events: asyncio.Queue = asyncio.Queue()

    def report(self, row: int, kind: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (row, kind, payload))


class Engine:
    """The model, its resident adapters and the micro-batcher thread. All model access holds `self.lock`."""

    def __init__(self, model: nn.Module, tokenizer, config: ServeConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.adapters_dir = Path(config.adapters_dir).resolve()
        self.base_name = config.base_name or Path(config.model.rstrip("/")).name
        self.context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.lock = threading.Lock()
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "mixed_adapter_batches": 0, "evictions": 0}
        self.cache_lock = threading.Lock()  # taken after self.lock when both are held
        self.in_use: dict[str, int] = {}  # adapter -> requests submitted and not finished
        self.last_used: dict[str, int] = {}  # adapter -> tick of its latest request (LRU order)
        self.sizes: dict[str, int] = {}  # adapter -> bytes of its weights
        self.ticks = itertools.count()
        self.worker = threading.Thread(target=self._run, name="lorakit-batcher", daemon=True)
        self.worker.start()

    # -- adapters ------------------------------------------------------------------------------------------------
    def adapter_folder(self, name: str) -> Path:
        """The folder for an adapter name; anything but a plain name inside adapters_dir is a 400."""
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise ServeError(400, f"Invalid adapter name {name!r}: use letters, digits, '_' and '-' only (a folder "
                                  f"directly inside the adapters directory).", "invalid_adapter_name", "name")
        folder = (self.adapters_dir / name).resolve()
        if folder.parent != self.adapters_dir:  # e.g. a symlink pointing elsewhere
            raise ServeError(400, f"Adapter {name!r} resolves outside the adapters directory.", "invalid_adapter_name",
                             "name")
        return folder

    def loaded(self) -> list[str]:
        from lorakit.lora.injection import adapter_names

        return adapter_names(self.model)

    def available(self) -> list[str]:
        if not self.adapters_dir.is_dir():
            return []
        return sorted(p.name for p in self.adapters_dir.iterdir()
                      if p.is_dir() and ADAPTER_NAME.fullmatch(p.name) and (p / "adapter_config.json").is_file())

    def load(self, name: str) -> None:
        from lorakit.lora.adapter_io import load_adapter

        folder = self.adapter_folder(name)
        if name in self.loaded():
            raise ServeError(409, f"Adapter {name!r} is already loaded.", "adapter_already_loaded", "name")
        if not (folder / "adapter_config.json").is_file():
            raise ServeError(404, f"No adapter folder {name!r} in the adapters directory; available: "
                                  f"{self.available()}.", "adapter_not_found", "name")
        with self.lock:
            self._load_locked(name, folder)

    def _load_locked(self, name: str, folder: Path) -> None:
        """Load under self.lock, first evicting least recently used idle adapters if the cache limit needs it."""
        from lorakit.lora.adapter_io import WEIGHTS_FILE, adapter_state_dict, load_adapter

        if self.config.max_adapter_mb is not None:
            self._make_room((folder / WEIGHTS_FILE).stat().st_size, name)
        try:
            load_adapter(self.model, folder, adapter=name)
        except LorakitError as e:
            raise ServeError(400, str(e), "adapter_load_failed", "name") from None
        with self.cache_lock:
            self.sizes[name] = sum(t.numel() * t.element_size() for t in adapter_state_dict(self.model, name).values())
            self.last_used[name] = next(self.ticks)

    def _make_room(self, incoming: int, name: str) -> None:
        from lorakit.lora.injection import delete_adapter

        limit = int(self.config.max_adapter_mb * 1e6)
        if incoming > limit:
            raise ServeError(400, f"Adapter {name!r} needs {incoming / 1e6:.1f} MB, more than the server's whole adapter "
                                  f"cache ({self.config.max_adapter_mb} MB).", "adapter_too_large", "model")
        with self.cache_lock:
            while sum(self.sizes.values()) + incoming > limit:
                idle = [a for a in self.sizes if not self.in_use.get(a)]
                if not idle:
                    raise ServeError(503, f"The adapter cache ({self.config.max_adapter_mb} MB) is full of adapters "
                                          f"in use ({sorted(self.sizes)}); retry shortly.", "adapter_cache_full")
                victim = min(idle, key=lambda a: self.last_used.get(a, -1))
                delete_adapter(self.model, victim)
                self._forget(victim)
                self.stats["evictions"] += 1

    def _forget(self, name: str) -> None:
        for table in (self.sizes, self.last_used, self.in_use):
            table.pop(name, None)

    def unload(self, name: str) -> None:
        from lorakit.lora.injection import delete_adapter

        self.adapter_folder(name)
        with self.lock:
            if name not in self.loaded():
                raise ServeError(404, f"Adapter {name!r} is not loaded; loaded: {self.loaded()}.", "adapter_not_found",
                                 "name")
            delete_adapter(self.model, name)
            with self.cache_lock:
                self._forget(name)

    def acquire(self, model_id: str) -> str | None:
        """resolve_model, plus the cache: mark the adapter used (it cannot be evicted until `release`), and with
        max_adapter_mb set, load an available adapter folder on demand."""
        adapter = self.resolve_model(model_id, on_demand=self.config.max_adapter_mb is not None)
        if adapter is None:
            return None
        with self.cache_lock:  # fast path, not waiting for a running batch: evictions also take cache_lock
            if adapter in self.sizes:
                self.in_use[adapter] = self.in_use.get(adapter, 0) + 1
                self.last_used[adapter] = next(self.ticks)
                return adapter
        with self.lock:  # loads and evictions happen under self.lock, so the adapter stays between check and mark
            if adapter not in self.loaded():
                self._load_locked(adapter, self.adapter_folder(adapter))
            with self.cache_lock:
                self.in_use[adapter] = self.in_use.get(adapter, 0) + 1
                self.last_used[adapter] = next(self.ticks)
        return adapter

    def release(self, adapters: list[str | None]) -> None:
        with self.cache_lock:
            for a in adapters:
                if a is not None and self.in_use.get(a):
                    self.in_use[a] -= 1

    def resolve_model(self, model_id: str, on_demand: bool = False) -> str | None:
        """The adapter a request's `model` field selects (None = base); 400 for invalid names, 404 for unknown
        (with `on_demand`, an adapter folder that exists but is not loaded is accepted)."""
        if model_id == self.base_name:
            return None
        folder = self.adapter_folder(model_id)
        if on_demand and (folder / "adapter_config.json").is_file():
            return model_id
        if model_id not in self.loaded():
            raise ServeError(404, f"The model {model_id!r} does not exist: loaded adapters are {self.loaded()} and "
                                  f"the base is {self.base_name!r}.", "model_not_found", "model")
        return model_id

    # -- batching ------------------------------------------------------------------------------------------------
    def check_length(self, prompt_ids: list[int], max_tokens: int) -> None:
        if len(prompt_ids) + max_tokens > self.context:
            raise ServeError(400, f"This model's context is {self.context} tokens, but the prompt has "
                                  f"{len(prompt_ids)} tokens and max_tokens is {max_tokens}; shorten the prompt or "
                                  "lower max_tokens.", "context_length_exceeded", "prompt")

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)

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
            batch.append(job)
            rows += len(job.rows)
        return batch

    def _run(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            self._run_batch(self._collect(first))

    def _run_batch(self, jobs: list[Job]) -> None:
        finished = []
        try:
            finished = self._decode(jobs)
        finally:  # released before the answers go out, so a client that has its answer sees the adapter idle
            self.release([r.adapter for job in jobs for r in job.rows])
        for job, i, completion in finished:
            job.report(i, "done", completion)

    def _decode(self, jobs: list[Job]) -> list[tuple[Job, int, Any]]:
        """Generate under the model lock; returns (job, row, completion) for every row decoded."""
        with self.lock:
            loaded = set(self.loaded())
            live = []
            for job in jobs:
                gone = sorted({r.adapter for r in job.rows if r.adapter is not None} - loaded)
                if gone:
                    job.report(0, "error", ServeError(404, f"Adapter(s) {gone} were unloaded before the request ran.",
                                                      "model_not_found", "model"))
                else:
                    live.append(job)
            slots = [(job, i) for job in live for i in range(len(job.rows))]  # batch row -> (job, row in job)
            if not slots:
                return []
            try:
                done = generate_rows(self.model, self.tokenizer, [job.rows[i] for job, i in slots],
                                     on_text=lambda b, text: slots[b][0].report(slots[b][1], "text", text))
            except Exception as e:  # report to every waiting client instead of killing the batcher
                for job in live:
                    job.report(0, "error", ServeError(500, f"Generation failed: {e}", "generation_failed"))
                return []
            self._count([job.rows[i].adapter for job, i in slots])
        return [(job, i, completion) for (job, i), completion in zip(slots, done)]

    def _count(self, adapters: list[str | None]) -> None:
        self.stats["batches"] += 1
        self.stats["rows"] += len(adapters)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(adapters))
        self.stats["mixed_adapter_batches"] += len(set(adapters)) > 1


# ---------------------------------------------------------------------------------------------------- HTTP API
class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict[str, bool]] = None
    n: int = Field(1, ge=1, le=1, description="only one choice per prompt is supported")
    user: Optional[str] = None


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


def create_app(engine: Engine):
    """The FastAPI application serving `engine`."""
    app = FastAPI(title="lorakit", version="1")

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        """Refuse over-large bodies from the Content-Length header, before any of the body is read."""
        length = request.headers.get("content-length")
        limit = engine.config.max_body_bytes
        if request.method in ("POST", "PUT", "PATCH") and length is None:
            error = ServeError(411, "Send the request body with a Content-Length header.", "length_required")
        elif length is not None and (not length.isdigit() or int(length) > limit):
            error = ServeError(413, f"The request body has {length} bytes; this server accepts at most {limit}.",
                               "request_too_large")
        else:
            return await call_next(request)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return JSONResponse(exc.body(), status_code=exc.status,
                            headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()]
        first = exc.errors()[0]["loc"][1:] if exc.errors() else ()
        error = ServeError(422, "Invalid request: " + "; ".join(problems), "invalid_request",
                           ".".join(str(p) for p in first) or None)
        return JSONResponse(error.body(), status_code=422)

    def check_admin(request: Request) -> None:
        token = engine.config.admin_token
        if token is None:
            raise ServeError(403, "Admin endpoints are disabled: start the server with an admin token "
                                  "(--admin-token or LORAKIT_ADMIN_TOKEN).", "admin_disabled")
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ServeError(401, "Admin endpoints need the header 'Authorization: Bearer <admin token>'.",
                             "invalid_admin_token")

    def sampling(body) -> Sampling:
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or 16
        if max_tokens > engine.config.max_tokens_limit:
            raise ServeError(400, f"max_tokens is {max_tokens}; this server allows at most "
                                  f"{engine.config.max_tokens_limit}.", "max_tokens_too_large", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or not all(stop):
            raise ServeError(400, "stop takes up to 4 non-empty strings.", "invalid_stop", "stop")
        return Sampling(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                        stop=stop)

    async def run(body, prompts: list[list[int]], chat: bool):
        params = sampling(body)
        limit = engine.config.max_prompt_tokens
        for ids in prompts:
            if limit is not None and len(ids) > limit:
                raise ServeError(400, f"The prompt has {len(ids)} tokens; this server allows at most {limit}.",
                                 "prompt_too_long", "prompt")
            engine.check_length(ids, params.max_new_tokens)
        adapter = await asyncio.to_thread(engine.acquire, body.model)  # may load it (adapter cache)
        job = Job([Row(ids, adapter, params) for ids in prompts], asyncio.get_running_loop())
        engine.submit(job)  # from here the batcher owns the job and releases its adapter when it is done
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(job, body.model, ident, chat, include_usage),
                                     media_type="text/event-stream")
        results: dict[int, Any] = {}
        while len(results) < len(prompts):
            row, kind, payload = await job.events.get()
            if kind == "error":
                raise payload
            if kind == "done":
                results[row] = payload
        return _response(body.model, ident, chat, [results[i] for i in range(len(prompts))])

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        ids = [engine.base_name] + engine.loaded()
        return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": "lorakit"}
                                           for i in ids]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) > engine.config.max_batch_size:
            raise ServeError(400, f"prompt must be a string or a list of 1..{engine.config.max_batch_size} strings.",
                             "invalid_prompt", "prompt")
        return await run(body, [encode_prompt(engine.tokenizer, p) for p in prompts], chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        try:
            ids = encode_chat(engine.tokenizer, [m.model_dump() for m in body.messages])
        except LorakitError as e:
            raise ServeError(400, str(e), "no_chat_template", "messages") from None
        return await run(body, [ids], chat=True)

    @app.get("/health")
    async def health():
        return {"status": "ok", "base": engine.base_name, "adapters": engine.loaded(), **engine.stats}

    @app.get("/admin/adapters")
    async def admin_list(request: Request):
        check_admin(request)
        return {"loaded": engine.loaded(), "available": engine.available()}

    @app.post("/admin/adapters")
    async def admin_load(body: LoadRequest, request: Request):
        check_admin(request)
        await asyncio.to_thread(engine.load, body.name)
        return {"loaded": engine.loaded()}

    @app.delete("/admin/adapters/{name:path}")
    async def admin_unload(name: str, request: Request):
        check_admin(request)
        await asyncio.to_thread(engine.unload, name)
        return {"loaded": engine.loaded()}

    return app


async def _stream(job: Job, model: str, ident: str, chat: bool, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    created = int(time.time())
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": ident, "object": kind_name, "created": created, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def choice(row: int, text: str | None, finish: str | None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": row, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": row, "text": text or "", "finish_reason": finish, "logprobs": None}

    if chat:
        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                      "logprobs": None}])
    pending, usage = len(job.rows), {"prompt_tokens": 0, "completion_tokens": 0}
    while pending:
        row, kind, payload = await job.events.get()
        if kind == "error":
            yield f"data: {json.dumps(payload.body())}\n\n"
            return
        if kind == "text":
            yield chunk([choice(row, payload, None)])
        else:
            pending -= 1
            usage["prompt_tokens"] += payload.prompt_tokens
            usage["completion_tokens"] += len(payload.token_ids)
            yield chunk([choice(row, None, payload.finish_reason)])
    if include_usage:
        yield chunk([], {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]})
    yield "data: [DONE]\n\n"


def _response(model: str, ident: str, chat: bool, results: list) -> dict[str, Any]:
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(len(r.token_ids) for r in results)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                    "logprobs": None} for i, r in enumerate(results)]
    else:
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                   for i, r in enumerate(results)]
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


# ---------------------------------------------------------------------------------------------------- start-up
def build_engine(config: ServeConfig) -> Engine:
    """Load the base (frozen, eval mode) and the start-up adapters, and start the batcher."""
    from lorakit.models.loading import load_model

    model, tokenizer = load_model(config.model, dtype=config.dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    engine = Engine(model, tokenizer, config)
    for name in engine.available() if config.adapters is None else config.adapters:
        try:
            engine.load(name)
        except ServeError as e:
            raise LorakitError(f"Cannot load start-up adapter {name!r}: {e.message}") from None
    return engine


def serve(config: ServeConfig) -> None:
    """Run the server until interrupted."""
    import uvicorn

    engine = build_engine(config)
    print(f"lorakit: serving base {engine.base_name!r} with adapters {engine.loaded()} on "
          f"http://{config.host}:{config.port}/v1", flush=True)
    try:
        uvicorn.run(create_app(engine), host=config.host, port=config.port, log_level="info")
    finally:
        engine.close()
