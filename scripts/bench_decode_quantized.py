#!/usr/bin/env python
"""Time the decode kernel over a quantized latent cache against the same shape in bf16 (GPU).

Each format runs the shape through `latentkv.kernels.bench.run_decode_bench` (CUDA-event medians,
L2 flushed, every output checked against the PyTorch reference); the table gives time, cache bytes
a token (codes, scales and the bf16 RoPE key), the bandwidth those bytes make and the speed-up over
the bf16 cache measured in the same run.

  python scripts/bench_decode_quantized.py                       # MLA 512 + 64, 32 heads, batch 64, 8192
  python scripts/bench_decode_quantized.py --formats fp8_e4m3/g128 int4/g32 --heads 128 --json out.json
  python scripts/bench_decode_quantized.py --sweep               # also search block sizes per format
  python scripts/bench_decode_quantized.py --dequant-tile        # also each format with the dequantized tile
  python scripts/bench_decode_quantized.py --group-dots          # also fp8 by 2-D dots per group (and configs)
  python scripts/bench_decode_quantized.py --wgmma 1 2 3 4       # also bf16 and fp8 through the Gluon kernel
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentkv.kernels import bench  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="+", default=["fp8_e4m3/g128", "int4/g32"],
                   help="latent formats to time beside bf16 (the paged cache's: fp8_e4m3/g<N>, int4/g<N>, .../head)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--latent-rank", type=int, default=512)
    p.add_argument("--rope-dim", type=int, default=64)
    p.add_argument("--latent-heads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--query-len", type=int, default=1)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--sweep", action="store_true",
                   help="also time a grid of launch configurations for each quantized format (block_n, warps, "
                        "stages; block_m from the rules) and report the fastest that passes the check")
    p.add_argument("--dequant-tile", action="store_true",
                   help="also time each format with its tile dequantized in registers (DecodeConfig.dequant_tile) "
                        "at the same launch configuration")
    p.add_argument("--group-dots", action="store_true",
                   help="also time each fp8 format by one 2-D dot per scale group (DecodeConfig.group_dots) at the "
                        "rules' configuration and at --group-dots-config ones, and by the batched dots")
    p.add_argument("--group-dots-config", nargs="*", default=["32,32,8,5", "32,32,4,5"],
                   metavar="M,N,WARPS,STAGES", help="block_m,block_n,num_warps,num_stages of the extra --group-dots rows "
                   "(ctas_per_sm 2 at 4 warps, for the split choice)")
    p.add_argument("--wgmma", nargs="*", type=int, default=None, metavar="SPLITS",
                   help="also time bf16 and each fp8 format through the Gluon wgmma kernel (Hopper), at these "
                        "numbers of splits (none given: the launcher's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    return p.parse_args(argv)


def sweep(shape: dict, fmt: str, rule: dict) -> dict:
    """The fastest configuration of a small grid around the rules' choice for one quantized format
    (each one checked against the reference; ones that fail to compile or to match are skipped)."""
    from latentkv.kernels.mla_decode import DecodeConfig

    best = None
    for block_n in (16, 32, 64):
        for num_warps in (4, 8):
            for num_stages in (2, 3, 5):
                cfg = DecodeConfig(block_m=rule["block_m"], block_n=block_n, num_warps=num_warps,
                                   num_stages=num_stages, out_splits=rule.get("out_splits", 1))
                try:
                    r = bench.run_decode_bench(**shape, kv_format=fmt, config=cfg)
                except Exception as exc:  # noqa: BLE001 -- a configuration the GPU cannot run is skipped
                    print(f"{fmt} {cfg}: skipped ({type(exc).__name__}: {str(exc)[:80]})", file=sys.stderr)
                    continue
                print(f"{fmt} M{cfg.block_m} N{block_n} w{num_warps} s{num_stages}: {r['time_us']:.1f} us"
                      f"{'' if r['check']['ok'] else ' (check failed)'}", file=sys.stderr)
                if r["check"]["ok"] and (best is None or r["time_us"] < best["time_us"]):
                    best = r
    if best is None:
        raise SystemExit(f"{fmt}: no configuration of the sweep ran and passed the check")
    return best


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = dict(heads=args.heads, latent_rank=args.latent_rank, rope_dim=args.rope_dim, batch=args.batch,
                 context=args.context, query_len=args.query_len, latent_heads=args.latent_heads,
                 page_size=args.page_size, source_geometry=None)
    rows = {fmt: bench.run_decode_bench(**shape, kv_format=None if fmt == "bf16" else fmt)
            for fmt in ["bf16", *args.formats]}
    if args.dequant_tile:
        from latentkv.kernels.mla_decode import DecodeConfig

        for fmt in args.formats:
            rule = {k: v for k, v in rows[fmt]["config"].items() if k != "num_splits"}
            rows[f"{fmt} deq"] = bench.run_decode_bench(**shape, kv_format=fmt,
                                                        config=DecodeConfig(**{**rule, "dequant_tile": True,
                                                                                 "group_dots": False}))
    if args.group_dots:
        from dataclasses import replace

        import torch

        from latentkv.kernels.mla_decode import DecodeConfig, default_config

        for fmt in (f for f in args.formats if f.startswith("fp8")):
            rule = {k: v for k, v in rows[fmt]["config"].items() if k != "num_splits"}
            rows[f"{fmt} batched"] = bench.run_decode_bench(
                **shape, kv_format=fmt, config=DecodeConfig(**{**rule, "dequant_tile": False, "group_dots": False}))
            if not rule["group_dots"]:  # else the format's row above
                rows[f"{fmt} groups"] = bench.run_decode_bench(
                    **shape, kv_format=fmt, config=DecodeConfig(**{**rule, "group_dots": True}))
            # the dequantized tile at the plain cache's rule (fp8's default before group_dots)
            plain = default_config(args.heads * args.query_len // args.latent_heads,
                                   args.latent_rank // args.latent_heads, args.rope_dim, torch.bfloat16)
            rows[f"{fmt} deq plain rule"] = bench.run_decode_bench(
                **shape, kv_format=fmt, config=replace(plain, dequant_tile=True))
            for spec in args.group_dots_config:
                m, n, w, st = (int(x) for x in spec.split(","))
                cfg = DecodeConfig(block_m=m, block_n=n, num_warps=w, num_stages=st, ctas_per_sm=2 if w == 4 else 1,
                                   group_dots=True)
                rows[f"{fmt} groups {spec}"] = bench.run_decode_bench(**shape, kv_format=fmt, config=cfg)
    if args.wgmma is not None:
        from latentkv.kernels.mla_decode import WGMMA_CONFIG

        for fmt in ["bf16", *(f for f in args.formats if f.startswith("fp8"))]:
            for splits in args.wgmma or [None]:
                rows[f"{fmt} gluon" + (f" /{splits}" if splits else "")] = bench.run_decode_bench(
                    **shape, kv_format=None if fmt == "bf16" else fmt, config=WGMMA_CONFIG, num_splits=splits)
    if args.sweep:
        for fmt in args.formats:
            rows[f"{fmt} best"] = sweep(shape, fmt, rows[fmt]["config"])
    base = rows["bf16"]["time_us"]
    print(f"{'format':<32} {'config (splits)':<18} {'time us':>9} {'bytes/token':>12} {'TB/s':>6} {'vs bf16':>8}  check")
    for fmt, r in rows.items():
        per_token = r["cache_bytes"] / (args.batch * args.context)
        c = r["config"]
        config = ("gluon" if c.get("kernel") == "wgmma" else f"M{c['block_m']} N{c['block_n']} w{c['num_warps']} "
                  f"s{c['num_stages']}") + f" ({c['num_splits']})"
        print(f"{fmt:<32} {config:<18} {r['time_us']:9.1f} {per_token:12.0f} {r['achieved_bytes_per_s'] / 1e12:6.2f} "
              f"{base / r['time_us']:7.2f}x  {'ok' if r['check']['ok'] else 'FAILED'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return 0 if all(r["check"]["ok"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
