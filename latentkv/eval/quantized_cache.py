"""Evaluation with the KV cache stored in a quantized format (`latentkv eval --kv-cache`).

`QuantizedKVCache` is transformers' DynamicCache whose update() stores what a serving cache in the
given formats would read back: each written tensor is quantized and dequantized (after RoPE for
keys, since the attention modules hand the cache rotated keys), and the attention of the same step
reads the stored copy, as a decode step reads its own key from the cache. Per-channel (KIVI)
formats quantize a group of N tokens once its N-th token is written; until then those tokens stay
unquantized (KIVI's residual). The stored tensors stay in the model's dtype: the cache measures the
quality of a format, its bytes are counted by `KVFormat.bytes_per_token`.

The parts a model caches, in the order its attention modules hand them to `update(first, second)`:
a transformers model caches `keys` and `values`; a latentkv MLA / GLA / GTA-T layer its `latent`
and `rope` key; a GTA-S layer its `rope` (map-head) keys and its `latent`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from latentkv.errors import LatentKVError
from latentkv.eval.kv_formats import KVFormat, fake_quantize, parse_format

SOURCE_PARTS = ("keys", "values")
LATENT_PARTS = ("latent", "rope")
# transformers' modeling of these caches decompressed per-head keys and values, not what a serving
# engine stores, so a format applied there would describe neither
DECOMPRESSED_IN_TRANSFORMERS = {"deepseek_v3"}


def cache_parts(config) -> list[tuple[str, str]]:
    """Per layer, the parts in update()'s (first, second) slots."""
    model_type = getattr(config, "model_type", None)
    if model_type == "latentkv":
        return [("rope", "latent") if spec.get("kind") == "gta-s" else ("latent", "rope")
                for spec in config.attention_layers]
    if model_type in DECOMPRESSED_IN_TRANSFORMERS:
        raise LatentKVError(f"transformers' {model_type} modeling caches decompressed keys and values, not the "
                            "latent a serving engine stores; evaluate the latentkv-format output (convert without "
                            "--format deepseek) with --kv-cache")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [SOURCE_PARTS] * int(text.num_hidden_layers)


def parse_cache_formats(spec: str, parts: tuple[str, ...], rope: str | None = None,
                        flag: str = "--kv-cache") -> dict[str, KVFormat]:
    """`--kv-cache` (and `--kv-cache-rope`) -> a format per cached part.

    spec: one FORMAT for every part, or `part=FORMAT` items joined by commas, where a bare FORMAT
    among them covers the parts not named (e.g. `int4/g32`, `keys=int2/channel32,values=int2/g32`,
    `latent=fp8_e4m3/g128,rope=bf16`). rope: the format of the RoPE key (latentkv models).
    flag: the option named in error messages.
    """
    named: dict[str, KVFormat] = {}
    default = None
    for item in filter(None, (s.strip() for s in spec.split(","))):
        part, sep, text = item.partition("=")
        if not sep:
            if default is not None:
                raise LatentKVError(f"{flag} {spec!r} gives two formats for every part; name the parts "
                                    f"({', '.join(p + '=FORMAT' for p in parts)})")
            default = parse_format(item)
            continue
        part = part.strip().lower()
        if part not in parts:
            raise LatentKVError(f"{flag} {spec!r}: this model caches {' and '.join(parts)}, not {part!r}")
        named[part] = parse_format(text)
    if rope is not None:
        if "rope" not in parts:
            raise LatentKVError("--kv-cache-rope is for latentkv models (latent + RoPE key); this model caches "
                                "keys and values: write --kv-cache keys=FORMAT,values=FORMAT")
        if "rope" in named:
            raise LatentKVError("The RoPE key's format is given twice (--kv-cache rope=... and --kv-cache-rope); keep one")
        named["rope"] = parse_format(rope)
    missing = [p for p in parts if p not in named and default is None]
    if missing:
        raise LatentKVError(f"{flag} {spec!r} gives no format for {', '.join(missing)}; add a bare FORMAT "
                            f"for the rest or {', '.join(m + '=FORMAT' for m in missing)}")
    return {p: named.get(p, default) for p in parts}


def describe_formats(formats: dict[str, KVFormat]) -> str:
    return ", ".join(f"{part}={fmt.name}" for part, fmt in formats.items())


# ---- a converted model's own cache format (`latentkv convert --cache-format`, config `kv_cache_format`)
CONFIG_KEY = "kv_cache_format"
DEFAULT_ROPE_FORMAT = "bf16"  # the RoPE key beside a quantized latent, as FlashMLA's FP8 cache keeps it


def parse_model_cache_format(spec: str) -> dict[str, KVFormat]:
    """`--cache-format` -> formats of "latent" and "rope", checked to be storable by the paged cache.
    The syntax is --kv-cache's; a bare FORMAT is the latent's, the RoPE key bf16 unless named
    (e.g. `fp8_e4m3/g128`, `latent=int4/g32,rope=bf16`)."""
    from latentkv.kernels.quantized_pages import check_paged_formats

    named = {item.partition("=")[0].strip().lower() for item in spec.split(",") if "=" in item}
    rope = None if "rope" in named else DEFAULT_ROPE_FORMAT
    formats = parse_cache_formats(spec, LATENT_PARTS, rope=rope, flag="--cache-format")
    check_paged_formats(formats)
    return formats


def config_cache_format(formats: dict[str, KVFormat]) -> dict[str, str]:
    """The config entry of a model's cache format: part -> format name."""
    return {part: fmt.name for part, fmt in formats.items()}


def model_cache_formats(config) -> dict[str, KVFormat] | None:
    """The cache format a converted model's config carries (None: it caches at its dtype)."""
    entry = getattr(config, CONFIG_KEY, None)
    if not entry:
        return None
    if not isinstance(entry, dict) or set(entry) != set(LATENT_PARTS):
        raise LatentKVError(f"config {CONFIG_KEY} must map {' and '.join(LATENT_PARTS)} to format names, got {entry!r}; "
                            "convert again with --cache-format")
    return {part: parse_format(str(entry[part])) for part in LATENT_PARTS}


def config_bytes_per_token(config) -> tuple[float, str] | None:
    """(KV bytes per token over every layer, the format described) of a config that carries a cache
    format, from the widths it declares; None without one. Scales and zero-points included."""
    formats = model_cache_formats(config)
    if formats is None:
        return None
    total = 0.0
    for spec in config.attention_layers:
        total += formats["latent"].bytes_per_token(1, int(spec["kv_lora_rank"]))
        total += formats["rope"].bytes_per_token(1, int(spec["rope_dim"]))  # RoPE formats are casts: no groups
    return total, describe_formats(formats)


@contextmanager
def own_cache_format_off(model):
    """The model's attention without its own cache format for the duration (an explicit --kv-cache
    then stores what the model computes, quantized once)."""
    modules = [m for m in model.modules() if getattr(m, "cache_format", None)]
    saved = [m.cache_format for m in modules]
    for m in modules:
        m.cache_format = {}
    try:
        yield model
    finally:
        for m, fmt in zip(modules, saved):
            m.cache_format = fmt


class QuantizedKVCache(DynamicCache):
    """A DynamicCache that stores every written tensor as a cache in `slot_formats[layer]` (the
    formats of update()'s two slots) would read it back."""

    def __init__(self, slot_formats: list[tuple[KVFormat, KVFormat]], **kwargs):
        super().__init__(**kwargs)
        self.slot_formats = slot_formats
        self.quantized_tokens: dict[tuple[int, int], int] = {}  # per-channel formats: tokens in full groups

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        formats = self.slot_formats[layer_idx]
        written = [s if f.per_channel else fake_quantize(s, f) for s, f in zip((key_states, value_states), formats)]
        keys, values = super().update(*written, layer_idx, *args, **kwargs)
        for slot, (stored, fmt) in enumerate(zip((keys, values), formats)):
            if fmt.per_channel:
                self.quantize_full_groups(layer_idx, slot, stored, fmt)
        return keys, values

    def quantize_full_groups(self, layer_idx: int, slot: int, stored: torch.Tensor, fmt: KVFormat) -> None:
        """Quantize, in the stored tensor, every group of N tokens completed since the last write."""
        layer = self.layers[layer_idx]
        if stored is not (layer.keys if slot == 0 else layer.values):
            raise LatentKVError(f"Layer {layer_idx} keeps a sliding window; per-channel ({fmt.name}) formats need a "
                                "full cache: use a token-local grouping (/token, /head, /g<N>)")
        done = self.quantized_tokens.get((layer_idx, slot), 0)
        full = stored.shape[-2] // fmt.group_size * fmt.group_size
        if full > done:
            stored[..., done:full, :] = fake_quantize(stored[..., done:full, :], fmt)
            self.quantized_tokens[(layer_idx, slot)] = full


def slot_formats(config, formats: dict[str, KVFormat]) -> list[tuple[KVFormat, KVFormat]]:
    return [(formats[a], formats[b]) for a, b in cache_parts(config)]


def default_chunk(formats: dict[str, KVFormat], window: int) -> int:
    """Tokens per forward: a whole window when every format is token-local (writing a window at once
    stores exactly what writing it token by token stores); one token for per-channel formats, whose
    groups are quantized only when full, as in a decode loop."""
    return 1 if any(f.per_channel for f in formats.values()) else window


@torch.no_grad()
def quantized_logits(model, batch: torch.Tensor, formats: dict[str, KVFormat], chunk: int) -> torch.Tensor:
    """Logits [b, T, V] of `batch` [b, T] fed in chunks of `chunk` tokens through a QuantizedKVCache."""
    from latentkv.modeling import cached_forward, new_dynamic_cache

    cache = new_dynamic_cache(model.config, QuantizedKVCache, slot_formats=slot_formats(model.config, formats))
    logits = [cached_forward(model, batch[:, start : start + chunk], cache).logits
              for start in range(0, batch.shape[1], chunk)]
    return torch.cat(logits, dim=1)


@torch.no_grad()
def cache_slot_shapes(model, tokens: int = 16) -> list[tuple[tuple[int, int] | None, tuple[int, int] | None]]:
    """Per layer, (heads, width) of what the model's HF cache holds in each update() slot (None: nothing)."""
    from latentkv.modeling import cached_forward, new_dynamic_cache

    device = next(model.parameters()).device
    ids = torch.arange(1, tokens + 1, device=device)[None] % model.config.vocab_size
    cache = new_dynamic_cache(model.config)
    cached_forward(model, ids, cache)
    shapes = []
    for layer in cache.layers:
        slots = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        shapes.append(tuple((t.shape[1], t.shape[-1]) if t is not None and t.numel() else None for t in slots))
    return shapes


@dataclass(frozen=True)
class CacheBytes:
    per_token: float  # summed over layers
    layers: int
    by_part: dict  # part -> bytes per token summed over layers

    @property
    def per_token_per_layer(self) -> float:
        return self.per_token / self.layers


def cache_bytes(model, formats: dict[str, KVFormat]) -> CacheBytes:
    """Bytes per token the model's cache takes in `formats`, scales and zero-points included."""
    parts = cache_parts(model.config)
    shapes = cache_slot_shapes(model)
    by_part = {p: 0.0 for p in formats}
    for layer_parts, layer_shapes in zip(parts, shapes):
        for part, shape in zip(layer_parts, layer_shapes):
            if shape is not None:
                by_part[part] += formats[part].bytes_per_token(*shape)
    return CacheBytes(sum(by_part.values()), len(shapes), by_part)
