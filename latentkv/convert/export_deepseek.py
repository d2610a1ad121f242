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
- No projection carries a bias (vLLM/SGLang build them without), so the latent is fitted
  uncentred, and a source's attention biases (Qwen2) are handled by what each one means: a key bias
  on the latent's position-free part shifts all scores of a query alike and is dropped (exact); the
  value bias (and an o_proj bias, as value constants) is read off the kv path's normalised latent
  and norm ballast by a least-squares predictor of a constant (`fit_latent_bias`); the query goes
  q_a_proj -> q_a_layernorm -> q_b_proj, q_a_proj passing the attention input with the input norm's weight
  undone (fixed RMS: the norm leaves it alone) and a ballast on the least-squares predictor of a
  constant (`fit_query_ballast`); a RoPE key bias turns with position and is replaced by its
  least-squares linear stand-in. Each layer's errors go to latentkv_layers.json.
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

import json
import logging
import math

import torch

from latentkv.arch import geometry_of
from latentkv.errors import LatentKVError

log = logging.getLogger(__name__)


def deepseek_refusal(config, arch) -> str:
    """Why --format deepseek cannot hold this source, from its config alone ("" if it can): checked
    before any calibration. Attention biases are held (module docstring), so they are not here."""
    if arch.deepseek_refusal:
        return arch.deepseek_refusal
    geo = geometry_of(config)
    if geo.rotary_dim < geo.head_dim:
        return (f"RoPE turns only part of each head ({geo.rotary_dim} of {geo.head_dim} dims), and DeepseekV3 "
                "is not written for that")
    return ""


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


def _affine_norm_fit(latent, bias, ballast, constant: bool, eps: float, gram=None, coeffs=None):
    """(relative error, coefficients) of the affine target y = [latent + bias; 1 if `constant`]
    read off the RMS-normalised features f = [latent; ballast] / rho.

    Each latent coordinate y_i is fitted by least squares from its own feature f_i and the ballast
    features (a weight and a column per ballast dim: the ballast is what carries the constant), the
    constant target from the ballast features alone. The error is weighted by `gram` (the Gram matrix
    of the map that turns y into keys, values or queries; its diagonal where a full one is not given).
    Returns (error, (w [r], m [r, b], m_const [b])); `coeffs` given: the error of those coefficients."""
    r, b = latent.shape[1], ballast.shape[1]
    rho = ((latent.pow(2).sum(1, keepdim=True) + ballast.pow(2).sum(1, keepdim=True)) / (r + b) + eps).sqrt()
    f, g = latent / rho, ballast / rho
    y = latent + bias
    if coeffs is None:
        feats = torch.cat([f[:, :, None], g[:, None, :].expand(-1, r, -1)], dim=2)  # [n, r, 1 + b]
        lhs = torch.einsum("nip,niq->ipq", feats, feats)
        ridge = 1e-12 * lhs.diagonal(dim1=1, dim2=2).sum(1).clamp_min(1e-30)[:, None, None]
        sol = torch.linalg.solve(lhs + ridge * torch.eye(1 + b, dtype=lhs.dtype),
                                 torch.einsum("nip,ni->ip", feats, y))
        gg = g.T @ g
        m_const = torch.linalg.solve(gg + 1e-12 * gg.trace() * torch.eye(b, dtype=gg.dtype), g.sum(0)) if constant \
            else g.new_zeros(b)
        coeffs = (sol[:, 0], sol[:, 1:], m_const)
    w, m, m_const = coeffs
    err_rows = y - (w * f + g @ m.T)
    if constant:
        err_rows = torch.cat([err_rows, 1 - g @ m_const[:, None]], dim=1)
        y = torch.cat([y, torch.ones_like(y[:, :1])], dim=1)
    if gram is None or gram.dim() == 1:
        weight = torch.ones(y.shape[1], dtype=y.dtype) if gram is None else gram
        err = (err_rows.pow(2) * weight).sum() / (y.pow(2) * weight).sum().clamp_min(1e-30)
    else:
        err = torch.einsum("ni,ij,nj->", err_rows, gram, err_rows) / torch.einsum("ni,ij,nj->", y, gram, y).clamp_min(1e-30)
    return err, coeffs


def fit_latent_bias(inputs: torch.Tensor, latent_rows: torch.Tensor, bias: torch.Tensor, constant: bool,
                    out_map: torch.Tensor, dims: int, eps: float, held_out: float = 0.25,
                    ridges: tuple[float, ...] = (1e-9, 1e-4, 1e-2)):
    """The kv path of a biased source: (ballast rows T [dims, D], kv_a_layernorm weight [r + dims],
    kv_b [out, r + dims], held-out relative error with the full Gram matrix of out_map), delivering
    out_map @ [latent_rows x + bias; 1 if `constant`] with no bias anywhere.

    The ballast and the norm's weight are the unbiased export's (`fit_norm_ballast`: the latent's
    per-token scale steadied, which is what the keys and values need most); the constant part
    beta = out_map @ [bias; 1] is then read off the norm's whole output by the ridge least-squares
    predictor a of the constant 1 (kv_b = [out_map_latent, 0] + beta a^T), the ridge being the one of
    `ridges` with the least error on the last `held_out` of the samples, where the error is reported."""
    inputs = inputs.double()
    latent_rows, bias, out_map = latent_rows.to(inputs), bias.to(inputs), out_map.to(inputs)
    r = latent_rows.shape[0]
    rows, weight, _, _ = fit_norm_ballast(inputs, latent_rows, dims, eps, held_out=held_out)
    norm_weight = torch.cat([weight, weight.new_ones(dims)])
    beta = out_map[:, :r] @ bias + (out_map[:, r] if constant else 0)
    cut = int(len(inputs) * (1 - held_out))
    feats = torch.cat([inputs @ latent_rows.T, inputs @ rows.T], dim=1)
    feats = norm_weight * feats / (feats.pow(2).mean(1, keepdim=True) + eps).sqrt()  # kv_a_layernorm's output
    fit_f, test_f = feats[:cut], feats[cut:]
    test_y = torch.cat([test_f.new_zeros(len(test_f), 0), inputs[cut:] @ latent_rows.T + bias], dim=1)
    if constant:
        test_y = torch.cat([test_y, test_y.new_ones(len(test_y), 1)], dim=1)
    moment = fit_f.T @ fit_f / len(fit_f)
    best = None
    for ridge in ridges:
        a = torch.linalg.solve(moment + ridge * moment.trace() / len(moment) * torch.eye(len(moment), dtype=moment.dtype),
                               fit_f.mean(0))
        kv_b = torch.cat([out_map[:, :r], out_map.new_zeros(out_map.shape[0], dims)], dim=1) + beta[:, None] * a[None]
        # error in out_map's coordinates: what kv_b @ features misses of out_map @ y, per token
        diff = test_f @ kv_b.T - test_y @ out_map.T
        err = float(diff.pow(2).sum() / (test_y @ out_map.T).pow(2).sum().clamp_min(1e-30))
        if best is None or err < best[0]:
            best = (err, kv_b)
    return rows, norm_weight, best[1], best[0]


def steady_input_scale(inputs: torch.Tensor, weight: torch.Tensor | None, tol: float = 1e-2) -> torch.Tensor | None:
    """1 / the input RMSNorm's weight, where it gives every attention input x the same mean square
    (x = weight * h / rms(h): x / weight has RMS one but for the norm's eps, and a following RMSNorm
    leaves it alone); None where the weight is unknown, has zeros, or the samples do not bear it out
    (relative spread of the mean squares over `tol`)."""
    if weight is None or weight.numel() != inputs.shape[1] or not bool((weight != 0).all()):
        return None
    inv = 1 / weight.double()
    ms = (inputs.double() * inv).pow(2).mean(1)
    if not bool(((ms - ms.mean()).abs() < tol * ms.mean()).all()):
        return None
    return inv


def fit_query_ballast(inputs: torch.Tensor, q_aug: torch.Tensor, dims: int, eps: float,
                      input_scale: torch.Tensor | None = None, held_out: float = 0.25,
                      ridges: tuple[float, ...] = (1e-9, 1e-4, 1e-2)):
    """A biased query q = Q [x; 1] through q_a_proj -> q_a_layernorm -> q_b_proj: (q_a rows [D + dims, D],
    q_b [out, D + dims], held-out relative error with the full Gram matrix of Q).

    q_a_proj passes n = x * input_scale (of fixed RMS where `input_scale` undoes the input norm's
    weight, `steady_input_scale`: the norm then leaves n as it is) and one ballast t = s u.n, u the
    ridge least-squares predictor of the constant 1 from n; q_b reads x and 1 back per coordinate
    (`_affine_norm_fit`). The scale s is the one of a log grid with the least error on the first
    1 - held_out of the samples (a small t keeps the norm's scale steady and carries the bias with
    the predictor's residual, a large one is steadier itself but rescales the rest); the ridge (relative
    to the mean eigenvalue) is the one of `ridges` with the least error on the rest, where the error is
    reported. Exact when the input has a constant direction and a fixed RMS; further ballast dims are
    left at zero."""
    x = inputs.double()
    q_aug = q_aug.double()
    width = x.shape[1]
    inv = torch.ones(width, dtype=x.dtype) if input_scale is None else input_scale.to(x)
    n = x * inv
    cut = int(len(n) * (1 - held_out))
    fit_n, test_n = n[:cut], n[cut:]
    moment = fit_n.T @ fit_n / len(fit_n)
    out_map = torch.cat([q_aug[:, :-1] / inv, q_aug[:, -1:]], dim=1)  # Q [x; 1] = out_map [n; 1]
    gram = out_map.T @ out_map
    zero = x.new_zeros(width)

    def ballast(samples, u, scale):  # t = s u.n, and the further (zero) dims the norm also averages over
        return torch.cat([scale * (samples @ u)[:, None], samples.new_zeros(len(samples), dims - 1)], dim=1)

    best = None
    for ridge in ridges:
        lam = ridge * moment.trace() / width
        u = torch.linalg.solve(moment + lam * torch.eye(width, dtype=x.dtype), fit_n.mean(0))
        fits = []
        for s in torch.logspace(-3, 1, 17, dtype=x.dtype).tolist():
            scale = s * math.sqrt(width)
            fits.append((_affine_norm_fit(fit_n, zero, ballast(fit_n, u, scale), True, eps, gram.diagonal())[0].item(),
                         scale))
        scale = min(fits)[1]
        coeffs = _affine_norm_fit(fit_n, zero, ballast(fit_n, u, scale), True, eps)[1]
        err = _affine_norm_fit(test_n, zero, ballast(test_n, u, scale), True, eps, gram, coeffs)[0].item()
        if best is None or err < best[0]:
            best = (err, scale, u, coeffs)
    err, scale, u, (w, m, m_const) = best
    latent_part = torch.cat([torch.diag(w), m], dim=1)
    latent_part = torch.cat([latent_part, torch.cat([w.new_zeros(1, width), m_const[None]], 1)])
    rows = torch.cat([torch.diag(inv), scale * (u * inv)[None], x.new_zeros(dims - 1, width)])
    return rows, out_map @ latent_part, err


def rope_key_without_bias(rows_aug: torch.Tensor, moment: torch.Tensor) -> tuple[torch.Tensor, float]:
    """A RoPE key's rows [d_R, D+1] (last column its bias, which turns with position and so cannot
    be dropped) as the least-squares linear rows W' [d_R, D] under the moment of [x; 1], and the
    relative error E|R [x;1] - W' x|^2 / E|R [x;1]|^2 left (0 where the bias is zero)."""
    rows_aug, moment = rows_aug.double(), moment.double()
    if not bool(rows_aug[:, -1].any()):
        return rows_aug[:, :-1], 0.0
    xx, x1 = moment[:-1, :-1], moment[:-1, -1:]
    # W' = W + beta (S_xx^-1 E[x])^T: the bias replaced by its best linear stand-in
    weight = rows_aug[:, :-1] + rows_aug[:, -1:] @ torch.linalg.lstsq(xx, x1).solution.T
    diff = torch.cat([rows_aug[:, :-1] - weight, rows_aug[:, -1:]], dim=1)
    err = torch.einsum("ri,ij,rj->", diff, moment, diff) / torch.einsum("ri,ij,rj->", rows_aug, moment, rows_aug)
    return weight, float(err)


def deepseek_config(stream, rope_dim: int, rank: int, grid_step: int, save_dtype, q_lora_rank: int | None = None):
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
        q_lora_rank=q_lora_rank,  # a query bias is carried by a q_a -> q_a_layernorm -> q_b path
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


def deepseek_attention(tensors: dict, spec: dict, head_dim: int, num_heads: int, samples, eps: float, ballast: int,
                       moment=None, biased: bool = False, input_norm: torch.Tensor | None = None):
    """latentkv MLA tensors of one layer -> DeepseekV3Attention tensors (latent widened by `ballast`
    dims that steady its RMSNorm), plus the layer's fit figures.

    A source without attention biases: the ballast reaches no key or value, the norm's weight is
    fitted (`fit_norm_ballast`). With biases (`biased`, from the source's config): the key bias on the
    latent's position-free part was dropped exactly (`mla._latent_problem`); the latent's own bias (the
    values', and the o_proj bias as per-head value constants) is read off the kv path's norm output
    (`fit_latent_bias`), the query bias carried by the q path's ballast (`fit_query_ballast`, on the input with
    `input_norm`, the input RMSNorm's weight, undone where the samples bear it out), the RoPE key's
    bias by its best linear stand-in (`rope_key_without_bias`, under `moment`)."""
    rope_dim, rank = spec["rope_dim"], spec["kv_lora_rank"]
    if spec["qk_nope_head_dim"] != head_dim:
        raise LatentKVError("The DeepSeek format needs a non-rotated query part per head; lower --qk-rope-dim")
    q = tensors["q_proj.weight"]
    q = torch.cat([q, tensors.get("q_proj.bias", q.new_zeros(q.shape[0]))[:, None]], dim=1)  # bias as last column
    q = q.view(num_heads, head_dim + rope_dim, -1)
    q = torch.stack([interleave_rope(q[h], rope_dim) for h in range(num_heads)]).reshape(-1, q.shape[-1])
    q = q * math.sqrt((head_dim + rope_dim) / head_dim)  # DeepSeek scales scores by 1/sqrt(d_nope + d_R)
    kv_a, kv_b = tensors["kv_a_proj.weight"], tensors["kv_b_proj.weight"]
    if not biased:
        rows, weight, plain_err, err = fit_norm_ballast(samples, kv_a[:rank], ballast, eps)
        kv_a = torch.cat([kv_a[:rank], rows.to(kv_a), kv_a[rank:]])
        kv_b = torch.cat([kv_b, kv_b.new_zeros(kv_b.shape[0], ballast)], dim=1)  # the ballast reaches no key or value
        return {
            "q_proj.weight": q[:, :-1],
            "kv_a_proj_with_mqa.weight": interleave_rope(kv_a, rope_dim),
            "kv_a_layernorm.weight": torch.cat([weight, weight.new_ones(ballast)]),
            "kv_b_proj.weight": kv_b,
            "o_proj.weight": tensors["o_proj.weight"],
        }, {"latent_norm_rel_error": err, "latent_norm_rel_error_without_ballast": plain_err}
    hidden = q.shape[1] - 1
    eye = torch.eye(hidden, dtype=torch.float64)
    q_rows, q_b, q_err = fit_query_ballast(samples, q, ballast, eps, steady_input_scale(samples, input_norm))
    a_bias = tensors.get("kv_a_proj.bias", kv_a.new_zeros(kv_a.shape[0])).double()
    rope_rows, rope_err = rope_key_without_bias(torch.cat([kv_a[rank:].double(), a_bias[rank:, None]], dim=1), moment)
    o_bias = tensors.get("o_proj.bias")
    out_map, figures = kv_b.double(), {}
    if o_bias is not None and bool(o_bias.any()):
        constant, figures["o_bias_rel_error"] = value_constant(tensors["o_proj.weight"], o_bias, num_heads, head_dim)
        out_map = torch.cat([out_map, constant[:, None]], dim=1)
    kv_rows, kv_norm, kv_b, kv_err = fit_latent_bias(samples, kv_a[:rank], a_bias[:rank], out_map.shape[1] > rank,
                                                     out_map, ballast, eps)
    return {
        "q_a_proj.weight": q_rows,
        "q_a_layernorm.weight": eye.new_ones(hidden + ballast),
        "q_b_proj.weight": q_b,
        "kv_a_proj_with_mqa.weight": interleave_rope(torch.cat([kv_a[:rank].double(), kv_rows, rope_rows]), rope_dim),
        "kv_a_layernorm.weight": kv_norm,
        "kv_b_proj.weight": kv_b,
        "o_proj.weight": tensors["o_proj.weight"],
    }, {"q_rel_error": q_err, "kv_rel_error": kv_err, "rope_key_bias_rel_error": rope_err, **figures}


def value_constant(o_weight: torch.Tensor, o_bias: torch.Tensor, num_heads: int, head_dim: int):
    """The o_proj bias as constants on each head's values (attention weights sum to one, so a value
    constant reaches the output as o_proj of it): a column in kv_b's row layout ([key rows; value
    rows] per head), and the relative part of the bias that o_proj's span misses (0 at full row rank)."""
    o_weight, o_bias = o_weight.double(), o_bias.double()
    values = torch.linalg.lstsq(o_weight, o_bias[:, None]).solution[:, 0]  # least-norm v with o_weight v = o_bias
    miss = float((o_weight @ values - o_bias).norm() / o_bias.norm())
    column = torch.cat([values.new_zeros(num_heads, head_dim), values.view(num_heads, head_dim)], dim=1)
    return column.reshape(-1), miss


def write_deepseek(method, stream, stats, plan, cfg, opts, source, folder, save_dtype, progress=None):
    from latentkv.convert.output import LAYERS_FILE, write_cards, write_globals, write_layer
    from latentkv.convert.pipeline import ConvertResult
    from latentkv.io.writer import ShardedWriter, copy_sidecars

    geo = geometry_of(stream.config)
    biased = any(stream.arch.has_bias(stream.config, w) for w in ("q", "o"))
    widths = set(plan.widths)
    if len(widths) != 1:
        raise LatentKVError("The DeepSeek format needs one width for all layers; use uniform allocation")
    rope_dim, fitted_rank = plan.widths[0]
    ballast = cfg.norm_ballast
    rank = fitted_rank + ballast
    writer = ShardedWriter(folder, max_shard_size=opts.max_shard_size)
    rows = []
    for i in range(geo.num_layers):
        tensors, spec = method.build(stream, i, stats[i], plan, cfg)
        if stats[i].samples is None:
            raise LatentKVError("The calibration cache predates latent samples; pass a fresh --calib-cache")
        norm = stream.layer_state_dict(i).get(stream.arch.input_norm + ".weight") if biased and stream.arch.input_norm \
            else None
        attn, figures = deepseek_attention(tensors, spec, geo.head_dim, geo.num_heads, stats[i].samples.double(),
                                           stream.config.rms_norm_eps, ballast, stats[i].moment, biased, norm)
        write_layer(stream, writer, i, attn, save_dtype)
        rows.append({"layer": i, "rope_dim": rope_dim, "kv_lora_rank": rank, "norm_ballast": ballast, **figures})
        if progress is not None:
            progress(i)
    write_globals(stream, writer, save_dtype, untied_head="lm_head.weight")
    config = deepseek_config(stream, rope_dim, rank, cfg.rope_grid_step, save_dtype,
                             q_lora_rank=geo.hidden_size + ballast if biased else None)
    config.save_pretrained(folder)
    copy_sidecars(source.folder, folder)
    (folder / LAYERS_FILE).write_text(json.dumps(rows, indent=1) + "\n")
    kv = (rank + rope_dim) * geo.num_layers
    src_kv = geo.kv_values_per_token_per_layer * geo.num_layers
    summary, note = fit_summary(rows, ballast)
    log.info("DeepSeek export: %s", note)
    write_cards(method, cfg, opts, source, folder, geo, kv, src_kv, extra_recipe=summary,
                load_hint="Loads as a stock DeepseekV3ForCausalLM (no remote code): transformers, vLLM, SGLang."
                          + (f" The source's attention biases: {note}." if biased else "")
                          + _engine_hint(opts.engine))
    return ConvertResult(output=opts.output, kv_values_per_token=kv, source_kv_values_per_token=src_kv,
                         seconds=0.0, layers=rows, notes=[note])


def fit_summary(rows: list[dict], ballast: int) -> tuple[dict, str]:
    """The recipe's entry and a one-line note on the per-layer fit figures of a DeepSeek export."""
    def stats(key):
        values = [row[key] for row in rows if key in row]
        return {"mean": sum(values) / len(values), "max": max(values)} if values else None

    if "latent_norm_rel_error" in rows[0]:
        err, plain = stats("latent_norm_rel_error"), stats("latent_norm_rel_error_without_ballast")
        return ({"deepseek_latent_norm_rel_error": {**err, "mean_without_ballast": plain["mean"], "norm_ballast": ballast}},
                f"latent RMSNorm relative error {err['mean']:.3g} (mean over layers; {plain['mean']:.3g} without "
                f"the {ballast} ballast dims)")
    figures = {key: stats(key) for key in BIAS_FIGURES if stats(key) is not None}
    parts = [f"{BIAS_FIGURES[key]} {v['mean']:.3g} (max {v['max']:.3g})" for key, v in figures.items()]
    return ({"deepseek_bias_fit": {**figures, "norm_ballast": ballast, "key_bias": "dropped (exact)"}},
            "key bias on the latent's position-free part dropped (exact: softmax removes it); relative errors, mean "
            "over layers (held-out calibration samples; the RoPE key's over all calibration tokens): " + "; ".join(parts))


# Per-layer fit figures of a biased source's DeepSeek export (latentkv_layers.json) and what they measure.
BIAS_FIGURES = {
    "q_rel_error": "queries with their bias, through q_a_layernorm",
    "kv_rel_error": "position-free keys and values with the value bias, through kv_a_layernorm",
    "rope_key_bias_rel_error": "RoPE key with its bias replaced by a linear stand-in",
    "o_bias_rel_error": "o_proj bias as value constants",
}


def _engine_hint(name: str | None) -> str:
    """The card's line on the serving engine the geometry was fitted to (`--engine`)."""
    if not name:
        return " Its cache geometry was not fitted to an engine: see `latentkv inspect` for what each one runs."
    from latentkv.convert.engines import get_engine

    engine = get_engine(name)
    return (f" Fitted to {engine.engine}'s {engine.backend} backend ({engine.device}): it runs "
            f"{engine.describe()}, page size {engine.page_sizes}.")
