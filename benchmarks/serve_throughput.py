"""Serving throughput of `lorakit serve`: the static batcher vs the continuous scheduler, same client, same workload.

SmolLM2-135M-Instruct with 16 LoRA adapters (r=8 on q,v, different random weights). A fixed-seed workload of
--requests requests: prompts of 16–256 random token ids, 16–128 new tokens each (ignore_eos, greedy), adapters chosen
uniformly or 80/20 (80% of requests on 20% of the adapters), arriving as a burst or as a Poisson process at each
--rates. Each server runs in its own process; the client is the `openai` package, streaming, one thread per request.
Reported per (scheduler, arrival, adapter mix): output tok/s (all output tokens / wall time from first send to last
answer), TTFT p50/p99, time per output token p50/p99 ((latency − TTFT)/(tokens − 1) per request) and the server's
peak RSS. Outputs of the two schedulers are compared request by request (greedy: they must be equal), and --alone N
requests are re-run one at a time on the continuous server and compared with their answers under load.

    PYTHONPATH=src python benchmarks/serve_throughput.py --requests 128 --rates 1 2 4
    PYTHONPATH=src python benchmarks/serve_throughput.py --requests 12 --max-new 8 24 --rates 4   # quick check
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
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from lorakit.fsutil import atomic_write_text  # noqa: E402
from lorakit.hardware import cpu_info, cpu_line  # noqa: E402

RESULTS = ROOT / "results"


def make_adapters(folder: Path, count: int, model_name: str) -> None:
    import torch

    import lorakit as lk

    model, _ = lk.load_model(model_name)
    for i in range(count):
        name = f"a{i:02d}"
        lk.add_lora(model, lk.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), adapter=name)
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for _, layer in lk.lora_layers(model):
                if name in layer.adapters:
                    w = layer.lora_B[name].weight
                    w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
        lk.save_adapter(model, folder / name, adapter=name)
        lk.delete_adapter(model, name)


def workload(n: int, seed: int, adapters: list[str], mix: str, prompt_range, new_range, vocab: int) -> list[dict]:
    rng = random.Random(seed)
    hot = adapters[:max(1, len(adapters) // 5)]
    requests = []
    for i in range(n):
        if mix == "80/20" and rng.random() < 0.8:
            adapter = rng.choice(hot)
        elif mix == "80/20":
            adapter = rng.choice(adapters[len(hot):])
        else:
            adapter = rng.choice(adapters)
        length = rng.randint(*prompt_range)
        requests.append({"id": i, "model": adapter, "prompt": [rng.randrange(100, vocab) for _ in range(length)],
                         "max_tokens": rng.randint(*new_range)})
    return requests


def arrivals(n: int, rate: float | None, seed: int) -> list[float]:
    """Send times in seconds: all at 0 for a burst, else a Poisson process with `rate` requests per second."""
    if rate is None:
        return [0.0] * n
    rng, t, out = random.Random(seed + 1), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`lorakit serve` in its own process, configured through ServeConfig (the CLI flags are generated from it)."""

    def __init__(self, scheduler: str, adapters_dir: Path, model: str, threads: int, batch: int, dtype: str):
        self.port = free_port()
        config = dict(model=model, adapters_dir=str(adapters_dir), port=self.port, scheduler=scheduler, dtype=dtype,
                      max_batch_size=batch, max_tokens_limit=512, max_step_tokens=batch + 256, prefill_chunk=256)
        code = ("import sys; from lorakit.serve.server import ServeConfig, serve; "
                f"serve(ServeConfig(**{config!r}))")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT.parent / "src")}
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"{scheduler} server exited with {self.proc.returncode}")
            time.sleep(0.5)
        raise SystemExit(f"{scheduler} server did not start")

    def stop(self) -> float:
        rss = peak_rss_mb(self.proc.pid)
        self.proc.terminate()
        self.proc.wait(timeout=60)
        return rss


def send(client, request: dict) -> dict:
    start = time.perf_counter()
    first, text, usage, finish = None, [], None, None
    stream = client.completions.create(model=request["model"], prompt=request["prompt"],
                                       max_tokens=request["max_tokens"], temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices:
            piece = chunk.choices[0].text
            if piece and first is None:
                first = time.perf_counter() - start
            text.append(piece)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    latency = time.perf_counter() - start
    tokens = usage.completion_tokens
    return {"id": request["id"], "text": "".join(text), "tokens": tokens, "ttft": first if first is not None else latency,
            "latency": latency, "tpot": (latency - (first or latency)) / (tokens - 1) if tokens > 1 else None,
            "finish": finish}


def openai_client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)


def drive(url: str, requests: list[dict], times: list[float]) -> tuple[list[dict], float, int]:
    client = openai_client(url)
    results, errors, lock = [None] * len(requests), [], threading.Lock()

    def one(i: int) -> None:
        try:
            results[i] = send(client, requests[i])
        except Exception as e:  # counted, never retried: a 5xx or a dropped stream is a failure of the server
            with lock:
                errors.append(f"{requests[i]['id']}: {type(e).__name__}: {e}")

    threads, start = [], time.perf_counter()
    for i, at in enumerate(times):
        delay = at - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=one, args=(i,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return [r for r in results if r is not None], time.perf_counter() - start, len(errors)


def pct(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v is not None)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[dict], wall: float, errors: int) -> dict:
    tokens = sum(r["tokens"] for r in results)
    return {"requests_ok": len(results), "errors": errors, "output_tokens": tokens, "wall_s": round(wall, 2),
            "output_tok_s": round(tokens / wall, 2),
            "ttft_p50_s": round(pct([r["ttft"] for r in results], 0.5), 3),
            "ttft_p99_s": round(pct([r["ttft"] for r in results], 0.99), 3),
            "tpot_p50_ms": round(1000 * pct([r["tpot"] for r in results], 0.5), 1),
            "tpot_p99_ms": round(1000 * pct([r["tpot"] for r in results], 0.99), 1)}


def profile_step(model_name: str, threads: int, steps: int = 32) -> list[dict]:
    """Where a batch-1 decode step with an adapter goes: Hugging Face's forward (generate_rows) vs the continuous
    engine's runner (fp32 and bf16 base). Wall time per step, and the self time of the operators by kind; what the
    operators do not account for is Python and framework overhead."""
    import torch
    from torch.profiler import profile

    import lorakit as lk
    from lorakit.inference.generate import Row, Sampling, generate_rows
    from lorakit.serve.runner import SlotRunner

    torch.set_num_threads(threads)
    kinds = {"GEMM": ("aten::mm", "aten::addmm", "aten::bmm"), "attention": ("scaled_dot_product", "aten::_softmax"),
             "LoRA routing": ("aten::index", "aten::index_copy", "aten::index_add", "aten::where", "aten::index_put",
                              "aten::_index_put_impl_")}
    out = []
    for dtype in ("float32", "bfloat16"):
        model, tok = lk.load_model(model_name, dtype=dtype)
        model.train(False)
        lk.add_lora(model, lk.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), adapter="x")
        prompt = list(range(1000, 1032))
        runner = SlotRunner(model, 1)
        runner.ensure_capacity(32 + steps + 1)
        runner.refresh_adapters(0)

        def engine_steps():
            runner.prefill(0, prompt, 0, "x", True)
            for i in range(steps):
                runner.decode([0], [1000 + i], [32 + i], ["x"])

        def hf_steps():
            generate_rows(model, tok, [Row(prompt, "x", Sampling(max_new_tokens=steps + 1, ignore_eos=True))])

        for path, run in (("transformers forward (generate_rows)", hf_steps), ("continuous runner", engine_steps)):
            if path.startswith("transformers") and dtype != "float32":
                continue
            run()  # warm-up
            start = time.perf_counter()
            run()
            wall = time.perf_counter() - start
            with profile() as prof:
                run()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events) / 1e6
            shares = {k: sum(e.self_cpu_time_total for e in events if any(n in e.key for n in names)) / 1e6
                      for k, names in kinds.items()}
            row = {"path": path, "dtype": dtype, "ms_per_step": round(1000 * wall / (steps + 1), 1)}
            for k, v in shares.items():
                row[f"{k} %"] = round(100 * v / total, 1)
            row["other ops %"] = round(100 * (total - sum(shares.values())) / total, 1)
            row["operators / wall %"] = round(100 * total / wall, 1)  # the rest: Python and framework overhead
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=128, help="workload size")
    parser.add_argument("--rates", type=float, nargs="*", default=[1.0, 2.0, 4.0],
                        help="Poisson arrival rates (requests/s); the burst always runs")
    parser.add_argument("--mixes", nargs="*", default=["uniform", "80/20"], choices=["uniform", "80/20"])
    parser.add_argument("--servers", nargs="*", default=["static", "continuous"],
                        choices=["static", "continuous", "continuous-bf16"],
                        help="continuous-bf16: the continuous scheduler on a bf16 base (LoRA weights stay fp32)")
    parser.add_argument("--single", type=int, default=4,
                        help="requests sent one at a time (prompt 32 tokens, 128 new) for single-stream decode speed")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 256])
    parser.add_argument("--max-new", type=int, nargs=2, default=[16, 128])
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size of both servers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alone", type=int, default=8, help="requests re-run one at a time for the identity check")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "serve_throughput"))
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="first, profile a batch-1 decode step (transformers forward vs the runner)")
    args = parser.parse_args()

    print(cpu_line(), flush=True)
    profile_rows = profile_step(args.model, args.threads) if args.profile else []
    scenarios = [(None, mix) for mix in args.mixes] + [(rate, "uniform") for rate in args.rates]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapters"
        make_adapters(folder, args.adapters, args.model)
        names = sorted(p.name for p in folder.iterdir())
        from lorakit.models.loading import load_model

        vocab = len(load_model(args.model)[1])
        rows, outputs, alone_mismatch = [], {}, None
        for scheduler in args.servers:
            server = Server(scheduler.split("-")[0], folder, args.model, args.threads, args.batch,
                            "bfloat16" if scheduler.endswith("bf16") else "float32")
            if args.single:
                requests = workload(args.single, args.seed + 7, names, "uniform", (32, 32), (128, 128), vocab)
                results = [send(openai_client(server.url), r) for r in requests]
                decode = [1 / r["tpot"] for r in results]
                row = {"scheduler": scheduler, "arrival": "one at a time", "mix": "uniform",
                       **summarize(results, sum(r["latency"] for r in results), 0),
                       "single_stream_decode_tok_s_p50": round(pct(decode, 0.5), 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            for rate, mix in scenarios:
                requests = workload(args.requests, args.seed, names, mix, args.prompt_len, args.max_new, vocab)
                results, wall, errors = drive(server.url, requests, arrivals(len(requests), rate, args.seed))
                arrival = "burst" if rate is None else f"Poisson {rate:g}/s"
                row = {"scheduler": scheduler, "arrival": arrival, "mix": mix, **summarize(results, wall, errors)}
                rows.append(row)
                outputs[scheduler, arrival, mix] = {r["id"]: r["text"] for r in results}
                print(json.dumps(row), flush=True)
            if scheduler == "continuous" and args.alone:
                requests = workload(args.requests, args.seed, names, "uniform", args.prompt_len, args.max_new, vocab)
                under_load = outputs[scheduler, "burst", "uniform"] if "uniform" in args.mixes else {}
                alone = [send(openai_client(server.url), r) for r in requests[:args.alone]]
                alone_mismatch = sum(a["text"] != under_load.get(a["id"]) for a in alone)
            rss = server.stop()
            for row in rows:
                if row["scheduler"] == scheduler:
                    row["peak_rss_mib"] = round(rss)
            if scheduler == "continuous" and alone_mismatch is not None:
                print(f"continuous: {alone_mismatch} of {args.alone} requests differ from the same request alone",
                      flush=True)
    same = {}
    if "static" in args.servers and "continuous" in args.servers:
        for rate, mix in scenarios:
            arrival = "burst" if rate is None else f"Poisson {rate:g}/s"
            a, b = outputs["static", arrival, mix], outputs["continuous", arrival, mix]
            same[f"{arrival} {mix}"] = {"compared": len(set(a) & set(b)),
                                        "different": sum(a[i] != b[i] for i in set(a) & set(b))}
    lines = [f"{cpu_line()}", "",
             f"SmolLM2-135M-Instruct fp32, {args.adapters} LoRA adapters (r=8, q,v), {args.requests} requests, prompts "
             f"{args.prompt_len[0]}–{args.prompt_len[1]} tokens, {args.max_new[0]}–{args.max_new[1]} new tokens "
             f"(ignore_eos, greedy), max_batch_size {args.batch}, {args.threads} threads, openai client streaming.", "",
             "| server | arrival | adapters | ok | errors | output tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | "
             "TPOT p99 ms | peak RSS MiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scheduler']} | {r['arrival']} | {r['mix']} | {r['requests_ok']} | {r['errors']} | "
                     f"{r['output_tok_s']} | {r['ttft_p50_s']} | {r['ttft_p99_s']} | {r['tpot_p50_ms']} | "
                     f"{r['tpot_p99_ms']} | {r.get('peak_rss_mib')} |")
    lines.append("")
    for key in dict.fromkeys((r["arrival"], r["mix"]) for r in rows):
        tput = {r["scheduler"]: r["output_tok_s"] for r in rows if (r["arrival"], r["mix"]) == key}
        for other in ("continuous", "continuous-bf16"):
            if "static" in tput and other in tput:
                lines.append(f"- {key[0]}, {key[1]}: {other} / static output tok/s = "
                             f"{tput[other] / tput['static']:.2f}x")
    for r in rows:
        if "single_stream_decode_tok_s_p50" in r:
            lines.append(f"- single stream with an adapter, {r['scheduler']}: {r['single_stream_decode_tok_s_p50']} "
                         "tok/s decode (1 / TPOT p50)")
    if profile_rows:
        lines += ["", "Batch-1 decode step with an adapter (32-token prompt, 33 tokens), operator self time by kind "
                  "(% of all operator time) and operator time as a share of wall time:", "",
                  "| path | base | ms/step | " + " | ".join(k for k in profile_rows[0] if k.endswith("%")) + " |",
                  "|---|---|---:|" + "---:|" * sum(k.endswith("%") for k in profile_rows[0])]
        for r in profile_rows:
            lines.append(f"| {r['path']} | {r['dtype']} | {r['ms_per_step']} | "
                         + " | ".join(str(v) for k, v in r.items() if k.endswith("%")) + " |")
    if same:
        lines.append(f"\nGreedy outputs, static vs continuous, request by request: {same}")
    if "continuous" in args.servers and args.alone:
        lines.append(f"Continuous under load (burst, uniform) vs the same request alone: {alone_mismatch} of "
                     f"{args.alone} differ.")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), text)
    atomic_write_text(out.with_suffix(".json"), json.dumps(
        {"cpu": cpu_info(), "args": vars(args), "rows": rows, "decode_step_profile": profile_rows, "static_vs_continuous": same,
         "alone_mismatches": alone_mismatch if args.alone else None}, indent=1) + "\n")


if __name__ == "__main__":
    main()
