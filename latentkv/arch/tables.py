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
        heads = out.shape[-1] // geo.head_dim
        return layer_module.get_submodule(norm)(out.unflatten(-1, (heads, geo.head_dim))).flatten(-2)

    def layer_key(self, layer: int) -> str:
        return self.layer_prefix.format(i=layer) + "."

    def has_bias(self, config, which: str) -> bool:
        flag = self.o_bias if which == "o" else self.qkv_bias
        if isinstance(flag, str):
            return bool(getattr(config, flag, False))
        return bool(flag)


QK_NORM_REFUSAL = ("its attention RMS-normalises every query and key head (q_norm/k_norm) before RoPE, which "
                   "DeepseekV3's attention has no place for")
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
        ArchSpec("gemma", qkv_bias="attention_bias", o_bias="attention_bias",
                 deepseek_refusal="its RMSNorms scale by (1 + w) and its embeddings by sqrt(hidden size)"),
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
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def geometry_of(config) -> AttentionGeometry:
    get_arch(config)
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
