"""Comparing a kernel's output with its reference: max abs, max rel, cosine, worst coordinate.

Never a bare ``allclose``: when a check fails the report says by how much and where (FlashMLA's
test comparator does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Comparison:
    """How far ``out`` is from ``ref`` (both read as float64)."""

    max_abs: float  # max |out - ref|
    max_rel: float  # max |out - ref| / (|ref| + atol)
    rel_l2: float  # ||out - ref|| / ||ref||
    cos_diff: float  # 1 - cosine(out, ref) over all elements
    worst_index: tuple[int, ...]  # coordinate with the largest excess over atol + rtol * |ref|
    worst_out: float
    worst_ref: float
    n_bad: int  # elements outside atol + rtol * |ref| (NaN counts as bad)
    n_nonfinite: int  # NaN / inf in out (unwritten poisoned outputs show up here)
    ok: bool

    def report(self, name: str = "") -> str:
        return (
            f"{name + ': ' if name else ''}max_abs={self.max_abs:.3e} max_rel={self.max_rel:.3e} "
            f"rel_l2={self.rel_l2:.3e} cos_diff={self.cos_diff:.3e} bad={self.n_bad} nonfinite={self.n_nonfinite} "
            f"worst@{self.worst_index}: out={self.worst_out:.6g} ref={self.worst_ref:.6g}"
        )


def compare(
    out: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float, max_cos_diff: float = 1e-4
) -> Comparison:
    """Elementwise |out - ref| <= atol + rtol |ref| everywhere, all finite, and 1 - cos <= max_cos_diff."""
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: out {tuple(out.shape)} vs ref {tuple(ref.shape)}")
    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    nonfinite = ~torch.isfinite(o)
    diff = (o - r).abs()
    diff = torch.where(nonfinite, torch.full_like(diff, float("inf")), diff)
    excess = diff - (atol + rtol * r.abs())
    n_bad = int((excess > 0).sum())
    flat = int(torch.argmax(torch.where(torch.isnan(excess), torch.full_like(excess, float("inf")), excess)))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), o.shape)) if o.numel() else ()
    finite_o = torch.where(nonfinite, torch.zeros_like(o), o)
    denom = float(finite_o.norm() * r.norm())
    cos = float((finite_o * r).sum()) / denom if denom > 0 else (1.0 if float(r.norm()) == 0 else 0.0)
    ref_norm = float(r.norm())
    rel_l2 = float((finite_o - r).norm()) / ref_norm if ref_norm > 0 else float((finite_o - r).norm())
    n_nonfinite = int(nonfinite.sum())
    cos_diff = 1.0 - cos
    return Comparison(
        max_abs=float(diff.max()) if o.numel() else 0.0,
        max_rel=float((diff / (r.abs() + atol)).max()) if o.numel() else 0.0,
        rel_l2=rel_l2,
        cos_diff=cos_diff,
        worst_index=idx,
        worst_out=float(o[idx]) if o.numel() else 0.0,
        worst_ref=float(r[idx]) if o.numel() else 0.0,
        n_bad=n_bad,
        n_nonfinite=n_nonfinite,
        ok=n_bad == 0 and n_nonfinite == 0 and cos_diff <= max_cos_diff,
    )


def assert_close(
    out: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float, max_cos_diff: float = 1e-4, name: str = ""
) -> Comparison:
    """``compare`` and raise AssertionError carrying the full report when it fails."""
    cmp = compare(out, ref, atol=atol, rtol=rtol, max_cos_diff=max_cos_diff)
    if not cmp.ok:
        raise AssertionError(cmp.report(name))
    return cmp
