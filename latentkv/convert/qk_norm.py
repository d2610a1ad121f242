"""Sources with a per-head RMSNorm on queries and keys before RoPE (Qwen3): the layer's new tensors.

With such a norm the key is not a linear function of x, so calibration measures the normalised
keys and values y = [k_norm(k_proj(x)); v_proj(x)] and the normalised queries, and every method
runs on those spaces unchanged (`pipeline.layer_inputs_from`). What it returns reads them: kv_a rows
act on y, and the query rows on the normalised queries, one head's rows on that head's query only
(the RoPE basis and the absorbed up-projections mix within a head). This module turns that into a
`qk_norm` LatentAttention layer: the source's q/k/v projections and norms kept as they are, and
the query map stored per head (q_head_proj, [H, d_nope + rope_dim, d]) instead of a dense
[H * (d_nope + rope_dim), H * d] matrix that would be zero off its diagonal blocks.
"""

from __future__ import annotations

import torch

from latentkv.arch import geometry_of


def with_source_projections(stream, i: int, tensors: dict, spec: dict) -> tuple[dict, dict]:
    """Layer i's LatentAttention tensors and spec for a QK-norm source; unchanged for any other."""
    arch = stream.arch
    if not arch.qk_norm:
        return tensors, spec
    geo = geometry_of(stream.config)
    H, d = geo.num_heads, geo.head_dim
    out = dict(tensors)
    q_new = out.pop("q_proj.weight")  # [H * w, H * d]: reads the normalised queries
    q_bias = out.pop("q_proj.bias", None)
    w = q_new.shape[0] // H
    blocks = q_new.reshape(H, w, H, d)
    per_head = blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [H, w, d]
    off = blocks.clone()
    off.diagonal(dim1=0, dim2=2).zero_()
    leak = float(off.abs().max()) if off.numel() else 0.0
    if leak > 0 or (q_bias is not None and float(q_bias.abs().max()) > 0):
        # An internal invariant (every method maps a head's query to that head's scores), not user input.
        raise RuntimeError(f"layer {i}: the new query map mixes heads (off-block {leak:.3g}); it cannot follow q_norm")
    out["q_head_proj.weight"] = per_head.contiguous()
    weights = stream.weights
    for which in "qkv":
        for kind in ("weight", "bias"):
            t = arch.read_projection(weights, i, which, kind, geo, dtype=torch.float64)
            if t is not None:
                out[f"{which}_proj.{kind}"] = t
    prefix = arch.layer_key(i)
    out["q_norm.weight"] = weights.get(f"{prefix}{arch.q_norm}.weight", dtype=torch.float64)
    out["k_norm.weight"] = weights.get(f"{prefix}{arch.k_norm}.weight", dtype=torch.float64)
    return out, {**spec, "qk_norm": True, "qk_norm_eps": float(stream.config.rms_norm_eps)}
