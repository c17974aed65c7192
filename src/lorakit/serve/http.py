"""The HTTP face of the server (FastAPI): OpenAI-compatible /v1 endpoints, admin endpoints, /health and /metrics.

Only translation lives here: a request body becomes rows (prompt ids, adapter, `Sampling`) submitted to the engine,
and the engine's events become OpenAI's JSON or server-sent events. Fields that real clients send are accepted;
a field the server cannot honour is a 400 that names it, never silently ignored.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lorakit.errors import LorakitError
from lorakit.inference.generate import Completion, Row, encode_chat, encode_prompt
from lorakit.inference.sampling import Sampling
from lorakit.serve.config import ServeError
from lorakit.serve.engine import Engine, Job


class _Common(BaseModel):
    """Fields of both endpoints: OpenAI's, plus vLLM's top_k, min_tokens and ignore_eos."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: Optional[int] = Field(None, ge=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    top_k: Optional[int] = Field(None, ge=-1)
    min_tokens: Optional[int] = Field(None, ge=0)
    ignore_eos: Optional[bool] = None


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: Optional[bool] = None
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Union[str, dict[str, Any]]] = None
    modalities: Optional[list[str]] = None
    audio: Optional[dict[str, Any]] = None
    prediction: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[str] = None
    web_search_options: Optional[dict[str, Any]] = None


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


def _unsupported(body: _Common) -> None:
    """400 naming the first field asking for something this server does not do."""
    if body.model_extra:
        known = sorted(type(body).model_fields)
        raise ServeError(400, f"Unknown field(s) {sorted(body.model_extra)}; this endpoint accepts {known}.",
                         "unsupported_field", sorted(body.model_extra)[0])
    refuse = {  # field: (asked for something unsupported?, what to do instead)
        "suffix": (getattr(body, "suffix", None), "insertion (suffix) is not supported; send the prompt only"),
        "best_of": (getattr(body, "best_of", None) not in (None, body.n or 1), "best_of must equal n (or be left out)"),
        "tools": (getattr(body, "tools", None), "tool calling is not supported"),
        "functions": (getattr(body, "functions", None), "function calling is not supported"),
        "function_call": (getattr(body, "function_call", None) not in (None, "none"),
                          "function calling is not supported"),
        "tool_choice": (getattr(body, "tool_choice", None) not in (None, "none", "auto"),
                        "tool calling is not supported"),
        "audio": (getattr(body, "audio", None), "audio output is not supported"),
        "modalities": (getattr(body, "modalities", None) not in (None, ["text"]), "only text output is supported"),
        "prediction": (getattr(body, "prediction", None), "predicted outputs are not supported"),
        "reasoning_effort": (getattr(body, "reasoning_effort", None), "this model has no reasoning mode"),
        "web_search_options": (getattr(body, "web_search_options", None), "web search is not supported"),
        "response_format": ((getattr(body, "response_format", None) or {"type": "text"}).get("type") != "text",
                            "only response_format {\"type\": \"text\"} is supported (no JSON mode)"),
    }
    for field, (asked, why) in refuse.items():
        if asked:
            raise ServeError(400, f"Unsupported {field}: {why}.", "unsupported_field", field)
    if getattr(body, "echo", None) and body.logprobs is not None:
        raise ServeError(400, "echo with logprobs would need the prompt's log-probabilities, which this server does "
                              "not compute; drop one of them.", "unsupported_field", "echo")


def _message_text(message: Message) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ServeError(400, f"Unsupported content part of type {part.get('type')!r}: only text parts are "
                                  "supported.", "unsupported_content", "messages")
        parts.append(part["text"])
    return "".join(parts)


def create_app(engine: Engine):
    """The FastAPI application serving `engine`."""
    app = FastAPI(title="lorakit", version="1")
    config, adapters = engine.config, engine.adapters

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        """Refuse over-large bodies from the Content-Length header, before any of the body is read."""
        length = request.headers.get("content-length")
        limit = config.max_body_bytes
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
        token = config.admin_token
        if token is None:
            raise ServeError(403, "Admin endpoints are disabled: start the server with an admin token "
                                  "(--admin-token or LORAKIT_ADMIN_TOKEN).", "admin_disabled")
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ServeError(401, "Admin endpoints need the header 'Authorization: Bearer <admin token>'.",
                             "invalid_admin_token")

    def sampling(body, choice: int) -> Sampling:
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or 16
        if max_tokens > config.max_tokens_limit:
            raise ServeError(400, f"max_tokens is {max_tokens}; this server allows at most "
                                  f"{config.max_tokens_limit}.", "max_tokens_too_large", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or not all(stop):
            raise ServeError(400, "stop takes up to 4 non-empty strings.", "invalid_stop", "stop")
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= len(engine.tokenizer) or not -100 <= value <= 100:
                raise ServeError(400, f"logit_bias maps token ids (0..{len(engine.tokenizer) - 1}) to numbers in "
                                      f"[-100, 100]; got {key!r}: {value!r}.", "invalid_logit_bias", "logit_bias")
            bias[int(key)] = value
        logprobs = body.logprobs
        if isinstance(body, ChatRequest):
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            if body.top_logprobs and not body.logprobs:
                raise ServeError(400, "top_logprobs needs logprobs: true.", "invalid_logprobs", "top_logprobs")
        try:
            return Sampling(max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                            top_p=body.top_p or 1.0, top_k=max(0, body.top_k or 0),
                            seed=None if body.seed is None else body.seed + choice, stop=stop,
                            frequency_penalty=body.frequency_penalty or 0.0,
                            presence_penalty=body.presence_penalty or 0.0, logit_bias=bias, logprobs=logprobs,
                            ignore_eos=bool(body.ignore_eos), min_tokens=body.min_tokens or 0)
        except LorakitError as e:
            raise ServeError(400, str(e), "invalid_sampling") from None

    async def run(body, prompts: list[list[int]], chat: bool, echo: list[str] | None = None):
        _unsupported(body)
        n = body.n or 1
        if len(prompts) * n > config.max_batch_size:
            raise ServeError(400, f"{len(prompts)} prompt(s) × n={n} choices is more than this server's "
                                  f"max_batch_size ({config.max_batch_size}); send fewer per request.",
                             "too_many_choices", "n")
        params = [sampling(body, j) for j in range(n)]
        limit = config.max_prompt_tokens
        for ids in prompts:
            if not ids:
                raise ServeError(400, "The prompt is empty; give at least one token.", "invalid_prompt", "prompt")
            if limit is not None and len(ids) > limit:
                raise ServeError(400, f"The prompt has {len(ids)} tokens; this server allows at most {limit}.",
                                 "prompt_too_long", "prompt")
            if any(not 0 <= t < len(engine.tokenizer) for t in ids):
                raise ServeError(400, f"Prompt token ids must be in 0..{len(engine.tokenizer) - 1}.",
                                 "invalid_prompt", "prompt")
            engine.check_length(ids, params[0].max_new_tokens)
        rows = [Row(ids, None, p) for ids in prompts for p in params]  # choice index = prompt · n + j
        adapter = await asyncio.to_thread(adapters.acquire, body.model, len(rows))  # may load it (adapter cache)
        for row in rows:
            row.adapter = adapter
        job = Job(rows, asyncio.get_running_loop())
        engine.submit(job)  # from here the engine owns the job and releases the adapter row by row
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        prompt_tokens = sum(len(ids) for ids in prompts)
        echo_text = [e for e in (echo or []) for _ in range(n)] if echo else None
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(engine, job, body.model, ident, chat, include_usage, prompt_tokens,
                                             echo_text), media_type="text/event-stream")
        results: dict[int, Completion] = {}
        try:
            while len(results) < len(rows):
                row, kind, payload = await job.events.get()
                if kind == "error":
                    raise payload
                if kind == "done":
                    results[row] = payload
        finally:
            job.cancelled = True  # a no-op when every row is done; frees the rows of a failed or abandoned request
        return _response(engine, body.model, ident, chat, [results[i] for i in range(len(rows))], prompt_tokens,
                         echo_text)

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        ids = [engine.base_name] + engine.loaded()
        return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": "lorakit"}
                                           for i in ids]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            prompts = [prompt]  # one prompt of token ids
        else:
            prompts = list(prompt)
        if not prompts or len(prompts) > config.max_batch_size:
            raise ServeError(400, f"prompt must be a string or a list of 1..{config.max_batch_size} strings (or "
                                  "token-id lists).", "invalid_prompt", "prompt")
        ids = [encode_prompt(engine.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
        echo = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts] if body.echo else None
        return await run(body, ids, chat=False, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)}
                    for m in body.messages]
        try:
            ids = encode_chat(engine.tokenizer, messages)
        except LorakitError as e:
            raise ServeError(400, str(e), "no_chat_template", "messages") from None
        return await run(body, [ids], chat=True)

    @app.get("/health")
    async def health():
        evictions = int(engine.metrics.value("lorakit_adapter_cache_evictions_total"))
        return {"status": "ok", "base": engine.base_name, "adapters": engine.loaded(), "scheduler": config.scheduler,
                **engine.stats, "evictions": evictions}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/admin/adapters")
    async def admin_list(request: Request):
        check_admin(request)
        return {"loaded": engine.loaded(), "available": adapters.available()}

    @app.post("/admin/adapters")
    async def admin_load(body: LoadRequest, request: Request):
        check_admin(request)
        await asyncio.to_thread(adapters.load, body.name)
        return {"loaded": engine.loaded()}

    @app.delete("/admin/adapters/{name:path}")
    async def admin_unload(name: str, request: Request):
        check_admin(request)
        await asyncio.to_thread(adapters.unload, name)
        return {"loaded": engine.loaded()}

    return app


# ---------------------------------------------------------------------------------------------------- answers
def _logprobs(engine: Engine, completion: Completion, chat: bool, start: int = 0, offset: int = 0):
    """OpenAI's logprobs object for tokens start.. of a completion (None when the request did not ask)."""
    if completion.logprobs is None:
        return None
    piece = lambda t: engine.tokenizer.decode([t])  # noqa: E731
    items = completion.logprobs[start:]
    if chat:
        def entry(token: int, logprob: float) -> dict:
            text = piece(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top.items()]}
                            for lp in items]}
    tokens = [piece(lp.token) for lp in items]
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{piece(t): v for t, v in lp.top.items()} for lp in items], "text_offset": offsets}


async def _stream(engine: Engine, job: Job, model: str, ident: str, chat: bool, include_usage: bool,
                  prompt_tokens: int, echo: list[str] | None):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Log-probabilities, when asked for,
    come with each row's final chunk. A client that disconnects cancels its rows."""
    created = int(time.time())
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": ident, "object": kind_name, "created": created, "model": model, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def choice(row: int, text: str | None, finish: str | None, logprobs=None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": row, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        return {"index": row, "text": text or "", "finish_reason": finish, "logprobs": logprobs}

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                          "logprobs": None} for i in range(len(job.rows))])
        for i, text in enumerate(echo or []):
            yield chunk([choice(i, text, None)])
        pending, completion_tokens = len(job.rows), 0
        while pending:
            row, kind, payload = await job.events.get()
            if kind == "error":
                yield f"data: {json.dumps(payload.body())}\n\n"
                return
            if kind == "text":
                yield chunk([choice(row, payload, None)])
            else:
                pending -= 1
                completion_tokens += len(payload.token_ids)
                yield chunk([choice(row, None, payload.finish_reason, _logprobs(engine, payload, chat))])
        if include_usage:
            yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens})
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # a no-op when every row is done; frees the rows of a client that went away


def _response(engine: Engine, model: str, ident: str, chat: bool, results: list[Completion], prompt_tokens: int,
              echo: list[str] | None) -> dict[str, Any]:
    completion_tokens = sum(len(r.token_ids) for r in results)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                    "logprobs": _logprobs(engine, r, True)} for i, r in enumerate(results)]
    else:
        choices = [{"index": i, "text": (echo[i] if echo else "") + r.text, "finish_reason": r.finish_reason,
                    "logprobs": _logprobs(engine, r, False)} for i, r in enumerate(results)]
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
