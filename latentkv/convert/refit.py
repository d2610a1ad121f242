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
"""

from __future__ import annotations

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

    def solve(self, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [out, in], bias [out] or None); a small ridge, relative to the mean diagonal,
        keeps directions the calibration text never excites at zero instead of at noise."""
        gram = self.gram + ridge * self.gram.diagonal().mean() * torch.eye(
            self.gram.shape[0], dtype=self.gram.dtype, device=self.gram.device)
        sol = torch.linalg.solve(gram, self.cross.T).T
        return (sol[:, :-1], sol[:, -1]) if self.with_bias else (sol, None)


@torch.no_grad()
def refit_output_projection(new_attn: torch.nn.Module, source_attn: torch.nn.Module,
                            batches: Callable[[], Iterable[tuple[torch.Tensor, tuple]]], with_bias: bool,
                            ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares o_proj of `new_attn` (a LatentAttention) against `source_attn` (the source's
    attention module) over `batches()`: (attention input after the layer norm, position embeddings)."""
    o_proj = new_attn.o_proj
    acc = None
    captured = {}
    hook = o_proj.register_forward_hook(lambda m, inputs, out: captured.__setitem__("a", inputs[0]))
    try:
        for x, pos_emb in batches():
            positions = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
            new_attn(x, position_ids=positions)
            y = source_attn(x, position_embeddings=pos_emb, attention_mask=None)[0]
            if acc is None:
                acc = OutputRefit(captured["a"].shape[-1], y.shape[-1], with_bias, x.device)
            acc.add(captured["a"], y)
    finally:
        hook.remove()
    return acc.solve(ridge)
