"""Load test of `lorakit serve` (a subprocess, tiny model by default): N concurrent clients for a fixed time with a mix
of adapters and the base, streaming and not, clients that disconnect mid-stream and malformed requests. The adapter
cache holds 2 of the 3 adapters, so adapters are evicted and reloaded under load. Checks: the server never crashes or
answers 5xx (503 "cache full, retry" is counted apart), every answer equals the same adapter's greedy answer computed
alone, RSS growth after warm-up stays under a bound. Prints a table and writes benchmarks/results/server_load.json.

    PYTHONPATH=src python benchmarks/server_load.py --clients 8 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT.parent / "src"))

from lorakit.hardware import cpu_info, cpu_line  # noqa: E402
import lorakit as lk  # noqa: E402
from lorakit.lora.adapter_io import WEIGHTS_FILE  # noqa: E402
from lorakit.fsutil import atomic_write_text  # noqa: E402
from lorakit.inference.generate import Row, Sampling, encode_chat, encode_prompt, generate_rows  # noqa: E402

ADAPTERS = ("alpha", "beta", "gamma")
PROMPTS = ["the cat is red", "hello world", "a big dog walks to the old house", "what is the name of the pub",
           "two green birds sing at night", "the sun is hot"]
MAX_TOKENS = 8
MALFORMED = [  # (body bytes, expected status)
    (b"{not json", 422),
    (json.dumps({"model": "nosuch", "prompt": "hi"}).encode(), 404),
    (json.dumps({"model": "../secret", "prompt": "hi"}).encode(), 400),
    (json.dumps({"model": "alpha", "prompt": "hi", "max_tokens": -3}).encode(), 422),
    (json.dumps({"model": "alpha", "prompt": "hi", "max_tokens": 10_000}).encode(), 400),
    (json.dumps({"model": "alpha", "prompt": "hi " * 20_000}).encode(), 413),
    (json.dumps({"model": "alpha", "prompt": "the cat " * 100}).encode(), 400),
    (json.dumps({"model": "alpha", "messages": "not a list"}).encode(), 422),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Load:
    def __init__(self, url: str, expected: dict, seconds: float, seed: int, base_id: str = "base"):
        self.url, self.expected, self.seconds, self.seed, self.base_id = url, expected, seconds, seed, base_id
        self.counts: Counter = Counter()
        self.latencies: list[float] = []
        self.mismatches: list[str] = []
        self.lock = threading.Lock()

    def count(self, key: str, latency: float | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if latency is not None:
                self.latencies.append(latency)

    def client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        deadline = time.monotonic() + self.seconds
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while time.monotonic() < deadline:
                model = rng.choice(ADAPTERS + ("base",))
                prompt = rng.choice(PROMPTS)
                kind = rng.choices(["plain", "chat", "stream", "disconnect", "malformed"], [4, 2, 3, 1, 2])[0]
                try:
                    self.one(http, rng, kind, model, prompt)
                except httpx.HTTPError as e:
                    self.count(f"client error {type(e).__name__}")

    def one(self, http: httpx.Client, rng: random.Random, kind: str, model: str, prompt: str) -> None:
        started = time.perf_counter()
        model_id = self.base_id if model == "base" else model  # the server names the base after its folder
        if kind == "malformed":
            body, status = rng.choice(MALFORMED)
            r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            self.count("malformed answered as expected" if r.status_code == status
                       else f"malformed: got {r.status_code}, expected {status}")
            return
        if kind == "chat":
            r = http.post("/v1/chat/completions", json={"model": model_id, "max_tokens": MAX_TOKENS, "temperature": 0,
                                                        "messages": [{"role": "user", "content": prompt}]})
            if self.retry_or_fail(r):
                return
            self.check("chat", model, prompt, r.json()["choices"][0]["message"]["content"], started)
            return
        body = {"model": model_id, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        if kind == "plain":
            r = http.post("/v1/completions", json=body)
            if self.retry_or_fail(r):
                return
            self.check("completion", model, prompt, r.json()["choices"][0]["text"], started)
            return
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            if self.retry_or_fail(r):
                return
            text = []
            for line in r.iter_lines():
                if kind == "disconnect":  # hang up after the first event
                    self.count("disconnected mid-stream")
                    return
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    self.count(f"stream error {event['error'].get('code')}")
                    return
                text.append(event["choices"][0]["text"])
        self.check("completion", model, prompt, "".join(text), started, streamed=True)

    def retry_or_fail(self, r: httpx.Response) -> bool:
        if r.status_code == 200:
            return False
        if isinstance(r, httpx.Response) and not r.is_stream_consumed:
            r.read()
        self.count("503 adapter cache full (retry)" if r.status_code == 503 else f"unexpected {r.status_code}")
        return True

    def check(self, kind: str, model: str, prompt: str, text: str, started: float, streamed: bool = False) -> None:
        want = self.expected[(kind, model, prompt)]
        label = "streamed" if streamed else kind
        if text == want:
            self.count(f"{label} ok", time.perf_counter() - started)
        else:
            self.count(f"{label} MISMATCH")
            with self.lock:
                self.mismatches.append(f"{model} {prompt!r}: got {text!r}, alone {want!r}")


def build(folder: Path, real: str | None) -> str:
    """The base (a tiny Llama saved to `folder/base`, or the real model `real`) and 3 adapters with random B."""
    from conftest import randomize_lora_B, tiny_llama
    from tiny_text import make_adapter, save_tiny_lm

    if real is None:
        save_tiny_lm(folder / "base")
        for i, name in enumerate(ADAPTERS):
            lk.save_adapter(make_adapter(tiny_llama(), name, seed=i + 1), folder / "adapters" / name, adapter=name)
        return str(folder / "base")
    model, _ = lk.load_model(real)
    for i, name in enumerate(ADAPTERS):
        lk.add_lora(model, lk.LoraConfig(r=4, alpha=8), adapter=name)
        randomize_lora_B(model, name, std=0.05, seed=i + 1)
        lk.save_adapter(model, folder / "adapters" / name, adapter=name)
        lk.delete_adapter(model, name)
    return real


def references(folder: Path, base: str) -> dict:
    model, tok = lk.load_model(base)
    for name in ADAPTERS:
        lk.load_adapter(model, folder / "adapters" / name, adapter=name)
    out = {}
    for m in ADAPTERS + ("base",):
        adapter = None if m == "base" else m
        for p in PROMPTS:
            for kind, ids in (("completion", encode_prompt(tok, p)),
                              ("chat", encode_chat(tok, [{"role": "user", "content": p}]))):
                out[(kind, m, p)] = generate_rows(model, tok, [Row(ids, adapter, Sampling(max_new_tokens=MAX_TOKENS))])[0].text
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def run(clients: int, seconds: float, seed: int = 0, rss_bound_mb: float = 150.0, out: str | None = None,
        real: str | None = None) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = build(folder, real)
        expected = references(folder, base)
        adapter_bytes = (folder / "adapters" / "alpha" / WEIGHTS_FILE).stat().st_size
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT.parent / "src")}
        server = subprocess.Popen(
            [sys.executable, "-m", "lorakit", "serve", "--model", base, "--adapters-dir",
             str(folder / "adapters"), "--port", str(port), "--max-tokens-limit", "16", "--max-prompt-tokens", "128",
             "--max-body-bytes", "20000", "--max-adapter-mb", str(2.5 * adapter_bytes / 1e6),  # 2 of 3 fit
             "--batch-wait-ms", "5"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            else:
                raise SystemExit("server did not start")
            base_id = Path(base.rstrip("/")).name
            warm = Load(url, expected, 3.0, seed + 99, base_id)  # warm-up: every code path once, not counted
            threads = [threading.Thread(target=warm.client, args=(i,)) for i in range(clients)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            rss = [rss_mb(server.pid)]
            load = Load(url, expected, seconds, seed, base_id)
            threads = [threading.Thread(target=load.client, args=(i,)) for i in range(clients)]
            started = time.perf_counter()
            [t.start() for t in threads]
            while any(t.is_alive() for t in threads):
                time.sleep(0.5)
                rss.append(rss_mb(server.pid))
            wall = time.perf_counter() - started
            alive = server.poll() is None and httpx.get(url + "/health", timeout=10).status_code == 200
            health = httpx.get(url + "/health", timeout=10).json() if alive else {}
        finally:
            server.terminate()
            server.wait(timeout=30)
    c = load.counts
    served = sum(v for k, v in c.items() if k.endswith(" ok"))
    result = {
        "model": real or "tiny test Llama (tests/tiny_text.py)", "clients": clients, "seconds": round(wall, 1), "requests_served_ok": served,
        "requests_per_s": round(served / wall, 2), "mismatches": len(load.mismatches),
        "mismatch_examples": load.mismatches[:5], "counts": dict(c),
        "latency_s": {f"p{q}": round(percentile(load.latencies, q / 100), 3) for q in (50, 95, 99)},
        "rss_mb": {"after_warmup": round(rss[0], 1), "peak": round(max(rss), 1), "end": round(rss[-1], 1)},
        "rss_growth_mb": round(max(rss) - rss[0], 1), "rss_bound_mb": rss_bound_mb,
        "server_alive": alive, "evictions": health.get("evictions"), "steps": health.get("steps"), "scheduler": health.get("scheduler"),
        "largest_batch": health.get("largest_batch"),
    }
    errors = sum(v for k, v in c.items() if "MISMATCH" in k or "unexpected" in k or "error" in k
                 or k.startswith("malformed: got"))
    result["errors"] = errors
    result["passed"] = alive and errors == 0 and result["rss_growth_mb"] <= rss_bound_mb and served > 0
    print(f"| clients | s | served ok | req/s | p50 s | p95 s | p99 s | errors | mismatches | 503 retry | "
          f"disconnects | malformed ok | RSS MB warm→peak→end | evictions |")
    print("|" + "---|" * 14)
    lat = result["latency_s"]
    print(f"| {clients} | {wall:.0f} | {served} | {served / wall:.1f} | {lat['p50']} | {lat['p95']} | {lat['p99']} | "
          f"{errors} | {len(load.mismatches)} | {c['503 adapter cache full (retry)']} | {c['disconnected mid-stream']} | "
          f"{c['malformed answered as expected']} | {rss[0]:.0f}→{max(rss):.0f}→{rss[-1]:.0f} | {result['evictions']} |")
    if out:
        name = "server_load.json" if real is None else f"server_load_{real}.json"
        result["cpu"] = cpu_info()
        print(cpu_line())
        atomic_write_text(Path(out) / name, json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-bound-mb", type=float, default=150.0)
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--real", metavar="MODEL", help="serve this model (e.g. smollm2-135m) instead of the tiny one")
    args = parser.parse_args()
    result = run(args.clients, args.seconds, args.seed, args.rss_bound_mb, args.out, args.real)
    if not result["passed"]:
        print(json.dumps(result, indent=2))
        raise SystemExit("FAILED")


if __name__ == "__main__":
    main()
