"""`lorakit ui`: its options come from UiConfig's fields; the page itself is lorakit.ui (registered in cli/main.py)."""

from __future__ import annotations

from typing import Any

from lorakit.cli.options import all_flags, config_options
from lorakit.ui.config import UiConfig


@config_options(UiConfig, all_flags(UiConfig))
def ui(*, values: dict[str, Any]) -> None:
    """A web page to watch runs live, inspect adapters, compare answers side by side and launch training."""
    from lorakit.ui.server import run_ui

    run_ui(UiConfig(**values))
