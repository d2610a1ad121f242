#!/usr/bin/env python
"""Host-side cost of one ``mla_decode`` call (what the CPU spends before the GPU sees the work).

On a GPU, a decode step of a small model is often bound by this cost, not by the kernel: every
layer calls the launcher once. Prints the median wall time per call of the full launcher, of the
split kernel's launch alone and of the Python around it, then a cProfile table of the full call.

    python scripts/profile_decode_host.py                     # MLA 512+64, 32 heads, batch 64, context 2048
    python scripts/profile_decode_host.py --heads 9 --latent-rank 160 --rope-dim 32 --batch 8 --context 512
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def per_call_us(fn, n: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--latent-rank", type=int, default=512)
    p.add_argument("--rope-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_decode_host measures launches on a CUDA GPU.")
    from latentkv.kernels import bench

    md = bench.md
    q, kv, table, lens, r_c = bench.make_paged_inputs(
        heads=args.heads, latent_rank=args.latent_rank, rope_dim=args.rope_dim, batch=args.batch,
        context=args.context, query_len=1, latent_heads=1, dtype=torch.bfloat16, page_size=args.page_size,
        device=torch.device("cuda"),
    )  # fmt: skip
    kw = dict(latent_heads=1, rope_dim=args.rope_dim, softmax_scale=1.0 / math.sqrt(r_c + args.rope_dim))
    full = per_call_us(lambda: md.mla_decode(q, kv, table, lens, **kw), args.calls)
    cfg = md.choose_config(q, kv, 1, args.rope_dim)
    print(f"config {cfg}")
    print(f"full mla_decode call: {full:.1f} us on the host (median of {args.calls})")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        md.mla_decode(q, kv, table, lens, **kw)
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(35)
    print(buf.getvalue())


if __name__ == "__main__":
    main()
