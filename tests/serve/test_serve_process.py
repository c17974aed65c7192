"""`lorakit serve` as a user starts it: its own process, the engine on the main thread (the one that loaded the
model), HTTP on a second one; answers equal the adapter alone, Ctrl-C stops it cleanly, a taken port is a clear error."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

import lorakit as lk
from conftest import tiny_llama
from lorakit.inference.generate import Row, Sampling, encode_prompt, generate_rows
from tiny_text import make_adapter, save_tiny_lm

SRC = Path(__file__).resolve().parents[2] / "src"


def _start(root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(root / "base"), "--adapters-dir",
                             str(root / "adapters"), "--port", str(port), "--admin-token", "process-token"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process_answers_loads_at_runtime_and_stops_on_ctrl_c(tmp_path):
    save_tiny_lm(tmp_path / "base")
    for name, seed in (("alpha", 1), ("beta", 2)):
        lk.save_adapter(make_adapter(tiny_llama(), name, seed), tmp_path / "adapters" / name, adapter=name)
    reference, tok = lk.load_model(str(tmp_path / "base"))
    lk.load_adapter(reference, tmp_path / "adapters" / "beta", adapter="beta")
    ids = encode_prompt(tok, "the cat is red")
    expected = generate_rows(reference, tok, [Row(ids, "beta", Sampling(max_new_tokens=8))])[0].text

    port = _free_port()
    proc = _start(tmp_path, port)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        auth = {"Authorization": "Bearer process-token"}
        assert httpx.delete(url + "/admin/adapters/beta", headers=auth).status_code == 200  # unloaded ...
        assert httpx.post(url + "/admin/adapters", json={"name": "beta"}, headers=auth).status_code == 200  # reloaded
        out = httpx.post(url + "/v1/completions", json={"model": "beta", "prompt": "the cat is red", "max_tokens": 8,
                                                        "temperature": 0}, timeout=60).json()
        assert out["choices"][0]["text"] == expected and expected
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_serve_on_a_taken_port_fails_with_a_clear_error(tmp_path):
    save_tiny_lm(tmp_path / "base")
    (tmp_path / "adapters").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _start(tmp_path, taken.getsockname()[1])
        _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "could not start on 127.0.0.1" in err and "--port" in err and "Traceback" not in err
