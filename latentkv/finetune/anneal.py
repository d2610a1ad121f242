"""Latent annealing: heal a wider MLA latent while its trailing dimensions fade out, then drop them.

Converting straight to a small latent throws away, in one step, everything the dropped directions
carried; healing must then rebuild it from the KL alone. Here the model is converted at a larger
rank r with the same RoPE key, so that (the latent being a PCA, ordered by what it explains) its
first `rank` dimensions are the small conversion itself and the rest are the next most useful
ones. During the first `steps` optimizer steps the rows of kv_a_proj that produce latent
dimensions rank..r are scaled down linearly to zero (after every optimizer step), so the other
weights learn to carry what they held while they are still there; from then on those rows stay
zero, the model is exactly a rank-`rank` MLA, and the written model drops them (gradual pruning,
Zhu & Gupta 2017, applied to the latent).
"""

from __future__ import annotations

import torch

from latentkv.convert.registry import ATTENTION_KINDS, layer_classes
from latentkv.errors import LatentKVError


def latent_attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MLA layers (latentkv format) that annealing can narrow; refuses any other layer kind."""
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes()]
    if not layers:
        raise LatentKVError("--anneal-rank narrows the latent of a latentkv MLA model; this model has no latent "
                            "attention (convert with --to mla, latentkv format)")
    for m in layers:
        if type(m).__name__ != ATTENTION_KINDS["latent"]["layer_class"] or m.tied or m.latent_heads != 1 or m.qk_norm:
            raise LatentKVError(f"--anneal-rank works on MLA layers (one latent head, not tied, no QK-norm); layer "
                                f"{m.layer_idx} is {type(m).__name__} with {getattr(m, 'latent_heads', '?')} latent "
                                "heads: convert with --to mla, or drop --anneal-rank")
    return layers


class LatentAnneal:
    """Fades latent dimensions `rank`.. of every MLA layer to zero over `steps` optimizer steps."""

    def __init__(self, model: torch.nn.Module, rank: int, steps: int):
        self.layers = latent_attentions(model)
        too_small = [(m.layer_idx, m.kv_lora_rank) for m in self.layers if m.kv_lora_rank < rank]
        if too_small:
            raise LatentKVError(f"--anneal-rank {rank} is wider than the latent of layers {too_small[:3]} "
                                "(layer, rank); convert at a larger --kv-budget or lower --anneal-rank")
        if not self.layers[0].kv_a_proj.weight.requires_grad:
            raise LatentKVError("--anneal-rank needs the latent weights themselves trained: use --mode attention")
        self.rank, self.steps = rank, steps

    def factor(self, step: int) -> float:
        """How much of the fading dimensions' original scale is left after `step` optimizer steps."""
        return max(0.0, 1.0 - step / self.steps) if self.steps else 0.0

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based count of steps done)."""
        before, now = self.factor(step - 1), self.factor(step)
        ratio = now / before if before > 0 else 0.0
        for m in self.layers:
            fading = slice(self.rank, m.kv_lora_rank)
            m.kv_a_proj.weight[fading].mul_(ratio)
            if m.kv_a_proj.bias is not None:
                m.kv_a_proj.bias[fading].mul_(ratio)



@torch.no_grad()
def narrow_latent(model: torch.nn.Module, rank: int) -> list[dict]:
    """Drop latent dimensions rank.. of every MLA layer in place (weights, module widths, config
    spec); returns the new per-layer specs. Exact once annealing has zeroed those dimensions."""
    for m in latent_attentions(model):
        r, rope = m.kv_lora_rank, m.rope_dim
        keep = torch.cat([torch.arange(rank), torch.arange(r, r + rope)])
        m.kv_a_proj = _rows(m.kv_a_proj, keep)
        m.kv_b_proj = _columns(m.kv_b_proj, torch.arange(rank))
        m.kv_lora_rank = m.latent_head_dim = rank
        model.config.attention_layers[m.layer_idx]["kv_lora_rank"] = rank
    return model.config.attention_layers


def _rows(linear: torch.nn.Linear, keep: torch.Tensor) -> torch.nn.Linear:
    out = torch.nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None,
                          dtype=linear.weight.dtype, device=linear.weight.device)
    out.weight.copy_(linear.weight[keep])
    if linear.bias is not None:
        out.bias.copy_(linear.bias[keep])
    return out


def _columns(linear: torch.nn.Linear, keep: torch.Tensor) -> torch.nn.Linear:
    out = torch.nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None,
                          dtype=linear.weight.dtype, device=linear.weight.device)
    out.weight.copy_(linear.weight[:, keep])
    if linear.bias is not None:
        out.bias.copy_(linear.bias)
    return out
