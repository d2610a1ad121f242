"""MLA / GLA as a registered method: plan widths, swap modules, write the latentkv folder.

The tensors themselves come from `convert.mla`; this module only decides widths across layers
and turns tensors into modules and files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field

import torch

from latentkv.calibration.runner import release_freed_memory
from latentkv.arch import geometry_of, hybrid_sliding
from latentkv.convert import mla
from latentkv.convert.method import Capabilities
from latentkv.convert.output import LAYERS_FILE, write_cards, write_globals, write_layer
from latentkv.convert.qk_norm import with_source_projections
from latentkv.errors import LatentKVError
from latentkv.typed import typed_settings

log = logging.getLogger(__name__)

FORMATS = ("latentkv", "deepseek")


@dataclass
class MLAPlan:
    widths: list[tuple[int, int]]  # (rope_dim, kv_lora_rank) per layer
    predicted_error: list[float]
    # layer -> (tensors, spec), filled by sequential calibration (`convert` spills them to disk)
    built: dict = field(default_factory=dict)
    reports: dict = field(default_factory=dict)  # layer -> fit figures known only once the layer is built
    fmt: str = "latentkv"  # output format, for widths chosen during the pass (`plan_in_pass`)

    def key(self) -> list:
        return [list(w) for w in self.widths]


def allocate(curves: list[dict], budgets: list[int], total: int, latent_heads: int, per_layer: bool) -> list[tuple]:
    """Per-layer (error, rope_dim, rank). Uniform: each layer gets its own budget. Per-layer: the
    total is spread greedily by the best error drop per value (looking past non-convex steps)."""
    if not per_layer:
        out = []
        for i, (curve, b) in enumerate(zip(curves, budgets)):
            best = mla.best_split(curve, b, latent_heads)
            if best is None:
                raise LatentKVError(f"No feasible RoPE/latent split for layer {i} at {b} values per token")
            out.append(best)
        return out
    unit = 2 * latent_heads
    tables = []
    for curve in curves:
        max_b = max(rd + sum(s.numel() for s in spectra) for rd, (_, spectra) in curve.items())
        table = {}
        for b in range(0, max_b + 1, unit):
            best = mla.best_split(curve, b, latent_heads)
            if best is not None:
                table[b] = best
        # Errors are in each layer's own output units: compare layers by relative error.
        scale = max(max(e for e, _, _ in table.values()), 1e-30)
        tables.append({b: (e / scale, rd, r) for b, (e, rd, r) in table.items()})
    current = [min(t) for t in tables]
    remaining = total - sum(current)
    if remaining < 0:
        raise LatentKVError("The KV budget is below the smallest feasible width of every layer; raise --kv-budget")
    while remaining >= unit:
        best_gain, best_layer, best_b = 0.0, None, None
        for i, table in enumerate(tables):
            err_now = table[current[i]][0]
            for b, (err, _, _) in table.items():
                if current[i] < b <= current[i] + remaining:
                    gain = (err_now - err) / (b - current[i])
                    if gain > best_gain:
                        best_gain, best_layer, best_b = gain, i, b
        if best_layer is None:
            break
        remaining -= best_b - current[best_layer]
        current[best_layer] = best_b
    return [tables[i][current[i]] for i in range(len(tables))]


def shared_split(curves: list[dict], budget: int, latent_heads: int) -> list[tuple]:
    """One (RoPE, latent) split for every layer (the DeepSeek format has one of each): the RoPE
    width with the least summed error, each layer's errors taken relative to its worst width so
    that every layer counts alike (as `allocate` compares layers)."""
    per_width: dict[int, list] = {}
    for curve in curves:
        splits = {rd: mla.best_split({rd: entry}, budget, latent_heads) for rd, entry in curve.items()}
        splits = {rd: sp for rd, sp in splits.items() if sp is not None}
        scale = max([sp[0] for sp in splits.values()] + [1e-30])
        for rd, sp in splits.items():
            per_width.setdefault(rd, []).append((sp[0] / scale, sp))
    feasible = {rd: rows for rd, rows in per_width.items() if len(rows) == len(curves)}
    if not feasible:
        raise LatentKVError(f"No RoPE/latent split fits {budget} values per token in every layer; raise --kv-budget")
    totals = {rd: sum(rel for rel, _ in rows) for rd, rows in feasible.items()}
    for rd in sorted(totals):
        log.info("shared RoPE width %d: summed relative error %.4g", rd, totals[rd])
    best = min(totals, key=totals.get)
    return [sp for _, sp in feasible[best]]


class MLAMethod:
    name = "mla"
    config_cls = mla.MLAConfig
    capabilities = Capabilities(sequential_pass=True, output_refit=True, plan_in_pass=True, formats=FORMATS)

    def make_config(self, options: dict, fmt: str) -> mla.MLAConfig:
        if fmt not in FORMATS:
            raise LatentKVError(f"--format must be one of {', '.join(FORMATS)} for --to {self.name}, got {fmt!r}")
        known = {f.name for f in dataclasses.fields(mla.MLAConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LatentKVError(f"Unknown {self.name} settings: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        options = dict(options)
        if fmt == "deepseek":
            options["rope_frequency_grid"] = True
            options["allocation"] = "uniform"
            options["center"] = False  # DeepSeek's o_proj has no bias to take the value mean
            options["refit_bias"] = False  # nor the refit's intercept
        return mla.MLAConfig(**typed_settings(mla.MLAConfig, options, self.name))

    def validate(self, config, arch, cfg: mla.MLAConfig, fmt: str) -> None:
        geo = geometry_of(config)
        total_key = geo.num_kv_heads * geo.head_dim
        rotated = geo.num_kv_heads * geo.rotary_dim
        if fmt == "deepseek":
            from latentkv.convert.export_deepseek import deepseek_refusal

            refusal = deepseek_refusal(config, arch)
            if refusal:
                raise LatentKVError(f"--format deepseek cannot hold {arch.model_type}: {refusal}. "
                                    "Use --format latentkv for this model.")
            if cfg.norm_ballast < 1 and any(arch.has_bias(config, w) for w in ("q", "o")):
                raise LatentKVError(f"{arch.model_type} has attention biases, which --format deepseek carries on "
                                    "norm ballast dims; use norm_ballast >= 1 (the default) or --format latentkv")
            if cfg.qk_rope_dim == "auto" and cfg.kv_lora_rank is not None:  # DeepSeek's own, within the head dim
                cfg.qk_rope_dim = min(64, geo.head_dim)
        if cfg.qk_rope_dim != "auto" and cfg.qk_rope_dim > rotated:
            raise LatentKVError(
                f"--qk-rope-dim {cfg.qk_rope_dim} exceeds the source's rotated key dims ({geo.num_kv_heads} KV heads x "
                f"{geo.rotary_dim} = {rotated}); use at most {rotated}"
            )
        if fmt == "deepseek":
            if cfg.latent_heads != 1:
                raise LatentKVError("--format deepseek holds one latent head; use --format latentkv for GLA")
            if cfg.qk_rope_dim != "auto" and cfg.qk_rope_dim > geo.head_dim:
                raise LatentKVError(
                    f"--format deepseek needs --qk-rope-dim at most the head dim {geo.head_dim}, got {cfg.qk_rope_dim}"
                )
            if cfg.qk_rope_dim != "auto" and not mla.grid_fits(cfg.qk_rope_dim, cfg.rope_grid_step, geo.head_dim):
                widest = (geo.head_dim // 2 - 1) // max(cfg.qk_rope_dim // 2 - 1, 1)
                raise LatentKVError(
                    f"rope_grid_step {cfg.rope_grid_step} puts a {cfg.qk_rope_dim}-dim RoPE key past the source's "
                    f"{geo.head_dim // 2} frequencies; use rope_grid_step <= {widest}"
                )
        if geo.num_heads % cfg.latent_heads:
            raise LatentKVError(f"--latent-heads {cfg.latent_heads} must divide the {geo.num_heads} query heads")
        # each latent head: the keys not in the RoPE key, and the values of the KV heads its query heads read
        heads = torch.arange(geo.num_heads).view(cfg.latent_heads, -1) // geo.group_size
        groups = max(len(torch.unique(h)) for h in heads)
        max_rank = cfg.latent_heads * (total_key - (0 if cfg.qk_rope_dim == "auto" else cfg.qk_rope_dim)
                                       + groups * geo.head_dim)
        if cfg.kv_lora_rank is not None and cfg.kv_lora_rank > max_rank:
            raise LatentKVError(
                f"--kv-lora-rank {cfg.kv_lora_rank} is larger than possible: this model's keys and values span at most "
                f"{max_rank} dims next to a {cfg.qk_rope_dim}-dim RoPE key; use at most {max_rank}"
            )

    def plan(self, stream, stats, cfg: mla.MLAConfig, fmt: str) -> MLAPlan:
        geo = geometry_of(stream.config)
        if cfg.kv_lora_rank is not None:
            return self._fixed_plan(stream, geo, cfg, fmt)
        budget = self._layer_budget(geo, cfg)
        kept = self.kept_layers(stream, cfg)
        # Uniform: no layer can hold a RoPE key wider than its own budget, so wider ones are not scored.
        widest = budget if cfg.allocation == "uniform" else None
        curves = [self._layer_curve(stream, i, stats[i], cfg, fmt, self._kept_width(stream, i, geo, cfg) if i in kept
                                    else widest) for i in range(geo.num_layers)]
        if fmt == "deepseek":
            choice = shared_split(curves, budget, cfg.latent_heads)
        else:
            spent = [i for i in range(geo.num_layers) if i not in kept]
            choice = [None] * geo.num_layers
            for i, c in zip(spent, allocate([curves[i] for i in spent], [budget] * len(spent), budget * len(spent),
                                            cfg.latent_heads, per_layer=cfg.allocation == "per-layer")):
                choice[i] = c
            for i in kept:  # at the source's KV width: exact
                choice[i] = mla.best_split(curves[i], self._kept_width(stream, i, geo, cfg), cfg.latent_heads)
        for i, (err, rd, r) in enumerate(choice):
            log.info("layer %d: RoPE key %d + latent %d = %d values (predicted error %.4g)", i, rd, r, rd + r, err)
        return MLAPlan(widths=self._reserve_ballast([(rd, r) for _, rd, r in choice], cfg, fmt),
                       predicted_error=[c[0] for c in choice])

    @staticmethod
    def kept_layers(stream, cfg) -> set[int]:
        """Sliding-window layers written at the source's KV width (`MLAConfig.sliding_layers`)."""
        layers = stream.arch.layer_attentions(stream.config)
        if getattr(cfg, "sliding_layers", "convert") != "keep" or not hybrid_sliding(layers):
            return set()
        return {i for i, layer in enumerate(layers) if layer.sliding_window is not None}

    @staticmethod
    def _kept_width(stream, i: int, geo, cfg) -> int:
        """Values per token of a kept layer: every rotated key dim as the RoPE key, and a latent
        as wide as what each latent head's query heads read (the source's width for MLA, and for
        GLA where the latent heads split the KV heads evenly)."""
        rd = geo.rotary_dim if stream.layer_attention(i).rope else 0
        heads = torch.arange(geo.num_heads).view(cfg.latent_heads, -1) // geo.group_size
        groups = max(len(torch.unique(h)) for h in heads)
        return geo.num_kv_heads * rd + cfg.latent_heads * groups * (2 * geo.head_dim - rd)

    def plan_in_pass(self, stream, cfg: mla.MLAConfig, fmt: str) -> MLAPlan | None:
        """For sequential calibration in one pass: a plan whose widths `sequential_module` picks
        layer by layer from the statistics the converted layers before produce. Only where a layer's
        width depends on its own statistics alone (uniform allocation); None otherwise."""
        geo = geometry_of(stream.config)
        if cfg.kv_lora_rank is not None:
            return self._fixed_plan(stream, geo, cfg, fmt)
        if cfg.allocation != "uniform" or (fmt == "deepseek" and cfg.qk_rope_dim == "auto"):
            return None  # DeepSeek's one RoPE width is chosen from every layer's curve: a source pass first
        return MLAPlan(widths=[None] * geo.num_layers, predicted_error=[float("nan")] * geo.num_layers, fmt=fmt)

    def _choose_in_pass(self, stream, i: int, stats, plan: MLAPlan, cfg: mla.MLAConfig) -> None:
        geo = geometry_of(stream.config)
        budget = self._kept_width(stream, i, geo, cfg) if i in self.kept_layers(stream, cfg) else self._layer_budget(geo, cfg)
        best = mla.best_split(self._layer_curve(stream, i, stats, cfg, plan.fmt, budget), budget, cfg.latent_heads)
        if best is None:
            raise LatentKVError(f"No feasible RoPE/latent split for layer {i} at this budget; raise --kv-budget")
        err, rd, r = best
        log.info("layer %d: RoPE key %d + latent %d = %d values (predicted error %.4g)", i, rd, r, rd + r, err)
        plan.widths[i], plan.predicted_error[i] = self._reserve_ballast([(rd, r)], cfg, plan.fmt)[0], err

    def _fixed_plan(self, stream, geo, cfg: mla.MLAConfig, fmt: str) -> MLAPlan:
        rope_dim = min(64, self._max_rope(geo, fmt)) if cfg.qk_rope_dim == "auto" else cfg.qk_rope_dim
        kept = self.kept_layers(stream, cfg)
        widths = []
        for i in range(geo.num_layers):
            if i in kept:  # every rotated key dim in the RoPE key, the rest in the latent
                full = self._kept_width(stream, i, geo, cfg)
                rd = geo.num_kv_heads * geo.rotary_dim if stream.layer_attention(i).rope else 0
                widths.append((rd, full - rd))
            else:  # a layer without RoPE caches its whole key in the latent
                widths.append((rope_dim if stream.layer_attention(i).rope else 0, cfg.kv_lora_rank))
        return MLAPlan(widths=self._reserve_ballast(widths, cfg, fmt), predicted_error=[float("nan")] * geo.num_layers)

    @staticmethod
    def _max_rope(geo, fmt: str) -> int:
        return geo.rotary_dim if fmt == "deepseek" else geo.num_kv_heads * geo.rotary_dim

    @staticmethod
    def _layer_budget(geo, cfg: mla.MLAConfig) -> int:
        return int(round(cfg.kv_budget * geo.kv_values_per_token_per_layer))

    def _layer_curve(self, stream, i: int, stats, cfg: mla.MLAConfig, fmt: str, widest: int | None = None) -> dict:
        """Predicted error per RoPE width of layer i (widths up to `widest`, if given)."""
        from latentkv.convert.pipeline import layer_inputs_from

        fmt_max = self._max_rope(geometry_of(stream.config), fmt)
        # The linear algebra runs in float64 on the conversion device (eigh of ~2x KV-dim matrices).
        with torch.device(stream.device):
            an = mla.analyse_layer(layer_inputs_from(stream, i, stats), cfg)
            candidates = mla.rope_dim_candidates(an, cfg, fmt_max)
            if widest is not None:
                candidates = [rd for rd in candidates if rd <= widest] or candidates[:1]
            curve = mla.error_curve(an, cfg, candidates)
        curve = {rd: (rot, [s.cpu() for s in spectra]) for rd, (rot, spectra) in curve.items()}
        del an  # the layer's float64 analysis: its heap pages go back before the next layer's
        release_freed_memory()
        return curve

    @staticmethod
    def _reserve_ballast(widths: list[tuple[int, int]], cfg: mla.MLAConfig, fmt: str) -> list[tuple[int, int]]:
        """(RoPE, latent) widths -> the widths the fit gets: in the DeepSeek format the cached latent
        keeps its width, but `norm_ballast` of its dims steady the RMSNorm instead of carrying keys
        and values (export_deepseek)."""
        if fmt != "deepseek" or not cfg.norm_ballast:
            return widths
        rank = min(r for _, r in widths)
        if rank <= cfg.norm_ballast:
            raise LatentKVError(f"kv_lora_rank {rank} leaves no latent dims next to norm_ballast "
                                f"{cfg.norm_ballast}; raise the rank or use --set norm_ballast=0")
        return [(rd, r - cfg.norm_ballast) for rd, r in widths]

    def build(self, stream, i: int, stats, plan: MLAPlan, cfg: mla.MLAConfig):
        from latentkv.convert.pipeline import layer_inputs_from

        if i in plan.built:
            return plan.built[i]
        rope_dim, rank = plan.widths[i]
        with torch.device(stream.device):
            an = mla.analyse_layer(layer_inputs_from(stream, i, stats), cfg)
            tensors, spec = with_source_projections(stream, i, *mla.build_layer(an, rope_dim, rank, cfg))
        return tensors, with_layer_rope(stream, i, spec)

    def sequential_module(self, stream, i, stats, plan: MLAPlan, cfg: mla.MLAConfig, source_attn=None, batches=None):
        """Layer i's new attention during the pass through the converted layers (kept for writing);
        with `refit_output`, its o_proj re-solved against the source attention on these inputs."""
        if plan.widths[i] is None:  # one-pass sequential calibration: this layer's width from its statistics
            self._choose_in_pass(stream, i, stats, plan, cfg)
        tensors, spec = self.build(stream, i, stats, plan, cfg)
        module = attention_module(stream, i, tensors, spec, source_attn)
        if cfg.refit_output:
            from latentkv.convert.refit import ReplayedAttention, refit_output_projection

            weight, bias, recorded = refit_output_projection(module, source_attn, batches,
                                                             with_bias=self.output_bias(cfg), ridge=cfg.refit_ridge)
            tensors = {**tensors, "o_proj.weight": weight.cpu()}
            if bias is not None:
                tensors["o_proj.bias"] = bias.cpu()
            plan.built[i] = (_kept(tensors), spec)
            # The layer's forward reuses the per-head outputs just computed, through the new o_proj.
            return ReplayedAttention(attention_module(stream, i, tensors, spec, source_attn).o_proj, recorded)
        plan.built[i] = (_kept(tensors), spec)
        return module

    def output_bias(self, cfg) -> bool:
        """Whether the written o_proj has a bias (the centred value mean or the refit's intercept)."""
        return cfg.center or (cfg.refit_output and cfg.refit_bias)

    def write(self, stream, stats, plan, cfg, opts, source, folder, save_dtype, progress=None):
        if opts.format == "deepseek":
            from latentkv.convert.export_deepseek import write_deepseek

            return write_deepseek(self, stream, stats, plan, cfg, opts, source, folder, save_dtype, progress)
        return write_latentkv(self, stream, stats, plan, cfg, opts, source, folder, save_dtype, progress)


class GLAMethod(MLAMethod):
    name = "gla"
    capabilities = Capabilities(sequential_pass=True, output_refit=True, plan_in_pass=True, formats=("latentkv",))

    def make_config(self, options: dict, fmt: str) -> mla.MLAConfig:
        options = dict(options)
        options.setdefault("latent_heads", 2)
        if fmt != "latentkv":
            raise LatentKVError("GLA is written in the latentkv format only (DeepSeek's format has one latent head)")
        return super().make_config(options, fmt)


class GTAMethod(MLAMethod):
    """GTA-T: one tied state per KV head plus a half-head-dim shared RoPE key (`convert.gta`)."""

    name = "gta"
    capabilities = Capabilities(sequential_pass=True, output_refit=True, plan_in_pass=True, formats=("latentkv",))

    def make_config(self, options: dict, fmt: str):
        from latentkv.convert.gta import GTAConfig

        if fmt != "latentkv":
            raise LatentKVError("GTA-T is written in the latentkv format only")
        known = {f.name for f in dataclasses.fields(GTAConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LatentKVError(f"Unknown gta settings: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        options = dict(options)
        if options.pop("qk_rope_dim", "auto") not in ("auto", None):
            raise LatentKVError("--to gta has a fixed RoPE key of half the head dim; drop --qk-rope-dim")
        return GTAConfig(**typed_settings(GTAConfig, options, self.name))

    def validate(self, config, arch, cfg, fmt: str) -> None:
        geo = geometry_of(config)
        if geo.head_dim % 4:
            raise LatentKVError(f"GTA-T splits the head dim into RoPE pairs of halves; head dim {geo.head_dim} "
                                "is not a multiple of 4")
        if geo.num_kv_heads * geo.rotary_dim < geo.head_dim // 2:
            # The never-rotated dims join the tied state like de-rotated ones; but the RoPE key of d/2
            # must be filled with rotating components, and the source has fewer.
            raise LatentKVError(
                f"GTA-T's RoPE key has half the head dim ({geo.head_dim // 2}), but RoPE turns only "
                f"{geo.num_kv_heads} x {geo.rotary_dim} key dims of this model; use --to mla or --to gla"
            )
        if arch.rope_free_layers(config):
            raise LatentKVError(
                f"GTA-T's RoPE key has half the head dim, but layers {arch.rope_free_layers(config)} of this model "
                "apply no RoPE; use --to mla or --to gla (they cache those layers' keys whole in the latent)")
        cfg.latent_heads = geo.num_kv_heads
        cfg.qk_rope_dim = geo.head_dim // 2

    def plan(self, stream, stats, cfg, fmt: str) -> MLAPlan:
        geo = geometry_of(stream.config)
        width = (geo.head_dim // 2, geo.num_kv_heads * geo.head_dim)
        return MLAPlan(widths=[width] * geo.num_layers, predicted_error=[float("nan")] * geo.num_layers)

    def plan_in_pass(self, stream, cfg, fmt: str) -> MLAPlan:
        return self.plan(stream, None, cfg, fmt)  # fixed widths

    def build(self, stream, i: int, stats, plan: MLAPlan, cfg):
        from latentkv.convert import gta
        from latentkv.convert.pipeline import layer_inputs_from

        if i in plan.built:
            return plan.built[i]
        with torch.device(stream.device):
            an = mla.analyse_layer(layer_inputs_from(stream, i, stats), cfg)
            tensors, spec, report = gta.build_gta_layer(an, cfg)
            tensors, spec = with_source_projections(stream, i, tensors, spec)
            spec = with_layer_rope(stream, i, spec)
        plan.reports[i] = report
        log.info("layer %d: tied-state fit error keys %.3f, values %.3f (relative); RoPE de-rotation loss %.4g",
                 i, report["key_rel_error"], report["value_rel_error"], report["rope_loss"])
        return tensors, spec


def with_layer_rope(stream, i: int, spec: dict) -> dict:
    """A layer's spec with its own RoPE scaling (Gemma 3's global and local tables differ)."""
    return {**spec, "rope_attention_scaling": stream.attention_scaling_of(i)}


def sliding_fields(arch, config) -> dict:
    """`layer_types` and `sliding_window` of a converted config where some layers slide, so that
    transformers' cache keeps only the window of those layers; {} where none does."""
    layers = arch.layer_attentions(config)
    windows = {layer.sliding_window for layer in layers} - {None}
    if not windows:
        return {}
    if len(windows) > 1:  # no architecture in the table has two windows; transformers' config holds one
        raise LatentKVError(f"layers of this model slide over different windows {sorted(windows)}")
    return {"layer_types": ["sliding_attention" if layer.sliding_window else "full_attention" for layer in layers],
            "sliding_window": windows.pop()}


def latent_config(stream, specs: list[dict], method: str, o_bias: bool = False):
    """The LatentKVConfig of a converted model (also used for a single layer during calibration)."""
    from latentkv.modeling.modeling_latentkv import LatentKVConfig

    geo = geometry_of(stream.config)
    source = stream.config.to_dict()
    for k in ("architectures", "auto_map", "transformers_version", "_name_or_path", "quantization_config", "dtype", "torch_dtype"):
        source.pop(k, None)
    arch = stream.arch
    return LatentKVConfig(
        source_config=source,
        attention_layers=specs,
        softmax_scale=arch.softmax_scale(stream.config, geo),
        attn_logit_softcapping=arch.softcap(stream.config),
        final_logit_softcapping=arch.softcap(stream.config, "final"),
        source_attn_implementation="eager" if arch.attention_implementation(stream.config) == "eager" else None,
        **sliding_fields(arch, stream.config),
        rope_attention_scaling=stream.attention_scaling_of(0),
        v_head_dim=geo.head_dim,
        q_bias=stream.arch.has_bias(stream.config, "q"),
        o_bias=o_bias or stream.arch.has_bias(stream.config, "o"),
        method=method,
        source_modules=stream.arch.module_names(),
    )


def _filter_bias(tensors: dict, config) -> dict:
    """Drop bias tensors the model-level config does not declare (they are zero there)."""
    out = dict(tensors)
    if not config.q_bias:
        out.pop("q_proj.bias", None)
    if not config.o_bias:
        out.pop("o_proj.bias", None)
    return out


def _kept(tensors: dict) -> dict:
    """A built layer kept until writing, in float32: the fit works in float64, but the checkpoint is
    written in float32 or narrower."""
    return {k: v.float() if v.dtype == torch.float64 else v for k, v in tensors.items()}


def attention_module(stream, i: int, tensors: dict, spec: dict, source_attn=None):
    """Layer i's attention (the modeling class of its spec: LatentAttention, or TiedLatentAttention for
    GTA-T) from its tensors; `source_attn` lends a qk_norm layer the source's norms."""
    from latentkv.modeling.modeling_latentkv import attention_class

    specs = [spec] * stream.num_layers
    config = latent_config(stream, specs, "mla", o_bias="o_proj.bias" in tensors)
    module = attention_class(spec)(config, i, source_attention=source_attn)
    state = {k: v.to(stream.dtype) for k, v in _filter_bias(tensors, config).items()}
    module.load_state_dict(state, strict=False)
    return module.to(stream.device).eval()


def write_latentkv(method, stream, stats, plan, cfg, opts, source, folder, save_dtype, progress=None):
    from latentkv.convert.pipeline import ConvertResult
    from latentkv.io.writer import ShardedWriter

    geo = geometry_of(stream.config)
    writer = ShardedWriter(folder, max_shard_size=opts.max_shard_size)
    specs, layer_rows = [], []
    config_probe = latent_config(stream, [], method.name, o_bias=method.output_bias(cfg))
    for i in range(geo.num_layers):
        tensors, spec = method.build(stream, i, stats[i], plan, cfg)
        specs.append(spec)
        write_layer(stream, writer, i, _filter_bias(tensors, config_probe), save_dtype)
        del tensors
        release_freed_memory()  # the layer's fit and tensors are freed: their pages go back now
        layer_rows.append({"layer": i, "rope_dim": spec["rope_dim"], "kv_lora_rank": spec["kv_lora_rank"],
                           "predicted_error": plan.predicted_error[i], **plan.reports.get(i, {})})
        if progress is not None:
            progress(i)
    write_globals(stream, writer, save_dtype)
    config = finish_latentkv_folder(stream, specs, method.name, method.output_bias(cfg), source, folder, save_dtype,
                                    layer_rows, cache_format=opts.cache_format)
    kv = config.kv_values_per_token()
    src_kv = geo.kv_values_per_token_per_layer * geo.num_layers
    write_cards(method, cfg, opts, source, folder, geo, kv, src_kv, config=config,
                load_hint="Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.")
    return ConvertResult(output=opts.output, kv_values_per_token=kv, source_kv_values_per_token=src_kv,
                         seconds=0.0, layers=layer_rows)


def finish_latentkv_folder(stream, specs: list[dict], method_name: str, o_bias: bool, source, folder, save_dtype,
                           layer_rows: list[dict], cache_format: str | None = None):
    """After the weights: the config (auto_map to the copied modeling file; `cache_format`, the
    --cache-format spec, as its kv_cache_format), the source's sidecar files and the per-layer rows
    of a latentkv folder. Returns the config."""
    from latentkv.kvformats import config_cache_format, parse_model_cache_format
    from latentkv.io.writer import copy_sidecars
    from latentkv.modeling import AUTO_MAP, MODELING_FILE

    config = latent_config(stream, specs, method_name, o_bias=o_bias)
    if cache_format is not None:
        config.kv_cache_format = config_cache_format(parse_model_cache_format(cache_format))
    config.auto_map = AUTO_MAP
    config.architectures = ["LatentKVForCausalLM"]
    config.dtype = str(save_dtype).replace("torch.", "")
    config.save_pretrained(folder)
    shutil.copyfile(MODELING_FILE, folder / MODELING_FILE.name)
    copy_sidecars(source.folder, folder)
    (folder / LAYERS_FILE).write_text(json.dumps(layer_rows, indent=1, default=float) + "\n")
    return config
