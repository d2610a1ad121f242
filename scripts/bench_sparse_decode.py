#!/usr/bin/env python
"""Time one decode step of the MLA / GLA Triton kernel: dense vs sparse, masses off vs on.

One process, one random paged cache (``latentkv.kernels.bench.make_paged_inputs``: shuffled
pages, every sequence ``--context`` tokens). Rows:
- dense: the full block table, ``return_masses`` off (the reference time) and on;
- sparse at each ``--fractions`` f: a reduced block table of ceil(f * pages) pages per sequence
  (the sink page, the current page last, the rest drawn at random, ascending -- what
  ``latentkv.sparsity.runtime`` hands the kernel), masses off and on (on: the per-page masses
  the policy history reads, so that no second pass over the cache is needed);
- with ``--per-head`` (GLA): the same fractions with a table per latent head, each head's pages
  drawn apart (what choosing per latent head hands the kernel).
Each time is the median of many calls with CUDA events after a warm-up (``triton.testing.do_bench``,
which also clears the L2 cache between calls); ratios are against the dense time of the same run.
Before timing, every configuration is checked once: the output with masses on is bit-identical to
the output with masses off, and the masses match the PyTorch reference on the first sequences.

    python scripts/bench_sparse_decode.py                    # H100: batch 64, context 8192, MLA 512+64, 32 heads
    python scripts/bench_sparse_decode.py --json out.json    # also write the figures
    TRITON_INTERPRET=1 python scripts/bench_sparse_decode.py --smoke   # CPU, tiny sizes: checks the script only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMOKE = dict(batch=2, context=136, heads=4, latent_rank=32, rope_dim=16, page_size=16, dtype="fp32", reps=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=8192, help="tokens per sequence")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--latent-rank", type=int, default=512, help="total latent width (all latent heads)")
    p.add_argument("--latent-heads", type=int, default=1, help="1 = MLA, > 1 = GLA")
    p.add_argument("--rope-dim", type=int, default=64)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--fractions", default="0.25,0.125", help="fractions of the pages a sparse step attends")
    p.add_argument("--per-head", action="store_true",
                   help="with --latent-heads > 1: also each fraction with a block table per latent head "
                        "([batch, latent_heads, k]: every latent head its own random pages)")
    p.add_argument("--warmup-ms", type=int, default=100)
    p.add_argument("--rep-ms", type=int, default=500, help="timing window per row (do_bench: median of its calls)")
    p.add_argument("--reps", type=int, default=5, help="CPU (--smoke) only: calls per row")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on the CPU under TRITON_INTERPRET=1 (checks that the script runs; times mean nothing)")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    return args


def sparse_table(table: torch.Tensor, context: int, page: int, fraction: float, gen: torch.Generator):
    """A reduced block table of ceil(fraction * pages) pages per sequence: page 0, the last page,
    random others, ascending; and the compacted lengths (every page full but the last)."""
    batch, n = table.shape
    k = min(n, max(2, math.ceil(fraction * n)))
    rows = []
    for b in range(batch):
        middle = torch.randperm(n - 2, generator=gen)[: k - 2] + 1
        ids = torch.cat([torch.tensor([0, n - 1]), middle]).sort().values
        rows.append(table[b, ids.to(table.device)])
    lens = torch.full((batch,), (k - 1) * page + context - (n - 1) * page, dtype=torch.int32, device=table.device)
    return torch.stack(rows), lens, k


def time_us(fn, args) -> float:
    if torch.cuda.is_available() and not args.smoke:
        from latentkv.kernels.bench import do_bench

        return do_bench(fn, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms) * 1e3
    return host_us(fn, args)


def graph_us(fn, args) -> float | None:
    """GPU time without the host's launch cost: the call replayed from a CUDA graph (median)."""
    if not torch.cuda.is_available() or args.smoke:
        return None
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median")) * 1e3


def host_us(fn, args) -> float:
    """Median wall time of one call on the host (on a GPU: the launch cost while the queue is not full)."""
    fn()
    if torch.cuda.is_available() and not args.smoke:
        torch.cuda.synchronize()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv=None) -> dict:
    args = parse_args(argv)
    from latentkv.kernels import bench
    from latentkv.kernels.compare import compare

    md = bench.md
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("no CUDA GPU: run with --smoke (and TRITON_INTERPRET=1) to check the script on the CPU.")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # --smoke on a GPU: tiny sizes, compiled
    dtype = DTYPES[args.dtype]
    q, kv, table, seq_lens, r_c = bench.make_paged_inputs(
        heads=args.heads, latent_rank=args.latent_rank, rope_dim=args.rope_dim, batch=args.batch,
        context=args.context, query_len=1, latent_heads=args.latent_heads, dtype=dtype, page_size=args.page_size,
        device=device,
    )  # fmt: skip
    kw = dict(latent_heads=args.latent_heads, rope_dim=args.rope_dim, softmax_scale=1.0 / math.sqrt(r_c + args.rope_dim))
    gen = torch.Generator().manual_seed(0)
    cases = [("dense", 1.0, table, seq_lens, table.shape[1])]
    for f in (float(x) for x in args.fractions.split(",")):
        t, lens, k = sparse_table(table, args.context, args.page_size, f, gen)
        cases.append((f"sparse {f:g}", f, t, lens, k))
        if args.per_head and args.latent_heads > 1:
            heads = [sparse_table(table, args.context, args.page_size, f, gen) for _ in range(args.latent_heads)]
            cases.append((f"sparse {f:g} per-head", f, torch.stack([h[0] for h in heads], 1), lens, k))

    rows = []
    for name, fraction, t, lens, k in cases:
        max_len = k * args.page_size  # what the runtime passes: the split choice follows the attended length

        # one kernel for both (a masses call runs the Triton kernel; on Hopper the default for many
        # heads would otherwise be the Gluon kernel, which writes no masses)
        cfg = md.choose_config(q, kv, args.latent_heads, args.rope_dim, need_masses=True)

        def run(masses, t=t, lens=lens, max_len=max_len, cfg=cfg):
            return md.mla_decode(q, kv, t, lens, max_seq_len=max_len, return_masses=masses, config=cfg, **kw)

        out_off = run(False)
        out_on, masses = run(True)
        if not torch.equal(out_off, out_on):
            raise SystemExit(f"{name}: the output with masses on differs from the output with masses off.")
        n = min(2, args.batch)
        _, ref = md.mla_decode_reference(q[:n], kv, t[:n], lens[:n], return_masses=True, **kw)
        check = compare(masses[:n], ref, atol=1e-3, rtol=1e-2, max_cos_diff=1e-5)
        if not check.ok:
            raise SystemExit(f"{name}: masses differ from the reference: {check.report()}")
        for masses_on in (False, True):
            us = time_us(lambda m=masses_on: run(m), args)
            gus = graph_us(lambda m=masses_on: run(m), args)
            hus = host_us(lambda m=masses_on: run(m), args) if cuda else None
            compiled = md.LAST_COMPILED.get("split")  # the split kernel of the last call (registers, spills)
            rows.append({"case": name, "pages_fraction": k / table.shape[1], "pages_per_seq": k,
                         "table": "per latent head" if t.dim() == 3 else "shared", "masses": masses_on,
                         "time_us": us, "graph_us": gus, "host_us": hus, "n_regs": getattr(compiled, "n_regs", None),
                         "n_spills": getattr(compiled, "n_spills", None)})
        print(f"{name}: {k} of {table.shape[1]} pages per sequence, masses check {check.report()}", file=sys.stderr)

    dense_us, dense_graph = rows[0]["time_us"], rows[0]["graph_us"]
    for r in rows:
        r["vs_dense"] = r["time_us"] / dense_us
        r["graph_vs_dense"] = r["graph_us"] / dense_graph if dense_graph else None
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET smoke run; times are not GPU times)",
        "shape": {k: getattr(args, k) for k in ("batch", "context", "heads", "latent_rank", "latent_heads", "rope_dim",
                                               "page_size", "dtype")},
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "rows": rows,
    }
    print(f"{result['device']}; {result['shape']}")
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    print("| case | pages per sequence | masses | time (us, events) | vs dense | time (us, CUDA graph) | vs dense | "
          "host us / call | split kernel regs / spills |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['pages_per_seq']} ({r['pages_fraction']:.3f}) | {'on' if r['masses'] else 'off'} | "
              f"{r['time_us']:.1f} | {r['vs_dense']:.3f} | {fmt(r['graph_us'], '.1f')} | "
              f"{fmt(r['graph_vs_dense'], '.3f')} | {fmt(r['host_us'], '.1f')} | {r['n_regs']} / {r['n_spills']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
