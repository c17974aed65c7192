"""`lorakit ui`: a local web page to watch runs, inspect adapters, compare them side by side and launch training.

FastAPI (as `lorakit serve`) plus one static page with uPlot vendored under static/vendor (no build step, nothing
fetched from the internet). `lorakit.ui.server` builds the app; `runs`, `adapters` and `launch` read and start runs.
"""

from lorakit.ui.config import UiConfig

__all__ = ["UiConfig", "run_ui", "create_ui_app"]


def __getattr__(name: str):
    if name in ("run_ui", "create_ui_app", "build_ui_engine"):
        from lorakit.ui import server

        return getattr(server, name)
    raise AttributeError(f"module 'lorakit.ui' has no attribute {name!r}")
