"""Quest's page bounds on a real model, checked by brute force and compared with other page scores.

Decodes the last --span tokens of a --context-tokens excerpt teacher-forced under the quest policy;
at every decode step and layer it computes, from this step's query (W_UK folded in) and cache rows
(absorbed latent + rotated RoPE key):

* per page and query head, the true largest score and the Quest bound sum_j max(q_j min_j, q_j max_j)
  (counted: bound violations, which must be 0);
* the attention recall (true mass, mean over heads, inside the chosen pages) of the top-k choice by
  several page scores: the largest bound over heads (``max_raw``), the head-mean of the per-head
  softmax of the scaled bounds (``mean_softmax``, what the quest policy uses), the same with the
  true page maxima instead of bounds (``truemax_softmax``: a perfect bound), and the true masses
  (``oracle``); overall and per layer.

    PYTHONPATH=. python scripts/quest_bound_check.py MODEL --context-tokens 512 --span 8 --budget 0.125
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--text", default="chesterton-thursday")
    ap.add_argument("--skip", type=int, default=2000)
    ap.add_argument("--context-tokens", type=int, default=512)
    ap.add_argument("--span", type=int, default=8)
    ap.add_argument("--budget", type=float, default=0.125)
    ap.add_argument("--out", help="JSON file for the results")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from latentkv.modeling import load_model
    from latentkv.runtime.decode import forward_step, latent_attentions
    from latentkv.sparsity import SparseConfig
    from latentkv.sparsity.evaluate import prefilled, sparse_copy
    from latentkv.sparsity.long_context import read_long_text
    from latentkv.sparsity.masses import block_masses, paged_rows
    from latentkv.sparsity.policies import choose_blocks, head_bounds

    model = load_model(args.model)
    latent_attentions(model)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(read_long_text(args.text), add_special_tokens=False)["input_ids"][args.skip : args.skip + args.context_tokens]
    n_tok = len(ids)
    start = prefilled(model, ids, n_tok - args.span, page_size=16, keep_history=1)
    cache, seq, _, sparse = sparse_copy(start, SparseConfig("quest", budget=args.budget))
    recall, per_layer, violations = {}, {}, [0, 0]
    select = sparse.select

    def checked(module, q, kv, step):
        length, size = int(step["seq_lens"][0]), sparse.page_size
        n = -(-length // size)
        pages = step["block_table"][0, :n]
        rows = paged_rows(kv, pages, length).float()
        geometry = dict(latent_heads=module.latent_heads, rope_dim=module.rope_dim, scale=module.scaling,
                        page_size=size)
        true = block_masses(q[0].float(), rows, **geometry)[0]  # [latent_heads, n]
        qf = q[0, 0].float()
        heads, lh, rope = qf.shape[0], module.latent_heads, module.rope_dim
        r_c = qf.shape[1] - rope
        score = torch.empty(length, heads)
        for h in range(heads):
            c = h // (heads // lh)
            score[:, h] = rows[:, c * r_c : (c + 1) * r_c] @ qf[h, :r_c] + rows[:, lh * r_c :] @ qf[h, r_c:]
        page_max = torch.nn.functional.pad(score, (0, 0, 0, n * size - length), value=-1e30).view(n, size, -1).amax(1)
        low = torch.stack([rows[j * size : (j + 1) * size].amin(0) for j in range(n)])
        high = torch.stack([rows[j * size : (j + 1) * size].amax(0) for j in range(n)])
        bound = head_bounds(qf, low, high, lh, rope)  # [n, H]
        violations[0] += int((page_max > bound + 1e-4 * bound.abs().clamp(min=1)).sum())
        violations[1] += page_max.numel()
        s = module.scaling
        scores = {"max_raw": bound.max(-1).values, "mean_softmax": torch.softmax(s * bound, 0).mean(-1),
                  "truemax_softmax": torch.softmax(s * page_max, 0).mean(-1), "oracle": true.mean(0)}
        k = sparse.config.blocks_for(n)
        for name, sc in scores.items():
            kept = float(true[:, choose_blocks(sc, k)].sum(-1).mean())
            recall.setdefault(name, []).append(kept)
            per_layer.setdefault(name, {}).setdefault(module.layer_idx, []).append(kept)
        return select(module, q, kv, step)

    sparse.select = checked
    with torch.no_grad():
        for t in range(n_tok - args.span, n_tok - 1):
            forward_step(model, cache, [seq], torch.tensor([[ids[t]]]))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    result = {"command": "PYTHONPATH=. python " + " ".join(sys.argv), "violations": violations[0],
              "page_head_pairs": violations[1], "recall": {k: mean(v) for k, v in recall.items()},
              "recall_per_layer": {k: [mean(v[layer]) for layer in sorted(v)] for k, v in per_layer.items()}}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
