"""Serving throughput of `lorakit serve`: the static batcher vs the continuous scheduler, same client, same workload.

SmolLM2-135M-Instruct with 16 LoRA adapters (r=8 on q,v, different random weights). A fixed-seed workload of
--requests requests: prompts of 16–256 random token ids, 16–128 new tokens each (ignore_eos, greedy), adapters chosen
uniformly or 80/20 (80% of requests on 20% of the adapters), arriving as a burst or as a Poisson process at each
--rates. Each server runs in its own process; the client is the `openai` package, streaming, one thread per request.
Reported per (scheduler, arrival, adapter mix): output tok/s (all output tokens / wall time from first send to last
answer), TTFT p50/p99, time per output token p50/p99 ((latency − TTFT)/(tokens − 1) per request) and the server's
peak RSS. Outputs of the two schedulers are compared request by request (greedy: they must be equal), and --alone N
requests are re-run one at a time on the continuous server and compared with their answers under load.

vLLM-CPU (`--servers vllm-fp32 vllm-bf16`) runs in its own venv (--vllm-python) as
`python -m vllm.entrypoints.openai.api_server` on the same base saved as a Hugging Face folder, the same 16 adapter
folders (--lora-modules, --max-loras 16, --max-lora-rank 8), VLLM_CPU_KVCACHE_SPACE=2, VLLM_CPU_OMP_THREADS_BIND
on as many cores as --threads; same client, same workload. `--llama` measures llama.cpp's single-stream decode
(llama-cpp-python in its own venv, f32 and bf16 GGUF of the base + the a00 adapter as a GGUF LoRA, same prompts and
token counts as the single-stream rows). A long benchmark runs in parts: `--merge` adds this run's rows to the
results file (replacing rows of the same server, arrival and adapter mix) instead of starting it anew.

    PYTHONPATH=src python benchmarks/serve_throughput.py --requests 128 --rates 1 2 4
    PYTHONPATH=src python benchmarks/serve_throughput.py --requests 12 --max-new 8 24 --rates 4   # quick check
    PYTHONPATH=src python benchmarks/serve_throughput.py --servers vllm-fp32 --no-profile --merge
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
        with torch.no_grad():  # A and B both from the seed: every run of this script serves the same adapters
            for _, layer in lk.lora_layers(model):
                if name in layer.adapters:
                    a = layer.lora_A[name].weight
                    a.copy_((torch.rand(a.shape, generator=gen) * 2 - 1) / a.shape[1] ** 0.5)  # kaiming-uniform-like
                    w = layer.lora_B[name].weight
                    w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
        lk.save_adapter(model, folder / name, adapter=name)
        lk.delete_adapter(model, name)


def adapters_fingerprint(folder: Path) -> str:
    """A hash of the adapter files, so outputs are compared only between runs that served the same adapters."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


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


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (vLLM runs its engine in child processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def peak_rss_mb(pid: int) -> float:
    """Sum of the peak resident sets (VmHWM) of the server's processes."""
    total = 0.0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status", encoding="utf-8") as f:
                total += next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), 0.0)
        except OSError:
            pass
    return total


class Server:
    """`lorakit serve` in its own process, configured through ServeConfig (the CLI flags are generated from it), or
    vLLM's OpenAI server in its own venv on the same base (saved as a Hugging Face folder) and adapter folders."""

    def __init__(self, scheduler: str, adapters_dir: Path, model: str, threads: int, batch: int, dtype: str,
                 prefill_tokens: int = 256, vllm: tuple[str, Path] | None = None):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="serve-throughput-", suffix=".log", delete=False)
        if vllm is None:
            config = dict(model=model, adapters_dir=str(adapters_dir), port=self.port, scheduler=scheduler,
                          dtype=dtype, max_batch_size=batch, max_tokens_limit=512, max_step_tokens=batch + prefill_tokens,
                          prefill_chunk=256)
            code = ("import sys; from lorakit.serve.server import ServeConfig, serve; "
                    f"serve(ServeConfig(**{config!r}))")
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT.parent / "src")}
            command = [sys.executable, "-c", code]
        else:
            python, base_dir = vllm
            adapters = [f"{p.name}={p}" for p in sorted(adapters_dir.iterdir())]
            command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir),
                       "--served-model-name", "base", "--enable-lora", "--lora-modules", *adapters,
                       "--max-loras", str(len(adapters)), "--max-lora-rank", "8", "--dtype", dtype,
                       "--max-model-len", "2048", "--port", str(self.port), "--host", "127.0.0.1"]
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
            env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(1200):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                tail = Path(self.log.name).read_text(errors="replace")[-3000:]
                raise SystemExit(f"{scheduler} server exited with {self.proc.returncode}; its log ends:\n{tail}")
            time.sleep(0.5)
        self.proc.terminate()
        raise SystemExit(f"{scheduler} server did not start within 10 minutes (log: {self.log.name})")

    def stop(self) -> float:
        rss = peak_rss_mb(self.proc.pid)
        self.proc.terminate()
        self.proc.wait(timeout=120)
        Path(self.log.name).unlink(missing_ok=True)
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
    engine's runner with plain F.linear and with packed base weights (fp32 and bf16 base). Wall time per step, and
    the self time of the operators by kind; what the operators do not account for is Python and framework overhead."""
    import torch
    from torch.profiler import profile

    import lorakit as lk
    from lorakit.inference.generate import Row, Sampling, generate_rows
    from lorakit.serve.runner import SlotRunner

    torch.set_num_threads(threads)
    kinds = {"GEMM": ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise"),
             "attention": ("scaled_dot_product", "aten::_softmax"),
             "LoRA routing": ("aten::index", "aten::index_copy", "aten::index_add", "aten::where", "aten::index_put",
                              "aten::_index_put_impl_")}
    out = []
    for dtype in ("float32", "bfloat16"):
        model, tok = lk.load_model(model_name, dtype=dtype)
        model.train(False)
        lk.add_lora(model, lk.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), adapter="x")
        prompt = list(range(1000, 1032))

        def engine_steps(runner):
            runner.refresh_adapters(0)
            runner.refresh_weights()
            runner.prefill(0, prompt, 0, "x", True)
            for i in range(steps):
                runner.decode([0], [1000 + i], [32 + i], ["x"])

        def hf_steps():
            generate_rows(model, tok, [Row(prompt, "x", Sampling(max_new_tokens=steps + 1, ignore_eos=True))])

        paths = [("continuous runner, F.linear", False), ("continuous runner, packed", True)]
        for path, packed in ([("transformers forward (generate_rows)", None)] if dtype == "float32" else []) + paths:
            if packed is None:
                run = hf_steps
            else:
                runner = SlotRunner(model, 1, pack=packed)
                runner.ensure_capacity(32 + steps + 1)
                run = lambda runner=runner: engine_steps(runner)  # noqa: E731
            run()  # warm-up (and packing)
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
        del model
    return out


def llama_single(model_name: str, adapter_dir: Path, prompts: list[list[int]], n_new: int, threads: int,
                 python: str | None) -> list[dict]:
    """llama.cpp's single-stream decode speed with the same adapter: f32 and bf16 GGUF of the base (f32 and f16
    KV cache, as lorakit's fp32 and bf16 caches) + the adapter as an f32 GGUF LoRA."""
    from lorakit.export.gguf import export_adapter_gguf
    from lorakit.export.gguf_model import export_merged_gguf
    from lorakit.export.llamacpp import run_llama_cpp

    with tempfile.TemporaryDirectory(prefix="serve-throughput-gguf-") as tmp:
        export_adapter_gguf(adapter_dir, Path(tmp) / "adapter.gguf", dtype="f32", base_name_or_path=model_name)
        runs = []
        for quant in ("f32", "bf16"):
            export_merged_gguf(model_name, Path(tmp) / f"base-{quant}.gguf", quant=quant, modelfile=False)
            runs.append({"name": f"llama.cpp {quant}", "model": str(Path(tmp) / f"base-{quant}.gguf"),
                         "lora": str(Path(tmp) / "adapter.gguf"), "kv_f32": quant == "f32"})
        res = run_llama_cpp(runs, prompts, n_new=n_new, threads=threads, n_ctx=512, python=python)
    rows = []
    for run in runs:
        r = res["runs"][run["name"]]
        speeds = [(n_new - 1) / t for t in r["decode_s"]]
        rows.append({"engine": run["name"] + " + LoRA", "dtype": run["name"].split()[-1],
                     "kv_cache": "f32" if run["kv_f32"] else "f16", "prompts": len(prompts),
                     "new_tokens": n_new, "decode_tok_s_p50": round(pct(speeds, 0.5), 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def key(row: dict) -> str:
    return f"{row['scheduler']}|{row['arrival']}|{row['mix']}"


def render(data: dict) -> str:
    a = data["args"]
    rows = data["rows"]
    lines = [data["cpu_line"], "",
             f"SmolLM2-135M-Instruct, {a['adapters']} LoRA adapters (r=8, q,v), {a['requests']} requests, prompts "
             f"{a['prompt_len'][0]}–{a['prompt_len'][1]} tokens, {a['max_new'][0]}–{a['max_new'][1]} new tokens "
             f"(ignore_eos, greedy), max_batch_size {a['batch']} (lorakit), {a['threads']} threads, openai client "
             "streaming. continuous = this scheduler on an fp32 base, continuous-bf16 on a bf16 base (LoRA deltas in bf16), "
             "static = the earlier batcher (fp32), vllm-* = vLLM-CPU at that dtype.", "",
             "| server | arrival | adapters | ok | errors | output tok/s | TTFT p50 s | TTFT p99 s | TPOT p50 ms | "
             "TPOT p99 ms | peak RSS MiB | machine load |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    order = ["static", "continuous", "continuous-bf16", "vllm-fp32", "vllm-bf16"]
    for r in sorted(rows, key=lambda r: order.index(r["scheduler"]) if r["scheduler"] in order else 99):
        lines.append(f"| {r['scheduler']} | {r['arrival']} | {r['mix']} | {r['requests_ok']} | {r['errors']} | "
                     f"{r['output_tok_s']} | {r['ttft_p50_s']} | {r['ttft_p99_s']} | {r['tpot_p50_ms']} | "
                     f"{r['tpot_p99_ms']} | {r.get('peak_rss_mib')} | {r.get('load', '')} |")
    lines.append("")
    by = {(r["scheduler"], r["arrival"], r["mix"]): r for r in rows}
    for arrival, mix in dict.fromkeys((r["arrival"], r["mix"]) for r in rows):
        for ours, theirs in (("continuous", "static"), ("continuous-bf16", "static"), ("continuous", "vllm-fp32"),
                             ("continuous-bf16", "vllm-bf16")):
            x, y = by.get((ours, arrival, mix)), by.get((theirs, arrival, mix))
            if x and y and y["output_tok_s"]:
                text = f"- {arrival}, {mix}: {ours} / {theirs} output tok/s = {x['output_tok_s'] / y['output_tok_s']:.2f}x"
                if theirs.startswith("vllm") and arrival != "one at a time":
                    text += f"; TTFT p99 {x['ttft_p99_s']} s vs {y['ttft_p99_s']} s"
                lines.append(text)
    single = [r for r in rows if "single_stream_decode_tok_s_p50" in r]
    if single or data.get("llama"):
        lines += ["", "Single-stream decode with an adapter (prompt 32 tokens, 128 new; lorakit and vLLM through "
                  "HTTP streaming, 1 / TPOT p50; llama.cpp in-process, llama-cpp-python, tokens after the prompt):", "",
                  "| engine | decode tok/s | vs llama.cpp at equal precision |", "|---|---:|---:|"]
        llama = {r["dtype"]: r["decode_tok_s_p50"] for r in data.get("llama", [])}
        for r in single:
            dt = "bf16" if r["scheduler"].endswith("bf16") else "f32"
            ratio = f"{r['single_stream_decode_tok_s_p50'] / llama[dt]:.2f}x" if dt in llama else ""
            engine = r["scheduler"] if r["scheduler"].startswith("vllm") else f"lorakit {r['scheduler']}"
            lines.append(f"| {engine} ({dt}) | {r['single_stream_decode_tok_s_p50']} | {ratio} |")
        for r in data.get("llama", []):
            lines.append(f"| {r['engine']} ({r['kv_cache']} KV cache) | {r['decode_tok_s_p50']} | 1.00x |")
    profile_rows = data.get("decode_step_profile") or []
    if profile_rows:
        cols = [k for k in profile_rows[0] if k.endswith("%")]
        lines += ["", "Batch-1 decode step with an adapter (32-token prompt, 33 tokens), operator self time by kind "
                  "(% of all operator time) and operator time as a share of wall time:", "",
                  "| path | base | ms/step | " + " | ".join(cols) + " |", "|---|---|---:|" + "---:|" * len(cols)]
        for r in profile_rows:
            lines.append(f"| {r['path']} | {r['dtype']} | {r['ms_per_step']} | "
                         + " | ".join(str(r.get(k)) for k in cols) + " |")
    same, skipped = {}, []
    outputs, served = data.get("outputs", {}), data.get("output_adapters") or {}
    for k, b in outputs.items():
        scheduler, arrival, mix = k.split("|")
        for ours, theirs in (("continuous", "static"), ("continuous", "vllm-fp32")):
            other = f"{theirs}|{arrival}|{mix}"
            if scheduler != ours or other not in outputs:
                continue
            if served.get(k) is None or served.get(k) != served.get(other):  # other adapter weights: not comparable
                skipped.append(f"{theirs} {arrival} {mix}")
                continue
            a_ = outputs[other]
            common = set(a_) & set(b)
            same[f"{theirs} {arrival} {mix}"] = {"compared": len(common), "different": sum(a_[i] != b[i] for i in common)}
    if same:
        lines.append(f"\nGreedy outputs vs continuous (all fp32), request by request: {same}")
    if skipped:
        lines.append(f"Not compared (served adapters that differ from the continuous run's): {', '.join(skipped)}")
    for name, v in (data.get("alone_mismatches") or {}).items():
        lines.append(f"{name} under load (burst, uniform) vs the same request alone: {v[0]} of {v[1]} differ.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=128, help="workload size")
    parser.add_argument("--rates", type=float, nargs="*", default=[1.0, 2.0, 4.0],
                        help="Poisson arrival rates (requests/s), adapters uniform")
    parser.add_argument("--mixes", nargs="*", default=["uniform", "80/20"], choices=["uniform", "80/20"],
                        help="adapter mixes of the burst")
    parser.add_argument("--rate-mixes", nargs="*", default=["uniform"], choices=["uniform", "80/20"],
                        help="adapter mixes of each Poisson rate")
    parser.add_argument("--servers", nargs="*", default=["static", "continuous"],
                        choices=["static", "continuous", "continuous-bf16", "vllm-fp32", "vllm-bf16"],
                        help="continuous-bf16: the continuous scheduler on a bf16 base (LoRA deltas in bf16); "
                             "vllm-*: vLLM-CPU in its own venv (--vllm-python) at that dtype")
    parser.add_argument("--single", type=int, default=4,
                        help="requests sent one at a time (prompt 32 tokens, 128 new) for single-stream decode speed")
    parser.add_argument("--llama", action="store_true",
                        help="also measure llama.cpp's single-stream decode (f32 and bf16 GGUF + the a00 adapter)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 256])
    parser.add_argument("--max-new", type=int, nargs=2, default=[16, 128])
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size of the lorakit servers")
    parser.add_argument("--prefill-tokens", type=int, default=256,
                        help="prompt tokens a step of the lorakit servers may prefill beside its decode rows "
                             "(max_step_tokens = --batch + this; chunks of 256)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alone", type=int, default=8, help="requests re-run one at a time for the identity check")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-python", default="/work/venvs/vllm/bin/python",
                        help="python of a venv with vllm-cpu installed")
    parser.add_argument("--llama-python", default=None, help="python of a venv with llama-cpp-python")
    parser.add_argument("--out", default=str(RESULTS / "serve_throughput"))
    parser.add_argument("--merge", action="store_true",
                        help="add this run's rows to the existing results file instead of replacing it")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="first, profile a batch-1 decode step (transformers forward vs the runner)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.merge and not out.with_suffix(".json").is_file():
        raise SystemExit(f"--merge: no results file {out.with_suffix('.json')} to add to")
    if any(s.startswith("vllm") for s in args.servers) and not Path(args.vllm_python).is_file():
        raise SystemExit(f"--vllm-python {args.vllm_python} does not exist; install vllm-cpu in its own venv (see "
                         "benchmarks/README.md) or leave vllm-* out of --servers")

    print(cpu_line(), flush=True)
    data = {"cpu": cpu_info(), "cpu_line": cpu_line(), "args": vars(args), "rows": [], "outputs": {},
            "decode_step_profile": [], "llama": [], "alone_mismatches": {}, "output_adapters": {}}
    if args.merge:
        old = json.loads(out.with_suffix(".json").read_text())
        for k in ("rows", "outputs", "decode_step_profile", "llama", "alone_mismatches", "output_adapters"):
            data[k] = old.get(k) or data[k]
    if args.profile:
        data["decode_step_profile"] = profile_step(args.model, args.threads)
    scenarios = [(None, mix) for mix in args.mixes] + [(rate, mix) for rate in args.rates for mix in args.rate_mixes]
    new_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapters"
        make_adapters(folder, args.adapters, args.model)
        names = sorted(p.name for p in folder.iterdir())
        fingerprint = adapters_fingerprint(folder)
        from lorakit.models.loading import load_model

        base, tokenizer = load_model(args.model)
        vocab = len(tokenizer)
        single_requests = workload(args.single, args.seed + 7, names, "uniform", (32, 32), (128, 128), vocab)
        if any(s.startswith("vllm") for s in args.servers):
            from lorakit.models.loading import quiet_loading

            with quiet_loading():
                base.save_pretrained(Path(tmp) / "base")
            tokenizer.save_pretrained(Path(tmp) / "base")
        del base
        if args.llama:
            data["llama"] = llama_single(args.model, folder / names[0], [r["prompt"] for r in single_requests], 128,
                                         args.threads, args.llama_python)
        for scheduler in args.servers:
            kind, dtype = scheduler.split("-")[0], "bfloat16" if scheduler.endswith("bf16") else "float32"
            server = Server(kind, folder, args.model, args.threads, args.batch, dtype, args.prefill_tokens,
                            vllm=(args.vllm_python, Path(tmp) / "base") if kind == "vllm" else None)
            mine = []
            if args.single:
                requests = [dict(r, model="a00") for r in single_requests]
                results = [send(openai_client(server.url), r) for r in requests]
                decode = [1 / r["tpot"] for r in results]
                mine.append({"scheduler": scheduler, "arrival": "one at a time", "mix": "a00",
                             **summarize(results, sum(r["latency"] for r in results), 0),
                             "single_stream_decode_tok_s_p50": round(pct(decode, 0.5), 1)})
                print(json.dumps(mine[-1]), flush=True)
            for rate, mix in scenarios:
                requests = workload(args.requests, args.seed, names, mix, args.prompt_len, args.max_new, vocab)
                load = os.getloadavg()[0]
                results, wall, errors = drive(server.url, requests, arrivals(len(requests), rate, args.seed))
                arrival = "burst" if rate is None else f"Poisson {rate:g}/s"
                mine.append({"scheduler": scheduler, "arrival": arrival, "mix": mix, **summarize(results, wall, errors),
                             "load": f"{load:.1f} → {os.getloadavg()[0]:.1f}"})
                data["outputs"][key(mine[-1])] = {str(r["id"]): r["text"] for r in results}
                data["output_adapters"][key(mine[-1])] = fingerprint
                print(json.dumps(mine[-1]), flush=True)
            if kind == "continuous" and args.alone and "uniform" in args.mixes:
                requests = workload(args.requests, args.seed, names, "uniform", args.prompt_len, args.max_new, vocab)
                under_load = data["outputs"][f"{scheduler}|burst|uniform"]
                alone = [send(openai_client(server.url), r) for r in requests[:args.alone]]
                data["alone_mismatches"][scheduler] = [sum(a["text"] != under_load.get(str(a["id"])) for a in alone),
                                                       len(alone)]
                print(f"{scheduler}: {data['alone_mismatches'][scheduler][0]} of {len(alone)} requests differ from "
                      "the same request alone", flush=True)
            rss = server.stop()
            for row in mine:
                row["peak_rss_mib"] = round(rss)
                if kind != "vllm":
                    row.update(max_batch_size=args.batch, max_step_tokens=args.batch + args.prefill_tokens)
            new_rows += mine
    replaced = {key(r) for r in new_rows}
    data["rows"] = [r for r in data["rows"] if key(r) not in replaced] + new_rows
    text = render(data)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), text)
    atomic_write_text(out.with_suffix(".json"), json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
