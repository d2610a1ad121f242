"""The history a sparse decode records, replayed over recorded dense attention maps.

``SparseAttention`` (runtime.py) records per decode step the full block masses on refresh steps
(and for every prefill token), and otherwise only the masses over the blocks the step attended: the
sparse attention's own, so they sum to 1 over those blocks, and zero on the rest
(``attended_history_row``). Which blocks a step attends is the policy's choice from the rows before
it. A predictor trained on dense maps alone sees only full rows; with ``refresh`` > 1 it decodes
from mostly partial ones. ``rollout`` replays that decode over dense maps -- the choices, the
refresh steps and the rows -- without the model, so training can read the histories the policy will
meet (``train.OnPolicyHistories``) and a policy can be scored offline (``scripts/bench_refresh_history.py``).

A map holds, per latent head, the mean of its query heads' masses; a partial row renormalises that
mean over the attended blocks. That is what the runtime records where a latent head has one query
head; with several, the runtime renormalises each query head before the mean, so the replayed row
is then an approximation (exact whenever the query heads put the same total mass on the attended
blocks). The replay also keeps the dense maps' queries at every layer: after a sparse step the
model's next queries differ a little from the dense ones (the first layer's do not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentkv.errors import LatentKVError
from latentkv.sparsity.policies import SparseConfig, choose_blocks, policy_scores
from latentkv.sparsity.runtime import attended_history_row, is_refresh_step


@dataclass
class Rollout:
    """rows [G, latent_heads, steps, N]: the history rows the decode steps recorded (zero past each
    step's blocks, as in the maps); chosen: per step the [G, k] block ids attended (k grows with the
    sequence); recall [steps, G]: the true mass inside the attended blocks (mean over latent heads)."""

    rows: torch.Tensor
    chosen: list[torch.Tensor]
    recall: torch.Tensor


@torch.no_grad()
def rollout(maps: torch.Tensor, prefill: int, steps: int, config: SparseConfig, page_size: int,
            predictor=None, first_row: int = 0) -> Rollout:
    """Replay ``steps`` decode steps of ``config`` after a dense prefill of ``prefill`` tokens.

    maps [G, latent_heads, L, N]: the dense block masses of G (sequence, layer)s, row t the masses
    of query ``first_row + t`` (zero past its block) -- a slice of longer maps needs only the rows
    the prefill leaves in the history and the decoded ones. Decode step i (1-based) is query
    ``prefill + i - 1``; it reads the rows before it (the prefill's rows are the maps' own), as
    many as the runtime keeps (the predictor's history, or one row for last-step), each cut to the
    blocks that existed at the last of them, as the runtime's history is.
    """
    keep = predictor.config.history if predictor is not None else 1
    start = prefill - first_row  # the first decoded row of ``maps``
    if prefill < 1 or start < min(keep, prefill) or start + steps > maps.shape[2]:
        raise LatentKVError(f"a rollout of {steps} steps after {prefill} prefill rows needs map rows "
                            f"{max(0, prefill - keep)} to {prefill + steps - 1}; got {first_row} to "
                            f"{first_row + maps.shape[2] - 1}.")
    maps = maps.float()
    past = maps[:, :, max(0, start - keep) : start]  # the rows the next step reads, oldest first
    rows, chosen, recall = [], [], []
    for i in range(1, steps + 1):
        t = prefill + i - 1  # the query's position
        n, n_last = t // page_size + 1, (t - 1) // page_size + 1
        k = config.blocks_for(n)
        refresh = is_refresh_step(i, config.refresh)
        full = maps[:, :, t - first_row, :n]  # [G, lh, n]
        if k >= n or (refresh and config.dense_refresh):
            ids = torch.arange(n).expand(full.shape[0], n)
        else:
            ids = choose_blocks(policy_scores(config, n, past[..., :n_last], None, predictor), k,
                                config.sink_blocks, config.local_blocks)
        kept = full.gather(-1, ids[:, None].expand(-1, full.shape[1], -1))  # [G, lh, k]
        recall.append((kept.sum(-1) / full.sum(-1).clamp_min(1e-12)).mean(-1))
        row = maps[:, :, t - first_row]
        if not (refresh or k >= n):  # a partial row: the attended masses, renormalised over them
            part = kept / kept.sum(-1, keepdim=True).clamp_min(1e-12)
            row = attended_history_row(part, ids[:, None], maps.shape[-1])
        rows.append(row[:, :, None])
        past = torch.cat([past, rows[-1]], dim=2)[:, :, -keep:]
        chosen.append(ids)
    return Rollout(torch.cat(rows, dim=2), chosen, torch.stack(recall))


def map_groups(maps: list[torch.Tensor], latent_heads: int, rows: slice) -> torch.Tensor:
    """[G, latent_heads, rows, N] float32: ``rows`` of the maps of each (window, layer) -- the
    ``latent_heads`` consecutive maps ``train.collect_maps`` gives it, which one block choice serves."""
    return torch.stack([m[rows] for m in maps]).float().view(-1, latent_heads, *maps[0][rows].shape)


def mean_recall(maps: list[torch.Tensor], latent_heads: int, config: SparseConfig, page_size: int, prefills: list[int],
                steps: int, predictor=None) -> float:
    """The true mass inside the blocks ``config`` attends, mean over the maps and the ``steps`` decode
    steps after each of ``prefills``, every step choosing from the history its own decode recorded."""
    keep = predictor.config.history if predictor is not None else 1
    total = 0.0
    for p in prefills:
        first = max(0, p - keep)
        groups = map_groups(maps, latent_heads, slice(first, p + steps))
        total += float(rollout(groups, p, steps, config, page_size, predictor, first_row=first).recall.mean())
    return total / len(prefills)
