"""The server's defences, in-process (FastAPI TestClient): admin token, adapter names that try to leave the adapters
directory, request size limits, and the adapter cache's memory limit with least-recently-used eviction."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import lorakit as lk
from conftest import tiny_llama
from lorakit.lora.adapter_io import WEIGHTS_FILE
from lorakit.inference.generate import Row, Sampling, encode_prompt, generate_rows
from lorakit.serve.server import ServeConfig, build_engine, create_app
from tiny_text import make_adapter, save_tiny_lm

TOKEN = "limits-admin-token"
NAMES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    save_tiny_lm(root / "base")
    for i, name in enumerate(NAMES):
        lk.save_adapter(make_adapter(tiny_llama(), name, seed=i + 1), root / "adapters" / name, adapter=name)
    lk.save_adapter(make_adapter(tiny_llama(), "outside", seed=9), root / "outside", adapter="outside")
    os.symlink(root / "outside", root / "adapters" / "evil")  # a valid adapter, but outside the adapters dir
    return root


def start(root, **over):
    config = ServeConfig(model=str(root / "base"), adapters_dir=str(root / "adapters"), admin_token=TOKEN,
                         batch_wait_ms=0, max_tokens_limit=16, **over)
    engine = build_engine(config)
    return engine, TestClient(create_app(engine))


@pytest.fixture(scope="module")
def limited(root):
    engine, client = start(root, adapters=["alpha"], max_body_bytes=2000, max_prompt_tokens=10, max_batch_size=4)
    yield client
    engine.close()


def complete(client, model, prompt="the cat is red", **kw):
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6,
                                                 "temperature": 0, **kw})


def test_admin_endpoints_need_the_token(limited):
    for method, path, body in (("GET", "/admin/adapters", None), ("POST", "/admin/adapters", {"name": "beta"}),
                               ("DELETE", "/admin/adapters/alpha", None)):
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}):
            r = limited.request(method, path, json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token", (method, headers)
    assert limited.get("/admin/adapters", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


@pytest.mark.parametrize("name", ["evil", "../outside", "/tmp", "..", "alpha/../../outside", "%2e%2e"])
def test_adapter_names_escaping_the_adapters_dir_are_400(limited, name):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = limited.post("/admin/adapters", json={"name": name}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter_name", r.text
    assert complete(limited, name).status_code == 400


def test_requests_over_the_limits(limited):
    big = limited.post("/v1/completions", content=b'{"model": "alpha", "prompt": "' + b"a " * 2000 + b'"}',
                       headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    chunked = limited.post("/v1/completions", content=iter([b'{"model": "alpha", "prompt": "hi"}']),
                           headers={"content-type": "application/json"})
    assert chunked.status_code == 411
    long = complete(limited, "alpha", prompt="the cat " * 6)  # 13 tokens > max_prompt_tokens=10
    assert long.status_code == 400 and long.json()["error"]["code"] == "prompt_too_long"
    many = complete(limited, "alpha", prompt=["hello"] * 5)  # more prompts than max_batch_size=4
    assert many.status_code == 400 and many.json()["error"]["code"] == "invalid_prompt"
    assert complete(limited, "alpha", max_tokens=17).json()["error"]["code"] == "max_tokens_too_large"
    assert complete(limited, "alpha", n=5).json()["error"]["param"] == "n"  # 5 choices > max_batch_size=4
    assert complete(limited, "alpha").status_code == 200  # within every limit


def test_adapter_cache_evicts_least_recently_used_never_one_in_use(root):
    adapter_bytes = 896 * 4  # r=4 on q (32x32) and v (16x32) in 2 layers: 896 fp32 numbers
    file_bytes = (root / "adapters" / "alpha" / WEIGHTS_FILE).stat().st_size
    limit_mb = (adapter_bytes + file_bytes + 500) / 1e6  # room for two resident adapters, not three
    engine, client = start(root, adapters=[], max_adapter_mb=limit_mb, adapter_wait_s=0.3)
    reference, tok = lk.load_model(str(root / "base"))
    for name in NAMES:
        lk.load_adapter(reference, root / "adapters" / name, adapter=name)
    ids = encode_prompt(tok, "the cat is red")
    alone = {n: generate_rows(reference, tok, [Row(ids, n, Sampling(max_new_tokens=6))])[0].text for n in NAMES}
    try:
        def ask(name):
            r = complete(client, name)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == alone[name]  # a reloaded adapter answers as before
            return sorted(engine.loaded())

        assert ask("alpha") == ["alpha"]  # loaded on demand
        assert ask("beta") == ["alpha", "beta"]
        assert engine.adapters.sizes == {"alpha": adapter_bytes, "beta": adapter_bytes}
        assert ask("alpha") == ["alpha", "beta"]  # alpha is now the most recently used
        assert ask("gamma") == ["alpha", "gamma"]  # beta (least recently used) was evicted
        assert engine.metrics.value("lorakit_adapter_cache_evictions_total") == 1
        assert engine.adapters.acquire("gamma") == "gamma"  # a request in flight holds gamma ...
        assert ask("alpha") == ["alpha", "gamma"]  # ... so although gamma is now LRU ...
        assert ask("beta") == ["beta", "gamma"]  # ... alpha is evicted instead
        assert engine.adapters.acquire("beta") == "beta"  # both resident adapters in use: nothing can be evicted
        full = complete(client, "alpha")  # waits adapter_wait_s for an adapter to go idle, then 503
        assert full.status_code == 503 and full.json()["error"]["code"] == "adapter_cache_full"
        waiting = threading.Thread(target=lambda: answers.append(complete(client, "alpha")))
        answers = []
        waiting.start()
        time.sleep(0.1)
        engine.adapters.release(["beta"])  # beta goes idle while the request waits: it is evicted, alpha answers
        waiting.join()
        assert answers[0].status_code == 200 and answers[0].json()["choices"][0]["text"] == alone["alpha"]
        assert sorted(engine.loaded()) == ["alpha", "gamma"]
        engine.adapters.release(["gamma"])
        assert ask("beta") == ["alpha", "beta"]  # gamma (LRU, now idle) evicted
        evictions = engine.metrics.value("lorakit_adapter_cache_evictions_total")
        assert sum(engine.adapters.sizes.values()) <= limit_mb * 1e6 and evictions == 4
        assert not any(engine.adapters.in_use.values())  # every finished request released its adapter
    finally:
        engine.close()


@pytest.mark.stress
def test_server_under_load_answers_exactly_and_keeps_memory_flat(tmp_path):
    """benchmarks/server_load.py: concurrent clients, mixed adapters, streaming, disconnects, malformed requests."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import server_load

    seconds = float(os.environ.get("LORAKIT_LOAD_SECONDS", "60"))
    result = server_load.run(clients=8, seconds=seconds, out=None)
    assert result["server_alive"] and result["errors"] == 0 and result["mismatches"] == 0, result
    assert result["requests_served_ok"] > 0 and result["rss_growth_mb"] <= result["rss_bound_mb"], result
    assert result["counts"].get("disconnected mid-stream") and result["counts"].get("malformed answered as expected")
