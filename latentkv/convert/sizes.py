"""What each target would cache for a source: the rows of `latentkv inspect` (`TargetRecord.inspect`).

Each function takes the source's geometry, architecture entry and config and returns `InspectRow`s
(none where the target refuses the source). Where a target's own `validate` decides the widths
(GTA-T, GTA-S), the rows come from it, so they show what a conversion would write.
"""

from __future__ import annotations

from latentkv.convert.registry import InspectRow, get_method
from latentkv.errors import LatentKVError


def gqa_rows(geo, arch, config) -> list[InspectRow]:
    G, d = geo.num_kv_heads, geo.head_dim
    return [InspectRow(f"gqa --num-kv-heads {n}", f"2 x {n} x {d}", 2 * n * d)
            for n in range(G - 1, 0, -1) if G % n == 0 and not arch.gqa_refusal]


def mla_rows(geo, arch, config) -> list[InspectRow]:
    src = geo.kv_values_per_token_per_layer
    rows = []
    for frac in (0.5, 1 / 3, 0.25):
        v = int(round(frac * src))
        rows.append(InspectRow(f"mla --kv-budget {frac:.2g}", f"latent + RoPE key = {v}", v, keeps_sliding=True))
    return rows


def gla_rows(geo, arch, config) -> list[InspectRow]:
    if not (geo.num_heads % 2 == 0 or geo.num_heads % 3 == 0):
        return []
    hc = 2 if geo.num_heads % 2 == 0 else 3
    return [InspectRow(f"gla --latent-heads {hc} --kv-budget 0.5", f"{hc} latent heads + RoPE key",
                       int(round(geo.kv_values_per_token_per_layer / 2)), keeps_sliding=True)]


def validated(target: str, config, arch, options: dict):
    """The target's resolved config for this source with these options, or None where it refuses."""
    method = get_method(target)
    try:
        cfg = method.make_config(options, "latentkv")
        method.validate(config, arch, cfg, "latentkv")
    except LatentKVError:
        return None
    return cfg


def gta_rows(geo, arch, config) -> list[InspectRow]:
    if validated("gta", config, arch, {}) is None:
        return []
    G, d = geo.num_kv_heads, geo.head_dim
    return [InspectRow("gta", f"tied state {G} x {d} + RoPE key {d // 2}", G * d + d // 2)]


def gtas_rows(geo, arch, config) -> list[InspectRow]:
    rows = []
    d = geo.head_dim
    for budget in (0.5, 0.25):
        cfg = validated("gta-s", config, arch, {"map_heads": 1, "kv_budget": budget})
        if cfg is not None:
            rows.append(InspectRow(f"gta-s --set map_heads=1 --kv-budget {budget:g}",
                                   f"{cfg.map_heads} map key head x {d} + value latent {cfg.kv_lora_rank}",
                                   cfg.map_heads * d + cfg.kv_lora_rank))
    return rows
