"""The low-rank core shared by every method: PCA of projected activations under a metric.

Given rows T (so z = T x_aug), the second moment S of x_aug and a PSD metric M (how much an error
in each coordinate of z costs), the best rank-r code c = L x_aug with reconstruction z ~ U c is

    M^1/2 T S T^T M^1/2 = V diag(sigma) V^T,   L = V_r^T M^1/2 T,   U = M^-1/2 V_r

and the expected error E[(z - U c)^T M (z - U c)] is the sum of the dropped sigma. With M = I this
is plain energy PCA; with keys under the query metric and values under the output-projection
metric it is the whitened ("generalised") PCA that tracks what the layer actually outputs.
At full rank U L = T exactly (for a non-singular M), which the exactness tests rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def psd_sqrt(m: torch.Tensor, ridge: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """M^1/2 and M^-1/2 of a symmetric PSD matrix, with a tiny relative ridge for singular M."""
    m = 0.5 * (m + m.T)
    evals, evecs = torch.linalg.eigh(m)
    floor = ridge * evals.abs().max().clamp_min(1e-300)
    evals = evals.clamp_min(floor)
    root = evals.sqrt()
    return (evecs * root) @ evecs.T, (evecs / root) @ evecs.T


@dataclass
class LowRankFit:
    down: torch.Tensor  # [r, D+1] latent rows (last column = latent bias)
    up: torch.Tensor  # [n, r] reconstruction of z
    spectrum: torch.Tensor  # [n] all sigma, descending (error of rank r = spectrum[r:].sum())

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def metric_spectrum(rows: torch.Tensor, moment: torch.Tensor, metric: torch.Tensor, centered: bool = False):
    """Eigen-decomposition of M^1/2 T S T^T M^1/2: (sigma desc, V, M^1/2, M^-1/2).

    centered: fit the covariance instead of the second moment, for when the mean of z is
    handled elsewhere (a key mean shifts every score of a query equally; a value mean passes
    through the softmax into the output bias).
    """
    root, inv_root = psd_sqrt(metric)
    cov = rows @ moment @ rows.T
    if centered:
        mean = rows @ moment[:, -1]
        cov = cov - torch.outer(mean, mean)
    target = root @ cov @ root
    sigma, V = torch.linalg.eigh(0.5 * (target + target.T))
    return sigma.flip(0).clamp_min(0), V.flip(1), root, inv_root


def metric_spectrum_values(rows: torch.Tensor, moment: torch.Tensor, metric: torch.Tensor, centered: bool = False):
    """The sigma of `metric_spectrum` alone (descending), for the planner's error curves: with
    M = L L^T, L^T C L is orthogonally similar to M^1/2 C M^1/2, so one Cholesky and one
    eigenvalue-only solve replace two full eigen-decompositions."""
    m = 0.5 * (metric + metric.T)
    floor = 1e-9 * m.diagonal().abs().max().clamp_min(1e-300)
    chol, info = torch.linalg.cholesky_ex(m + floor * torch.eye(len(m), dtype=m.dtype, device=m.device))
    if int(info):
        return metric_spectrum(rows, moment, metric, centered)[0]
    cov = rows @ moment @ rows.T
    if centered:
        mean = rows @ moment[:, -1]
        cov = cov - torch.outer(mean, mean)
    target = chol.T @ cov @ chol
    return torch.linalg.eigvalsh(0.5 * (target + target.T)).flip(0).clamp_min(0)


def fit_low_rank(rows: torch.Tensor, moment: torch.Tensor, metric: torch.Tensor, rank: int,
                 centered: bool = False) -> LowRankFit:
    sigma, V, root, inv_root = metric_spectrum(rows, moment, metric, centered)
    Vr = V[:, :rank]
    return LowRankFit(down=Vr.T @ root @ rows, up=inv_root @ Vr, spectrum=sigma)
