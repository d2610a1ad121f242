"""Write an MLA conversion as a stock `DeepseekV3ForCausalLM` checkpoint (no remote code).

Facts this format imposes (DESIGN.md section 3), and what we do about each:
- One `kv_lora_rank` and `qk_rope_head_dim` for all layers, the RoPE key on DeepSeek's own
  frequency grid base^(-2i/d_R): the planner is run with uniform widths and that grid.
- RoPE is interleaved (`rope_interleave`): rotated dims are permuted from the half-split layout.
- Scores are scaled by 1/sqrt(d_nope + d_R): the difference to the source's 1/sqrt(d) goes into q.
- `kv_a_proj_with_mqa` and `o_proj` carry no bias (vLLM/SGLang build them without): sources with
  q/k/v biases are refused, and the latent is fitted uncentred.
- The cached latent passes through an RMSNorm (`kv_a_layernorm`) that no linear map undoes. Its
  weight is ours: per latent dim, the least-squares w_i = E[c_i^2/rho] / E[c_i^2/rho^2] (rho the
  token's latent RMS) over calibration samples, so w * c / rho stays as close to c as one weight
  per dim allows. The relative error left is written to the card and the recipe.
"""

from __future__ import annotations

import logging
import math

import torch

from latentkv.arch import geometry_of
from latentkv.errors import LatentKVError

log = logging.getLogger(__name__)


def interleave_rope(rows: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Reorder the last rope_dim rows from [re_0..re_{P-1}, im_0..im_{P-1}] to [re_0, im_0, ...]."""
    if rope_dim == 0:
        return rows
    head, rope = rows[:-rope_dim], rows[-rope_dim:]
    half = rope_dim // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return torch.cat([head, rope[order]], dim=0)


def latent_norm_weight(latent: torch.Tensor, eps: float) -> tuple[torch.Tensor, float]:
    """Least-squares RMSNorm weight for latent samples [n, r] and the relative error left."""
    latent = latent.double()
    rho = (latent.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    weight = (latent.pow(2) / rho).sum(0) / (latent.pow(2) / rho.pow(2)).sum(0).clamp_min(1e-30)
    err = ((weight * latent / rho - latent).pow(2).sum() / latent.pow(2).sum().clamp_min(1e-30)).item()
    return weight, err


def deepseek_config(stream, rope_dim: int, rank: int, save_dtype):
    from transformers import DeepseekV3Config

    src = stream.config
    geo = geometry_of(src)
    rope_parameters = dict(getattr(src, "rope_parameters", None) or {"rope_type": "default", "rope_theta": geo.rope_theta})
    config = DeepseekV3Config(
        vocab_size=src.vocab_size,
        hidden_size=geo.hidden_size,
        intermediate_size=src.intermediate_size,
        num_hidden_layers=geo.num_layers,
        num_attention_heads=geo.num_heads,
        num_key_value_heads=geo.num_heads,
        kv_lora_rank=rank,
        q_lora_rank=None,
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=geo.head_dim,
        v_head_dim=geo.head_dim,
        first_k_dense_replace=geo.num_layers,  # every layer dense: the source MLP as it is
        n_routed_experts=1,
        n_shared_experts=1,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
        moe_intermediate_size=src.intermediate_size,
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        rms_norm_eps=src.rms_norm_eps,
        rope_parameters=rope_parameters,
        rope_interleave=True,
        attention_bias=False,
        tie_word_embeddings=src.tie_word_embeddings,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        pad_token_id=getattr(src, "pad_token_id", None),
    )
    config.architectures = ["DeepseekV3ForCausalLM"]
    config.dtype = str(save_dtype).replace("torch.", "")
    return config


def deepseek_attention(tensors: dict, spec: dict, head_dim: int, num_heads: int, samples, eps: float):
    """latentkv MLA tensors of one layer -> DeepseekV3Attention tensors, plus the norm's error."""
    rope_dim, rank = spec["rope_dim"], spec["kv_lora_rank"]
    if spec["qk_nope_head_dim"] != head_dim:
        raise LatentKVError("The DeepSeek format needs a non-rotated query part per head; lower --qk-rope-dim")
    q = tensors["q_proj.weight"].view(num_heads, head_dim + rope_dim, -1)
    q = torch.stack([interleave_rope(q[h], rope_dim) for h in range(num_heads)]).reshape(-1, q.shape[-1])
    q = q * math.sqrt((head_dim + rope_dim) / head_dim)  # DeepSeek scales scores by 1/sqrt(d_nope + d_R)
    kv_a = interleave_rope(tensors["kv_a_proj.weight"], rope_dim)
    latent = samples.to(kv_a.device, kv_a.dtype) @ kv_a[:rank].T
    weight, err = latent_norm_weight(latent, eps)
    return {
        "q_proj.weight": q,
        "kv_a_proj_with_mqa.weight": kv_a,
        "kv_a_layernorm.weight": weight,
        "kv_b_proj.weight": tensors["kv_b_proj.weight"],
        "o_proj.weight": tensors["o_proj.weight"],
    }, err


def write_deepseek(method, stream, stats, plan, cfg, opts, source, folder, save_dtype, progress=None):
    from latentkv.convert.mla_method import write_cards, write_globals, write_layer
    from latentkv.convert.pipeline import ConvertResult
    from latentkv.io.writer import ShardedWriter, copy_sidecars

    geo = geometry_of(stream.config)
    arch = stream.arch
    if any(arch.has_bias(stream.config, w) for w in ("q", "o")):
        raise LatentKVError(
            f"{arch.model_type} has attention biases, which DeepseekV3 (and vLLM/SGLang's loaders) cannot hold; "
            "use --format latentkv"
        )
    widths = set(plan.widths)
    if len(widths) != 1:
        raise LatentKVError("The DeepSeek format needs one width for all layers; use uniform allocation")
    rope_dim, rank = plan.widths[0]
    writer = ShardedWriter(folder, max_shard_size=opts.max_shard_size)
    rows, errors = [], []
    for i in range(geo.num_layers):
        tensors, spec = method.build(stream, i, stats[i], plan, cfg)
        if "kv_a_proj.bias" in tensors:
            raise LatentKVError("The latent needs a bias here, which the DeepSeek format cannot hold; use --format latentkv")
        if stats[i].samples is None:
            raise LatentKVError("The calibration cache predates latent samples; pass a fresh --calib-cache")
        attn, err = deepseek_attention(tensors, spec, geo.head_dim, geo.num_heads,
                                       stats[i].samples.double(), stream.config.rms_norm_eps)
        errors.append(err)
        write_layer(stream, writer, i, attn, save_dtype)
        rows.append({"layer": i, "rope_dim": rope_dim, "kv_lora_rank": rank, "latent_norm_rel_error": err})
        if progress is not None:
            progress(i)
    write_globals(stream, writer, save_dtype)
    config = deepseek_config(stream, rope_dim, rank, save_dtype)
    config.save_pretrained(folder)
    copy_sidecars(source.folder, folder)
    kv = (rank + rope_dim) * geo.num_layers
    src_kv = geo.kv_values_per_token_per_layer * geo.num_layers
    mean_err = sum(errors) / len(errors)
    log.info("DeepSeek latent RMSNorm: mean relative error %.3g (max %.3g) after fitting its weight", mean_err, max(errors))
    write_cards(method, cfg, opts, source, folder, geo, kv, src_kv,
                extra_recipe={"deepseek_latent_norm_rel_error": {"mean": mean_err, "max": max(errors)}},
                load_hint="Loads as a stock DeepseekV3ForCausalLM (no remote code): transformers, vLLM, SGLang.")
    return ConvertResult(output=opts.output, kv_values_per_token=kv, source_kv_values_per_token=src_kv,
                         seconds=0.0, layers=rows, notes=[f"latent RMSNorm relative error {mean_err:.3g} (mean over layers)"])
