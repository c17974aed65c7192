"""The OpenAI-compatible server; `ServeConfig` and `serve` are imported lazily (no FastAPI or torch on import)."""


def __getattr__(name: str):
    if name in ("ServeConfig", "serve", "build_engine", "create_app"):
        from lorakit.serve import server

        return getattr(server, name)
    raise AttributeError(f"module 'lorakit.serve' has no attribute {name!r}")
