"""`latentkv` command line. Only argument parsing and printing live here; every command calls one
function of the package. Heavy imports happen inside the commands so `--help` is instant."""

from __future__ import annotations

import functools
import json
import logging
import shlex
import sys
from inspect import Parameter, Signature, signature  # (`inspect` is a command here)
from pathlib import Path
from typing import Annotated, Optional

import typer

# Plain records and option dataclasses: nothing heavy is imported.
from latentkv.calibration.options import SEED, CalibOptions, recipe_keys as calib_recipe_keys
from latentkv.convert.registry import TARGETS, target_help
from latentkv.data import DEFAULT_CALIBRATION
from latentkv.finetune.options import FinetuneOptions
from latentkv.schema import (OVERWRITE, TRUST_REMOTE_CODE, add_options, from_command_line, merge_settings,
                             parameter_names)

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


def _option(spec: dict, *decls: str):
    """A typer option from a shared flag's help text and panel (`latentkv.schema.OVERWRITE`, ...)."""
    return typer.Option(*decls, help=spec["help"], rich_help_panel=spec.get("panel"))


# Shared options: one definition each, so a flag means the same in every command.
SourceArg = Annotated[str, typer.Argument(help="Local HF folder, .gguf file, or Hub id.")]
OutputArg = Annotated[Path, typer.Argument(help="Output folder (must be empty unless --overwrite).")]
Device = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.", rich_help_panel="Runtime")]
Dtype = Annotated[str, typer.Option(help="Compute dtype: float32, bfloat16, float16.", rich_help_panel="Runtime")]
Overwrite = Annotated[bool, _option(OVERWRITE)]
GgufFile = Annotated[Optional[str], typer.Option(help="GGUF file name inside SOURCE (a folder or Hub repo).")]
TrustRemoteCode = Annotated[bool, _option(TRUST_REMOTE_CODE)]
Seed = Annotated[int, _option(SEED)]
EvalText = Annotated[Optional[Path], typer.Option(help="Evaluation text: .txt/.raw, or .jsonl of {\"text\": ...} rows (default: WikiText-2 test).", rich_help_panel="Evaluation")]
EvalWindow = Annotated[int, typer.Option(help="Tokens per evaluation window.", rich_help_panel="Evaluation")]
EvalWindows = Annotated[int, typer.Option(help="Number of evaluation windows.", rich_help_panel="Evaluation")]
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


def _takes_recipe(fn):
    """Decorator: the command also takes `--recipe FILE`, a YAML mapping of its own option names; a
    value given on the command line wins over the recipe's, the recipe's over the default."""
    own = list(signature(fn, eval_str=True).parameters.values())
    kinds = _recipe_kinds(own)
    wants_ctx = any(p.name == "ctx" for p in own)
    extra = [Parameter("recipe", Parameter.KEYWORD_ONLY, annotation=RecipeOption, default=None)]
    if not wants_ctx:
        extra.insert(0, Parameter("ctx", Parameter.KEYWORD_ONLY, annotation=typer.Context))

    @functools.wraps(fn)
    def command(ctx: typer.Context, recipe: Optional[Path] = None, **values):
        settings = _run(_command_recipe, recipe, kinds)
        merged = merge_settings(ctx, values, settings)
        return fn(ctx=ctx, **merged) if wants_ctx else fn(**merged)

    command.__signature__ = Signature([p.replace(kind=Parameter.KEYWORD_ONLY) for p in own] + extra)
    return command


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
@add_options(CalibOptions, after="recipe")
def convert(
    ctx: typer.Context,
    source: SourceArg,
    output: OutputArg,
    to: Annotated[str, typer.Option("--to", help=target_help())] = "mla",
    kv_lora_rank: Annotated[Optional[int], typer.Option(help="Latent width per layer (MLA/GLA; the value latent of GTA-S).", rich_help_panel="Method")] = None,
    kv_budget: Annotated[Optional[float], typer.Option(help="Fraction of the source KV cache to keep (0-1]; widths then per layer. Default 0.5 when no --kv-lora-rank is given (MLA, GLA).", rich_help_panel="Method")] = None,
    qk_rope_dim: Annotated[str, typer.Option(help="Width of the cached RoPE key (even), or 'auto' (chosen per layer from the statistics; latentkv format).", rich_help_panel="Method")] = "auto",
    latent_heads: Annotated[Optional[int], typer.Option(help="GLA latent heads (must divide the query heads).", rich_help_panel="Method")] = None,
    num_kv_heads: Annotated[Optional[int], typer.Option(help="GQA target: KV heads to keep.", rich_help_panel="Method")] = None,
    method_option: Annotated[Optional[list[str]], typer.Option("--set", help="Extra method setting KEY=VALUE (e.g. --set rope_mix=real); repeatable.", rich_help_panel="Method")] = None,
    sequential: Annotated[bool, typer.Option(help="Sequential calibration: each layer sees the converted layers before it (one pass; with --set refit_output=true the best one-shot quality).", rich_help_panel="Method")] = False,
    format: Annotated[str, typer.Option("--format", help="latentkv (self-contained remote code) or deepseek (stock DeepseekV3).", rich_help_panel="Output")] = "latentkv",
    engine: Annotated[Optional[str], typer.Option(help="Serving engine of the --format deepseek export (vllm-cpu, vllm-triton-mla, vllm-flashmla, sglang-fa3, ...; see `latentkv inspect`): the cache gets a geometry it runs, or the conversion is refused before any work.", rich_help_panel="Output")] = None,
    cache_format: Annotated[Optional[str], typer.Option(help="KV cache format the output carries in its config, honoured by its modeling file, `latentkv eval` and the paged decode kernels: a latent format (fp8_e4m3/g<N>, int4/g<N>, fp8_e4m3/head, int4/head, bf16, fp16; N a power of 2) with the RoPE key at bf16, or latent=FORMAT,rope=bf16|fp16.", rich_help_panel="Output")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML file with these same settings (flags given on the command line win).")] = None,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    save_dtype: Annotated[Optional[str], typer.Option(help="dtype of the written weights (default: the source's).", rich_help_panel="Output")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 5GB.", rich_help_panel="Output")] = "5GB",
    overwrite: Overwrite = False,
    gguf_file: GgufFile = None,
    trust_remote_code: TrustRemoteCode = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Log every decision (ranks per layer...).")] = False,
    **calib_flags,
):
    """Convert SOURCE's attention to a cheaper-to-cache form and write OUTPUT."""
    _setup_logging(verbose=verbose)
    from rich.console import Console

    from latentkv.convert.pipeline import ConvertOptions, convert as run_convert
    from latentkv.errors import LatentKVError

    console = Console(stderr=True)
    settings = _run(_load_recipe, recipe)
    unknown = sorted(set(settings) - RECIPE_KEYS)
    if unknown:
        _fail(LatentKVError(f"Unknown recipe keys in {recipe}: {', '.join(unknown)}; known: {', '.join(sorted(RECIPE_KEYS))}"))

    given = dict(to=to, kv_lora_rank=kv_lora_rank, kv_budget=kv_budget, latent_heads=latent_heads,
                 num_kv_heads=num_kv_heads, grouping=None, qk_rope_dim=qk_rope_dim, sequential=sequential,
                 format=format, engine=engine, cache_format=cache_format, device=device, dtype=dtype,
                 save_dtype=save_dtype, max_shard_size=max_shard_size, gguf_file=gguf_file, **calib_flags)
    picked = merge_settings(ctx, given, settings)
    to = picked["to"]
    method_options: dict = dict(picked.get("method_options", {}))
    for item in method_option or []:
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
    opts = ConvertOptions(
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
        overwrite=overwrite,
        max_shard_size=picked["max_shard_size"],
        gguf_file=picked["gguf_file"],
        trust_remote_code=trust_remote_code,
        command=_command_line(ctx),
        **({"batch_size": picked["batch_size"]} if "batch_size" in picked else {}),
    )
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
@_takes_recipe
def eval_cmd(
    model: SourceArg,
    eval_text: EvalText = None,
    eval_window: EvalWindow = 512,
    eval_windows: EvalWindows = 64,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.", rich_help_panel="Evaluation")] = 4,
    decode_check: Annotated[bool, typer.Option(help="Also check that our paged-kernel decode loop equals the HF forward pass (latentkv format).", rich_help_panel="Evaluation")] = False,
    decode_tokens: Annotated[int, typer.Option(help="Tokens for --decode-check.", rich_help_panel="Evaluation")] = 256,
    sparse: Annotated[Optional[str], typer.Option(help="Also decode --decode-tokens teacher-forced after an --eval-window-token prompt with a sparse KV policy (dense, window, last-step, quest, oracle, predictor), compared with dense decoding.", rich_help_panel="Sparse decode")] = None,
    sparse_budget: Annotated[str, typer.Option(help="Blocks per step: a fraction (0.25, 25%) or a count (16).", rich_help_panel="Sparse decode")] = "0.25",
    predictor: Annotated[Optional[Path], typer.Option(help="AttentionPredictor folder (--sparse predictor).", rich_help_panel="Sparse decode")] = None,
    page_size: Annotated[int, typer.Option(help="Tokens per cache page (= block) for --sparse.", rich_help_panel="Sparse decode")] = 16,
    long_text: Annotated[Optional[str], typer.Option(help="Instead of the perplexity pass, evaluate --sparse at long context on this text (a file, or a book of latentkv's Gutenberg set, e.g. chesterton-thursday): --context-tokens tokens, the last --long-span decoded teacher-forced, compared with dense decoding.", rich_help_panel="Sparse decode")] = None,
    context_tokens: Annotated[int, typer.Option(help="Tokens per --long-text context (prompt + span; the retrieval prompt).", rich_help_panel="Sparse decode")] = 4096,
    long_span: Annotated[int, typer.Option(help="Tokens decoded teacher-forced at the end of the --long-text context.", rich_help_panel="Sparse decode")] = 64,
    retrieval: Annotated[bool, typer.Option(help="With --long-text: also a passkey retrieval test (a needle at each --needle-depths, greedy answer under the policy and densely).", rich_help_panel="Sparse decode")] = False,
    needle_depths: Annotated[str, typer.Option(help="Comma-separated needle depths in [0, 1] for --retrieval.", rich_help_panel="Sparse decode")] = "0.1,0.5,0.9",
    retrieval_chat: Annotated[bool, typer.Option(help="With --retrieval: the prompt as one user turn of the tokenizer's chat template, the assistant's answer begun with 'The pass key is' (what an instruct model retrieves with).", rich_help_panel="Sparse decode")] = False,
    offload: Annotated[bool, typer.Option(help="With --long-text: decode through an offloaded cache (host pages, a device pool sized to the budget) and report the forecast's misses.", rich_help_panel="Sparse decode")] = False,
    source: Annotated[Optional[str], typer.Option(help="Also measure agreement with this model (the one MODEL was converted from): KL(source || model) per token and top-1 agreement on the same windows.", rich_help_panel="Evaluation")] = None,
    kv_cache: Annotated[Optional[str], typer.Option(help="Run the windows through a KV cache stored in this format (quantized on write, dequantized on read) and report its bytes: ENCODING\\[/GROUPING] with bf16, fp16, fp8_e4m3, int8, int4, int3, int2 and /token, /head, /g<N>, /channel<N> (KIVI keys); or per part, e.g. keys=int2/channel32,values=int2/g32 (source) or latent=fp8_e4m3/g128,rope=bf16 (latentkv). Replaces the format a converted model's config carries (convert --cache-format), which is used by default.", rich_help_panel="KV cache format")] = None,
    kv_cache_rope: Annotated[Optional[str], typer.Option(help="Format of the RoPE key of a latentkv model (default: --kv-cache's).", rich_help_panel="KV cache format")] = None,
    kv_cache_chunk: Annotated[Optional[int], typer.Option(help="Feed N tokens per forward through a cache that quantizes on write, instead of the default one forward per window in which every query reads the cache a streaming decode loop holds after writing its token (per-token formats quantized on write, /channel<N> groups once complete, the unfinished group at full precision). 1 is that decode loop; a larger N lets a chunk read the groups it completes quantized.", rich_help_panel="KV cache format")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    gguf_file: GgufFile = None,
    trust_remote_code: TrustRemoteCode = False,
):
    """Perplexity (protocol: docs/evaluation.md) and KV cache bytes of MODEL; with --source, its agreement with the source."""
    _setup_logging()
    from latentkv.eval.report import evaluate

    if kv_cache and (sparse or decode_check):  # those decode with the paged cache, which keeps the model's dtype
        from latentkv.errors import LatentKVError

        _fail(LatentKVError("--kv-cache applies to the perplexity pass only; run --sparse / --decode-check without it"))
    if sparse:  # settings checked before the perplexity run
        from latentkv.sparsity import SparseConfig, parse_budget
        from latentkv.sparsity.evaluate import sparse_eval

        cfg = _run(lambda: SparseConfig(sparse, budget=parse_budget(sparse_budget), track_recall=True,
                                        predictor=str(predictor) if predictor else None))
    if long_text or retrieval or offload:
        from latentkv.sparsity.long_context import check_long_options, long_context_eval

        depths = _run(check_long_options, sparse=sparse, long_text=long_text, retrieval=retrieval, offload=offload,
                      context_tokens=context_tokens, span=long_span, depths=needle_depths)
        report = _run(long_context_eval, model, cfg, text=long_text, context_tokens=context_tokens, span=long_span,
                      retrieval=retrieval, depths=depths, page_size=page_size, offload=offload, device=device,
                      dtype=dtype, chat=retrieval_chat)
        if as_json:
            typer.echo(json.dumps(report, indent=None, default=str))
        else:
            from rich.console import Console

            Console().print(report)
        return
    report = _run(evaluate, model, eval_text=str(eval_text) if eval_text else None, window=eval_window,
                  windows=eval_windows, batch_size=batch_size, device=device, dtype=dtype, gguf_file=gguf_file,
                  trust_remote_code=trust_remote_code, decode_check=decode_check, decode_tokens=decode_tokens,
                  source=source, kv_cache=kv_cache, kv_cache_rope=kv_cache_rope, kv_cache_chunk=kv_cache_chunk)
    if sparse:
        report["sparse"] = _run(sparse_eval, model, cfg, eval_text=str(eval_text) if eval_text else None,
                                tokens=decode_tokens, prompt_tokens=eval_window, page_size=page_size, device=device,
                                dtype=dtype)
    if as_json:
        typer.echo(json.dumps(report, indent=None, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"latentkv eval: {model}")
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
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
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
@_takes_recipe
def generate(
    model: SourceArg,
    prompt: Annotated[list[str], typer.Option(help="Prompt (repeat for a batch).")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    backend: Annotated[str, typer.Option(help="auto (Triton on CUDA), triton, reference.")] = "auto",
    device: Device = "cpu",
    dtype: Dtype = "float32",
):
    """Greedy generation with latentkv's paged latent cache and fused decode kernels."""
    _setup_logging()
    from latentkv.calibration.runner import check_device
    from latentkv.runtime.decode import generate_cli

    _run(check_device, device)

    for text in _run(generate_cli, model, prompt, max_new_tokens=max_new_tokens, backend=backend, device=device, dtype=dtype):
        typer.echo(text)


@app.command()
@_takes_recipe
def sample(
    teacher: SourceArg,
    output: Annotated[Path, typer.Argument(help="JSONL file to write ({\"text\": ...} per document).")],
    tokens: Annotated[int, typer.Option(help="Tokens to sample in all.")] = 5_000_000,
    seq_len: Annotated[int, typer.Option(help="Tokens per sampled row (cut into documents at EOS).")] = 1024,
    batch_size: Annotated[int, typer.Option(help="Rows sampled together.")] = 512,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (1 = the teacher's own distribution).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed (round r of rows draws from seed and r).")] = 0,
    device: Device = "cpu",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16, float16.", rich_help_panel="Runtime")] = "auto",
    gguf_file: GgufFile = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.", rich_help_panel="Output")] = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Sample training text from the teacher, for `latentkv finetune --data` (resumable: rerun the
    same command to continue)."""
    _setup_logging()
    from rich.console import Console

    from latentkv.finetune.teacher_text import SampleOptions, sample_teacher_text

    opts = _run(SampleOptions, teacher=teacher, output=str(output), tokens=tokens, seq_len=seq_len,
                batch_size=batch_size, temperature=temperature, seed=seed, device=device, dtype=dtype,
                overwrite=overwrite, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
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
@_takes_recipe
def predictor_train(
    model: Annotated[str, typer.Argument(help="Converted model folder (latentkv format, MLA or GLA).")],
    out: Annotated[Path, typer.Option(help="Folder for attention_predictor.safetensors + .json.")],
    data: Annotated[str, typer.Option(help="Training text, file or folder (WikiText refused).")] = DEFAULT_CALIBRATION,
    exclude: Annotated[Optional[list[str]], typer.Option(help="File name under --data to hold out; repeatable.")] = None,
    windows: Annotated[int, typer.Option(help="Text windows to collect attention from (10% validate).")] = 24,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 1024,
    page_size: Annotated[int, typer.Option(help="Tokens per block (= the decode cache's page size).")] = 16,
    history: Annotated[int, typer.Option(help="Steps of history the predictor reads.")] = 16,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1500,
    seed: Seed = 0,
    overwrite: Overwrite = False,
):
    """Collect MODEL's block-pooled attention on --data and train an AttentionPredictor."""
    _setup_logging(verbose=True)
    from rich.console import Console

    from latentkv.sparsity.train import TrainOptions, train_predictor

    opts = _run(TrainOptions, model=model, out=str(out), data=data, exclude=tuple(exclude or ()), windows=windows,
                seq_len=seq_len, page_size=page_size, history=history, steps=steps, seed=seed, overwrite=overwrite)
    factory = _progress_factory(Console(stderr=True))
    try:
        result = _run(train_predictor, opts, progress_factory=factory)
    finally:
        factory.stop()
    typer.echo(json.dumps(result))


@cache_app.command("list")
def cache_list(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False):
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
