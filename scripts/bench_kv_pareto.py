#!/usr/bin/env python
"""Quantize the KV cache, convert it to a latent, or both: WikiText-2 perplexity against KV bytes.

The source model is evaluated with its cache stored in each of --source-formats (quantization only),
and one-shot MLA conversions of it (`latentkv convert SRC OUT --kv-budget B`) with their latent and
RoPE key stored in each of --latent-formats. Each evaluation reads, for every query, the keys and
values a streaming cache in that format holds after writing the query's token (`latentkv eval
--kv-cache`, one forward per window): per-token formats quantized on write, per-channel (KIVI) groups
quantized once complete, the unfinished group (KIVI's residual) at full precision; keys after RoPE.
Bytes per token per layer count codes, scales and zero-points. The agreement with the source (KL per token,
top-1) is taken against the source's fp32 logits on the same windows.

Outputs PREFIX.md (table, frontier comparison), PREFIX.json (every row) and PREFIX.png (Pareto plot:
log KV bytes against log perplexity, both frontiers drawn). Rows already in PREFIX.json are reused,
so a long run can be split.

Examples:
  python scripts/bench_kv_pareto.py --out benchmarks/kv_pareto_smollm2_cpu --eval-windows 16
  python scripts/bench_kv_pareto.py --source path/to/model --budgets 0.5 0.33 0.25 0.125 --device cuda \\
      --eval-windows 64 --out benchmarks/kv_pareto_mymodel
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from latentkv.errors import LatentKVError  # noqa: E402
from latentkv.eval.agreement import compare_logits  # noqa: E402
from latentkv.eval.perplexity import PerplexityProtocol, eval_windows  # noqa: E402
from latentkv.eval.quantized_cache import (cache_bytes, quantized_logits, streaming_logits,  # noqa: E402
                                           transformers_quantized_logits)
from latentkv.kvformats import cache_parts, describe_formats, parse_cache_formats  # noqa: E402
from latentkv.modeling import load_model  # noqa: E402

# label -> --kv-cache spec. The source: one format for keys and values, or KIVI (per-channel keys).
SOURCE_FORMATS = {
    "bf16": "bf16",
    "fp8_e4m3": "fp8_e4m3",
    "int8/head": "int8/head",
    "int4/g32": "int4/g32",
    "int4 KIVI": "keys=int4/channel32,values=int4/g32",
    "int2/g32": "int2/g32",
    "int2 KIVI": "keys=int2/channel32,values=int2/g32",
    # the low end of quantization only: int3, and int2 KIVI with coarser scale groups (fewer scale bytes)
    "int3 KIVI": "keys=int3/channel32,values=int3/g32",
    "int3 KIVI, k128 v/head": "keys=int3/channel128,values=int3/head",
    "int2 KIVI, v/head": "keys=int2/channel32,values=int2/head",
    "int2 KIVI, k64 v/head": "keys=int2/channel64,values=int2/head",
    "int2 KIVI, k128 v/head": "keys=int2/channel128,values=int2/head",
    "int2 KIVI, k128 v/token": "keys=int2/channel128,values=int2/token",
    # KIVI proper: the newest values kept at full precision too, in a residual as long as a key group
    "int2 KIVI, v residual": "keys=int2/channel32,values=int2/g32",
    "int2 KIVI, k128 v/head, v residual": "keys=int2/channel128,values=int2/head",
    "int4 KIVI, v residual": "keys=int4/channel32,values=int4/g32",
    "int2 KIVI, v/head, v residual": "keys=int2/channel32,values=int2/head",
    "int2 KIVI, k64 v/head, v residual": "keys=int2/channel64,values=int2/head",
    "int2 KIVI, k128 v/token, v residual": "keys=int2/channel128,values=int2/token",
}
# rows whose per-token values also keep an unfinished block of this many newest tokens at full precision
VALUE_RESIDUAL = {"int2 KIVI, v residual": 32, "int2 KIVI, k128 v/head, v residual": 128, "int4 KIVI, v residual": 32,
                  "int2 KIVI, v/head, v residual": 32, "int2 KIVI, k64 v/head, v residual": 64,
                  "int2 KIVI, k128 v/token, v residual": 128}
# A latentkv model: the latent's format, the RoPE key in bf16 (as FlashMLA stores DeepSeek's), or both quantized.
# A one-shot latent has outlier channels (per-channel spread of 30x or more, values past fp8's 448), so
# scaled fp8 and per-channel (KIVI-style) integer groups are listed beside the per-token ones.
LATENT_FORMATS = {
    "bf16": "bf16",
    "fp8_e4m3 + bf16 RoPE": "latent=fp8_e4m3,rope=bf16",
    "fp8_e4m3/g128 + bf16 RoPE": "latent=fp8_e4m3/g128,rope=bf16",
    "int8/head + bf16 RoPE": "latent=int8/head,rope=bf16",
    "int4/g32 + bf16 RoPE": "latent=int4/g32,rope=bf16",
    "int4 KIVI + bf16 RoPE": "latent=int4/channel32,rope=bf16",
    "int4/g32": "int4/g32",
    "int2/g32 + bf16 RoPE": "latent=int2/g32,rope=bf16",
    "int2 KIVI + bf16 RoPE": "latent=int2/channel32,rope=bf16",
    # the RoPE key quantized too (after RoPE, as the source's keys): unscaled fp8, or per channel as KIVI keys
    "int4 KIVI + fp8_e4m3 RoPE": "latent=int4/channel32,rope=fp8_e4m3",
    "int4 KIVI + int4 KIVI RoPE": "latent=int4/channel32,rope=int4/channel32",
    "int4 KIVI k64 + int4 KIVI k64 RoPE": "latent=int4/channel64,rope=int4/channel64",
    "int4 KIVI k128 + int4 KIVI k128 RoPE": "latent=int4/channel128,rope=int4/channel128",
    "int3 KIVI + int4 KIVI RoPE": "latent=int3/channel32,rope=int4/channel32",
    "int2 KIVI + int4 KIVI RoPE": "latent=int2/channel32,rope=int4/channel32",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None, help="source model folder (default: SmolLM2-135M-Instruct, built once)")
    p.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.25], help="MLA --kv-budget values")
    p.add_argument("--sequential-budgets", type=float, nargs="*", default=[],
                   help="MLA --kv-budget values converted with --sequential --set refit_output=true (the best one-shot "
                        "settings: each layer calibrated on the converted layers before it, the output projection refit)")
    p.add_argument("--targets", nargs="*", default=[], choices=list(OTHER_TARGETS),
                   help="other one-shot conversions: gqa1 (GQA with one KV head), gta (GTA-T)")
    p.add_argument("--work", type=Path, default=Path("runs/kv_pareto"), help="where converted models are kept")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--eval-window", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--source-formats", nargs="*", default=list(SOURCE_FORMATS), choices=list(SOURCE_FORMATS))
    p.add_argument("--latent-formats", nargs="*", default=list(LATENT_FORMATS), choices=list(LATENT_FORMATS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True, help="output prefix: PREFIX.md, PREFIX.json, PREFIX.png")
    p.add_argument("--report-only", action="store_true", help="rewrite PREFIX.md and PREFIX.png from PREFIX.json")
    p.add_argument("--merge", type=Path, nargs="*", default=[], metavar="JSON",
                   help="add the rows (and commands) of these outputs of parallel runs, same protocol, to PREFIX.json "
                        "and rewrite the report")
    p.add_argument("--hf-check", type=int, default=0, metavar="WINDOWS",
                   help="also run the source's int4 / int2 rows through transformers' QuantizedCache (optimum-quanto "
                        "backend) and through latentkv's cache on the first WINDOWS windows, and report both")
    p.add_argument("--hf-check-formats", nargs="*", default=list(HF_CHECKS), choices=list(HF_CHECKS))
    return p.parse_args(argv)


EVALUATION_NOTE = ("per-token formats quantized on write (a token reads its own row quantized), per-channel (KIVI) "
                   "groups quantized on the write that completes them, the unfinished group (KIVI's residual) read at "
                   "full precision; this equals a token-by-token decode loop through the same cache")


# Conversions besides MLA at --budgets: --targets NAME -> (row label, folder name, convert options, formats).
# A GQA output caches keys and values as the source does (the source's formats apply); GTA-T caches a
# latent and a RoPE key.
OTHER_TARGETS = {
    "gqa1": ("GQA 1 KV head", "gqa-1", ["--to", "gqa", "--num-kv-heads", "1"], "source"),
    "gta": ("GTA-T", "gta", ["--to", "gta"], "latent"),
}


SEQUENTIAL_OPTIONS = ["--sequential", "--set", "refit_output=true"]


def converted(source: Path, budget: float | None, args, target: str | None = None, sequential: bool = False) -> Path:
    """The one-shot conversion (MLA at `budget`, or an OTHER_TARGETS entry), made with the CLI unless already there."""
    if target is None and sequential:
        out, options = args.work / f"mla-seq-{budget:g}", ["--kv-budget", f"{budget:g}", *SEQUENTIAL_OPTIONS]
    elif target is None:
        out, options = args.work / f"mla-{budget:g}", ["--kv-budget", f"{budget:g}"]
    else:
        _, folder, options, _ = OTHER_TARGETS[target]
        out = args.work / folder
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "-m", "latentkv.cli", "convert", str(source), str(out), *options,
               "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return out


@torch.no_grad()
def reference_logprobs(model, windows, batch_size, device) -> list[torch.Tensor]:
    """The source's fp32 next-token log-probabilities per batch (computed once, compared with every row)."""
    out = []
    for start in range(0, windows.shape[0], batch_size):
        logits = model(windows[start : start + batch_size].to(device), use_cache=False).logits
        out.append(torch.log_softmax(logits[:, :-1].float(), -1).cpu())
    return out


@torch.no_grad()
def measure(model, formats, windows, reference, batch_size, device, residual: int = 0) -> dict:
    vocab = model.config.vocab_size
    sums, tokens, t0 = {"kl": 0.0, "top1_agreement": 0.0, "nll": 0.0}, 0, time.perf_counter()
    for i, start in enumerate(range(0, windows.shape[0], batch_size)):
        batch = windows[start : start + batch_size].to(device)
        logits = streaming_logits(model, batch, formats, residual=residual)[:, :-1, :vocab].float().cpu()
        r = compare_logits(reference[i][..., :vocab].reshape(-1, vocab), logits.reshape(-1, vocab),
                           batch[:, 1:].reshape(-1).cpu())
        for key in sums:
            sums[key] += r[key] * r["tokens"]
        tokens += r["tokens"]
    stored = cache_bytes(model, formats)
    return {
        "cache": describe_formats(formats),
        "kv_bytes_per_token_per_layer": stored.per_token_per_layer,
        "kv_bytes_per_token": stored.per_token,
        "perplexity": math.exp(sums["nll"] / tokens),
        "kl_to_source": sums["kl"] / tokens,
        "top1_agreement": sums["top1_agreement"] / tokens,
        "tokens": tokens,
        "evaluation": "one pass" + (f", values with a {residual}-token residual" if residual else ""),
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --hf-check: the source's integer rows against transformers' own QuantizedCache (optimum-quanto backend).
# label -> (our --kv-cache spec, quanto nbits, axis_key, axis_value). quanto's axis 0 groups q_group_size
# consecutive values of one token and head (our /g32); axis -1 groups q_group_size consecutive tokens of one
# channel (KIVI's per-channel keys, our /channel32).
HF_CHECKS = {
    "int4/g32": ("int4/g32", 4, 0, 0),
    "int2/g32": ("int2/g32", 2, 0, 0),
    "int4 KIVI": (SOURCE_FORMATS["int4 KIVI"], 4, -1, 0),
    "int2 KIVI": (SOURCE_FORMATS["int2 KIVI"], 2, -1, 0),
}
HF_GROUP = 32  # q_group_size and residual_length of the transformers runs, and their prefill


@torch.no_grad()
def hf_quantized_check(model, windows, parts, batch_size, device, names) -> list[dict]:
    """Perplexity of the source through transformers' QuantizedCache (quanto; one group of prefill, then one
    token per forward, as generate() feeds it) and through latentkv's evaluation of the matching format on the
    same windows: as the table measures it, with transformers' residual rules (values kept in the residual too,
    the completing token reading its group unquantized), and the earlier chunked rule (32 tokens per forward)."""
    out = []
    readings = {
        "latentkv": lambda batch, formats: streaming_logits(model, batch, formats),
        "latentkv_matched": lambda batch, formats: streaming_logits(model, batch, formats, residual=HF_GROUP,
                                                                     quantize_after_read=True),
        "latentkv_chunked": lambda batch, formats: quantized_logits(model, batch, formats, HF_GROUP),
    }
    for name in names:
        spec, nbits, axis_key, axis_value = HF_CHECKS[name]
        formats = parse_cache_formats(spec, parts)
        row = {"format": name, "ours_cache": describe_formats(formats), "nbits": nbits, "axis_key": axis_key,
               "axis_value": axis_value, "q_group_size": HF_GROUP, "residual_length": HF_GROUP}
        readings["transformers"] = lambda batch, formats: transformers_quantized_logits(
            model, batch, nbits=nbits, axis_key=axis_key, axis_value=axis_value, group=HF_GROUP)
        for who in ("transformers", "latentkv", "latentkv_matched", "latentkv_chunked"):
            nll, tokens, t0 = 0.0, 0, time.perf_counter()
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size].to(device)
                logits = readings[who](batch, formats)
                nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                               batch[:, 1:].reshape(-1), reduction="sum"))
                tokens += batch[:, 1:].numel()
            row[f"{who}_perplexity"] = math.exp(nll / tokens)
            row[f"{who}_seconds"] = round(time.perf_counter() - t0, 1)
        row["windows"] = int(windows.shape[0])
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def frontier(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both bytes and perplexity, by bytes."""
    best, out = math.inf, []
    for row in sorted(rows, key=lambda r: (r["kv_bytes_per_token_per_layer"], r["perplexity"])):
        if row["perplexity"] < best:
            best = row["perplexity"]
            out.append(row)
    return out


def best_within(rows: list[dict], budget: float):
    fitting = [r for r in rows if r["kv_bytes_per_token_per_layer"] <= budget + 1e-9]
    return min(fitting, key=lambda r: r["perplexity"]) if fitting else None


def label(row: dict) -> str:
    return f"{row['model']} {row['format']}"


def comparison(rows: list[dict], source_bytes: float) -> list[dict]:
    """At each byte level a row reaches: the best quantization-only and the best latentkv row that fit."""
    quant = [r for r in rows if r["family"] == "quantization only"]
    latent = [r for r in rows if r["family"] == "latentkv"]
    levels = sorted({r["kv_bytes_per_token_per_layer"] for r in rows if r["kv_bytes_per_token_per_layer"] <= source_bytes})
    out = []
    for b in levels:
        q, m = best_within(quant, b), best_within(latent, b)
        leader = None
        if q and m:
            leader = "latentkv" if m["perplexity"] < q["perplexity"] else "quantization only"
        out.append({"bytes": b, "fraction": b / source_bytes, "quant": q, "latent": m, "leader": leader})
    return out


def fmt_ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


def write_markdown(path: Path, rows, meta) -> None:
    source_bytes = meta["source_bf16_bytes_per_token_per_layer"]
    lines = [
        f"# KV cache: quantize, convert, or both ({meta['model_name']})",
        "",
        f"Perplexity: {meta['protocol']}, fp32 compute{meta['windows_note']}. Each row reads, for every query, the "
        "keys and values a streaming cache in the given format holds right after writing the query's token "
        f"(`latentkv eval --kv-cache`, one forward per window; keys after RoPE): {meta['evaluation_note']}. "
        "KV bytes: per token per layer, codes plus scales and zero-points (`latentkv/kvformats.py`). "
        "KL and top-1: agreement with the source's fp32 logits on the same tokens. MLA, GQA and GTA-T rows: one-shot "
        f"`latentkv convert SRC OUT --kv-budget B --calib-samples {meta['calib_samples']} --calib-seq-len "
        f"{meta['calib_seq_len']}` (default calibration text), no training. KIVI rows: per-channel keys in groups "
        "of 32 tokens (k64 / k128: 64 / 128 tokens), a KIVI latent or RoPE key likewise per channel, the unfinished "
        "group read at full precision and not counted in the bytes (KIVI's residual: larger groups leave more of a "
        "512-token window unquantized, which flatters k128 rows a little), values per token in groups of 32 (v/head: "
        "one group per token and head, v/token: one per token over all heads), quantized on write; `v residual` "
        "rows keep the values of the unfinished key group at full precision too, as KIVI and transformers' "
        "QuantizedCache do (their bytes count every value quantized, as the keys' residual is not counted). "
        "The RoPE key is the one the cache holds, after RoPE; `fp8_e4m3 RoPE` is "
        "unscaled float8 (no scale bytes), `int4 KIVI RoPE` int4 per channel over 32 tokens. int3 codes are packed "
        "densely (8 codes in 3 bytes).",
        "",
        "| model | cache format | stored as | KV B / token / layer | of source bf16 | PPL | KL to source | top-1 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: (r["family"] != "quantization only", r["model"], -r["kv_bytes_per_token_per_layer"])):
        lines.append(f"| {r['model']} | {r['format']} | {r['cache']} | {r['kv_bytes_per_token_per_layer']:.1f} | "
                     f"{100 * r['kv_bytes_per_token_per_layer'] / source_bytes:.1f}% | {fmt_ppl(r['perplexity'])} | "
                     f"{r['kl_to_source']:.3g} | {r['top1_agreement']:.3f} |")
    lines += ["", "## Frontiers", "",
              "At each byte level some row reaches (up to the source's bf16 cache): the lowest perplexity of each "
              f"family within it. Source bf16 = {source_bytes:.0f} B; 1/6 of it = {source_bytes / 6:.0f} B.", "",
              "| KV B / token / layer | of source bf16 | best quantization only | PPL | best latentkv | PPL | leads | PPL ratio (other / leader) |",
              "| ---: | ---: | --- | ---: | --- | ---: | --- | ---: |"]
    for c in comparison(rows, source_bytes):
        q, m = c["quant"], c["latent"]
        ratio = ""
        if q and m:
            ratio = f"{max(q['perplexity'], m['perplexity']) / min(q['perplexity'], m['perplexity']):.2f}x"
        lines.append(f"| {c['bytes']:.1f} | {100 * c['fraction']:.1f}% | {label(q) if q else 'none fits'} | "
                     f"{fmt_ppl(q['perplexity']) if q else ''} | {label(m) if m else 'none fits'} | "
                     f"{fmt_ppl(m['perplexity']) if m else ''} | {c['leader'] or ''} | {ratio} |")
    lines += ["", "## Where each family leads", "", *verdict(rows, source_bytes)]
    check_path = Path(f"{path.with_suffix('')}_hf_check.json")
    if check_path.is_file():
        lines += ["", *hf_check_section(json.loads(check_path.read_text()))]
    lines += ["", *meta.get("notes", [])] if meta.get("notes") else []  # free text kept in PREFIX.json's meta
    lines += ["", "Commands:", "", "```", *meta["commands"], "```", ""]
    path.write_text("\n".join(lines))


def _ratio(c) -> float:
    return max(c["quant"]["perplexity"], c["latent"]["perplexity"]) / min(c["quant"]["perplexity"], c["latent"]["perplexity"])


def verdict(rows, source_bytes) -> list[str]:
    """The byte ranges where each family leads (consecutive byte levels of the frontier table with the
    same leader), with the range of PPL ratios, and whether the bar (latentkv ahead at every budget up
    to 1/6 of the source's bf16 bytes) holds."""
    ranges = []
    for c in comparison(rows, source_bytes):
        state = c["leader"] or ("latentkv only" if c["latent"] else "quantization only, no latentkv row")
        if ranges and ranges[-1]["state"] == state:
            ranges[-1]["levels"].append(c)
        else:
            ranges.append({"state": state, "levels": [c]})
    lines = ["| KV B / token / layer | leads | PPL ratio (other / leader) | rows at the ends of the range |",
             "| --- | --- | --- | --- |"]
    for r in ranges:
        lo, hi = r["levels"][0], r["levels"][-1]
        span = f"{lo['bytes']:.1f}" if lo is hi else f"{lo['bytes']:.1f} - {hi['bytes']:.1f}"
        both = [c for c in r["levels"] if c["quant"] and c["latent"]]
        ratios = sorted(_ratio(c) for c in both)
        ratio = "" if not ratios else (f"{ratios[0]:.2f}x" if ratios[0] == ratios[-1] else f"{ratios[0]:.2f}x - {ratios[-1]:.2f}x")
        state = "latentkv (no quantization-only row fits)" if r["state"] == "latentkv only" else r["state"]
        ends = "; ".join(dict.fromkeys(
            f"{label(c['latent'])} {fmt_ppl(c['latent']['perplexity'])}" + (
                f" vs {label(c['quant'])} {fmt_ppl(c['quant']['perplexity'])}" if c["quant"] else "")
            for c in (lo, hi) if c["latent"]))
        lines.append(f"| {span} | {state} | {ratio} | {ends} |")
    bar = source_bytes / 6
    low = [c for c in comparison(rows, source_bytes) if c["bytes"] <= bar + 1e-9]
    lost = [c for c in low if c["leader"] == "quantization only"]
    empty = [c for c in low if c["latent"] and not c["quant"]]
    won = [c for c in low if c["leader"] == "latentkv"]
    lines.append("")
    if lost:
        lines.append(f"The bar (latentkv ahead at every budget up to {bar:.0f} B) is NOT met: quantization only leads at "
                     f"{len(lost)} of the {len(low)} byte levels up to {bar:.0f} B: "
                     + "; ".join(f"{c['bytes']:.1f} B ({label(c['quant'])} {fmt_ppl(c['quant']['perplexity'])} against "
                                 f"{label(c['latent'])} {fmt_ppl(c['latent']['perplexity'])}, {_ratio(c):.2f}x)"
                                 for c in lost)
                     + (f". latentkv leads at {len(won)} ("
                        + ", ".join(f"{c['bytes']:.1f} B" for c in won) + ")" if won else "")
                     + (f"; at {len(empty)} ({empty[0]['bytes']:.1f} - {empty[-1]['bytes']:.1f} B) no quantization-only "
                        "row fits, so latentkv leads there by default, not by comparison" if empty else "") + ".")
    elif not won:
        lines.append(f"The bar (latentkv ahead at every budget up to {bar:.0f} B) holds only by default: no "
                     f"quantization-only row fits at or below {bar:.0f} B, so no latentkv row there is compared with one.")
    else:
        lines.append(f"The bar (latentkv ahead at every budget up to {bar:.0f} B) is met on these rows: latentkv leads a "
                     f"quantization-only row at {len(won)} of the {len(low)} byte levels up to {bar:.0f} B"
                     + (f" ({won[0]['bytes']:.1f} - {won[-1]['bytes']:.1f} B)" if won else "")
                     + (f"; at the other {len(empty)} ({empty[0]['bytes']:.1f} - {empty[-1]['bytes']:.1f} B) no "
                        "quantization-only row fits at all, so latentkv leads there by default, not by comparison"
                        if empty else "") + ".")
    return lines


def hf_check_section(check: dict) -> list[str]:
    rows = check["rows"]
    n = rows[0]["windows"] if rows else 0
    lines = ["## Cross-check: transformers' QuantizedCache",
             "",
             f"The source's integer rows on the first {n} window{'s' if n > 1 else ''}, through transformers' "
             f"`QuantizedCache(backend=\"quanto\", nbits, axis_key, axis_value, q_group_size={HF_GROUP}, "
             f"residual_length={HF_GROUP})` (optimum-quanto; the first {HF_GROUP} tokens in one forward, then one token "
             "per forward, as generate() feeds it) and through latentkv's evaluation of the matching format. quanto's "
             f"axis 0 groups {HF_GROUP} consecutive values of one token and head (latentkv's /g32), axis -1 {HF_GROUP} "
             "consecutive tokens of one channel (KIVI keys, latentkv's /channel32). transformers keeps the newest keys "
             "and values (up to 32) at full precision and quantizes them after the step that fills the residual, which "
             "reads them unquantized; it re-quantizes the dequantized cache at each flush and keeps float32 scales and "
             "zero-points (latentkv stores float16, rounded outward). Columns: `latentkv` is the table's evaluation "
             "(per-token values quantized on write, a completed key group quantized before the completing token "
             "reads it); `matched` the same with transformers' rules (values kept in a 32-token residual too, the "
             "completing token reading its group unquantized: `streaming_logits(..., residual=32, "
             "quantize_after_read=True)`); `chunked` the earlier evaluation, 32 tokens per forward, each chunk reading "
             "the group it completes quantized.",
             "",
             "| format | latentkv cache | quanto nbits, axis_key, axis_value | transformers PPL | latentkv PPL | matched PPL | chunked PPL |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['ours_cache']} | {r['nbits']}, {r['axis_key']}, {r['axis_value']} | "
                     f"{fmt_ppl(r['transformers_perplexity'])} | {fmt_ppl(r['latentkv_perplexity'])} | "
                     f"{fmt_ppl(r['latentkv_matched_perplexity'])} | {fmt_ppl(r['latentkv_chunked_perplexity'])} |")
    if "source_fp32_perplexity" in check:
        lines += ["", f"The source with no cache quantization on the same window{'s' if n > 1 else ''}: PPL "
                      f"{fmt_ppl(check['source_fp32_perplexity'])} (`{check.get('source_fp32_command', '')}`)."]
    lines += ["", "```", check["command"], "```"]
    return lines


def plot(path: Path, rows, meta) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as exc:
        raise LatentKVError("The Pareto plot needs matplotlib: pip install 'latentkv[bench]'") from exc
    source_bytes = meta["source_bf16_bytes_per_token_per_layer"]
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=130)
    # a row far off (a broken format) would squash the rest: the axis stops at 12x the source's perplexity
    # and such a row sits on the top edge with its value in the label
    top = min(max(r["perplexity"] for r in rows) * 1.15, 12 * meta["source_perplexity"])
    shown = lambda r: min(r["perplexity"], top / 1.08)  # noqa: E731
    markers = {}
    for r in rows:
        markers.setdefault(r["model"], "os^Dvp*hX<>P"[len(markers) % 12])
    colors = {"quantization only": "tab:orange", "latentkv": "tab:blue"}
    for model, marker in markers.items():
        pts = [r for r in rows if r["model"] == model]
        ax.scatter([r["kv_bytes_per_token_per_layer"] for r in pts], [shown(r) for r in pts], marker=marker,
                   s=36, color=colors[pts[0]["family"]], alpha=0.75, label=model, zorder=3)
    # only the rows on a frontier are labelled (the others are in the table); neighbours by bytes take
    # turns above and below their marker, so close labels do not overlap
    on_frontier = [r for family in colors for r in frontier([x for x in rows if x["family"] == family])]
    for i, r in enumerate(sorted(on_frontier, key=lambda r: (r["kv_bytes_per_token_per_layer"], r["perplexity"]))):
        text = r["format"] if r["perplexity"] < top / 1.08 else f"{r['format']} (PPL {r['perplexity']:.3g}, off scale)"
        ax.annotate(text, (r["kv_bytes_per_token_per_layer"], shown(r)), fontsize=6,
                    xytext=(3, (5, -9, 12, -16)[i % 4]), textcoords="offset points", color="0.25")
    for family, color in colors.items():
        f = frontier([r for r in rows if r["family"] == family])
        if f:
            xs = [r["kv_bytes_per_token_per_layer"] for r in f]
            ys = [shown(r) for r in f]
            ax.step(xs, ys, where="post", color=color, lw=1.6, label=f"{family} frontier", zorder=2)
    ax.axvline(source_bytes / 6, color="0.5", ls="--", lw=0.9, label="1/6 of source bf16 bytes")
    ax.axhline(meta["source_perplexity"], color="0.5", ls=":", lw=0.9, label="source fp32 PPL")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(min(r["perplexity"] for r in rows) * 0.85, top)
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    ax.tick_params(which="minor", labelsize=7)
    ax.set_xlabel("KV cache bytes per token per layer (codes + scales), log")
    ax.set_ylabel("WikiText-2 perplexity, log")
    ax.set_title(f"{meta['model_name']}: quantized cache vs MLA latent x cache format\n{meta['protocol']}, fp32",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.merge:
        merge(args.out, args.merge)
        return
    if args.report_only:
        if not args.out.with_suffix(".json").is_file():
            raise SystemExit(f"--report-only rewrites the report of {args.out.with_suffix('.json')}, which does not exist; "
                             "run without --report-only first")
        recorded = json.loads(args.out.with_suffix(".json").read_text())
        write_outputs(args.out, recorded["rows"], recorded["meta"])
        return
    if args.source is None:
        from latentkv.io.assets import smollm2_folder

        source, model_name = smollm2_folder(), "SmolLM2-135M-Instruct"
    else:
        source = Path(args.source)
        model_name = source.name
    # every format spec checked before any conversion or evaluation
    from transformers import AutoConfig

    parts = tuple(dict.fromkeys(p for layer in cache_parts(AutoConfig.from_pretrained(source)) for p in layer))
    source_formats = {k: parse_cache_formats(SOURCE_FORMATS[k], parts) for k in args.source_formats}
    latent_formats = {k: parse_cache_formats(LATENT_FORMATS[k], ("latent", "rope")) for k in args.latent_formats}

    from transformers import AutoTokenizer

    protocol = PerplexityProtocol(window=args.eval_window, windows=args.eval_windows)
    windows = eval_windows(AutoTokenizer.from_pretrained(str(source)), protocol)
    json_path = args.out.with_suffix(".json")
    done, commands = {}, []
    if json_path.is_file():
        previous = json.loads(json_path.read_text())
        if previous["meta"]["protocol"] == protocol.describe():
            done = {(r["model"], r["format"]): r for r in previous["rows"]}
            commands = previous["meta"].get("commands", [])
    command = "python " + " ".join(["scripts/bench_kv_pareto.py", *map(shlex.quote, sys.argv[1:])])
    commands = [*commands, command] if command not in commands else commands
    rows = list(done.values())

    src_model = load_model(source, dtype=torch.float32, device=args.device)
    if args.hf_check:
        check = hf_quantized_check(src_model, windows[: args.hf_check], parts, args.batch_size, args.device,
                                   args.hf_check_formats)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}_hf_check.json").write_text(json.dumps({"command": command, "rows": check}, indent=1))
        if json_path.is_file():
            recorded = json.loads(json_path.read_text())
            write_outputs(args.out, recorded["rows"], recorded["meta"])
        return
    reference = reference_logprobs(src_model, windows, args.batch_size, args.device)
    source_nll = -sum(float(ref.gather(-1, windows[i * args.batch_size : (i + 1) * args.batch_size, 1:, None]).sum())
                      for i, ref in enumerate(reference))
    source_ppl = math.exp(source_nll / windows[:, 1:].numel())
    plan = [("source", "quantization only", lambda: src_model, source_formats)]
    for b in args.budgets:  # converted when first needed
        plan.append((f"MLA {100 * b:g}%", "latentkv",
                     lambda b=b: load_model(converted(source, b, args), dtype=torch.float32, device=args.device),
                     latent_formats))
    for b in args.sequential_budgets:
        plan.append((f"MLA {100 * b:g}% sequential + refit", "latentkv",
                     lambda b=b: load_model(converted(source, b, args, sequential=True), dtype=torch.float32,
                                            device=args.device),
                     latent_formats))
    for t in args.targets:
        plan.append((OTHER_TARGETS[t][0], "latentkv",
                     lambda t=t: load_model(converted(source, None, args, t), dtype=torch.float32, device=args.device),
                     source_formats if OTHER_TARGETS[t][3] == "source" else latent_formats))
    for name, family, get_model, formats in plan:
        todo = {k: f for k, f in formats.items() if (name, k) not in done}
        if not todo:
            continue
        model = get_model()
        for key, fmt in todo.items():
            row = {"model": name, "family": family, "format": key, **measure(model, fmt, windows, reference,
                                                                              args.batch_size, args.device,
                                                                              VALUE_RESIDUAL.get(key, 0))}
            print(json.dumps(row), flush=True)
            rows.append(row)
            save(args, rows, model_name, protocol, source_ppl, json_path, commands)
    save(args, rows, model_name, protocol, source_ppl, json_path, commands)


def save(args, rows, model_name, protocol, source_ppl, json_path, commands) -> None:
    source_bf16 = [r for r in rows if r["model"] == "source" and r["format"] == "bf16"]
    meta = {
        "model_name": model_name,
        "protocol": protocol.describe(),
        "windows_note": windows_note(args.eval_windows),
        "source_perplexity": source_ppl,
        "source_bf16_bytes_per_token_per_layer": source_bf16[0]["kv_bytes_per_token_per_layer"] if source_bf16 else None,
        "evaluation_note": EVALUATION_NOTE,
        "calib_samples": args.calib_samples,
        "calib_seq_len": args.calib_seq_len,
        "commands": commands,  # every run whose rows are in the file (a run reuses the rows already there)
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if source_bf16:  # a run of other rows only (to be merged) writes its PREFIX.json alone
        write_outputs(args.out, rows, meta)


def windows_note(windows: int) -> str:
    if windows == 64:
        return ""
    return (f" ({windows} windows, not the protocol's 64: {windows * 511} predicted tokens per row, so perplexities a few "
            "percent apart are within the noise of the sample, and the protocol's 64 windows may move every row)")


def merge(out: Path, others: list[Path]) -> None:
    """Rows of parallel runs (other PREFIX.json files of the same protocol) added to out's PREFIX.json."""
    json_path = out.with_suffix(".json")
    recorded = json.loads(json_path.read_text())
    rows = {(r["model"], r["format"]): r for r in recorded["rows"]}
    for other in others:
        data = json.loads(Path(other).read_text())
        if data["meta"]["protocol"] != recorded["meta"]["protocol"]:
            raise SystemExit(f"{other}: protocol {data['meta']['protocol']!r}, not {recorded['meta']['protocol']!r}")
        rows.update({(r["model"], r["format"]): r for r in data["rows"]})
        commands = recorded["meta"]["commands"]
        commands += [c.replace(str(Path(other).with_suffix("")), str(out)) for c in data["meta"]["commands"]
                     if c.replace(str(Path(other).with_suffix("")), str(out)) not in commands]
    recorded["rows"] = list(rows.values())
    recorded["meta"]["windows_note"] = windows_note(int(re.search(r"(\d+) x", recorded["meta"]["protocol"]).group(1)))
    json_path.write_text(json.dumps(recorded, indent=1))
    write_outputs(out, recorded["rows"], recorded["meta"])


def write_outputs(out: Path, rows, meta) -> None:
    write_markdown(out.with_suffix(".md"), rows, meta)
    plot(out.with_suffix(".png"), rows, meta)


if __name__ == "__main__":
    main()
