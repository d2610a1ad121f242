"""Output refit: re-solve a rewritten attention's o_proj by least squares on calibration activations.

A one-shot rewrite fits keys and values from second moments, but the layer's real loss is in its
output after the softmax: the attention pattern moves (de-rotated keys, the latent's dropped
directions) and the values are rank-cut. With the new attention's per-head outputs a (the input of
o_proj) and the source attention's output y on the same inputs, the best output projection is the
linear regression

    [W_O | b] = argmin E|| y - W_O a - b ||^2 = E[y a~^T] E[a~ a~^T]^-1,   a~ = [a; 1]

which needs only two accumulated moments. Run during the sequential pass, the inputs are those
that the already-converted layers before produce, so each layer also absorbs what the previous
ones changed. At full rank a = the source's per-head outputs and the solution is the source's W_O.

The regression is ridge-regularised toward the one-shot projection P: [W_O | b] = P + (C - P G)
(G + lambda I)^-1. Directions of a that the calibration text hardly excites keep P's weights
instead of getting large coefficients: an unregularised refit of SmolLM2 at 25% (o_proj entries up
to 492, against 152 one-shot) read 100.9 PPL but diverged at once when healed; with lambda = 1e-3
of the mean activation energy it reads 101.4 and heals normally (benchmarks/heal_refit_h100.md).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

import torch


class OutputRefit:
    """E[a~ a~^T] and E[y a~^T], accumulated in float64 over token batches."""

    def __init__(self, width_in: int, width_out: int, with_bias: bool, device):
        extra = 1 if with_bias else 0
        self.with_bias = with_bias
        self.gram = torch.zeros(width_in + extra, width_in + extra, dtype=torch.float64, device=device)
        self.cross = torch.zeros(width_out, width_in + extra, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, a: torch.Tensor, y: torch.Tensor) -> None:
        a = a.reshape(-1, a.shape[-1]).float()
        y = y.reshape(-1, y.shape[-1]).float()
        if self.with_bias:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        self.gram += (a.T @ a).double()
        self.cross += (y.T @ a).double()
        self.tokens += a.shape[0]

    def solve(self, prior: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [out, in], bias [out] or None), shrunk toward `prior` ([out, in(+1)]) with
        lambda = ridge x the mean diagonal of E[a~ a~^T]."""
        gram = self.gram / self.tokens
        cross = self.cross / self.tokens
        prior = prior.to(gram)
        lam = ridge * gram.diagonal().mean()
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        sol = prior + torch.linalg.solve(gram + lam * eye, (cross - prior @ gram).T).T
        return (sol[:, :-1], sol[:, -1]) if self.with_bias else (sol, None)


class ReplayedAttention(torch.nn.Module):
    """Stands in for a refitted attention during the layer's forward over the same batches: its
    o_proj applied to the per-head outputs recorded while refitting, so the attention itself is
    not computed a second time. Each call takes the next recorded batch."""

    def __init__(self, o_proj: torch.nn.Module, recorded: list[torch.Tensor]):
        super().__init__()
        self.o_proj = o_proj
        self.recorded = deque(recorded)  # popped as used: the layer's pass frees them as it goes

    def forward(self, hidden_states, *args, **kwargs):
        heads = self.recorded.popleft()
        if heads.shape[:-1] != hidden_states.shape[:-1]:
            raise RuntimeError("ReplayedAttention got batches other than the recorded ones")
        return self.o_proj(heads), None


@torch.no_grad()
def refit_output_projection(new_attn: torch.nn.Module, source_attn: torch.nn.Module,
                            batches: Callable[[], Iterable[tuple[torch.Tensor, tuple, torch.Tensor | None]]],
                            with_bias: bool,
                            ridge: float = 1e-3):
    """Least-squares o_proj of `new_attn` (a LatentAttention) against `source_attn` (the source's
    attention module) over `batches()`: (attention input after the layer norm, position embeddings,
    attention mask or None for plain causal attention).
    Returns (weight [out, in], bias [out] or None, the per-head outputs of each batch)."""
    o_proj = new_attn.o_proj
    acc = None
    recorded: list[torch.Tensor] = []
    hook = o_proj.register_forward_hook(lambda m, inputs, out: recorded.append(inputs[0]))
    try:
        for x, pos_emb, mask in batches():
            positions = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
            new_attn(x, position_ids=positions, attention_mask=mask)
            y = source_attn(x, position_embeddings=pos_emb, attention_mask=mask)[0]
            if acc is None:
                acc = OutputRefit(recorded[-1].shape[-1], y.shape[-1], with_bias, x.device)
            acc.add(recorded[-1], y)
    finally:
        hook.remove()
    prior = o_proj.weight.detach().double()
    if with_bias:
        bias = o_proj.bias.detach().double() if o_proj.bias is not None else torch.zeros(prior.shape[0], dtype=prior.dtype)
        prior = torch.cat([prior, bias.to(prior.device)[:, None]], dim=1)
    weight, bias = acc.solve(prior, ridge)
    return weight, bias, recorded
