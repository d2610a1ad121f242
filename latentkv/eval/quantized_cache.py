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
from latentkv.kvformats import KVFormat, cache_parts, fake_quantize

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
