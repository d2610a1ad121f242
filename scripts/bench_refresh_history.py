"""Recall of the next step's attention under sparse refreshes, scored offline over dense maps.

With a dense refresh every R decode steps (``SparseConfig.refresh``), the history a policy reads
holds the full block masses only on refresh steps and the attended blocks' masses otherwise. This
script replays such decodes over recorded dense maps (``latentkv.sparsity.histories.rollout``:
every policy chooses from the history its own decode recorded) and reports the true mass inside the
chosen blocks (recall), mean over maps and decode steps, per policy and budget.

1. maps: dense block-mass maps of --train-windows windows of the training text (--exclude left out,
   --repeats spans copied as in `latentkv predictor train`) and --val-windows windows of the held-out
   book (--val-text); cached in --maps-dir (train_maps.pt, val_maps.pt) and reused.
2. --train OUT: fit a predictor (``keep_last_step``) on the train maps with the histories of its own
   decode at --train-refresh (default --refresh) and --train-budget (``train.fit(refresh=...)``), save
   it in OUT.
3. score last-step and every --predictor on the val maps at --budgets under --refresh; --out writes
   .md and .json.

    PYTHONPATH=. python scripts/bench_refresh_history.py runs/smollm2-mla-1.0 --maps-dir runs/refresh_maps \\
        --train runs/predictor_refresh4 --predictor runs/predictor_refresh4 --out runs/refresh_history
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def collect(model_dir: str, data: str, exclude: list[str], windows: int, seq_len: int, repeats: int, seed: int):
    from latentkv.io.source import open_source
    from latentkv.modeling import load_model
    from latentkv.sparsity.train import collect_maps, training_windows, with_repeats

    source = open_source(model_dir)
    model = load_model(source.folder)
    ids = training_windows(source.tokenizer(), data, tuple(exclude), windows, seq_len, seed)
    ids = with_repeats(ids, repeats, 48, seed)
    return collect_maps(model, ids, 16, progress=lambda i: print(f"  window {i + 1}/{windows}", flush=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="latentkv-format MLA folder the maps are collected from")
    ap.add_argument("--maps-dir", required=True)
    ap.add_argument("--data", default="latentkv:gutenberg")
    ap.add_argument("--exclude", default="chesterton-thursday.txt")
    ap.add_argument("--val-text", default="latentkv/data/gutenberg/chesterton-thursday.txt.gz")
    ap.add_argument("--train-windows", type=int, default=4)
    ap.add_argument("--val-windows", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--refresh", type=int, default=4)
    ap.add_argument("--budgets", default="0.125,0.0625")
    ap.add_argument("--predictor", action="append", default=[], help="predictor folder to score; repeatable")
    ap.add_argument("--train", help="fit a predictor on the replayed histories and save it here")
    ap.add_argument("--train-budget", type=float, default=0.125)
    ap.add_argument("--train-refresh", type=int, help="the refresh of the training histories (default --refresh; "
                                                         "1: dense histories, the training before --refresh)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--objective", default="ce")
    ap.add_argument("--starts", type=int, default=8, help="prefill lengths scored per val map")
    ap.add_argument("--decode-steps", type=int, default=64, help="decode steps replayed after each")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()

    from latentkv.sparsity.histories import mean_recall
    from latentkv.sparsity.policies import SparseConfig
    from latentkv.sparsity.predictor import PredictorConfig, load_predictor, save_predictor
    from latentkv.sparsity.train import Replay, fit

    t0 = time.perf_counter()
    folder = Path(args.maps_dir)
    folder.mkdir(parents=True, exist_ok=True)
    maps = {}
    for name, data, exclude, windows, repeats in (
            ("train", args.data, [args.exclude], args.train_windows, args.repeats),
            ("val", args.val_text, [], args.val_windows, 0)):
        path = folder / f"{name}_maps.pt"
        if not path.exists():
            print(f"collecting {name} maps", flush=True)
            torch.save(collect(args.model, data, exclude, windows, args.seq_len, repeats, args.seed), path)
        maps[name] = torch.load(path)
    t_maps = time.perf_counter() - t0
    budgets = [float(b) for b in args.budgets.split(",")]
    length = maps["val"][0].shape[0]

    if args.train:
        t1 = time.perf_counter()
        model, report = fit(maps["train"], maps["val"], PredictorConfig(history=16, channels=8, page_size=16),
                            steps=args.steps, batch_size=128, lr=3e-3, budget=args.train_budget, seed=args.seed,
                            objective=args.objective, refresh=args.train_refresh or args.refresh,
                            report_budgets=tuple(budgets),
                            progress=lambda s, loss: s % 25 == 0 and print(f"  step {s}: loss {loss:.4f}", flush=True),
                            replay=Replay())
        report["seconds"] = time.perf_counter() - t1
        trained_on = {"command": "python " + " ".join(sys.argv),
                      **{k: v for k, v in vars(args).items() if k not in ("predictor", "out")}}
        save_predictor(model, args.train, extra={"trained_on": {**trained_on, "maps": len(maps["train"])},
                                                 "report": report})
        print(f"trained in {report['seconds']:.0f} s: {json.dumps(report['val_recall'])}", flush=True)

    # the same prefill lengths for every policy: spread over the map, room for the replayed steps
    prefills = torch.linspace(16, length - args.decode_steps, args.starts).long().tolist()
    run = dict(maps=maps["val"], latent_heads=1, page_size=16, prefills=prefills, steps=args.decode_steps)
    rows = []
    t2 = time.perf_counter()
    for budget in budgets:
        rows.append({"budget": budget, "policy": "last-step",
                     "recall": mean_recall(**run, config=SparseConfig("last-step", budget, refresh=args.refresh))})
        for folder_name in args.predictor:
            predictor = load_predictor(folder_name)
            cfg = SparseConfig("predictor", budget, refresh=args.refresh, predictor=folder_name)
            rows.append({"budget": budget, "policy": f"predictor {folder_name}",
                         "recall": mean_recall(**run, config=cfg, predictor=predictor)})
        for row in rows[-1 - len(args.predictor):]:
            print(f"budget {budget}: {row['policy']}: recall {row['recall']:.4f}", flush=True)
    facts = {"command": "python " + " ".join(sys.argv), "val_maps": len(maps["val"]), "train_maps": len(maps["train"]),
             "map_rows": length, "prefills": prefills, "decode_steps": args.decode_steps, "refresh": args.refresh,
             "seconds": {"maps": t_maps, "score": time.perf_counter() - t2}, "rows": rows}
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(facts, indent=1))
        lines = ["| budget | policy | recall |", "| --- | --- | --- |"]
        lines += [f"| {r['budget']} | {r['policy']} | {r['recall']:.4f} |" for r in rows]
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
