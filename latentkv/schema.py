"""One schema for a command's settings.

The fields of an options dataclass carry their command-line flag (`setting`: help text, help panel,
and the flag's name where it is not the field's); the CLI generates one option per such field
(`add_options`), builds the dataclass back from the parsed values (`from_command_line`), and every
command merges the command line, a recipe file and the defaults by one rule (`merge_settings`).
A field declared without `setting` is not a flag: a recipe may still set it.

Only the standard library is imported here (typer inside the functions), so the CLI can build its
commands at import time and `--help` stays instant.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

CLI = "latentkv.cli"  # the key of a field's metadata that holds its flag

# Flags several commands share (`setting(False, **OVERWRITE)`): one help text each.
OVERWRITE = dict(panel="Output", help="Replace a non-empty output folder.")
TRUST_REMOTE_CODE = dict(panel="Dangerous", help="Run model code shipped with the checkpoint.")
SOURCE = dict(help="Local HF folder, .gguf file, or Hub id.", argument=True)
DEVICE = dict(panel="Runtime", help="cpu, cuda or cuda:N.")
DTYPE = dict(panel="Runtime", help="Compute dtype: float32, bfloat16, float16.")
GGUF_FILE = dict(help="GGUF file name inside SOURCE (a folder or Hub repo).")
AS_JSON = dict(help="Print one JSON object.", opts=("--json",))


def setting(default=dataclasses.MISSING, *, help: str, panel: str | None = None, flag: str | None = None,
            cli_type=None, argument: bool = False, opts: tuple[str, ...] = ()):
    """A dataclass field that is also a command-line flag.

    help / panel: the flag's help text and rich-help panel. flag: the parameter name when it differs
    from the field's (`kl_data` gives `--kl-data` for the field `kl_text`). cli_type: the type the
    command line parses when it differs from the field's (a `Path` for a `str` field, a list for a
    tuple); argument: a positional argument instead of an option. No default: a required argument (or
    option). opts: the option's spellings where they are not `--<flag-name>` (`("-v", "--verbose")`)."""
    meta = {CLI: {"help": help, "panel": panel, "flag": flag, "type": cli_type, "argument": argument, "opts": opts}}
    return dataclasses.field(default=default, metadata=meta)


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of `cls` that are flags, in declaration order."""
    return [f for f in dataclasses.fields(cls) if CLI in f.metadata]


def parameter_names(cls) -> dict[str, str]:
    """Field name -> command-line parameter name, for every flag of `cls`."""
    return {f.name: f.metadata[CLI]["flag"] or f.name for f in cli_fields(cls)}


def _default(f: dataclasses.Field):
    return inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default


def cli_parameters(cls) -> list[inspect.Parameter]:
    """One keyword parameter per flag of `cls`, typed `Annotated[type, typer.Option(...)]` (or
    `typer.Argument`), its default the field's: what typer turns into the command's options."""
    import typer

    hints = typing.get_type_hints(cls)
    params = []
    for f in cli_fields(cls):
        meta = f.metadata[CLI]
        kind = meta["type"] or hints[f.name]
        if type(None) in typing.get_args(kind):  # `X | None` as typer reads it
            kind = typing.Optional[next(a for a in typing.get_args(kind) if a is not type(None))]
        info = typer.Argument(help=meta["help"]) if meta["argument"] else \
            typer.Option(*meta["opts"], help=meta["help"], rich_help_panel=meta["panel"])
        default = _default(f)
        if meta["type"] is not None and isinstance(default, tuple):  # a repeatable flag: unset is None
            default = None
        params.append(inspect.Parameter(meta["flag"] or f.name, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=typing.Annotated[kind, info], default=default))
    return params


def add_options(*classes, after: str | None = None):
    """Decorator: the command also takes one option per flag of each of `classes` (inserted after
    its parameter `after`, else at the end); the function receives them as keyword arguments
    (declare `**options`)."""

    def decorate(fn):
        # Keyword-only: typer passes every parameter by name, and those without a default may follow.
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(fn, eval_str=True).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        extra = [p for cls in classes for p in cli_parameters(cls)]
        at = next(i + 1 for i, p in enumerate(own) if p.name == after) if after else len(own)
        fn.__signature__ = inspect.Signature(own[:at] + extra + own[at:])
        return fn

    return decorate


def from_command_line(cls, values: dict) -> dict:
    """The flags of `cls` among the parsed `values` (keyed by parameter name) as field values: a
    path given for a text field becomes its text, a list a tuple, and an unset flag whose command
    line type differs from the field's (None) the field's default."""
    out = {}
    for f in cli_fields(cls):
        name = f.metadata[CLI]["flag"] or f.name
        if name not in values:
            continue
        value = values[name]
        if value is None and f.metadata[CLI]["type"] is not None:
            value = _default(f)
        elif isinstance(value, Path) and f.metadata[CLI]["type"] is not None:
            value = str(value)
        elif isinstance(value, list):
            value = tuple(value)
        out[f.name] = value
    return out


def given_on_command_line(ctx, name: str) -> bool:
    """Whether the parameter `name` was typed on the command line (not its default)."""
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return source is not None and source.name == "COMMANDLINE"


def merge_settings(ctx, values: dict, recipe: dict, params: dict[str, str] | None = None) -> dict:
    """Every setting from the command line where it was given there, else from the recipe, else the
    parsed value (the default). `values` and `recipe` are keyed by setting name; `params` maps a
    setting to its command-line parameter where the names differ. Recipe settings that are no flag
    are kept."""
    params = params or {}
    out = dict(values)
    for name, value in recipe.items():
        if not given_on_command_line(ctx, params.get(name, name)):
            out[name] = value
    return out
