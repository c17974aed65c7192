"""Which adapters are resident on the served model: names → folders inside the adapters directory, runtime load and
unload, and the LRU cache that loads an adapter on demand and evicts idle ones beyond `max_adapter_mb`.

Every change to the model holds `model_lock` (the engine holds it while it runs a step) and runs through `call`
(the engine's: on its own thread, so that one thread runs the model's operators); `lock` guards the bookkeeping and is
always taken after `model_lock` when both are held.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any, Callable

from torch import nn

from lorakit.errors import LorakitError
from lorakit.inference.generate import ADAPTER_NAME
from lorakit.serve.config import ServeConfig, ServeError
from lorakit.serve.metrics import Metrics


class _CacheFull(Exception):
    """Every resident adapter is in use, so none can be evicted now."""


class AdapterCache:
    def __init__(self, model: nn.Module, config: ServeConfig, model_lock: threading.Lock, metrics: Metrics,
                 call: Callable[[Callable[[], Any]], Any] = lambda fn: fn()):
        self.model, self.config, self.model_lock, self.metrics, self.call = model, config, model_lock, metrics, call
        self.adapters_dir = Path(config.adapters_dir).resolve()
        self.base_name = config.base_name or Path(config.model.rstrip("/")).name
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)  # notified when a row releases its adapter
        self.in_use: dict[str, int] = {}  # adapter -> rows submitted and not finished
        self.last_used: dict[str, int] = {}  # adapter -> tick of its latest request (LRU order)
        self.sizes: dict[str, int] = {}  # adapter -> bytes of its weights
        self.ticks = itertools.count()
        self.version = 0  # grows whenever the set of resident adapters changes (the runner rebuilds its tables)

    def folder(self, name: str) -> Path:
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
        folder = self.folder(name)
        if name in self.loaded():
            raise ServeError(409, f"Adapter {name!r} is already loaded.", "adapter_already_loaded", "name")
        if not (folder / "adapter_config.json").is_file():
            raise ServeError(404, f"No adapter folder {name!r} in the adapters directory; available: "
                                  f"{self.available()}.", "adapter_not_found", "name")
        def load() -> None:
            with self.model_lock:
                self._load_locked(name, folder)

        self.call(load)

    def _load_locked(self, name: str, folder: Path) -> None:
        """Load under model_lock, first evicting least recently used idle adapters if the cache limit needs it."""
        from lorakit.lora.adapter_io import WEIGHTS_FILE, adapter_state_dict, load_adapter

        if self.config.max_adapter_mb is not None:
            self._make_room((folder / WEIGHTS_FILE).stat().st_size, name)
        try:
            load_adapter(self.model, folder, adapter=name)
            self.version += 1
        except LorakitError as e:
            raise ServeError(400, str(e), "adapter_load_failed", "name") from None
        with self.lock:
            self.sizes[name] = sum(t.numel() * t.element_size() for t in adapter_state_dict(self.model, name).values())
            self.last_used[name] = next(self.ticks)

    def _make_room(self, incoming: int, name: str) -> None:
        from lorakit.lora.injection import delete_adapter

        limit = int(self.config.max_adapter_mb * 1e6)
        if incoming > limit:
            raise ServeError(400, f"Adapter {name!r} needs {incoming / 1e6:.1f} MB, more than the server's whole adapter "
                                  f"cache ({self.config.max_adapter_mb} MB).", "adapter_too_large", "model")
        with self.lock:
            while sum(self.sizes.values()) + incoming > limit:
                idle = [a for a in self.sizes if not self.in_use.get(a)]
                if not idle:
                    raise _CacheFull()
                victim = min(idle, key=lambda a: self.last_used.get(a, -1))
                delete_adapter(self.model, victim)
                self.version += 1
                self._forget(victim)
                self.metrics.inc("lorakit_adapter_cache_evictions_total")

    def _forget(self, name: str) -> None:
        for table in (self.sizes, self.last_used, self.in_use):
            table.pop(name, None)

    def unload(self, name: str) -> None:
        from lorakit.lora.injection import delete_adapter

        self.folder(name)

        def unload() -> None:
            with self.model_lock:
                if name not in self.loaded():
                    raise ServeError(404, f"Adapter {name!r} is not loaded; loaded: {self.loaded()}.",
                                     "adapter_not_found", "name")
                delete_adapter(self.model, name)
                self.version += 1
                with self.lock:
                    self._forget(name)

        self.call(unload)

    def acquire(self, model_id: str, rows: int = 1) -> str | None:
        """resolve, plus the cache: mark the adapter used by `rows` rows (it cannot be evicted until each is
        released), and with max_adapter_mb set, load an available adapter folder on demand."""
        adapter = self.resolve(model_id, on_demand=self.config.max_adapter_mb is not None)
        if adapter is None:
            return None
        with self.lock:  # fast path, not waiting for a running step: evictions also take this lock
            if adapter in self.sizes:
                self.in_use[adapter] = self.in_use.get(adapter, 0) + rows
                self.last_used[adapter] = next(self.ticks)
                self.metrics.inc("lorakit_adapter_cache_hits_total")
                return adapter
        def load_and_mark() -> None:
            with self.model_lock:  # loads and evictions happen under model_lock: it stays between check and mark
                if adapter not in self.loaded():
                    self._load_locked(adapter, self.folder(adapter))
                    self.metrics.inc("lorakit_adapter_cache_misses_total")
                else:
                    self.metrics.inc("lorakit_adapter_cache_hits_total")
                with self.lock:
                    self.in_use[adapter] = self.in_use.get(adapter, 0) + rows
                    self.last_used[adapter] = next(self.ticks)

        deadline = time.monotonic() + self.config.adapter_wait_s
        while True:
            try:
                self.call(load_and_mark)
                return adapter
            except _CacheFull:  # every resident adapter is in use: wait (without the model) for one to go idle
                with self.idle:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.idle.wait(timeout=left):
                        raise ServeError(503, f"The adapter cache ({self.config.max_adapter_mb} MB) stayed full of "
                                              f"adapters in use ({sorted(self.sizes)}) for adapter_wait_s="
                                              f"{self.config.adapter_wait_s} s; retry shortly.",
                                         "adapter_cache_full") from None

    def release(self, adapters: list[str | None]) -> None:
        with self.lock:
            for a in adapters:
                if a is not None and self.in_use.get(a):
                    self.in_use[a] -= 1
                    if not self.in_use[a]:
                        self.idle.notify_all()

    def resolve(self, model_id: str, on_demand: bool = False) -> str | None:
        """The adapter a request's `model` field selects (None = base); 400 for invalid names, 404 for unknown
        (with `on_demand`, an adapter folder that exists but is not loaded is accepted)."""
        if model_id == self.base_name:
            return None
        folder = self.folder(model_id)
        if on_demand and (folder / "adapter_config.json").is_file():
            return model_id
        if model_id not in self.loaded():
            raise ServeError(404, f"The model {model_id!r} does not exist: loaded adapters are {self.loaded()} and "
                                  f"the base is {self.base_name!r}.", "model_not_found", "model")
        return model_id
