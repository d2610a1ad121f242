"""`latentkv convert`: load -> calibrate -> factorise -> rewrite -> save, as a short list of steps.

Calibration streams the source one decoder layer at a time (`LayerStream`); statistics are cached
with a fingerprint so a rerun resumes. Methods plug in through `convert.registry` and implement
`convert.method.ConversionMethod`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from latentkv.errors import LatentKVError
from latentkv.arch import geometry_of, get_arch
from latentkv.calibration.options import CalibOptions, recipe_keys
from latentkv.calibration.data import TextSource, fingerprint_tokens, token_windows
from latentkv.calibration.runner import (LayerStream, MemoryTrace, check_device, check_seq_len, freed_memory_held,
                                       peak_memory_bytes, release_freed_memory, resolve_dtype)
from latentkv.calibration.stats import (
    LayerStats,
    StatsCache,
    StatsCollector,
    checkpoint_fingerprint,
    default_cache_root,
)

log = logging.getLogger(__name__)

# Attention inputs kept per layer for fits that moments cannot give (the DeepSeek latent norm).
SAMPLE_TOKENS = 2048


@dataclass
class ConvertOptions:
    """One conversion: the source, the method and its settings, where and how to write."""

    source: str
    output: str
    method: str = "mla"
    method_options: dict = field(default_factory=dict)
    format: str = "latentkv"
    calib: CalibOptions = field(default_factory=CalibOptions)
    device: str = "cpu"
    dtype: str = "float32"
    save_dtype: str | None = None
    overwrite: bool = False
    max_shard_size: str = "5GB"
    gguf_file: str | None = None
    trust_remote_code: bool = False
    batch_size: int = 8
    command: str = ""
    # A serving engine (`convert.engines`): the DeepSeek export then gets a geometry it runs.
    engine: str | None = None
    # The cache format the output's config carries (`--cache-format`, e.g. "fp8_e4m3/g128"); None: its dtype.
    cache_format: str | None = None

    def recipe(self) -> dict:
        d = asdict(self)
        for k in ("source", "output", "overwrite", "command"):
            d.pop(k)
        return d


# What a written recipe holds that only records the run (the version, what the export measured); where
# the statistics were cached is a place on one machine; and code from a checkpoint runs only when the
# user asks on the command line.
RECIPE_RECORD_ONLY = ("latentkv_version", "command", "measured", "trust_remote_code")


def recipe_settings(recipe: dict) -> dict:
    """The settings of a recipe as `convert --recipe` takes them, flat (`to`, `calib_samples`, ...):
    a hand-written recipe already is; a written `latentkv_recipe.yaml` (`ConvertOptions.recipe()`
    plus the method's resolved settings) is flattened, so converting again from it gives the same
    weights. The resolved settings fill the method options that the recipe leaves unset, so a replay
    does not depend on the defaults of the version that runs it."""
    out = {k: v for k, v in recipe.items() if k not in RECIPE_RECORD_ONLY}
    if "method" in out:
        out.setdefault("to", out.pop("method"))
    calib = out.pop("calib", None)
    if isinstance(calib, dict):
        keys = recipe_keys()
        for key, value in calib.items():
            if key != "cache":
                out.setdefault(keys[key][0] if key in keys else f"calib_{key}", value)
    elif calib is not None:
        out["calib"] = calib  # left for the caller's type check to refuse
    resolved = out.pop("resolved", None)
    if isinstance(resolved, dict):
        options = out.get("method_options")
        out["method_options"] = {**resolved, **(options if isinstance(options, dict) else {})}
    elif resolved is not None:
        out["resolved"] = resolved
    return out


@dataclass
class ConvertResult:
    output: Path
    kv_values_per_token: int
    source_kv_values_per_token: int
    seconds: float
    layers: list[dict]
    notes: list[str] = field(default_factory=list)


def layer_inputs_from(stream: LayerStream, layer_idx: int, stats: LayerStats):
    """The source attention block of one layer as float64 augmented matrices.

    This is where statistics and weights become key/value/query covariances. With a per-head QK
    norm (Qwen3) the keys are not linear in x: the statistics are then of the normalised keys and
    values y = [k; v] and of the normalised queries (`StatsCollector`), and the rows below are the
    0/1 selections W_K = [I 0], W_V = [0 I], W_Q = I on those spaces, so every method downstream
    runs unchanged and its new projections read y and the normalised queries (`convert.qk_norm`)."""
    from latentkv.convert.mla import LayerInputs

    arch, cfg, w = stream.arch, stream.config, stream.weights
    geo = geometry_of(cfg)
    rope = arch.layer_attention(cfg, layer_idx).rope  # a layer without RoPE: every key dim is position-free

    def get(which, kind="weight"):
        return arch.read_projection(w, layer_idx, which, kind, geo, dtype=torch.float64, device=stream.device)

    if arch.qk_norm:
        kv, qd = geo.num_kv_heads * geo.head_dim, geo.num_heads * geo.head_dim
        eye = torch.eye(2 * kv, dtype=torch.float64, device=stream.device)
        q, k, v = (LayerInputs.augment(rows, None) for rows in
                   (torch.eye(qd, dtype=torch.float64, device=stream.device), eye[:kv], eye[kv:]))
    else:
        q, k, v = (LayerInputs.augment(get(x), get(x, "bias")) for x in "qkv")
    return LayerInputs(
        q=q,
        k=k,
        v=v,
        o=get("o"),
        o_bias=get("o", "bias"),
        moment=stats.moment.to(stream.device, torch.float64),
        distance=None if stats.distance is None else stats.distance.to(stream.device),
        inv_freq=stream.inv_freq_of(layer_idx).to(stream.device),
        num_heads=geo.num_heads,
        num_kv_heads=geo.num_kv_heads,
        head_dim=geo.head_dim,
        scale=arch.softmax_scale(cfg, geo),
        rotary_dim=geo.rotary_dim if rope else 0,
        q_moment=None if stats.q_moment is None else stats.q_moment.to(stream.device, torch.float64),
    )


@torch.no_grad()
def collect_stats(stream: LayerStream, windows: torch.Tensor, cache: StatsCache, calib: CalibOptions,
                  on_layer=None, progress=None, collect: bool = True) -> list[LayerStats]:
    """Per-layer statistics, layer by layer. `on_layer(i, layer, stats, batches)` may return a
    replacement attention module, whose output then feeds the next layer (sequential calibration);
    `batches()` yields the layer's attention inputs (after its norm) with its position embeddings and
    attention mask (`LayerStream.attention_mask`: None where SDPA's causal mask is exact).
    With `collect=False` (a pass for `on_layer` alone, e.g. the output refit) nothing is measured
    and the list holds None."""
    n = stream.num_layers
    stats: list[LayerStats | None] = [cache.load_layer(i) if cache.has_layer(i) else None for i in range(n)]
    # (A pass through converted layers recomputes what it finds: nothing of it is reused.)
    cache.reused_layers = sum(s is not None for s in stats) if on_layer is None else 0
    if cache.reused_layers:
        log.info("calibration statistics of %d of %d layers reused from %s", cache.reused_layers, n, cache.folder)
    if all(s is not None for s in stats) and on_layer is None:
        cache.drop_hidden()
        for i in range(n) if progress is not None else ():
            progress(i)
        return stats  # type: ignore[return-value]
    start, hidden = 0, None
    resumed = cache.load_hidden() if on_layer is None else None
    if resumed is not None and all(stats[i] is not None for i in range(resumed[0])):
        start, hidden = resumed
        hidden = hidden.to(stream.device, stream.dtype)
        log.info("resuming calibration at layer %d from %s", start, cache.folder)
    if hidden is None:
        hidden = stream.embed(windows)
    # The batches' temporaries are reused, not faulted in afresh; handed back at the end.
    with freed_memory_held():
        for i in range(start, n):
            last = i == n - 1  # the last layer's output feeds no statistics: it is never computed
            stats[i] = _layer_pass(stream, i, hidden, stats[i], cache, calib, on_layer, last, collect)
            if not last and on_layer is None:  # a pass through converted layers is never resumed
                cache.maybe_save_hidden(i + 1, hidden)
            # The layer's weights and batch temporaries are freed, but glibc keeps the pages of the
            # holes they leave in the heap; the next layer's blocks land elsewhere, so without this
            # the resident memory grows by about a layer's worth per layer (measured: 30 MB a layer
            # at hidden 1024) until the pass ends.
            release_freed_memory()
            if progress is not None:
                progress(i)
    cache.drop_hidden()  # every layer is done: the resume point is not needed again
    return stats  # type: ignore[return-value]


def _layer_pass(stream: LayerStream, i: int, hidden: torch.Tensor, stats: LayerStats | None,
                cache: StatsCache, calib: CalibOptions, on_layer, last: bool, collect: bool = True) -> LayerStats:
    """Layer i's statistics (computed unless cached) and, unless `last`, its output in `hidden`."""
    pos_emb = stream.position_embeddings(hidden.shape[1], i)  # per layer: Gemma 3's RoPE thetas differ by type
    mask = stream.attention_mask(i, hidden.shape[1])
    layer = stream.load_layer(i)
    def norm(chunk):
        return stream.arch.attention_input(layer, chunk)

    collector = None
    if collect and (stats is None or on_layer is not None):
        collector = StatsCollector(layer, stream.arch, geometry_of(stream.config), pos_emb,
                                   windows=hidden.shape[0], seq_len=hidden.shape[1],
                                   profile_windows=calib.profile_samples, sample_tokens=SAMPLE_TOKENS,
                                   device=stream.device, rope=stream.layer_attention(i).rope,
                                   softcap=stream.arch.softcap(stream.config))
        if on_layer is not None or last:
            # Statistics before the forward (sequential: they shape the replacement) or without one.
            for first, chunk in stream.batches(hidden):
                collector.add(norm(chunk), first)
            stats, collector = _finish(i, collector, cache), None
    if on_layer is not None:
        def batches():
            for _, chunk in stream.batches(hidden):
                yield norm(chunk), pos_emb, mask

        new_attn = on_layer(i, layer, stats, batches)
        if new_attn is not None:
            setattr(layer, stream.arch.attention, new_attn.to(stream.device, stream.dtype))
    if not last:
        # One pass: the layer's forward, with the statistics taken from its attention input.
        stream.run(layer, hidden, pos_emb, observe=collector.add if collector is not None else None, mask=mask)
        if collector is not None:
            stats = _finish(i, collector, cache)
    stream.release_layer(i)
    return stats


def _finish(i: int, collector: StatsCollector, cache: StatsCache) -> LayerStats:
    stats = collector.result()
    stats.check(i)
    cache.save_layer(i, stats)
    return cache.load_layer(i)  # memory-mapped: what later steps never read takes no memory


def _stats_cache(source, opts: ConvertOptions, windows: torch.Tensor, sequential_key: dict | None,
                 model_fingerprint: dict) -> StatsCache:
    fingerprint = {
        "model": model_fingerprint,
        "data": fingerprint_tokens(windows),
        "samples": opts.calib.samples,
        "seq_len": opts.calib.seq_len,
        "seed": opts.calib.seed,
        "dtype": opts.dtype,
        "profile_samples": opts.calib.profile_samples,
        "sequential": sequential_key,
        "stats_version": 3,  # bump when LayerStats gains fields or the fingerprint changes
    }
    import hashlib

    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    if opts.calib.cache:
        # The sequential pass has its own statistics: a sub-folder of the user's cache.
        folder = Path(opts.calib.cache) / f"sequential-{key}" if sequential_key else Path(opts.calib.cache)
    else:
        folder = default_cache_root() / key
    return StatsCache(folder, fingerprint, about={"source": str(source.spec), "folder": str(source.folder),
                                                  "calib_data": opts.calib.data})


def convert(opts: ConvertOptions, progress_factory=None) -> ConvertResult:
    """Run a whole conversion; the output folder appears only when everything succeeded."""
    from latentkv.convert.registry import get_method
    from latentkv.io.source import open_source
    from latentkv.io.writer import OutputFolder, SpilledLayers

    t0 = time.perf_counter()
    check_settings(opts)
    memory = MemoryTrace()
    progress_factory = _traced(progress_factory, memory)
    method = get_method(opts.method)
    source = None
    if opts.engine:  # the engine's geometry depends on the source's shape: fitted before the settings are checked
        from latentkv.convert.engines import check_engine, fit_engine

        engine = check_engine(opts.engine, opts.method, opts.format)
        source = open_source(opts.source, gguf_file=opts.gguf_file, trust_remote_code=opts.trust_remote_code)
        opts.method_options = fit_engine(engine, source.config, opts.method_options)
    method_cfg = method.make_config(opts.method_options, opts.format)
    if source is None:
        source = open_source(opts.source, gguf_file=opts.gguf_file, trust_remote_code=opts.trust_remote_code)
    memory.mark("opening the source")
    arch = get_arch(source.config)
    method.validate(source.config, arch, method_cfg, opts.format)
    check_seq_len(source.config, opts.calib.seq_len, "--calib-seq-len")
    save_dtype = resolve_dtype(opts.save_dtype) if opts.save_dtype else _source_dtype(source.config)
    # Refuses, before any work, an output that is the source (or holds it) or a folder it may not replace.
    out = OutputFolder(opts.output, overwrite=opts.overwrite, sources=(opts.source, source.folder, opts.calib.data))
    windows = token_windows(
        source.tokenizer(), TextSource(opts.calib.data, opts.calib.split, opts.calib.text_field),
        opts.calib.samples, opts.calib.seq_len, opts.calib.seed,
    )
    memory.mark("tokenizing the calibration text")
    stream = LayerStream(source.config, source.weights, device=opts.device, dtype=opts.dtype, batch_size=opts.batch_size)
    model_fp = checkpoint_fingerprint(source.folder, source.weights)  # the weights' content, read once
    # Layers a pass through the converted layers builds wait on disk for the writing, not in memory.
    spill = SpilledLayers(out.path)
    try:
        caches: list[StatsCache] = []
        caps = method.capabilities  # `convert.method.Capabilities`: which optional passes the method takes
        sequential = caps.sequential_pass and method_cfg.sequential
        refit = caps.output_refit and method_cfg.refit_output
        in_pass = method.plan_in_pass if caps.plan_in_pass else None
        plan = None
        if sequential and in_pass is not None:
            plan = _spilling(in_pass(stream, method_cfg, opts.format), spill)
        if plan is not None:
            # One pass: each layer's statistics come from the converted layers before it, and its
            # width and replacement (and refit) are made from them before the pass moves on.
            seq_cache = _stats_cache(source, opts, windows,
                                     {"method": opts.method, **opts.method_options, "plan": "in-pass"}, model_fp)
            progress = progress_factory("calibrating (sequential)", stream.num_layers) if progress_factory else None
            caches.append(seq_cache)
            stats = collect_stats(
                stream, windows, seq_cache, opts.calib, progress=progress,
                on_layer=lambda i, layer, st, batches: method.sequential_module(
                    stream, i, st, plan, method_cfg, layer.get_submodule(stream.arch.attention), batches),
            )
        else:
            progress = progress_factory("calibrating", stream.num_layers) if progress_factory else None
            cache = _stats_cache(source, opts, windows, None, model_fp)
            caches.append(cache)
            stats = collect_stats(stream, windows, cache, opts.calib, progress=progress)
            plan = _spilling(method.plan(stream, stats, method_cfg, opts.format), spill)
            memory.mark("planning the widths")
            if sequential or refit:
                # A pass through the converted layers: their statistics (sequential) and/or the o_proj refit.
                seq_cache = _stats_cache(source, opts, windows,
                                         {"method": opts.method, **opts.method_options, "plan": plan.key()}, model_fp)
                progress = progress_factory("sequential pass", stream.num_layers) if progress_factory else None
                first_pass = stats
                # The refit alone may run on fewer windows (the o_proj regression needs far fewer tokens).
                refit_windows = (method_cfg.refit_windows if refit else None) or len(windows)
                pass_windows = windows if sequential else windows[:refit_windows]
                seq_stats = collect_stats(
                    stream, pass_windows, seq_cache, opts.calib, progress=progress,
                    on_layer=lambda i, layer, st, batches: method.sequential_module(
                        stream, i, st if sequential else first_pass[i], plan, method_cfg,
                        layer.get_submodule(stream.arch.attention), batches),
                    collect=sequential,
                )
                stats = seq_stats if sequential else first_pass
        with out:
            progress = progress_factory("writing", stream.num_layers) if progress_factory else None
            result = method.write(stream, stats, plan, method_cfg, opts, source, out.tmp, save_dtype, progress)
            memory.mark("writing the embeddings, head and config")
    finally:
        spill.close()
    result.seconds = time.perf_counter() - t0
    peak = peak_memory_bytes()
    if peak is not None:
        log.info("peak memory %.0f MB (checkpoint %.1f MB), reached %s", peak / 1e6, source.weights.total_bytes / 1e6,
                 memory.where())
        result.notes.append(f"peak memory {peak / 1e6:.0f} MB for a checkpoint of {source.weights.total_bytes / 1e6:.1f} MB "
                            f"(reached {memory.where()})")
    for c in caches:
        if c.reused_layers:  # said without -v: statistics of another run went into this model
            result.notes.append(f"calibration statistics of {c.reused_layers} layer(s) reused from {c.folder} "
                                "(same weights, text and settings; delete that folder to recompute)")
    return result


def _traced(progress_factory, memory: MemoryTrace):
    """The progress callbacks, each step also marking the memory at the end of that layer."""
    def factory(name: str, total: int):
        inner = progress_factory(name, total) if progress_factory is not None else None

        def step(i: int) -> None:
            memory.mark(f"{name}, layer {i}")
            if inner is not None:
                inner(i)
        return step
    return factory


def _spilling(plan, spill):
    """The plan, its built layers (if it keeps any) kept in `spill` on disk."""
    if plan is not None and hasattr(plan, "built"):
        plan.built = spill
    return plan


def check_settings(opts: ConvertOptions) -> None:
    """Every setting that can be checked without the model, before anything is read or computed."""
    from latentkv.io.writer import parse_size

    check_device(opts.device)
    resolve_dtype(opts.dtype)
    if opts.save_dtype is not None:
        resolve_dtype(opts.save_dtype)
    parse_size(opts.max_shard_size)
    if opts.cache_format is not None:
        check_cache_format(opts)
    for name, value, low in (("--calib-samples", opts.calib.samples, 1), ("--calib-seq-len", opts.calib.seq_len, 2),
                             ("--calib-seed", opts.calib.seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LatentKVError(f"{name} must be a whole number >= {low}, got {value!r}")


def check_cache_format(opts: ConvertOptions) -> None:
    """--cache-format: a latent format the paged cache stores, for a latentkv-format latent target."""
    from latentkv.convert.registry import TARGETS, latent_target_names
    from latentkv.kvformats import parse_model_cache_format

    record = TARGETS.get(opts.method)  # an unknown target is refused by `get_method`
    if opts.format != "latentkv" or (record is not None and record.attention == "source"):
        raise LatentKVError("--cache-format is carried by latentkv-format outputs of a latent target (--to "
                            f"{', '.join(latent_target_names())}); drop it, or convert with --format latentkv")
    parse_model_cache_format(opts.cache_format)


def _source_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        return resolve_dtype(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
