"""Block-pooled attention probabilities of absorbed MLA / GLA queries over a paged latent cache.

The mass of block j for latent head c is the attention probability that the query heads of c put
on the tokens of block j, summed over the block's tokens and averaged over those query heads:

    m_c(j) = mean_{h in c} sum_{t in block j} softmax_t(scale * (q_h[:r_c] . latent_c(t) + q_h[r_c:] . k_rope(t)))

The same scores as the decode kernel (``latentkv.kernels.mla_decode``), float32 math.
"""

from __future__ import annotations

import torch

from latentkv.kernels.mla_decode import attention_probs, pool_pages


def block_masses(
    q: torch.Tensor,
    rows: torch.Tensor,
    *,
    latent_heads: int,
    rope_dim: int,
    scale: float,
    page_size: int,
) -> torch.Tensor:
    """q [s, H, r_c + rope_dim] (the s newest tokens of the sequence), rows [L, latent_heads * r_c
    + rope_dim] (every cached row, in order, the s new ones last) -> masses [s, latent_heads,
    ceil(L / page_size)] (float32; query token i sees rows 0 .. L - s + i). The probabilities are
    the decode reference's (``attention_probs``), so these equal its ``return_masses`` output."""
    n_blocks = -(-rows.shape[0] // page_size)
    out = torch.empty(q.shape[0], latent_heads, n_blocks)
    for c, p in attention_probs(q, rows, latent_heads=latent_heads, rope_dim=rope_dim, scale=scale):
        out[:, c] = pool_pages(p, page_size)
    return out


def paged_rows(kv: torch.Tensor, page_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` rows [length, width] of the pages ``page_ids`` of kv [num_pages, page_size, width]."""
    return kv[page_ids.long()].reshape(-1, kv.shape[-1])[:length]
