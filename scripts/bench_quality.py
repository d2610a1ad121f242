"""One-shot conversion quality of SmolLM2-135M-Instruct at several KV budgets, with ablations.

For each row: convert (calibrated on the shipped Gutenberg books, never WikiText), then WikiText-2
perplexity with the protocol of docs/evaluation.md (64 windows of 512 tokens, fp32). Prints a markdown table with KV values
per token per layer, % kept, perplexity, ratio to the source, conversion time and peak RSS of the
conversion (each conversion runs in its own process so time and memory are its own).

    python scripts/bench_quality.py                     # full method at 100/50/33/25% + DeepSeek format
    python scripts/bench_quality.py --ablations 0.5     # switch each piece off at 50%
    python scripts/bench_quality.py --gla --gta --budgets 0.5 1/3 0.25   # GLA-3 and GTA-T rows
    python scripts/bench_quality.py --budgets --gtas                     # GTA-S rows only
    python scripts/bench_quality.py --rows "mla:0.25:rope_loss_weight=0.3"   # any custom row
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latentkv.data import DEFAULT_CALIBRATION  # noqa: E402

DEVICE = "cpu"

# name -> (format, method options added to the budget): each switches one piece of the method off.
ABLATIONS = {
    "full method": ("latentkv", {}),
    "RoRoPE real mix (TransMLA's)": ("latentkv", {"rope_mix": "real"}),
    "no key mix across heads": ("latentkv", {"rope_mix": "none"}),
    "key energy, not query-weighted": ("latentkv", {"query_weighted": False}),
    "no RoPE shrink (drop rotation)": ("latentkv", {"shrink": False}),
    "latent: plain energy PCA": ("latentkv", {"latent_metric": "energy"}),
    "latent: TransMLA BKV balance": ("latentkv", {"latent_metric": "balanced"}),
    "latent not centred": ("latentkv", {"center": False}),
    "RoPE width fixed at 64": ("latentkv", {"qk_rope_dim": 64}),
    "per-layer budget allocation": ("latentkv", {"allocation": "per-layer"}),
    "sequential calibration": ("latentkv", {"sequential": True}),
}

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
res = convert(ConvertOptions(source=args["source"], output=args["output"], method=args["method"],
    method_options=args["options"], format=args["format"], overwrite=True, device=args["device"],
    calib=CalibOptions(data=args["calib"], samples=args["samples"], seq_len=args["seq_len"], cache=args["cache"])))
seconds = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
json.dump({"seconds": seconds, "rss_gb": rss, "kv": res.kv_values_per_token, "src_kv": res.source_kv_values_per_token,
           "notes": res.notes}, open(sys.argv[2], "w"))
"""


def convert_row(source, out, method, fmt, options, args, cache) -> dict:
    """Convert in a child process; `cache` None = calibrate from scratch (honest time and memory)."""
    result_file = Path(f"{out}.json")  # (with_suffix would cut a name like mla-0.500-123 at its dot)
    if cache is None:
        cache = f"{out}.calib"
        subprocess.run(["rm", "-rf", cache], check=True)
    payload = json.dumps({"source": str(source), "output": str(out), "method": method, "format": fmt, "options": options,
                          "calib": str(args.calib), "samples": args.samples, "seq_len": args.seq_len, "cache": cache,
                          "device": args.device})
    subprocess.run([sys.executable, "-c", CHILD, payload, str(result_file), "", str(args.threads)], check=True)
    return json.loads(result_file.read_text())


def evaluate(folder, windows: int) -> float:
    from latentkv.eval.report import evaluate as run_eval

    return run_eval(str(folder), windows=windows, device=DEVICE)["perplexity"]


def parse_rows(args) -> list[tuple[str, str, str, float | None, dict, bool]]:
    """(name, method, format, budget (None: the method's fixed width), options, fresh calibration?)."""
    rows = []
    for budget in args.budgets:
        rows.append((f"MLA {budget:.0%}", "mla", "latentkv", budget, {}, True))
        if args.deepseek:
            rows.append((f"MLA {budget:.0%} (deepseek format)", "mla", "deepseek", budget, {}, False))
        if args.gla:  # SmolLM2 has 9 query heads: 3 latent heads of 3 query heads each
            rows.append((f"GLA-3 {budget:.0%}", "gla", "latentkv", budget, {"latent_heads": 3}, False))
    if args.gta:
        rows.append(("GTA-T (3 tied states of 64 + RoPE 32)", "gta", "latentkv", None, {}, False))
    if args.gtas:  # GTA-S: map heads x 64 + value latent; the exact start, then GTA-T's and MLA 50%'s cache
        for maps, latent in ((3, 192), (1, 160), (1, 128), (3, 32)):
            rows.append((f"GTA-S ({maps} map head{'s' if maps > 1 else ''} of 64 + value latent {latent})", "gta-s",
                         "latentkv", None, {"map_heads": maps, "kv_lora_rank": latent}, False))
    for budget in args.ablations:
        for name, (fmt, extra) in ABLATIONS.items():
            if name != "full method":
                rows.append((f"{name} @ {budget:.0%}", "mla", fmt, budget, dict(extra), False))
    for spec in args.rows:
        method, budget, *settings = spec.split(":")
        options = {}
        for item in settings:
            for kv in item.split(","):
                k, _, v = kv.partition("=")
                options[k] = json.loads(v) if v[:1] in "0123456789-[{tf" and v not in ("true", "false") else (
                    v == "true" if v in ("true", "false") else v)
        budget = None if budget in ("", "-") else float(budget)  # "-": the method's fixed width (gta)
        label = "" if budget is None else f" {budget:.0%}"
        rows.append((f"{method}{label} {settings}", method, options.pop("format", "latentkv"), budget, options, False))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None, help="SmolLM2 folder (default: built from the PyPI wheel, cached)")
    p.add_argument("--budgets", type=float, nargs="*", default=[1.0, 0.5, 1 / 3, 0.25])
    p.add_argument("--deepseek", action="store_true", help="also the stock DeepSeek-V3 format at each budget")
    p.add_argument("--gla", action="store_true", help="also GLA with 3 latent heads at each budget")
    p.add_argument("--gta", action="store_true", help="also GTA-T (fixed width: a tied state per KV head)")
    p.add_argument("--gtas", action="store_true", help="also GTA-S: full start, and shared maps at 58%% / 50%%")
    p.add_argument("--device", default="cpu", help="conversion and evaluation device")
    p.add_argument("--ablations", type=float, nargs="*", default=[], help="budgets at which to switch each piece off")
    p.add_argument("--rows", nargs="*", default=[], help="extra rows METHOD:BUDGET[:k=v,k=v] (BUDGET - for gta)")
    p.add_argument("--calib", default=DEFAULT_CALIBRATION, help="calibration text (default: the shipped Gutenberg books)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=64, help="WikiText-2 windows of 512 tokens (protocol: 64)")
    p.add_argument("--source-ppl", type=float, default=None,
                   help="the source's perplexity, measured before with the same --windows (skips measuring it again)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="runs/bench_quality")
    p.add_argument("--json", default=None, help="append each row as a JSON line here")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from latentkv.io.assets import smollm2_folder

    source = Path(args.source) if args.source else smollm2_folder()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source_ppl = args.source_ppl if args.source_ppl is not None else evaluate(source, args.windows)
    print(f"source SmolLM2-135M-Instruct: WikiText-2 PPL {source_ppl:.2f} ({args.windows} x 512 tokens"
          f"{', given' if args.source_ppl is not None else ''})", flush=True)
    header = "| row | KV values / token / layer | % of source KV | WikiText-2 PPL | x source | convert time | peak RSS |"
    lines = [header, "|---|---|---|---|---|---|---|", f"| source | 384 | 100% | {source_ppl:.2f} | 1.00 | | |"]
    shared_cache = str(work / "shared.calib")
    for name, method, fmt, budget, extra, fresh in parse_rows(args):
        out = work / f"{method}-{fmt}-{budget or 0:.3f}-{abs(hash(json.dumps(extra, sort_keys=True))) % 10**8}"
        options = {**({} if budget is None else {"kv_budget": budget}), **extra}
        t0 = time.perf_counter()
        try:
            info = convert_row(source, out, method, fmt, options, args, None if fresh else shared_cache)
        except subprocess.CalledProcessError as exc:
            print(f"{name}: conversion failed ({exc})", flush=True)
            continue
        ppl = evaluate(out, args.windows)
        per_layer = info["kv"] / 30
        row = (f"| {name} | {per_layer:.0f} | {100 * info['kv'] / info['src_kv']:.0f}% | {ppl:.2f} | {ppl / source_ppl:.2f} "
               f"| {info['seconds']:.0f} s{'' if fresh else ' (cached stats)'} | {info['rss_gb']:.2f} GB |")
        lines.append(row)
        print(row, flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps({"row": name, "method": method, "format": fmt, "options": options, "ppl": ppl,
                                     "source_ppl": source_ppl, **info, "wall_s": time.perf_counter() - t0}) + "\n")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
