"""The `lorakit` command: a thin shell over the library API. Each command parses options and calls one library function.

Errors from lorakit (`LorakitError`) print as one clear message and exit with status 2; anything else is a bug.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from lorakit.cli.options import Flag, all_flags, config_options, nested
from lorakit.data.benchmarks import DEFAULT_DATA_DIR
from lorakit.errors import LorakitError
from lorakit.eval.config import EvalConfig
from lorakit.inference.sampling import Sampling
from lorakit.serve.config import ServeConfig
from lorakit.train import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA fine-tuning for PyTorch / Hugging Face models.")


def _parse_targets(value: Optional[str]):
    """--target-modules: comma-separated names, one name, 'all-linear', or a regex."""
    if value is None or value == "all-linear":
        return value
    if "," in value or value.isidentifier():
        return [v.strip() for v in value.split(",") if v.strip()]
    return value  # a regex


TARGETS_FLAG = Flag("lora.target_modules", annotation=str, parse=_parse_targets)


@app.command()
@config_options(TrainConfig, [Flag("lora.r"), TARGETS_FLAG])
def inspect(
    model: str = typer.Option("smollm2-135m", help="Embedded model name, local model folder or hub id."),
    task: str = typer.Option("causal-lm", help="causal-lm or seq-cls."),
    *, values: dict[str, Any],
) -> None:
    """Show what an adapter on MODEL would train: parameters per module, total, % of the model, size."""
    from lorakit import LoraConfig, add_lora, load_model, trainable_parameters

    base, _ = load_model(model, task=task)
    add_lora(base, LoraConfig(**nested(values)["lora"]))
    report = trainable_parameters(base)
    for name, count, note in report.per_module:
        typer.echo(f"{name:60s} {count:>10,}  {note}")
    typer.echo(str(report))


@app.command("adapter-info")
def adapter_info(
    path: Path = typer.Argument(..., help="An adapter folder (lorakit or PEFT)."),
    for_: Optional[str] = typer.Option(None, "--for", help="llama.cpp, vllm or peft: instead of the summary, list "
                                       "what would not load or would behave differently there (exit 1 on an error)."),
    model: Optional[str] = typer.Option(None, help="With --for: the base model (default: the one the adapter records)."),
) -> None:
    """Print a saved adapter's config, tensors and provenance without loading a model; or, with --for, its
    compatibility with llama.cpp, vLLM or PEFT."""
    import json

    from lorakit.lora.adapter_io import META_FILE, WEIGHTS_FILE, peek_adapter_config, read_adapter_weights

    if for_ is not None:
        from lorakit.export.compat import adapter_compatibility

        findings = adapter_compatibility(path, target=for_, base_name_or_path=model)
        for finding in findings:
            typer.echo(f"{finding.level}: {finding.message}")
        errors = sum(f.level == "error" for f in findings)
        warnings = sum(f.level == "warning" for f in findings)
        typer.echo(f"{for_}: {errors} error(s), {warnings} warning(s)")
        raise typer.Exit(1 if errors else 0)
    if model is not None:
        raise LorakitError("--model only applies with --for (the base whose compatibility is checked); drop it, or "
                           "add --for llama.cpp, vllm or peft.")
    config = peek_adapter_config(path)
    weights = read_adapter_weights(path / WEIGHTS_FILE)
    typer.echo(json.dumps(config.to_dict(), indent=2))
    typer.echo(f"{len(weights)} tensors, {sum(t.numel() for t in weights.values()):,} parameters")
    if (path / META_FILE).is_file():
        meta = json.loads((path / META_FILE).read_text())
        typer.echo(f"lorakit {meta.get('lorakit_version')}, base {meta.get('base_model')} "
                   f"({meta.get('base_model_class')})")


EVAL_FLAGS = all_flags(EvalConfig, Flag("metrics", parse=lambda items: [m.strip() for item in items
                                                                       for m in item.split(",") if m.strip()]))


@app.command("eval")
@config_options(EvalConfig, EVAL_FLAGS)
def eval_(
    adapters: Optional[list[Path]] = typer.Argument(None, help="Adapter folders to evaluate (several in one call)."),
    model: str = typer.Option("smollm2-135m", help="Base model: embedded name, model folder (e.g. a merged model) or hub id."),
    base: bool = typer.Option(True, help="Also evaluate the base model without adapters."),
    merge: bool = typer.Option(False, help="Merge each adapter into the weights before evaluating it."),
    out: Optional[Path] = typer.Option(None, help="Write results.json, results.md, results.png (bar chart) and "
                                       "outputs/*.jsonl (every example's output) here."),
    *, values: dict[str, Any],
) -> None:
    """Score the base model and adapters side by side on your own file (--data: instruction, chat or classification,
    read as training reads it) or a preset (--task e2e|sst2|mrpc|rte|cola|stsb)."""
    from lorakit.eval.evaluate import evaluate_many, results_table

    report = evaluate_many(EvalConfig(**nested(values)), model=model, adapters=[str(a) for a in adapters or []],
                           include_base=base, merge=merge, out_dir=out)
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

    base = None
    if model is not None:
        from lorakit.models.loading import load_model

        base, _ = load_model(model)
    report = run(adapter1, adapter2, base=base, matrix=matrix, out_dir=out, random_draws=random_draws,
                 base_name=model)
    typer.echo(report["markdown"])


SAMPLING_FLAGS = [Flag("max_new_tokens", default=128), Flag("temperature"), Flag("top_p"), Flag("top_k"), Flag("seed"),
                  Flag("stop"), Flag("frequency_penalty"), Flag("presence_penalty")]


@app.command()
@config_options(Sampling, SAMPLING_FLAGS)
def generate(
    prompt: Optional[str] = typer.Argument(None, help="The prompt. Omit it to use --prompts-file or --chat."),
    model: str = typer.Option("smollm2-135m", help="Base model: embedded name, model folder or hub id."),
    adapter: Optional[str] = typer.Option(None, help="Adapter folder, or its name inside --adapters-dir."),
    adapters_dir: Path = typer.Option(Path("adapters"), help="Where adapter names are looked up."),
    prompts_file: Optional[Path] = typer.Option(None, help="One prompt per line (.txt) or JSONL; answers as JSONL."),
    chat: bool = typer.Option(False, help="Interactive chat with the tokenizer's chat template (empty line ends)."),
    template: bool = typer.Option(True, help="Wrap prompts as a user message in the chat template."),
    batch_size: int = typer.Option(16, help="Prompts decoded together with --prompts-file."),
    *, values: dict[str, Any],
) -> None:
    """Generate text from a prompt, a file of prompts or an interactive chat, streamed to the terminal."""
    import json

    from lorakit import load_adapter, load_model
    from lorakit.inference.chat import chat as chat_loop
    from lorakit.inference.generate import read_prompts, resolve_adapter_dir
    from lorakit.inference.generate import generate as run

    if sum([prompt is not None, prompts_file is not None, chat]) != 1:
        raise LorakitError("Give exactly one of: a PROMPT argument, --prompts-file FILE, or --chat.")
    sampling = Sampling(**values)
    base, tokenizer = load_model(model)
    name = None
    if adapter is not None:
        name = "default"
        load_adapter(base, resolve_adapter_dir(adapter, adapters_dir), adapter=name)
    use_template = template and bool(getattr(tokenizer, "chat_template", None))

    if prompt is not None:
        run(base, tokenizer, [prompt], name, sampling, chat=use_template, on_text=lambda _row, text: _write(text))
        typer.echo()
    elif prompts_file is not None:
        prompts = read_prompts(prompts_file)
        for start in range(0, len(prompts), batch_size):
            part = prompts[start:start + batch_size]
            for p, c in zip(part, run(base, tokenizer, part, name, sampling, chat=use_template)):
                typer.echo(json.dumps({"prompt": p, "output": c.text, "finish_reason": c.finish_reason},
                                      ensure_ascii=False))
    else:
        chat_loop(base, tokenizer, _read_chat_line, _write, adapter=name, sampling=sampling)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _read_chat_line() -> str:
    try:
        return typer.prompt("you", default="", show_default=False)
    except typer.Abort:  # Ctrl-D / Ctrl-C at the prompt ends the chat like an empty line
        typer.echo()
        return ""


HF_ONLY = ("dtype", "max_drift", "force", "quantize")
GGUF_ONLY = ("quant", "tokenizer_pre", "placeholder_vocab")


@app.command()
def merge(
    ctx: typer.Context,
    adapter: Path = typer.Argument(..., help="The adapter folder to merge."),
    out: Path = typer.Option(..., help="The merged model folder to write (plain transformers, no lorakit needed); "
                                       "with --format gguf the .gguf file (an Ollama Modelfile is written beside it)."),
    model: str = typer.Option("smollm2-135m", help="The base model the adapter was trained on."),
    format: str = typer.Option("hf", help="hf (a transformers model folder) or gguf (one llama.cpp / Ollama file)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    max_drift: float = typer.Option(1e-3, help="Largest allowed logit difference vs base+adapter."),
    force: bool = typer.Option(False, help="Write the merged model even if the drift exceeds --max-drift."),
    quantize: Optional[str] = typer.Option(None, help="nf4, int8 or int8-wo: the adapter was trained on this "
                                                      "quantized base; merge into its dequantized weights."),
    quant: str = typer.Option("f16", help="With --format gguf: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0."),
    tokenizer_pre: Optional[str] = typer.Option(None, help="With --format gguf, for a model folder other than the "
                                                "embedded default: llama.cpp's pre-tokenizer name (e.g. smollm, "
                                                "llama-bpe, gpt-2)."),
    placeholder_vocab: bool = typer.Option(False, help="With --format gguf: write a file without a vocabulary (for a "
                                                       "model folder without a tokenizer; run it with token ids)."),
) -> None:
    """Merge an adapter into its base and write a model folder AutoModelForCausalLM.from_pretrained loads, or
    (--format gguf) a GGUF file llama.cpp and Ollama run, with an Ollama Modelfile beside it."""
    if format not in ("hf", "gguf"):
        raise LorakitError(f"--format must be hf (a transformers model folder) or gguf, got {format!r}.")
    wrong = [name for name in (HF_ONLY if format == "gguf" else GGUF_ONLY) if _given(ctx, name)]
    if wrong:
        raise LorakitError(f"{', '.join('--' + w.replace('_', '-') for w in wrong)}: not used with --format {format} "
                           f"(these options are for --format {'hf' if format == 'gguf' else 'gguf'}); drop them or "
                           "change --format.")
    if format == "gguf":
        from lorakit.export.gguf_model import export_merged_gguf

        typer.echo(str(export_merged_gguf(model, out, quant=quant, adapter=adapter, tokenizer_pre=tokenizer_pre,
                                          placeholder_vocab=placeholder_vocab)))
        return
    from lorakit.export.merged import merge_to_directory

    typer.echo(str(merge_to_directory(model, adapter, out, dtype=dtype, max_drift=max_drift, force=force,
                                      quantize=quantize)))


@app.command()
def export(
    adapter: Path = typer.Argument(..., help="The adapter folder to convert."),
    out: Path = typer.Option(..., help="The file to write, e.g. adapter.gguf."),
    format: str = typer.Option("gguf", help="gguf: a GGUF LoRA adapter for llama.cpp (--lora) and Ollama (ADAPTER)."),
    dtype: str = typer.Option("f32", help="f32, f16, bf16 or q8_0."),
    model: Optional[str] = typer.Option(None, help="The base model (default: the one the adapter records)."),
) -> None:
    """Convert an adapter folder for llama.cpp / Ollama (the folder itself is in PEFT's format; `lorakit adapter-info
    ADAPTER --for vllm|peft|llama.cpp` checks where it loads as it is)."""
    if format != "gguf":
        raise LorakitError(f"--format must be gguf, got {format!r}. For a merged model use `lorakit merge`.")
    from lorakit.export.gguf import export_adapter_gguf

    typer.echo(str(export_adapter_gguf(adapter, out, dtype=dtype, base_name_or_path=model)))


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


SERVE_FLAGS = all_flags(ServeConfig, Flag("adapters", name="adapter"), Flag("admin_token", envvar="LORAKIT_ADMIN_TOKEN"))


@app.command()
@config_options(ServeConfig, SERVE_FLAGS)
def serve(*, values: dict[str, Any]) -> None:
    """Serve the base and its adapters over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    from lorakit.serve.server import serve as run

    run(ServeConfig(**values))


TRAIN_FLAGS = [  # the common keys; --set reaches every other one
    Flag("model"), Flag("task"), Flag("output_dir"), Flag("seed"),
    Flag("data.train_file"), Flag("data.eval_file"), Flag("data.eval_fraction"), Flag("data.format"),
    Flag("data.max_length"),
    Flag("optim.lr"), Flag("optim.epochs"), Flag("optim.max_steps"), Flag("optim.batch_size"), Flag("optim.grad_accum"),
    Flag("optim.weight_decay"), Flag("optim.schedule"), Flag("optim.warmup_ratio"),
    Flag("lora.r"), Flag("lora.alpha"), Flag("lora.dropout"), TARGETS_FLAG,
    Flag("lora.init"), Flag("lora.use_dora"), Flag("lora.use_rslora"),
    Flag("precision"), Flag("base_dtype"), Flag("quantize"),
    Flag("gradient_checkpointing"), Flag("eval_every"), Flag("save_every"), Flag("metric"), Flag("distributed"),
]


def _section(field) -> str:
    return f"{field.section}.* settings" if field.section else "Run settings"


def set_overrides(items: list[str]) -> dict[str, str]:
    """--set KEY=VALUE items as {dotted key: text}; the config parses each value (as YAML) and checks the key."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LorakitError(f"--set expects KEY=VALUE (e.g. optim.lr=1e-4), got {item!r}.")
        overrides[key.strip()] = value
    return overrides


@app.command()
@config_options(TrainConfig, TRAIN_FLAGS, defaults=False, panel=_section)
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML training config."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder from its newest checkpoint."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override any key: --set optim.warmup_ratio=0.1."),
    data_dir: Path = typer.Option(DEFAULT_DATA_DIR, help="Relative data paths not found here are looked up in it."),
    show_example: bool = typer.Option(False, help="Print the tokens of the first example as the model sees them."),
    nproc: int = typer.Option(1, help="Processes on this machine; N > 1 runs torchrun for you (ddp by default)."),
    *, values: dict[str, Any],
) -> None:
    """Fine-tune with LoRA from a YAML config plus command-line overrides; resumable (--resume RUN_DIR).

    Each option below sets the config key shown as its default; any other key: --set KEY=VALUE."""
    from lorakit.train import distributed as dist
    from lorakit.train import train as run

    overrides = {**values, **set_overrides(set_ or [])}
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


app.command("ui")(__import__("lorakit.cli.ui", fromlist=["ui"]).ui)  # `lorakit ui`: the web page (lorakit.ui)


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
