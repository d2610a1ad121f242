"""Write an MLA conversion as a stock `DeepseekV3ForCausalLM` checkpoint (no remote code).

Facts this format imposes (docs/formats.md), and what we do about each:
- One `kv_lora_rank` and `qk_rope_head_dim` for all layers, the RoPE key on DeepSeek's own
  frequency grid theta'^(-2i/d_R): theta' is rewritten so that the grid lands on source pairs
  0, s, 2s, ... (`rope_grid_step`, default 1: the fastest pairs); the planner is run with uniform
  widths and that grid.
- RoPE is interleaved (`rope_interleave`): rotated dims are permuted from the half-split layout.
- Scores are scaled by 1/sqrt(d_nope + d_R): the difference to the source's 1/sqrt(d) goes into q.
- vLLM's and SGLang's DeepseekV3 never tie the LM head to the embeddings (they would read an
  unset head and emit token 0 forever, with no error): `lm_head.weight` is always written and
  `tie_word_embeddings` is false, whatever the source does.
- `kv_a_proj_with_mqa` and `o_proj` carry no bias (vLLM/SGLang build them without): sources with
  q/k/v biases are refused, and the latent is fitted uncentred.
- The cached latent passes through an RMSNorm (`kv_a_layernorm`) that no linear map undoes: it
  scales each token's keys and values by 1/rms(latent), and with a plain latent that scale moves
  from token to token (SmolLM2-135M at 64 + 320: 4% relative error, PPL 39 -> 72 on 16 windows).
  So `norm_ballast` latent dims (default 1) carry no key or value (zero columns of kv_b_proj) but a
  projection t = T x of the attention input chosen so that ||c||^2 + ||t||^2, and with it the
  scale, is nearly the same for every token (`fit_norm_ballast`); the norm's weight is then the
  least-squares w_i = E[c_i^2/rho] / E[c_i^2/rho^2] per latent dim. The relative error left,
  measured on held-out calibration samples, is written to the card and the recipe.
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


def _norm_fit(latent: torch.Tensor, ballast: torch.Tensor, eps: float, weight: torch.Tensor | None = None):
    """(relative error of w * c / rho against c, w): rho the RMS over latent and ballast dims."""
    width = latent.shape[1] + ballast.shape[1]
    rho = ((latent.pow(2).sum(1, keepdim=True) + ballast.pow(2).sum(1, keepdim=True)) / width + eps).sqrt()
    if weight is None:
        weight = (latent.pow(2) / rho).sum(0) / (latent.pow(2) / rho.pow(2)).sum(0).clamp_min(1e-30)
    err = (weight * latent / rho - latent).pow(2).sum() / latent.pow(2).sum().clamp_min(1e-30)
    return err, weight


def fit_norm_ballast(inputs: torch.Tensor, latent_rows: torch.Tensor, dims: int, eps: float,
                     iters: int = 30, held_out: float = 0.25):
    """Rows T [dims, D] for the ballast latent dims, the norm weight of the latent dims, and the
    relative errors (held out, without ballast; held out, with it).

    T minimises the norm's relative error on the first 1 - held_out of the attention-input samples
    `inputs` [n, D] (L-BFGS from the inputs' top principal directions, scaled so that the ballast
    holds 4x the latent's energy; few iterations, as more fit the samples and not the text); the
    error is reported on the rest. T = 0 (the plain norm) when the ballast does not help there.
    """
    inputs = inputs.double()
    latent_rows = latent_rows.to(inputs)
    cut = int(len(inputs) * (1 - held_out))
    fit_x, test_x = inputs[:cut], inputs[cut:]
    fit_c, test_c = fit_x @ latent_rows.T, test_x @ latent_rows.T
    none = torch.zeros(dims, inputs.shape[1], dtype=inputs.dtype)
    base_weight = _norm_fit(fit_c, fit_x @ none.T, eps)[1]
    base_err = _norm_fit(test_c, test_x @ none.T, eps, base_weight)[0].item()
    if dims == 0:
        return none, base_weight, base_err, base_err
    start = torch.linalg.eigh(fit_x.T @ fit_x / len(fit_x))[1][:, -dims:].T
    scale = (fit_c.pow(2).sum(1).mean() * 4 / dims / (fit_x @ start.T).pow(2).mean(0)).sqrt()
    rows = (start * scale[:, None]).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([rows], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        err = _norm_fit(fit_c, fit_x @ rows.T, eps)[0]
        err.backward()
        return err

    with torch.enable_grad():
        opt.step(closure)
    rows = rows.detach()
    weight = _norm_fit(fit_c, fit_x @ rows.T, eps)[1]
    err = _norm_fit(test_c, test_x @ rows.T, eps, weight)[0].item()
    if err >= base_err:
        return none, base_weight, base_err, base_err
    return rows, weight, base_err, err


def deepseek_config(stream, rope_dim: int, rank: int, grid_step: int, save_dtype):
    from transformers import DeepseekV3Config

    src = stream.config
    geo = geometry_of(src)
    rope_parameters = dict(getattr(src, "rope_parameters", None) or {"rope_type": "default"})
    # theta'^(-2i/d_R) = theta^(-2 s i / d): pair i of the d_R-dim key turns at source pair s*i's rate.
    # Scaled RoPE types (llama3, linear, yarn) map each frequency by its wavelength, so they agree too.
    rope_parameters["rope_theta"] = geo.rope_theta ** (grid_step * rope_dim / geo.head_dim) if rope_dim else geo.rope_theta
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
        # vLLM's and SGLang's DeepseekV3 never tie the head to the embeddings: the head is written
        # out (`write_globals`), so a tied source still serves its own logits there.
        tie_word_embeddings=False,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        pad_token_id=getattr(src, "pad_token_id", None),
    )
    config.architectures = ["DeepseekV3ForCausalLM"]
    config.dtype = str(save_dtype).replace("torch.", "")
    return config


def deepseek_attention(tensors: dict, spec: dict, head_dim: int, num_heads: int, samples, eps: float, ballast: int):
    """latentkv MLA tensors of one layer -> DeepseekV3Attention tensors (latent widened by `ballast`
    dims that steady its RMSNorm), plus the norm's held-out relative error without and with them."""
    rope_dim, rank = spec["rope_dim"], spec["kv_lora_rank"]
    if spec["qk_nope_head_dim"] != head_dim:
        raise LatentKVError("The DeepSeek format needs a non-rotated query part per head; lower --qk-rope-dim")
    q = tensors["q_proj.weight"].view(num_heads, head_dim + rope_dim, -1)
    q = torch.stack([interleave_rope(q[h], rope_dim) for h in range(num_heads)]).reshape(-1, q.shape[-1])
    q = q * math.sqrt((head_dim + rope_dim) / head_dim)  # DeepSeek scales scores by 1/sqrt(d_nope + d_R)
    kv_a = tensors["kv_a_proj.weight"]
    rows, weight, plain_err, err = fit_norm_ballast(samples, kv_a[:rank], ballast, eps)
    kv_a = torch.cat([kv_a[:rank], rows.to(kv_a), kv_a[rank:]])
    kv_b = tensors["kv_b_proj.weight"]
    kv_b = torch.cat([kv_b, kv_b.new_zeros(kv_b.shape[0], ballast)], dim=1)  # the ballast reaches no key or value
    return {
        "q_proj.weight": q,
        "kv_a_proj_with_mqa.weight": interleave_rope(kv_a, rope_dim),
        "kv_a_layernorm.weight": torch.cat([weight, weight.new_ones(ballast)]),
        "kv_b_proj.weight": kv_b,
        "o_proj.weight": tensors["o_proj.weight"],
    }, plain_err, err


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
    rope_dim, fitted_rank = plan.widths[0]
    ballast = cfg.norm_ballast
    rank = fitted_rank + ballast
    writer = ShardedWriter(folder, max_shard_size=opts.max_shard_size)
    rows, errors, plain_errors = [], [], []
    for i in range(geo.num_layers):
        tensors, spec = method.build(stream, i, stats[i], plan, cfg)
        if "kv_a_proj.bias" in tensors:
            raise LatentKVError("The latent needs a bias here, which the DeepSeek format cannot hold; use --format latentkv")
        if stats[i].samples is None:
            raise LatentKVError("The calibration cache predates latent samples; pass a fresh --calib-cache")
        attn, plain_err, err = deepseek_attention(tensors, spec, geo.head_dim, geo.num_heads,
                                                  stats[i].samples.double(), stream.config.rms_norm_eps, ballast)
        errors.append(err)
        plain_errors.append(plain_err)
        write_layer(stream, writer, i, attn, save_dtype)
        rows.append({"layer": i, "rope_dim": rope_dim, "kv_lora_rank": rank, "norm_ballast": ballast,
                     "latent_norm_rel_error": err, "latent_norm_rel_error_without_ballast": plain_err})
        if progress is not None:
            progress(i)
    write_globals(stream, writer, save_dtype, untied_head="lm_head.weight")
    config = deepseek_config(stream, rope_dim, rank, cfg.rope_grid_step, save_dtype)
    config.save_pretrained(folder)
    copy_sidecars(source.folder, folder)
    kv = (rank + rope_dim) * geo.num_layers
    src_kv = geo.kv_values_per_token_per_layer * geo.num_layers
    mean_err, plain_mean = sum(errors) / len(errors), sum(plain_errors) / len(plain_errors)
    log.info("DeepSeek latent RMSNorm: held-out relative error %.3g mean, %.3g max (%.3g without the %d ballast dims)",
             mean_err, max(errors), plain_mean, ballast)
    write_cards(method, cfg, opts, source, folder, geo, kv, src_kv,
                extra_recipe={"deepseek_latent_norm_rel_error": {
                    "mean": mean_err, "max": max(errors), "mean_without_ballast": plain_mean, "norm_ballast": ballast}},
                load_hint="Loads as a stock DeepseekV3ForCausalLM (no remote code): transformers, vLLM, SGLang."
                          + _engine_hint(opts.engine))
    return ConvertResult(output=opts.output, kv_values_per_token=kv, source_kv_values_per_token=src_kv,
                         seconds=0.0, layers=rows, notes=[f"latent RMSNorm relative error {mean_err:.3g} (mean over layers; {plain_mean:.3g} without "
                                f"the {ballast} ballast dims)"])


def _engine_hint(name: str | None) -> str:
    """The card's line on the serving engine the geometry was fitted to (`--engine`)."""
    if not name:
        return " Its cache geometry was not fitted to an engine: see `latentkv inspect` for what each one runs."
    from latentkv.convert.engines import get_engine

    engine = get_engine(name)
    return (f" Fitted to {engine.engine}'s {engine.backend} backend ({engine.device}): it runs "
            f"{engine.describe()}, page size {engine.page_sizes}.")
