"""A workspace for the UI tests: a tiny model folder, two adapters with different random B, JSONL data, a runs
folder; and `lorakit ui` on a free 127.0.0.1 port."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tiny_text import WORDS, make_adapter, save_tiny_lm


def make_workspace(root: Path) -> dict[str, Path]:
    import lorakit as lk

    model_dir = save_tiny_lm(root / "tiny-llama")
    adapters = root / "adapters"
    for name, seed in (("alpha", 2), ("beta", 3)):
        model, _ = lk.load_model(str(model_dir))
        lk.save_adapter(make_adapter(model, name, seed=seed, std=2.0), adapters / name, adapter=name)
    rng = random.Random(0)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the {a} and the {b}", "completion": f"{b} {a}"}) + "\n"
                            for a, b in ((rng.choice(WORDS), rng.choice(WORDS)) for _ in range(32))))
    (root / "runs").mkdir()
    return {"root": root, "model": model_dir, "adapters": adapters, "data": data, "runs": root / "runs"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_ui(*args: str, env: dict[str, str] | None = None, timeout: float = 120.0):
    """`lorakit ui ARGS --port FREE` as its own process, as a person starts it; yield its URL. Afterwards Ctrl-C
    (SIGINT) stops it, and with it any run it launched (checkpointed)."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "ui", *args, "--port", str(port)],
                            env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"lorakit ui exited with status {proc.returncode}"
            try:
                if httpx.get(f"{url}/api/info", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"lorakit ui did not answer within {timeout} s"
            time.sleep(0.25)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
