#!/usr/bin/env python
"""Benchmark `--to gqa` (fewer KV heads) against mean-pooling, one-shot, on real models.

For each model and each target KV-head count: convert with the PCA method (similarity grouping)
and with mean-pooling (contiguous groups, the usual uptraining start), load each output with plain
`transformers.AutoModelForCausalLM` and measure WikiText-2 perplexity with the project protocol
(ASSETS.md: 64 x 512-token windows, fp32). The bar (issue 4): at every budget the perplexity
increase of PCA is at most one third of mean-pooling's.

Examples:
  python scripts/bench_gqa.py --model smollm2 --heads 1 --md benchmarks/gqa_smollm2.md
  python scripts/bench_gqa.py --model runs/mha-ref --fractions 0.5 0.25 --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert  # noqa: E402
from latentkv.eval.perplexity import PerplexityProtocol, eval_windows, perplexity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "corpora"

# (label, method options besides num_kv_heads)
VARIANTS = {
    "pca": dict(method="pca", grouping="similarity"),
    "pca-contiguous": dict(method="pca", grouping="contiguous"),
    "meanpool": dict(method="meanpool", grouping="contiguous"),
    "pca-sequential": dict(method="pca", grouping="similarity", sequential=True),
    "pca-query": dict(method="pca", grouping="similarity", key_weighting="query"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="source folder, or 'smollm2' for the cached SmolLM2-135M-Instruct (repeatable)")
    p.add_argument("--heads", type=int, nargs="*", default=None, help="target KV heads")
    p.add_argument("--fractions", type=float, nargs="*", default=None, help="target KV heads as fractions of the source's")
    p.add_argument("--variants", nargs="*", default=["pca", "meanpool"], choices=sorted(VARIANTS))
    p.add_argument("--calib-data", default=str(SHARED / "gutenberg"))
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--eval-text", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--source-ppl", type=float, default=None, help="reuse a measured source PPL (one model only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_gqa", help="where converted models go")
    p.add_argument("--keep", action="store_true", help="keep the converted folders")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    return p.parse_args(argv)


def _source_folder(spec: str) -> Path:
    if spec == "smollm2":
        from latentkv.io.assets import smollm2_folder

        return smollm2_folder()
    return Path(spec)


def _ppl(folder: Path, windows: torch.Tensor, device: str) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    try:
        return perplexity(model, windows, batch_size=8 if device != "cpu" else 4)
    finally:
        del model
        gc.collect()


def run(args) -> list[dict]:
    from transformers import AutoConfig, AutoTokenizer

    protocol = PerplexityProtocol(text=args.eval_text, windows=args.eval_windows)
    rows = []
    for spec in args.model:
        folder = _source_folder(spec)
        config = AutoConfig.from_pretrained(str(folder))
        G = config.num_key_value_heads
        targets = list(args.heads or []) + [max(1, round(G * f)) for f in (args.fractions or [])]
        windows = eval_windows(AutoTokenizer.from_pretrained(str(folder)), protocol)
        t0 = time.perf_counter()
        source_ppl = args.source_ppl if args.source_ppl is not None else _ppl(folder, windows, args.device)
        name = "SmolLM2-135M-Instruct" if spec == "smollm2" else folder.name
        print(f"{name}: source PPL {source_ppl:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for n in targets:
            row = {"model": name, "source_kv_heads": G, "kv_heads": n, "source_ppl": source_ppl}
            for variant in args.variants:
                out = args.work / f"{folder.name}-kv{n}-{variant}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                convert(ConvertOptions(
                    source=str(folder), output=str(out), method="gqa",
                    method_options=dict(num_kv_heads=n, **VARIANTS[variant]),
                    calib=CalibOptions(data=args.calib_data, samples=args.calib_samples, seq_len=args.calib_seq_len),
                    device=args.device, dtype="float32", save_dtype="float32",
                    command=f"latentkv convert {folder} {out} --to gqa --num-kv-heads {n}",
                ))
                t_conv = time.perf_counter() - t0
                ppl = _ppl(out, windows, args.device)
                row[f"{variant}_ppl"] = ppl
                row[f"{variant}_convert_s"] = round(t_conv, 1)
                print(f"  {n} KV heads, {variant}: PPL {ppl:.3f} (convert {t_conv:.0f} s)", flush=True)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
            if "pca_ppl" in row and "meanpool_ppl" in row:
                gain = row["meanpool_ppl"] - source_ppl
                row["increase_ratio"] = (row["pca_ppl"] - source_ppl) / gain if gain > 0 else float("nan")
                row["meets_bar"] = bool(row["increase_ratio"] <= 1 / 3)
            rows.append(row)
    return rows


def markdown(rows: list[dict], args) -> str:
    protocol = PerplexityProtocol(text=args.eval_text, windows=args.eval_windows)
    lines = [
        f"Protocol: {protocol.describe()}, fp32. Calibration: {Path(args.calib_data).name}, "
        f"{args.calib_samples} x {args.calib_seq_len} tokens. One-shot (no training after conversion).",
        "",
        "| model | KV heads | source PPL | " + " | ".join(f"{v} PPL" for v in args.variants)
        + " | PCA increase / mean-pool increase | bar (<= 1/3) |",
        "| --- | --- | --- | " + " | ".join("---" for _ in args.variants) + " | --- | --- |",
    ]
    for r in rows:
        cells = " | ".join(f"{r[f'{v}_ppl']:.2f}" for v in args.variants)
        ratio = r.get("increase_ratio")
        ok = {True: "met", False: "missed"}.get(r.get("meets_bar"), "")
        lines.append(f"| {r['model']} | {r['source_kv_heads']} -> {r['kv_heads']} | {r['source_ppl']:.2f} | {cells} | "
                     f"{'' if ratio is None else f'{ratio:.3f}'} | {ok} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    rows = run(args)
    text = markdown(rows, args)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)


if __name__ == "__main__":
    main()
