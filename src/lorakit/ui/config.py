"""Settings of `lorakit ui`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lorakit.errors import LorakitError


@dataclass
class UiConfig:
    """Settings of `lorakit ui`."""

    runs_dir: str = "runs"
    """Run folders are found directly inside it; runs launched from the page are written there (nowhere else)."""
    adapters_dir: str = "adapters"
    """Adapter folders are found directly inside it; the playground serves these (read only)."""
    model: Optional[str] = None
    """Base model for the playground and the adapters' base check (embedded name, model folder or hub id); none:
    runs and adapters only."""
    host: str = "127.0.0.1"
    """Interface to listen on (127.0.0.1 keeps the page on this machine)."""
    port: int = 7860
    """TCP port."""
    dtype: str = "float32"
    """The base's weights (float32 or bfloat16), as in `lorakit serve`."""
    max_adapter_mb: float = 1024.0
    """The playground's adapter cache: adapters load on first use and the least recently used idle ones are evicted
    beyond this many MB."""
    stale_s: float = 120.0
    """A run without summary.json whose files were not written for this many seconds is shown as stopped."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            problems.append(f"port must be in 0..65535, got {self.port!r}")
        if self.dtype not in ("float32", "bfloat16"):
            problems.append(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not isinstance(self.max_adapter_mb, (int, float)) or not self.max_adapter_mb > 0:
            problems.append(f"max_adapter_mb must be a positive number, got {self.max_adapter_mb!r}")
        if not isinstance(self.stale_s, (int, float)) or not self.stale_s > 0:
            problems.append(f"stale_s must be a positive number of seconds, got {self.stale_s!r}")
        for name in ("runs_dir", "adapters_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                problems.append(f"{name} must be a folder path, got {getattr(self, name)!r}")
        if problems:
            raise LorakitError("Invalid ui settings:\n  - " + "\n  - ".join(problems))
