"""GQA with fewer KV heads as a registered method: group heads, build tensors, write the source's
own architecture (same model_type and tensor names, `num_key_value_heads` changed), so any engine
loads the output without latentkv.

The tensors come from `convert.gqa`; this module only plans groupings and writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from latentkv.arch import geometry_of
from latentkv.convert import gqa
from latentkv.convert.method import Capabilities
from latentkv.errors import LatentKVError
from latentkv.typed import typed_settings

log = logging.getLogger(__name__)

# The output is always the source's own architecture; "latentkv" (the CLI default) means the same here.
FORMATS = ("latentkv", "source")


@dataclass
class GQAPlan:
    groups: list[list[list[int]]]  # per layer: source KV heads merged into each new KV head
    predicted_loss: list[float]
    contiguous_loss: list[float]
    # layer -> tensors, filled by sequential calibration (`convert` spills them to disk)
    built: dict = field(default_factory=dict)

    def key(self) -> list:
        return self.groups


class GQAMethod:
    name = "gqa"
    config_cls = gqa.GQAConfig
    # The converted pass feeds sequential calibration; the o_proj refit is MLA's alone.
    capabilities = Capabilities(sequential_pass=True, formats=FORMATS)

    def make_config(self, options: dict, fmt: str) -> gqa.GQAConfig:
        if fmt not in FORMATS:
            raise LatentKVError(
                f"--to gqa writes the source's own architecture; --format must be one of {', '.join(FORMATS)}, got {fmt!r}"
            )
        known = {f.name for f in dataclasses.fields(gqa.GQAConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LatentKVError(f"Unknown gqa settings: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "num_kv_heads" not in options:
            raise LatentKVError("--to gqa needs --num-kv-heads N (the KV heads per layer of the output)")
        return gqa.GQAConfig(**typed_settings(gqa.GQAConfig, options, self.name))

    def validate(self, config, arch, cfg: gqa.GQAConfig, fmt: str) -> None:
        geo = geometry_of(config)
        G = geo.num_kv_heads
        if cfg.num_kv_heads > G or G % cfg.num_kv_heads:
            choices = [n for n in range(1, G + 1) if G % n == 0]
            raise LatentKVError(
                f"--num-kv-heads {cfg.num_kv_heads} must divide the source's {G} KV heads (groups are equal); "
                f"choose one of {', '.join(map(str, choices))}"
            )
        if geo.head_dim % 2:
            raise LatentKVError(f"The head dim {geo.head_dim} is odd; RoPE pairs need an even head dim")
        if arch.gqa_refusal:
            raise LatentKVError(f"--to gqa cannot write {arch.model_type} with fewer KV heads: {arch.gqa_refusal}. "
                                "Use --to mla or --to gla for this model.")
        if arch.rope_layout != "half":
            raise LatentKVError(f"--to gqa supports the half-split RoPE layout only; {arch.model_type} uses {arch.rope_layout}")

    def plan(self, stream, stats, cfg: gqa.GQAConfig, fmt: str) -> GQAPlan:
        geo = geometry_of(stream.config)
        groups, losses, plain = [], [], []
        for i in range(geo.num_layers):
            lm = self.moments(stream, i, stats[i], cfg)
            g, loss, plain_loss = gqa.layer_groups(lm, cfg)
            groups.append(g)
            losses.append(loss)
            plain.append(plain_loss)
            log.info("layer %d: KV heads %s (predicted loss %.4g; contiguous %.4g)", i, g, loss, plain_loss)
        return GQAPlan(groups=groups, predicted_loss=losses, contiguous_loss=plain)

    def moments(self, stream, i: int, stats, cfg: gqa.GQAConfig) -> gqa.LayerMoments:
        from latentkv.convert.pipeline import layer_inputs_from

        # The analysis is small float64 linear algebra: it runs on the CPU whatever device
        # calibrated the statistics.
        on_cpu = SimpleNamespace(arch=stream.arch, config=stream.config, weights=stream.weights,
                                 device=torch.device("cpu"), inv_freq_of=stream.inv_freq_of)
        return gqa.layer_moments(layer_inputs_from(on_cpu, i, stats), cfg)

    def build(self, stream, i: int, stats, plan: GQAPlan, cfg: gqa.GQAConfig) -> dict[str, torch.Tensor]:
        if i in plan.built:
            return plan.built[i]
        return gqa.build_layer(self.moments(stream, i, stats, cfg), plan.groups[i], cfg)

    def sequential_module(self, stream, i, stats, plan: GQAPlan, cfg: gqa.GQAConfig, source_attn=None, batches=None):
        """The converted attention of layer i: the source's attention class with fewer KV heads."""
        tensors = self.build(stream, i, stats, plan, cfg)
        plan.built[i] = tensors
        config = copy.deepcopy(stream.config)
        config.num_key_value_heads = cfg.num_kv_heads
        source_attn = stream.decoder.layers[i].get_submodule(stream.arch.attention)
        module = type(source_attn)(config, i)
        own = set(module.state_dict())
        attn = stream.arch.attention + "."
        named = {k.removeprefix(attn): v for k, v in stream.arch.attention_tensors(tensors).items()}
        state = {k: v.to(stream.dtype) for k, v in named.items() if k in own}
        module.load_state_dict(state, strict=True)
        return module.to(stream.device).eval()

    def write(self, stream, stats, plan, cfg, opts, source, folder, save_dtype, progress=None):
        from latentkv.convert.pipeline import ConvertResult
        from latentkv.io.writer import ShardedWriter, copy_sidecars

        geo = geometry_of(stream.config)
        arch, weights = stream.arch, stream.weights
        writer = ShardedWriter(folder, max_shard_size=opts.max_shard_size)
        names = list(weights.keys())
        written: set[str] = set()
        layer_rows = []
        for i in range(geo.num_layers):
            tensors = self.build(stream, i, stats[i], plan, cfg)
            prefix = arch.layer_key(i)
            new = {prefix + rel: t for rel, t in arch.attention_tensors(tensors).items()
                   if prefix + rel in weights}  # keep exactly the tensors the source has
            for name in names:
                if name.startswith(prefix):
                    t = new[name] if name in new else weights.get(name)
                    writer.add(name, _cast(t, save_dtype))
                    written.add(name)
            layer_rows.append({"layer": i, "groups": plan.groups[i], "predicted_loss": plan.predicted_loss[i],
                               "contiguous_loss": plan.contiguous_loss[i]})
            if progress is not None:
                progress(i)
        for name in names:  # embeddings, final norm, lm_head: unchanged, under their disk names
            if name not in written:
                writer.add(name, _cast(weights.get(name), save_dtype))
        writer.close()
        _write_config(source.folder, folder, cfg.num_kv_heads, save_dtype)
        copy_sidecars(source.folder, folder)
        kv = 2 * cfg.num_kv_heads * geo.head_dim * geo.num_layers
        src_kv = geo.kv_values_per_token_per_layer * geo.num_layers
        _write_card(self, cfg, opts, source, folder, kv, src_kv, geo.num_kv_heads)
        return ConvertResult(output=opts.output, kv_values_per_token=kv, source_kv_values_per_token=src_kv,
                             seconds=0.0, layers=layer_rows)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _write_config(src_folder, folder, num_kv_heads: int, save_dtype: torch.dtype) -> None:
    """The source's config.json with `num_key_value_heads` (and the weights' dtype) changed."""
    config = json.loads((src_folder / "config.json").read_text(encoding="utf-8"))
    config["num_key_value_heads"] = num_kv_heads
    dtype = str(save_dtype).replace("torch.", "")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype
    if "dtype" not in config and "torch_dtype" not in config:
        config["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_card(method, cfg, opts, source, folder, kv: int, src_kv: int, src_heads: int) -> None:
    from latentkv.convert.output import base_model_name, write_cards

    how = ("mean-pooled K and V projections of each group (baseline)" if cfg.method == "meanpool" else
           "RoPE-commuting per-frequency complex PCA of each group's keys and W_O-metric PCA of its values, "
           "folded into W_Q and W_O")
    write_cards(
        method, cfg, opts, source, folder, None, kv, src_kv,
        title=f"{base_model_name(source)} with {cfg.num_kv_heads} KV heads",
        description=(
            f"Each layer's {src_heads} KV heads merged into {cfg.num_kv_heads} by latentkv ({how}; "
            f"{cfg.grouping} grouping). Same architecture and tensor names as the source, only "
            "`num_key_value_heads` changed: load with plain `AutoModelForCausalLM.from_pretrained(path)`."
        ),
    )
