"""Fine-tuning end to end: TRL `SFTTrainer` + PEFT against `lorakit train`, each run in its own process (issue 19).

The question a user asks: "my data, my settings, how long until the adapter is done, and does it fit". Every run
trains SmolLM2-135M-Instruct with LoRA r=8 alpha=16, dropout 0, batch 8, lr 2e-4 with linear decay and no warm-up,
weight decay 0, gradient clipping 1.0, 1 epoch, completion-only loss, on `--threads` CPU threads, and saves its
adapter. Then ONE evaluator process loads every saved adapter (TRL's PEFT folders and lorakit's alike, with
`lorakit.load_adapter`) into the same fp32 base and computes the completion-only mean token loss on the same dev
pairs, tokenised one way for all, so the eval-loss column is comparable across frameworks.

Workloads:
  e2e   --examples E2E train pairs (seeded sample), prompt "Describe the restaurant: <MR>\\n" -> the reference, no chat
        template; eval: the first --eval-examples dev MRs with their first reference.
  chat  WebNLG 2017 (dev file; train and eval entries disjoint) rendered as chat with the model's chat template:
        user "Write a text that states all of these facts ..." + the triples, assistant the first lexicalisation;
        61-318 tokens per example (median ~124): long, uneven lengths.
Targets: qv (W_q, W_v) and all (all-linear: q,k,v,o,gate,up,down).

Runs (--runs, a comma list; those the installed lorakit does not support yet are skipped with a note):
  trl-fp32           TRL SFTTrainer + PEFT LoraConfig, bf16=False (fp32)
  trl-bf16           the same with bf16=True (autocast): TRL 1.x's own default when fp16 is not set
  trl-bf16-nogc      trl-bf16 with gradient_checkpointing=False (TRL 1.x turns it on by default)
  lk-default         `lorakit train` with no precision or batching option: whatever lorakit's defaults resolve to
                     (the row's label says what: base dtype, packing, batch order)
  lk-packed          --base-dtype auto, random batches, packed       (data.packing=true, data.group_by_length=false)
  lk-random          --base-dtype auto, random batches, padded       (data.packing=false, data.group_by_length=false)
  lk-grouped         --base-dtype auto, length-grouped, padded       (data.packing=false, data.group_by_length=true)
  lk-grouped-packed  --base-dtype auto, length-grouped, packed
  lk-fp32-*, lk-bf16-*   the same four with --base-dtype fp32 / bf16 (lk-fp32-random: lorakit as TRL batches)
Every lorakit run except lk-default names its batching, so a row means the same whatever lorakit's defaults are.
TRL runs in its own virtual environment (--trl-python), lorakit in this one; TRL and PEFT are the `bench` extra.

Measured per run: train wall (from the first forward pass to the end of the last optimizer step, taken the same way
in both frameworks by process-wide torch hooks), process wall (spawn to exit, imports, loading, data preparation and
saving included), real (non-pad) training tokens/s, peak RSS of the process (`wait4` max RSS), final eval loss, and
model FLOPs utilisation (MFU) against the GEMM peak measured at start (2048^3 matmuls, best of N, --threads threads).
FLOPs counted (per epoch; the work LoRA training needs, what a kernel skips or recomputes is not counted):
    4 * N_blocks * tokens         forward 2N + backward input-gradients 2N for the frozen block weights (LoRA skips
                                  their weight gradients)
  + 6 * N_lora * tokens           the LoRA matrices: forward, input and weight gradients
  + 4 * N_head * targets          the output head (tied embedding) at the labelled positions only
  + 6 * n_layers * d * sum(L^2)   causal attention scores and values, forward and backward, per example of length L
N_blocks: the linear weights of the 30 transformer blocks; tokens: real tokens; targets: tokens that carry loss.

    .venv/bin/python benchmarks/finetune.py --quick                  # every run kind end to end, ~32 examples, 4 steps
    .venv/bin/python benchmarks/finetune.py                          # the E2E q,v table (~15-20 min on 2 cores)
    .venv/bin/python benchmarks/finetune.py --workloads chat --examples 256 --merge    # more rows, same file
    .venv/bin/python benchmarks/finetune.py --runs lk-default --merge --drop 'e2e/qv/lk-*'   # replace rows
--merge keeps the rows of the results file measured with the same batch size, lr, seed, threads and steps, and, per
workload, the same --examples/--eval-examples (so E2E and the chat set may use different sizes in one file).

Setting up TRL's environment once (torch first, from the local CPU wheel; an unpinned torch pulls CUDA builds):
    python3 -m venv /work/venvs/trl && /work/venvs/trl/bin/pip install torch==2.13.0
    /work/venvs/trl/bin/pip install "torch==2.13.0" trl peft "transformers==<this venv's version>" datasets accelerate
Writes benchmarks/results/finetune.{md,json} (--quick: benchmarks/runs/finetune/finetune_quick.{md,json}).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "runs" / "finetune"  # run folders, adapters, data files; git-ignored
TRL_VENV_PYTHON = "/work/venvs/trl/bin/python"  # TRL in its own environment; else this one with `.[bench]`
DEFAULT_TRL_PYTHON = TRL_VENV_PYTHON if Path(TRL_VENV_PYTHON).exists() else sys.executable
E2E_PROMPT = "Describe the restaurant: {mr}\n"
CHAT_INSTRUCTION = "Write a text that states all of these facts (subject | relation | object):\n"
TARGETS = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}
KINDS: dict[str, dict[str, Any]] = {
    "trl-fp32": {"framework": "trl", "bf16": False, "label": "TRL SFTTrainer + PEFT, bf16=False (fp32)"},
    "trl-bf16": {"framework": "trl", "bf16": True, "label": "TRL SFTTrainer + PEFT, bf16=True (TRL's default)"},
    "trl-bf16-nogc": {"framework": "trl", "bf16": True, "gradient_checkpointing": False,
                      "label": "TRL + PEFT, bf16=True, gradient_checkpointing=False"},
    # lorakit runs: each names the batching it measures, so a row means the same whatever lorakit's defaults are
    # (lk-default alone follows them; its label gets what they resolved to)
    "lk-default": {"framework": "lorakit", "argv": [], "label": "lorakit train (defaults)"},
}
for _dtype, _prefix in (("auto", "lk-"), ("fp32", "lk-fp32-"), ("bf16", "lk-bf16-")):
    for _batching, (_packing, _grouped) in {"packed": (True, False), "random": (False, False),
                                            "grouped": (False, True), "grouped-packed": (True, True)}.items():
        KINDS[_prefix + _batching] = {
            "framework": "lorakit", **({"needs": "base_dtype_auto"} if _dtype == "auto" else {}),
            "argv": ["--base-dtype", _dtype, "--set", f"data.packing={str(_packing).lower()}",
                     "--set", f"data.group_by_length={str(_grouped).lower()}"],
            "label": f"lorakit train --base-dtype {_dtype}, {'length-grouped' if _grouped else 'random'} batches, "
                     f"{'packed' if _packing else 'padded'}" + (" (as TRL)" if not (_packing or _grouped) else "")}
DEFAULT_RUNS = "trl-fp32,trl-bf16,lk-default,lk-random,lk-grouped,lk-fp32-packed,lk-fp32-random"
CHILD_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------------------------------------- children
# The children run this same file: `--child trl` under TRL's interpreter (no lorakit there: only the standard library
# at module level), `--child lorakit` and `--child eval` under this repository's.
def _install_timing_hooks() -> dict[str, Any]:
    """Process-wide torch hooks that time training identically in both frameworks: the first forward pass of any
    module starts the clock, every optimizer step's end is recorded; embedding calls count the padded positions."""
    import torch
    from torch import nn

    state: dict[str, Any] = {"first_forward": None, "step_ends": [], "padded_positions": 0, "hooks": []}

    def count_positions(module, args):
        if args and hasattr(args[0], "dim") and args[0].dim() == 2:
            state["padded_positions"] += int(args[0].numel())

    def first_forward(module, args):
        if state["first_forward"] is None:
            state["first_forward"] = time.perf_counter()
            for m in module.modules():
                if isinstance(m, nn.Embedding):
                    state["hooks"].append(m.register_forward_pre_hook(count_positions))  # fires in this pass too
            state["global"].remove()

    def step_end(optimizer, args, kwargs):
        state["step_ends"].append(time.perf_counter())

    state["global"] = nn.modules.module.register_module_forward_pre_hook(first_forward)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(step_end)
    return state


def _timing(state: dict[str, Any], started: float) -> dict[str, Any]:
    ends, t0 = state["step_ends"], state["first_forward"]
    if not ends or t0 is None:
        return {"optimizer_steps": 0}
    steps = [ends[0] - t0] + [b - a for a, b in zip(ends, ends[1:])]
    return {"optimizer_steps": len(ends), "train_seconds": ends[-1] - t0, "first_step_seconds": steps[0],
            "median_step_seconds": statistics.median(steps[1:] or steps), "until_first_forward": t0 - started,
            "padded_positions_seen": state["padded_positions"]}


def child_trl(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    state = _install_timing_hooks()
    import datasets
    import peft
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(spec["train_file"]).read_text(encoding="utf-8").splitlines() if line]
    if spec["workload"] == "chat":  # conversational prompt-completion: TRL applies the chat template, masks the prompt
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    data = datasets.Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    lora = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules=spec["target_modules"],
                      task_type="CAUSAL_LM")
    extra = {} if spec.get("gradient_checkpointing") is None else {
        "gradient_checkpointing": spec["gradient_checkpointing"]}
    config = SFTConfig(output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch_size"],
                       num_train_epochs=1, max_steps=spec["steps"] or -1, learning_rate=spec["lr"],
                       lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                       bf16=spec["bf16"], use_cpu=True, save_strategy="no", report_to="none", seed=spec["seed"],
                       dataloader_num_workers=0, **extra)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    prepared = trainer.train_dataset
    ids, labels = [list(x) for x in prepared["input_ids"]], [list(x) for x in prepared["labels"]]
    out = trainer.train()
    timing = _timing(state, started)
    trainer.save_model(str(Path(spec["run_dir"]) / "adapter"))
    (Path(spec["run_dir"]) / "tokens.json").write_text(json.dumps({"input_ids": ids, "labels": labels}))
    return {**timing, "train_runtime_trl": out.metrics.get("train_runtime"), "train_loss": out.training_loss,
            "adapter_dir": str(Path(spec["run_dir"]) / "adapter"), "example_lengths": [len(x) for x in ids],
            "example_targets": [sum(t != -100 for t in lab[1:]) for lab in labels],
            "settings": {"gradient_checkpointing": config.gradient_checkpointing, "bf16": config.bf16,
                         "max_length": config.max_length, "packing": config.packing,
                         "padding_free": config.padding_free,
                         "train_sampling_strategy": getattr(config, "train_sampling_strategy", None),
                         "completion_only_loss": getattr(trainer, "completion_only_loss", None),
                         "attn_implementation": model.config._attn_implementation},
            "versions": {"trl": trl.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__, "datasets": datasets.__version__}}


def child_lorakit(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    import lorakit  # noqa: F401  first: it sets the allocator's huge-page switch before torch makes any tensor

    state = _install_timing_hooks()
    from lorakit.cli.main import main

    code = 0
    try:
        main(spec["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if code:
        raise SystemExit(code)
    run_dir = Path(spec["run_dir"])
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in history if "loss" in r]
    return {**_timing(state, started), "train_loss": sum(losses) / len(losses) if losses else None,
            "adapter_dir": str(run_dir / "adapter"),
            "summary": json.loads((run_dir / "summary.json").read_text()),
            "config": (run_dir / "config.yaml").read_text()}


def eval_tokens(tokenizer, workload: str, row: dict[str, Any]) -> tuple[list[int], int, int]:
    """The evaluator's one tokenisation: (ids, prompt length, trailing end tokens). E2E: prompt ids + completion ids +
    EOS; chat: the chat template's rendering, the assistant turn (answer + "<|im_end|>\\n") being the completion."""
    if workload == "e2e":
        p = list(tokenizer(row["prompt"]).input_ids)
        c = list(tokenizer(row["completion"], add_special_tokens=False).input_ids) + [tokenizer.eos_token_id]
        return p + c, len(p), 1
    text_p = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    p = list(tokenizer(text_p, add_special_tokens=False).input_ids)
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    assert ids[:len(p)] == p, "chat template: the prompt is not a prefix of the conversation"
    end = len(ids) - max(i for i, t in enumerate(ids) if t == tokenizer.eos_token_id)
    return ids, len(p), end


def child_eval(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import lorakit as lk

    torch.set_num_threads(spec["threads"])
    model, tokenizer = lk.load_model(spec["model_path"])
    model.eval()
    sets = {}
    for workload, path in spec["eval_files"].items():
        rows = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
        sets[workload] = sorted((eval_tokens(tokenizer, workload, r) for r in rows), key=lambda e: -len(e[0]))

    @torch.no_grad()
    def score(workload: str) -> dict[str, Any]:
        total, n, total_body, n_body = 0.0, 0, 0.0, 0
        examples = sets[workload]
        for s in range(0, len(examples), spec["batch_size"]):
            part = examples[s:s + spec["batch_size"]]
            width = max(len(ids) for ids, _, _ in part)
            ids = torch.full((len(part), width), tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            weight = torch.zeros((len(part), width - 1))  # 1: target; body = the completion without its end tokens
            body = torch.zeros_like(weight)
            for i, (x, p, end) in enumerate(part):
                ids[i, :len(x)] = torch.tensor(x)
                mask[i, :len(x)] = 1
                weight[i, p - 1:len(x) - 1] = 1  # position t predicts token t+1: targets are tokens p .. len-1
                body[i, p - 1:len(x) - 1 - end] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            total += float((nll * weight).sum())
            n += int(weight.sum())
            total_body += float((nll * body).sum())
            n_body += int(body.sum())
        return {"eval_loss": total / n, "eval_tokens": n, "eval_loss_without_end": total_body / n_body,
                "eval_tokens_without_end": n_body}

    out: dict[str, Any] = {"base": {w: score(w) for w in sets}, "adapters": {}}
    for name, item in spec["adapters"].items():
        t0 = time.perf_counter()
        lk.load_adapter(model, item["dir"], adapter=name)
        lk.set_adapter(model, name)
        out["adapters"][name] = {**score(item["workload"]), "eval_seconds": time.perf_counter() - t0}
        lk.delete_adapter(model, name)
        print(f"  eval {name}: {out['adapters'][name]['eval_loss']:.4f}", flush=True)
    return out


def run_child(mode: str, spec: dict[str, Any]) -> None:
    result = {"trl": child_trl, "lorakit": child_lorakit, "eval": child_eval}[mode](spec)
    Path(spec["result_file"]).write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------------- the parent
def spawn(python: str, mode: str, spec: dict[str, Any], log: Path, threads: int) -> dict[str, Any]:
    """Run one child to completion: its process wall time, peak RSS (wait4: this process alone) and its result."""
    spec_file = log.with_suffix(".spec.json")
    spec = {**spec, "result_file": str(log.with_suffix(".result.json"))}
    Path(spec["result_file"]).unlink(missing_ok=True)
    spec_file.write_text(json.dumps(spec, indent=1))
    env = {**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--child", mode, str(spec_file)],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not Path(spec["result_file"]).is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{mode} child exited with {proc.returncode}; the end of {log}:\n{tail}")
    return {"process_seconds": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
            **json.loads(Path(spec["result_file"]).read_text())}


def _budget_label(max_batch_tokens: int | None) -> str:
    """The token budget per forward pass in lk-default's label (older lorakit had none: every micro-batch whole)."""
    return f", ≤{max_batch_tokens} tokens per pass" if max_batch_tokens else ""


def gemm_peak(threads: int, size: int, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` GFLOP/s of a size^3 matmul in fp32 and bf16 (interleaved, after a warm-up)."""
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    pairs = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}
    best = dict.fromkeys(pairs, float("inf"))
    for x, y in pairs.values():
        torch.mm(x, y)
    for _ in range(repeats):
        for name, (x, y) in pairs.items():
            t0 = time.perf_counter()
            torch.mm(x, y)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {f"{k}_gflops": 2 * size ** 3 / v / 1e9 for k, v in best.items()}


def lorakit_features() -> dict[str, Any]:
    """What the installed lorakit accepts: base_dtype auto, data.packing, and its default base_dtype."""
    from lorakit.errors import LorakitError

    try:
        from lorakit.train import TrainConfig
    except ImportError:  # before the train/ package exported it
        from lorakit.train.loop import TrainConfig

    def accepts(data: dict[str, Any]) -> bool:
        try:
            TrainConfig.from_dict(data)
            return True
        except (LorakitError, TypeError, ValueError):
            return False

    default = TrainConfig.from_dict({})
    return {"base_dtype_auto": accepts({"base_dtype": "auto"}), "packing": accepts({"data": {"packing": True}}),
            "packing_auto": accepts({"data": {"packing": "auto"}}), "default_base_dtype": default.base_dtype,
            "default_packing": default.data.packing, "default_group_by_length": default.data.group_by_length}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_data(args: argparse.Namespace, workload: str) -> dict[str, Any]:
    """Train and eval files in lorakit's formats (instruction / chat), the same rows TRL reads."""
    data_dir = Path(args.data_dir)
    if workload == "e2e":
        train = [json.loads(x) for x in (data_dir / "e2e" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
        train = random.Random(args.seed).sample(train, args.examples)
        dev = [json.loads(x) for x in (data_dir / "e2e" / "dev.jsonl").read_text(encoding="utf-8").splitlines()]
        train_rows = [{"prompt": E2E_PROMPT.format(mr=r["meaning_representation"]), "completion": r["target"]}
                      for r in train]
        eval_rows = [{"prompt": E2E_PROMPT.format(mr=r["meaning_representation"]), "completion": r["references"][0]}
                     for r in dev[:args.eval_examples]]
        source = f"E2E train.jsonl ({args.examples} pairs sampled with seed {args.seed}), dev.jsonl (first " \
                 f"{args.eval_examples} MRs, first reference)"
    else:
        entries = [next(iter(e.values())) for e in
                   json.loads((data_dir / "webnlg" / "dev.json").read_text(encoding="utf-8"))["entries"]]
        random.Random(args.seed).shuffle(entries)
        if args.examples + args.eval_examples > len(entries):
            raise SystemExit(f"WebNLG dev has {len(entries)} entries: --examples + --eval-examples must not exceed it")

        def chat(e):
            facts = "\n".join(f"{t['subject']} | {t['property']} | {t['object']}" for t in e["modifiedtripleset"])
            return {"messages": [{"role": "user", "content": CHAT_INSTRUCTION + facts},
                                 {"role": "assistant", "content": e["lexicalisations"][0]["lex"]}]}

        train_rows = [chat(e) for e in entries[:args.examples]]
        eval_rows = [chat(e) for e in entries[args.examples:args.examples + args.eval_examples]]
        source = f"WebNLG 2017 dev.json entries shuffled with seed {args.seed}: the first {args.examples} for " \
                 f"training, the next {args.eval_examples} for eval (first lexicalisation each), as chat"
    folder = args.work / "data"
    write_jsonl(folder / f"{workload}_train.jsonl", train_rows)
    write_jsonl(folder / f"{workload}_eval.jsonl", eval_rows)
    return {"train_file": str(folder / f"{workload}_train.jsonl"), "eval_file": str(folder / f"{workload}_eval.jsonl"),
            "source": source, "train_rows": train_rows}


def lorakit_tokens(model_path: str, workload: str, train_file: str) -> dict[str, Any]:
    """lorakit's own tokenisation of the training file (as `lorakit train` does it): lengths, targets, truncation."""
    from transformers import AutoTokenizer

    from lorakit.data.records import DataConfig, read_records, tokenize

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    data = tokenize(read_records(train_file), tok, DataConfig(train_file=train_file, chat_template=workload != "e2e"))
    return {"example_lengths": [len(e.input_ids) for e in data.examples],
            "example_targets": [sum(t != -100 for t in e.labels[1:]) for e in data.examples],
            "input_ids": [list(e.input_ids) for e in data.examples], "labels": [list(e.labels) for e in data.examples],
            "truncated": data.truncated, "dropped": data.dropped}


def model_shape(model_path: str) -> dict[str, int]:
    c = json.loads((Path(model_path) / "config.json").read_text())
    d, layers, inter = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    hd = c.get("head_dim") or d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, inter),
              "up_proj": (d, inter), "down_proj": (inter, d)}
    return {"d": d, "attn_width": q, "layers": layers, "vocab": c["vocab_size"], "shapes": shapes,
            "n_blocks": layers * sum(i * o for i, o in shapes.values()), "n_head": d * c["vocab_size"]}


def lora_params(shape: dict[str, Any], targets: str, r: int) -> int:
    names = list(shape["shapes"]) if TARGETS[targets] == "all-linear" else TARGETS[targets]
    return shape["layers"] * sum(r * (shape["shapes"][n][0] + shape["shapes"][n][1]) for n in names)


def epoch_flops(shape: dict[str, Any], n_lora: int, lengths: list[int], targets: list[int]) -> float:
    tokens = sum(lengths)
    return (4 * shape["n_blocks"] * tokens + 6 * n_lora * tokens + 4 * shape["n_head"] * sum(targets)
            + 6 * shape["layers"] * shape["attn_width"] * sum(n * n for n in lengths))


def accounting(trl_tokens: dict[str, Any], lk: dict[str, Any]) -> dict[str, Any]:
    """How TRL's and lorakit's tokenisation of the same training rows compare (ids, targets, lengths)."""
    a_ids, a_lab, b_ids, b_lab = trl_tokens["input_ids"], trl_tokens["labels"], lk["input_ids"], lk["labels"]
    same_ids = sum(x == y for x, y in zip(a_ids, b_ids))
    same_targets = sum([t != -100 for t in x] == [t != -100 for t in y] for x, y in zip(a_lab, b_lab))
    diff = next((i for i, (x, y) in enumerate(zip(a_ids, b_ids)) if x != y), None)
    return {"examples": [len(a_ids), len(b_ids)], "identical_input_ids": same_ids, "identical_target_masks": same_targets,
            "tokens": [sum(map(len, a_ids)), sum(map(len, b_ids))],
            "targets": [sum(t != -100 for x in a_lab for t in x), sum(t != -100 for x in b_lab for t in x)],
            "first_difference": None if diff is None else {"example": diff, "trl": a_ids[diff], "lorakit": b_ids[diff]}}


def fmt(v: Any, digits: int = 1, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}{unit}"
    return f"{v}{unit}"


def table(rows: dict[str, dict[str, Any]], workload: str, targets: str) -> str:
    head = ("| run | train wall (s) | process wall (s) | real tokens/s | eval loss | peak RSS (GiB) | MFU | "
            "% of best GEMM peak (bf16 or fp32) | padding | tok/s vs TRL fp32 | tok/s vs TRL fastest | RSS vs TRL fp32 |")
    lines = [head, "|" + "---|" + "---:|" * 11]
    for key, r in rows.items():
        if r["workload"] != workload or r["targets"] != targets:
            continue
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'].splitlines()[0][:60]} (see the JSON) |" + " |" * 10)
            continue
        lines.append(f"| {r['label']} | {fmt(r['train_seconds'])} | {fmt(r['process_seconds'])} | "
                     f"{fmt(r['tokens_per_s'], 0)} | {fmt(r.get('eval_loss'), 4)} | {fmt(r['peak_rss_gib'], 2)} | "
                     f"{fmt(r['mfu_pct'], 1, '%')} | {fmt(r['bf16_peak_pct'], 1, '%')} | "
                     f"{fmt(100 * r['padding_share'], 0, '%')} | {fmt(r.get('vs_trl_fp32'), 2, '×')} | "
                     f"{fmt(r.get('vs_trl_fastest'), 2, '×')} | {fmt(r.get('rss_vs_trl_fp32'), 2, '×')} |")
    return "\n".join(lines)


def lorakit_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def train_run(ctx: dict[str, Any], workload: str, targets: str, kind: str) -> dict[str, Any]:
    """Train one run in its own process; its row (timings, memory, tokens, FLOPs), without the eval loss yet."""
    import yaml

    from lorakit.hardware import auto_base_dtype

    args, spec_kind, data = ctx["args"], KINDS[kind], ctx["data"][workload]
    key = f"{workload}/{targets}/{kind}"
    run_dir = args.work / key.replace("/", "-")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    label = spec_kind["label"]
    row: dict[str, Any] = {"workload": workload, "targets": targets, "kind": kind, "label": label}
    print(f"[{key}] training ...", flush=True)
    if spec_kind["framework"] == "trl":
        spec = {"workload": workload, "train_file": data["train_file"], "model_path": ctx["model_path"],
                "run_dir": str(run_dir), "threads": args.threads, "r": 8, "alpha": 16,
                "target_modules": TARGETS[targets], "batch_size": args.batch_size, "lr": args.lr, "steps": args.steps,
                "seed": args.seed, "bf16": spec_kind["bf16"],
                "gradient_checkpointing": spec_kind.get("gradient_checkpointing")}
        res = spawn(args.trl_python, "trl", spec, run_dir / "child.log", args.threads)
        tokens = json.loads((run_dir / "tokens.json").read_text())
        res["accounting_vs_lorakit"] = accounting(tokens, ctx["lk_tokens"][workload])
        dtype = "bf16" if spec_kind["bf16"] else "fp32"
    else:
        target_value = ("[" + ",".join(TARGETS[targets]) + "]") if targets == "qv" else "all-linear"
        cli = ["train", "--output-dir", str(run_dir), "--seed", str(args.seed),
               "--set", f"data.train_file={data['train_file']}",
               "--set", f"data.chat_template={'false' if workload == 'e2e' else 'true'}",
               "--set", "lora.r=8", "--set", "lora.alpha=16", "--set", "lora.dropout=0.0",
               "--set", f"lora.target_modules={target_value}",
               "--set", f"optim.lr={args.lr}", "--set", f"optim.batch_size={args.batch_size}",
               "--set", "optim.epochs=1", "--set", "optim.schedule=linear",
               "--set", "optim.warmup_steps=0", "--set", "optim.weight_decay=0.0",
               *(["--set", f"optim.max_steps={args.steps}"] if args.steps else []), *spec_kind["argv"]]
        res = spawn(lorakit_python(), "lorakit", {"argv": cli, "run_dir": str(run_dir)}, run_dir / "child.log",
                    args.threads)
        lk = ctx["lk_tokens"][workload]
        res.update({k: lk[k] for k in ("example_lengths", "example_targets", "truncated", "dropped")})
        res["command"] = "lorakit " + " ".join(cli)
        res["summary_wall_seconds"] = res.get("summary", {}).get("wall time (s)")
        # the resolved config names the base dtype the run used (base_dtype auto is saved as its choice)
        resolved = yaml.safe_load(res.get("config") or "{}") or {}
        data_cfg = resolved.get("data") or {}
        row["resolved"] = {"base_dtype": resolved.get("base_dtype"), "packing": data_cfg.get("packing"),
                           "group_by_length": data_cfg.get("group_by_length")}
        dtype = resolved.get("base_dtype") if resolved.get("base_dtype") in ("bf16", "fp32") else auto_base_dtype()[0]
        if kind == "lk-default":
            row["label"] = (f"lorakit train (defaults: {dtype} base, "
                            f"{'length-grouped' if data_cfg.get('group_by_length') else 'random'} batches, "
                            f"{'packed' if data_cfg.get('packing') is True else 'padded'}"
                            f"{_budget_label((resolved.get('optim') or {}).get('max_batch_tokens'))})")
    res.pop("result_file", None)
    row.update(res)
    row["lorakit_commit"] = ctx["source"]["commit"][:10] + ("+" if ctx["source"]["uncommitted_src_files"] else "")
    row["gemm_peak"] = ctx["peak"]
    row["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    peak, shape = ctx["peak"], ctx["shape"]
    seen = row["optimizer_steps"] * args.batch_size / len(row["example_lengths"])  # epochs seen (1.0 by default)
    row["epochs_seen"] = seen
    row["real_tokens"] = sum(row["example_lengths"]) * seen
    row["target_tokens"] = sum(row["example_targets"]) * seen
    row["tokens_per_s"] = row["real_tokens"] / row["train_seconds"]
    row["padding_share"] = 1 - row["real_tokens"] / max(row["padded_positions_seen"], 1)
    row["peak_rss_gib"] = row["peak_rss_mib"] / 1024
    row["lora_params"] = lora_params(shape, targets, 8)
    row["model_flops"] = epoch_flops(shape, row["lora_params"], row["example_lengths"], row["example_targets"]) * seen
    row["achieved_gflops"] = row["model_flops"] / row["train_seconds"] / 1e9
    row["matmul_dtype"] = dtype
    row["mfu_pct"] = 100 * row["achieved_gflops"] / peak[f"{dtype}_gflops"]
    # against the machine's fastest matmul: bf16 where it has bf16 hardware; on an AVX2-only CPU bf16 is emulated
    # (~1 GFLOP/s) and fp32 is the fastest, so the column never divides by an emulated rate
    row["bf16_peak_pct"] = 100 * row["achieved_gflops"] / max(peak["bf16_gflops"], peak["fp32_gflops"])
    print(f"[{key}] train {row['train_seconds']:.1f} s, process {row['process_seconds']:.1f} s, "
          f"{row['tokens_per_s']:.0f} tok/s, peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    return row


def add_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """Within each (workload, targets) group: tokens/s over TRL fp32's and the fastest TRL run's, RSS over TRL fp32's."""
    for workload, targets in {(r["workload"], r["targets"]) for r in rows.values()}:
        group = [r for r in rows.values() if (r["workload"], r["targets"]) == (workload, targets) and "error" not in r]
        trl = [r for r in group if r["kind"].startswith("trl")]
        ref = next((r for r in trl if r["kind"] == "trl-fp32"), None)
        fastest = max(trl, key=lambda r: r["tokens_per_s"], default=None)
        for r in group:
            if ref:
                r["vs_trl_fp32"] = r["tokens_per_s"] / ref["tokens_per_s"]
                r["rss_vs_trl_fp32"] = r["peak_rss_gib"] / ref["peak_rss_gib"]
            if fastest:
                r["vs_trl_fastest"] = r["tokens_per_s"] / fastest["tokens_per_s"]
                r["trl_fastest"] = fastest["kind"]


EXPLAIN = [
    "- train wall: first forward pass to the end of the last optimizer step, measured the same way in both "
    "frameworks (process-wide torch hooks); process wall: spawn to exit. real tokens/s: the non-pad tokens of "
    "the epoch (each framework's own tokenisation) / train wall. peak RSS: the process's maximum resident set "
    "(wait4). padding: the share of the positions the model ran on that were padding (1 - real tokens / "
    "positions). Ratios: tokens/s over TRL fp32's and over the fastest TRL run's; peak RSS over TRL fp32's.",
    "- MFU: model FLOPs / train wall / the measured GEMM peak of the dtype the run's matmuls use (fp32 or bf16); "
    "model FLOPs = 4·N_blocks·tokens + 6·N_lora·tokens + 4·N_head·targets + 6·layers·d·ΣL² (frozen weights need "
    "no weight gradients; the head is counted at labelled positions only; recomputation is not counted).",
    "- eval loss: one evaluator process loads every adapter into the same fp32 base and scores the same dev pairs "
    "tokenised one way (E2E: prompt ids + completion ids + EOS; chat: the chat template, assistant turn = answer "
    "+ <|im_end|> + newline), mean over the completion tokens including the end token(s). The JSON also has the "
    "loss without the end token(s).",
    "- token accounting: both frameworks append EOS to a completion (TRL adds the eos string to the completion "
    "text and tokenises prompt+completion together; lorakit tokenises the prompt and the completion apart and "
    "appends the EOS id) and mask the prompt; TRL truncates at max_length 1024, lorakit at data.max_length 512. "
    "`accounting_vs_lorakit` in each TRL row counts the examples whose token ids and target masks are identical.",
    "- TRL 1.x defaults that matter here: bf16=True when fp16 is not set (so trl-bf16 is what a user gets by "
    "default), gradient_checkpointing=True, random batches (no length grouping), no packing. lorakit's batching: "
    "data.group_by_length (length-grouped batches, less padding) and data.packing (each micro-batch's examples "
    "back to back in rows as wide as its longest example, positions restarting per example, no attention across "
    "examples, the same targets and loss). Packing changes neither the batches nor their order; length grouping "
    "does, and with it the loss.",
]


PACKING_PAIRS = [(f"{prefix}{order}packed", f"{prefix}{order or 'random'}".rstrip("-"))
                 for prefix in ("lk-", "lk-fp32-", "lk-bf16-") for order in ("", "grouped-")]


def packing_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Packed against padded, same precision and batch order: speed, padding and eval loss (issue 19's target)."""
    out = []
    for packed_kind, padded_kind in PACKING_PAIRS:
        for key, r in rows.items():
            if r["kind"] != packed_kind or "error" in r:
                continue
            o = rows.get(f"{r['workload']}/{r['targets']}/{padded_kind}")
            if not o or "error" in o:
                continue
            loss = (f"; eval loss {r['eval_loss']:.4f} vs {o['eval_loss']:.4f}"
                    if r.get("eval_loss") is not None and o.get("eval_loss") is not None else "")
            out.append(f"- packing, {r['workload']}/{r['targets']}: {packed_kind} {r['tokens_per_s']:.0f} vs "
                       f"{padded_kind} {o['tokens_per_s']:.0f} real tokens/s = "
                       f"{r['tokens_per_s'] / o['tokens_per_s']:.2f}×; padding {100 * r['padding_share']:.0f}% vs "
                       f"{100 * o['padding_share']:.0f}%{loss}.")
    return out


def write_report(ctx: dict[str, Any], rows: dict[str, dict[str, Any]], base_eval: dict[str, Any],
                 peak_end: dict[str, float] | None, done: bool) -> None:
    """benchmarks/results/<name>.{md,json}; written after every run (done=False: eval losses still to come)."""
    from lorakit.fsutil import atomic_write_text
    from lorakit.hardware import cpu_info, cpu_line

    args, peak, size, repeats = ctx["args"], ctx["peak"], ctx["size"], ctx["repeats"]
    add_ratios(rows)
    versions = next((r["versions"] for r in rows.values() if "versions" in r), {})
    by_time: dict[tuple[str, str], list[str]] = {}
    for key, r in sorted(rows.items(), key=lambda kv: kv[1].get("measured_at", "")):
        by_time.setdefault((r.get("measured_at", "by 17:59 UTC (an earlier file; see git log)"),
                            r.get("lorakit_commit", "–")), []).append(key)
    trl_settings = next(({k: v for k, v in r["settings"].items() if k != "bf16"} for r in rows.values()
                         if "settings" in r), {})
    end = (f"; at the end: fp32 {peak_end['fp32_gflops']:.0f}, bf16 {peak_end['bf16_gflops']:.0f} GFLOP/s"
           if peak_end else "")
    header = [f"# Fine-tuning end to end: TRL + PEFT vs `lorakit train` "
              f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
              *([] if done else ["**Partial: runs still going; eval losses come at the end.**", ""]),
              cpu_line(), "",
              f"This invocation: lorakit at {ctx['source']['commit'][:10]}"
              + (f" with {ctx['source']['uncommitted_src_files']} uncommitted file(s) under src/ (work in progress "
                 "in the tree when measured)" if ctx["source"]["uncommitted_src_files"] else "") + "; "
              f"GEMM peak ({args.threads} threads, {size}³, best of {repeats}) at start: fp32 "
              f"{peak['fp32_gflops']:.0f}, bf16 {peak['bf16_gflops']:.0f} GFLOP/s{end}.",
              "", "```bash", *ctx["commands"], ".venv/bin/python benchmarks/finetune.py " + " ".join(ctx["argv"]),
              "```", "",
              *([f"Rows were measured in {len(by_time)} invocations (--merge): " + "; ".join(
                  f"{t}, lorakit {c}: {', '.join(keys)}" for (t, c), keys in by_time.items()) + ".", ""]
                if len(by_time) > 1 else []),
              f"SmolLM2-135M-Instruct, LoRA r=8 α=16 dropout 0, batch {args.batch_size}, "
              f"{'1 epoch' if not args.steps else f'{args.steps} steps'}, lr {args.lr:g} linear, no warm-up, weight "
              f"decay 0, clip 1.0, completion-only loss, {args.threads} threads, each run its own process. "
              + (f"TRL {versions.get('trl')}, PEFT {versions.get('peft')}, transformers {versions.get('transformers')}"
                 f"; TRL's effective settings: {trl_settings}." if versions else ""), ""]
    header += [f"- {w}: {source}." for w, source in ctx["sources"].items()]
    header += [f"- {w}: the base model without an adapter scores eval loss {ev['eval_loss']:.4f} "
               f"({ev['eval_tokens']} target tokens)." for w, ev in base_eval.items()]
    body = []
    for workload, targets in sorted({(r["workload"], r["targets"]) for r in rows.values()},
                                    key=lambda g: (g[0] != "e2e", g[1] != "qv")):
        body += ["", f"## {workload}, targets {targets} ({'W_q, W_v' if targets == 'qv' else 'all-linear'})", "",
                 table(rows, workload, targets)]
    explain = ["", "## How to read it", *EXPLAIN]
    for w in ctx["sources"]:
        acc = next((r["accounting_vs_lorakit"] for r in rows.values()
                    if r["workload"] == w and "accounting_vs_lorakit" in r), None)
        if acc:
            explain.append(f"- {w}: of {acc['examples'][0]} training examples, {acc['identical_input_ids']} have "
                           f"identical token ids in TRL and lorakit and {acc['identical_target_masks']} identical "
                           f"target masks; tokens TRL {acc['tokens'][0]} / lorakit {acc['tokens'][1]}, targets "
                           f"{acc['targets'][0]} / {acc['targets'][1]}.")
    explain += packing_lines(rows)
    explain += [f"- {n}" for n in ctx["notes"]]
    md = "\n".join(header + body + explain) + "\n"
    report = {"benchmark": "finetune", "complete": done, "settings": ctx["settings"],
              "workload_settings": ctx["workload_settings"],
              "commands": ctx["commands"] + [".venv/bin/python benchmarks/finetune.py " + " ".join(ctx["argv"])],
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "cpu": cpu_info(), "gemm_peak_start": peak, "gemm_peak_end": peak_end,
              "lorakit_features": ctx["features"], "lorakit_source": ctx["source"], "model_shape": {k: v for k, v in ctx["shape"].items() if k != "shapes"},
              "base_eval": base_eval, "sources": ctx["sources"], "notes": ctx["notes"],
              "results": {k: {kk: vv for kk, vv in r.items() if kk not in ("example_lengths", "example_targets")}
                          for k, r in rows.items()}}
    ctx["out"].mkdir(parents=True, exist_ok=True)
    atomic_write_text(ctx["out"] / f"{ctx['name']}.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(ctx["out"] / f"{ctx['name']}.md", md)
    if done:
        print(md)
        print(f"wrote {ctx['out'] / ctx['name']}.md and .json")


def source_state() -> dict[str, Any]:
    """The lorakit code the runs used: the commit, and how many files under src/ differed from it."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_src_files": len([x for x in git("status", "--porcelain", "src").splitlines() if x.strip()])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"),
                        help="shared benchmark data folder (default: ../shared/data next to the repo)")
    parser.add_argument("--examples", type=int, default=512, help="training examples (1 epoch = examples / batch)")
    parser.add_argument("--eval-examples", type=int, default=128, help="dev pairs scored by the evaluator")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 1 epoch)")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma list of {', '.join(KINDS)}")
    parser.add_argument("--workloads", default="e2e", help="comma list of e2e, chat")
    parser.add_argument("--targets", default="qv", help="comma list of qv, all")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON,
                        help=f"interpreter with trl and peft (default {DEFAULT_TRL_PYTHON})")
    parser.add_argument("--quick", action="store_true", help="tiny check of every run: 32 examples, 4 steps, "
                        "16 eval pairs; results to benchmarks/runs/finetune/ (not benchmarks/results/)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--name", default=None, help="results file name (default finetune, finetune_quick)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an earlier results file measured with the same settings")
    parser.add_argument("--drop", action="append", default=[], metavar="PATTERN",
                        help="with --merge: leave out the earlier rows whose key (workload/targets/run) matches this "
                             "glob, e.g. 'e2e/qv/lk-*' (repeatable)")
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child[0], json.loads(Path(args.child[1]).read_text()))
        return
    if args.quick:
        args.examples, args.eval_examples = 32, 16
    args.steps = args.steps or None
    args.work = WORK / ("quick" if args.quick else "full")
    kinds = [k.strip() for k in args.runs.split(",") if k.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    target_sets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for k, allowed in ((kinds, KINDS), (workloads, ("e2e", "chat")), (target_sets, TARGETS)):
        bad = [x for x in k if x not in allowed]
        if bad:
            raise SystemExit(f"unknown {bad}; choose from {list(allowed)}")
    if any(KINDS[k]["framework"] == "trl" for k in kinds) and not Path(args.trl_python).exists():
        raise SystemExit(f"{args.trl_python} not found: set up TRL's environment (see --help) or pass --trl-python")

    sys.path.insert(0, str(ROOT / "src"))
    from lorakit.hardware import cpu_line
    from lorakit.models.loading import resolve_model_path

    ctx: dict[str, Any] = {"args": args, "argv": list(argv if argv is not None else sys.argv[1:]), "notes": [],
                           "commands": [],
                           "sources": {},
                           "out": Path(args.out) if args.out else (WORK if args.quick else RESULTS),
                           "name": args.name or ("finetune_quick" if args.quick else "finetune"),
                           "model_path": resolve_model_path("smollm2-135m"), "features": lorakit_features(),
                           "settings": {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed",
                                                                      "threads")},
                           "workload_settings": {}}
    ctx["shape"] = model_shape(ctx["model_path"])
    ctx["source"] = source_state()
    rows: dict[str, dict[str, Any]] = {}
    base_eval: dict[str, Any] = {}
    path_json = ctx["out"] / f"{ctx['name']}.json"
    sizes = {"examples": args.examples, "eval_examples": args.eval_examples}
    if args.merge and path_json.exists():
        old = json.loads(path_json.read_text())
        old_settings = dict(old.get("settings") or {})
        old_sizes = old.get("workload_settings") or {  # files written before sizes were kept per workload
            w: {k: old_settings.get(k) for k in sizes} for w in old.get("sources") or {}}
        old_settings = {k: v for k, v in old_settings.items() if k not in sizes}
        if old_settings != ctx["settings"]:
            raise SystemExit(f"--merge: {path_json} was measured with other settings: {old_settings}")
        clash = [w for w in workloads if w in old_sizes and old_sizes[w] != sizes]
        if clash:
            raise SystemExit(f"--merge: {path_json} measured {clash} with {[old_sizes[w] for w in clash]}, not "
                             f"{sizes}; use the same --examples/--eval-examples, or another --name")
        rows.update(old["results"])
        base_eval.update(old.get("base_eval") or {})
        ctx["sources"].update(old.get("sources") or {})
        ctx["workload_settings"].update(old_sizes)
        ctx["commands"] = list(old.get("commands") or [])
        ctx["notes"] += [n for n in old.get("notes") or [] if not any(fnmatch.fnmatch(n.split(":")[0], d)
                                                                      for d in args.drop)]
    dropped = [k for k in rows if any(fnmatch.fnmatch(k, d) for d in args.drop)]
    for k in dropped:
        del rows[k]
    if dropped:
        print(f"--drop: removed {dropped}", flush=True)
    for w in workloads:
        ctx["workload_settings"][w] = sizes
    print(cpu_line(), flush=True)
    ctx["size"], ctx["repeats"] = (1024, 3) if args.quick else (2048, 10)
    ctx["peak"] = gemm_peak(args.threads, ctx["size"], ctx["repeats"])
    print(f"GEMM peak, {args.threads} threads, {ctx['size']}^3, best of {ctx['repeats']}: fp32 "
          f"{ctx['peak']['fp32_gflops']:.0f}, bf16 {ctx['peak']['bf16_gflops']:.0f} GFLOP/s", flush=True)
    ctx["data"] = {w: make_data(args, w) for w in workloads}
    ctx["sources"].update({w: d["source"] for w, d in ctx["data"].items()})
    ctx["lk_tokens"] = {w: lorakit_tokens(ctx["model_path"], w, ctx["data"][w]["train_file"]) for w in workloads}

    adapters: dict[str, dict[str, Any]] = {}
    for workload in workloads:
        for targets in target_sets:
            for kind in kinds:
                key = f"{workload}/{targets}/{kind}"
                needs = KINDS[kind].get("needs")
                if needs and not ctx["features"][needs]:
                    ctx["notes"].append(f"{key}: skipped, this lorakit has no {needs.replace('_', ' ')} yet")
                    print(ctx["notes"][-1], flush=True)
                    continue
                ctx["notes"] = [n for n in ctx["notes"] if n.split(":")[0] != key]  # notes on the old row
                try:
                    rows[key] = train_run(ctx, workload, targets, kind)
                    adapters[key] = {"dir": rows[key]["adapter_dir"], "workload": workload}
                except Exception as e:  # noqa: BLE001  a failed run is a row saying so; the others go on
                    rows[key] = {"workload": workload, "targets": targets, "kind": kind,
                                 "label": KINDS[kind]["label"], "error": str(e)}
                    print(f"[{key}] FAILED: {e}", flush=True)
                write_report(ctx, rows, base_eval, None, done=False)

    if adapters:
        print(f"evaluating {len(adapters)} adapters in one process ...", flush=True)
        spec = {"model_path": ctx["model_path"], "threads": args.threads, "batch_size": 8,
                "eval_files": {w: d["eval_file"] for w, d in ctx["data"].items()},
                "adapters": {k.replace("/", "-"): v for k, v in adapters.items()}}
        ev = spawn(lorakit_python(), "eval", spec, args.work / "eval.log", args.threads)
        for key in adapters:
            rows[key].update(ev["adapters"][key.replace("/", "-")])
        base_eval.update(ev["base"])
    write_report(ctx, rows, base_eval, gemm_peak(args.threads, ctx["size"], ctx["repeats"]), done=True)


if __name__ == "__main__":
    main()
