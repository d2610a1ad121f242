"""Evaluation with the KV cache stored in a quantized format (`latentkv eval --kv-cache`).

What a query reads is what a streaming decode cache holds right after it wrote that query's token:

* per-token formats (/token, /head, /g<N>, casts, fp8) are quantized on write, so a token reads its own
  row quantized, as vLLM's fp8 cache does;
* per-channel (KIVI) formats quantize a group of N tokens on the write that completes it; the tokens of
  the unfinished group (KIVI's residual) are read at full precision. A query at position i reads key j
  quantized when j's group is complete after token i is written ((j // N + 1) * N <= i + 1), otherwise as
  written. A finished group's codes never change, so this is exact for every query.

`streaming_logits` computes this for a whole window in one forward: the cache hands the attention
each window's keys and values in every stored state that some (query, key) pair reads (the quantized
copy, and the full-precision one where a residual exists), and a 4D mask lets each query see each key
in exactly the state it would read in a decode loop. Keys are stored after RoPE, since the attention
modules hand the cache rotated keys. The stored tensors stay in the model's dtype: the cache measures
the quality of a format, its bytes are counted by `KVFormat.bytes_per_token`.

Two refinements match other caches: `residual=R` also keeps the per-token formats' newest tokens of
an unfinished block of R tokens at full precision (KIVI's value residual; transformers' QuantizedCache
keeps keys and values there), and `quantize_after_read=True` lets the token that completes a group
read it at full precision once more (KIVI's reference code and transformers' QuantizedCache quantize a
full residual after that step's attention).

`QuantizedKVCache` is the same cache written token by token or chunk by chunk (`quantized_logits`):
one token per forward is the decode loop the one-pass evaluation equals; `--kv-cache-chunk N` keeps
that mode, where a chunk's queries read their own groups quantized once the chunk completes them.

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


@torch.no_grad()
def quantized_logits(model, batch: torch.Tensor, formats: dict[str, KVFormat], chunk: int) -> torch.Tensor:
    """Logits [b, T, V] of `batch` [b, T] fed in chunks of `chunk` tokens through a QuantizedKVCache."""
    from latentkv.modeling import cached_forward, new_dynamic_cache

    cache = new_dynamic_cache(model.config, QuantizedKVCache, slot_formats=slot_formats(model.config, formats))
    logits = [cached_forward(model, batch[:, start : start + chunk], cache).logits
              for start in range(0, batch.shape[1], chunk)]
    return torch.cat(logits, dim=1)


# ---- one forward per window, read as a streaming cache reads it ------------------------------------------


def residual_block(fmt: KVFormat, residual: int = 0) -> int:
    """Tokens of the block whose completion quantizes a token of `fmt` (0: quantized on write)."""
    return fmt.group_size if fmt.per_channel else residual


def completed(tokens: int, block: int, after_read: bool = False, device=None) -> torch.Tensor:
    """[query i, key j] bool: key j's block of `block` tokens is complete (stored quantized) when query i
    reads the cache: after token i is written, or before it with `after_read`."""
    i = torch.arange(tokens, device=device)[:, None]
    j = torch.arange(tokens, device=device)[None]
    return (j // block + 1) * block <= i + (0 if after_read else 1)


@dataclass(frozen=True)
class StreamingLayout:
    """How one window's keys and values are laid out for a single forward: `copies` of the window side by
    side along the token axis, each holding every part in one state per block size in `blocks`
    (True: the block is complete and read quantized, False: read as written); `visible` [T, copies * T]
    says which copy of key j query i reads (exactly one for j <= i, none for j > i)."""

    blocks: tuple[int, ...]
    copies: tuple[tuple[bool, ...], ...]
    visible: torch.Tensor
    residual: int = 0

    def stored(self, x: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
        """x [b, heads, T, width] as every copy reads it, concatenated: [b, heads, copies * T, width]."""
        if fmt.per_channel:
            full = x.shape[-2] // fmt.group_size * fmt.group_size
            quantized = x.clone()
            quantized[..., :full, :] = fake_quantize(x[..., :full, :], fmt)
        else:
            quantized = fake_quantize(x, fmt)
        block = residual_block(fmt, self.residual)
        if not block:
            return torch.cat([quantized] * len(self.copies), dim=-2)
        k = self.blocks.index(block)
        return torch.cat([quantized if copy[k] else x for copy in self.copies], dim=-2)

    def additive_mask(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The 4D float mask [batch, 1, T, copies * T] the attention adds to its scores."""
        mask = torch.zeros(self.visible.shape, dtype=dtype, device=self.visible.device)
        mask.masked_fill_(~self.visible, torch.finfo(dtype).min)
        return mask[None, None].expand(batch, 1, *mask.shape)


def streaming_layout(formats: dict[str, KVFormat], tokens: int, residual: int = 0,
                     quantize_after_read: bool = False, device=None) -> StreamingLayout:
    """The copies a window of `tokens` needs in `formats`: one per combination of complete / incomplete
    blocks that some causal (query, key) pair reads (one copy when every part is quantized on write)."""
    blocks = tuple(sorted({residual_block(f, residual) for f in formats.values()} - {0}))
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
    state = torch.zeros(tokens, tokens, dtype=torch.long, device=device)
    for k, block in enumerate(blocks):
        state |= completed(tokens, block, quantize_after_read, device).long() << k
    codes = sorted(set(state[causal].tolist()))
    visible = torch.cat([causal & (state == c) for c in codes], dim=1)
    copies = tuple(tuple(bool(c >> k & 1) for k in range(len(blocks))) for c in codes)
    return StreamingLayout(blocks, copies, visible, residual)


class StreamingWindowCache(DynamicCache):
    """A DynamicCache for one forward over a whole window: update() hands the attention the window's
    tensors in every state of `layout` (see StreamingLayout), to be read under `layout`'s mask."""

    def __init__(self, slot_formats: list[tuple[KVFormat, KVFormat]], layout: StreamingLayout, **kwargs):
        super().__init__(**kwargs)
        self.slot_formats = slot_formats
        self.layout = layout

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if len(self.layers) > layer_idx and self.layers[layer_idx].get_seq_length():
            raise LatentKVError("The one-pass quantized-cache evaluation takes a whole window in one forward")
        super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return tuple(self.layout.stored(x, fmt) for x, fmt in zip((key_states, value_states),
                                                                   self.slot_formats[layer_idx]))


def has_sliding_layers(config) -> bool:
    from latentkv.modeling import new_dynamic_cache

    return any(getattr(layer, "is_sliding", False) for layer in new_dynamic_cache(config).layers)


@torch.no_grad()
def streaming_logits(model, batch: torch.Tensor, formats: dict[str, KVFormat], residual: int = 0,
                     quantize_after_read: bool = False) -> torch.Tensor:
    """Logits [b, T, V] of `batch` [b, T], every query reading the keys and values a streaming cache in
    `formats` holds after writing its token (module docstring), in one forward. A model with
    sliding-window layers (whose masks a single 4D mask cannot carry) is run through the write-then-read
    cache a whole window at once, which is the same for per-token formats; per-channel formats and
    `residual` need a full cache there and are refused."""
    from latentkv.modeling import cached_forward, new_dynamic_cache

    b, tokens = batch.shape
    if has_sliding_layers(model.config):
        if residual or quantize_after_read or any(f.per_channel for f in formats.values()):
            raise LatentKVError("The model has sliding-window layers; per-channel (/channel<N>) formats and a value "
                                "residual need a full cache: use a token-local grouping (/token, /head, /g<N>)")
        return quantized_logits(model, batch, formats, tokens)
    attn = getattr(model.config, "_attn_implementation", None)
    if attn not in (None, "sdpa", "eager"):
        raise LatentKVError(f"The one-pass quantized-cache evaluation reads keys under a custom mask, which the "
                            f"{attn!r} attention does not take; load the model with sdpa or eager attention")
    layout = streaming_layout(formats, tokens, residual, quantize_after_read, device=batch.device)
    cache = new_dynamic_cache(model.config, StreamingWindowCache, slot_formats=slot_formats(model.config, formats),
                              layout=layout)
    dtype = next(model.parameters()).dtype
    return cached_forward(model, batch, cache, attention_mask=layout.additive_mask(b, dtype)).logits


def describe_evaluation(formats: dict[str, KVFormat], chunk: int | None = None, residual: int = 0,
                        quantize_after_read: bool = False) -> str:
    """How the reads were made, for reports."""
    if chunk is not None:
        return (f"{chunk} tokens per forward through a cache that quantizes on write (a chunk's queries read the "
                "groups the chunk completes quantized)")
    text = ("one forward per window, each query reading the cache a decode loop holds after writing its token: "
            "per-token formats quantized on write")
    if residual:
        text += f" (the newest tokens of an unfinished block of {residual} kept at full precision)"
    if any(f.per_channel for f in formats.values()):
        text += (", per-channel (KIVI) groups quantized once complete, the unfinished group (KIVI's residual) "
                 "at full precision" + (" and the completing token reading its group at full precision"
                                        if quantize_after_read else ""))
    return text


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


# ---- transformers' QuantizedCache (optimum-quanto backend), for cross-checks ------------------------------


def quanto_without_cpp_extension() -> None:
    """optimum-quanto unpacks its codes on CPU with a C++ extension built at first use (a JIT build that
    needs ninja and a compiler); route that op to the same arithmetic as quanto's Python `unpack` instead."""
    global _QUANTO_LIB
    if globals().get("_QUANTO_LIB") is not None:
        return
    import optimum.quanto  # noqa: F401  (registers its kernels first, so the one below replaces its CPU unpack)
    import torch.library

    def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:  # optimum/quanto/library/unpack.py
        return torch.cat([(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]).to(torch.uint8)

    _QUANTO_LIB = torch.library.Library("quanto", "IMPL")
    _QUANTO_LIB.impl("unpack", unpack, "CPU")


_QUANTO_LIB = None


@torch.no_grad()
def transformers_quantized_logits(model, batch: torch.Tensor, nbits: int, axis_key: int, axis_value: int,
                                  group: int, prefill: int | None = None) -> torch.Tensor:
    """Logits [b, T, V] of `batch` through transformers' QuantizedCache(backend="quanto", nbits, axis_key,
    axis_value, q_group_size=group, residual_length=group): the first `prefill` tokens (default: one group)
    in one forward, then one token per forward, as generate() feeds it. The prefill is quantized at once
    and each later block of `group` tokens once complete, so after a one-group prefill the blocks line up
    with latentkv's /channel<group> groups."""
    from transformers import QuantizedCache

    from latentkv.modeling import cached_forward

    quanto_without_cpp_extension()
    prefill = group if prefill is None else prefill
    cache = QuantizedCache(backend="quanto", config=model.config, nbits=nbits, axis_key=axis_key,
                           axis_value=axis_value, q_group_size=group, residual_length=group)
    logits = [cached_forward(model, batch[:, :prefill], cache).logits]
    logits += [cached_forward(model, batch[:, t : t + 1], cache).logits for t in range(prefill, batch.shape[1])]
    return torch.cat(logits, dim=1)
