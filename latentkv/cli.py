"""`latentkv` command line. Only argument parsing and printing live here; every command calls one
function of the package. Heavy imports happen inside the commands so `--help` is instant."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from inspect import Parameter  # (`inspect` is a command here)
from pathlib import Path
from typing import Annotated, Optional

import typer

# Plain records and option dataclasses: nothing heavy is imported.
from latentkv.calibration.options import CalibOptions, recipe_keys as calib_recipe_keys
from latentkv.convert.options import ConvertFlags
from latentkv.convert.registry import TARGETS
from latentkv.eval.options import EvalOptions
from latentkv.finetune.options import FinetuneOptions, SampleOptions
from latentkv.runtime.options import GenerateOptions
from latentkv.schema import (AS_JSON, GGUF_FILE, SOURCE, TRUST_REMOTE_CODE, add_options, cli_parameters,
                             from_command_line, merge_settings, parameter_names)
from latentkv.sparsity.options import TrainOptions

app = typer.Typer(
    name="latentkv",
    help="Rewrite the attention of a trained LLM so its KV cache is a fraction of the original.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
bench_app = typer.Typer(help="Benchmarks (quality on CPU, decode kernels on a GPU).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
predictor_app = typer.Typer(help="AttentionPredictor: a learned choice of the KV blocks each decode step reads.",
                            no_args_is_help=True)
app.add_typer(predictor_app, name="predictor")
cache_app = typer.Typer(help="The cache folder ($LATENTKV_CACHE, else ~/.cache/latentkv): list and prune.",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _option(spec: dict):
    """A typer option from a shared flag's spec (`latentkv.schema.TRUST_REMOTE_CODE`, ...)."""
    return typer.Option(*spec.get("opts", ()), help=spec["help"], rich_help_panel=spec.get("panel"))


# Shared parameters of the commands written out here: one definition each (`latentkv.schema`), so a
# flag means the same in every command.
SourceArg = Annotated[str, typer.Argument(help=SOURCE["help"])]
OutputArg = Annotated[Path, typer.Argument(help="Output folder (must be empty unless --overwrite).")]
GgufFile = Annotated[Optional[str], _option(GGUF_FILE)]
TrustRemoteCode = Annotated[bool, _option(TRUST_REMOTE_CODE)]
AsJson = Annotated[bool, _option(AS_JSON)]
RecipeOption = Annotated[Optional[Path], typer.Option(help="YAML file of these same settings (flags given on the command line win).")]


def _setup_logging(output: Path | None = None, verbose: bool = False) -> None:
    from rich.logging import RichHandler

    handlers: list[logging.Handler] = [RichHandler(show_path=False, level=logging.INFO if verbose else logging.WARNING)]
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=handlers, force=True)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(exc: Exception) -> None:
    from rich.console import Console

    from rich.markup import escape

    # One line, never wrapped by rich (a path cut in two cannot be pasted back); markup in the
    # message (a path with [brackets]) is printed as typed.
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(code=2)


def _run(fn, *args, **kwargs):
    """Call into the package; user mistakes print one clear line, no traceback."""
    from latentkv.errors import LatentKVError

    try:
        return fn(*args, **kwargs)
    except LatentKVError as exc:
        _fail(exc)


def _progress_factory(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    progress.start()

    def factory(name: str, total: int):
        task = progress.add_task(name, total=total)

        def advance(_i):
            progress.advance(task)
            if progress.tasks[task].completed >= total:
                progress.refresh()

        return advance

    factory.stop = progress.stop  # type: ignore[attr-defined]
    return factory


def _read_recipe_mapping(path: Path, what: str) -> dict:
    """The YAML mapping in a recipe file, or a one-line error naming the file."""
    import yaml

    from latentkv.errors import LatentKVError

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise LatentKVError(f"Could not read recipe {path}: {exc}") from None
    if not isinstance(data, dict):
        raise LatentKVError(f"Recipe {path} must be a YAML mapping of {what}")
    return data


def _load_recipe(path: Path | None) -> dict:
    if path is None:
        return {}
    data = _read_recipe_mapping(path, "settings")
    from latentkv.convert.pipeline import recipe_settings
    from latentkv.typed import check_types

    return check_types(recipe_settings(data), RECIPE_TYPES, f"Recipe {path}")


# Parameters a command's recipe never sets: where and whether to write, how to print, and running code
# from a checkpoint are the command line's.
COMMAND_LINE_ONLY = ("recipe", "overwrite", "trust_remote_code", "as_json", "verbose")


def _recipe_kinds(params) -> dict:
    """The settings a recipe may give a command of these (evaluated) parameters: its options that have
    a default, each as (type, repeatable, may be none)."""
    from typing import get_args, get_origin

    kinds = {}
    for p in params:
        annotation, *info = get_args(p.annotation) or (p.annotation,)
        is_option = any(isinstance(i, typer.models.OptionInfo) for i in info)
        if not is_option or p.default is Parameter.empty or p.name in COMMAND_LINE_ONLY:
            continue
        kind = next((a for a in get_args(annotation) if a is not type(None)), annotation)  # Optional[X] -> X
        repeatable = get_origin(kind) is list
        kinds[p.name] = (get_args(kind)[0] if repeatable else kind, repeatable, p.default is None)
    return kinds


def _command_recipe(path: Path | None, kinds: dict) -> dict:
    """The settings of a `--recipe` file, each of its option's type (`kinds`, `_recipe_kinds`): an
    unknown key or a value of another type is refused before any work."""
    if path is None:
        return {}
    from latentkv.errors import LatentKVError
    from latentkv.typed import as_type

    data = _read_recipe_mapping(path, "settings")
    unknown = sorted(map(str, set(data) - set(kinds)))
    if unknown:
        raise LatentKVError(f"Unknown recipe keys in {path}: {', '.join(unknown)}; known: {', '.join(sorted(kinds))}")
    out = {}
    for name, value in data.items():
        kind, repeatable, optional = kinds[name]
        plain = str if kind is Path else kind  # a path is written as text
        try:
            if value is None:
                if not optional:
                    raise ValueError(f"a value ({'a list' if repeatable else plain.__name__})")
                out[name] = None
            elif repeatable:
                if not isinstance(value, list):
                    raise ValueError("a list")
                out[name] = [kind(as_type(v, plain)) for v in value]
            else:
                out[name] = kind(as_type(value, plain))
        except ValueError as exc:
            raise LatentKVError(f"Recipe {path}: {name} must be {exc}, got {value!r}") from None
    return out


def _options(ctx, cls, recipe: Path | None, flags: dict):
    """`cls` (an options dataclass whose flags the command took: `add_options`) from the command line,
    the `--recipe` file (keyed by parameter name) and the defaults, by `merge_settings`. A recipe sets
    the flags that have a default, save those of the command line only (`COMMAND_LINE_ONLY`)."""
    settings = _run(_command_recipe, recipe, _recipe_kinds(cli_parameters(cls)))
    return _run(cls, **from_command_line(cls, merge_settings(ctx, flags, settings)))


# What a convert recipe may set, and the type of each (None: may be left empty). A recipe that
# `convert` wrote (`latentkv_recipe.yaml`) is flattened into these names first (`recipe_settings`).
RECIPE_TYPES: dict = {
    "to": str, "kv_lora_rank": (int, None), "kv_budget": (float, None), "qk_rope_dim": (int, str),
    "latent_heads": (int, None), "num_kv_heads": (int, None), "format": str, "device": str, "dtype": str,
    **dict(calib_recipe_keys().values()), "batch_size": int, "gguf_file": (str, None),
    "method_options": dict, "max_shard_size": (int, str), "save_dtype": (str, None), "sequential": bool,
    "grouping": (str, None), "engine": (str, None), "cache_format": (str, None),
}
RECIPE_KEYS = set(RECIPE_TYPES)


@app.command()
@add_options(CalibOptions, after="recipe")  # where --help has always listed the calibration flags
@add_options(ConvertFlags, after="output")
def convert(ctx: typer.Context, source: SourceArg, output: OutputArg, **flags):
    """Convert SOURCE's attention to a cheaper-to-cache form and write OUTPUT."""
    _setup_logging(verbose=flags["verbose"])
    from rich.console import Console

    from latentkv.convert.pipeline import convert as run_convert

    console = Console(stderr=True)
    opts = _convert_options(ctx, source, output, flags)
    factory = _progress_factory(console)
    try:
        result = _run(run_convert, opts, progress_factory=factory)
    finally:
        factory.stop()
    kept = 100 * result.kv_values_per_token / result.source_kv_values_per_token
    console.print(
        f"[bold green]wrote[/] {result.output}: KV values per token {result.kv_values_per_token} "
        f"(source {result.source_kv_values_per_token}, {kept:.1f}% kept) in {result.seconds:.0f} s"
    )
    for note in result.notes:
        console.print(f"note: {note}")


def _convert_options(ctx, source: str, output: Path, flags: dict):
    """The `ConvertOptions` of convert's flags (`ConvertFlags`, `CalibOptions`) merged with its
    `--recipe` (the command line wins): the method's widths, RoPE key, sequential pass and `--set`
    settings go into `method_options`, the rest onto the fields of the same name."""
    from latentkv.convert.pipeline import ConvertOptions
    from latentkv.errors import LatentKVError

    recipe = flags["recipe"]
    settings = _run(_load_recipe, recipe)
    unknown = sorted(set(settings) - RECIPE_KEYS)
    if unknown:
        _fail(LatentKVError(f"Unknown recipe keys in {recipe}: {', '.join(unknown)}; known: {', '.join(sorted(RECIPE_KEYS))}"))

    given = {name: flags[name] for name in parameter_names(ConvertFlags).values()
             if name not in ("method_option", *COMMAND_LINE_ONLY)}
    given.update(grouping=None, **{name: flags[name] for name in parameter_names(CalibOptions).values()})
    picked = merge_settings(ctx, given, settings)
    to = picked["to"]
    method_options: dict = dict(picked.get("method_options", {}))
    for item in flags["method_option"] or []:
        key, sep, val = item.partition("=")
        if not sep:
            _fail(LatentKVError(f"--set expects KEY=VALUE, got {item!r}"))
        method_options[key.strip()] = _parse_value(val.strip())
    for name in ("kv_lora_rank", "kv_budget", "latent_heads", "num_kv_heads", "grouping"):
        if picked[name] is not None:
            method_options[name] = picked[name]
    rope = picked["qk_rope_dim"]
    shared_flags = TARGETS[to].cli_options if to in TARGETS else ()  # an unknown target is refused by convert
    if "qk_rope_dim" in shared_flags:
        method_options.setdefault("qk_rope_dim", rope if rope == "auto" else _int_or_fail(rope, "--qk-rope-dim"))
    if "sequential" in shared_flags and picked["sequential"]:
        method_options["sequential"] = True
    calib = from_command_line(CalibOptions, picked)  # the flags; then the recipe's settings that are no flag
    calib.update({f: picked[key] for f, (key, _) in calib_recipe_keys().items() if f not in calib and key in picked})
    return ConvertOptions(
        source=source,
        output=str(output),
        method=to,
        method_options=method_options,
        format=picked["format"],
        engine=picked["engine"],
        cache_format=picked["cache_format"],
        calib=CalibOptions(**calib),
        device=picked["device"],
        dtype=picked["dtype"],
        save_dtype=picked["save_dtype"],
        overwrite=flags["overwrite"],
        max_shard_size=picked["max_shard_size"],
        gguf_file=picked["gguf_file"],
        trust_remote_code=flags["trust_remote_code"],
        command=_command_line(ctx),
        **({"batch_size": picked["batch_size"]} if "batch_size" in picked else {}),
    )


def _command_line(ctx) -> str:
    """The command as given: arguments plus every option set on the command line (for the card)."""
    if ctx is None:
        return "latentkv " + shlex.join(sys.argv[1:])
    parts = [ctx.command_path]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        source = ctx.get_parameter_source(param.name)
        if param.param_type_name == "argument":
            parts.append(str(value))
        elif source is not None and source.name == "COMMANDLINE" and value is not None:
            flag = param.opts[0]
            if isinstance(value, bool):
                parts.append(flag if value else (param.secondary_opts or [flag])[0])
            elif isinstance(value, (list, tuple)):
                for item in value:
                    parts += [flag, str(item)]
            else:
                parts += [flag, str(value)]
    return shlex.join(parts)


def _parse_value(text: str):
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _int_or_fail(value, flag: str) -> int:
    from latentkv.errors import LatentKVError

    try:
        return int(value)
    except (TypeError, ValueError):
        _fail(LatentKVError(f"{flag} must be an even integer or 'auto', got {value!r}"))


@app.command("eval")
@add_options(EvalOptions, after="ctx")
def eval_cmd(ctx: typer.Context, recipe: RecipeOption = None, **flags):
    """Perplexity (protocol: docs/evaluation.md) and KV cache bytes of MODEL; with --source, its agreement with the source."""
    _setup_logging()
    o = _options(ctx, EvalOptions, recipe, flags)
    from latentkv.eval.report import evaluate

    if o.kv_cache and (o.sparse or o.decode_check):  # those decode with the paged cache, which keeps the model's dtype
        from latentkv.errors import LatentKVError

        _fail(LatentKVError("--kv-cache applies to the perplexity pass only; run --sparse / --decode-check without it"))
    if o.sparse:  # settings checked before the perplexity run
        from latentkv.sparsity import SparseConfig, parse_budget
        from latentkv.sparsity.evaluate import sparse_eval

        cfg = _run(lambda: SparseConfig(o.sparse, budget=parse_budget(o.sparse_budget), track_recall=True,
                                        predictor=str(o.predictor) if o.predictor else None,
                                        per_latent_head=o.sparse_per_head, refresh=o.sparse_refresh,
                                        dense_refresh=o.sparse_dense_refresh))
    if o.long_text or o.retrieval or o.offload:
        from latentkv.sparsity.long_context import check_long_options, long_context_eval

        depths = _run(check_long_options, sparse=o.sparse, long_text=o.long_text, retrieval=o.retrieval, offload=o.offload,
                      context_tokens=o.context_tokens, span=o.long_span, depths=o.needle_depths)
        report = _run(long_context_eval, o.model, cfg, text=o.long_text, context_tokens=o.context_tokens, span=o.long_span,
                      retrieval=o.retrieval, depths=depths, page_size=o.page_size, offload=o.offload, device=o.device,
                      dtype=o.dtype, chat=o.retrieval_chat)
        if o.as_json:
            typer.echo(json.dumps(report, indent=None, default=str))
        else:
            from rich.console import Console

            Console().print(report)
        return
    report = _run(evaluate, o.model, eval_text=str(o.eval_text) if o.eval_text else None, window=o.eval_window,
                  windows=o.eval_windows, batch_size=o.batch_size, device=o.device, dtype=o.dtype, gguf_file=o.gguf_file,
                  trust_remote_code=o.trust_remote_code, decode_check=o.decode_check, decode_tokens=o.decode_tokens,
                  source=o.source, kv_cache=o.kv_cache, kv_cache_rope=o.kv_cache_rope, kv_cache_chunk=o.kv_cache_chunk)
    if o.sparse:
        report["sparse"] = _run(sparse_eval, o.model, cfg, eval_text=str(o.eval_text) if o.eval_text else None,
                                tokens=o.decode_tokens, prompt_tokens=o.eval_window, page_size=o.page_size, device=o.device,
                                dtype=o.dtype)
    if o.as_json:
        typer.echo(json.dumps(report, indent=None, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"latentkv eval: {o.model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report.items():
        if isinstance(value, dict):
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if "agreement" in report:
        Console().print(report["agreement"])
    if "sparse" in report:
        Console().print(report["sparse"])
    if "decode_check" in report:
        check = {k: v for k, v in report["decode_check"].items() if not isinstance(v, (list, tuple))}
        Console().print(check)
        if not report["decode_check"].get("passed", False):
            raise typer.Exit(code=1)


@app.command()
def inspect(
    model: SourceArg,
    gguf_file: GgufFile = None,
    trust_remote_code: TrustRemoteCode = False,
    as_json: AsJson = False,
):
    """Architecture summary of MODEL and what each target would cache."""
    _setup_logging()
    from latentkv.eval.report import inspect_model

    info = _run(inspect_model, model, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    if as_json:
        typer.echo(json.dumps(info, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title=f"{model}", show_header=False)
    for key, value in info["architecture"].items():
        summary.add_row(key, str(value))
    console.print(summary)
    if not info["targets"]:
        return
    targets = Table(title="KV cache per token per layer, by target")
    context = info["targets"][0]["context_tokens"]
    for col in ("target", "cached per token per layer", "values", "% of source", "bytes (bf16), all layers",
                f"bytes (bf16) per sequence of {context} tokens"):
        targets.add_column(col)
    for row in info["targets"]:
        targets.add_row(row["target"], row["what"], str(row["values"]), f"{row['percent']:.1f}%",
                        str(row["bytes_bf16_all_layers"]), f"{row['bytes_bf16_at_context']:,}")
    console.print(targets)
    engines = Table(title="--to mla --format deepseek --engine NAME: the widest servable cache that saves KV")
    engines.add_column("engine", no_wrap=True)
    for col in ("export caches per layer", "% of source", "runs"):
        engines.add_column(col)
    for row in info.get("engines", []):
        engines.add_row(row["engine"], row["geometry"], "-" if row["percent"] is None else f"{row['percent']:.1f}%",
                        row["accepts"])
    if info.get("engines"):
        console.print(engines)


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(help="A finished latentkv output folder.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo, e.g. user/model-mla.")],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch to push to (created if missing).")] = None,
):
    """Upload FOLDER to the Hugging Face Hub as REPO_ID (token from `hf auth login` or HF_TOKEN)."""
    _setup_logging()
    from latentkv.hub.push import push_folder

    url = _run(push_folder, folder, repo_id, private=private, revision=revision)
    typer.echo(f"pushed {folder} -> {url}")


@app.command()
@add_options(GenerateOptions, after="ctx")
def generate(ctx: typer.Context, recipe: RecipeOption = None, **flags):
    """Greedy generation with latentkv's paged latent cache and fused decode kernels."""
    _setup_logging()
    o = _options(ctx, GenerateOptions, recipe, flags)
    from latentkv.calibration.runner import check_device
    from latentkv.runtime.decode import generate_cli

    _run(check_device, o.device)

    for text in _run(generate_cli, o.model, list(o.prompt), max_new_tokens=o.max_new_tokens, backend=o.backend,
                     device=o.device, dtype=o.dtype):
        typer.echo(text)


@app.command()
@add_options(SampleOptions, after="ctx")
def sample(ctx: typer.Context, recipe: RecipeOption = None, **flags):
    """Sample training text from the teacher, for `latentkv finetune --data` (resumable: rerun the
    same command to continue)."""
    _setup_logging()
    from rich.console import Console

    from latentkv.finetune.teacher_text import sample_teacher_text

    opts = _options(ctx, SampleOptions, recipe, flags)
    factory = _progress_factory(Console(stderr=True))
    advance = factory("sampling rounds", opts.rounds)
    try:
        result = _run(sample_teacher_text, opts, progress=lambda done, total: advance(done))
    finally:
        factory.stop()
    typer.echo(json.dumps({"output": str(result.output), "tokens": result.tokens, "documents": result.documents,
                           "tokens_per_s": round(result.tokens_per_s)}))


@app.command()
@add_options(FinetuneOptions, after="ctx")
def finetune(
    ctx: typer.Context,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML file of finetune settings (the option fields, or the latentkv_recipe.yaml a finetune wrote); flags given on the command line win.")] = None,
    **flags,
):
    """Heal a converted model: LoRA (or the new attention weights) distilled from the teacher.
    Several GPUs: `accelerate launch -m latentkv.cli finetune ...` (same flags)."""
    _setup_logging()
    from latentkv.finetune.pipeline import finetune as run_finetune

    settings = _run(_load_finetune_recipe, recipe)
    fields = merge_settings(ctx, from_command_line(FinetuneOptions, flags), settings, parameter_names(FinetuneOptions))
    opts = _run(FinetuneOptions, **fields, command=_command_line(ctx))
    result = _run(run_finetune, opts)
    import os

    if int(os.environ.get("RANK", "0")) != 0:  # several processes (accelerate launch): the main one reports
        return
    typer.echo(json.dumps({"output": str(result.output), "steps": result.steps, "tokens": result.tokens,
                           "tokens_per_s": round(result.tokens_per_s), "mfu": result.mfu, "evals": result.evals,
                           "before": result.before, "after": result.after}))


def _load_finetune_recipe(path: Path | None) -> dict:
    if path is None:
        return {}
    from latentkv.finetune.options import recipe_settings

    return recipe_settings(_read_recipe_mapping(path, "finetune settings"), str(path))


@predictor_app.command("train")
@add_options(TrainOptions, after="ctx")
def predictor_train(ctx: typer.Context, recipe: RecipeOption = None, **flags):
    """Collect MODEL's block-pooled attention on --data and train an AttentionPredictor."""
    _setup_logging(verbose=True)
    from rich.console import Console

    from latentkv.sparsity.train import train_predictor

    opts = _options(ctx, TrainOptions, recipe, flags)
    factory = _progress_factory(Console(stderr=True))
    try:
        result = _run(train_predictor, opts, progress_factory=factory)
    finally:
        factory.stop()
    typer.echo(json.dumps(result))


@cache_app.command("list")
def cache_list(as_json: AsJson = False):
    """Every cache folder with its size and when it was last used."""
    import time

    from latentkv.io.cache import cache_entries
    from latentkv.io.source import latentkv_cache_dir

    entries = cache_entries()
    rows = [{"kind": e.kind, "path": str(e.path), "bytes": e.bytes, "state": e.state, "about": e.about,
             "last_used": time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))} for e in entries]
    if as_json:
        typer.echo(json.dumps({"root": str(latentkv_cache_dir()), "bytes": sum(e.bytes for e in entries),
                               "entries": rows}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"latentkv cache: {latentkv_cache_dir()}")
    for col in ("kind", "folder", "size", "last used", "state", "made from"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["kind"], Path(r["path"]).name, f"{r['bytes'] / 1e6:.1f} MB", r["last_used"], r["state"],
                      r["about"])
    Console().print(table)
    Console().print(f"total {sum(e.bytes for e in entries) / 1e6:.1f} MB in {len(entries)} folder(s)")


@cache_app.command("prune")
def cache_prune(
    older_than: Annotated[float, typer.Option(help="Delete calibration statistics and GGUF dequantizations last used more than this many days ago.")] = 30.0,
    all_: Annotated[bool, typer.Option("--all", help="Delete every calibration statistics and GGUF folder.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Only say what would be deleted.")] = False,
):
    """Free space: calibration statistics and GGUF dequantizations are made again when needed."""
    from latentkv.io.cache import prune_cache

    gone = _run(prune_cache, older_than_days=older_than, everything=all_, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for e in gone:
        typer.echo(f"{verb} {e.path} ({e.bytes / 1e6:.1f} MB)")
    typer.echo(f"{verb} {len(gone)} folder(s), {sum(e.bytes for e in gone) / 1e6:.1f} MB")


@bench_app.command("quality")
def bench_quality(
    ctx: typer.Context,
    args: Annotated[Optional[list[str]], typer.Argument(help="Arguments for scripts/bench_quality.py.")] = None,
):
    """One-shot conversion quality of SmolLM2-135M at several KV budgets (see scripts/bench_quality.py)."""
    _run_script("bench_quality.py", args or [])


@bench_app.command("decode")
def bench_decode(
    args: Annotated[Optional[list[str]], typer.Argument(help="Arguments for scripts/bench_decode.py.")] = None,
):
    """GPU decode kernel timings against copy bandwidth and torch SDPA (see scripts/bench_decode.py)."""
    _run_script("bench_decode.py", args or [])


def _run_script(name: str, args: list[str]) -> None:
    import runpy

    script = Path(__file__).resolve().parents[1] / "scripts" / name
    if not script.exists():
        _fail(FileNotFoundError(f"{script} not found; the benchmarks run from a source checkout of latentkv"))
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")


def _print_version(value: bool) -> None:
    if value:
        from latentkv import __version__

        typer.echo(f"latentkv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Rewrite the attention of a trained LLM so its KV cache is a fraction of the original."""


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
