"""Architecture table: weight names, RoPE layout, biases and norms of each supported source.

Every name uses `{i}` for the layer index. A row is all the conversion code knows about an
architecture; nothing else in latentkv branches on `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass

from latentkv.errors import LatentKVError


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    layer_prefix: str = "model.layers.{i}"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    # The norm a decoder layer applies to its input before attention; "" where the attention reads
    # the residual stream itself (OLMo-2 normalises attention and MLP outputs instead).
    input_norm: str = "input_layernorm"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    # Whether q/k/v carry a bias: True, False, or the name of the config flag that says so.
    qkv_bias: bool | str = False
    o_bias: bool | str = False
    # "half": HF rotate_half layout, pair j is dims (j, j + d/2). "interleaved": pair j is (2j, 2j+1).
    rope_layout: str = "half"
    # Per-head RMSNorm on q and k before RoPE (Qwen3): module names within the layer, "" if none.
    # The key is then not linear in x: the conversion reads the normalised keys and values instead
    # (`project_normed`), and the converted layer keeps these norms and the source's q/k/v projections.
    q_norm: str = ""
    k_norm: str = ""
    moe: bool = False
    # One fused q/k/v projection: its module name within the layer; the q/k/v names above then stand
    # for rows of it (`qkv_rows`), the o name stays a module of its own. Its row layout: "blocked"
    # ([q; k; v], Phi-3) or "per_head" ([q_h; k_h; v_h] for each head h in turn, GPT-NeoX: MHA only).
    fused_qkv: str = ""
    fused_qkv_layout: str = "blocked"
    # The LM head's module name in transformers' CausalLM (`lm_head` above is its name on disk).
    lm_head_module: str = "lm_head"
    # Why DeepseekV3 (and so --format deepseek) cannot hold the rest of this architecture; "" if it can.
    deepseek_refusal: str = ""
    # Why `--to gqa` (the source's own architecture with fewer KV heads) cannot be written; "" if it can.
    gqa_refusal: str = ""
    # How transformers' in-memory module names differ from the names on disk (within one layer):
    # plain renames (disk -> module), and expert tensors that transformers stacks on load
    # (module name -> (per-expert disk names with {e}, concat dim within an expert)).
    disk_renames: tuple[tuple[str, str], ...] = ()
    expert_stacks: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Config fields of the attention beyond the common ones ("" where the architecture has none):
    # the softmax scale as query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5 (Gemma 2/3),
    # tanh soft-capping of the attention scores and of the final logits (Gemma 2), and the per-layer
    # list saying which layers apply RoPE (SmolLM3's no_rope_layers: 1 = RoPE, 0 = none).
    scale_from: str = ""
    attn_softcap: str = ""
    final_softcap: str = ""
    rope_layers: str = ""
    # The decoder's rotary embedding takes the layer type and holds one frequency table per type
    # (Gemma 3: local and global RoPE thetas).
    rope_per_layer_type: bool = False

    def attn_weight(self, layer: int, which: str, kind: str = "weight") -> str:
        """Full tensor name of one attention projection (`which` in q, k, v, o)."""
        module = getattr(self, f"{which}_proj")
        return f"{self.layer_prefix.format(i=layer)}.{module}.{kind}"

    @property
    def base_model(self) -> str:
        """Attribute of the CausalLM holding the decoder (`model`, `gpt_neox`)."""
        return self.layer_prefix.rsplit(".layers.", 1)[0]

    @property
    def attention(self) -> str:
        """Attribute of a decoder layer holding its attention (`self_attn`, `attention`)."""
        return self.o_proj.rsplit(".", 1)[0]

    def module_names(self) -> dict[str, str]:
        """Where the converted model's modeling code finds the source's parts (it sees no table)."""
        within = len(self.base_model) + 1
        return {"base_model": self.base_model, "attention": self.attention, "lm_head": self.lm_head_module,
                "embed": self.embed[within:].removesuffix(".weight"),
                "final_norm": self.final_norm[within:].removesuffix(".weight")}

    def qkv_rows(self, geo: "AttentionGeometry") -> dict:
        """Rows of q, k and v in the fused projection: slices (blocked) or index tensors (per head)."""
        if self.fused_qkv_layout == "per_head":
            import torch

            d = geo.head_dim
            per_head = torch.arange(geo.num_heads)[:, None] * 3 * d + torch.arange(d)[None, :]  # [H, d]
            return {w: (per_head + i * d).flatten() for i, w in enumerate("qkv")}
        q, kv = geo.num_heads * geo.head_dim, geo.num_kv_heads * geo.head_dim
        return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}

    def read_projection(self, weights, layer: int, which: str, kind: str, geo: "AttentionGeometry", **kw):
        """One projection's weight or bias from a checkpoint's tensors (a slice of the fused one where
        there is one); None if the checkpoint has none."""
        if self.fused_qkv and which != "o":
            name = f"{self.layer_prefix.format(i=layer)}.{self.fused_qkv}.{kind}"
            return weights.get(name, **kw)[self.qkv_rows(geo)[which]] if name in weights else None
        name = self.attn_weight(layer, which, kind)
        return weights.get(name, **kw) if name in weights else None

    def attention_tensors(self, tensors: dict) -> dict:
        """New projection tensors keyed "q_proj.weight", ..., "o_proj.bias" -> keyed by their names within
        a decoder layer ("self_attn.q_proj.weight", ...), q/k/v concatenated where this architecture fuses them."""
        import torch

        out = {}
        for kind in ("weight", "bias"):
            separate = ("o",) if self.fused_qkv else ("q", "k", "v", "o")
            if self.fused_qkv and f"q_proj.{kind}" in tensors:
                out[f"{self.fused_qkv}.{kind}"] = torch.cat([tensors[f"{w}_proj.{kind}"] for w in "qkv"])
            for w in separate:
                if f"{w}_proj.{kind}" in tensors:
                    out[f"{getattr(self, f'{w}_proj')}.{kind}"] = tensors[f"{w}_proj.{kind}"]
        return out

    def project(self, layer_module, x, which: str, geo: "AttentionGeometry"):
        """One projection of a source decoder layer applied to x (the attention input)."""
        if self.fused_qkv:
            return layer_module.get_submodule(self.fused_qkv)(x)[..., self.qkv_rows(geo)[which]]
        return layer_module.get_submodule(getattr(self, f"{which}_proj"))(x)

    @property
    def qk_norm(self) -> bool:
        return bool(self.k_norm)

    def project_normed(self, layer_module, x, which: str, geo: "AttentionGeometry"):
        """q, k or v as the attention reads them before RoPE: the projection, then the per-head norm
        where this architecture has one ([..., heads * d])."""
        out = self.project(layer_module, x, which, geo)
        norm = {"q": self.q_norm, "k": self.k_norm}.get(which, "")
        if not norm:
            return out
        module = layer_module.get_submodule(norm)
        if module.weight.numel() == out.shape[-1]:  # one norm over all heads (OLMo-2)
            return module(out)
        heads = out.shape[-1] // geo.head_dim
        return module(out.unflatten(-1, (heads, geo.head_dim))).flatten(-2)

    def attention_input(self, layer_module, hidden):
        """What a decoder layer's attention reads of its input `hidden`: the input norm's output,
        or `hidden` itself where the layer has no input norm."""
        return layer_module.get_submodule(self.input_norm)(hidden) if self.input_norm else hidden

    def layer_key(self, layer: int) -> str:
        return self.layer_prefix.format(i=layer) + "."

    def softmax_scale(self, config, geo: "AttentionGeometry") -> float:
        """The factor on q . k before the softmax."""
        scalar = getattr(config, self.scale_from, None) if self.scale_from else None
        return float(scalar) ** -0.5 if scalar else geo.head_dim**-0.5

    def softcap(self, config, which: str = "attention") -> float | None:
        """tanh soft-cap of the attention scores ("attention") or of the logits ("final"); None if none."""
        name = self.attn_softcap if which == "attention" else self.final_softcap
        cap = getattr(config, name, None) if name else None
        return float(cap) if cap else None

    def attention_implementation(self, config) -> str:
        """transformers' attention that computes this model exactly: SDPA drops (or refuses) soft-caps."""
        return "eager" if self.softcap(config) is not None else "sdpa"

    def layer_attention(self, config, layer: int) -> "LayerAttention":
        """What is particular to one layer's attention: RoPE or none, sliding window, layer type."""
        types = getattr(config, "layer_types", None)
        layer_type = types[layer] if types else None
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) is False:
            window = None
        if types and layer_type != "sliding_attention":
            window = None  # without layer types (Mistral) the window applies to every layer
        rope = bool(getattr(config, self.rope_layers)[layer]) if self.rope_layers else True
        return LayerAttention(rope=rope, sliding_window=int(window) if window else None, layer_type=layer_type)

    def layer_attentions(self, config) -> list["LayerAttention"]:
        return [self.layer_attention(config, i) for i in range(config.num_hidden_layers)]

    def rope_free_layers(self, config) -> list[int]:
        """Layers that apply no RoPE (SmolLM3's NoPE layers)."""
        return [i for i, layer in enumerate(self.layer_attentions(config)) if not layer.rope]

    def has_bias(self, config, which: str) -> bool:
        flag = self.o_bias if which == "o" else self.qkv_bias
        if isinstance(flag, str):
            return bool(getattr(config, flag, False))
        return bool(flag)


QK_NORM_REFUSAL = ("its attention RMS-normalises every query and key head (q_norm/k_norm) before RoPE, which "
                   "DeepseekV3's attention has no place for")
QK_NORM_ALL_HEADS_GQA_REFUSAL = ("it RMS-normalises all key heads together (k_norm over the whole key) before RoPE, "
                                 "so a mix of its heads is no key of the same architecture (MLA and GLA keep the "
                                 "norms; exact at full rank, latentkv format)")
GEMMA_NORMS = "its RMSNorms scale by (1 + w) and its embeddings by sqrt(hidden size)"
SOFTCAP_REFUSAL = "it soft-caps attention scores with tanh, which DeepseekV3's attention does not"
QK_NORM_GQA_REFUSAL = ("it RMS-normalises every key head (k_norm) before RoPE, so a mix of its heads is no key head "
                       "of the same architecture (MLA and GLA keep the norms; exact at full rank, latentkv format)")

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in [
        ArchSpec("llama", qkv_bias="attention_bias", o_bias="attention_bias"),
        ArchSpec("mistral"),
        ArchSpec("qwen2", qkv_bias=True),
        # Gemma: GeGLU MLP, (1 + w) RMSNorms and the sqrt(hidden) embedding scale live outside attention,
        # in transformers' own modules that the converted model keeps (the scale inside embed_tokens).
        ArchSpec("gemma", qkv_bias="attention_bias", o_bias="attention_bias", deepseek_refusal=GEMMA_NORMS),
        # Gemma 2: scale query_pre_attn_scalar ** -0.5, tanh soft-caps on scores and logits, sliding-window
        # attention on alternate layers (config.layer_types; `layer_attention`); sandwich norms in its layer.
        ArchSpec("gemma2", qkv_bias="attention_bias", o_bias="attention_bias", scale_from="query_pre_attn_scalar",
                 attn_softcap="attn_logit_softcapping", final_softcap="final_logit_softcapping",
                 deepseek_refusal=GEMMA_NORMS),
        # Gemma 3 (text): per-head (1 + w) q/k RMSNorms (the qk_norm route; the converted layer keeps the
        # source's norm modules), local and global RoPE thetas by layer type, sliding-window layers.
        ArchSpec("gemma3_text", qkv_bias="attention_bias", o_bias="attention_bias", q_norm="self_attn.q_norm",
                 k_norm="self_attn.k_norm", scale_from="query_pre_attn_scalar", attn_softcap="attn_logit_softcapping",
                 final_softcap="final_logit_softcapping", rope_per_layer_type=True,
                 deepseek_refusal=GEMMA_NORMS, gqa_refusal=QK_NORM_GQA_REFUSAL),
        # SmolLM3: Llama layers, some without RoPE (no_rope_layers[i] == 0): their keys are cached whole
        # in the latent, with no RoPE key.
        ArchSpec("smollm3", qkv_bias="attention_bias", o_bias="attention_bias", rope_layers="no_rope_layers",
                 deepseek_refusal="some of its layers apply no RoPE, while DeepseekV3's every layer caches a RoPE key"),
        # OLMo-2: q/k RMSNorm over all heads at once (q_norm width heads x head dim); no input norm, the
        # norms follow attention and MLP (inside its own layer).
        ArchSpec("olmo2", qkv_bias="attention_bias", o_bias="attention_bias", q_norm="self_attn.q_norm",
                 k_norm="self_attn.k_norm", input_norm="",
                 deepseek_refusal="its attention RMS-normalises all query and key heads (q_norm/k_norm) before RoPE, "
                                  "which DeepseekV3's attention has no place for",
                 gqa_refusal=QK_NORM_ALL_HEADS_GQA_REFUSAL),
        ArchSpec("phi3", fused_qkv="self_attn.qkv_proj",
                 deepseek_refusal="its MLP fuses the gate and up projections (gate_up_proj)"),
        # GPT-NeoX / Pythia: parallel residual (or not), LayerNorms with biases and RoPE on the first
        # rotary_pct of each head live in transformers' own layer, which the converted model keeps.
        ArchSpec("gpt_neox", layer_prefix="gpt_neox.layers.{i}", q_proj="attention.q_proj", k_proj="attention.k_proj",
                 v_proj="attention.v_proj", o_proj="attention.dense", fused_qkv="attention.query_key_value",
                 fused_qkv_layout="per_head", embed="gpt_neox.embed_in.weight",
                 final_norm="gpt_neox.final_layer_norm.weight", lm_head="embed_out.weight",
                 qkv_bias="attention_bias", o_bias="attention_bias",
                 deepseek_refusal="its layers may add attention and MLP in parallel and its LayerNorms have biases",
                 gqa_refusal="GPTNeoXAttention has one fused query_key_value for as many KV heads as query "
                             "heads (no num_key_value_heads setting)"),
        ArchSpec("qwen3", qkv_bias="attention_bias", o_bias="attention_bias", q_norm="self_attn.q_norm",
                 k_norm="self_attn.k_norm", deepseek_refusal=QK_NORM_REFUSAL,
                 gqa_refusal=QK_NORM_GQA_REFUSAL),
        ArchSpec("qwen3_moe", qkv_bias="attention_bias", o_bias="attention_bias", q_norm="self_attn.q_norm",
                 k_norm="self_attn.k_norm", moe=True, deepseek_refusal=QK_NORM_REFUSAL,
                 expert_stacks=(
                     ("mlp.experts.gate_up_proj", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight")),
                     ("mlp.experts.down_proj", ("mlp.experts.{e}.down_proj.weight",)),
                 )),
        ArchSpec(
            "mixtral",
            moe=True,
            deepseek_refusal="it is a mixture of experts (the DeepSeek export keeps a dense MLP in every layer)",
            disk_renames=(("block_sparse_moe.", "mlp."),),
            expert_stacks=(
                ("mlp.experts.gate_up_proj", ("block_sparse_moe.experts.{e}.w1.weight", "block_sparse_moe.experts.{e}.w3.weight")),
                ("mlp.experts.down_proj", ("block_sparse_moe.experts.{e}.w2.weight",)),
            ),
        ),
    ]
}


def get_arch(config) -> ArchSpec:
    """The table row of a transformers config, or an error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise LatentKVError(
            f"Architecture {model_type!r} is not supported. Supported model_type values: "
            f"{', '.join(sorted(ARCHITECTURES))}. Adding one is a row in latentkv/arch/tables.py."
        )
    return spec


@dataclass(frozen=True)
class LayerAttention:
    """What one decoder layer's attention has of its own (`ArchSpec.layer_attention`)."""

    rope: bool = True  # whether RoPE turns its queries and keys (SmolLM3: not every layer)
    sliding_window: int | None = None  # it sees only the last `sliding_window` tokens (its cache is bounded)
    layer_type: str | None = None  # config.layer_types[i], which picks the RoPE table where there are several


def hybrid_sliding(layers: list[LayerAttention]) -> bool:
    """Whether a model mixes sliding-window and full-attention layers (Gemma 2/3): only then are the
    windowed layers a small part of a long context's cache (docs/architectures.md)."""
    windows = [layer.sliding_window is not None for layer in layers]
    return any(windows) and not all(windows)


def kv_values_at_context(widths: list[int], layers: list[LayerAttention], context: int) -> int:
    """Values one sequence of `context` tokens holds in the cache: each layer's values per token
    times the tokens it keeps (a sliding-window layer keeps at most its window)."""
    return sum(w * min(context, layer.sliding_window or context) for w, layer in zip(widths, layers))


@dataclass(frozen=True)
class AttentionGeometry:
    """Shapes of one source attention block, read from its config."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    rope_theta: float
    # RoPE turns the first rotary_dim dims of each q/k head (half-split layout within them); the
    # other head_dim - rotary_dim are never rotated (partial_rotary_factor < 1: GPT-NeoX, Phi-4-mini).
    rotary_dim: int = 0

    def __post_init__(self):
        if not self.rotary_dim:
            object.__setattr__(self, "rotary_dim", self.head_dim)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def kv_values_per_token_per_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim


def _rope_theta(config) -> float:
    """The RoPE theta (of the full-attention layers where each layer type has its own, Gemma 3)."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def geometry_of(config) -> AttentionGeometry:
    get_arch(config)
    if getattr(config, "use_bidirectional_attention", False):
        raise LatentKVError("this model attends bidirectionally (use_bidirectional_attention); latentkv converts "
                            "causal language models only")
    params = getattr(config, "rope_parameters", None)
    partial = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    partial = partial if partial is not None else getattr(config, "partial_rotary_factor", None)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise LatentKVError(f"config.json has num_attention_heads {heads} and num_key_value_heads {kv_heads}; the KV "
                            "heads must be a whole number >= 1 that divides the heads: fix config.json")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rotary_dim = int(head_dim * (1.0 if partial is None else float(partial)))  # as transformers computes it
    if rotary_dim < 2 or rotary_dim % 2:
        raise LatentKVError(f"partial_rotary_factor {partial} of head dim {head_dim} rotates {rotary_dim} dims; "
                            "RoPE needs an even number of them (at least 2)")
    return AttentionGeometry(
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        num_layers=config.num_hidden_layers,
        rope_theta=_rope_theta(config),
        rotary_dim=rotary_dim,
    )
