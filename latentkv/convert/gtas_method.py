"""GTA-S as a registered method: group map heads, build tensors, write the latentkv folder.

The tensors come from `convert.gtas`; the statistics and the grouping search are the GQA target's
(`GQAMethod.moments`, `gqa.layer_groups`), the files the latentkv writer's pieces (`mla_method`).
"""

from __future__ import annotations

import dataclasses
import logging

from latentkv.arch import geometry_of
from latentkv.convert import gqa, gtas
from latentkv.convert.gqa_method import GQAMethod, GQAPlan
from latentkv.convert.method import Capabilities
from latentkv.errors import LatentKVError
from latentkv.typed import typed_settings

log = logging.getLogger(__name__)


class GTASMethod(GQAMethod):
    name = "gta-s"
    config_cls = gtas.GTASConfig
    capabilities = Capabilities(formats=("latentkv",))  # no sequential pass yet (GTASConfig has no `sequential`)

    def make_config(self, options: dict, fmt: str) -> gtas.GTASConfig:
        if fmt != "latentkv":
            raise LatentKVError("GTA-S is written in the latentkv format only; drop --format or use --format latentkv")
        known = {f.name for f in dataclasses.fields(gtas.GTASConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LatentKVError(f"Unknown gta-s settings: {', '.join(unknown)}; known: {', '.join(sorted(known))} "
                                "(e.g. --set map_heads=1 --kv-lora-rank 160)")
        return gtas.GTASConfig(**typed_settings(gtas.GTASConfig, options, self.name))

    def validate(self, config, arch, cfg: gtas.GTASConfig, fmt: str) -> None:
        geo = geometry_of(config)
        if geo.head_dim % 2:
            raise LatentKVError(f"The head dim {geo.head_dim} is odd; RoPE pairs need an even head dim")
        if arch.qk_norm:
            raise LatentKVError(
                f"--to gta-s cannot merge the key heads of {arch.model_type}: it RMS-normalises every query and key "
                "head (q_norm/k_norm) before RoPE. Use --to mla, gla or gta for this model")
        if geo.rotary_dim != geo.head_dim:
            raise LatentKVError(
                f"--to gta-s needs RoPE on whole heads; {arch.model_type} rotates {geo.rotary_dim} of {geo.head_dim} "
                "dims per head (partial_rotary_factor < 1). Use --to mla, gla or gqa for this model")
        if arch.rope_layout != "half":
            raise LatentKVError(f"--to gta-s supports the half-split RoPE layout only; {arch.model_type} uses {arch.rope_layout}")
        if arch.rope_free_layers(config):
            raise LatentKVError(f"--to gta-s caches RoPE keys in every layer; layers {arch.rope_free_layers(config)} of "
                                f"{arch.model_type} apply no RoPE. Use --to mla or gla for this model")
        if arch.softcap(config) is not None:
            raise LatentKVError(f"--to gta-s has no soft-capped scores, which {arch.model_type} has "
                                "(attention logit soft-capping). Use --to mla or gla for this model")
        cfg.resolve(geo.num_kv_heads, geo.num_heads, geo.head_dim)
        log.info("gta-s: %d map heads x %d + value latent %d = %d values per token per layer (source %d)",
                 cfg.map_heads, geo.head_dim, cfg.kv_lora_rank, cfg.map_heads * geo.head_dim + cfg.kv_lora_rank,
                 geo.kv_values_per_token_per_layer)

    def plan(self, stream, stats, cfg: gtas.GTASConfig, fmt: str) -> GQAPlan:
        geo = geometry_of(stream.config)
        groups, losses, plain = [], [], []
        for i in range(geo.num_layers):
            lm = self.moments(stream, i, stats[i], gtas.grouping_config(cfg))
            g, loss, plain_loss = gqa.layer_groups(lm, gtas.grouping_config(cfg), cost_of=gtas.key_cost)
            groups.append(g)
            losses.append(loss)
            plain.append(plain_loss)
            log.info("layer %d: map heads share KV heads %s (predicted score loss %.4g; contiguous %.4g)",
                     i, g, loss, plain_loss)
        return GQAPlan(groups=groups, predicted_loss=losses, contiguous_loss=plain)

    def build(self, stream, i: int, stats, plan: GQAPlan, cfg: gtas.GTASConfig):
        lm = self.moments(stream, i, stats, gtas.grouping_config(cfg))
        return gtas.build_layer(lm, plan.groups[i], cfg)

    def sequential_module(self, *args, **kwargs):
        raise LatentKVError("--to gta-s has no sequential calibration yet; drop --sequential")

    def write(self, stream, stats, plan, cfg, opts, source, folder, save_dtype, progress=None):
        from latentkv.convert.mla_method import _filter_bias, finish_latentkv_folder, latent_config
        from latentkv.convert.output import write_cards, write_globals, write_layer
        from latentkv.convert.pipeline import ConvertResult
        from latentkv.io.writer import ShardedWriter

        geo = geometry_of(stream.config)
        o_bias = cfg.center or stream.arch.has_bias(stream.config, "o")
        probe = latent_config(stream, [], self.name, o_bias=o_bias)
        writer = ShardedWriter(folder, max_shard_size=opts.max_shard_size)
        specs, layer_rows = [], []
        for i in range(geo.num_layers):
            tensors, spec, report = self.build(stream, i, stats[i], plan, cfg)
            specs.append(spec)
            write_layer(stream, writer, i, _filter_bias(tensors, probe), save_dtype)
            layer_rows.append({"layer": i, "map_heads": spec["map_heads"], "kv_lora_rank": spec["kv_lora_rank"],
                               "predicted_map_loss": plan.predicted_loss[i],
                               "contiguous_map_loss": plan.contiguous_loss[i], **report})
            log.info("layer %d: value latent %d keeps all but %.3g of the values' W_O-metric energy",
                     i, spec["kv_lora_rank"], report["value_rel_error"])
            if progress is not None:
                progress(i)
        write_globals(stream, writer, save_dtype)
        config = finish_latentkv_folder(stream, specs, self.name, o_bias, source, folder, save_dtype, layer_rows,
                                        cache_format=opts.cache_format)
        kv = config.kv_values_per_token()
        src_kv = geo.kv_values_per_token_per_layer * geo.num_layers
        write_cards(
            self, cfg, opts, source, folder, geo, kv, src_kv, config=config,
            description=(
                f"Attention rewritten by latentkv into GTA-S (grouped-head latent attention): per token and layer "
                f"the cache holds {cfg.map_heads} key heads of {geo.head_dim} and a value latent of "
                f"{cfg.kv_lora_rank} ({kv // geo.num_layers} values, source {geo.kv_values_per_token_per_layer}); "
                "each head decodes the latent through a sigmoid-gated up-projection. Needs healing when "
                "compressed. Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`."
            ),
        )
        return ConvertResult(output=opts.output, kv_values_per_token=kv, source_kv_values_per_token=src_kv,
                             seconds=0.0, layers=layer_rows)
