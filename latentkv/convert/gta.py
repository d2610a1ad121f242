"""GQA -> GTA-T (grouped tied attention, Zadouri, Strauss, Dao 2025, arXiv 2505.21487).

Per KV head g the cache holds one tied state s_g of the head dim d, and the layer holds one
shared RoPE key k_R of width d/2:

    value of every query head h of group g  = s_g                        (whole)
    key   of every query head h of group g  = [s_g[:d/2] | RoPE(k_R)]
    cache per token per layer               = G * d + d / 2

so the cache is a little over half of the source's 2 * G * d, and q/o keep the source's shapes.

The fit (no training; it needs healing afterwards), reusing the MLA machinery of `convert.mla`:
1. RoPE: the per-frequency key basis and its rotation losses (`mla.analyse_layer`); the d/4
   complex components that lose the most when de-rotated form k_R (`mla._rope_split`); the rest
   lose their rotation (with the measured shrink folded into the query).
2. For group g, the de-rotated keys that its query heads read (under their query metric) and its
   values (under its W_O metric) are the rows z = [k; v] of one least-squares problem
   (`mla._latent_problem`). The tied state is s = [a; b] with
       a = L_a x  (d/2 dims): read by keys and values,
       b = L_b x  (d/2 dims): read by values only,
   and every read-out (key: from a; value: from [a, b]) is the least-squares regression of its
   target on the code, folded into W_Q (key read-out transposed) and W_O (value read-out).
   Jointly optimal a is not closed-form; for each key weight w in `tie_key_weights`, a is the
   metric PCA of [w * keys; values] to d/2 dims, b the metric PCA of the values' residual after
   regressing them on a; the w with the least total error (keys + values, unweighted metric)
   wins. w -> 0 keeps the values exact (a, b span them) and leaves the keys to what the value
   span can give; large w fits the keys and leaves values half a state.
3. Centring as in MLA: the key mean shifts all scores of a query equally; what the state misses
   of the value mean goes into the output bias.
The layer's fit error (key and value parts relative to their total energy, in the same metrics)
is reported per layer.

Partial rotary (RoPE on the first rotary_dim dims of each head): the source's never-rotated key
dims join the de-rotated ones among the keys that the state's first half serves (they lose nothing
to de-rotation); the RoPE key keeps its d/2 dims, filled from rotating components only, so GTA-T
needs G x rotary_dim >= d/2 (`GTAMethod.validate` refuses the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentkv.convert import lowrank, mla, rope
from latentkv.errors import LatentKVError


@dataclass
class GTAConfig(mla.MLAConfig):
    """GTA-T settings: the MLA switches that apply (rope_mix, query_weighted, shrink, key_weight,
    center, sequential), and the key weights tried when fitting the tied state."""

    tie_key_weights: tuple = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

    def __post_init__(self):
        # Widths come from the geometry (G * d state, d/2 RoPE key); no rank or budget to give.
        if self.kv_lora_rank is not None or self.kv_budget is not None:
            raise LatentKVError("--to gta has fixed widths (one state of the head dim per KV head); drop "
                                "--kv-lora-rank / --kv-budget")
        self.latent_metric = "whitened"
        self._coerce_numbers()
        self.tie_key_weights = tuple(float(w) for w in self.tie_key_weights)
        if not self.tie_key_weights or min(self.tie_key_weights) < 0:
            raise LatentKVError("tie_key_weights must be a non-empty list of weights >= 0")


def _regress(target: torch.Tensor, code: torch.Tensor, moment: torch.Tensor, centered: bool) -> torch.Tensor:
    """Least-squares read-out U with target x ~ U code x over the statistics (ridge for rank loss)."""
    cov_cc = code @ moment @ code.T
    cov_tc = target @ moment @ code.T
    if centered:
        mc, mt = code @ moment[:, -1], target @ moment[:, -1]
        cov_cc = cov_cc - torch.outer(mc, mc)
        cov_tc = cov_tc - torch.outer(mt, mc)
    ridge = 1e-10 * cov_cc.diagonal().abs().max().clamp_min(1e-300)
    eye = torch.eye(cov_cc.shape[0], dtype=cov_cc.dtype, device=cov_cc.device)
    return torch.linalg.solve(cov_cc + ridge * eye, cov_tc.T).T


def _error(target: torch.Tensor, readout: torch.Tensor, code: torch.Tensor, moment: torch.Tensor,
           metric: torch.Tensor, centered: bool) -> float:
    """E[(z - U c)^T M (z - U c)] over the statistics (covariance if centred)."""
    resid = target - readout @ code
    cov = resid @ moment @ resid.T
    if centered:
        m = resid @ moment[:, -1]
        cov = cov - torch.outer(m, m)
    return float((metric * cov).sum())


@dataclass
class TiedFit:
    down: torch.Tensor  # [d, D+1] the state rows: a (first d/2) then b
    key_up: torch.Tensor  # [n_k, d/2] key rows from a
    value_up: torch.Tensor  # [d, d] value rows of the group from s
    key_error: float
    value_error: float
    key_energy: float
    value_energy: float
    key_weight: float


def fit_tied_state(rows: torch.Tensor, metric: torch.Tensor, n_k: int, moment: torch.Tensor, d: int,
                   key_weights: tuple, centered: bool) -> TiedFit:
    """The tied state of one KV group (module docstring, step 2)."""
    half = d // 2
    k_rows, v_rows = rows[:n_k], rows[n_k:]
    k_metric, v_metric = metric[:n_k, :n_k], metric[n_k:, n_k:]
    zero = torch.zeros(0, rows.shape[1], dtype=rows.dtype, device=rows.device)
    key_energy = _error(k_rows, torch.zeros(n_k, 0, dtype=rows.dtype, device=rows.device), zero, moment, k_metric, centered)
    value_energy = _error(v_rows, torch.zeros(d, 0, dtype=rows.dtype, device=rows.device), zero, moment, v_metric, centered)
    best = None
    for w in key_weights:
        weighted = metric.clone()
        weighted[:n_k, :n_k] *= w
        a = lowrank.fit_low_rank(rows, moment, weighted, half, centered).down
        v_on_a = _regress(v_rows, a, moment, centered)
        b = lowrank.fit_low_rank(v_rows - v_on_a @ a, moment, v_metric, half, centered).down
        state = torch.cat([a, b])
        key_up = _regress(k_rows, a, moment, centered) if n_k else torch.zeros(0, half, dtype=rows.dtype)
        value_up = _regress(v_rows, state, moment, centered)
        k_err = _error(k_rows, key_up, a, moment, k_metric, centered) if n_k else 0.0
        v_err = _error(v_rows, value_up, state, moment, v_metric, centered)
        if best is None or k_err + v_err < best.key_error + best.value_error:
            best = TiedFit(state, key_up, value_up, k_err, v_err, key_energy, value_energy, w)
    return best


def build_gta_layer(an: mla.LayerAnalysis, cfg: GTAConfig) -> tuple[dict, dict]:
    """New attention tensors (LatentAttention names, tied layout) and the layer's spec."""
    inp = an.inputs
    H, G, d = inp.num_heads, inp.num_kv_heads, inp.head_dim
    half = d // 2
    kept, nope = mla._rope_split(an, half, cfg)
    rope_k = rope.real_key_rows(rope.component_rows(an.basis, an.zk, kept), "half")  # [d/2, D+1]
    rope_q = rope.real_query_map(rope.query_coefficients(an.basis, kept, an.group_of_head), kept, d, "half",
                                 inp.rotary)
    q_rows = inp.q.view(H, d, -1)
    o = inp.o.double()
    o_bias = inp.o_bias.double() if inp.o_bias is not None else torch.zeros(o.shape[0], dtype=torch.float64)
    q_new, o_new, states = [], torch.empty_like(o), []
    k_err = v_err = k_energy = v_energy = 0.0
    weights = []
    for g, heads in enumerate(mla._head_groups(an, G)):
        rows, metric, n_k, nope_q, groups = mla._latent_problem(an, nope, heads, cfg)
        fit = fit_tied_state(rows, metric, n_k, inp.moment, d, cfg.tie_key_weights, cfg.center)
        states.append(fit.down)
        k_err, v_err = k_err + fit.key_error, v_err + fit.value_error
        k_energy, v_energy = k_energy + fit.key_energy, v_energy + fit.value_energy
        weights.append(fit.key_weight)
        state_mean = fit.down @ inp.moment[:, -1]
        v_mean = rows[n_k:] @ inp.moment[:, -1]
        for h in heads.tolist():
            # score_nope = q_h^T N_h^T key_up a: the query reads a through (key_up^T N_h q_h).
            k_read = nope_q[h].T @ fit.key_up if n_k else torch.zeros(d, half, dtype=torch.float64)
            q_new.append(torch.cat([k_read.T @ q_rows[h], rope_q[h] @ q_rows[h]]))
            o_new[:, h * d:(h + 1) * d] = o[:, h * d:(h + 1) * d] @ fit.value_up
            if cfg.center:
                o_bias = o_bias + o[:, h * d:(h + 1) * d] @ (v_mean - fit.value_up @ state_mean)
    q_new = torch.cat(q_new)  # [H * d, D+1]
    kv_a = torch.cat([*states, rope_k])
    tensors, latent_bias = mla.attention_tensors(q_new, kv_a, o_new, o_bias, inp.o_bias is not None or cfg.center)
    spec = {
        "kv_lora_rank": G * d,
        "rope_dim": half,
        "rope_inv_freq": [float(inp.inv_freq[j]) for j, _ in kept],
        "qk_nope_head_dim": half,
        "latent_heads": G,
        "latent_bias": latent_bias,
        "tied": True,
    }
    report = {
        "rope_loss": float(sum(float(an.rot_loss[j, m]) for j, m in nope)),
        "key_rel_error": k_err / max(k_energy, 1e-300),
        "value_rel_error": v_err / max(v_energy, 1e-300),
        "tie_key_weight": weights,
    }
    return tensors, spec, report
