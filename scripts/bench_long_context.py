"""Sparse decode at long context on a real latentkv model (CPU): passkey retrieval and the
teacher-forced comparison with dense decoding, for every policy at every budget.

1. Retrieval (``latentkv.sparsity.retrieval``): a pass key inserted at each --depths of a book
   excerpt of --retrieval-contexts tokens (instruction + haystack + "What is the pass key? The pass
   key is"); the text before the question prefilled densely, the question and the greedy answer
   decoded under the policy; exact match of the digits.
2. Teacher-forced (``latentkv.sparsity.long_context``): --contexts excerpts of --context-tokens
   tokens, the last --span decoded teacher-forced after a dense prefill of the rest: KL(dense ||
   sparse), top-1 agreement, perplexity of the span, pages read per layer-step and, with --offload
   (default), the forecast's misses of an offloaded cache whose pools hold what the budget attends.

    PYTHONPATH=. python scripts/bench_long_context.py MODEL --predictor PRED_DIR \\
        --out benchmarks/long_context_smollm2_cpu

The text is a book of latentkv's Gutenberg set that the predictor's training left out
(`latentkv predictor train --exclude chesterton-thursday.txt`); the teacher-forced excerpts and the
retrieval haystack are disjoint parts of it. Rows are written to the JSON as they finish.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--predictor", help="AttentionPredictor folder (needed for the predictor policy)")
    ap.add_argument("--out", default="runs/long_context_cpu", help="output path without suffix (.md, .json)")
    ap.add_argument("--text", default="chesterton-thursday", help="a book of latentkv's Gutenberg set, or a file")
    ap.add_argument("--context-tokens", type=int, default=4096, help="tokens per teacher-forced context")
    ap.add_argument("--span", type=int, default=64, help="tokens decoded teacher-forced at the end of each context")
    ap.add_argument("--contexts", type=int, default=2, help="teacher-forced contexts (disjoint excerpts)")
    ap.add_argument("--retrieval-contexts", default="4096", help="comma-separated retrieval prompt lengths")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--budgets", default="0.125,0.0625")
    ap.add_argument("--policies", default="window,last-step,quest,predictor,oracle")
    ap.add_argument("--needles", type=int, default=1, help="pass keys per depth (a different key each)")
    ap.add_argument("--task", choices=["passkey", "numbers"], default="passkey",
                    help="retrieval task: a pass key to answer, or a run of numbers to continue (numbers_case)")
    ap.add_argument("--chat", action="store_true", help="retrieval prompt in the tokenizer's chat template (passkey)")
    ap.add_argument("--key-digits", type=int, default=5, help="digits of each pass key")
    ap.add_argument("--question-in-prefill", action="store_true",
                    help="prefill the question densely too (only the answer is decoded under the policy)")
    ap.add_argument("--first-context", type=int, default=0, help="index of the first teacher-forced excerpt")
    ap.add_argument("--sink-blocks", type=int, default=1)
    ap.add_argument("--local-blocks", type=int, default=1)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--skip", type=int, default=2000, help="tokens skipped at the start of the text (front matter)")
    ap.add_argument("--no-offload", action="store_true", help="decode through the paged cache (no miss counts)")
    ap.add_argument("--per-head", action="store_true",
                    help="GLA (several latent heads): each latent head chooses its own pages (as `latentkv eval "
                         "--sparse-per-head`)")
    ap.add_argument("--recall", action="store_true", help="also track attention recall (a dense score pass per step)")
    ap.add_argument("--refresh", type=int, default=1,
                    help="the policy's history row is the full (dense) page masses every REFRESH decode steps, "
                         "else the masses over the attended pages only (SparseConfig.refresh)")
    ap.add_argument("--dense-refresh", action="store_true",
                    help="a refresh step attends to every page (its output is dense attention, its masses give the "
                         "history row), so no separate dense pass is needed (SparseConfig.dense_refresh)")
    ap.add_argument("--skip-teacher-forced", action="store_true")
    ap.add_argument("--skip-retrieval", action="store_true")
    ap.add_argument("--include", action="append", default=[],
                    help="JSON of another run of this script (e.g. the other half, run in parallel) whose rows and "
                         "command join the output; repeatable")
    args = ap.parse_args()
    if args.refresh < 1:
        ap.error(f"--refresh must be >= 1 decode steps; got {args.refresh}.")

    from transformers import AutoTokenizer

    from latentkv.modeling import load_model
    from latentkv.runtime.decode import latent_attentions
    from latentkv.sparsity import SparseConfig
    from latentkv.sparsity.long_context import long_text_compare, parse_depths, read_long_text
    from latentkv.sparsity.predictor import load_predictor
    from latentkv.sparsity.retrieval import make_key, needle_case, numbers_case, retrieval_start, retrieve

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_model(args.model)
    latent_attentions(model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    predictor = load_predictor(args.predictor) if args.predictor else None
    budgets = [float(b) for b in args.budgets.split(",")]
    policies = [p for p in args.policies.split(",") if p != "predictor" or predictor is not None]
    configs = [SparseConfig(p, budget=b, track_recall=args.recall, predictor=args.predictor if p == "predictor" else None,
                            sink_blocks=args.sink_blocks, local_blocks=args.local_blocks, per_latent_head=args.per_head,
                            refresh=args.refresh, dense_refresh=args.dense_refresh)
               for b in budgets for p in policies]
    offload = not args.no_offload
    depths = parse_depths(args.depths)
    lengths = [int(x) for x in args.retrieval_contexts.split(",")]
    ids = tokenizer(read_long_text(args.text), add_special_tokens=False)["input_ids"]
    need = args.skip + (args.first_context + args.contexts) * args.context_tokens + max(lengths)
    if len(ids) < need:
        raise SystemExit(f"{args.text} has {len(ids)} tokens; this run needs {need}.")
    command = "PYTHONPATH=. python " + shlex.join(sys.argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "model": Path(args.model).name, "text": args.text, "text_tokens": len(ids),
              "skip": args.skip,
              "context_tokens": args.context_tokens, "span": args.span, "contexts": args.contexts,
              "retrieval_contexts": lengths, "depths": depths, "page_size": args.page_size, "offload": offload,
              "predictor": args.predictor, "needles": args.needles, "chat": args.chat, "key_digits": args.key_digits,
              "task": args.task,
              "question_in_prefill": args.question_in_prefill, "sink_blocks": args.sink_blocks,
              "local_blocks": args.local_blocks, "recall": args.recall, "per_head": args.per_head,
              "refresh": args.refresh, "dense_refresh": args.dense_refresh,
              "teacher_forced": [], "retrieval": [], "seconds": {}}

    def save():
        (out.parent / (out.name + ".json")).write_text(json.dumps(result, indent=1))

    def pred_for(cfg):
        return predictor if cfg.policy == "predictor" else None

    t0 = time.perf_counter()
    if not args.skip_retrieval:  # the haystack: the part of the text after the teacher-forced excerpts
        hay = ids[args.skip + (args.first_context + args.contexts) * args.context_tokens :]
        for length in lengths:
          for needle in range(args.needles):
            for i, depth in enumerate(depths):
                seed = 1000 * needle + int(round(1000 * depth))  # the key of a (needle, depth), whatever the run
                if args.task == "numbers":
                    case = numbers_case(tokenizer, hay, context_tokens=length, depth=depth, seed=seed,
                                        digits=args.key_digits)
                else:
                    case = needle_case(tokenizer, hay, context_tokens=length, depth=depth,
                                       key=make_key(seed, args.key_digits), chat=args.chat)
                start = retrieval_start(model, case, page_size=args.page_size, predictor=predictor, offload=offload,
                                        question_in_prefill=args.question_in_prefill)
                for cfg in [SparseConfig("dense"), *configs]:
                    t = time.perf_counter()
                    row = retrieve(model, tokenizer, case, cfg, start=start, page_size=args.page_size,
                                   predictor=pred_for(cfg), offload=offload,
                                   question_in_prefill=args.question_in_prefill)
                    row["needle"] = needle
                    row["seconds"] = time.perf_counter() - t
                    result["retrieval"].append(row)
                    print(json.dumps({k: row[k] for k in ("context_tokens", "depth", "policy", "budget", "answer",
                                                          "match")}), file=sys.stderr, flush=True)
                    save()
    result["seconds"]["retrieval"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    if not args.skip_teacher_forced:
        for c in range(args.first_context, args.first_context + args.contexts):
            a = args.skip + c * args.context_tokens
            window = ids[a : a + args.context_tokens]
            rows = long_text_compare(model, window, args.context_tokens - args.span, configs,
                                     page_size=args.page_size, predictor=predictor, offload=offload)
            for r in rows:
                result["teacher_forced"].append(tagged({"context": c, **r}, result))
                print(json.dumps({k: r.get(k) for k in ("policy", "budget", "kl_to_dense", "top1_agreement",
                                                        "attention_recall")}),
                      file=sys.stderr, flush=True)
            save()
    result["seconds"]["teacher_forced"] = time.perf_counter() - t1
    # a run that measures nothing (both parts skipped) only merges its --include files
    result["commands"] = [] if args.skip_teacher_forced and args.skip_retrieval else [[command, result["seconds"]]]
    for other in args.include:
        earlier = json.loads(Path(other).read_text())
        result["commands"] += earlier.get("commands", [[earlier["command"], earlier["seconds"]]])
        result["retrieval"] += earlier["retrieval"]
        result["teacher_forced"] += [tagged(r, earlier) for r in earlier["teacher_forced"]]
    save()
    write_markdown(result, out.parent / (out.name + ".md"))
    print((out.parent / (out.name + ".md")).read_text())


def tagged(row: dict, run: dict) -> dict:
    """A teacher-forced row with the run settings that tell it apart from rows merged from other runs:
    the predictor folder (predictor rows) and the refresh regime (not on the dense row; runs before
    --refresh existed refreshed densely every step)."""
    if row["policy"] == "dense":
        return row
    row.setdefault("predictor", run.get("predictor") if row["policy"] == "predictor" else None)
    row.setdefault("refresh", run.get("refresh", 1))
    row.setdefault("dense_refresh", run.get("dense_refresh", False))
    return row


def refresh_regime(result: dict) -> str:
    """The history regime in words (runs before --refresh existed refreshed densely every step)."""
    r = result.get("refresh", 1)
    if r == 1:
        return ("every decode step attends densely (refresh 1, dense refresh)" if result.get("dense_refresh")
                else "history refreshed densely every step")
    if result.get("dense_refresh"):
        return (f"every {r}th decode step attends densely (its output is dense attention and its page masses are "
                f"the history row), the other steps attend sparsely and record the masses of their attended pages "
                f"only (refresh {r}, dense refresh)")
    return (f"history refreshed densely every {r} steps by a separate dense score pass, the other steps record the "
            f"masses of their attended pages only (refresh {r})")


def write_markdown(result: dict, path: Path) -> None:
    order = ["dense", "window", "last-step", "quest", "predictor", "oracle"]
    rank = lambda r: (-r["budget"], order.index(r["policy"]) if r["policy"] in order else 99,  # noqa: E731
                      r.get("per_latent_head", False))
    label = lambda policy, per_head: policy + (" (per head)" if per_head else "")  # noqa: E731
    sparse_rows = [r for r in result["teacher_forced"] if r["policy"] != "dense"]
    regimes = sorted({(r.get("refresh", 1), r.get("dense_refresh", False)) for r in sparse_rows})
    predictors = {r.get("predictor") for r in sparse_rows if r["policy"] == "predictor"}
    lines = [f"# Sparse decode at long context on CPU ({result.get('model', 'a latentkv model')})", ""]
    for command, secs in result.get("commands", [[result["command"], result["seconds"]]]):
        lines.append(f"Command: `{command}` (retrieval {secs.get('retrieval', 0):.0f} s, teacher-forced "
                     f"{secs.get('teacher_forced', 0):.0f} s).")
    lines += [
        "",
        f"Text: `{result['text']}` of latentkv's Gutenberg set ({result['text_tokens']} tokens; the first "
        f"{result['skip']} skipped), a book the predictor's training left out. Pages of {result['page_size']} tokens; "
        f"the first {result.get('sink_blocks', 1)} (sink) and the last {result.get('local_blocks', 1)} pages (the current "
        "page last) always kept; "
        + (refresh_regime(result) if len(regimes) <= 1 else "the history regime of each teacher-forced row in its "
           "label (" + "; ".join(f"refresh {r}{', dense refresh' if d else ''}: "
                                  + refresh_regime({"refresh": r, "dense_refresh": d}) for r, d in regimes) + ")")
        + "; reference backend; "
        + ("decode through an offloaded cache (host pages, per-layer pools of the slots the budget attends + 2)."
           if result["offload"] else "decode through the paged cache."), "",
    ]
    if result["retrieval"]:
        depths = sorted({r["depth"] for r in result["retrieval"]})
        chat = result.get("chat")
        if result.get("task") == "numbers":
            intro = [
                "## Retrieval: continuing a run of numbers", "",
                f"Four random {result.get('key_digits', 5)}-digit numbers (\"The numbers are A B C D.\") at depths "
                f"{', '.join(f'{d:g}' for d in depths)} of the haystack (different numbers per needle and depth); the "
                "prompt ends with \"The numbers are A\" and the answer must be B. "
                + ("The whole prompt is prefilled densely; the greedy answer is decoded under the policy. "
                   if result.get("question_in_prefill") else
                   "The text before \"The numbers are A\" is prefilled densely; that line and the greedy answer "
                   "are decoded under the policy. ")
                + "Score: exact match of the first number in the answer; cells: matches / needles.", ""]
        else:
            intro = [
                "## Passkey retrieval", "",
                f"A {result.get('key_digits', 5)}-digit pass key (\"The pass key is K. Remember it. K is the pass key.\") at depths "
                f"{', '.join(f'{d:g}' for d in depths)} of the haystack (a different key per needle and depth), after a "
                "one-line instruction and before "
                + ("\"What is the pass key?\", all in one user turn of the tokenizer's chat template, the assistant's turn "
                   "begun with \"The pass key is\". " if chat else "\"What is the pass key? The pass key is\". ")
                + ("The whole prompt is prefilled densely; the greedy answer is decoded under the policy. "
                   if result.get("question_in_prefill") else
                   "The text before the question is prefilled densely; the question and the greedy answer are decoded "
                   "under the policy. ")
                + "Score: exact match of the first number in the answer; cells: matches / needles.", ""]
        lines += intro + [
            "| context | budget | policy | " + " | ".join(f"depth {d:g}" for d in depths) + " | matches |",
            "| --- | --- | --- | " + " | ".join("---" for _ in depths) + " | --- |",
        ]
        rkey = lambda r: (r["context_tokens"], r["budget"], r["policy"], r.get("per_latent_head", False))  # noqa: E731
        keys = sorted({rkey(r) for r in result["retrieval"]},
                      key=lambda k: (k[0], -k[1], order.index(k[2]) if k[2] in order else 99, k[3]))
        for length, budget, policy, per_head in keys:
            sel = [r for r in result["retrieval"] if rkey(r) == (length, budget, policy, per_head)]
            cells = []
            for d in depths:
                at = [r for r in sel if r["depth"] == d]
                cells.append(f"{sum(bool(r['match']) for r in at)}/{len(at)}" if at else "-")
            n = sum(bool(r["match"]) for r in sel)
            lines.append(f"| {length} | {budget:g} | {label(policy, per_head)} | " + " | ".join(cells)
                         + f" | {n}/{len(sel)} |")
        lines.append("")
    if result["teacher_forced"]:
        lines += [
            "## Teacher-forced comparison with dense decoding", "",
            f"{result['contexts']} disjoint excerpts of {result['context_tokens']} tokens: "
            f"{result['context_tokens'] - result['span']} prefilled densely, the last {result['span']} decoded "
            "teacher-forced. Means over the excerpts (perplexity: exp of the mean NLL of the span tokens). Pages read: "
            "per layer and step, of "
            f"{math.ceil(result['context_tokens'] / result['page_size'])} at the end of the span. Misses: pages the "
            "offloaded cache's forecast (made a step ahead) did not have resident, per layer-step.", "",
            "| budget | policy | pages read / step | KL(dense‖sparse) | top-1 agreement | perplexity | forecast misses / step | miss fraction |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        rows = result["teacher_forced"]
        tkey = lambda r: (r["budget"], r["policy"], r.get("per_latent_head", False),  # noqa: E731
                          r.get("predictor") or "", r.get("refresh", 1) if r["policy"] != "dense" else 0,
                          r.get("dense_refresh", False) if r["policy"] != "dense" else False)
        for key in sorted({tkey(r) for r in rows},
                          key=lambda k: (rank({"budget": k[0], "policy": k[1], "per_latent_head": k[2]}), k[3:])):
            budget, policy, per_head, pred, refresh, dense_refresh = key
            sel = [r for r in rows if tkey(r) == key]
            name = label(policy, per_head) + (f" (`{Path(pred).name}`)" if len(predictors) > 1 and pred else "")
            if len(regimes) > 1 and policy != "dense":
                name += f", refresh {refresh}" + (" dense" if dense_refresh else "")
            mean = lambda f: sum(f(r) for r in sel) / len(sel)  # noqa: E731
            off = [r.get("offload") for r in sel]
            miss = (f"{mean(lambda r: r['offload']['misses_per_step']):.2f} | "
                    f"{mean(lambda r: r['offload']['miss_fraction']):.3f}") if all(off) else "- | -"
            lines.append(f"| {budget:g} | {name} | {mean(lambda r: r['blocks_per_decision']):.1f} | "
                         f"{mean(lambda r: r['kl_to_dense']):.4f} | {mean(lambda r: r['top1_agreement']):.4f} | "
                         f"{math.exp(mean(lambda r: r['nll'])):.3f} | {miss} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
