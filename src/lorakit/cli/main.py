"""The `lorakit` command: a thin shell over the library API. Each command parses options and calls one library function.

Errors from lorakit (`LorakitError`) print as one clear message and exit with status 2; anything else is a bug.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from lorakit.errors import LorakitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA fine-tuning for PyTorch / Hugging Face models.")

DEFAULT_DATA_DIR = Path("../shared/data")


@app.command()
def inspect(
    model: str = typer.Option("smollm2-135m", help="Embedded model name, local model folder or hub id."),
    target_modules: Optional[str] = typer.Option(None, help="Comma-separated names, a regex, or 'all-linear'."),
    r: int = typer.Option(8, help="LoRA rank."),
    task: str = typer.Option("causal-lm", help="causal-lm or seq-cls."),
) -> None:
    """Show what an adapter on MODEL would train: parameters per module, total, % of the model, size."""
    from lorakit import LoraConfig, add_lora, load_model, trainable_parameters

    base, _ = load_model(model, task=task)
    targets = _parse_targets(target_modules)
    add_lora(base, LoraConfig(r=r, target_modules=targets))
    report = trainable_parameters(base)
    for name, count, note in report.per_module:
        typer.echo(f"{name:60s} {count:>10,}  {note}")
    typer.echo(str(report))


@app.command("adapter-info")
def adapter_info(path: Path = typer.Argument(..., help="An adapter folder (lorakit or PEFT).")) -> None:
    """Print a saved adapter's config, tensors and provenance without loading a model."""
    import json

    from lorakit.lora.adapter_io import META_FILE, WEIGHTS_FILE, peek_adapter_config, read_adapter_weights

    config = peek_adapter_config(path)
    weights = read_adapter_weights(path / WEIGHTS_FILE)
    typer.echo(json.dumps(config.to_dict(), indent=2))
    typer.echo(f"{len(weights)} tensors, {sum(t.numel() for t in weights.values()):,} parameters")
    if (path / META_FILE).is_file():
        meta = json.loads((path / META_FILE).read_text())
        typer.echo(f"lorakit {meta.get('lorakit_version')}, base {meta.get('base_model')} "
                   f"({meta.get('base_model_class')})")


def _parse_targets(value: Optional[str]):
    if value is None or value == "all-linear":
        return value
    if "," in value or value.isidentifier():
        return [v.strip() for v in value.split(",") if v.strip()]
    return value  # a regex


@app.command("eval")
def eval_(
    adapters: Optional[list[Path]] = typer.Argument(None, help="Adapter folders to evaluate (several in one call)."),
    task: str = typer.Option("e2e", help="e2e, sst2, mrpc, rte, cola or stsb."),
    model: str = typer.Option("smollm2-135m", help="Base model: embedded name, model folder (e.g. a merged model) or hub id."),
    base: bool = typer.Option(True, help="Also evaluate the base model without adapters."),
    merge: bool = typer.Option(False, help="Merge each adapter into the weights before evaluating it."),
    data_dir: Path = typer.Option(DEFAULT_DATA_DIR, help="The shared benchmark data folder."),
    split: Optional[str] = typer.Option(None, help="dev (E2E) / validation (GLUE) by default."),
    limit: Optional[int] = typer.Option(None, help="Only the first N examples."),
    decoding: str = typer.Option("greedy", help="greedy or beam."),
    num_beams: int = typer.Option(4, help="Beams for --decoding beam."),
    max_new_tokens: int = typer.Option(64, help="New tokens per output at most."),
    batch_size: int = typer.Option(16, help="Prompts (or texts) per batch."),
    bf16: bool = typer.Option(False, help="bfloat16 autocast for generation (faster on CPU)."),
    out: Optional[Path] = typer.Option(None, help="Write results.json, results.md and outputs/*.jsonl here."),
) -> None:
    """Score the base model and/or adapters on a benchmark (E2E: BLEU, NIST, METEOR, ROUGE-L, CIDEr; GLUE metrics)."""
    from lorakit.eval.evaluate import EvalConfig, GenerationConfig, evaluate_many, results_table

    config = EvalConfig(task=task, split=split, limit=limit, data_dir=str(data_dir),
                        generation=GenerationConfig(decoding=decoding, num_beams=num_beams,
                                                    max_new_tokens=max_new_tokens, batch_size=batch_size, bf16=bf16))
    report = evaluate_many(config, model=model, adapters=[str(a) for a in adapters or []], include_base=base,
                           merge=merge, out_dir=out)
    typer.echo(results_table(report["results"]))


@app.command()
def analyze(
    adapter1: Path = typer.Argument(..., help="An adapter folder."),
    adapter2: Optional[Path] = typer.Argument(None, help="A second adapter on the same base (e.g. another rank or seed)."),
    model: Optional[str] = typer.Option(None, help="Base model for the amplification factor of ADAPTER1's ΔW."),
    matrix: str = typer.Option("A", help="Compare subspaces of the A matrices (as in the paper) or of ΔW ('delta')."),
    random_draws: int = typer.Option(10, help="Random direction draws averaged for the amplification baseline."),
    out: Optional[Path] = typer.Option(None, help="Write analysis.json, analysis.md and subspace_similarity.png here."),
) -> None:
    """The paper's ΔW analysis: normalised subspace similarity between two adapters and the amplification factor."""
    from lorakit.lora.analysis import analyze as run

    report = run(adapter1, adapter2, model=model, matrix=matrix, out_dir=out, random_draws=random_draws)
    typer.echo(report["markdown"])


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="The prompt. Omit it to use --prompts-file or --chat."),
    model: str = typer.Option("smollm2-135m", help="Base model: embedded name, model folder or hub id."),
    adapter: Optional[str] = typer.Option(None, help="Adapter folder, or its name inside --adapters-dir."),
    adapters_dir: Path = typer.Option(Path("adapters"), help="Where adapter names are looked up."),
    prompts_file: Optional[Path] = typer.Option(None, help="One prompt per line (.txt) or JSONL; answers as JSONL."),
    chat: bool = typer.Option(False, help="Interactive chat with the tokenizer's chat template (empty line ends)."),
    template: bool = typer.Option(True, help="Wrap prompts as a user message in the chat template."),
    max_new_tokens: int = typer.Option(128, help="New tokens per answer at most."),
    temperature: float = typer.Option(0.0, help="0 = greedy; above 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0 = all)."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    batch_size: int = typer.Option(16, help="Prompts decoded together with --prompts-file."),
) -> None:
    """Generate text from a prompt, a file of prompts or an interactive chat, streamed to the terminal."""
    import json

    from lorakit import load_adapter, load_model
    from lorakit.inference.generate import Row, Sampling, encode_chat, generate_rows, read_prompts, resolve_adapter_dir
    from lorakit.inference.generate import generate as run

    if sum([prompt is not None, prompts_file is not None, chat]) != 1:
        raise LorakitError("Give exactly one of: a PROMPT argument, --prompts-file FILE, or --chat.")
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    base, tokenizer = load_model(model)
    name = None
    if adapter is not None:
        name = "default"
        load_adapter(base, resolve_adapter_dir(adapter, adapters_dir), adapter=name)
    use_template = template and bool(getattr(tokenizer, "chat_template", None))

    def show(_row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if prompt is not None:
        run(base, tokenizer, [prompt], name, sampling, chat=use_template, on_text=show)
        typer.echo()
    elif prompts_file is not None:
        prompts = read_prompts(prompts_file)
        for start in range(0, len(prompts), batch_size):
            part = prompts[start:start + batch_size]
            for p, c in zip(part, run(base, tokenizer, part, name, sampling, chat=use_template)):
                typer.echo(json.dumps({"prompt": p, "output": c.text, "finish_reason": c.finish_reason},
                                      ensure_ascii=False))
    else:
        messages: list[dict[str, str]] = []
        while True:
            line = typer.prompt("you", default="", show_default=False)
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            sys.stdout.write("model: ")
            answer = generate_rows(base, tokenizer, [Row(encode_chat(tokenizer, messages), name, sampling)], show)[0]
            typer.echo()
            messages.append({"role": "assistant", "content": answer.text})


@app.command()
def merge(
    adapter: Path = typer.Argument(..., help="The adapter folder to merge."),
    out: Path = typer.Option(..., help="The merged model folder to write (plain transformers, no lorakit needed)."),
    model: str = typer.Option("smollm2-135m", help="The base model the adapter was trained on."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    max_drift: float = typer.Option(1e-3, help="Largest allowed logit difference vs base+adapter."),
    force: bool = typer.Option(False, help="Write the merged model even if the drift exceeds --max-drift."),
    quantize: Optional[str] = typer.Option(None, help="nf4, int8 or int8-wo: the adapter was trained on this "
                                                      "quantized base; merge into its dequantized weights."),
) -> None:
    """Merge an adapter into its base and write a model folder AutoModelForCausalLM.from_pretrained loads."""
    from lorakit.export.merged import merge_to_directory

    typer.echo(str(merge_to_directory(model, adapter, out, dtype=dtype, max_drift=max_drift, force=force,
                                      quantize=quantize)))


@app.command()
def serve(
    model: str = typer.Option("smollm2-135m", help="Base model: embedded name, model folder or hub id."),
    adapters_dir: Path = typer.Option(Path("adapters"), help="Adapter folders that may be served (by folder name)."),
    adapter: Optional[list[str]] = typer.Option(None, help="Adapter name to load at start (repeatable); default all."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    admin_token: Optional[str] = typer.Option(None, envvar="LORAKIT_ADMIN_TOKEN",
                                              help="Bearer token for /admin endpoints (unset: admin disabled)."),
    max_batch_size: int = typer.Option(16, help="Most requests decoded together."),
    batch_wait_ms: float = typer.Option(10.0, help="How long to wait for more requests to batch."),
    max_tokens_limit: int = typer.Option(512, help="Largest max_tokens a request may ask for."),
    dtype: str = typer.Option("float32", help="Base weights' dtype: float32 or bfloat16."),
    max_body_bytes: int = typer.Option(1_000_000, help="Largest request body (bigger: 413)."),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Largest prompt in tokens (longer: 400)."),
    max_adapter_mb: Optional[float] = typer.Option(None, help="Adapter cache limit: load adapters on demand and "
                                                   "evict the least recently used idle ones beyond this many MB."),
) -> None:
    """Serve the base and its adapters over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    from lorakit.serve.server import ServeConfig, serve as run

    run(ServeConfig(model=model, adapters_dir=str(adapters_dir), adapters=adapter or None, host=host, port=port,
                    admin_token=admin_token, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                    max_tokens_limit=max_tokens_limit, dtype=dtype, max_body_bytes=max_body_bytes,
                    max_prompt_tokens=max_prompt_tokens, max_adapter_mb=max_adapter_mb))


_TRAIN_OPTIONS = {  # CLI option -> dotted TrainConfig key
    "train_file": "data.train_file", "eval_file": "data.eval_file", "format": "data.format",
    "max_length": "data.max_length", "model": "model", "output_dir": "output_dir", "seed": "seed",
    "lr": "optim.lr", "epochs": "optim.epochs", "max_steps": "optim.max_steps", "batch_size": "optim.batch_size",
    "grad_accum": "optim.grad_accum", "r": "lora.r", "alpha": "lora.alpha", "precision": "precision",
    "base_dtype": "base_dtype", "eval_every": "eval_every", "save_every": "save_every", "metric": "metric",
    "gradient_checkpointing": "gradient_checkpointing", "distributed": "distributed", "quantize": "quantize",
}


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML training config."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder from its newest checkpoint."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override any key: --set optim.warmup_ratio=0.1."),
    train_file: Optional[str] = typer.Option(None, help="Training data (.jsonl/.json/.csv/.parquet or datasets dir)."),
    eval_file: Optional[str] = typer.Option(None, help="Validation data."),
    data_dir: Path = typer.Option(DEFAULT_DATA_DIR, help="Relative data paths not found here are looked up in it."),
    format: Optional[str] = typer.Option(None, help="instruction, chat, text, classification or auto."),
    max_length: Optional[int] = typer.Option(None, help="Truncate examples to this many tokens."),
    model: Optional[str] = typer.Option(None, help="Base model: embedded name, model folder or hub id."),
    output_dir: Optional[str] = typer.Option(None, help="The run folder."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    epochs: Optional[int] = typer.Option(None, help="Passes over the training data."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, help="Examples per micro-batch."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step."),
    r: Optional[int] = typer.Option(None, help="LoRA rank."),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha."),
    target_modules: Optional[str] = typer.Option(None, help="Comma-separated names, a regex, or 'all-linear'."),
    precision: Optional[str] = typer.Option(None, help="fp32 or bf16 (autocast)."),
    base_dtype: Optional[str] = typer.Option(None, help="bf16 casts the frozen base once (faster on AMX CPUs)."),
    eval_every: Optional[int] = typer.Option(None, help="Evaluate every N steps."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps."),
    metric: Optional[str] = typer.Option(None, help="accuracy or exact_match on the validation data."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, help="Trade compute for memory."),
    show_example: bool = typer.Option(False, help="Print the tokens of the first example as the model sees them."),
    distributed: Optional[str] = typer.Option(None, help="none, ddp or fsdp: how ranks share work under torchrun."),
    nproc: int = typer.Option(1, help="Processes on this machine; N > 1 runs torchrun for you (ddp by default)."),
    quantize: Optional[str] = typer.Option(None, help="nf4 or int8 (bitsandbytes) or int8-wo (torchao "
                                                      "int8 weight-only): a quantized frozen base (QLoRA)."),
) -> None:
    """Fine-tune with LoRA from a YAML config plus command-line overrides; resumable (--resume RUN_DIR)."""
    from lorakit.train import distributed as dist
    from lorakit.train.loop import TrainConfig, train as run

    values = {"train_file": train_file, "eval_file": eval_file, "format": format, "max_length": max_length,
              "model": model, "output_dir": output_dir, "seed": seed, "lr": lr, "epochs": epochs,
              "max_steps": max_steps, "batch_size": batch_size, "grad_accum": grad_accum, "r": r, "alpha": alpha,
              "precision": precision, "base_dtype": base_dtype, "eval_every": eval_every, "save_every": save_every,
              "metric": metric, "gradient_checkpointing": gradient_checkpointing, "distributed": distributed,
              "quantize": quantize}
    overrides = {_TRAIN_OPTIONS[k]: v for k, v in values.items() if v is not None}
    if target_modules is not None:
        overrides["lora.target_modules"] = _parse_targets(target_modules)
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise LorakitError(f"--set expects KEY=VALUE (e.g. optim.lr=1e-4), got {item!r}.")
        overrides[key.strip()] = value
    for key in ("data.train_file", "data.eval_file"):
        path = overrides.get(key)
        if isinstance(path, str) and not Path(path).exists() and (data_dir / path).exists():
            overrides[key] = str(data_dir / path)
    if nproc > 1 and not dist.launched():  # re-run this very command under torchrun, N ranks
        args, run_dir = dist.without_option(sys.argv[1:], "--nproc"), resume
        if resume is None:
            planned = TrainConfig.from_yaml(config, overrides)  # bad configs fail here, before any process starts
            run_dir = planned.output_dir
            if planned.distributed == "none":
                args += ["--distributed", "ddp"]
        raise typer.Exit(dist.launch(nproc, args, run_dir))
    if resume is not None:
        if config is not None or overrides:
            raise LorakitError("--resume continues a run with its saved config; do not combine it with --config "
                               "or overrides (start a new run for different settings).")
        result = run(None, resume=resume, show_example_first=show_example)
    else:
        result = run(TrainConfig.from_yaml(config, overrides), show_example_first=show_example)
    main = dist.is_main()
    dist.teardown(dist.launched())
    if not main:
        return
    if result.interrupted:
        typer.echo(f"stopped at step {result.steps}; resume with: lorakit train --resume {result.run_dir}")
    else:
        typer.echo(f"adapter: {result.adapter_dir}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where the generated data, the run and the report go."),
    steps: int = typer.Option(40, help="Optimizer steps (batch 4) over the 300 generated examples."),
) -> None:
    """The main job: teach SmolLM2-135M a strict output format with LoRA and show base vs adapted, merged == unmerged."""
    from lorakit.demo import run_demo

    run_demo(out, steps=steps)


# -- commands from other concerns are added above this line --


@app.command()
def plan(
    model: str = typer.Argument("llama-2-7b", help="A preset (llama-2-7b, llama-2-70b), config.json, model folder or embedded name."),
    devices: int = typer.Option(8, help="Devices for the DDP and FSDP2 columns."),
    dtype: str = typer.Option("bf16", help="Base weights: fp32, bf16, fp16, int8 or nf4."),
    r: int = typer.Option(8, help="LoRA rank."),
    targets: str = typer.Option("q_proj,v_proj", help="Comma-separated linear layers of each block."),
    batch: int = typer.Option(8, help="Global micro-batch (split over the devices)."),
    seq: int = typer.Option(2048, help="Tokens per example."),
    gradient_checkpointing: bool = typer.Option(False, help="Keep only each block's input for backward."),
) -> None:
    """Estimate memory per device for LoRA training: one device, DDP and FSDP2 over N devices."""
    from lorakit.train.plan import plan_table

    typer.echo(plan_table(model, devices, dtype, r, tuple(t.strip() for t in targets.split(",") if t.strip()),
                          batch, seq, gradient_checkpointing))


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except LorakitError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
