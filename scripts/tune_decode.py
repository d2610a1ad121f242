#!/usr/bin/env python
"""Measure the split decode kernel's launch configurations per shape and write the tuned table.

For each shape of the grid (query rows per latent head x latent width x RoPE width), every candidate
of ``latentkv.kernels.tuning.candidate_configs`` is compiled (in parallel processes), checked against
the PyTorch reference, and timed on a full paged cache (batch 64, context 8192 by default) at the
splits the launcher would choose for it. The fastest configuration without register spills goes into
``latentkv/kernels/tuned/<family>.json``; the rule-based default is timed beside it.

  python scripts/tune_decode.py                       # the default grid, table for this GPU's family
  python scripts/tune_decode.py --rows 32 --widths 192+64 --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from latentkv.kernels import bench, tuning  # noqa: E402

md = bench.md

# (latent width, RoPE width): one non-power-of-2 width per latent block (whole-block loads and the
# zeroing of the columns past the width are part of what is timed), RoPE 32 and 64.
DEFAULT_WIDTHS = ["48+32", "96+32", "96+64", "192+32", "192+64", "448+64", "960+64", "1024+64", "640+64", "512+64",
                  "256+64", "128+64"]
DEFAULT_ROWS = [16, 32, 64]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=DEFAULT_ROWS, help="query rows per latent head")
    p.add_argument("--widths", nargs="+", default=DEFAULT_WIDTHS, help="LATENT+ROPE pairs")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--jobs", type=int, default=16, help="processes compiling candidates")
    p.add_argument("--out", type=Path, default=None, help="table path (default: the package's tuned/<family>.json)")
    p.add_argument("--log", type=Path, default=None, help="also write every timing as JSON lines here")
    p.add_argument("--max-minutes", type=float, default=0, help="stop starting new shapes after this long (0: no limit)")
    return p.parse_args(argv)


def command_line(argv: list[str]) -> str:
    """The command that measured the table, without the output paths (they are this machine's)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--out", "--log"):
            skip = True
        else:
            kept.append(a)
    return "python scripts/tune_decode.py " + " ".join(kept)


def occupancy(compiled, num_warps: int) -> int:
    """Programs of one compiled kernel resident per SM (registers and shared memory of an H100-class SM)."""
    regs = getattr(compiled, "n_regs", 0) or 0
    smem = getattr(getattr(compiled, "metadata", None), "shared", 0) or 0
    by_regs = 65536 // max(1, regs * 32 * num_warps)
    by_smem = (228 * 1024) // max(1, smem + 1024)
    return max(1, min(by_regs, by_smem, 2))


def time_config(kw: dict, fields: dict, ctas_options: tuple[int, ...] | None = None) -> dict:
    """Launch once (compile, check, read registers), then time at the split counts the launcher would choose
    for each of ``ctas_options`` programs per SM; the fastest is returned."""
    cfg = md.DecodeConfig(**fields)
    q, kv, table, seq_lens, r_c = bench.make_paged_inputs(**kw, device="cuda")
    args = dict(latent_heads=kw["latent_heads"], rope_dim=kw["rope_dim"], softmax_scale=1.0 / math.sqrt(q.shape[-1]))
    out = md.mla_decode(q, kv, table, seq_lens, num_splits=1, config=cfg, **args)
    compiled = md.LAST_COMPILED.get("split")
    rows = kw["query_len"] * kw["heads"] // kw["latent_heads"]
    ref = md.mla_decode_reference(q[:1], kv, table[:1], seq_lens[:1], out_dtype=torch.float32, **args)
    # the split count follows ctas_per_sm (programs per SM the launcher plans for): the resident count
    # as compiled and 1, 2, 4 are timed; the fastest is kept (narrow latents gain from more splits
    # than their residency suggests)
    best = None
    for ctas in ctas_options or sorted({occupancy(compiled, cfg.num_warps), 1, 2, 4}):
        cfg = md.DecodeConfig(**fields, ctas_per_sm=ctas)
        splits = md.choose_num_splits(md.programs_per_split(kw["batch"], kw["latent_heads"], rows, r_c, cfg),
                                      kw["context"], md.sm_count(q.device), cfg.block_n, ctas_per_sm=ctas)  # fmt: skip
        if best is not None and splits == best["splits"]:
            continue
        out = md.mla_decode(q, kv, table, seq_lens, num_splits=splits, config=cfg, **args)
        err = float((out[:1].float() - ref).abs().max() / ref.abs().max())
        t = bench.do_bench(lambda: md.mla_decode(q, kv, table, seq_lens, num_splits=splits, config=cfg, **args),
                           warmup_ms=10, rep_ms=40) * 1e3  # fmt: skip
        if best is None or t < best["time_us"]:
            best = dict(time_us=t, splits=splits, ctas_per_sm=ctas, rel_err=err)
    del q, kv, table, seq_lens, out
    return dict(best, n_regs=getattr(compiled, "n_regs", None), n_spills=getattr(compiled, "n_spills", None))


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_decode needs a CUDA GPU.")
    dtype = getattr(torch, args.dtype)
    elt = torch.finfo(dtype).bits // 8
    family = tuning.gpu_family(torch.device("cuda"))
    out_path = args.out or tuning.TABLE_DIR / f"{family}.json"
    entries = {}
    if out_path.is_file():  # keep rows measured before for shapes this run does not cover
        entries = {tuple(e["key"]): e for e in json.loads(out_path.read_text())["entries"]}
    bw = bench.copy_bandwidth()
    print(f"GPU {torch.cuda.get_device_name()} ({family}), copy bw {bw / 1e12:.3f} TB/s", flush=True)
    log = args.log.open("a") if args.log else None
    t_start = time.time()
    for width in args.widths:
        r_c, rope = (int(x) for x in width.split("+"))
        for rows in args.rows:
            if args.max_minutes and time.time() - t_start > 60 * args.max_minutes:
                print("time limit reached; stopping", flush=True)
                break
            kw = dict(heads=rows, latent_rank=r_c, rope_dim=rope, batch=args.batch, context=args.context,
                      query_len=1, latent_heads=1, dtype=dtype, page_size=64)  # fmt: skip
            key = tuning.shape_key(rows, r_c, rope, elt)
            cands = tuning.candidate_configs(rows, r_c, rope, elt)
            specs = [dict(heads=rows, latent_rank=r_c, rope_dim=rope, query_len=1, latent_heads=1, dtype=args.dtype,
                          page_size=64, num_splits=s, config=tuple(md.DecodeConfig(**c).__dict__.values()))
                     for c in cands for s in (1, 2)]  # fmt: skip
            t0 = time.time()
            warm = bench.warm_compile(specs, args.jobs)
            ok = [c for c, w1, w2 in zip(cands, warm[0::2], warm[1::2]) if w1 == "ok" and w2 == "ok"]
            results = []
            for fields in ok:
                try:
                    r = time_config(kw, fields)
                except Exception as exc:  # a configuration that does not run is skipped
                    r = dict(error=f"{type(exc).__name__}: {str(exc)[:160]}")
                results.append((fields, r))
                if log:
                    log.write(json.dumps(dict(key=key, width=width, rows=rows, config=fields, **r)) + "\n")
            rule = md.default_config(rows, r_c, rope, dtype)  # the rules alone (no table)
            rule_r = time_config(kw, {k: v for k, v in rule.__dict__.items() if k != "ctas_per_sm"},
                                 (rule.ctas_per_sm,))  # the rules as they launch
            rule_f = {k: v for k, v in rule.__dict__.items() if k != "ctas_per_sm"}
            # the rules' own configuration competes too: a table entry never makes a shape slower
            good = [(f, r) for f, r in results + [(rule_f, rule_r)]
                    if "time_us" in r and not r["n_spills"] and r["rel_err"] < 2e-2]
            cache_bytes = args.batch * args.context * (r_c + rope) * elt
            if not good:
                print(f"[{width} rows {rows}] no candidate without spills; rule {rule_r['time_us']:.1f} us", flush=True)
                continue
            best_f, best_r = min(good, key=lambda fr: fr[1]["time_us"])
            frac = cache_bytes / (best_r["time_us"] * 1e-6) / bw
            entries[key] = dict(key=list(key), shape=f"{width} rows {rows}",
                                config=dict(best_f, ctas_per_sm=best_r["ctas_per_sm"]),
                                time_us=round(best_r["time_us"], 2), fraction_of_copy_bw=round(frac, 4),
                                rule_time_us=round(rule_r["time_us"], 2), candidates=len(cands), timed=len(good))  # fmt: skip
            print(f"[{width} rows {rows}] {len(good)}/{len(cands)} timed in {time.time() - t0:.0f}s: best {best_f} "
                  f"{best_r['time_us']:.1f} us ({100 * frac:.1f}% of copy bw, splits {best_r['splits']}, "
                  f"regs {best_r['n_regs']}); rules {rule_r['time_us']:.1f} us", flush=True)  # fmt: skip
            torch.cuda.empty_cache()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    table = dict(gpu=torch.cuda.get_device_name(), family=family, dtype=args.dtype, batch=args.batch,
                 context=args.context, copy_bw_tb_s=round(bw / 1e12, 3), torch=torch.__version__,
                 triton=__import__("triton").__version__, command=command_line(argv or sys.argv[1:]),
                 entries=sorted(entries.values(), key=lambda e: e["key"]))  # fmt: skip
    out_path.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {out_path} ({len(entries)} shapes)")


if __name__ == "__main__":
    main()
