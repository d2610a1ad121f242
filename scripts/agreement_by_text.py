"""Where does a converted or healed model still differ from its source? `latentkv eval --source` on
several texts: KL(source || model) per token, top-1 agreement and both perplexities, one row per
(model, text). A student healed on one kind of text (say, the source's own samples) that agrees
with the source there but not on the evaluation text has learned the data, not the source.

    python scripts/agreement_by_text.py --source SRC --models healed/ oneshot/ \
        --texts wikitext=latentkv:wikitext2-test samples=heldout.jsonl gutenberg=BOOK.txt --out agreement.md

A text is a .txt/.raw/.jsonl file (plain or .gz) or a shipped text's name (latentkv:wikitext2-test).
`scripts/heal_agreement.sh` heals a model and then runs this on three texts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True)
    p.add_argument("--models", nargs="+", required=True, help="NAME=FOLDER or FOLDER")
    p.add_argument("--texts", nargs="+", required=True, help="NAME=PATH (.txt/.raw/.jsonl)")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", help="markdown table to write (and .json beside it)")
    args = p.parse_args()

    from latentkv.eval.report import evaluate

    def named(spec: str) -> tuple[str, str]:
        return tuple(spec.split("=", 1)) if "=" in spec else (Path(spec).name, spec)

    rows = []
    for model_name, folder in map(named, args.models):
        for text_name, path in map(named, args.texts):
            r = evaluate(folder, eval_text=path, window=args.window, windows=args.windows, batch_size=8,
                         device=args.device, source=args.source)
            a = r["agreement"]
            rows.append({"model": model_name, "text": text_name, **{k: a[k] for k in
                         ("kl_to_source", "top1_agreement", "perplexity", "source_perplexity", "tokens")}})
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"Agreement with the source ({args.source}), {args.windows} x {args.window}-token windows of each text, fp32",
             "", "| model | text | KL(source ‖ model) nats/token | top-1 agreement | PPL | source PPL | PPL / source |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['text']} | {r['kl_to_source']:.4f} | {r['top1_agreement']:.4f} | {r['perplexity']:.2f} | "
              f"{r['source_perplexity']:.2f} | {r['perplexity'] / r['source_perplexity']:.3f} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
