"""`lorakit ui`: one FastAPI app serving the static page (static/, uPlot vendored) and a small JSON API over the run
and adapter folders. The playground talks to `lorakit serve`'s own app, mounted at /serve on the same engine, so an
answer in the page is the served answer.

    /                     the page (Runs, Adapters, Playground, Launch)
    /api/...              read-only views of the folders; POST /api/launch and /api/runs/NAME/stop
    /serve/v1/...         lorakit.serve.http.create_app(engine): OpenAI-compatible, streamed
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from lorakit.errors import LorakitError
from lorakit.ui.config import UiConfig

STATIC = Path(__file__).parent / "static"
LAUNCH_FIELDS = ("model", "data.train_file", "data.eval_file", "data.format", "data.max_length", "optim.lr",
                 "optim.max_steps", "optim.epochs", "optim.batch_size", "optim.grad_accum", "lora.r", "lora.alpha",
                 "lora.target_modules", "save_every", "eval_every", "seed")
"""The Launch form's fields (dotted TrainConfig keys); any other key goes in its "more settings" box."""
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def launch_fields() -> list[dict[str, Any]]:
    """The form's fields with TrainConfig's defaults."""
    from lorakit.train.config import TrainConfig

    defaults = TrainConfig().to_dict()
    out = []
    for key in LAUNCH_FIELDS:
        value = defaults
        for part in key.split("."):
            value = value[part]
        out.append({"key": key, "default": value})
    return out


def create_ui_app(config: UiConfig, engine=None):
    """The UI's FastAPI app over `config`'s folders; with `engine` (lorakit.serve's Engine) also the playground."""
    from lorakit.ui import adapters as adapter_pages
    from lorakit.ui import runs as run_pages
    from lorakit.ui.launch import Launcher

    runs_dir, adapters_dir = Path(config.runs_dir).resolve(), Path(config.adapters_dir).resolve()
    launcher = Launcher(runs_dir)
    app = FastAPI(title="lorakit ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.launcher = launcher

    @app.middleware("http")
    async def _only_this_page(request: Request, call_next):
        """Another web site open in the same browser must not drive this page's actions (start training, generate):
        on a loopback address only loopback Host names are answered (no DNS rebinding), and a POST must be JSON
        (which a cross-site form cannot send without a CORS preflight, never granted here) from no other origin."""
        host = urlsplit(f"//{request.headers.get('host', '')}").hostname or ""
        if config.host in LOOPBACK and host not in LOOPBACK:
            return JSONResponse({"error": f"Host {host!r} refused: this page answers on {config.host} only."}, 403)
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                return JSONResponse({"error": f"Cross-origin request from {origin!r} refused."}, 403)
            kind = request.headers.get("content-type", "").split(";")[0].strip()
            if kind != "application/json":
                return JSONResponse({"error": f"Send a JSON body (Content-Type: application/json), got "
                                              f"{kind or 'no Content-Type'!r}."}, 415)
        return await call_next(request)

    @app.exception_handler(LorakitError)
    async def _bad_input(request: Request, exc: LorakitError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    def missing(what: str, name: str, known: list[str]) -> JSONResponse:
        return JSONResponse({"error": f"No {what} {name!r}; known: {known}."}, status_code=404)

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    async def info():
        tokenizer = engine.tokenizer if engine is not None else None
        return {"runs_dir": str(runs_dir), "adapters_dir": str(adapters_dir),
                "base": engine.base_name if engine is not None else None, "model": config.model,
                "chat_template": bool(getattr(tokenizer, "chat_template", None)),
                "servable": engine.adapters.available() if engine is not None else [],
                "max_tokens_limit": engine.config.max_tokens_limit if engine is not None else None,
                "settings": dataclasses.asdict(config)}

    @app.get("/api/runs")
    async def runs():
        return [run_pages.run_overview(f, launcher.alive(f.name), config.stale_s)
                for f in run_pages.run_folders(runs_dir)]

    def folder_of(name: str):
        return run_pages.run_folder(runs_dir, name)

    @app.get("/api/runs/{name}")
    async def run(name: str):
        folder = folder_of(name)
        if folder is None:
            return missing("run", name, [f.name for f in run_pages.run_folders(runs_dir)])
        return run_pages.run_detail(folder, launcher.alive(name), config.stale_s)

    @app.get("/api/runs/{name}/metrics")
    async def run_metrics(name: str):
        folder = folder_of(name)
        if folder is None:
            return missing("run", name, [f.name for f in run_pages.run_folders(runs_dir)])
        return run_pages.run_metrics(folder)

    @app.post("/api/runs/{name}/stop")
    async def stop(name: str):
        return launcher.stop(name)

    @app.get("/api/launch")
    async def launch_form():
        return {"runs_dir": str(runs_dir), "fields": launch_fields()}

    @app.post("/api/launch")
    async def launch(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise LorakitError("The launch request must be JSON: {\"name\": ..., \"settings\": {key: value}}.") from None
        if not isinstance(body, dict):
            raise LorakitError(f"The launch request must be a JSON object, got {type(body).__name__}.")
        settings = dict(body.get("settings") or {})
        for line in str(body.get("more") or "").splitlines():  # "key=value" lines, as `lorakit train --set`
            if line.strip():
                key, sep, value = line.partition("=")
                if not sep or not key.strip():
                    raise LorakitError(f"More settings take one KEY=VALUE a line (e.g. optim.warmup_ratio=0.1), "
                                       f"got {line.strip()!r}.")
                settings[key.strip()] = value.strip()
        return launcher.start(body.get("name"), settings)

    def adapter_table() -> dict[str, Path]:
        return adapter_pages.adapter_folders(adapters_dir, runs_dir)

    @app.get("/api/adapters")
    async def adapters():
        return [adapter_pages.adapter_overview(i, f) for i, f in adapter_table().items()]

    @app.get("/api/adapters/{ident:path}/analysis")
    async def adapter_analysis(ident: str):
        table = adapter_table()
        if ident not in table:
            return missing("adapter", ident, list(table))
        return adapter_pages.layer_analysis(table[ident])

    @app.get("/api/adapters/{ident:path}/base")
    async def adapter_base(ident: str):
        import asyncio

        table = adapter_table()
        if ident not in table:
            return missing("adapter", ident, list(table))
        return await asyncio.to_thread(adapter_pages.base_match, engine, table[ident])

    @app.get("/api/adapters/{ident:path}")
    async def adapter(ident: str):
        table = adapter_table()
        if ident not in table:
            return missing("adapter", ident, list(table))
        return adapter_pages.adapter_overview(ident, table[ident])

    if engine is not None:
        from lorakit.serve.http import create_app

        app.mount("/serve", create_app(engine))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def build_ui_engine(config: UiConfig):
    """The playground's engine: `lorakit serve`'s, on config.model, adapters loaded on first use from adapters_dir."""
    from lorakit.serve.config import ServeConfig
    from lorakit.serve.server import build_engine

    return build_engine(ServeConfig(model=config.model, adapters_dir=config.adapters_dir, adapters=[],
                                    dtype=config.dtype, max_adapter_mb=config.max_adapter_mb, max_batch_size=8))


def run_ui(config: UiConfig) -> None:
    """Serve the page until interrupted; runs started from it are stopped (checkpointed) on exit."""
    import uvicorn

    engine = build_ui_engine(config) if config.model else None
    app = create_ui_app(config, engine)
    print(f"lorakit ui: http://{config.host}:{config.port}/  (runs: {config.runs_dir}, adapters: "
          f"{config.adapters_dir}, base: {engine.base_name if engine else 'none: pass --model for the playground'})",
          flush=True)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        app.state.launcher.close()
        if engine is not None:
            engine.close()
