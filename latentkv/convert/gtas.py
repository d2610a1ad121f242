"""GQA -> GTA-S (Grouped-head latenT Attention, Sun et al. 2025, arXiv 2506.17286).

Per layer the cache holds K key ("map") heads of the head dim d and one value latent c of width r:

    scores_h = scale * RoPE(q_h) . RoPE(k_{m(h)})          # K <= G key heads; head h reads m(h)
    a_h      = softmax(scores_h)                           # one attention map per query head
    out_h    = sigmoid(W_g,h x_t + b_g,h) * (W_up,h . sum_s a_h,t,s c_s)
    o        = W_O [out_1 .. out_H] + b_O
    cache per token per layer = K * d + r

Form of the gated decoder: the paper's released modeling code attends over the cached value
states, then expands each head's attention output by a per-head linear map (identity plus a
learned delta) and multiplies it, dim by dim, by sigmoid of a linear map of the current token's
attention input before o_proj. That is the form above with W_up,h one learned d x r map (the
identity-plus-delta parameterisation is the same set of maps). Attention runs over c itself, so
caching c suffices; the gate depends only on the query token, so at decode the up-projection
is applied once per head to the r-wide attention output (W_up cannot fold into W_O through a
token-dependent gate, but it stays r -> d per head, never per cached token).

The exact start (docs/method.md, GTA-S): K = G keeps every source key (so every attention map),
c = all G value heads (r = G * d, W_up,h = the rows of head h's KV group), gate weights 0 and
bias 0 so the gate is 1/2 everywhere, and W_O doubled. Compression, from calibration statistics:
1. Shared maps (K < G): groups of G/K source KV heads merge into one key head by the RoPE-
   commuting complex PCA per frequency of the GQA target (`gqa.merged_key`); which heads merge is
   chosen by the predicted score loss of the merge (`gqa.key_fit`, `gqa.layer_groups`), not by
   index. Query heads (with their W_O columns, gate rows and W_up blocks) are reordered so that
   each key head serves a contiguous block.
2. Value latent (r < G * d): PCA of all G value heads under the W_O metric (`lowrank`), the
   reconstruction U split per head into W_up,h. Centred: what c misses of the value mean goes
   into the output bias (exact while the gate is 1/2; healing adapts the rest).
One-shot compression loses accuracy that only training restores: GTA-S needs healing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentkv.convert import gqa, lowrank
from latentkv.errors import LatentKVError

GROUPINGS = gqa.GROUPINGS


@dataclass
class GTASConfig:
    """Settings of the GTA-S conversion.

    map_heads: key heads per layer, each giving the attention maps of the query heads reading it;
        must divide the source's KV heads (None = all of them: no map is shared).
    kv_lora_rank: width of the cached value latent per layer (1 .. KV heads x head dim), or
    kv_budget: fraction (0, 1] of the source's KV values per token to keep; the latent gets what
        the map heads leave (budget x 2 G d - map_heads x d). Neither: the full latent (exact start).
    grouping: how source KV heads merge into shared map heads: "similarity" (least predicted score
        loss, from the calibration statistics) or "contiguous" (index order).
    swap_rounds: passes of pairwise swaps refining the similarity grouping (0 = greedy only).
    center: fit the value latent to centred values; their mean goes into the output bias.
    """

    map_heads: int | None = None
    kv_lora_rank: int | None = None
    kv_budget: float | None = None
    grouping: str = "similarity"
    swap_rounds: int = 4
    center: bool = True

    def __post_init__(self):
        for name in ("map_heads", "kv_lora_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise LatentKVError(f"gta-s {name} must be a whole number >= 1, got {value!r}")
        if self.kv_lora_rank is not None and self.kv_budget is not None:
            raise LatentKVError("Give at most one of --kv-lora-rank (value latent width) or --kv-budget")
        if self.kv_budget is not None:
            self.kv_budget = float(self.kv_budget)
            if not 0 < self.kv_budget <= 1:
                raise LatentKVError(f"--kv-budget must be in (0, 1], got {self.kv_budget}")
        if self.grouping not in GROUPINGS:
            raise LatentKVError(f"gta-s grouping must be one of {', '.join(GROUPINGS)}, got {self.grouping!r}")
        if int(self.swap_rounds) < 0:
            raise LatentKVError(f"gta-s swap_rounds must be >= 0, got {self.swap_rounds}")
        self.swap_rounds = int(self.swap_rounds)

    def resolve(self, num_kv_heads: int, num_heads: int, head_dim: int) -> None:
        """Fill map_heads and kv_lora_rank from the source geometry, or say which option cannot be."""
        G, d = num_kv_heads, head_dim
        if self.map_heads is None:
            self.map_heads = G
        if self.map_heads > G or G % self.map_heads:
            choices = ", ".join(str(k) for k in range(1, G + 1) if G % k == 0)
            raise LatentKVError(f"gta-s map_heads {self.map_heads} must divide the source's {G} KV heads "
                                f"(maps are shared by equal groups); choose one of {choices}")
        if num_heads % self.map_heads:  # implied by the above for a GQA source; kept for clarity
            raise LatentKVError(f"gta-s map_heads {self.map_heads} must divide the {num_heads} query heads")
        full = G * d
        if self.kv_budget is not None:
            values = int(round(self.kv_budget * 2 * G * d))
            rank = values - self.map_heads * d
            if rank < 1:
                raise LatentKVError(
                    f"--kv-budget {self.kv_budget} gives {values} values per token, which the {self.map_heads} "
                    f"map heads ({self.map_heads * d} values) already fill; raise --kv-budget or lower map_heads")
            self.kv_lora_rank = min(rank, full)  # past every value dim the budget buys nothing more
        elif self.kv_lora_rank is None:
            self.kv_lora_rank = full
        if self.kv_lora_rank > full:
            raise LatentKVError(f"gta-s value latent {self.kv_lora_rank} is wider than possible: the source's values "
                                f"span {G} heads x {d} = {full} dims; use --kv-lora-rank at most {full}")


def key_cost(lm: gqa.LayerMoments, members: list[int]) -> float:
    """Predicted score loss of sharing one key head (its maps) among the KV heads `members`."""
    return gqa.key_fit(lm, members)[1] if len(members) > 1 else 0.0


def grouping_config(cfg: GTASConfig) -> gqa.GQAConfig:
    """The GQA settings whose moments and grouping search GTA-S reuses for its map heads."""
    return gqa.GQAConfig(num_kv_heads=cfg.map_heads, grouping=cfg.grouping, swap_rounds=cfg.swap_rounds)


def build_layer(lm: gqa.LayerMoments, groups: list[list[int]], cfg: GTASConfig) -> tuple[dict, dict, dict]:
    """New attention tensors (GroupedLatentAttention names, float64), the layer's spec, and fit figures."""
    inp = lm.inputs
    H, G, d = inp.num_heads, inp.num_kv_heads, inp.head_dim
    n, r = lm.heads_per_group, cfg.kv_lora_rank
    q_rows = inp.q.view(H, d, -1)
    q_new, k_new, order = [], [], []
    for members in groups:  # one key head per group; its query heads in a contiguous block
        heads = gqa._heads_of(members, n)
        k_rows, q_map = gqa.merged_key(lm, members)
        k_new.append(k_rows)
        q_new.append(q_map @ q_rows[heads])
        order += heads.tolist()
    everyone = list(range(G))
    fit = lowrank.fit_low_rank(inp.v, inp.moment, gqa.value_metric(lm, everyone), r, cfg.center)
    up = fit.up.view(G, d, r)  # value of KV head g ~ up[g] @ c
    o = inp.o.double()
    o_bias = inp.o_bias.double() if inp.o_bias is not None else torch.zeros(o.shape[0], dtype=torch.float64)
    v_mean = (inp.v @ inp.moment[:, -1]).view(G, d)
    c_mean = fit.down @ inp.moment[:, -1]
    o_new, up_new = [], []
    for h in order:
        o_h = o[:, h * d:(h + 1) * d]
        o_new.append(2 * o_h)  # the gate starts at sigmoid(0) = 1/2
        up_new.append(up[h // n])
        if cfg.center:  # what the latent misses of the value mean (the maps sum to 1)
            o_bias = o_bias + o_h @ (v_mean[h // n] - up[h // n] @ c_mean)
    q = torch.cat(q_new).reshape(H * d, -1)
    k = torch.cat(k_new)  # [K*d, D+1]
    D = inp.q.shape[1] - 1
    tensors = {
        "q_proj.weight": q[:, :-1], "q_proj.bias": q[:, -1],
        "k_proj.weight": k[:, :-1],
        "c_proj.weight": fit.down[:, :-1],
        "v_up_proj.weight": torch.cat(up_new),  # [H*d, r]
        "g_proj.weight": torch.zeros(H * d, D, dtype=torch.float64),
        "g_proj.bias": torch.zeros(H * d, dtype=torch.float64),
        "o_proj.weight": torch.cat(o_new, dim=1),
        "o_proj.bias": o_bias,
    }
    key_bias = bool(k[:, -1].abs().max() > 0)
    latent_bias = bool(fit.down[:, -1].abs().max() > 0)
    if key_bias:
        tensors["k_proj.bias"] = k[:, -1]
    if latent_bias:
        tensors["c_proj.bias"] = fit.down[:, -1]
    # "rope_dim" / "kv_lora_rank": the cached rotated keys and the latent, as every latentkv layer counts them.
    spec = {"kind": "gta-s", "map_heads": len(groups), "rope_dim": len(groups) * d, "kv_lora_rank": r,
            "key_bias": key_bias, "latent_bias": latent_bias}
    energy = float(fit.spectrum.sum())
    report = {"map_groups": groups, "value_rel_error": float(fit.spectrum[r:].sum()) / max(energy, 1e-300),
              "map_loss": sum(key_cost(lm, g) for g in groups)}
    return tensors, spec, report
