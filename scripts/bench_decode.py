#!/usr/bin/env python
"""Benchmark the MLA / GLA decode kernels on a GPU (see latentkv/kernels/bench.py).

Examples:
  python scripts/bench_decode.py --heads 32 --batch 64 --context 8192          # one shape
  python scripts/bench_decode.py --preset standard --compare-triton --json out.json --md out.md
  python scripts/bench_decode.py --preset standard --sweep --jobs 12     # search block sizes and splits
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from latentkv.kernels import bench  # noqa: E402

md = bench.md  # the mla_decode module (the package attribute of that name is the function)

# The standard rows (name, kwargs of run_decode_bench, with the source comparison?): MLA 512 + 64 with
# 32 heads (memory-bound), with 128 heads at query length 1 and 2 (compute-bound), and GLA with 2
# latent heads at the same cache bytes; every sequence at context 8192.
STANDARD_ROWS = [
    ("mla-h32-b64-l8192", dict(heads=32, latent_rank=512, rope_dim=64, batch=64, context=8192, query_len=1), True),
    ("mla-h128-b128-l8192", dict(heads=128, latent_rank=512, rope_dim=64, batch=128, context=8192, query_len=1), False),
    ("mla-h128-sq2-b64-l8192", dict(heads=128, latent_rank=512, rope_dim=64, batch=64, context=8192, query_len=2), False),
    ("gla2-h128-sq2-b64-l8192",
     dict(heads=128, latent_rank=512, rope_dim=64, batch=64, context=8192, query_len=2, latent_heads=2), False),
]  # fmt: skip


# The width sweep: the latent + RoPE widths conversions write (Llama-3-8B at 50 / 25 / 12.5% of its KV,
# SmolLM2-like per-layer widths, small and wide latents, GLA), batch 1-128, context 1k-128k, query length
# 1-4, each against the source GQA decode (Llama-3-8B geometry, 32 query / 8 KV heads of 128) at equal
# context. Rows: (name, run_decode_bench keyword arguments).
LLAMA3_8B = (32, 8, 128)
WIDTH_ROWS = [
    ("512+64 deepseek", dict(heads=32, latent_rank=512, rope_dim=64, batch=64, context=8192)),
    ("960+64 (50%)", dict(heads=32, latent_rank=960, rope_dim=64, batch=64, context=8192)),
    ("640+64", dict(heads=32, latent_rank=640, rope_dim=64, batch=64, context=8192)),
    ("768+64", dict(heads=32, latent_rank=768, rope_dim=64, batch=64, context=8192)),
    ("1024+64", dict(heads=32, latent_rank=1024, rope_dim=64, batch=64, context=8192)),
    ("448+64 (25%)", dict(heads=32, latent_rank=448, rope_dim=64, batch=64, context=8192)),
    ("192+64 (12.5%)", dict(heads=32, latent_rank=192, rope_dim=64, batch=64, context=8192)),
    ("156+36", dict(heads=32, latent_rank=156, rope_dim=36, batch=64, context=8192)),
    ("148+40", dict(heads=32, latent_rank=148, rope_dim=40, batch=64, context=8192)),
    ("96+32", dict(heads=32, latent_rank=96, rope_dim=32, batch=64, context=8192)),
    ("64+16", dict(heads=32, latent_rank=64, rope_dim=16, batch=128, context=8192)),
    ("896+128", dict(heads=32, latent_rank=896, rope_dim=128, batch=64, context=8192)),
    ("gla2 2x256+64", dict(heads=32, latent_rank=512, rope_dim=64, batch=64, context=8192, latent_heads=2)),
    ("gla4 4x128+64", dict(heads=32, latent_rank=512, rope_dim=64, batch=64, context=8192, latent_heads=4)),
    ("448+64 sq4", dict(heads=32, latent_rank=448, rope_dim=64, batch=64, context=8192, query_len=4)),
    ("512+64 b1 128k", dict(heads=32, latent_rank=512, rope_dim=64, batch=1, context=131072)),
    ("448+64 b16 32k", dict(heads=32, latent_rank=448, rope_dim=64, batch=16, context=32768)),
    ("192+64 b128 1k", dict(heads=32, latent_rank=192, rope_dim=64, batch=128, context=1024)),
    ("156+36 fp16", dict(heads=32, latent_rank=156, rope_dim=36, batch=64, context=8192, dtype=torch.float16)),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--latent-rank", type=int, default=512, help="total latent width r (all latent heads)")
    p.add_argument("--rope-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--query-len", type=int, default=1)
    p.add_argument("--latent-heads", type=int, default=1)
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--num-splits", type=int, default=None)
    p.add_argument("--source-geometry", default="32,8,128", help="q_heads,kv_heads,head_dim of the source GQA")
    p.add_argument("--no-source", action="store_true", help="skip the source SDPA timing")
    p.add_argument("--preset", choices=["standard", "widths"], default=None,
                   help="standard: the four reference shapes (MLA 32 and 128 heads, query length 2, GLA-2) instead of "
                        "one shape; widths: the width sweep (every row against the source decode, the rule-based "
                        "configuration and the PyTorch reference)")
    p.add_argument("--sweep", action="store_true", help="try candidate block sizes and splits, keep the best")
    p.add_argument("--sweep-set", choices=["wide", "narrow"], default="wide", help="which candidate list to sweep")
    p.add_argument("--jobs", type=int, default=8, help="processes compiling sweep candidates")
    p.add_argument("--kernel", choices=["auto", "triton", "wgmma"], default="auto",
                   help="auto: the launcher's choice; triton / wgmma: force that kernel (its default block sizes)")
    p.add_argument("--compare-triton", action="store_true",
                   help="where the default is the Gluon wgmma kernel, also time the Triton kernel's default config")
    p.add_argument("--repeat", type=int, default=1, help="time each final row this many times (spread)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    return p.parse_args(argv)


def _cfg_str(c: md.DecodeConfig) -> str:
    extra = (" kvM" if c.kv_on_m else "") + (" fused" if c.fuse_combine else "") + (
        f" maxnreg{c.maxnreg}" if c.maxnreg else ""
    ) + (f" O{c.out_splits}" if c.out_splits > 1 else "")
    return f"M{c.block_m} N{c.block_n} w{c.num_warps} s{c.num_stages}{extra}"


def _splits_for(kw, cfg):
    lh = kw.get("latent_heads", 1)
    rows = kw["query_len"] * kw["heads"] // lh
    return md.choose_num_splits(
        md.programs_per_split(kw["batch"], lh, rows, kw["latent_rank"] // lh, cfg), kw["context"],
        md.sm_count(torch.device("cuda")), cfg.block_n, ctas_per_sm=cfg.ctas_per_sm,
    )


def sweep_row(name, kw, jobs, log, which="wide"):
    """Time every candidate config of a row at the heuristic splits and a few others; keep the best."""
    lh = kw.get("latent_heads", 1)
    r_c = kw["latent_rank"] // lh
    rows = kw["query_len"] * kw["heads"] // lh
    cands = bench.sweep_candidates(rows, r_c, which)
    specs = []
    for c in cands:
        for splits in (1, 2):  # the two compiled variants: direct write, and split + combine
            specs.append(dict(heads=kw["heads"], latent_rank=kw["latent_rank"], rope_dim=kw["rope_dim"],
                              query_len=kw["query_len"], latent_heads=lh, dtype="bfloat16", page_size=64,
                              num_splits=splits, config=tuple(c.__dict__.values())))  # fmt: skip
    t0 = time.time()
    warm = bench.warm_compile(specs, jobs)
    log(f"[{name}] compiled {len(specs)} variants in {time.time() - t0:.0f}s; failures: "
        f"{[(s['config'], s['num_splits'], w) for s, w in zip(specs, warm) if w != 'ok']}")  # fmt: skip
    best = (float("inf"), None, None)
    for c in cands:
        h = _splits_for(kw, c)
        tries = [h] + [s for s in ((2, 4) if rows <= 64 and kw["batch"] * lh < 132 else (1, 2)) if s != h]
        for splits in tries:
            try:
                r = bench.run_decode_bench(**kw, config=c, num_splits=splits, source_geometry=None,
                                           check=splits == h, cuda_graph=False)  # fmt: skip
            except Exception as exc:
                log(f"[{name}] {_cfg_str(c)} splits={splits}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                continue
            chk = r.get("check", {}).get("ok", "-")
            log(f"[{name}] {_cfg_str(c)} splits={splits}: {r['time_us']:.1f} us "
                f"{r['fraction_of_copy_bw']:.3f} of copy bw, {r['tflops']:.0f} TFLOP/s, kernel={r.get('kernel')} "
                f"check={chk}")  # fmt: skip
            if r["time_us"] < best[0]:
                best = (r["time_us"], c, splits)
    return best[1], best[2]


def triton_default(kw: dict):
    """The Triton kernel's default block sizes for a row's shape (run_decode_bench keyword arguments)."""
    hc = kw.get("latent_heads", 1)
    return md.default_config(kw["query_len"] * kw["heads"] // hc, kw["latent_rank"] // hc, kw["rope_dim"], kw["dtype"])


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_decode needs a CUDA GPU.")
    dtype = getattr(torch, args.dtype)
    geom = None if args.no_source else tuple(int(x) for x in args.source_geometry.split(","))
    lines: list[str] = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    if args.preset == "widths":
        return width_sweep(args, log, lines)
    if args.preset == "standard":
        rows = [(n, dict(kw, dtype=dtype, page_size=args.page_size), src) for n, kw, src in STANDARD_ROWS]
    else:
        kw = dict(heads=args.heads, latent_rank=args.latent_rank, rope_dim=args.rope_dim, batch=args.batch,
                  context=args.context, query_len=args.query_len, latent_heads=args.latent_heads, dtype=dtype,
                  page_size=args.page_size)  # fmt: skip
        rows = [("custom", kw, geom is not None)]

    log(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
        f"{__import__('triton').__version__}  copy bw {bench.copy_bandwidth() / 1e12:.3f} TB/s (read+write)")  # fmt: skip
    results = {}
    for name, kw, with_src in rows:
        cfg, splits = None, args.num_splits
        if args.kernel == "wgmma":
            cfg = md.WGMMA_CONFIG
        elif args.kernel == "triton":
            cfg = triton_default(kw)
        if args.sweep:
            cfg, best_splits = sweep_row(name, {k: v for k, v in kw.items() if k not in ("dtype", "page_size")},
                                         args.jobs, log, args.sweep_set)  # fmt: skip
            splits = splits or best_splits
        for rep in range(args.repeat):
            r = bench.run_decode_bench(**kw, source_geometry=geom if with_src else None, config=cfg,
                                       num_splits=splits, split_only=True)  # fmt: skip
            key = name if args.repeat == 1 else f"{name}#{rep + 1}"
            results[key] = r
            log(f"[{key}] FINAL {json.dumps(r, default=str)}")
            if args.compare_triton and cfg is None and r["config"].get("kernel") == "wgmma":
                rt = bench.run_decode_bench(**kw, source_geometry=None, config=triton_default(kw),
                                            num_splits=args.num_splits, split_only=True)  # fmt: skip
                rt["speedup_vs_triton_kernel"] = rt["time_us"] / r["time_us"]
                results[key + "-triton"] = rt
                log(f"[{key}-triton] FINAL {json.dumps(rt, default=str)}")

    table = ["| row | config | splits | time us (events) | time us (graph) | split kernel alone us | cache GB | "
             "% copy bw | TFLOP/s | source SDPA us (backend) | speedup |", "|" + "---|" * 11]  # fmt: skip
    for name, r in results.items():
        c = r["config"]
        src = r.get("source") or {}
        tg = r.get("time_us_cudagraph")
        tg_s = tg if isinstance(tg, str) else f"{tg:.1f}"
        so_s = f"{r['time_us_split_only']:.1f}" if "time_us_split_only" in r else "-"
        src_s = f"{src['best_us']:.1f} ({src['best_backend']})" if src.get("best_us") else "-"
        spd_s = f"{r['speedup_vs_source']:.2f}x" if "speedup_vs_source" in r else "-"
        kvm = (" gluon-wgmma" if c.get("kernel") == "wgmma" else "") + (" kvM" if c.get("kv_on_m") else "") + (" fused" if c.get("fuse_combine") else "") + (
            f" maxnreg{c['maxnreg']}" if c.get("maxnreg") else ""
        ) + (f" O{c['out_splits']}" if c.get("out_splits", 1) > 1 else "")
        table.append(
            f"| {name} | M{c['block_m']} N{c['block_n']} w{c['num_warps']} s{c['num_stages']}{kvm} | "
            f"{c['num_splits']} | {r['time_us']:.1f} | {tg_s} | {so_s} | {r['cache_bytes'] / 1e9:.3f} | "
            f"{100 * r['fraction_of_copy_bw']:.1f} | {r['tflops']:.0f} | {src_s} | {spd_s} |"
        )
    for rep in [""] if args.repeat == 1 else [f"#{i + 1}" for i in range(args.repeat)]:
        gla, mla = results.get("gla2-h128-sq2-b64-l8192" + rep), results.get("mla-h128-sq2-b64-l8192" + rep)
        if gla and mla:
            table.append(f"\nGLA (2 latent heads) vs MLA at query length 2, same cache bytes{rep}: "
                         f"{mla['time_us'] / gla['time_us']:.2f}x faster")  # fmt: skip
    for row in table:
        log(row)
    if args.json:
        args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": results}, indent=1, default=str))
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")


def width_sweep(args, log, lines) -> None:
    """Each row: the launcher's choice, the rules alone, the PyTorch reference and the source's SDPA decode,
    all timed in this run; the bar columns: % of copy bandwidth and speed-up against the byte ratio."""
    bw = bench.copy_bandwidth()
    log(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
        f"{__import__('triton').__version__}  copy bw {bw / 1e12:.3f} TB/s (read+write)")  # fmt: skip
    results = {}
    hq, hkv, d = LLAMA3_8B
    for name, kw0 in WIDTH_ROWS:
        kw = dict(query_len=1, latent_heads=1, dtype=torch.bfloat16, page_size=args.page_size) | kw0
        r = bench.run_decode_bench(**kw, source_geometry=LLAMA3_8B, cuda_graph=False)
        lh = kw["latent_heads"]
        rows = kw["query_len"] * kw["heads"] // lh
        rules = md.default_config(rows, kw["latent_rank"] // lh, kw["rope_dim"], kw["dtype"])  # no table
        rr = bench.run_decode_bench(**kw, source_geometry=None, config=rules, check=False, cuda_graph=False)
        r["rules_time_us"] = rr["time_us"]
        r["reference_us"] = bench.reference_time_us(**kw)
        elt = torch.finfo(kw["dtype"]).bits // 8
        r["byte_ratio"] = (2 * hkv * d * elt) / ((kw["latent_rank"] + kw["rope_dim"]) * elt)
        results[name] = r
        log(f"[{name}] FINAL {json.dumps(r, default=str)}")
    table = ["| row | cache MB | config (splits) | us | % copy bw | rules us | reference us | source SDPA us | "
             "speed-up | byte ratio | speed-up / byte ratio | regs / spills |", "|" + "---|" * 12]  # fmt: skip
    for name, r in results.items():
        c, src, k = r["config"], r["source"], r.get("kernel") or {}
        kind = "gluon" if c.get("kernel") == "wgmma" else f"M{c['block_m']} N{c['block_n']} w{c['num_warps']} s{c['num_stages']}"
        if c.get("out_splits", 1) > 1:
            kind += f" O{c['out_splits']}"
        spd = r.get("speedup_vs_source")
        table.append(
            f"| {name} | {r['cache_bytes'] / 1e6:.0f} | {kind} ({c['num_splits']}) | {r['time_us']:.1f} | "
            f"{100 * r['fraction_of_copy_bw']:.1f} | {r['rules_time_us']:.1f} | {r['reference_us']:.0f} | "
            f"{src['best_us']:.1f} | {spd:.2f}x | {r['byte_ratio']:.2f} | {spd / r['byte_ratio']:.2f} | "
            f"{k.get('n_regs')} / {k.get('n_spills')} |"
        )
    for row in table:
        log(row)
    if args.json:
        args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "copy_bw": bw, "rows": results},
                                        indent=1, default=str))  # fmt: skip
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
