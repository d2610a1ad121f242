#!/usr/bin/env python
"""Benchmark `--to gqa` (fewer KV heads) against mean-pooling, one-shot, on real models.

For each model and each target KV-head count: convert with the PCA method (similarity grouping)
and with mean-pooling (contiguous groups, the usual uptraining start), load each output with plain
`transformers.AutoModelForCausalLM` and measure WikiText-2 perplexity with the protocol of
docs/evaluation.md (64 x 512-token windows, fp32). The table reports PCA's perplexity increase over
the source as a fraction of mean-pooling's. Calibration and evaluation texts default to the ones
shipped with latentkv (Gutenberg books; the WikiText-2 test split).

Examples:
  python scripts/bench_gqa.py --model smollm2 --heads 1 --md runs/gqa_smollm2.md
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
from latentkv.data import DEFAULT_CALIBRATION, DEFAULT_EVAL, read_text, resolve_text  # noqa: E402
from latentkv.eval.perplexity import PerplexityProtocol, eval_windows, perplexity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (label, method options besides num_kv_heads)
VARIANTS = {
    "pca": dict(method="pca", grouping="similarity", key_weighting="query"),  # the defaults
    "meanpool": dict(method="meanpool", grouping="contiguous"),
    "pca-contiguous": dict(method="pca", grouping="contiguous", key_weighting="query"),
    "pca-sequential": dict(method="pca", grouping="similarity", key_weighting="query", sequential=True),
    "pca-output": dict(method="pca", grouping="similarity", key_weighting="output"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="source folder, or 'smollm2' for the cached SmolLM2-135M-Instruct (repeatable)")
    p.add_argument("--heads", type=int, nargs="*", default=None, help="target KV heads")
    p.add_argument("--fractions", type=float, nargs="*", default=None, help="target KV heads as fractions of the source's")
    p.add_argument("--variants", nargs="*", default=["pca", "meanpool"], choices=sorted(VARIANTS))
    p.add_argument("--calib-data", default=DEFAULT_CALIBRATION, help="calibration text (default: the shipped Gutenberg books)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--eval-text", default=DEFAULT_EVAL, help="evaluation text (default: the shipped WikiText-2 test split)")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--source-ppl", type=float, default=None, help="reuse a measured source PPL (one model only)")
    p.add_argument("--extra-eval", default=None,
                   help="a second evaluation text (the reference model's held-out text): up to 64 windows of 512")
    p.add_argument("--convert-device", default="cpu", help="device that runs the calibration passes of each conversion")
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


def _ppl(folder: Path, windows: torch.Tensor, device: str, extra: torch.Tensor | None = None) -> tuple[float, float | None]:
    """(WikiText PPL, PPL on the extra text or None) of a folder loaded with plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    batch = 8 if device != "cpu" else 4
    try:
        return perplexity(model, windows, batch_size=batch), (None if extra is None else perplexity(model, extra, batch_size=batch))
    finally:
        del model
        gc.collect()


def _extra_windows(tokenizer, path: str | None) -> torch.Tensor | None:
    if path is None:
        return None
    ids = tokenizer(read_text(Path(resolve_text(path))), add_special_tokens=False)["input_ids"]
    n = min(64, len(ids) // 512)
    return eval_windows(tokenizer, PerplexityProtocol(text=path, windows=n))


def run(args) -> list[dict]:
    from transformers import AutoConfig, AutoTokenizer

    protocol = PerplexityProtocol(text=args.eval_text, windows=args.eval_windows)
    rows = []
    for spec in args.model:
        folder = _source_folder(spec)
        config = AutoConfig.from_pretrained(str(folder))
        G = config.num_key_value_heads
        targets = list(args.heads or []) + [max(1, round(G * f)) for f in (args.fractions or [])]
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        windows = eval_windows(tokenizer, protocol)
        extra = _extra_windows(tokenizer, args.extra_eval)
        t0 = time.perf_counter()
        if args.source_ppl is not None:
            source_ppl, source_extra = args.source_ppl, None
        else:
            source_ppl, source_extra = _ppl(folder, windows, args.device, extra)
        name = "SmolLM2-135M-Instruct" if spec == "smollm2" else folder.name
        print(f"{name}: source PPL {source_ppl:.3f}, extra {source_extra} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for n in targets:
            row = {"model": name, "source_kv_heads": G, "kv_heads": n, "source_ppl": source_ppl}
            if extra is not None:
                row["source_extra_ppl"] = source_extra
            for variant in args.variants:
                out = args.work / f"{folder.name}-kv{n}-{variant}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                convert(ConvertOptions(
                    source=str(folder), output=str(out), method="gqa",
                    method_options=dict(num_kv_heads=n, **VARIANTS[variant]),
                    calib=CalibOptions(data=args.calib_data, samples=args.calib_samples, seq_len=args.calib_seq_len),
                    device=args.convert_device, dtype="float32", save_dtype="float32",
                    command=f"latentkv convert {folder} {out} --to gqa --num-kv-heads {n}",
                ))
                t_conv = time.perf_counter() - t0
                ppl, ppl_extra = _ppl(out, windows, args.device, extra)
                row[f"{variant}_ppl"] = ppl
                if extra is not None:
                    row[f"{variant}_extra_ppl"] = ppl_extra
                row[f"{variant}_convert_s"] = round(t_conv, 1)
                print(f"  {n} KV heads, {variant}: PPL {ppl:.3f}, extra {ppl_extra} (convert {t_conv:.0f} s)", flush=True)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
            if "pca_ppl" in row and "meanpool_ppl" in row:
                gain = row["meanpool_ppl"] - source_ppl
                row["increase_ratio"] = (row["pca_ppl"] - source_ppl) / gain if gain > 0 else float("nan")
                row["meets_bar"] = bool(row["increase_ratio"] <= 1 / 3)
                if row.get("source_extra_ppl") is not None:
                    gain = row["meanpool_extra_ppl"] - source_extra
                    row["extra_increase_ratio"] = (row["pca_extra_ppl"] - source_extra) / gain if gain > 0 else float("nan")
            rows.append(row)
    return rows


def markdown(rows: list[dict], args) -> str:
    protocol = PerplexityProtocol(text=args.eval_text, windows=args.eval_windows)
    lines = [
        f"Protocol: {protocol.describe()}, fp32. Calibration: {Path(resolve_text(args.calib_data)).name}, "
        f"{args.calib_samples} x {args.calib_seq_len} tokens. One-shot (no training after conversion).",
    ]
    tables = [("", "increase_ratio", "WikiText-2")]
    if any(r.get("source_extra_ppl") is not None for r in rows):
        tables.append(("extra_", "extra_increase_ratio", f"{Path(args.extra_eval).name} (in-domain)"))
    for prefix, ratio_key, title in tables:
        lines += [
            "", f"Perplexity on {title}:", "",
            "| model | KV heads | source PPL | " + " | ".join(f"{v} PPL" for v in args.variants)
            + " | PCA increase / mean-pool increase |",
            "| --- | --- | --- | " + " | ".join("---" for _ in args.variants) + " | --- |",
        ]
        for r in rows:
            if r.get(f"source_{prefix}ppl") is None:
                continue
            cells = " | ".join(f"{r[f'{v}_{prefix}ppl']:.2f}" for v in args.variants)
            ratio = r.get(ratio_key)
            lines.append(f"| {r['model']} | {r['source_kv_heads']} -> {r['kv_heads']} | {r[f'source_{prefix}ppl']:.2f} | "
                         f"{cells} | {'' if ratio is None else f'{ratio:.3f}'} |")
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
