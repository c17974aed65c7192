"""Command-line options generated from the library's config dataclasses, so each setting is described once.

A field's help text is the string literal written right after it in the dataclass source (the docstring style the
configs use); its option type comes from the annotation (bool gives --x/--no-x; int, float, str and their Optional
forms; a list of str a repeatable option). Fields of other types (tuples, dicts, mixed unions) have no flag of their
own: `lorakit train` reaches every key with `--set key=value`.

    @config_options(TrainConfig, [Flag("optim.lr"), Flag("lora.r")], defaults=False)
    def train(config: Path = typer.Option(...), *, values: dict[str, Any]) -> None:
        ...                                          # values: {"optim.lr": 1e-3} for the flags given
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

import typer

SIMPLE = (bool, int, float, str)
FIELD_DEFAULT = type("FieldDefault", (), {"__repr__": lambda self: "FIELD_DEFAULT"})()  # "use the field's default"


@dataclass(frozen=True)
class Flag:
    """One first-class option for a config field."""

    key: str
    """Dotted field path in the config: "seed", "optim.lr", "generation.num_beams"."""
    name: str | None = None
    """Python/option name (--name-with-dashes); default: the last part of `key`."""
    envvar: str | None = None
    """Environment variable read when the option is not given."""
    parse: Callable[[Any], Any] | None = None
    """Turns the option's value into the config value (e.g. a comma-separated list)."""
    annotation: Any = None
    """The option's type when it is not the field's own (used with `parse`)."""
    default: Any = FIELD_DEFAULT
    """This command's default when it differs from the field's (e.g. longer answers on the command line)."""

    @property
    def param(self) -> str:
        return self.name or self.key.rsplit(".", 1)[-1]


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring, whitespace collapsed to single spaces} read from the class source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


@dataclass(frozen=True)
class FieldInfo:
    """One leaf field of a (nested) config dataclass."""

    key: str
    """Dotted path: "optim.lr"."""
    type: Any
    default: Any
    doc: str | None
    """The docstring after the field, None when it has none."""
    section: str
    """The dotted section the field sits in ("" for the top level)."""


def config_fields(cls: type, prefix: str = "") -> list[FieldInfo]:
    """Every leaf field of a config dataclass, nested sections flattened to dotted keys."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out += config_fields(kind, prefix + f.name + ".")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append(FieldInfo(prefix + f.name, kind, default, docs.get(f.name), prefix.rstrip(".")))
    return out


def all_flags(cls: type, *special: Flag) -> list[Flag]:
    """A flag for every field of `cls` in field order (new fields get theirs); `special` ones replace the plain flag
    of their key (another name, an environment variable)."""
    given = {flag.key: flag for flag in special}
    return [given.get(f.key, Flag(f.key)) for f in config_fields(cls)]


def option_type(kind: Any) -> Any | None:
    """The typer annotation for a field type, or None when the field has no flag (reach it with --set)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            inner = option_type(rest[0])
            return None if inner is None else Optional[inner]
        return None
    if kind in SIMPLE:
        return kind
    if typing.get_origin(kind) is list and args in ((str,), (int,), (float,)):
        return list[args[0]]
    return None


def config_options(cls: type, flags: list[Flag], defaults: bool = True, panel: Callable[[FieldInfo], str] | None = None):
    """Decorate a command with a keyword-only parameter `values`: add one option per flag, built from `cls`'s fields.

    The command receives `values`, a dict from dotted key to value. With `defaults`, every option defaults to the
    field's default and every key is in `values`; without, options default to None (shown with the config default)
    and only the options given on the command line are in `values` (so a YAML config file keeps its own values).
    """
    fields = {f.key: f for f in config_fields(cls)}

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = inspect.signature(command)
        hints = typing.get_type_hints(command)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own.parameters.values()
                  if p.name != "values"]
        generated = {}
        for flag in flags:
            info = fields.get(flag.key)
            if info is None:
                raise KeyError(f"{cls.__name__} has no field {flag.key!r}")
            kind = flag.annotation or option_type(info.type)
            if kind is None:
                raise TypeError(f"{cls.__name__}.{flag.key} ({info.type}) has no option type; give Flag(annotation=...)")
            default = (info.default if flag.default is FIELD_DEFAULT else flag.default) if defaults else None
            generated[flag.param] = (flag, default)
            shown = f"{flag.key}={_show(info.default)}" if not defaults else True
            option = typer.Option(default, "--" + flag.param.replace("_", "-") + _negation(kind, flag),
                                  help=info.doc, envvar=flag.envvar, show_default=shown,
                                  rich_help_panel=panel(info) if panel else None)
            params.append(inspect.Parameter(flag.param, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=kind if defaults else Optional[kind]))

        @functools.wraps(command)
        def run(**kwargs):
            values = {}
            for name, (flag, default) in generated.items():
                value = kwargs.pop(name)
                if isinstance(value, list) and not value:  # a repeatable option given no times
                    value = list(default) if isinstance(default, list) else default
                if value is None and not defaults:
                    continue
                values[flag.key] = flag.parse(value) if flag.parse and value is not None else value
            return command(**kwargs, values=values)

        run.__signature__ = own.replace(parameters=params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


def _negation(kind: Any, flag: Flag) -> str:
    base = typing.get_args(kind)[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) else kind
    return "/--no-" + flag.param.replace("_", "-") if base is bool else ""


def _show(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys to nested keyword arguments: {"generation.num_beams": 4} -> {"generation": {"num_beams": 4}}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out
