"""Where the memory of a `lorakit train` run goes (issue 19): one run like benchmarks/finetune.py's lorakit rows,
instrumented, in its own process.

The run is finetune.py's own (its data files, its `lorakit train` command line, its row of tokens/s and MFU: this
script calls `finetune.train_run` and only swaps the child process for an instrumented one). The child reports:

- RSS by phase, sampled every 5 ms by a thread reading /proc/self/status (the maximum within a phase and the value at
  its end; anonymous and file-backed parts): imports (torch, transformers' model code, lorakit), tokenizer and data,
  model load (`load_model`), base preparation (LoRA added, base cast, fused MLP; up to the first forward), training
  (first forward to the last optimizer step; also per step), and the end (final evaluation if any, saving). The
  process's true peak is `wait4`'s max RSS, as in finetune.py; a sample can miss a spike shorter than 5 ms.
- A torch-level estimate: the weights by dtype, the LoRA parameters + gradients + AdamW state, the tensors autograd
  keeps for backward in a step (counted by a saved-tensors hook: unique storages, parameters excluded; the largest
  step), and the loss head's vocab-sized buffers (what a full logits tensor of that step would have been).

    flock /tmp/lorakit-bench.lock .venv/bin/python benchmarks/finetune_memory.py          # lk-default, 1 epoch
    flock /tmp/lorakit-bench.lock .venv/bin/python benchmarks/finetune_memory.py --runs lk-default,lk-compile
    .venv/bin/python benchmarks/finetune_memory.py --quick                                 # 4 steps, 32 examples

Kinds: finetune.py's lorakit kinds, plus `lk-compile` (`lorakit train --set compile=true`). The saved-tensors hook is off in
compiled runs (a compiled graph saves its own tensors), so their activation estimate is empty.
Writes benchmarks/results/finetune_memory.{md,json} (--quick: benchmarks/runs/finetune/finetune_memory_quick.*).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune as ft  # noqa: E402  the run, its data and its row are finetune.py's

KINDS = {**{k: v for k, v in ft.KINDS.items() if v["framework"] == "lorakit"},
         "lk-trim": {"framework": "lorakit", "argv": ["--set", "malloc_trim=true"],
                     "label": "lorakit train --set malloc_trim=true (defaults otherwise)"},
         "lk-notrim": {"framework": "lorakit", "argv": ["--set", "malloc_trim=false"],
                       "label": "lorakit train --set malloc_trim=false (defaults otherwise)"},
         "lk-compile": {"framework": "lorakit", "argv": ["--set", "compile=true"],
                        "label": "lorakit train --set compile=true (defaults otherwise)"}}
PHASES = ("imports", "tokenizer and data", "model load", "base preparation", "training", "end (eval, save)")
SAMPLE_SECONDS = 0.005
ACCOUNTING = [True]  # the saved-tensors hook in the children (off with --timing)


# ---------------------------------------------------------------------------------------------------- the child
def _status() -> dict[str, float]:
    """VmRSS, RssAnon and RssFile of this process in MiB."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


class Recorder:
    """RSS by phase: a thread samples /proc/self/status; `mark(phase)` closes the current phase."""

    def __init__(self) -> None:
        self.phase, self.phases, self.steps = "imports", {}, []
        self.step_peak = 0.0
        self._lock = threading.Lock()
        self._open("imports")
        threading.Thread(target=self._sample, daemon=True).start()

    def _open(self, phase: str) -> None:
        """Start (or, for training and the end, which alternate around each step's end, continue) a phase."""
        self.phase = phase
        self.phases.setdefault(phase, {"max_rss_mib": 0.0, "max_anon_mib": 0.0, "max_file_mib": 0.0})

    def _take(self) -> dict[str, float]:
        s = _status()
        with self._lock:
            p = self.phases[self.phase]
            p["max_rss_mib"] = max(p["max_rss_mib"], s["VmRSS"])
            p["max_anon_mib"] = max(p["max_anon_mib"], s["RssAnon"])
            p["max_file_mib"] = max(p["max_file_mib"], s["RssFile"])
            self.step_peak = max(self.step_peak, s["VmRSS"])
        return s

    def _sample(self) -> None:
        while True:
            self._take()
            time.sleep(SAMPLE_SECONDS)

    def mark(self, next_phase: str) -> None:
        s = self._take()
        with self._lock:
            self.phases[self.phase].update({"end_rss_mib": s["VmRSS"], "end_anon_mib": s["RssAnon"],
                                            "end_file_mib": s["RssFile"]})
            self._open(next_phase)

    def step(self, record: dict[str, Any]) -> None:
        s = self._take()
        with self._lock:
            self.steps.append({**record, "peak_rss_mib": self.step_peak, "end_rss_mib": s["VmRSS"]})
            self.step_peak = s["VmRSS"]


class SavedTensors:
    """Bytes of the tensors autograd keeps for backward in each step (unique storages, parameters excluded)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}
        self.params: set[int] = set()

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params:
            self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    @staticmethod
    def unpack(t):
        return t

    def take(self) -> int:
        total, self.storages = sum(self.storages.values()), {}
        return total


def child_memory(spec: dict[str, Any]) -> dict[str, Any]:
    rec = Recorder()
    import lorakit  # noqa: F401  first: it sets the allocator's huge-page switch before torch makes any tensor
    import torch
    from torch import nn
    from transformers import AutoTokenizer  # noqa: F401

    import lorakit.models.loading as loading
    import lorakit.train  # noqa: F401

    loading.import_model_code()
    rec.mark("tokenizer and data")
    saved = SavedTensors()
    state: dict[str, Any] = {"model": None, "shape": None}
    load_model = loading.load_model

    def record_shape(module, args):
        if module.training and args and hasattr(args[0], "dim") and args[0].dim() == 2:
            state["shape"] = list(args[0].shape)
            if rec.phase != "training":  # the next step began (after a step's end was marked as the end phase)
                rec.mark("training")

    def instrumented_load(*args, **kwargs):
        rec.mark("model load")
        model, tokenizer = load_model(*args, **kwargs)
        rec.mark("base preparation")
        state["model"] = model
        model.get_input_embeddings().register_forward_pre_hook(record_shape)
        return model, tokenizer

    def first_forward(module, args):
        if not (module.training and torch.is_grad_enabled()):  # e.g. the packing check's forward, before training
            return
        state["hook"].remove()
        saved.params = {p.untyped_storage().data_ptr() for p in state["model"].parameters()}
        rec.mark("training")

    def step_end(optimizer, args, kwargs):
        rec.step({"step": len(rec.steps) + 1, "shape": state["shape"],
                  "saved_for_backward_mib": saved.take() / 2 ** 20})
        rec.mark("end (eval, save)")  # until the next step's first forward, if there is one

    loading.load_model = instrumented_load  # marks the phases' edges; the call itself goes through unchanged
    state["hook"] = nn.modules.module.register_module_forward_pre_hook(first_forward)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(step_end)
    hooks = None
    if spec["accounting"]:
        hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack)
        hooks.__enter__()
    result = ft.child_lorakit(spec)
    if hooks is not None:
        hooks.__exit__(None, None, None)
    rec.mark("after")
    return {**result, "memory": {"phases": {k: v for k, v in rec.phases.items() if k != "after"},
                                 "steps": rec.steps, "torch": torch_estimate(state["model"], rec.steps)}}


def torch_estimate(model, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """What the tensors themselves take: weights by dtype, trainable state, saved activations, loss buffers."""
    import torch

    from lorakit.train.losses import _default_chunk

    seen, by_dtype = set(), {}
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        key = str(t.dtype).replace("torch.", "")
        by_dtype[key] = by_dtype.get(key, 0) + t.untyped_storage().nbytes()
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_bytes = sum(p.numel() * p.element_size() for p in trainable)
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk = _default_chunk(vocab)
    head_dtype = model.get_output_embeddings().weight.dtype
    largest = max(steps, key=lambda s: s["saved_for_backward_mib"], default=None)
    biggest = max(steps, key=lambda s: s["shape"][0] * s["shape"][1] if s.get("shape") else 0, default=None)
    positions = biggest["shape"][0] * biggest["shape"][1] if biggest and biggest.get("shape") else 0
    rows = min(chunk, positions)
    extra = 0 if head_dtype == torch.float32 else rows * vocab * torch.finfo(head_dtype).bits // 8  # its own buffer
    mib = 2 ** 20
    return {
        "weights_mib_by_dtype": {k: v / mib for k, v in by_dtype.items()},
        "weights_mib": sum(by_dtype.values()) / mib,
        "lora_params_mib": lora_bytes / mib, "lora_grads_mib": lora_bytes / mib, "adamw_state_mib": 2 * lora_bytes / mib,
        "saved_for_backward_max_mib": largest["saved_for_backward_mib"] if largest else None,
        "saved_for_backward_step": {k: largest[k] for k in ("step", "shape")} if largest else None,
        "largest_batch_shape": biggest["shape"] if biggest else None,
        "loss_chunk_rows": chunk, "vocab": vocab,
        "loss_buffers_mib": (rows * vocab * 4 + extra) / mib,
        "full_logits_fp32_mib_largest_batch": positions * vocab * 4 / mib,
    }


# ---------------------------------------------------------------------------------------------------- the parent
def spawn(python: str, mode: str, spec: dict[str, Any], log: Path, threads: int) -> dict[str, Any]:
    """finetune.spawn's contract (process wall, wait4 peak RSS, the child's result) for this file's child."""
    spec_file = log.with_suffix(".spec.json")
    spec = {**spec, "result_file": str(log.with_suffix(".result.json")), "accounting": ACCOUNTING[0]
            and not any("compile=true" in a for a in spec["argv"])}
    Path(spec["result_file"]).unlink(missing_ok=True)
    spec_file.write_text(json.dumps(spec, indent=1))
    env = {**os.environ, **ft.CHILD_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--child", str(spec_file)],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=str(ft.ROOT), env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if code != 0 or not Path(spec["result_file"]).is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{mode} child exited with {code}; the end of {log}:\n{tail}")
    return {"process_seconds": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
            **json.loads(Path(spec["result_file"]).read_text())}


def row_lines(key: str, r: dict[str, Any]) -> list[str]:
    m, t = r["memory"], r["memory"]["torch"]
    summary = r.get("summary", {})
    lines = [f"## {r['label']}" + (" (with a final evaluation)" if r.get("eval") else "")
             + (f", {r['steps']} steps on {r['examples']} examples" if r.get("steps") else ""), "",
             f"Measured {r['measured_at']} at {r['lorakit_commit']}: `{r['benchmark_command']}`", "",
             *([f"Note: {r['note']}", ""] if r.get("note") else []),
             f"`{r['command']}`", "",
             f"Peak RSS (wait4): **{r['peak_rss_mib'] / 1024:.2f} GiB** ({r['peak_rss_mib']:.0f} MiB); train wall "
             f"{r['train_seconds']:.1f} s, {r['tokens_per_s']:.0f} real tokens/s, median step "
             f"{r['median_step_seconds']:.2f} s, first step {r['first_step_seconds']:.2f} s"
             + (f", compile {summary['compile time (s)']} s" if "compile time (s)" in summary else "") + ".", "",
             "| phase | max RSS (MiB) | RSS at its end (MiB) | anon at end | file-backed at end | max file-backed |",
             "|---|---:|---:|---:|---:|---:|"]
    for phase in PHASES:
        p = m["phases"].get(phase)
        if p:
            lines.append(f"| {phase} | {p['max_rss_mib']:.0f} | {p.get('end_rss_mib', 0):.0f} | "
                         f"{p.get('end_anon_mib', 0):.0f} | {p.get('end_file_mib', 0):.0f} | {p['max_file_mib']:.0f} |")
    steps = m["steps"]
    if steps:
        top = max(steps, key=lambda s: s["peak_rss_mib"])
        lines += ["", f"Training steps: RSS at the end of step 1 {steps[0]['end_rss_mib']:.0f} MiB, of the last "
                      f"{steps[-1]['end_rss_mib']:.0f} MiB; the highest sampled peak {top['peak_rss_mib']:.0f} MiB in "
                      f"step {top['step']} (batch {top['shape']})."]
    w = ", ".join(f"{k} {v:.0f}" for k, v in t["weights_mib_by_dtype"].items())
    saved = t["saved_for_backward_max_mib"]
    lines += ["", "| torch-level | MiB |", "|---|---:|",
              f"| weights and buffers ({w}) | {t['weights_mib']:.0f} |",
              f"| LoRA parameters / gradients / AdamW state | {t['lora_params_mib']:.1f} / {t['lora_grads_mib']:.1f} / "
              f"{t['adamw_state_mib']:.1f} |",
              f"| kept for backward, largest step ({t['saved_for_backward_step']['shape'] if saved else '–'}) | "
              + (f"{saved:.0f} |" if saved else "– (compiled) |"),
              f"| loss head buffers ({t['loss_chunk_rows']} rows × {t['vocab']} vocab) | {t['loss_buffers_mib']:.0f} |",
              f"| (a full fp32 logits tensor of the largest batch {t['largest_batch_shape']} would be) | "
              f"{t['full_logits_fp32_mib_largest_batch']:.0f} |", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--runs", default="lk-default", help=f"comma list of {', '.join(KINDS)}")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 1 epoch)")
    parser.add_argument("--eval", action="store_true", help="also a final evaluation on finetune.py's E2E dev pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=str(ft.ROOT.parent / "shared" / "data"))
    parser.add_argument("--quick", action="store_true", help="32 examples, 4 steps; results under benchmarks/runs/")
    parser.add_argument("--name", default=None, help="results file name (default finetune_memory)")
    parser.add_argument("--timing", action="store_true",
                        help="no saved-tensors hook (it costs time): rows for comparing speed, keyed KIND/timed")
    parser.add_argument("--merge", action="store_true", help="keep the other rows of an earlier results file")
    parser.add_argument("--note", default=None, help="a note shown with this invocation's rows")
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(spec["result_file"]).write_text(json.dumps(child_memory(spec), indent=1))
        return
    kinds = [k.strip() for k in args.runs.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise SystemExit(f"unknown {bad}; choose from {list(KINDS)}")
    if args.quick:
        args.examples, args.steps = 32, 4
    args.eval_examples, args.batch_size, args.lr, args.seed = 128, 8, 2e-4, 0
    args.work = ft.WORK / ("memory-quick" if args.quick else "memory")
    name = args.name or ("finetune_memory_quick" if args.quick else "finetune_memory")
    out_dir = ft.WORK if args.quick else ft.RESULTS

    sys.path.insert(0, str(ft.ROOT / "src"))
    from lorakit.fsutil import atomic_write_text
    from lorakit.hardware import cpu_info, cpu_line
    from lorakit.models.loading import resolve_model_path

    ft.KINDS.update(KINDS)  # train_run looks its kind up there
    ft.spawn = spawn  # train_run's child: this file's instrumented one
    model_path = resolve_model_path("smollm2-135m")
    ctx: dict[str, Any] = {"args": args, "features": ft.lorakit_features(), "shape": ft.model_shape(model_path),
                           "data": {"e2e": ft.make_data(args, "e2e")}, "source": ft.source_state()}
    ctx["lk_tokens"] = {"e2e": ft.lorakit_tokens(model_path, "e2e", ctx["data"]["e2e"]["train_file"])}
    print(cpu_line(), flush=True)
    ctx["peak"] = ft.gemm_peak(args.threads, 1024 if args.quick else 2048, 3 if args.quick else 10)
    if args.eval:
        for kind in kinds:
            KINDS[kind] = {**KINDS[kind], "argv": [*KINDS[kind]["argv"], "--set",
                                                   f"data.eval_file={ctx['data']['e2e']['eval_file']}"]}
        ft.KINDS.update(KINDS)
    ACCOUNTING[0] = not args.timing
    command = "flock /tmp/lorakit-bench.lock .venv/bin/python benchmarks/finetune_memory.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    path_json = out_dir / f"{name}.json"
    rows = json.loads(path_json.read_text())["results"] if args.merge and path_json.exists() else {}
    for kind in kinds:
        key = kind + ("/eval" if args.eval else "") + ("/timed" if args.timing else "")
        rows[key] = {**ft.train_run(ctx, "e2e", "qv", kind), "benchmark_command": command, "timing": args.timing,
                     "examples": args.examples, "steps": args.steps, "eval": args.eval, "note": args.note}
        print(f"[{key}] peak RSS {rows[key]['peak_rss_mib']:.0f} MiB", flush=True)
    write_report(out_dir, name, rows, ctx)


def write_report(out_dir: Path, name: str, rows: dict[str, dict[str, Any]], ctx: dict[str, Any]) -> None:
    from lorakit.fsutil import atomic_write_text
    from lorakit.hardware import cpu_info, cpu_line

    header = [f"# Where `lorakit train`'s memory goes ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
              cpu_line(), "",
              f"finetune.py's E2E run: {ctx['data']['e2e']['source']}; SmolLM2-135M-Instruct, LoRA r=8 α=16 q,v, "
              "batch 8, 1 epoch unless a row says otherwise, 2 threads, no evaluation (as finetune.py) unless a row "
              "says otherwise. Each row: its own process; the command that measured it and lorakit's commit (+: with "
              "uncommitted files under src/) are in the row.", "",
              "Phases: imports (torch, transformers' model code, lorakit) · tokenizer and data · model load "
              "(`load_model`) · base preparation (LoRA added, base cast, fused MLP, packing check; up to the first "
              "training forward) · training (first training forward to the last optimizer step) · end (final "
              "evaluation if any, saving). RSS sampled every 5 ms; the peak is wait4's. The speed figures of the "
              "memory rows (saved-tensors hook on; some measured while the machine was oversubscribed) are not for "
              "comparison: the speed table's rows are.", ""]
    timed = {k: r for k, r in rows.items() if r.get("timing")}
    if timed:
        header += ["## Speed (rows without the saved-tensors hook)", "",
                   "| run | train wall (s) | real tokens/s | first step (s) | median step (s) | compile (s) | "
                   "peak RSS (GiB) | measured |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for key, r in timed.items():
            header.append(f"| {r['label']}{' (' + r['note'] + ')' if r.get('note') else ''} | {r['train_seconds']:.1f} | {r['tokens_per_s']:.0f} | "
                          f"{r['first_step_seconds']:.2f} | {r['median_step_seconds']:.2f} | "
                          f"{r.get('summary', {}).get('compile time (s)', '–')} | {r['peak_rss_mib'] / 1024:.2f} | "
                          f"{r['measured_at']} at {r['lorakit_commit']}: `{r['benchmark_command']}` |")
        header.append("")
    body = [line for key, r in rows.items() if not r.get("timing") for line in row_lines(key, r)]
    md = "\n".join(header + body) + "\n"
    report = {"benchmark": "finetune_memory", "cpu": cpu_info(), "gemm_peak": ctx["peak"],
              "results": {k: {kk: vv for kk, vv in r.items() if kk not in ("example_lengths", "example_targets")}
                          for k, r in rows.items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{name}.json", json.dumps(report, indent=1, default=str) + "\n")
    atomic_write_text(out_dir / f"{name}.md", md)
    print(md)
    print(f"wrote {out_dir / name}.md and .json")


if __name__ == "__main__":
    main()
