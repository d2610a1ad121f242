"""The RoPE core shared by every method: RoPE-commuting key mixes per frequency.

RoPE multiplies frequency pair j of a key (dims j and j + d/2 in the half-split layout, read as
the complex number z = k_j + i k_{j+d/2}) by e^{i theta_j t}. Any complex G x G matrix applied to
the G key heads' pair-j numbers commutes with that rotation, so per frequency we may re-express
the G keys in a new basis of components w = A z (and fold B = A^{-1} into the queries) with no
error at all. Choosing A by the eigenvectors of the query-weighted key covariance puts the energy
that matters for scores into few components:

    C_j = E[z z^H]          (G x G, unchanged by RoPE since e^{i theta t} cancels in z z^H)
    W_j = diag(query energy of each KV group at pair j)
    W^1/2 C W^1/2 = V diag(lambda) V^H,   A = V^H W^1/2,   B = W^-1/2 V

A component that keeps its rotation goes into the cached RoPE key; one that loses it is used as a
position-independent key, with the query scaled by c = E[e^{i theta Delta}] over the distances the
head attends to (the least-squares constant for the dropped rotation).

Partial rotary (`rotary_dim` < d: GPT-NeoX, Phi-4-mini): RoPE turns only the first rotary_dim dims
of each head (pairs j and j + rotary_dim/2); the functions below then see only those dims, and the
rest of each head is position-free already, handled by the callers like any non-rotated key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-10


def complex_pairs(w_aug: torch.Tensor, heads: int, head_dim: int, rotary_dim: int | None = None) -> torch.Tensor:
    """Rotated rows of a projection as complex pair rows: [heads, rotary_dim/2, D+1] complex128."""
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    half = rotary_dim // 2
    w = w_aug.double().view(heads, head_dim, -1)
    return torch.complex(w[:, :half], w[:, half:rotary_dim])


def passed_rows(w_aug: torch.Tensor, heads: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """The never-rotated rows of each head: [heads, head_dim - rotary_dim, D+1]."""
    return w_aug.view(heads, head_dim, -1)[:, rotary_dim:]


def pair_covariance(cov: torch.Tensor, heads: int, head_dim: int, rotary_dim: int | None = None) -> torch.Tensor:
    """E[z z^H] per frequency pair from the real covariance of `heads` heads' rows: [P, heads, heads].

    cov: [heads*d, heads*d] = T S T^T of real rows T (half-split layout); the same numbers as
    `_sandwich(complex_pairs(T))` without a (D+1)^2 product per subset of heads.
    """
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    half = rotary_dim // 2
    c = cov.double().view(heads, head_dim, heads, head_dim)[:, :rotary_dim, :, :rotary_dim]
    a = c[:, :half, :, :half].diagonal(dim1=1, dim2=3)  # E[a_g a_h]: [G, G, P]
    b = c[:, half:, :, half:].diagonal(dim1=1, dim2=3)  # E[b_g b_h]
    ba = c[:, half:, :, :half].diagonal(dim1=1, dim2=3)  # E[b_g a_h]
    ab = c[:, :half, :, half:].diagonal(dim1=1, dim2=3)  # E[a_g b_h]
    return torch.complex(a + b, ba - ab).permute(2, 0, 1).contiguous()


def _sandwich(rows: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """rows S rows^H for complex rows [..., n, D+1] -> [..., n, n]."""
    s = moment.to(torch.complex128)
    return rows @ s @ rows.conj().transpose(-1, -2)


@dataclass
class KeyBasis:
    """Per-frequency RoPE-commuting basis of the key heads (P = d/2 pairs, G key heads)."""

    A: torch.Tensor  # [P, G, G] complex: component m of pair j = A[j, m] . z_j
    B: torch.Tensor  # [P, G, G] complex: z_{g,j} = sum_m B[j, g, m] w_{j,m}
    key_energy: torch.Tensor  # [P, G] E|w_{j,m}|^2
    weighted_energy: torch.Tensor  # [P, G] query-weighted energy (what the choice ranks by)


def key_basis(
    zk: torch.Tensor,
    zq: torch.Tensor,
    moment: torch.Tensor,
    group_of_head: torch.Tensor,
    mix: str = "complex",
    query_weighted: bool = True,
    q_moment: torch.Tensor | None = None,
) -> KeyBasis:
    """Choose the per-frequency basis. zk: [G, P, D+1], zq: [H, P, D_q+1] complex rows; q_moment the
    second moment the query rows act on where it is not the keys' (`moment`).

    mix: "complex" (complex PCA, the general RoPE-commuting mix), "real" (one real orthogonal
    mix per frequency, as RoRoPE/TransMLA), or "none" (keep the source heads as they are).
    """
    cov = _sandwich(zk.transpose(0, 1), moment)  # [P, G, G]
    q_moment = moment if q_moment is None else q_moment
    q_energy = _sandwich(zq.transpose(0, 1), q_moment).diagonal(dim1=-2, dim2=-1).real  # [P, H]
    return basis_from_covariance(cov, q_energy, group_of_head, mix, query_weighted)


def basis_from_covariance(
    cov: torch.Tensor,
    q_energy: torch.Tensor,
    group_of_head: torch.Tensor,
    mix: str = "complex",
    query_weighted: bool = True,
) -> KeyBasis:
    """`key_basis` from the statistics alone: cov [P, G, G] = E[z z^H] of the key pairs and
    q_energy [P, H] = E|z^q_{h,j}|^2. Lets a caller that compares many subsets of heads (GQA
    grouping) compute the statistics once and pass sub-blocks."""
    P, G, _ = cov.shape
    if query_weighted:
        w = torch.zeros(P, G, dtype=torch.float64)
        w.index_add_(1, group_of_head, q_energy)
        w = w / w.mean(dim=1, keepdim=True).clamp_min(EPS)
    else:
        w = torch.ones(P, G, dtype=torch.float64)
    sqrt_w = (w + 1e-8).sqrt().to(torch.complex128)
    weighted = sqrt_w[:, :, None] * cov * sqrt_w[:, None, :]
    if mix == "none":
        V = torch.eye(G, dtype=torch.complex128).expand(P, G, G).clone()
        lam = weighted.diagonal(dim1=-2, dim2=-1).real
        order = lam.argsort(dim=1, descending=True)
        V = torch.gather(V, 2, order[:, None, :].expand(P, G, G))
    else:
        target = weighted.real.to(torch.complex128) if mix == "real" else weighted
        lam, V = torch.linalg.eigh(target)
        V = V.flip(-1)
        if mix == "real":
            V = V.real.to(torch.complex128)
    A = V.conj().transpose(-1, -2) * sqrt_w[:, None, :]
    B = V / sqrt_w[:, :, None]
    key_energy = (A @ cov @ A.conj().transpose(-1, -2)).diagonal(dim1=-2, dim2=-1).real
    weighted_energy = (V.conj().transpose(-1, -2) @ weighted @ V).diagonal(dim1=-2, dim2=-1).real
    return KeyBasis(A=A, B=B, key_energy=key_energy, weighted_energy=weighted_energy)


def rotation_shrink(distance: torch.Tensor | None, inv_freq: torch.Tensor, num_heads: int) -> torch.Tensor:
    """c[h, j] = E[e^{i theta_j Delta}] over the distances head h attends to: [H, P] complex.

    Without a distance profile, c = 1 (drop the rotation, as TransMLA does).
    """
    P = inv_freq.numel()
    if distance is None:
        return torch.ones(num_heads, P, dtype=torch.complex128)
    L = distance.shape[1]
    delta = torch.arange(L, dtype=torch.float64)
    phase = delta[:, None] * inv_freq.double()[None, :]  # [L, P]
    return distance.double().to(torch.complex128) @ torch.exp(1j * phase)


def rotation_loss(
    basis: KeyBasis, q_energy: torch.Tensor, shrink: torch.Tensor, measured: torch.Tensor,
    group_of_head: torch.Tensor, head_weight: torch.Tensor,
) -> torch.Tensor:
    """Score error [P, G] of using each component without its rotation (even if cached exactly).

    E|u conj(w) (e^{i theta Delta} - c)|^2 = E|u|^2 E|w|^2 E|e^{i theta Delta} - c|^2 with
    E|e - c|^2 = 1 - 2 Re(conj(c) m) + |c|^2 for the measured mean m; summed over query heads with
    their weights. q_energy: [H, P] E|z^q|^2; shrink, measured: [H, P]; head_weight: [H].
    """
    miss = (1 - 2 * (shrink.conj() * measured).real + shrink.abs() ** 2).clamp_min(0)  # [H, P]
    Bg = basis.B[:, group_of_head, :].abs() ** 2  # [P, H, G]
    per_head = Bg * (q_energy.T[:, :, None] * miss.T[:, :, None] * head_weight[None, :, None])
    return per_head.sum(1) * basis.key_energy


def select_rope_components(loss: torch.Tensor, num_pairs: int, allowed_pairs: list[int] | None = None) -> list[tuple[int, int]]:
    """Which (pair j, component m) keep their rotation: the num_pairs with the largest loss.

    allowed_pairs: when the export fixes the frequencies (DeepSeek: one component per allowed pair).
    Returned sorted by (j, m) so the cached RoPE key has a stable layout.
    """
    P, G = loss.shape
    if allowed_pairs is not None:
        chosen = [(j, int(loss[j].argmax())) for j in allowed_pairs]
    else:
        flat = loss.flatten().argsort(descending=True)[:num_pairs]
        chosen = [(int(i) // G, int(i) % G) for i in flat]
    return sorted(chosen)


def component_rows(basis: KeyBasis, zk: torch.Tensor, comps: list[tuple[int, int]]) -> torch.Tensor:
    """Complex key rows of the chosen components: [n, D+1]."""
    if not comps:
        return torch.zeros(0, zk.shape[-1], dtype=torch.complex128)
    j = torch.tensor([c[0] for c in comps])
    m = torch.tensor([c[1] for c in comps])
    # w_{j,m} = sum_g A[j, m, g] zk[g, j]
    return torch.einsum("ng,gnd->nd", basis.A[j, m], zk[:, j])


def query_coefficients(basis: KeyBasis, comps: list[tuple[int, int]], group_of_head: torch.Tensor,
                       shrink: torch.Tensor | None = None) -> torch.Tensor:
    """a[h, n] with u_{h,n} = a[h, n] * z^q_{h, j_n}: the query side of each component ([H, n] complex)."""
    if not comps:
        return torch.zeros(group_of_head.numel(), 0, dtype=torch.complex128)
    j = torch.tensor([c[0] for c in comps])
    m = torch.tensor([c[1] for c in comps])
    a = basis.B[j][:, group_of_head, :]  # [n, H, G]
    a = torch.gather(a, 2, m[:, None, None].expand(-1, a.shape[1], 1))[..., 0].conj().T  # [H, n]
    if shrink is not None:
        a = a * shrink[:, j]
    return a


def real_query_map(coeff: torch.Tensor, comps: list[tuple[int, int]], head_dim: int, layout: str,
                   rotary_dim: int | None = None) -> torch.Tensor:
    """Real maps from a source query head (d dims) to component coordinates: [H, 2n, d].

    layout "half": rows [re_0..re_{n-1}, im_0..im_{n-1}] (a RoPE key in HF's half-split layout);
    "pairs": rows [re_0, im_0, re_1, im_1, ...] (non-rotated keys, order is free).
    Pair j of the query is its dims j and j + rotary_dim/2 (rotary_dim: all d unless partial).
    """
    H, n = coeff.shape
    half = (head_dim if rotary_dim is None else rotary_dim) // 2
    out = torch.zeros(H, 2 * n, head_dim, dtype=torch.float64)
    for idx, (j, _) in enumerate(comps):
        ar, ai = coeff[:, idx].real, coeff[:, idx].imag
        re_row, im_row = (idx, n + idx) if layout == "half" else (2 * idx, 2 * idx + 1)
        out[:, re_row, j], out[:, re_row, j + half] = ar, -ai
        out[:, im_row, j], out[:, im_row, j + half] = ai, ar
    return out


def real_key_rows(rows: torch.Tensor, layout: str) -> torch.Tensor:
    """Complex component rows [n, D+1] -> real rows [2n, D+1] in the given layout."""
    if layout == "half":
        return torch.cat([rows.real, rows.imag], dim=0)
    return torch.stack([rows.real, rows.imag], dim=1).reshape(-1, rows.shape[-1])
