"""Run llama.cpp itself (llama-cpp-python, installed in its own venv: $LORAKIT_LLAMA_PYTHON or /work/venvs/llama) on
exported GGUF files: greedy tokens, decode times and logits, for the tests and benchmarks/llama_cpp_check.py."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lorakit.errors import LorakitError

LLAMA_CPP_WORKER = r'''
import json, sys, time
import numpy as np
from llama_cpp import Llama

job = json.load(sys.stdin)
out = {"runs": {}}
for run in job["runs"]:
    kwargs = dict(model_path=run["model"], n_ctx=job.get("n_ctx", 512), n_batch=job.get("n_batch", 512),
                  n_threads=job.get("threads", 2), logits_all=True, verbose=bool(job.get("verbose")), seed=0)
    if run.get("kv_f32"):  # llama.cpp's default KV cache is f16; f32 makes the comparison exact up to fp32 rounding
        kwargs["type_k"] = kwargs["type_v"] = 0  # GGML_TYPE_F32
    if run.get("lora"):
        kwargs["lora_path"] = run["lora"]
        kwargs["lora_scale"] = float(run.get("lora_scale", 1.0))
    t0 = time.perf_counter()
    llm = Llama(**kwargs)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    res = {"tokens": [], "decode_s": [], "load_s": load_s, "n_vocab": n_vocab}
    forced = []
    for p, prompt in enumerate(job["prompts"]):
        llm.reset()
        llm.eval(list(prompt))
        toks = []
        t0 = time.perf_counter()
        for _ in range(job["n_new"]):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            toks.append(tok)
            if len(toks) < job["n_new"]:  # n_new tokens take n_new - 1 decode steps after the prompt
                llm.eval([tok])
        res["decode_s"].append(time.perf_counter() - t0)
        res["tokens"].append(toks)
        seqs = run.get("forced") or job.get("forced")
        if seqs:
            seq = seqs[p]
            llm.reset()
            llm.eval(list(seq))
            start = len(seq) - job["n_forced"]
            forced.append(np.array(llm.scores[start - 1 : len(seq) - 1], dtype=np.float32))
    if forced:
        path = f'{job["logits_dir"]}/{run["name"]}.npy'
        np.save(path, np.stack(forced))
        res["logits"] = path
    if job.get("texts") and "tokenized" not in out:
        out["tokenized"] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in job["texts"]]
    out["runs"][run["name"]] = res
    del llm
json.dump(out, sys.stdout)
'''


def llama_cpp_python() -> str | None:
    """The Python of a venv with llama-cpp-python: $LORAKIT_LLAMA_PYTHON, else /work/venvs/llama/bin/python."""
    env = os.environ.get("LORAKIT_LLAMA_PYTHON")
    for cand in ([env] if env else []) + ["/work/venvs/llama/bin/python"]:
        if cand and Path(cand).is_file():
            return cand
    return None


def run_llama_cpp(runs: Sequence[dict[str, Any]], prompts: Sequence[Sequence[int]], n_new: int,
                  forced: Sequence[Sequence[int]] | None = None, n_forced: int = 0, threads: int = 2,
                  n_ctx: int = 512, python: str | None = None, timeout: float = 1800,
                  texts: Sequence[str] | None = None) -> dict[str, Any]:
    """Run llama.cpp (llama-cpp-python, in its own venv's `python`) on token ids: per run ({"name", "model",
    "lora", optional "forced", optional "kv_f32": an f32 instead of llama.cpp's default f16 KV cache}), greedy
    `n_new` tokens for every prompt (argmax of llama.cpp's own logits) with decode times, and, when `forced`
    sequences are given (per run or for all), llama.cpp's logits predicting their last `n_forced` tokens (returned
    as arrays (prompts, n_forced, vocab)). `texts` are also tokenized by the first run's model ("tokenized")."""
    python = python or llama_cpp_python()
    if python is None:
        raise LorakitError("No llama-cpp-python found: set LORAKIT_LLAMA_PYTHON to the python of a venv with "
                           "llama-cpp-python installed.")
    with tempfile.TemporaryDirectory(prefix="lorakit-llamacpp-") as tmp:
        job = {"runs": list(runs), "prompts": [list(map(int, p)) for p in prompts], "n_new": n_new,
               "threads": threads, "n_ctx": n_ctx, "logits_dir": tmp,
               "forced": [list(map(int, s)) for s in forced] if forced else None, "n_forced": n_forced,
               "texts": list(texts) if texts else None}
        try:
            proc = subprocess.run([python, "-c", LLAMA_CPP_WORKER], input=json.dumps(job), capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LorakitError(f"llama.cpp did not finish within {timeout:g} s ({len(runs)} runs x {len(prompts)} "
                               "prompts); on a busy machine use fewer threads or a longer timeout.") from None
        if proc.returncode != 0:
            raise LorakitError(f"llama.cpp run failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
        result = json.loads(proc.stdout)
        for res in result["runs"].values():
            if "logits" in res:
                res["logits"] = np.load(res["logits"])
    return result
