"""Self-contained transformers modeling code for latentkv checkpoints.

This file is copied next to converted weights and registered through `auto_map`, so
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works without latentkv.
It imports only torch and transformers.

The model is the source architecture (built by transformers from `config.source_config`: its
embeddings, norms, MLP or MoE, residual layout, and its own cache/mask handling) with every layer's
attention (`self_attn`, or the name in `config.source_modules`) replaced by the class its layer spec
names (`attention_class`). `LatentAttention` (MLA; GLA where `latent_heads` > 1) caches per token only
a latent `c` (width r, split into `latent_heads` equal heads) and a shared RoPE key of width `rope_dim`:

    q_h      = q_proj(x)_h = [q_nope_h (d_nope) | q_rope_h (rope_dim)]
    [c | kr] = kv_a_proj(x)                       # the cache: r + rope_dim values per token
    k_nope_h, v_h = kv_b_proj(c_{latent head of h})_h
    score_h  = scale * (q_nope_h . k_nope_h + RoPE(q_rope_h) . RoPE(kr))

A `tied` layer (GTA-T) is a `TiedLatentAttention`, which has no kv_b_proj: each latent head is one
state s of the value width, used whole as the value and whose first `qk_nope_head_dim` dims are the
key's non-rotated part.

A `qk_norm` layer (a source that RMS-normalises queries and keys before RoPE: each head, Qwen3 and
Gemma 3, or all heads at once, OLMo-2) keeps the source's q_proj, k_proj, v_proj, q_norm and k_norm
(the source's own norm modules, so their formula is the source's): its keys are not linear in x, so
the cache is linear in y = [k_norm(k_proj(x)); v_proj(x)] instead, and each query head reads its own
normalised source query through a per-head map:

    q_h      = q_head_proj_h(q_norm(q_proj(x)_h))
    [c | kr] = kv_a_proj(y)

RoPE uses explicit per-pair frequencies (`rope_inv_freq`, half-split layout; a layer may have its own
`rope_attention_scaling`), so a converter can keep any subset of the source's frequencies, and a layer
without RoPE (SmolLM3) has none. Scores may be soft-capped, cap * tanh(score / cap)
(`attn_logit_softcapping`, Gemma 2), and so may the logits (`final_logit_softcapping`). Sliding-window
layers get their window from the source decoder's mask; `layer_types` and `sliding_window` let
transformers' cache keep only the window of those layers. GQA-style targets do not use this file.

A layer whose spec has `kind: "gta-s"` is a `GroupedLatentAttention` (GTA-S, arXiv 2506.17286):
`map_heads` RoPE key heads (the source's own rotary embedding) give the attention maps, and a
value latent c is cached beside them; each head decodes its attention output over c through a
per-head up-projection and a sigmoid gate of the current token:

    out_h = sigmoid(g_proj(x)_h) * (W_up,h . sum_s a_h,s c_s),   o = o_proj([out_1 .. out_H])

Fine-tuning hooks: the forward reads some weights directly (GLA's kv_b_proj, GTA-S's v_up_proj:
einsums over heads), so an adapter wrapping those modules would never run, and LatentAttention keeps
its RoPE frequencies as a Python list, on which torch.compile guards. `route_projections_through_modules()`
(every attention class) makes it call those modules instead, and `use_rope_frequency_buffer()`
(LatentAttention and TiedLatentAttention) reads the frequencies from a non-persistent buffer. Both
keep the numbers; inference calls neither and runs the direct path.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast


class LatentKVConfig(PretrainedConfig):
    """Config of a latentkv model.

    source_config: the source model's config as a dict (its `model_type` picks the architecture).
    attention_layers: one dict per decoder layer with `kv_lora_rank`, `rope_dim`, `rope_inv_freq`
        (rope_dim/2 floats), `qk_nope_head_dim`, `latent_heads`, `latent_bias`, `tied` (GTA-T) and
        `qk_norm` (with `qk_norm_eps`: the layer keeps the source's projections and per-head norms);
        or, for GTA-S, `kind: "gta-s"`, `map_heads`, `kv_lora_rank` (value latent), `rope_dim`
        (= map_heads x head dim, the cached rotated keys), `key_bias` and `latent_bias`.
    q_bias: whether the source's q/k/v projections have biases (kept where the layer keeps them).
    softmax_scale, rope_attention_scaling: taken from the source so scores are unchanged.
    source_modules: where the source CausalLM keeps its parts: `base_model` (attribute holding the
        decoder), `attention` (of a layer), `lm_head`, `embed` and `final_norm` (of the decoder).
        Llama's names by default.
    attn_logit_softcapping, final_logit_softcapping: tanh caps of the scores and of the logits (None: none).
    source_attn_implementation: the attention implementation the source decoder is built with (its
        masks; None: this model's own, SDPA by default).
    layer_types, sliding_window: set where some layers see only the last `sliding_window` tokens
        ("sliding_attention"), so transformers' DynamicCache keeps only that many for them.
    kv_cache_format: how the cache stores each part, e.g. {"latent": "fp8_e4m3/g128", "rope": "bf16"}
        (latentkv's format names, `stored_as`); None: at the model dtype. The attention reads its
        latent and RoPE key as that cache gives them back, with or without a cache object.
    """

    model_type = "latentkv"

    def __init__(
        self,
        source_config: dict | None = None,
        attention_layers: list[dict] | None = None,
        softmax_scale: float | None = None,
        rope_attention_scaling: float = 1.0,
        v_head_dim: int | None = None,
        q_bias: bool = False,
        o_bias: bool = False,
        method: str = "mla",
        source_modules: dict | None = None,
        attn_logit_softcapping: float | None = None,
        final_logit_softcapping: float | None = None,
        source_attn_implementation: str | None = None,
        kv_cache_format: dict | None = None,
        **kwargs,
    ):
        self.source_config = dict(source_config or {})
        self.attention_layers = list(attention_layers or [])
        self.softmax_scale = softmax_scale
        self.rope_attention_scaling = rope_attention_scaling
        self.v_head_dim = v_head_dim
        self.q_bias = q_bias
        self.o_bias = o_bias
        self.method = method
        self.source_modules = {**SOURCE_MODULES, **(source_modules or {})}
        self.attn_logit_softcapping = attn_logit_softcapping
        self.final_logit_softcapping = final_logit_softcapping
        self.source_attn_implementation = source_attn_implementation
        self.kv_cache_format = dict(kv_cache_format) if kv_cache_format else None
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key in self.source_config:
                kwargs.setdefault(key, self.source_config[key])
        kwargs.setdefault("tie_word_embeddings", self.source_config.get("tie_word_embeddings", False))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in self.source_config:
                kwargs.setdefault(key, self.source_config[key])
        super().__init__(**kwargs)

    def build_source_config(self) -> PretrainedConfig:
        cfg = dict(self.source_config)
        model_type = cfg.pop("model_type")
        source = AutoConfig.for_model(model_type, **cfg)
        # the source decoder's masks (its attention is replaced): SDPA's, or eager where the source
        # class has no SDPA (Gemma 2's soft-capped scores)
        source._attn_implementation = (self.source_attn_implementation or getattr(self, "_attn_implementation", None)
                                       or "sdpa")
        return source

    def kv_values_per_token(self) -> int:
        """Values the cache holds per token, summed over layers."""
        return sum(layer["kv_lora_rank"] + layer["rope_dim"] for layer in self.attention_layers)


SOURCE_MODULES = {"base_model": "model", "attention": "self_attn", "lm_head": "lm_head", "embed": "embed_tokens",
                  "final_norm": "norm"}

# transformers renamed the cache argument and output field from `past_key_values` to `cache` (and
# GPT-NeoX layers take `layer_past`). A checkpoint carrying this file is loaded with whatever version
# the user has, so every cache hand-over goes through the helpers below, never through one fixed name.
CACHE_KEYWORDS = ("cache", "past_key_values", "layer_past")
CACHE_OUTPUT_FIELD = (
    "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"
)


def cache_keyword(forward) -> str:
    """The keyword under which `forward` (a model's, decoder's or layer's forward) takes the KV cache."""
    params = inspect.signature(forward).parameters
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    return CACHE_OUTPUT_FIELD


def output_cache(outputs):
    """The cache a model output carries, under this transformers version's field name."""
    return getattr(outputs, CACHE_OUTPUT_FIELD, None)


def passed_cache(kwargs: dict, *given):
    """The cache a layer was handed: the first of `given` that is set, else any cache keyword in kwargs."""
    for value in given:
        if value is not None:
            return value
    for name in CACHE_KEYWORDS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _sdpa_mask(attention_mask, key_len: int, query_len: int, dtype: torch.dtype):
    """The model's mask cut to the cached keys, in SDPA's terms: (mask or None, is_causal)."""
    mask = attention_mask
    if mask is not None and mask.dim() == 4:
        mask = mask[:, :, :, :key_len]
    is_causal = mask is None and query_len > 1
    if mask is not None and mask.dtype != torch.bool and mask.dtype != dtype:
        mask = mask.to(dtype)
    return mask, is_causal


def _attention_weights(query, key, mask, scaling: float, softcap: float | None):
    """softmax(scale * q k^T, soft-capped, masked) in float32: [b, H, s, t] (the eager path soft-capping needs)."""
    scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    s, t = scores.shape[-2:]
    if mask is None:  # causal, the new tokens last
        mask = torch.ones(s, t, dtype=torch.bool, device=scores.device).tril(t - s)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.float()
    return scores.softmax(-1)


# ---- cache formats: what a cache in a quantized format gives back (latentkv.kvformats' arithmetic,
# restated here so that this file needs only torch; tests check the two agree bit for bit)
FP8_MAX = 448.0  # largest finite float8 E4M3 value
CAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
INT_BITS = {"int8": 8, "int4": 4, "int2": 2}


def fp16_at_most(x: torch.Tensor) -> torch.Tensor:
    """A float16-representable value <= x (as float32)."""
    nearest = x.to(torch.float16).float()
    lower = (x - x.abs() * 2.0**-10 - 2.0**-24).to(torch.float16).float()
    return torch.where(nearest > x, lower, nearest)


def fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """A float16-representable value >= x (as float32)."""
    nearest = x.to(torch.float16).float()
    upper = (x + x.abs() * 2.0**-10 + 2.0**-24).to(torch.float16).float()
    return torch.where(nearest < x, upper, nearest)


def stored_as(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x [b, heads, t, width] as a cache in `fmt` reads it back, in x's dtype. `fmt`: bf16, fp16,
    fp8_e4m3 (unscaled, or with /token, /head, /g<N>: a float32 scale amax / 448 per group), or
    int8 / int4 / int2 with /token, /head, /g<N> (asymmetric: float16 scale and zero-point per group)."""
    encoding, _, grouping = fmt.partition("/")
    if encoding in CAST_DTYPES:
        return x.to(CAST_DTYPES[encoding]).to(x.dtype)
    b, h, t, w = x.shape
    xf = x.float()
    if grouping == "token":
        g = xf.transpose(1, 2).reshape(b, t, 1, h * w)
    elif grouping in ("", "head"):
        g = xf[..., None, :]
    elif grouping.startswith("g") and grouping[1:].isdigit() and int(grouping[1:]) > 0:
        n = int(grouping[1:])
        index = torch.arange(math.ceil(w / n) * n, device=x.device).clamp(max=w - 1)  # the last value repeated
        g = xf[..., index].reshape(b, h, t, -1, n)
    else:
        raise ValueError(f"cache format {fmt!r}: the grouping must be token, head or g<N>")
    if encoding == "fp8_e4m3":
        if not grouping:
            values = g.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        else:
            scale = (g.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
            values = (g / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    elif encoding in INT_BITS and grouping:
        levels = 2 ** INT_BITS[encoding] - 1
        zero = fp16_at_most(g.amin(-1, keepdim=True))
        scale = fp16_at_least(((g.amax(-1, keepdim=True) - zero) / levels).clamp(min=2.0**-24))
        values = torch.round((g - zero) / scale).clamp(0, levels) * scale + zero
    else:
        raise ValueError(f"cache format {fmt!r}: use bf16, fp16, fp8_e4m3[/GROUPING] or int8/int4/int2/GROUPING")
    if grouping == "token":
        return values.reshape(b, t, h, w).transpose(1, 2).to(x.dtype)
    return values.flatten(-2)[..., :w].to(x.dtype)


def layer_window(config, layer_idx: int) -> int | None:
    """The sliding window of one layer (None: it attends to every earlier token)."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    return int(window) if window and types and types[layer_idx] == "sliding_attention" else None


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dim (one head), computed in float32 as transformers' Qwen3RMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class HeadwiseLinear(nn.Module):
    """One linear map per head: [..., heads, in] -> [..., heads, out]; weight [heads, out, in]."""

    def __init__(self, heads: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...hi,hoi->...ho", x, self.weight)


class LatentAttention(nn.Module):
    """MLA attention (GLA where `latent_heads` > 1) that caches only the latent and the shared RoPE key;
    kv_b_proj expands each latent head into the non-rotated keys and the values of the query heads it
    serves. `source_attention`: the source's attention module of this layer, whose q/k norms a qk_norm
    layer keeps.

    Fine-tuning hooks (inference never calls them): `route_projections_through_modules` and
    `use_rope_frequency_buffer`."""

    tied = False  # a tied (GTA-T) layer is a TiedLatentAttention

    def __init__(self, config: LatentKVConfig, layer_idx: int, source_attention: nn.Module | None = None):
        super().__init__()
        spec = config.attention_layers[layer_idx]
        if bool(spec.get("tied", False)) != self.tied:
            raise ValueError(f"layer {layer_idx}: a layer spec with tied={bool(spec.get('tied', False))} is a "
                             f"{attention_class(spec).__name__}, not a {type(self).__name__}")
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank = int(spec["kv_lora_rank"])
        self.rope_dim = int(spec["rope_dim"])
        self.qk_nope_head_dim = int(spec["qk_nope_head_dim"])
        self.latent_heads = int(spec.get("latent_heads", 1))
        self.v_head_dim = int(config.v_head_dim)
        self.latent_head_dim = self.kv_lora_rank // self.latent_heads
        self.scaling = float(config.softmax_scale)
        self.rope_attention_scaling = float(spec.get("rope_attention_scaling", config.rope_attention_scaling))
        cap = getattr(config, "attn_logit_softcapping", None)
        self.softcap = float(cap) if cap else None
        self.sliding_window = layer_window(config, layer_idx)
        self.cache_format = dict(getattr(config, "kv_cache_format", None) or {})  # part -> format name
        self.is_causal = True
        self.num_key_value_groups = 1
        self.config = config
        hidden = config.hidden_size
        qk_head_dim = self.qk_nope_head_dim + self.rope_dim
        self.qk_norm = bool(spec.get("qk_norm", False))
        kv_in = hidden
        if self.qk_norm:
            d = self.v_head_dim  # the source's head dim
            self.num_source_kv_heads = int(config.source_config.get("num_key_value_heads") or self.num_heads)
            kv_width = self.num_source_kv_heads * d
            self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=config.q_bias)
            self.k_proj = nn.Linear(hidden, kv_width, bias=config.q_bias)
            self.v_proj = nn.Linear(hidden, kv_width, bias=config.q_bias)
            if source_attention is not None and hasattr(source_attention, "k_norm"):
                self.q_norm, self.k_norm = source_attention.q_norm, source_attention.k_norm
            else:
                self.q_norm = HeadRMSNorm(d, float(spec["qk_norm_eps"]))
                self.k_norm = HeadRMSNorm(d, float(spec["qk_norm_eps"]))
            self.q_head_proj = HeadwiseLinear(self.num_heads, d, qk_head_dim)
            kv_in = 2 * kv_width
        else:
            self.q_proj = nn.Linear(hidden, self.num_heads * qk_head_dim, bias=config.q_bias)
        self.kv_a_proj = nn.Linear(kv_in, self.kv_lora_rank + self.rope_dim, bias=bool(spec.get("latent_bias", False)))
        self.add_up_projection()
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, hidden, bias=config.o_bias)
        # Kept as a plain list, not a buffer: meta-device loading would leave a buffer uninitialised.
        self.rope_inv_freq = [float(f) for f in spec.get("rope_inv_freq", [])]
        self._inv_freq_cache: dict = {}
        # Set by the fine-tuning hooks only; None / False leave the inference path as it is.
        self.register_buffer("rope_freq", None, persistent=False)
        self.projections_through_modules = False

    def add_up_projection(self) -> None:
        """kv_b_proj: each latent head expands into the k_nope and v of the query heads it serves."""
        self.kv_b_proj = nn.Linear(
            self.latent_head_dim, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )

    # ---- fine-tuning hooks (`latentkv finetune` calls them; the same numbers as without them)
    def route_projections_through_modules(self) -> None:
        """Call kv_b_proj as a module where the forward would read its weight (GLA's per-latent-head
        expansion), so that an adapter wrapping it (LoRA) applies; the same numbers for a plain weight."""
        self.projections_through_modules = True

    def use_rope_frequency_buffer(self) -> None:
        """Read the RoPE frequencies from a non-persistent buffer (the same numbers), which torch.compile
        takes as an input, where it would guard on this layer's Python list and recompile for every layer."""
        self.rope_freq = torch.tensor(self.rope_inv_freq, dtype=torch.float32, device=self.q_proj.weight.device)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [b, heads, s, rope_dim]; positions: [b, s]
        if self.rope_dim == 0:
            return x
        inv_freq = self.rope_freq
        if inv_freq is None:
            inv_freq = self._inv_freq_cache.get(x.device)
        if inv_freq is None:
            inv_freq = self._inv_freq_cache[x.device] = torch.tensor(self.rope_inv_freq, dtype=torch.float32, device=x.device)
        freqs = positions[:, None, :, None].float() * inv_freq[None, None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_attention_scaling).to(x.dtype)
        sin = (emb.sin() * self.rope_attention_scaling).to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """x: [b, s, hidden] -> [b, H, s, d_nope + rope_dim]."""
        b, s, _ = x.shape
        if self.qk_norm:
            q = self.q_head_proj(self._normed(self.q_norm, self.q_proj(x), self.num_heads))
        else:
            q = self.q_proj(x).view(b, s, self.num_heads, -1)
        return q.transpose(1, 2)

    def latent_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What kv_a_proj reads: x, or for a qk_norm layer y = [k_norm(k_proj(x)); v_proj(x)]."""
        if not self.qk_norm:
            return x
        k = self._normed(self.k_norm, self.k_proj(x), self.num_source_kv_heads).flatten(-2)
        return torch.cat([k, self.v_proj(x)], dim=-1)

    @staticmethod
    def _normed(norm: nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
        """[..., heads * d] -> [..., heads, d] through a norm of one head or of all heads at once (OLMo-2)."""
        if norm.weight.numel() == x.shape[-1]:
            return norm(x).unflatten(-1, (heads, -1))
        return norm(x.unflatten(-1, (heads, -1)))

    def expand_latent(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c: [b, s, r] -> k_nope [b, H, s, d_nope], v [b, H, s, d_v]."""
        b, s, _ = c.shape
        if self.latent_heads == 1:  # through the module, so adapters on kv_b_proj (LoRA) take effect
            return self.kv_b_proj(c).view(b, s, self.num_heads, -1).transpose(1, 2).split(
                [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        if self.projections_through_modules:
            kv = self._expand_latent_heads_through_module(c)
            return kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        heads_per_latent = self.num_heads // self.latent_heads
        c = c.view(b, s, self.latent_heads, self.latent_head_dim)
        w = self.kv_b_proj.weight.view(self.latent_heads, heads_per_latent, -1, self.latent_head_dim)
        kv = torch.einsum("bslr,lhdr->bslhd", c, w).reshape(b, s, self.num_heads, -1).transpose(1, 2)
        return kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)

    def _expand_latent_heads_through_module(self, c: torch.Tensor) -> torch.Tensor:
        """GLA's expansion calling kv_b_proj: c [b, s, r] -> [b, H, s, d_nope + d_v]. Each latent head is
        expanded by the whole projection, then each group of query heads keeps its own latent head's rows
        (latent_heads times the work of the einsum, which reads the weight and so bypasses an adapter)."""
        b, s, _ = c.shape
        groups, per = self.latent_heads, self.num_heads // self.latent_heads
        full = self.kv_b_proj(c.view(b, s, groups, self.latent_head_dim))  # [b, s, L, H * D]
        full = full.view(b, s, groups, groups, per, -1)  # [b, s, latent head, head group, per, D]
        kv = torch.diagonal(full, dim1=2, dim2=3).permute(0, 1, 4, 2, 3).reshape(b, s, self.num_heads, -1)
        return kv.transpose(1, 2)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, d_nope, r_c] and W_UV [H, d_v, r_c], views of kv_b_proj: k_nope_h = W_UK_h c and
        v_h = W_UV_h c, c the latent head of query head h (h // (H // latent_heads))."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.latent_head_dim)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        position_ids: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
        **kwargs,
    ):
        b, s, _ = hidden_states.shape
        past_key_values = passed_cache(kwargs, cache)
        if position_ids is None:
            start = 0 if cache_position is None else int(cache_position[0])
            if cache_position is None and past_key_values is not None:
                start = past_key_values.get_seq_length(self.layer_idx)
            position_ids = torch.arange(start, start + s, device=hidden_states.device)[None].expand(b, s)
        q_nope, q_rope = self.queries(hidden_states).split([self.qk_nope_head_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj(self.latent_inputs(hidden_states)).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope = self._rope(k_rope[:, None], position_ids)  # [b, 1, s, rope_dim]
        q_rope = self._rope(q_rope, position_ids)
        if hasattr(past_key_values, "latent_attention"):
            # A paged latent cache (latentkv's decode loop) stores [c | RoPE(kr)] and attends in the
            # absorbed form (W_UK folded into q, W_UV applied to the latent output); returns [b, s, H * d_v].
            out = past_key_values.latent_attention(self, q_nope, q_rope, latent, k_rope, position_ids=position_ids)
            return self.o_proj(out), None
        latent = latent[:, None]  # [b, 1, s, r]: one "head" so every HF cache layer stores it as is
        latent, k_rope = stored(self, latent, "latent"), stored(self, k_rope, "rope")
        if past_key_values is not None:
            latent, k_rope = past_key_values.update(latent, k_rope, self.layer_idx)
        k_nope, value = self.expand_latent(latent[:, 0])
        key = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)
        query = torch.cat([q_nope, q_rope], dim=-1)
        mask, is_causal = _sdpa_mask(attention_mask, key.shape[-2], s, query.dtype)
        if self.softcap is not None:  # SDPA has no soft-cap: the scores are formed here
            weights = _attention_weights(query, key, mask, self.scaling, self.softcap).to(value.dtype)
            out = (weights @ value).transpose(1, 2).reshape(b, s, self.num_heads * self.v_head_dim)
            return self.o_proj(out), None
        pad = -query.shape[-1] % 8
        if pad:  # fused SDPA kernels need head dims in multiples of 8; zero dims leave every score as is
            query = torch.nn.functional.pad(query, (0, pad))
            key = torch.nn.functional.pad(key, (0, pad))
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=is_causal, scale=self.scaling
        )
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.v_head_dim)
        return self.o_proj(out), None


class TiedLatentAttention(LatentAttention):
    """GTA-T attention (a `tied` layer spec): each latent head is one state s of the value width, used
    whole as the value of the query heads it serves and whose first `qk_nope_head_dim` dims are their
    keys' non-rotated part. No kv_b_proj; everything else is LatentAttention's."""

    tied = True

    def add_up_projection(self) -> None:
        """None: the state is the key and the value itself; it must have the value width."""
        if self.latent_head_dim != self.v_head_dim or self.qk_nope_head_dim > self.v_head_dim:
            raise ValueError(f"layer {self.layer_idx}: a tied state must have the value width {self.v_head_dim}, "
                             f"got {self.latent_head_dim} (key part {self.qk_nope_head_dim})")

    def route_projections_through_modules(self) -> None:
        """Nothing to route: there is no up-projection (the cached state is the key and the value)."""

    def expand_latent(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c: [b, s, r] -> k_nope [b, H, s, d_nope], v [b, H, s, d_v]: the state of each query head's
        group, whole as value, its head as key."""
        b, s, _ = c.shape
        state = c.view(b, s, self.latent_heads, 1, self.latent_head_dim)
        state = state.expand(-1, -1, -1, self.num_heads // self.latent_heads, -1)
        state = state.reshape(b, s, self.num_heads, self.latent_head_dim).transpose(1, 2)
        return state[..., : self.qk_nope_head_dim], state

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK_h = [I 0] [H, d_nope, r_c] and W_UV_h = I [H, d_v, r_c]."""
        eye = torch.eye(self.latent_head_dim, dtype=self.q_proj.weight.dtype, device=self.q_proj.weight.device)
        eye = eye.expand(self.num_heads, -1, -1)
        return eye[:, : self.qk_nope_head_dim], eye


class GroupedLatentAttention(nn.Module):
    """GTA-S attention: caches `map_heads` RoPE keys and one value latent per token.

    Fine-tuning hook (inference never calls it): `route_projections_through_modules`. Its keys are
    rotated by the decoder's shared rotary embedding, so it keeps no RoPE frequencies of its own."""

    def __init__(self, config: LatentKVConfig, layer_idx: int):
        super().__init__()
        spec = config.attention_layers[layer_idx]
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = int(config.v_head_dim)
        self.map_heads = int(spec["map_heads"])
        self.kv_lora_rank = int(spec["kv_lora_rank"])
        # as a paged latent cache sees the layer: rows [c | k_0 .. k_{m-1}], one latent head
        self.rope_dim = self.map_heads * self.head_dim
        self.latent_heads = 1
        if self.num_heads % self.map_heads or int(spec["rope_dim"]) != self.map_heads * self.head_dim:
            raise ValueError(f"layer {layer_idx}: {self.map_heads} map heads do not fit {self.num_heads} query heads "
                             f"of {self.head_dim} (rope_dim {spec['rope_dim']})")
        self.scaling = float(config.softmax_scale)
        self.softcap = None  # GTA-S is not written for soft-capped sources
        self.sliding_window = layer_window(config, layer_idx)
        self.cache_format = dict(getattr(config, "kv_cache_format", None) or {})  # part -> format name
        self.is_causal = True
        self.config = config
        hidden, width = config.hidden_size, self.num_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, width, bias=config.q_bias)
        self.k_proj = nn.Linear(hidden, self.map_heads * self.head_dim, bias=bool(spec.get("key_bias", False)))
        self.c_proj = nn.Linear(hidden, self.kv_lora_rank, bias=bool(spec.get("latent_bias", False)))
        self.v_up_proj = nn.Linear(self.kv_lora_rank, width, bias=False)  # W_up,h = rows of head h
        self.g_proj = nn.Linear(hidden, width, bias=True)
        self.o_proj = nn.Linear(width, hidden, bias=config.o_bias)
        self.projections_through_modules = False  # set by the fine-tuning hook only

    def route_projections_through_modules(self) -> None:
        """Call v_up_proj as a module in `decode_values`, which otherwise reads its weight, so that an
        adapter wrapping it (LoRA) applies; the same numbers for a plain weight."""
        self.projections_through_modules = True

    def decode_values(self, out: torch.Tensor) -> torch.Tensor:
        """out: [b, s, H, r] attention over the latent -> [b, s, H, d], each head through its W_up,h."""
        if self.projections_through_modules:
            # every head's rows on every head's attention output, then each head's own block (H times
            # the work of the einsum)
            b, s, heads, _ = out.shape
            full = self.v_up_proj(out).view(b, s, heads, heads, -1)  # [b, s, output of head, rows of head, d]
            return torch.diagonal(full, dim1=2, dim2=3).permute(0, 1, 3, 2)
        w = self.v_up_proj.weight.view(self.num_heads, self.head_dim, self.kv_lora_rank)
        return torch.einsum("bshr,hdr->bshd", out, w)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ):
        past_key_values = passed_cache(kwargs, cache)
        if position_embeddings is None:
            raise ValueError("GroupedLatentAttention needs the decoder layer's position_embeddings (cos, sin)")
        b, s, _ = hidden_states.shape
        cos, sin = (t[:, None] for t in position_embeddings)  # [b, 1, s, d]
        q = self.q_proj(hidden_states).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, s, self.map_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        latent = self.c_proj(hidden_states)[:, None]  # [b, 1, s, r]: one "head" so the HF cache stores it as is
        if hasattr(past_key_values, "attend_latent"):
            # latentkv's paged latent cache: rows [c | k_0 .. k_{m-1}]; query head h carries its
            # map head's slot and zeros elsewhere, so its score is exactly q_h . k_{g(h)} and its
            # output the attention-weighted latent (the MLA decode kernel, unchanged)
            rows = torch.cat([latent[:, 0], k.transpose(1, 2).reshape(b, s, self.rope_dim)], dim=-1)
            slot = torch.eye(self.map_heads, dtype=q.dtype, device=q.device).repeat_interleave(
                self.num_heads // self.map_heads, dim=0)  # [H, m]: head h -> its map head
            q_key = (q.transpose(1, 2)[:, :, :, None, :] * slot[None, None, :, :, None]).flatten(3)  # [b, s, H, m*d]
            q_full = torch.cat([q_key.new_zeros(b, s, self.num_heads, self.kv_lora_rank), q_key], dim=-1)
            out = past_key_values.attend_latent(self, q_full, rows, position_ids=kwargs.get("position_ids"))
            out = out.to(q.dtype)  # [b, s, H, r]
        else:
            out = self._attend(q, k, latent, attention_mask, past_key_values)
        up = self.decode_values(out)  # [b, s, H, d]
        gate = torch.sigmoid(self.g_proj(hidden_states)).view(b, s, self.num_heads, self.head_dim)
        return self.o_proj((gate * up).reshape(b, s, self.num_heads * self.head_dim)), None

    def _attend(self, q, k, latent, attention_mask, past_key_values):
        """SDPA over transformers' cache: q [b, H, s, d], k [b, m, s, d], latent [b, 1, s, r] -> [b, s, H, r]."""
        s = q.shape[2]
        k, latent = stored(self, k, "rope"), stored(self, latent, "latent")
        if past_key_values is not None:
            k, latent = past_key_values.update(k, latent, self.layer_idx)
        key = k.repeat_interleave(self.num_heads // self.map_heads, dim=1)  # [b, H, t, d]
        value = latent.expand(-1, self.num_heads, -1, -1)  # [b, H, t, r]
        mask, is_causal = _sdpa_mask(attention_mask, key.shape[-2], s, q.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, key, value, attn_mask=mask, is_causal=is_causal, scale=self.scaling
        )  # [b, H, s, r]
        return out.transpose(1, 2)


def stored(module: nn.Module, x: torch.Tensor, part: str) -> torch.Tensor:
    """A cached part ("latent" or "rope") of a layer as its cache format gives it back (as is without one).
    latentkv's paged decode cache quantizes the raw values itself, with the same arithmetic."""
    fmt = module.cache_format.get(part)
    return stored_as(x, fmt) if fmt else x


def attention_class(spec: dict) -> type:
    """The attention module of one layer's spec: GTA-S by its `kind`, GTA-T by `tied`, else MLA / GLA."""
    if spec.get("kind") == "gta-s":
        return GroupedLatentAttention
    return TiedLatentAttention if spec.get("tied", False) else LatentAttention


class LatentKVForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LatentKVConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["LatentAttention", "TiedLatentAttention", "GroupedLatentAttention"]

    def __init__(self, config: LatentKVConfig):
        super().__init__(config)
        names = config.source_modules
        source = AutoModelForCausalLM.from_config(config.build_source_config())
        # Under the source's own attribute names, so the weights keep the source's tensor names.
        setattr(self, names["base_model"], getattr(source, names["base_model"]))
        setattr(self, names["lm_head"], getattr(source, names["lm_head"]))
        for i, layer in enumerate(self.get_decoder().layers):
            cls = attention_class(config.attention_layers[i])
            kwargs = {} if cls is GroupedLatentAttention else {"source_attention": getattr(layer, names["attention"])}
            setattr(layer, names["attention"], cls(config, i, **kwargs))
        if config.tie_word_embeddings:
            self._tied_weights_keys = {f"{names['lm_head']}.weight": f"{names['base_model']}.{names['embed']}.weight"}
        self.post_init()

    def get_decoder(self):
        """The source's decoder (embeddings, layers, final norm)."""
        return getattr(self, self.config.source_modules["base_model"])

    def get_final_norm(self):
        return getattr(self.get_decoder(), self.config.source_modules["final_norm"])

    def get_input_embeddings(self):
        return getattr(self.get_decoder(), self.config.source_modules["embed"])

    def set_input_embeddings(self, value):
        setattr(self.get_decoder(), self.config.source_modules["embed"], value)

    def get_output_embeddings(self):
        return getattr(self, self.config.source_modules["lm_head"])

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the final norm's output: the LM head, soft-capped where the source caps them."""
        logits = self.get_output_embeddings()(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def set_output_embeddings(self, value):
        setattr(self, self.config.source_modules["lm_head"], value)

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif hasattr(module, "weight") and isinstance(getattr(module, "weight"), nn.Parameter):
            if module.weight.dim() == 1:
                nn.init.ones_(module.weight)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values=None,
        **kwargs,
    ):
        decoder = self.get_decoder()
        given = passed_cache({}, cache, past_key_values)
        outputs = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{cache_keyword(decoder.forward): given},
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.final_logits(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_OUTPUT_FIELD: output_cache(outputs)},
        )


def softmax_scale_for(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
