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

    from lorakit.adapter_io import META_FILE, WEIGHTS_FILE, peek_adapter_config, read_adapter_weights

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


# -- commands from other concerns are added above this line --


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=True)
    except LorakitError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
