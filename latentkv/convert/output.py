"""What every conversion writes beside its attention tensors: the decoder layers' other tensors, the
embeddings, final norm and LM head, the per-layer file, the recipe and the model card. Shared by the
latentkv format of every method and by the DeepSeek export."""

from __future__ import annotations

import dataclasses
import logging

from latentkv.errors import LatentKVError

log = logging.getLogger(__name__)

LAYERS_FILE = "latentkv_layers.json"  # per-layer widths and fit figures of a conversion


def write_layer(stream, writer, i: int, attention: dict, save_dtype) -> None:
    """One decoder layer under module names: the source's non-attention tensors, the new attention."""
    prefix, attn = stream.arch.layer_key(i), stream.arch.attention + "."
    for name, t in stream.layer_state_dict(i).items():
        if not name.startswith(attn):
            writer.add(prefix + name, t.to(save_dtype))
    for name, t in attention.items():
        writer.add(prefix + attn + name, t.to(save_dtype))


def write_globals(stream, writer, save_dtype, untied_head: str | None = None) -> None:
    """Embeddings, final norm (and its bias, a LayerNorm's) and (untied) LM head under its module
    name, then the shard index. `untied_head`: write the head under this name even where the source
    ties it to the embeddings (for formats whose loaders never tie it: DeepSeek's in vLLM/SGLang)."""
    arch = stream.arch
    norm_bias = arch.final_norm.removesuffix("weight") + "bias"
    for name in (arch.embed, arch.final_norm, norm_bias):
        if name != norm_bias or name in stream.weights:
            writer.add(name, stream.weights.get(name).to(save_dtype))
    tied = bool(stream.config.tie_word_embeddings)
    if not tied and arch.lm_head not in stream.weights:
        raise LatentKVError(f"The source's config unties the LM head but its weights hold no {arch.lm_head}; "
                            "the checkpoint is incomplete")
    if untied_head is not None or not tied:
        head = arch.embed if tied else arch.lm_head  # a tied head is the embedding matrix itself
        writer.add(untied_head or f"{arch.lm_head_module}.weight", stream.weights.get(head).to(save_dtype))
    writer.close()


def write_cards(method, cfg, opts, source, folder, geo, kv: int, src_kv: int, extra_recipe=None, load_hint="",
                title: str | None = None, description: str | None = None, config=None) -> None:
    """Recipe file and model card of a converted folder (shared by every method and format).
    The card is not essential: if it fails, the weights and config still stand. `config`: the
    written latentkv config (its cache format adds a row of KV bytes)."""
    from latentkv.convert.registry import PAPERS
    from latentkv.kvformats import config_bytes_per_token
    from latentkv.io.card import write_model_card, write_recipe

    recipe = {"latentkv_version": package_version(), **opts.recipe(), "resolved": dataclasses.asdict(cfg),
              **({"measured": extra_recipe} if extra_recipe else {})}
    write_recipe(folder, recipe)
    name = base_model_name(source)
    results = [{"": "KV values per token (all layers)", "source": src_kv, "converted": kv,
                "kept": f"{100 * kv / src_kv:.1f}%"}]
    stored = config_bytes_per_token(config) if config is not None else None
    if stored is not None:  # the source's bytes at bf16
        results.append({"": f"KV bytes per token (all layers; cache {stored[1]}, scales included)",
                        "source": 2 * src_kv, "converted": f"{stored[0]:g}", "kept": f"{100 * stored[0] / (2 * src_kv):.1f}%"})
    try:
        write_model_card(
            folder,
            base_model=name,
            base_model_relation="finetune",
            tags=["latentkv", method.name, "kv-cache-compression", opts.format],
            command=opts.command or "latentkv convert",
            recipe=recipe,
            results=results,
            papers=PAPERS.get(method.name, []),
            title=title or f"{name} with {method.name.upper()} attention ({opts.format} format)",
            description=description or (
                f"Attention rewritten by latentkv into {method.name.upper()} form: the cache holds "
                f"{kv / geo.num_layers:.0f} values per token per layer on average, against "
                f"{geo.kv_values_per_token_per_layer} in the source. {load_hint}"
            ),
        )
    except Exception as exc:  # noqa: BLE001 - a failing card must not cost the user the converted model
        log.warning("Could not write the model card in %s (%s); the model itself is complete", folder, exc)


def package_version() -> str:
    from latentkv import __version__

    return __version__


def base_model_name(source) -> str:
    name = getattr(source.config, "_name_or_path", "") or source.spec
    if source.gguf_file:
        return str(source.spec)
    return str(source.spec if "/" in str(source.spec) and not str(source.spec).startswith((".", "/")) else name or source.spec)
