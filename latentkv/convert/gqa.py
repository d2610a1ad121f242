"""MHA/GQA -> GQA with fewer KV heads (after Yu et al. 2024, arXiv 2406.07056), from calibration statistics.

Per layer, the G source KV heads are split into N groups of m = G/N heads; each group becomes one
new KV head that every query head of its members reads (docs/method.md, "GQA with fewer KV heads"):

1. Keys: per frequency pair j, the new key is one complex combination w_j = A[j, 0] . z_j of the
   merged heads' pair-j keys, the top component of their query-weighted complex PCA
   (`rope.basis_from_covariance`, the same core as MLA's RoPE key). A complex number per pair is
   a 2x2 rotation-and-scale, which commutes with RoPE, so the key stays a RoPE key; query head h
   of old group g reads it with its pair-j query multiplied by conj(B[j, g, 0])
   (`rope.query_coefficients`). What is lost is the other m - 1 components of each pair.
2. Values: PCA of the merged heads' values under the output-projection metric (blockdiag over old
   groups of sum_h W_O,h^T W_O,h, `lowrank.fit_low_rank`) at rank d; the reconstruction maps fold
   into W_O (W_O,h <- W_O,h U_g). Fitted uncentred: the augmented moment treats the value bias
   exactly and the source has no o_proj bias to take a value mean.
   Partial rotary (RoPE on the first rotary_dim dims of each head): steps 1 covers the rotated dims;
   the never-rotated key dims merge like values, by PCA at their own width under the query metric
   (sum over the reading query heads of E[q q^T] on those dims), the maps folded into W_Q.
3. Grouping: which heads merge is free (query heads move with their W_O columns), so groups are
   chosen to minimise the predicted loss of 1 + 2 (greedy, then pairwise swaps).
`method="meanpool"` is the usual uptraining start (mean of the merged K and V projections), kept
in the same code so the gain is measured side by side.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from latentkv.convert import lowrank, rope
from latentkv.convert.mla import LayerInputs
from latentkv.errors import LatentKVError

log = logging.getLogger(__name__)

METHODS = ("pca", "meanpool")
GROUPINGS = ("similarity", "contiguous")
KEY_WEIGHTINGS = ("query", "output")


@dataclass
class GQAConfig:
    """Settings of the GQA conversion (fewer KV heads, the source's own architecture).

    num_kv_heads: KV heads per layer in the output; must divide the source's KV heads (1 .. G).
    method: "pca" (RoPE-commuting complex PCA for keys, W_O-metric PCA for values, folded into
        W_Q and W_O) or "meanpool" (mean of the merged heads' K and V weights: the baseline).
    grouping: "similarity" (merge the heads whose merge loses least, from calibration statistics)
        or "contiguous" (merge heads in index order, g // m). Default: similarity for pca,
        contiguous for meanpool (the usual uptraining start).
    key_weighting: how pair components are ranked within a merged group: "query" (the query
        energy of the heads reading each old group) or "output" (query energy times each head's
        value spread through W_O, the first-order output cost of a score error). "query" measured
        better (benchmarks/gqa.md): SmolLM2-135M 3 -> 1 KV heads 321 vs 327 WikiText PPL; the
        trained MHA reference 8 -> 4 / 8 -> 2 heads 77.3 / 98.0 vs 80.2 / 100.6 held-out PPL.
    key_weight: multiplies the key loss against the value loss when comparing groupings (0..10;
        1 treats a score error by its first-order effect on the output).
    swap_rounds: passes of pairwise swaps that refine the greedy grouping (0 = greedy only).
    sequential: take each layer's statistics from the output of the converted layers before it.
    """

    num_kv_heads: int
    method: str = "pca"
    grouping: str | None = None
    key_weighting: str = "query"
    key_weight: float = 1.0
    swap_rounds: int = 4
    sequential: bool = False

    def __post_init__(self):
        if not isinstance(self.num_kv_heads, int) or isinstance(self.num_kv_heads, bool) or self.num_kv_heads < 1:
            raise LatentKVError(f"--num-kv-heads must be a whole number >= 1, got {self.num_kv_heads!r}")
        if self.grouping is None:
            self.grouping = "contiguous" if self.method == "meanpool" else "similarity"
        for name, allowed in (("method", METHODS), ("grouping", GROUPINGS), ("key_weighting", KEY_WEIGHTINGS)):
            if getattr(self, name) not in allowed:
                raise LatentKVError(f"GQA {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0 <= self.key_weight <= 1e3:
            raise LatentKVError(f"GQA key_weight must be in [0, 1000], got {self.key_weight}")
        if self.swap_rounds < 0:
            raise LatentKVError(f"GQA swap_rounds must be >= 0, got {self.swap_rounds}")


@dataclass
class LayerMoments:
    """Second moments of one layer's keys, queries and values, computed once per layer so that
    any subset of heads can be scored from sub-blocks."""

    inputs: LayerInputs
    k_pair_cov: torch.Tensor  # [P, G, G] complex E[z z^H] of the key pairs
    q_energy: torch.Tensor  # [P, H] E|z^q_{h,j}|^2, times each head's weight (key_weighting)
    v_moment: torch.Tensor  # [G*d, G*d] E[v v^T] (uncentred, bias included)
    o_gram: torch.Tensor  # [G, d, d] sum over the query heads of group g of W_O,h^T W_O,h
    k_pass_moment: torch.Tensor  # [G*p, G*p] E[k k^T] of the never-rotated key dims (p = d - rotary_dim)
    q_pass_gram: torch.Tensor  # [G, p, p] sum over group g's query heads of weight_h E[q q^T] on those dims

    @property
    def heads_per_group(self) -> int:
        return self.inputs.num_heads // self.inputs.num_kv_heads


def layer_moments(inp: LayerInputs, cfg: GQAConfig) -> LayerMoments:
    H, G, d, rd = inp.num_heads, inp.num_kv_heads, inp.head_dim, inp.rotary
    n = H // G
    S = inp.moment
    k_pair_cov = rope.pair_covariance(inp.k @ S @ inp.k.T, G, d, rd)
    q_diag = ((inp.q @ inp.query_moment) * inp.q).sum(1).view(H, d)  # E[q_{h,i}^2]
    q_energy = (q_diag[:, : rd // 2] + q_diag[:, rd // 2 : rd]).T.contiguous()  # [P, H]
    v_moment = inp.v @ S @ inp.v.T
    o_heads = inp.o.double().view(-1, H, d).transpose(0, 1)  # [H, D, d]
    o_gram = torch.einsum("hDi,hDj->hij", o_heads, o_heads).view(G, n, d, d).sum(1)
    # What a unit score error of head h costs at the output: scale^2 x its value spread through W_O
    # (the same first-order weight as MLA's); "query" uses the mean weight for every head.
    mean = (inp.v @ S[:, -1]).view(G, d)
    v_cov = torch.stack([v_moment[g * d : (g + 1) * d, g * d : (g + 1) * d] for g in range(G)])
    v_cov = v_cov - mean[:, :, None] * mean[:, None, :]
    spread = torch.einsum("hDi,hij,hDj->h", o_heads, v_cov.repeat_interleave(n, 0), o_heads)
    weight = cfg.key_weight * inp.scale**2 * spread.clamp_min(0)
    if cfg.key_weighting == "query":
        weight = torch.full_like(weight, float(weight.mean()))
    k_pass = rope.passed_rows(inp.k, G, d, rd).reshape(-1, S.shape[0])  # [G*p, D+1]
    q_pass = rope.passed_rows(inp.q, H, d, rd)  # [H, p, D+1]
    q_pass_gram = (weight[:, None, None] * (q_pass @ inp.query_moment @ q_pass.transpose(1, 2))).view(G, n, d - rd, d - rd).sum(1)
    return LayerMoments(inp, k_pair_cov, q_energy * weight[None, :], v_moment, o_gram, k_pass @ S @ k_pass.T,
                        q_pass_gram)


def _heads_of(groups: list[int], n: int) -> torch.Tensor:
    """Query heads reading the given source KV heads, in that order: [len(groups) * n]."""
    return torch.cat([torch.arange(g * n, (g + 1) * n) for g in groups])


def key_fit(lm: LayerMoments, members: list[int]) -> tuple[rope.KeyBasis, float]:
    """Complex PCA basis of the merged heads' keys, and the score error of keeping only the top
    component of every pair (in output units)."""
    n = lm.heads_per_group
    idx = torch.tensor(members)
    cov = lm.k_pair_cov[:, idx][:, :, idx]
    q_energy = lm.q_energy[:, _heads_of(members, n)]
    local = torch.arange(len(members)).repeat_interleave(n)
    basis = rope.basis_from_covariance(cov, q_energy, local)
    # basis_from_covariance normalises the weights by their mean over the group at each pair:
    # undo that to get absolute score error (sum over pairs of the dropped components).
    w_mean = q_energy.view(q_energy.shape[0], len(members), n).sum(2).mean(1)  # [P]
    loss = float((w_mean * basis.weighted_energy[:, 1:].clamp_min(0).sum(1)).sum())
    return basis, loss


def value_metric(lm: LayerMoments, members: list[int]) -> torch.Tensor:
    return torch.block_diag(*[lm.o_gram[g] for g in members])


def value_loss(lm: LayerMoments, members: list[int]) -> float:
    """Output error of the rank-d value PCA of the merged heads (dropped spectrum)."""
    d = lm.inputs.head_dim
    idx = torch.cat([torch.arange(g * d, (g + 1) * d) for g in members])
    cov = lm.v_moment[idx][:, idx]
    eye = torch.eye(idx.numel(), dtype=torch.float64)
    sigma, *_ = lowrank.metric_spectrum(eye, cov, value_metric(lm, members))
    return float(sigma[d:].sum())


def pass_loss(lm: LayerMoments, members: list[int]) -> float:
    """Score error of the PCA of the merged heads' never-rotated key dims at their own width (0 if none)."""
    p = lm.inputs.head_dim - lm.inputs.rotary
    if not p:
        return 0.0
    idx = torch.cat([torch.arange(g * p, (g + 1) * p) for g in members])
    eye = torch.eye(idx.numel(), dtype=torch.float64)
    sigma, *_ = lowrank.metric_spectrum(eye, lm.k_pass_moment[idx][:, idx], torch.block_diag(*lm.q_pass_gram[members]))
    return float(sigma[p:].sum())


def group_cost(lm: LayerMoments, members: list[int]) -> float:
    if len(members) == 1:
        return 0.0
    return key_fit(lm, members)[1] + pass_loss(lm, members) + value_loss(lm, members)


def choose_groups(num_heads: int, size: int, cost, swap_rounds: int = 4) -> list[list[int]]:
    """Split heads 0..num_heads-1 into groups of `size` with a small total cost(group).

    Greedy: seed each group with the cheapest remaining pair and grow it by the head that adds
    least; then swap heads between groups while that lowers the total.
    """
    if size == 1:
        return [[g] for g in range(num_heads)]
    if size == num_heads:
        return [list(range(num_heads))]
    memo: dict[tuple, float] = {}

    def c(members) -> float:
        key = tuple(sorted(members))
        if key not in memo:
            memo[key] = cost(list(key))
        return memo[key]

    remaining = set(range(num_heads))
    groups: list[list[int]] = []
    while len(remaining) > size:
        a, b = min(itertools.combinations(sorted(remaining), 2), key=lambda p: c(p))
        members = [a, b]
        while len(members) < size:
            x = min(sorted(remaining - set(members)), key=lambda h: c(members + [h]))
            members.append(x)
        groups.append(sorted(members))
        remaining -= set(members)
    groups.append(sorted(remaining))
    for _ in range(swap_rounds):
        improved = False
        for gi, gj in itertools.combinations(range(len(groups)), 2):
            base = c(groups[gi]) + c(groups[gj])
            best = (0.0, None)
            for a in groups[gi]:
                for b in groups[gj]:
                    new_i = [h for h in groups[gi] if h != a] + [b]
                    new_j = [h for h in groups[gj] if h != b] + [a]
                    gain = base - c(new_i) - c(new_j)
                    if gain > best[0] + 1e-12 * max(base, 1e-30):
                        best = (gain, (new_i, new_j))
            if best[1] is not None:
                groups[gi], groups[gj] = sorted(best[1][0]), sorted(best[1][1])
                improved = True
        if not improved:
            break
    return sorted(groups)


def contiguous_groups(num_kv_heads: int, target: int) -> list[list[int]]:
    m = num_kv_heads // target
    return [list(range(c * m, (c + 1) * m)) for c in range(target)]


def layer_groups(lm: LayerMoments, cfg: GQAConfig, cost_of=group_cost) -> tuple[list[list[int]], float, float]:
    """(groups, predicted loss, predicted loss of contiguous groups) for one layer; `cost_of(lm,
    members)` scores one group (default: key and value loss of merging its heads)."""
    G = lm.inputs.num_kv_heads
    plain = contiguous_groups(G, cfg.num_kv_heads)
    plain_cost = sum(cost_of(lm, g) for g in plain)
    if cfg.grouping == "contiguous":
        return plain, plain_cost, plain_cost
    groups = choose_groups(G, G // cfg.num_kv_heads, lambda g: cost_of(lm, g), cfg.swap_rounds)
    cost = sum(cost_of(lm, g) for g in groups)
    if cost > plain_cost:  # the heuristic search should never lose to index order; keep the better
        groups, cost = plain, plain_cost
    return groups, cost, plain_cost


def merged_key(lm: LayerMoments, members: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One key head for the merged source KV heads `members` (step 1): its augmented rows [d, D+1]
    (rotated dims in half-split layout first, then the never-rotated ones) and the maps [m*n, d, d]
    that turn each reading query head's source query into its query for that key (query heads in
    `_heads_of(members)` order)."""
    inp = lm.inputs
    G, d, rd, n = inp.num_kv_heads, inp.head_dim, inp.rotary, lm.heads_per_group
    p = d - rd
    # Rotated dims: the top complex component of every pair; the queries take conj(B[j, g, 0]).
    basis, _ = key_fit(lm, members)
    comps = [(j, 0) for j in range(rd // 2)]
    zk = rope.complex_pairs(inp.k, G, d, rd)[members]  # [m, P, D+1]
    k_rows = rope.real_key_rows(rope.component_rows(basis, zk, comps), "half")  # [rd, D+1]
    local = torch.arange(len(members)).repeat_interleave(n)
    q_map = rope.real_query_map(rope.query_coefficients(basis, comps, local), comps, d, "half", rd)  # [m*n, rd, d]
    if not p:
        return k_rows, q_map
    # Never-rotated key dims: PCA at width p under the query metric; head h reads U_g^T q_h there.
    k_pass = rope.passed_rows(inp.k, G, d, rd)[members].reshape(len(members) * p, -1)
    fit = lowrank.fit_low_rank(k_pass, inp.moment, torch.block_diag(*lm.q_pass_gram[members]), p)
    up = fit.up.view(len(members), p, p)[local]  # [m*n, p (source dims), p (new dims)]
    pass_map = torch.cat([up.new_zeros(len(local), p, rd), up.transpose(1, 2)], dim=2)  # [m*n, p, d]
    return torch.cat([k_rows, fit.down]), torch.cat([q_map, pass_map], dim=1)


def build_layer(lm: LayerMoments, groups: list[list[int]], cfg: GQAConfig) -> dict[str, torch.Tensor]:
    """New attention tensors, float64, under projection names ("q_proj.weight", ..., biases
    as "q_proj.bias" etc. always present; the writer keeps those the source has)."""
    inp = lm.inputs
    H, G, d = inp.num_heads, inp.num_kv_heads, inp.head_dim
    n = lm.heads_per_group
    q_rows = inp.q.view(H, d, -1)
    o = inp.o.double()
    q_new, k_new, v_new, o_new = [], [], [], []
    for members in groups:
        heads = _heads_of(members, n)
        if cfg.method == "meanpool":
            k_new.append(inp.k.view(G, d, -1)[members].mean(0))
            v_new.append(inp.v.view(G, d, -1)[members].mean(0))
            q_new.append(q_rows[heads])
            o_new.extend(o[:, h * d : (h + 1) * d] for h in heads.tolist())
            continue
        k_rows, q_map = merged_key(lm, members)
        k_new.append(k_rows)
        q_new.append(q_map @ q_rows[heads])
        # Values: rank-d PCA under the W_O metric; reconstruction folded into W_O.
        rows = inp.v.view(G, d, -1)[members].reshape(len(members) * d, -1)
        fit = lowrank.fit_low_rank(rows, inp.moment, value_metric(lm, members), d)
        v_new.append(fit.down)
        for local_h, h in enumerate(heads.tolist()):
            g_local = local_h // n
            o_new.append(o[:, h * d : (h + 1) * d] @ fit.up[g_local * d : (g_local + 1) * d])
    q = torch.cat(q_new).reshape(H * d, -1)
    k = torch.cat(k_new).reshape(len(groups) * d, -1)
    v = torch.cat(v_new).reshape(len(groups) * d, -1)
    tensors = {
        "q_proj.weight": q[:, :-1], "q_proj.bias": q[:, -1],
        "k_proj.weight": k[:, :-1], "k_proj.bias": k[:, -1],
        "v_proj.weight": v[:, :-1], "v_proj.bias": v[:, -1],
        "o_proj.weight": torch.cat(o_new, dim=1),
    }
    if inp.o_bias is not None:
        tensors["o_proj.bias"] = inp.o_bias.double()
    return tensors
