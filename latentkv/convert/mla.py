"""GQA/MHA -> MLA (and its grouped form GLA) from calibration statistics.

Per layer (docs/method.md):
1. RoPE-commuting key basis per frequency (`rope.key_basis`): complex PCA of the keys weighted
   by query energy; exact.
2. The components with the largest loss-if-unrotated keep RoPE and form the cached RoPE key
   (any frequencies in the latentkv format; the DeepSeek frequency grid in that format).
3. The other key components lose their rotation (the query is scaled by the head's mean
   e^{i theta Delta}) and join the values in one latent, fitted by PCA under a metric
   (`lowrank.fit_low_rank`): keys under the query metric, values under the W_O metric.
4. The per-layer split between RoPE dims and latent dims, and the per-layer budget, minimise
   the predicted output error (rotation loss + dropped latent spectrum).
GLA fits one latent per contiguous group of query heads (`latent_heads`), each from only the keys
and values that its heads read, so a tensor-parallel shard holds only its latent head.
"""

from __future__ import annotations

import logging

from dataclasses import dataclass, field

import torch

from latentkv.convert import lowrank, rope
from latentkv.errors import LatentKVError


# What `latentkv convert SOURCE OUTPUT` keeps of the KV cache when no width or budget is given.
DEFAULT_KV_BUDGET = 0.5


@dataclass
class MLAConfig:
    """Settings of the MLA / GLA conversion.

    kv_lora_rank: latent width per layer (all layers), or None to derive it from kv_budget.
    kv_budget: fraction (0, 1] of the source's KV values per token to keep; ranks then per layer.
    qk_rope_dim: width of the cached RoPE key (even; up to all key dims in the latentkv format,
        at most the head dim in the DeepSeek format), or "auto" to choose it per layer.
    latent_heads: 1 for MLA; h_c > 1 for GLA (must divide the query heads).
    rope_mix: "complex" (exact per-frequency complex PCA), "real" (RoRoPE), "none" (keep heads).
    query_weighted: rank key components by query-weighted energy (score error), not key energy.
    shrink: scale de-rotated components by the head's mean e^{i theta Delta} (measured attention
        distances); off = drop the rotation outright.
    latent_metric: "whitened" (keys: query metric, values: W_O metric), "balanced" (TransMLA's
        BKV: equal key and value energy), "energy" (plain PCA).
    key_weight: multiplies the key side of the whitened metric (score error vs output error).
    rope_loss_weight: how much the predicted loss of a de-rotated component counts against latent
        error when choosing the RoPE width. The first-order estimate overstates it; 0.15 picked the
        measured best width on SmolLM2-135M at 50% and 33% (rows of scripts/bench_quality.py with --set rope_loss_weight).
    allocation: "per-layer" (one global budget, greedy over layers) or "uniform".
    sequential: take each layer's statistics from the output of the converted layers before it.
    refit_output: re-solve each layer's o_proj by least squares so that the new attention's output
        matches the source attention's on the converted prefix's activations (`convert.refit`).
    refit_ridge: the refit's shrinkage toward the one-shot o_proj, relative to the mean activation
        energy (too small a value gives weights that break in bf16).
    refit_bias: let the refit add an o_proj bias (its intercept); the DeepSeek export turns it off.
    refit_windows: calibration windows the refit pass runs on (the first N; default all): the
        pass costs about one forward of the model over them.
    center: fit the latent to centred keys and values; the key mean only shifts each query's
        scores equally (dropped) and the value mean goes into the output bias (needs an o_proj bias,
        so the DeepSeek export turns this off).
    rope_grid_step: DeepSeek format only: the RoPE key's pairs are source frequency pairs 0, s, 2s,
        ... (written as rope_theta' = theta^(s d_R / d), so DeepSeek's theta'^(-2i/d_R) lands on them).
        1 keeps the highest frequencies side by side, which is where the rotation matters: a slow
        pair turns little over the distances a head attends to, so the shrink constant stands in
        for it in the latent (on SmolLM2-135M the latentkv format's free choice keeps pairs 0-17).
        d / d_R spreads the pairs over the whole band (the source's own grid thinned).
    norm_ballast: DeepSeek format only: latent dims (out of kv_lora_rank) that carry no key or
        value but steady the latent RMSNorm's per-token scale (`export_deepseek.fit_norm_ballast`).
    sliding_layers: in a model that mixes sliding-window and full-attention layers (Gemma 2/3),
        "keep" (default) writes the sliding-window layers at the source's KV width (exact: their
        cache is bounded by the window, a small share of a long context's cache) and spends the
        budget on the full-attention layers; "convert" compresses every layer alike
        (docs/architectures.md gives the figures behind the default).
    """

    kv_lora_rank: int | None = None
    kv_budget: float | None = None
    qk_rope_dim: int | str = "auto"
    latent_heads: int = 1
    rope_mix: str = "complex"
    query_weighted: bool = True
    shrink: bool = True
    latent_metric: str = "whitened"
    key_weight: float = 1.0
    rope_loss_weight: float = 0.15
    allocation: str = "uniform"
    sequential: bool = False
    refit_output: bool = False
    refit_ridge: float = 1e-3
    refit_bias: bool = True
    refit_windows: int | None = None
    center: bool = True
    rope_frequency_grid: bool = False  # set by the DeepSeek export: RoPE key on `grid_pairs`
    rope_grid_step: int = 1
    norm_ballast: int = 1
    sliding_layers: str = "keep"

    def __post_init__(self):
        if self.kv_lora_rank is not None and self.kv_budget is not None:
            raise LatentKVError("Give one of --kv-lora-rank or --kv-budget, not both")
        if self.kv_lora_rank is None and self.kv_budget is None:
            self.kv_budget = DEFAULT_KV_BUDGET
            logging.getLogger(__name__).info(
                "no --kv-budget or --kv-lora-rank given: keeping %g of the KV cache (the default)", DEFAULT_KV_BUDGET)
        if self.kv_budget is not None and not 0 < self.kv_budget <= 1:
            raise LatentKVError(f"--kv-budget must be in (0, 1], got {self.kv_budget}")
        if self.kv_lora_rank is not None and self.kv_lora_rank < 1:
            raise LatentKVError(f"--kv-lora-rank must be >= 1, got {self.kv_lora_rank}")
        if self.qk_rope_dim != "auto":
            try:
                self.qk_rope_dim = int(self.qk_rope_dim)
            except (TypeError, ValueError):
                raise LatentKVError(f"--qk-rope-dim must be an even number >= 0 or 'auto', got {self.qk_rope_dim!r}") from None
            if self.qk_rope_dim < 0 or self.qk_rope_dim % 2:
                raise LatentKVError(f"--qk-rope-dim must be an even number >= 0 or 'auto', got {self.qk_rope_dim}")
        for name, allowed in (
            ("rope_mix", ("complex", "real", "none")),
            ("latent_metric", ("whitened", "balanced", "energy")),
            ("allocation", ("per-layer", "uniform")),
            ("sliding_layers", ("keep", "convert")),
        ):
            if getattr(self, name) not in allowed:
                raise LatentKVError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.latent_heads < 1:
            raise LatentKVError("--latent-heads must be >= 1")
        if self.refit_windows is not None and int(self.refit_windows) < 1:
            raise LatentKVError(f"refit_windows must be >= 1, got {self.refit_windows}")
        if int(self.norm_ballast) < 0:
            raise LatentKVError(f"norm_ballast must be >= 0, got {self.norm_ballast}")
        self.norm_ballast = int(self.norm_ballast)
        if int(self.rope_grid_step) < 1:
            raise LatentKVError(f"rope_grid_step must be >= 1, got {self.rope_grid_step}")
        self.rope_grid_step = int(self.rope_grid_step)
        self._coerce_numbers()

    def _coerce_numbers(self) -> None:
        for name in ("key_weight", "rope_loss_weight", "refit_ridge"):  # recipes may give "1e-3" as text
            try:
                setattr(self, name, float(getattr(self, name)))
            except (TypeError, ValueError):
                raise LatentKVError(f"{name} must be a number, got {getattr(self, name)!r}") from None


@dataclass
class LayerInputs:
    """One source attention block in float64 with biases as a last column.

    The rows of k and v act on the space whose second moment is `moment` (the attention input x,
    or for a QK-norm source the normalised keys and values, where k and v are 0/1 selections); the
    rows of q act on the space of `query_moment` (the same one unless `q_moment` is given: the
    normalised queries of a QK-norm source). Everything downstream reads only these.
    """

    q: torch.Tensor  # [H*d, D+1]
    k: torch.Tensor  # [G*d, D+1]
    v: torch.Tensor  # [G*d, D+1]
    o: torch.Tensor  # [D, H*d]
    o_bias: torch.Tensor | None
    moment: torch.Tensor  # [D+1, D+1]
    distance: torch.Tensor | None  # [H, L]
    inv_freq: torch.Tensor  # [d/2]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    rotary_dim: int | None = None  # RoPE turns the first rotary_dim dims of each head (None: all; 0: a layer without RoPE)
    q_moment: torch.Tensor | None = None  # [F_q+1, F_q+1] when q reads another space than k and v

    @property
    def rotary(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def query_moment(self) -> torch.Tensor:
        return self.moment if self.q_moment is None else self.q_moment

    @staticmethod
    def augment(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = weight.double()
        b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
        return torch.cat([w, b[:, None]], dim=1)


@dataclass
class LayerAnalysis:
    """Everything about one layer that does not depend on the chosen widths."""

    inputs: LayerInputs
    group_of_head: torch.Tensor
    zk: torch.Tensor
    basis: rope.KeyBasis
    shrink: torch.Tensor  # [H, P]
    head_weight: torch.Tensor  # [H] key-metric weight of each head
    rot_loss: torch.Tensor  # [P, G]
    q_cov: torch.Tensor  # [H, d, d] E[q_h q_h^T]
    curves: dict = field(default_factory=dict)  # rope_dim -> per-latent-head spectra


def analyse_layer(inp: LayerInputs, cfg: MLAConfig) -> LayerAnalysis:
    H, G, d, rd = inp.num_heads, inp.num_kv_heads, inp.head_dim, inp.rotary
    group_of_head = torch.arange(H) // (H // G)
    zk = rope.complex_pairs(inp.k, G, d, rd)
    zq = rope.complex_pairs(inp.q, H, d, rd)
    basis = rope.key_basis(zk, zq, inp.moment, group_of_head, cfg.rope_mix, cfg.query_weighted, inp.query_moment)
    measured = rope.rotation_shrink(inp.distance, inp.inv_freq, H)
    shrink = measured if cfg.shrink else rope.rotation_shrink(None, inp.inv_freq, H)
    q_rows = inp.q.view(H, d, -1)
    q_cov = q_rows @ inp.query_moment @ q_rows.transpose(1, 2)
    q_energy = q_cov.diagonal(dim1=1, dim2=2)
    q_energy = q_energy[:, : rd // 2] + q_energy[:, rd // 2 : rd]  # E|z^q_{h,j}|^2: [H, P]
    # How much a score error of head h moves the layer output: spread of its values through W_O.
    v_rows = inp.v.view(G, d, -1)
    mean = v_rows @ inp.moment[:, -1]  # [G, d]
    v_cov = v_rows @ inp.moment @ v_rows.transpose(1, 2) - mean[:, :, None] * mean[:, None, :]
    o_heads = inp.o.double().view(-1, H, d).transpose(0, 1)  # [H, D, d]
    spread = torch.einsum("hDi,hij,hDj->h", o_heads, v_cov[group_of_head], o_heads)
    head_weight = cfg.key_weight * inp.scale**2 * spread
    rot_loss = rope.rotation_loss(basis, q_energy, shrink, measured, group_of_head, head_weight)
    return LayerAnalysis(inp, group_of_head, zk, basis, shrink, head_weight, rot_loss, q_cov)


def _rope_split(an: LayerAnalysis, rope_dim: int, cfg: MLAConfig):
    P = an.inputs.rotary // 2
    if cfg.rope_frequency_grid:
        allowed = grid_pairs(rope_dim, cfg.rope_grid_step)
        kept = rope.select_rope_components(an.rot_loss, rope_dim // 2, allowed)
    else:
        kept = rope.select_rope_components(an.rot_loss, rope_dim // 2)
    kept_set = set(kept)
    G = an.inputs.num_kv_heads
    nope = [(j, m) for j in range(P) for m in range(G) if (j, m) not in kept_set]
    return kept, nope


def grid_pairs(rope_dim: int, step: int) -> list[int]:
    """Source frequency pairs a DeepSeek RoPE key of width rope_dim holds on a grid of this step."""
    return list(range(0, step * (rope_dim // 2), step))


def grid_fits(rope_dim: int, step: int, head_dim: int) -> bool:
    """Whether that grid stays within the source's head_dim / 2 frequency pairs."""
    return step * (rope_dim // 2 - 1) < head_dim // 2


def _head_groups(an: LayerAnalysis, latent_heads: int) -> list[torch.Tensor]:
    H = an.inputs.num_heads
    if H % latent_heads:
        raise LatentKVError(f"--latent-heads {latent_heads} must divide the {H} query heads")
    per = H // latent_heads
    return [torch.arange(c * per, (c + 1) * per) for c in range(latent_heads)]


def _latent_problem(an: LayerAnalysis, nope, heads: torch.Tensor, cfg: MLAConfig):
    """Rows T of z = [k_nope; v of the groups these heads read] and the metric of each coordinate.
    k_nope: the de-rotated key components, then (partial rotary) the never-rotated dims of the groups
    these heads read, as they are: nope_q maps each source query head onto these rows."""
    inp = an.inputs
    d, G, rd = inp.head_dim, inp.num_kv_heads, inp.rotary
    groups = torch.unique(an.group_of_head[heads])
    k_rows = rope.real_key_rows(rope.component_rows(an.basis, an.zk, nope), "pairs")  # [n_k, D+1]
    coeff = rope.query_coefficients(an.basis, nope, an.group_of_head, an.shrink)  # [H, n]
    nope_q = rope.real_query_map(coeff, nope, d, "pairs", rd)  # [H, n_k, d]
    if rd < d:  # no rotation to lose: query head h reads its own group's dims rd.. with its own dims rd..
        passed = rope.passed_rows(inp.k, G, d, rd)[groups]  # [g, d - rd, D+1]
        reads = (an.group_of_head[:, None] == groups[None, :]).double()  # [H, g]
        pass_q = torch.zeros(inp.num_heads, len(groups), d - rd, d, dtype=torch.float64)
        pass_q[..., rd:] = reads[:, :, None, None] * torch.eye(d - rd, dtype=torch.float64)
        k_rows = torch.cat([k_rows, passed.reshape(-1, passed.shape[-1])])
        nope_q = torch.cat([nope_q, pass_q.view(inp.num_heads, -1, d)], dim=1)
    # A constant on a position-free key adds the same term to every score of a query, which the
    # softmax removes exactly: the latent need not carry the key bias (an uncentred fit would spend
    # dims on it; Qwen2's key biases are large).
    k_rows = torch.cat([k_rows[:, :-1], torch.zeros_like(k_rows[:, -1:])], dim=1)
    v_rows = inp.v.view(G, d, -1)[groups].reshape(-1, inp.v.shape[1])
    rows = torch.cat([k_rows, v_rows], dim=0)
    n_k = k_rows.shape[0]
    if cfg.latent_metric == "whitened":
        qm = nope_q[heads]
        key_metric = torch.einsum("h,hai,hij,hbj->ab", an.head_weight[heads], qm, an.q_cov[heads], qm)
        o_heads = inp.o.double().view(-1, inp.num_heads, d).transpose(0, 1)  # [H, D, d]
        blocks = []
        for g in groups.tolist():
            hs = heads[an.group_of_head[heads] == g]
            blocks.append(torch.einsum("hDi,hDj->ij", o_heads[hs], o_heads[hs]))
        metric = torch.block_diag(key_metric, *blocks)
    else:
        metric = torch.eye(rows.shape[0], dtype=torch.float64)
        if cfg.latent_metric == "balanced" and n_k:
            cov_diag = (rows @ inp.moment * rows).sum(1)
            ratio = cov_diag[n_k:].sum() / cov_diag[:n_k].sum().clamp_min(1e-30)
            metric[:n_k, :n_k] *= ratio
    return rows, metric, n_k, nope_q, groups


def rope_dim_candidates(an: LayerAnalysis, cfg: MLAConfig, fmt_max: int) -> list[int]:
    total = min(an.inputs.num_kv_heads * an.inputs.rotary, fmt_max)
    if cfg.qk_rope_dim != "auto":  # a layer without RoPE (SmolLM3) has no RoPE key whatever the setting
        return [min(int(cfg.qk_rope_dim), total)]
    step = max(2, 2 * round(total / 32))
    widths = sorted(set(list(range(0, total + 1, step)) + [total]))
    if cfg.rope_frequency_grid:  # a DeepSeek RoPE key: not empty, and its grid within the source's pairs
        widths = [rd for rd in widths if rd and grid_fits(rd, cfg.rope_grid_step, an.inputs.head_dim)]
    return widths


def error_curve(an: LayerAnalysis, cfg: MLAConfig, rope_dims: list[int]) -> dict[int, tuple[float, list[torch.Tensor]]]:
    """For each RoPE width: (rotation loss, spectra of each latent head's problem)."""
    out = {}
    for rope_dim in rope_dims:
        kept, nope = _rope_split(an, rope_dim, cfg)
        rot = cfg.rope_loss_weight * sum(float(an.rot_loss[j, m]) for j, m in nope)
        spectra = []
        for heads in _head_groups(an, cfg.latent_heads):
            rows, metric, *_ = _latent_problem(an, nope, heads, cfg)
            sigma = lowrank.metric_spectrum_values(rows, an.inputs.moment, metric, cfg.center)
            spectra.append(sigma)
        out[rope_dim] = (rot, spectra)
    return out


def best_split(curve: dict, budget: int, latent_heads: int) -> tuple[float, int, int]:
    """(predicted error, rope_dim, kv_lora_rank) minimising the error at `budget` values per token."""
    best = None
    for rope_dim, (rot, spectra) in curve.items():
        rank = budget - rope_dim
        if rank < latent_heads or rank % latent_heads:  # each latent head holds at least one dim (the values)
            continue
        per = rank // latent_heads
        if any(per > s.numel() for s in spectra):
            continue
        err = rot + sum(float(s[per:].sum()) for s in spectra)
        if best is None or err < best[0]:
            best = (err, rope_dim, rank)
    return best


def build_layer(an: LayerAnalysis, rope_dim: int, rank: int, cfg: MLAConfig) -> tuple[dict, dict]:
    """New attention tensors (LatentAttention names) and the layer's spec for the config."""
    inp = an.inputs
    H, d = inp.num_heads, inp.head_dim
    kept, nope = _rope_split(an, rope_dim, cfg)
    # Cached RoPE key and the queries that read it.
    rope_k = rope.real_key_rows(rope.component_rows(an.basis, an.zk, kept), "half")  # [d_R, D+1]
    rope_q = rope.real_query_map(rope.query_coefficients(an.basis, kept, an.group_of_head), kept, d, "half",
                                 inp.rotary)
    inv_freq = [float(inp.inv_freq[j]) for j, _ in kept]
    heads_per_latent = H // cfg.latent_heads
    per_rank = rank // cfg.latent_heads
    o_bias = inp.o_bias.double() if inp.o_bias is not None else torch.zeros(inp.o.shape[0], dtype=torch.float64)
    downs, k_up, v_up = [], torch.zeros(H, d, per_rank, dtype=torch.float64), torch.zeros(H, d, per_rank, dtype=torch.float64)
    for c, heads in enumerate(_head_groups(an, cfg.latent_heads)):
        rows, metric, n_k, nope_q, groups = _latent_problem(an, nope, heads, cfg)
        if per_rank > rows.shape[0]:
            raise LatentKVError(
                f"kv_lora_rank {rank} is larger than possible for this layer ({rows.shape[0] * cfg.latent_heads} "
                f"with --qk-rope-dim {rope_dim}); lower --kv-lora-rank"
            )
        fit = lowrank.fit_low_rank(rows, inp.moment, metric, per_rank, cfg.center)
        downs.append(fit.down)
        z_mean, c_mean = rows @ inp.moment[:, -1], fit.down @ inp.moment[:, -1]
        for h in heads.tolist():
            g_index = int((groups == an.group_of_head[h]).nonzero()[0])
            k_up[h] = nope_q[h].T @ fit.up[:n_k]  # q_h . (N_h^T U_k c)
            v_up[h] = fit.up[n_k + g_index * d : n_k + (g_index + 1) * d]
            if cfg.center:  # what the latent misses of the value mean, delivered through the output bias
                v_miss = z_mean[n_k + g_index * d : n_k + (g_index + 1) * d] - v_up[h] @ c_mean
                o_bias = o_bias + inp.o.double()[:, h * d : (h + 1) * d] @ v_miss
    nope_dim = d if nope or inp.rotary < d else 0  # no non-rotated key at all: queries keep no nope part
    q_rows = inp.q.view(H, d, -1)
    q_new = torch.cat([q_rows[:, :nope_dim], rope_q @ q_rows], dim=1).reshape(H * (nope_dim + rope_dim), -1)
    kv_a = torch.cat([*downs, rope_k], dim=0)
    kv_b = torch.cat([k_up[:, :nope_dim], v_up], dim=1)  # [H, nope+d, r_c]
    kv_b = kv_b.view(cfg.latent_heads, heads_per_latent, nope_dim + d, per_rank).reshape(-1, per_rank)
    tensors, latent_bias = attention_tensors(q_new, kv_a, inp.o.double(), o_bias, inp.o_bias is not None or cfg.center)
    tensors["kv_b_proj.weight"] = kv_b
    spec = {
        "kv_lora_rank": rank,
        "rope_dim": rope_dim,
        "rope_inv_freq": inv_freq,
        "qk_nope_head_dim": nope_dim,
        "latent_heads": cfg.latent_heads,
        "latent_bias": latent_bias,
    }
    return tensors, spec


def attention_tensors(q_aug: torch.Tensor, kv_a_aug: torch.Tensor, o_weight: torch.Tensor, o_bias: torch.Tensor,
                      with_o_bias: bool) -> tuple[dict, bool]:
    """LatentAttention's q/kv_a/o tensors from augmented rows (last column = bias); a bias is
    written only where it is non-zero (q, kv_a) or asked for (o). Returns (tensors, latent_bias)."""
    latent_bias = bool(kv_a_aug[:, -1].abs().max() > 0)
    tensors = {"q_proj.weight": q_aug[:, :-1], "kv_a_proj.weight": kv_a_aug[:, :-1], "o_proj.weight": o_weight}
    if bool(q_aug[:, -1].abs().max() > 0):
        tensors["q_proj.bias"] = q_aug[:, -1]
    if latent_bias:
        tensors["kv_a_proj.bias"] = kv_a_aug[:, -1]
    if with_o_bias:
        tensors["o_proj.bias"] = o_bias
    return tensors, latent_bias
