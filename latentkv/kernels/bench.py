"""Timing the decode kernels against the ceilings of the GPU and the source model's GQA decode.

``run_decode_bench`` builds a random paged latent cache (shuffled pages), times ``mla_decode``
(both stages: split kernel and combine) with CUDA events through ``triton.testing.do_bench``
(warm-up, median), and puts the time next to
- the device-to-device copy bandwidth measured in the same process (bytes read + written),
- the FLOP count of the attention (``2 H (r_c + d_R) L + 2 H r_c L`` per query token),
- the source geometry's GQA decode through torch's SDPA (cuDNN, flash, efficient: best taken)
  on a cache of equal length.
It returns plain dicts; printing is the script's job (scripts/bench_decode.py).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import replace
from typing import Any

import torch

from latentkv.errors import LatentKVError
from latentkv.kernels.compare import compare

md = importlib.import_module("latentkv.kernels.mla_decode")  # the module (the package attribute is the function)

_COPY_BW: dict[int, float] = {}


def do_bench(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time in ms of ``fn`` (CUDA events, Triton's do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def copy_bandwidth(device: torch.device | None = None, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    device = device or torch.device("cuda")
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _COPY_BW:
        src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
        dst = torch.empty_like(src)
        ms = do_bench(lambda: dst.copy_(src))
        _COPY_BW[idx] = 2 * nbytes / (ms * 1e-3)
        del src, dst
        torch.cuda.empty_cache()
    return _COPY_BW[idx]


def make_paged_inputs(
    *,
    heads: int,
    latent_rank: int,
    rope_dim: int,
    batch: int,
    context: int,
    query_len: int,
    latent_heads: int,
    dtype: torch.dtype,
    page_size: int,
    device: str | torch.device = "cuda",
    seed: int = 0,
    kv_format: str | None = None,
):
    """Random q and a full paged cache of ``context`` tokens per sequence, pages shuffled; with
    ``kv_format`` (e.g. "fp8_e4m3/g128", "int4/g32") the latent stored quantized (``QuantizedPages``)."""
    if latent_rank % latent_heads:
        raise LatentKVError(f"latent_rank {latent_rank} is not divisible by latent_heads {latent_heads}.")
    r_c = latent_rank // latent_heads
    width = latent_rank + rope_dim
    pages_per_seq = math.ceil(context / page_size)
    num_pages = batch * pages_per_seq
    g = torch.Generator(device=device).manual_seed(seed)
    kv = md.empty_pages(num_pages, page_size, width, dtype=dtype, device=device)  # the runtime cache's layout
    kv.normal_(generator=g)
    table = torch.randperm(num_pages, device=device, generator=g).view(batch, pages_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, query_len, heads, r_c + rope_dim, device=device, dtype=dtype, generator=g)
    if kv_format is not None:
        from latentkv.kvformats import parse_format
        from latentkv.kernels.quantized_pages import QuantizedPages

        rows = md.page_rows(kv)
        kv = QuantizedPages.empty(parse_format(kv_format), num_pages=num_pages, page_size=page_size,
                                  latent_width=latent_rank, rope_dim=rope_dim, dtype=dtype, device=device)
        kv.write_rows(torch.arange(rows.shape[0], device=device), rows)
        del rows
    return q, kv, table, seq_lens, r_c


def source_sdpa_decode(
    *,
    source_geometry: tuple[int, int, int],
    batch: int,
    context: int,
    query_len: int,
    dtype: torch.dtype,
    device: str | torch.device = "cuda",
) -> dict[str, Any]:
    """Time the source model's GQA decode through each SDPA backend; report all and the best."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hq, hkv, d = source_geometry
    q = torch.randn(batch, hq, query_len, d, device=device, dtype=dtype)
    k = torch.randn(batch, hkv, context, d, device=device, dtype=dtype)
    v = torch.randn(batch, hkv, context, d, device=device, dtype=dtype)
    mask = None
    if query_len > 1:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(query_len, context)
    times: dict[str, float | str] = {}
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            times[name] = "not in this torch"
            continue
        try:
            with sdpa_kernel([backend]):
                fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
                fn()
                torch.cuda.synchronize()
                times[name] = do_bench(fn) * 1e3  # us
        except Exception as exc:  # a backend that refuses this shape is reported, not fatal
            times[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    ok = {k_: t for k_, t in times.items() if isinstance(t, float)}
    best = min(ok, key=ok.get) if ok else None
    kv_bytes = 2 * batch * hkv * context * d * torch.finfo(dtype).bits // 8
    del q, k, v
    torch.cuda.empty_cache()
    return {
        "geometry": {"q_heads": hq, "kv_heads": hkv, "head_dim": d},
        "per_backend_us": times,
        "best_backend": best,
        "best_us": ok[best] if best else None,
        "kv_bytes": kv_bytes,
    }


def run_decode_bench(
    heads: int,
    latent_rank: int,
    rope_dim: int,
    batch: int,
    context: int,
    query_len: int,
    latent_heads: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    page_size: int = 64,
    source_geometry: tuple[int, int, int] | None = (32, 8, 128),
    *,
    num_splits: int | None = None,
    config: md.DecodeConfig | None = None,
    check: bool = True,
    cuda_graph: bool = True,
    split_only: bool = False,
    kv_format: str | None = None,
) -> dict[str, Any]:
    """Time one decode step of absorbed MLA/GLA and put it against the GPU's ceilings.

    heads: query heads H; latent_rank: total latent width r (each latent head has r / latent_heads);
    context: cache length per sequence (including the query tokens); kv_format: the latent stored
    quantized in that format (None: ``dtype``). Returns a dict of figures (times in microseconds,
    bandwidths in bytes/s, rates in FLOP/s).
    """
    if not torch.cuda.is_available():
        raise LatentKVError("run_decode_bench needs a CUDA GPU.")
    device = torch.device("cuda")
    q, kv, table, seq_lens, r_c = make_paged_inputs(
        heads=heads, latent_rank=latent_rank, rope_dim=rope_dim, batch=batch, context=context,
        query_len=query_len, latent_heads=latent_heads, dtype=dtype, page_size=page_size, device=device,
        kv_format=kv_format,
    )  # fmt: skip
    scale = 1.0 / math.sqrt(r_c + rope_dim)
    kw = dict(latent_heads=latent_heads, rope_dim=rope_dim, softmax_scale=scale)
    rows = query_len * heads // latent_heads
    quantized = kv_format is not None
    cfg = md.choose_config(q, kv.rope if quantized else kv, latent_heads, rope_dim, config,
                           kv_quant=kv.kernel.switch if quantized else "")
    if quantized and cfg.kernel == "wgmma" and config is None:
        cfg = replace(cfg, kernel="triton")  # the Gluon kernel reads bf16 / fp16 caches only (as mla_decode)
    splits = num_splits
    if splits is None:
        splits = md.choose_num_splits(
            md.programs_per_split(batch, latent_heads, rows, r_c, cfg), context, md.sm_count(device), cfg.block_n,
            ctas_per_sm=cfg.ctas_per_sm,
        )

    def fn():
        return md.mla_decode(q, kv, table, seq_lens, num_splits=splits, config=cfg, **kw)

    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device),
        "sm_count": md.sm_count(device),
        "shape": {
            "heads": heads, "latent_rank": latent_rank, "latent_heads": latent_heads, "r_c": r_c,
            "rope_dim": rope_dim, "batch": batch, "context": context, "query_len": query_len,
            "dtype": str(dtype).replace("torch.", ""), "page_size": page_size, "kv_format": kv_format,
        },
        "config": {**cfg.__dict__, "num_splits": splits},
    }  # fmt: skip

    out = fn()
    torch.cuda.synchronize()
    if check:  # the first sequences against the reference (sequences are independent)
        n = min(batch, 2)
        ref = md.mla_decode_reference(q[:n], kv, table[:n], seq_lens[:n], out_dtype=torch.float32, **kw)
        c = compare(out[:n], ref, atol=1e-2 * float(ref.abs().max()), rtol=1e-2, max_cos_diff=1e-4)
        result["check"] = {"ok": c.ok, "report": c.report()}
    compiled = md.LAST_COMPILED.get("split")
    if compiled is not None:
        result["kernel"] = {
            "n_regs": getattr(compiled, "n_regs", None),
            "n_spills": getattr(compiled, "n_spills", None),
            "shared_bytes": getattr(getattr(compiled, "metadata", None), "shared", None),
        }

    t_us = do_bench(fn) * 1e3
    result["time_us"] = t_us
    if split_only and splits > 1:  # diagnosis: the split kernel alone, without its combine
        result["time_us_split_only"] = do_bench(
            lambda: md.mla_decode(q, kv, table, seq_lens, num_splits=splits, config=cfg, _skip_combine=True, **kw)
        ) * 1e3
    if cuda_graph:
        try:
            import triton.testing

            result["time_us_cudagraph"] = float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")) * 1e3
        except Exception as exc:  # graphs are a second opinion only
            result["time_us_cudagraph"] = f"{type(exc).__name__}: {exc}"[:160]

    elt = torch.finfo(dtype).bits // 8
    per_token = kv.bytes_per_token() if quantized else (latent_rank + rope_dim) * elt  # codes, scales, RoPE key
    cache_bytes = batch * context * per_token
    flops = batch * query_len * heads * (2 * (r_c + rope_dim) * context + 2 * r_c * context)
    bw = copy_bandwidth(device)
    result.update(
        cache_bytes=cache_bytes,
        achieved_bytes_per_s=cache_bytes / (t_us * 1e-6),
        copy_bytes_per_s=bw,
        fraction_of_copy_bw=cache_bytes / (t_us * 1e-6) / bw,
        flops=flops,
        tflops=flops / (t_us * 1e-6) / 1e12,
    )
    del q, kv, table, seq_lens, out
    torch.cuda.empty_cache()
    if source_geometry is not None:
        src = source_sdpa_decode(
            source_geometry=tuple(source_geometry), batch=batch, context=context, query_len=query_len, dtype=dtype
        )
        result["source"] = src
        if src["best_us"]:
            result["speedup_vs_source"] = src["best_us"] / t_us
    return result


def reference_time_us(*, heads, latent_rank, rope_dim, batch, context, query_len, latent_heads=1,
                      dtype=torch.bfloat16, page_size=64) -> float:
    """Time of the plain PyTorch reference (``mla_decode_reference``) on the same inputs: the floor the
    kernel's fallback configurations must beat."""
    q, kv, table, seq_lens, r_c = make_paged_inputs(
        heads=heads, latent_rank=latent_rank, rope_dim=rope_dim, batch=batch, context=context, query_len=query_len,
        latent_heads=latent_heads, dtype=dtype, page_size=page_size, device="cuda",
    )  # fmt: skip
    kw = dict(latent_heads=latent_heads, rope_dim=rope_dim, softmax_scale=1.0 / math.sqrt(r_c + rope_dim))
    t = do_bench(lambda: md.mla_decode_reference(q, kv, table, seq_lens, **kw), warmup_ms=10, rep_ms=50) * 1e3
    del q, kv, table, seq_lens
    torch.cuda.empty_cache()
    return t


# --------------------------------------------------------------------------------------------
# Tuning sweeps: candidate block sizes per workload, compiled in parallel before timing
# --------------------------------------------------------------------------------------------
def sweep_candidates(rows: int, r_c: int, which: str = "wide") -> list[md.DecodeConfig]:
    """Block-size candidates for ``rows`` query rows per latent head at latent width ``r_c``.

    "wide": the second exploration on the H100 (see NOTES.md); "narrow": around the defaults.
    """
    C = md.DecodeConfig
    if r_c > 512:  # wide latents: 16 rows a program, or the output columns split over programs
        return [
            C(16, 32, 8, 3), C(16, 64, 8, 2), C(16, 16, 8, 3), C(32, 16, 8, 3, out_splits=2),
            C(32, 32, 8, 3, out_splits=2), C(16, 32, 8, 3, out_splits=2), C(32, 64, 8, 2, out_splits=4),
        ]  # fmt: skip
    if which == "narrow":
        if r_c >= 512 and rows <= 32:
            return [
                C(32, 32, 4, 5, ctas_per_sm=2), C(32, 32, 4, 4, ctas_per_sm=2), C(32, 32, 4, 6, ctas_per_sm=2),
                C(32, 32, 4, 5, fuse_combine=True, ctas_per_sm=2), C(32, 64, 4, 5), C(32, 64, 4, 4),
            ]  # fmt: skip
        if r_c >= 512:
            return [C(64, 64, 8, 2), C(64, 64, 8, 3), C(64, 32, 8, 6)]
        return [C(128, 64, 8, 5), C(128, 64, 8, 6), C(128, 32, 8, 5)]
    if r_c >= 512 and rows <= 32:  # MLA with few heads: memory-bound
        return [
            C(32, 64, 8, 5), C(32, 64, 8, 5, fuse_combine=True), C(32, 32, 8, 7), C(32, 32, 8, 9),
            C(32, 32, 8, 9, fuse_combine=True), C(32, 32, 4, 5), C(32, 32, 4, 7), C(32, 64, 4, 5),
            C(32, 32, 8, 5, maxnreg=128), C(32, 32, 8, 5, fuse_combine=True, maxnreg=128),
        ]  # fmt: skip
    if r_c >= 512:  # MLA with many heads: compute-bound
        return [
            C(64, 64, 8, 3), C(64, 64, 8, 2), C(64, 64, 8, 4), C(64, 64, 8, 5), C(64, 32, 8, 4), C(64, 32, 8, 6),
            C(64, 32, 8, 7), C(64, 16, 8, 7),
        ]  # fmt: skip
    return [  # GLA-like r_c <= 256
        C(128, 32, 8, 5), C(128, 32, 8, 7), C(128, 64, 8, 4), C(128, 64, 8, 5), C(128, 16, 8, 9), C(64, 64, 4, 5),
        C(128, 32, 8, 5, fuse_combine=True),
    ]  # fmt: skip


def _warm_one(spec: dict) -> str:
    """Compile one (shape, config, splits) variant with a tiny launch (runs in a worker process)."""
    try:
        dtype = getattr(torch, spec["dtype"])
        q, kv, table, seq_lens, r_c = make_paged_inputs(
            heads=spec["heads"], latent_rank=spec["latent_rank"], rope_dim=spec["rope_dim"], batch=1,
            context=4 * spec["page_size"], query_len=spec["query_len"], latent_heads=spec["latent_heads"],
            dtype=dtype, page_size=spec["page_size"], device="cuda",
        )  # fmt: skip
        md.mla_decode(
            q, kv, table, seq_lens, latent_heads=spec["latent_heads"], rope_dim=spec["rope_dim"],
            softmax_scale=0.1, num_splits=spec["num_splits"], config=md.DecodeConfig(*spec["config"]),
        )  # fmt: skip
        torch.cuda.synchronize()
        return "ok"
    except Exception as exc:  # reported by the caller; a config that does not compile is skipped
        return f"{type(exc).__name__}: {str(exc)[:200]}"


def warm_compile(specs: list[dict], jobs: int) -> list[str]:
    """Compile many kernel variants in parallel processes (fills Triton's on-disk cache)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if jobs <= 1:
        return [_warm_one(s) for s in specs]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_warm_one, specs))
