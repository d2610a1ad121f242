"""Sparse decode policies on a real latentkv model (CPU): attention recall and the effect on the model.

For each text (held-out Gutenberg book, WikiText-2 test) and each context (prompt of --prompt
tokens prefilled densely, then --tokens teacher-forced decode steps), every policy at every budget
decodes through the paged cache (reference backend) with attention recall tracked; the results are
compared with dense decoding of the same context (top-1 agreement, KL(dense || sparse), perplexity
of the continuation). Writes a markdown table and a JSON file.

    PYTHONPATH=. python scripts/bench_sparsity.py MODEL --predictor PRED_DIR --out runs/sparsity_cpu

The texts ship with latentkv: a Gutenberg book that `latentkv predictor train --exclude
chesterton-thursday.txt` leaves out of the predictor's training, and the WikiText-2 test split.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentkv.data import CALIBRATION_TEXT, EVAL_TEXT, read_text  # noqa: E402

TEXTS = {
    "gutenberg-heldout": CALIBRATION_TEXT / "chesterton-thursday.txt.gz",
    "wikitext2-test": EVAL_TEXT,
}


def contexts(tokenizer, path: Path, count: int, length: int, skip: int) -> list[list[int]]:
    ids = tokenizer(read_text(path), add_special_tokens=False)["input_ids"]
    out = [ids[skip + i * length : skip + (i + 1) * length] for i in range(count)]
    if any(len(c) < length for c in out):
        raise SystemExit(f"{path} is too short for {count} contexts of {length} tokens after {skip}.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--predictor", help="AttentionPredictor folder (needed for the predictor policy)")
    ap.add_argument("--out", default="runs/sparsity_cpu", help="output path without suffix (.md and .json are written)")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--contexts", type=int, default=2, help="contexts per text")
    ap.add_argument("--budgets", default="0.25,0.125")
    ap.add_argument("--policies", default="window,last-step,quest,oracle,predictor")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--refresh", type=int, default=1)
    ap.add_argument("--dense-refresh", action="store_true", help="refresh steps attend to every block (SparseConfig)")
    ap.add_argument("--history-masses", default="decode", choices=("decode", "separate"),
                    help="masses of the attended blocks from the attention pass or a second PyTorch pass (SparseConfig)")
    ap.add_argument("--backend", default="reference", choices=("reference", "triton"),
                    help="decode attention backend (triton on the CPU needs TRITON_INTERPRET=1; slow)")
    ap.add_argument("--skip", type=int, default=2000, help="tokens skipped at the start of each text (headers)")
    ap.add_argument("--texts", default=",".join(TEXTS), help="which of the texts to run")
    ap.add_argument("--include", action="append", default=[],
                    help="JSON of an earlier run (same texts and contexts) whose rows join the table; repeatable")
    args = ap.parse_args()

    from tqdm import tqdm
    from transformers import AutoTokenizer

    from latentkv.modeling import load_model
    from latentkv.sparsity import POLICIES, SparseConfig
    from latentkv.sparsity.evaluate import compare_logits, decode_after, prefilled
    from latentkv.sparsity.predictor import load_predictor

    torch.manual_seed(0)
    model = load_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    predictor = load_predictor(args.predictor) if args.predictor else None
    budgets = [float(b) for b in args.budgets.split(",")]
    policies = args.policies.split(",")
    runs = [(p, b) for b in budgets for p in policies]
    rows = []
    t0 = time.perf_counter()
    for text in args.texts.split(","):
        path = TEXTS[text]
        for ci, ids in enumerate(contexts(tokenizer, path, args.contexts, args.prompt + args.tokens, args.skip)):
            targets = torch.tensor(ids[args.prompt :])
            start = prefilled(model, ids, args.prompt, page_size=args.page_size, backend=args.backend,
                              keep_history=predictor.config.history if predictor is not None else 1)
            dense, _ = decode_after(model, start, ids, args.prompt, SparseConfig("dense"))
            rows.append({"text": text, "context": ci, "policy": "dense", "budget": 1.0,
                         **compare_logits(dense, dense, targets), "attention_recall": 1.0, "blocks_attended_fraction": 1.0})
            for policy, budget in tqdm(runs, desc=f"{text} #{ci}", file=sys.stderr):
                cfg = SparseConfig(policy, budget=budget, track_recall=True, refresh=args.refresh,
                                   dense_refresh=args.dense_refresh, history_masses=args.history_masses,
                                   predictor=args.predictor if policy == "predictor" else None)
                logits, stats = decode_after(model, start, ids, args.prompt, cfg,
                                             predictor=predictor if policy == "predictor" else None)
                rows.append({"text": text, "context": ci, "policy": policy, "budget": budget,
                             **compare_logits(dense, logits, targets), **stats})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    command = "PYTHONPATH=. python " + shlex.join(sys.argv)
    commands = [(command, seconds)]
    for path in args.include:  # earlier runs: their rows (dense ones are the same numbers; keep one)
        earlier = json.loads(Path(path).read_text())
        commands.append((earlier["command"], earlier["seconds"]))
        seen = {(r["text"], r["context"], r["policy"], r["budget"]) for r in rows}
        rows += [r for r in earlier["rows"] if (r["text"], r["context"], r["policy"], r["budget"]) not in seen]
        for p in dict.fromkeys(r["policy"] for r in earlier["rows"]):
            if p not in policies and p != "dense":
                policies.append(p)

    # mean over contexts per (text, policy, budget)
    order = ["dense", *[p for p in POLICIES if p != "dense"]]
    keys = sorted({(r["text"], r["budget"], r["policy"]) for r in rows}, key=lambda k: (k[0], -k[1], order.index(k[2])))
    table = []
    for text, budget, policy in keys:
        sel = [r for r in rows if (r["text"], r["budget"], r["policy"]) == (text, budget, policy)]
        mean = lambda f: sum(r[f] for r in sel) / len(sel)  # noqa: E731
        table.append({"text": text, "budget": budget, "policy": policy, "attention_recall": mean("attention_recall"),
                      "blocks_attended_fraction": mean("blocks_attended_fraction"),
                      "top1_agreement": mean("top1_agreement"), "kl_to_dense": mean("kl_to_dense"),
                      "perplexity": __import__("math").exp(mean("nll"))})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "seconds": seconds, "rows": rows,
                                                    "table": table, "commands": commands}, indent=1))
    lines = [
        "# Sparse decode policies on CPU (SmolLM2-135M converted to MLA)", "",
        *[f"Command: `{c}` ({t:.0f} s)." for c, t in commands], "",
        f"Each text: {args.contexts} contexts of {args.prompt} prompt tokens (dense prefill) + {args.tokens} "
        f"teacher-forced decode steps; pages (blocks) of {args.page_size} tokens; the sink block and the current "
        f"block always kept; history refreshed densely every {args.refresh} step(s)"
        f"{' (refresh steps attend to every block)' if args.dense_refresh else ''}; masses of the attended blocks "
        f"from {'the attention pass' if args.history_masses == 'decode' else 'a second PyTorch pass'} "
        f"({args.backend} backend). Recall: true attention mass "
        "inside the chosen blocks (mean over layers, latent heads, steps); agreement / KL against dense decoding "
        "of the same context; perplexity of the decoded continuation tokens.", "",
        "| text | budget | policy | blocks attended | attention recall | top-1 agreement | KL(dense‖sparse) | perplexity |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table:
        lines.append(f"| {r['text']} | {r['budget']:g} | {r['policy']} | {r['blocks_attended_fraction']:.3f} | "
                     f"{r['attention_recall']:.4f} | {r['top1_agreement']:.4f} | {r['kl_to_dense']:.4f} | {r['perplexity']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
