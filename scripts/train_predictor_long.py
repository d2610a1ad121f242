"""Train the AttentionPredictor for long-context sparse decode: long training windows, a top-k
recall objective, validation recall at the decode budgets.

1. collect: --windows windows of --seq-len tokens from latentkv's Gutenberg set, leaving out
   --exclude (the evaluation book), prefilled through the paged decode path with a recording
   ``SparseAttention``: row t of a map is the full block masses of query t -- what the run-time
   history holds with a refresh every step (``SparseConfig.refresh=1``, the setting the benchmark
   decodes with). The maps are cached in --maps.
2. fit one predictor per --objectives ("ce": cross-entropy to the masses; "recall": the mass kept
   by a soft top-k at --budget, ``latentkv.sparsity.train._loss``), report validation recall of the
   predictor and of last-step at every --report-budgets, save each under --out/OBJECTIVE.

    PYTHONPATH=. python scripts/train_predictor_long.py MODEL --out runs/predictor_long
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--maps", help="cache file of the collected maps (reused when present)")
    ap.add_argument("--data", default="latentkv:gutenberg")
    ap.add_argument("--exclude", action="append", default=["chesterton-thursday.txt"])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--history", type=int, default=16)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--budget", type=float, default=0.125)
    ap.add_argument("--report-budgets", default="0.125,0.0625")
    ap.add_argument("--objectives", default="ce,recall")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from latentkv.modeling import load_model
    from latentkv.runtime.decode import latent_attentions
    from latentkv.sparsity.predictor import PredictorConfig, save_predictor
    from latentkv.sparsity.train import collect_maps, fit, training_windows

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    maps_path = Path(args.maps) if args.maps else None
    n_val = max(1, args.windows // 8)
    if maps_path is not None and maps_path.exists():
        maps = torch.load(maps_path)
    else:
        model = load_model(args.model)
        latent_attentions(model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        windows = training_windows(tokenizer, args.data, tuple(args.exclude), args.windows, args.seq_len, args.seed)
        maps = collect_maps(model, windows, 16, progress=lambda i: print(f"window {i + 1}/{args.windows} "
                                                                         f"{time.perf_counter() - t0:.0f} s", flush=True))
        if maps_path is not None:
            torch.save(maps, maps_path)
    collect_s = time.perf_counter() - t0
    per_window = len(maps) // args.windows
    train_maps, val_maps = maps[: -n_val * per_window], maps[-n_val * per_window :]
    config = PredictorConfig(history=args.history, channels=args.channels, page_size=16)
    budgets = tuple(float(b) for b in args.report_budgets.split(","))
    results = {}
    for objective in args.objectives.split(","):
        t = time.perf_counter()
        predictor, report = fit(train_maps, val_maps, config, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                budget=args.budget, seed=args.seed, objective=objective, report_budgets=budgets)
        report["fit_seconds"] = time.perf_counter() - t
        report["collect_seconds"] = collect_s
        report["parameters"] = sum(p.numel() for p in predictor.parameters())
        trained_on = {k: v for k, v in vars(args).items() if k not in ("out", "maps")}
        trained_on["maps"] = len(train_maps)
        save_predictor(predictor, Path(args.out) / objective, extra={"trained_on": trained_on, "report": report})
        results[objective] = {k: v for k, v in report.items() if k != "loss_curve"}
        print(json.dumps({objective: results[objective]}), flush=True)


if __name__ == "__main__":
    main()
