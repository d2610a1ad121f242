"""`latentkv` command line. Only argument parsing and printing live here; every command calls one
function of the package. Heavy imports happen inside the commands so `--help` is instant."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from latentkv.convert.registry import TARGETS, target_help  # plain records: nothing heavy is imported
from latentkv.data import DEFAULT_CALIBRATION

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

DEFAULT_CORPUS = DEFAULT_CALIBRATION  # the Gutenberg books shipped in latentkv/data

# Shared options: one definition each, so a flag means the same in every command.
SourceArg = Annotated[str, typer.Argument(help="Local HF folder, .gguf file, or Hub id.")]
OutputArg = Annotated[Path, typer.Argument(help="Output folder (must be empty unless --overwrite).")]
Device = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.", rich_help_panel="Runtime")]
Dtype = Annotated[str, typer.Option(help="Compute dtype: float32, bfloat16, float16.", rich_help_panel="Runtime")]
Overwrite = Annotated[bool, typer.Option(help="Replace a non-empty output folder.", rich_help_panel="Output")]
GgufFile = Annotated[Optional[str], typer.Option(help="GGUF file name inside SOURCE (a folder or Hub repo).")]
TrustRemoteCode = Annotated[
    bool, typer.Option(help="Run model code shipped with the checkpoint.", rich_help_panel="Dangerous")
]
CalibData = Annotated[
    str, typer.Option(help="Calibration text: file/folder (.txt/.jsonl/.parquet) or datasets name[:config].",
                      rich_help_panel="Calibration")
]
CalibSplit = Annotated[str, typer.Option(help="Split when --calib-data is a datasets name.", rich_help_panel="Calibration")]
CalibSamples = Annotated[int, typer.Option(help="Number of calibration windows.", rich_help_panel="Calibration")]
CalibSeqLen = Annotated[int, typer.Option(help="Tokens per calibration window.", rich_help_panel="Calibration")]
CalibSeed = Annotated[int, typer.Option(help="Seed for picking windows.", rich_help_panel="Calibration")]
CalibCache = Annotated[
    Optional[Path], typer.Option(help="Folder for resumable statistics (default: ~/.cache/latentkv/calibration/<fingerprint>).",
                                 rich_help_panel="Calibration")
]
TextField = Annotated[str, typer.Option(help="Text column/field in .jsonl/.parquet/datasets.", rich_help_panel="Calibration")]
EvalText = Annotated[Optional[Path], typer.Option(help="Evaluation text: .txt/.raw, or .jsonl of {\"text\": ...} rows (default: WikiText-2 test).", rich_help_panel="Evaluation")]
EvalWindow = Annotated[int, typer.Option(help="Tokens per evaluation window.", rich_help_panel="Evaluation")]
EvalWindows = Annotated[int, typer.Option(help="Number of evaluation windows.", rich_help_panel="Evaluation")]


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


# What a convert recipe may set, and the type of each (None: may be left empty). A recipe that
# `convert` wrote (`latentkv_recipe.yaml`) is flattened into these names first (`recipe_settings`).
RECIPE_TYPES: dict = {
    "to": str, "kv_lora_rank": (int, None), "kv_budget": (float, None), "qk_rope_dim": (int, str),
    "latent_heads": (int, None), "num_kv_heads": (int, None), "format": str, "device": str, "dtype": str,
    "calib_data": str, "calib_split": str, "calib_samples": int, "calib_seq_len": int, "calib_seed": int,
    "calib_profile_samples": int, "text_field": str, "batch_size": int, "gguf_file": (str, None),
    "method_options": dict, "max_shard_size": (int, str), "save_dtype": (str, None), "sequential": bool,
    "grouping": (str, None), "engine": (str, None), "cache_format": (str, None),
}
RECIPE_KEYS = set(RECIPE_TYPES)


@app.command()
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
    calib_data: CalibData = DEFAULT_CORPUS,
    calib_split: CalibSplit = "train",
    calib_samples: CalibSamples = 128,
    calib_seq_len: CalibSeqLen = 512,
    calib_seed: CalibSeed = 0,
    calib_cache: CalibCache = None,
    text_field: TextField = "text",
    device: Device = "cpu",
    dtype: Dtype = "float32",
    save_dtype: Annotated[Optional[str], typer.Option(help="dtype of the written weights (default: the source's).", rich_help_panel="Output")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 5GB.", rich_help_panel="Output")] = "5GB",
    overwrite: Overwrite = False,
    gguf_file: GgufFile = None,
    trust_remote_code: TrustRemoteCode = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Log every decision (ranks per layer...).")] = False,
):
    """Convert SOURCE's attention to a cheaper-to-cache form and write OUTPUT."""
    _setup_logging(verbose=verbose)
    from rich.console import Console

    from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert as run_convert
    from latentkv.errors import LatentKVError

    console = Console(stderr=True)
    settings = _run(_load_recipe, recipe)
    unknown = sorted(set(settings) - RECIPE_KEYS)
    if unknown:
        _fail(LatentKVError(f"Unknown recipe keys in {recipe}: {', '.join(unknown)}; known: {', '.join(sorted(RECIPE_KEYS))}"))

    def pick(name, value):
        """Command-line value if given explicitly, else the recipe's, else the default."""
        src = ctx.get_parameter_source(name) if ctx else None
        if src is not None and src.name == "COMMANDLINE":
            return value
        return settings.get(name, value)

    to = pick("to", to)
    method_options: dict = dict(settings.get("method_options", {}))
    for item in method_option or []:
        key, sep, val = item.partition("=")
        if not sep:
            _fail(LatentKVError(f"--set expects KEY=VALUE, got {item!r}"))
        method_options[key.strip()] = _parse_value(val.strip())
    for name, value in (("kv_lora_rank", kv_lora_rank), ("kv_budget", kv_budget), ("latent_heads", latent_heads),
                        ("num_kv_heads", num_kv_heads), ("grouping", None)):
        value = pick(name, value)
        if value is not None:
            method_options[name] = value
    rope = pick("qk_rope_dim", qk_rope_dim)
    shared_flags = TARGETS[to].cli_options if to in TARGETS else ()  # an unknown target is refused by convert
    if "qk_rope_dim" in shared_flags:
        method_options.setdefault("qk_rope_dim", rope if rope == "auto" else _int_or_fail(rope, "--qk-rope-dim"))
    if "sequential" in shared_flags and pick("sequential", sequential):
        method_options["sequential"] = True
    opts = ConvertOptions(
        source=source,
        output=str(output),
        method=to,
        method_options=method_options,
        format=pick("format", format),
        engine=pick("engine", engine),
        cache_format=pick("cache_format", cache_format),
        calib=CalibOptions(
            data=pick("calib_data", calib_data), split=pick("calib_split", calib_split),
            text_field=pick("text_field", text_field), samples=pick("calib_samples", calib_samples),
            seq_len=pick("calib_seq_len", calib_seq_len), seed=pick("calib_seed", calib_seed),
            cache=str(calib_cache) if calib_cache else None,
            **({"profile_samples": settings["calib_profile_samples"]} if "calib_profile_samples" in settings else {}),
        ),
        device=pick("device", device),
        dtype=pick("dtype", dtype),
        save_dtype=pick("save_dtype", save_dtype),
        overwrite=overwrite,
        max_shard_size=pick("max_shard_size", max_shard_size),
        gguf_file=pick("gguf_file", gguf_file),
        trust_remote_code=trust_remote_code,
        command=_command_line(ctx),
        **({"batch_size": settings["batch_size"]} if "batch_size" in settings else {}),
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
    kv_cache: Annotated[Optional[str], typer.Option(help="Run the windows through a KV cache stored in this format (quantized on write, dequantized on read) and report its bytes: ENCODING[/GROUPING] with bf16, fp16, fp8_e4m3, int8, int4, int3, int2 and /token, /head, /g<N>, /channel<N> (KIVI keys); or per part, e.g. keys=int2/channel32,values=int2/g32 (source) or latent=fp8_e4m3/g128,rope=bf16 (latentkv). Replaces the format a converted model's config carries (convert --cache-format), which is used by default.", rich_help_panel="KV cache format")] = None,
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
def finetune(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Converted model folder (latentkv or deepseek format).")],
    output: OutputArg,
    teacher: Annotated[Optional[str], typer.Option(help="Model to distil from (usually the conversion's source).")] = None,
    data: Annotated[str, typer.Option(help="Training text: file/folder or datasets name (WikiText refused).", rich_help_panel="Data")] = DEFAULT_CORPUS,
    split: CalibSplit = "train",
    text_field: TextField = "text",
    mode: Annotated[str, typer.Option(help="lora (peft adapters) or attention (full weights of the new attention only).", rich_help_panel="Training")] = "lora",
    target: Annotated[str, typer.Option(help="attention: latentkv format q_proj, kv_a_proj, kv_b_proj, o_proj (deepseek: q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj); attention+mlp adds the MLP.", rich_help_panel="Training")] = "attention",
    lora_rank: Annotated[int, typer.Option(help="LoRA rank.", rich_help_panel="Training")] = 32,
    tokens: Annotated[int, typer.Option(help="Training tokens in all.", rich_help_panel="Training")] = 20_000_000,
    seq_len: Annotated[int, typer.Option(help="Tokens per packed sequence.", rich_help_panel="Training")] = 1024,
    batch_size: Annotated[int, typer.Option(help="Sequences per optimizer step (all GPUs).", rich_help_panel="Training")] = 64,
    micro_batch_size: Annotated[Optional[int], typer.Option(help="Sequences per forward on one GPU.", rich_help_panel="Training")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default 1e-4).", rich_help_panel="Training")] = None,
    warmup: Annotated[float, typer.Option(help="Warm-up fraction, then cosine decay.", rich_help_panel="Training")] = 0.05,
    temperature: Annotated[float, typer.Option(help="KL temperature.", rich_help_panel="Training")] = 1.0,
    lm_weight: Annotated[float, typer.Option(help="Weight of the LM loss against the KL to the teacher (0-1).", rich_help_panel="Training")] = 0.0,
    hidden_weight: Annotated[float, typer.Option(help="Weight of matching every layer's hidden state to the teacher's (0 = off).", rich_help_panel="Training")] = 0.0,
    mlp_lr_scale: Annotated[float, typer.Option(help="With --target attention+mlp: the MLP's learning rate as a fraction of --lr.", rich_help_panel="Training")] = 1.0,
    transfer_tokens: Annotated[int, typer.Option(help="Tokens of --tokens spent first on attention transfer (each attention layer trained alone toward the teacher's output; 0 = off).", rich_help_panel="Training")] = 0,
    transfer_lr: Annotated[Optional[float], typer.Option(help="Peak learning rate of the attention-transfer phase (default: --lr).", rich_help_panel="Training")] = None,
    anneal_rank: Annotated[Optional[int], typer.Option(help="MLA, --mode attention: latent width to keep; the dims past it fade to zero over --anneal-tokens and are dropped from the output (convert wider first, same --qk-rope-dim).", rich_help_panel="Training")] = None,
    anneal_tokens: Annotated[Optional[int], typer.Option(help="Tokens over which --anneal-rank fades the extra latent dims (default: half of --tokens).", rich_help_panel="Training")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in backward.", rich_help_panel="Training")] = False,
    compile: Annotated[bool, typer.Option(help="torch.compile student and teacher.", rich_help_panel="Training")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between resumable checkpoints.", rich_help_panel="Training")] = 500,
    stop_after_steps: Annotated[Optional[int], typer.Option(help="Stop with a checkpoint after this many steps of this process (rerun the same command to go on).", rich_help_panel="Training")] = None,
    stop_after_seconds: Annotated[Optional[float], typer.Option(help="Stop with a checkpoint before this many seconds since the start would pass (at least one step is made; rerun the same command to go on).", rich_help_panel="Training")] = None,
    merge: Annotated[bool, typer.Option(help="Fold LoRA into the weights and write the model's own format.", rich_help_panel="Output")] = False,
    eval_window: EvalWindow = 512,
    eval_windows: EvalWindows = 64,
    eval_at: Annotated[Optional[list[int]], typer.Option(help="Token counts at which to measure perplexity during training (0: the untrained model).", rich_help_panel="Evaluation")] = None,
    kl_data: Annotated[Optional[str], typer.Option(help="Held-out text (not the training text) on which every evaluation also measures KL(teacher || student).", rich_help_panel="Evaluation")] = None,
    kl_windows: Annotated[int, typer.Option(help="Windows of --kl-data.", rich_help_panel="Evaluation")] = 16,
    kl_window: Annotated[int, typer.Option(help="Tokens per --kl-data window.", rich_help_panel="Evaluation")] = 512,
    precision: Annotated[str, typer.Option(help="auto (bf16 on GPU), bf16 or fp32.", rich_help_panel="Runtime")] = "auto",
    seed: CalibSeed = 0,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML file of finetune settings (the option fields, or the latentkv_recipe.yaml a finetune wrote); flags given on the command line win.")] = None,
):
    """Heal a converted model: LoRA (or the new attention weights) distilled from the teacher.
    Several GPUs: `accelerate launch -m latentkv.cli finetune ...` (same flags)."""
    _setup_logging()
    from latentkv.finetune.options import FinetuneOptions
    from latentkv.finetune.pipeline import finetune as run_finetune

    settings = _run(_load_finetune_recipe, recipe)
    fields = dict(model=model, output=str(output), teacher=teacher, data=data, split=split,
                  text_field=text_field, mode=mode, target=target, lora_rank=lora_rank, tokens=tokens, seq_len=seq_len,
                  batch_size=batch_size, micro_batch_size=micro_batch_size, lr=lr, warmup=warmup,
                  temperature=temperature, lm_weight=lm_weight, hidden_weight=hidden_weight,
                  mlp_lr_scale=mlp_lr_scale, transfer_tokens=transfer_tokens, transfer_lr=transfer_lr,
                  anneal_rank=anneal_rank, anneal_tokens=anneal_tokens,
                  gradient_checkpointing=gradient_checkpointing,
                  compile=compile, checkpoint_every=checkpoint_every, stop_after_steps=stop_after_steps,
                  stop_after_seconds=stop_after_seconds, merge=merge, eval_window=eval_window, eval_windows=eval_windows,
                  eval_at=tuple(eval_at or ()), kl_text=kl_data, kl_windows=kl_windows, kl_window=kl_window,
                  precision=precision, seed=seed, overwrite=overwrite,
                  trust_remote_code=trust_remote_code, command=_command_line(ctx))
    for key, value in settings.items():  # the recipe's, unless the command line gives the flag
        source = ctx.get_parameter_source(FINETUNE_FLAGS.get(key, key)) if ctx else None
        if source is None or source.name != "COMMANDLINE":
            fields[key] = value
    opts = _run(FinetuneOptions, **fields)
    result = _run(run_finetune, opts)
    import os

    if int(os.environ.get("RANK", "0")) != 0:  # several processes (accelerate launch): the main one reports
        return
    typer.echo(json.dumps({"output": str(result.output), "steps": result.steps, "tokens": result.tokens,
                           "tokens_per_s": round(result.tokens_per_s), "mfu": result.mfu, "evals": result.evals,
                           "before": result.before, "after": result.after}))


# FinetuneOptions fields whose flag has another name.
FINETUNE_FLAGS = {"kl_text": "kl_data"}


def _load_finetune_recipe(path: Path | None) -> dict:
    if path is None:
        return {}
    from latentkv.finetune.options import recipe_settings

    return recipe_settings(_read_recipe_mapping(path, "finetune settings"), str(path))


@predictor_app.command("train")
def predictor_train(
    model: Annotated[str, typer.Argument(help="Converted model folder (latentkv format, MLA or GLA).")],
    out: Annotated[Path, typer.Option(help="Folder for attention_predictor.safetensors + .json.")],
    data: Annotated[str, typer.Option(help="Training text, file or folder (WikiText refused).")] = DEFAULT_CORPUS,
    exclude: Annotated[Optional[list[str]], typer.Option(help="File name under --data to hold out; repeatable.")] = None,
    windows: Annotated[int, typer.Option(help="Text windows to collect attention from (10% validate).")] = 24,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 1024,
    page_size: Annotated[int, typer.Option(help="Tokens per block (= the decode cache's page size).")] = 16,
    history: Annotated[int, typer.Option(help="Steps of history the predictor reads.")] = 16,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1500,
    seed: CalibSeed = 0,
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
