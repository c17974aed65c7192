"""`lorakit serve`: an OpenAI-compatible HTTP server, one frozen base in memory, many LoRA adapters resident on it.

A request's life: `http` (FastAPI, translation only) → `engine` (the thread that owns the model) → `scheduler`
(which rows run this step, under a token budget and the KV-cache slots) → `runner` (the forwards, each row through
its own adapter) → sampler and detokenizer (`lorakit.inference.sampling`) → events back to HTTP, streamed or whole.
`adapters` keeps the resident adapters (runtime load/unload, LRU cache); `metrics` renders /metrics.
"""

from __future__ import annotations

from lorakit.errors import LorakitError
from lorakit.serve.config import ServeConfig, ServeError
from lorakit.serve.engine import Engine, Job
from lorakit.serve.http import create_app

__all__ = ["ServeConfig", "ServeError", "Engine", "Job", "create_app", "build_engine", "serve"]


def build_engine(config: ServeConfig, start: bool = True) -> Engine:
    """Load the base (frozen, inference mode) and the start-up adapters, and start the engine thread (start=False:
    the caller runs `engine.run()`, best on this same thread)."""
    from lorakit.models.loading import load_model

    dtype = config.dtype
    if dtype == "auto":
        from lorakit.hardware import auto_base_dtype

        dtype = {"bf16": "bfloat16", "fp32": "float32"}[auto_base_dtype()[0]]
    model, tokenizer = load_model(config.model, dtype=dtype)
    model.train(False)
    for p in model.parameters():
        p.requires_grad_(False)
    engine = Engine(model, tokenizer, config, start=start)
    for name in engine.adapters.available() if config.adapters is None else config.adapters:
        try:
            engine.adapters.load(name)
        except Exception as e:
            engine.close()
            message = e.message if hasattr(e, "message") else str(e)
            raise LorakitError(f"Cannot load start-up adapter {name!r}: {message}") from None
    return engine


def serve(config: ServeConfig) -> None:
    """Run the server until interrupted: HTTP on a second thread, the engine on this one, which loaded the model
    (one thread runs every model operator; see `lorakit.serve.engine`)."""
    import threading

    import uvicorn

    engine = build_engine(config, start=False)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host=config.host, port=config.port, log_level="info"))

    def http() -> None:
        try:
            server.run()
        finally:
            engine.close()  # the HTTP side stopped (or never started): end the engine's loop too

    web = threading.Thread(target=http, name="lorakit-http", daemon=True)
    web.start()
    print(f"lorakit: serving base {engine.base_name!r} ({engine.dtype}) with adapters {engine.loaded()} on "
          f"http://{config.host}:{config.port}/v1 ({config.scheduler} scheduler)", flush=True)
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        web.join(timeout=10)
    if not server.started:
        raise LorakitError(f"The HTTP server could not start on {config.host}:{config.port} (see uvicorn's message "
                           "above); pick another --port or stop what is using it.")
