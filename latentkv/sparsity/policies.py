"""Which KV blocks (cache pages) a decode step attends to: the budget, the forced blocks, the policies.

Every policy scores the blocks of one (sequence, layer); ``choose_blocks`` keeps the forced blocks
(the first ``sink_blocks`` -- attention sinks -- and the last ``local_blocks``, which include the
block holding the current token) and fills the rest of the budget with the best-scored blocks.

| policy | score of a block | needs |
| --- | --- | --- |
| dense | (all blocks kept) | nothing |
| window | recency (StreamingLLM: sinks + the most recent blocks) | nothing |
| last-step | its attention mass at the previous step | the history |
| quest | per query head, the largest score any key inside the block's bounding box could give this step's query (Quest: per block the element-wise min / max of its cache rows, in the absorbed latent + RoPE space); the block's score is the head-mean of the softmax over blocks of the scaled bounds | the query + per-block bounds (kept by the runtime, updated per new block) |
| oracle | its attention mass at this step (the upper bound; costs a dense QK pass) | this step's masses |
| predictor | the AttentionPredictor's forecast from the last T steps | the history + a trained predictor |

The scores above are the mean over the latent heads (one page set for all of them). With
``SparseConfig.per_latent_head`` a GLA model (latent_heads > 1) scores and chooses the blocks of each
latent head from that head's own forecast (its history row, its query heads' bounds, its masses), the
same number for every head; the decode kernel then reads a block table per latent head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from latentkv.errors import LatentKVError

POLICIES = ("dense", "window", "last-step", "quest", "oracle", "predictor")
HISTORY_MASSES = ("decode", "separate")


@dataclass(frozen=True)
class SparseConfig:
    """How sparse decode picks blocks.

    policy: one of POLICIES.
    budget: blocks attended per step: a fraction of the sequence's blocks in (0, 1) (rounded up),
        or a whole number of blocks >= 1 (a float like 16.0 counts as blocks). Never fewer than the
        forced blocks; a sequence with fewer blocks than the budget attends to all of them.
    sink_blocks / local_blocks: always kept: the first blocks, and the last blocks (the last one
        holds the current token). 1 / 1 by default (the sink and the current block).
    refresh: the history row of a step is the full (dense) block masses every ``refresh`` decode
        steps and the masses over the attended blocks otherwise (zero elsewhere), as in the paper's
        "calibration" steps. 1 = a dense QK pass every step (exact history).
    dense_refresh: a refresh step attends to every block (its output is dense attention), so its
        full masses come from that same attention pass; False: it attends to the chosen blocks
        and the full masses cost a separate dense QK pass.
    history_masses: where the masses of the attended blocks come from. "decode": the decode
        attention itself returns them (``return_masses``: per-page log-sum-exps written by the
        Triton kernel, or the reference backend's probabilities), so only a refresh step without
        ``dense_refresh`` (and oracle / track_recall) needs a separate pass; "separate": a second
        PyTorch pass over the attended pages (``masses.block_masses``, the reference).
    predictor: folder of a trained AttentionPredictor (policy "predictor").
    track_recall: also compute this step's true masses to record the attention recall (cost: a
        dense QK pass per step; for measurement).
    per_latent_head: models with latent_heads > 1 (GLA): each latent head gets its own blocks, chosen
        from its own scores (the budget and forced blocks apply per head), attended through a block table
        per latent head; each head's history row covers its own blocks. No effect with one latent head.
    """

    policy: str = "dense"
    budget: float = 0.25
    sink_blocks: int = 1
    local_blocks: int = 1
    refresh: int = 1
    predictor: str | None = None
    track_recall: bool = False
    dense_refresh: bool = False
    history_masses: str = "decode"
    per_latent_head: bool = False

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise LatentKVError(f"unknown sparse policy {self.policy!r}; choose one of {', '.join(POLICIES)}.")
        if not isinstance(self.budget, (int, float)) or not self.budget > 0 or not math.isfinite(self.budget):
            raise LatentKVError(
                f"sparse budget must be a fraction of the blocks in (0, 1) or a block count >= 1; got {self.budget!r}."
            )
        if self.budget >= 1 and self.budget != int(self.budget):
            raise LatentKVError(f"a sparse budget >= 1 counts blocks and must be whole; got {self.budget}.")
        if self.sink_blocks < 0 or self.local_blocks < 1:
            raise LatentKVError(
                f"sink_blocks must be >= 0 and local_blocks >= 1 (the current block); got {self.sink_blocks}, "
                f"{self.local_blocks}."
            )
        if self.budget >= 1 and self.budget < self.sink_blocks + self.local_blocks:
            raise LatentKVError(
                f"a budget of {int(self.budget)} blocks cannot hold the {self.sink_blocks} sink + "
                f"{self.local_blocks} local blocks that are always kept; raise --sparse-budget."
            )
        if self.history_masses not in HISTORY_MASSES:
            raise LatentKVError(f"history_masses must be one of {', '.join(HISTORY_MASSES)}; got {self.history_masses!r}.")
        if self.refresh < 1:
            raise LatentKVError(f"refresh must be >= 1 decode steps; got {self.refresh}.")
        if self.policy == "predictor" and not self.predictor:
            raise LatentKVError("the predictor policy needs a trained predictor: pass --predictor FOLDER "
                                "(made by `latentkv predictor train`).")

    def blocks_for(self, n_blocks: int) -> int:
        """Blocks attended by a sequence of ``n_blocks`` blocks (all of them for dense)."""
        if self.policy == "dense":
            return n_blocks
        k = int(self.budget) if self.budget >= 1 else math.ceil(self.budget * n_blocks)
        return min(n_blocks, max(k, self.sink_blocks + self.local_blocks))

    @property
    def needs_history(self) -> bool:
        return self.policy in ("last-step", "predictor")


def parse_budget(text: str | float) -> float:
    """CLI budget: '0.25' or '25%' (a fraction) or '16' (blocks)."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise LatentKVError(f"--sparse-budget {text!r}: give a fraction (0.25 or 25%) or a block count (16).") from None
    return value


def forced_blocks(n_blocks: int, sink_blocks: int, local_blocks: int) -> torch.Tensor:
    """Ids of the always-kept blocks: the first ``sink_blocks`` and the last ``local_blocks``."""
    ids = set(range(min(sink_blocks, n_blocks))) | set(range(max(0, n_blocks - local_blocks), n_blocks))
    return torch.tensor(sorted(ids), dtype=torch.long)


def choose_blocks(scores: torch.Tensor, k: int, sink_blocks: int = 1, local_blocks: int = 1) -> torch.Tensor:
    """Ascending ids of the ``k`` blocks to attend: the forced blocks, then the top scores.

    scores: [n_blocks] (any real values; higher = keep), or [rows, n_blocks] (-> [rows, k], a choice per
    row: latent heads, or a batch). Ties go to the lower id (topk's order is not specified, so a stable
    sort decides). The last id is always the current block.
    """
    n = scores.shape[-1]
    if k >= n:
        return torch.arange(n).expand(scores.shape)
    s = scores.detach().float().clone()
    s[..., forced_blocks(n, sink_blocks, local_blocks)] = float("inf")
    order = torch.sort(-s, dim=-1, stable=True).indices
    return order[..., :k].sort(dim=-1).values


def head_columns(heads: int, latent_heads: int, r_c: int, rope_dim: int) -> torch.Tensor:
    """[heads, r_c + rope_dim] column of the cache row that each query-head column multiplies: query
    head h reads its latent head's r_c columns, then the shared RoPE key."""
    group = torch.arange(heads) // (heads // latent_heads)
    latent = group[:, None] * r_c + torch.arange(r_c)[None, :]
    rope = latent_heads * r_c + torch.arange(rope_dim)[None, :].expand(heads, rope_dim)
    return torch.cat([latent, rope], dim=1)


def head_bounds(q: torch.Tensor, low: torch.Tensor, high: torch.Tensor, latent_heads: int, rope_dim: int) -> torch.Tensor:
    """Quest's page bounds in the absorbed space: q [H, r_c + rope_dim] (one query token, W_UK folded
    in), low / high [n_blocks, width] the element-wise min / max of each block's cache rows ->
    [n_blocks, H] the upper bound sum_j max(q_j low_j, q_j high_j) of q_h . k for every row k of the
    block (exact for a block of one row), per query head."""
    heads, width = q.shape
    cols = head_columns(heads, latent_heads, width - rope_dim, rope_dim).to(low.device)
    qf = q.float().to(low.device)[None]  # [1, H, w]
    return torch.maximum(qf * low[:, cols], qf * high[:, cols]).sum(-1)


def bound_scores(q: torch.Tensor, low: torch.Tensor, high: torch.Tensor, latent_heads: int, rope_dim: int,
                 scale: float | None = None, *, per_latent_head: bool = False) -> torch.Tensor:
    """Quest's page scores [n_blocks] from the per-head bounds of ``head_bounds``.

    scale=None: the largest bound over the query heads (raw logits: a head with large query norms
    decides for every head). scale (the softmax scale): per head, softmax over the blocks of
    ``scale * bound`` -- each block's attention mass were its best key to reach the bound -- then the
    mean over the heads, the quantity the oracle ranks by (its true masses, mean over heads) and
    what a page set shared by all the heads of the latent cache has to cover. per_latent_head: the
    same over each latent head's query heads only, [latent_heads, n_blocks]."""
    bound = head_bounds(q, low, high, latent_heads, rope_dim)  # [n_blocks, H]
    if scale is not None:
        bound = torch.softmax(scale * bound, dim=0)
    if per_latent_head:  # query head h belongs to latent head h // (H // latent_heads)
        bound = bound.view(bound.shape[0], latent_heads, -1).transpose(0, 1)  # [latent_heads, n_blocks, hg]
    return bound.max(-1).values if scale is None else bound.mean(-1)


def policy_scores(config: SparseConfig, n_blocks: int, history: torch.Tensor | None, current: torch.Tensor | None,
                  predictor=None, *, latent_heads: int | None = None) -> torch.Tensor:
    """Scores [n_blocks] of one (sequence, layer).

    history: [latent_heads, t, n_blocks] block masses of the last t steps (t may be 0), or
    [batch, latent_heads, t, n_blocks] for as many (sequence, layer)s at one length (-> [batch, n_blocks]);
    current: [latent_heads, n_blocks] this step's masses (oracle), or [n_blocks] the page-bound
    scores of ``bound_scores`` (quest); predictor: an
    AttentionPredictor (policy "predictor"). Without history yet, last-step and predictor score
    by recency (the window policy). latent_heads: score each latent head apart, [latent_heads,
    n_blocks] (quest's ``current`` then per latent head too, ``bound_scores(per_latent_head=True)``);
    None: the mean over the latent heads.
    """
    def per_head_or_mean(scores: torch.Tensor) -> torch.Tensor:  # [..., latent_heads, n]
        return scores if latent_heads else scores.mean(-2)

    recency = torch.arange(n_blocks, dtype=torch.float32)
    if latent_heads:
        recency = recency.expand(latent_heads, n_blocks)
    if config.policy in ("dense", "window"):
        return recency
    if config.policy == "quest":
        if current is None:
            raise LatentKVError("the quest policy needs this step's page-bound scores.")
        return current.float()
    if config.policy == "oracle":
        if current is None:
            raise LatentKVError("the oracle policy needs this step's block masses.")
        return per_head_or_mean(current.float())
    if history is None or history.shape[-2] == 0:
        return recency
    if config.policy == "last-step":
        scores = per_head_or_mean(history[..., -1, :].float())
    else:  # [..., latent_heads, n] probabilities
        scores = per_head_or_mean(predictor.predict(history.flatten(0, -3)).view(*history.shape[:-2], -1))
    # a block begun since the last history row has no mass yet: score 0 (the current block is forced
    # anyway); without this the scores would cover one block too few and the current block be lost
    return torch.nn.functional.pad(scores, (0, n_blocks - scores.shape[-1])) if scores.shape[-1] < n_blocks else scores
