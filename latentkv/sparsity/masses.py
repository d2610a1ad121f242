"""Block-pooled attention probabilities of absorbed MLA / GLA queries over a paged latent cache.

The mass of block j for latent head c is the attention probability that the query heads of c put
on the tokens of block j, summed over the block's tokens and averaged over those query heads:

    m_c(j) = mean_{h in c} sum_{t in block j} softmax_t(scale * (q_h[:r_c] . latent_c(t) + q_h[r_c:] . k_rope(t)))

The same scores as the decode kernel (``latentkv.kernels.mla_decode``), float32 math.
"""

from __future__ import annotations

import torch


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
    ceil(L / page_size)] (float32; query token i sees rows 0 .. L - s + i)."""
    s, heads, width = q.shape
    length = rows.shape[0]
    r_c = width - rope_dim
    hg = heads // latent_heads
    n_blocks = -(-length // page_size)
    rows = rows.float()
    qf = q.float()
    visible = torch.arange(length)[None, :] <= (length - s + torch.arange(s))[:, None]  # [s, L]
    out = torch.empty(s, latent_heads, n_blocks)
    k_pe = rows[:, latent_heads * r_c :]
    for c in range(latent_heads):
        qc = qf[:, c * hg : (c + 1) * hg]  # [s, hg, r_c + rope_dim]
        scores = torch.einsum("shr,lr->shl", qc[..., :r_c], rows[:, c * r_c : (c + 1) * r_c])
        if rope_dim:
            scores = scores + torch.einsum("shd,ld->shl", qc[..., r_c:], k_pe)
        p = torch.softmax((scores * scale).masked_fill(~visible[:, None], float("-inf")), dim=-1)  # [s, hg, L]
        p = torch.nn.functional.pad(p, (0, n_blocks * page_size - length))
        out[:, c] = p.view(s, hg, n_blocks, page_size).sum(-1).mean(1)
    return out


def paged_rows(kv: torch.Tensor, page_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` rows [length, width] of the pages ``page_ids`` of kv [num_pages, page_size, width]."""
    return kv[page_ids.long()].reshape(-1, kv.shape[-1])[:length]
