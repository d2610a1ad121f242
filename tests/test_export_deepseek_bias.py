"""The DeepSeek export's query path for sources with attention biases (export_deepseek)."""

from __future__ import annotations

import torch

from latentkv.convert.export_deepseek import fit_query_ballast, steady_input_scale


def _normed_inputs(n: int, width: int, g: torch.Generator, eps: float = 1e-6, constant: bool = False, wobble: float = 0.0):
    """Attention inputs x = w * h / rms(h) of an input RMSNorm with weight w (and h with a constant
    coordinate where `constant`, so that x / w has one: the ideal a query bias can be carried on)."""
    weight = 0.5 + torch.rand(width, generator=g, dtype=torch.float64)
    h = torch.randn(n, width, generator=g, dtype=torch.float64) * (0.2 + 3 * torch.rand(n, 1, generator=g, dtype=torch.float64))
    if constant:  # h = [a * (2, y)] with |y| fixed: a constant direction of h / rms(h)
        y = h[:, 1:] / h[:, 1:].norm(dim=1, keepdim=True) * 3.0
        lead = 2.0 + wobble * torch.randn(n, 1, generator=g, dtype=torch.float64)
        h = torch.cat([lead, y], dim=1) * (1 + h[:, :1].abs())
    return weight * h / (h.pow(2).mean(1, keepdim=True) + eps).sqrt(), weight


def test_steady_input_scale_undoes_the_input_norm_weight():
    """Guards the query path's premise: x / w has the same RMS for every token only with the input
    norm's own weight w; anything else (no weight, a zero, another weight) is refused (None)."""
    g = torch.Generator().manual_seed(0)
    x, weight = _normed_inputs(300, 24, g)
    inv = steady_input_scale(x, weight)
    assert inv is not None and torch.allclose(inv, 1 / weight)
    assert steady_input_scale(x, None) is None
    assert steady_input_scale(x, torch.cat([weight[:-1], weight.new_zeros(1)])) is None
    assert steady_input_scale(x, 0.5 + torch.rand(24, generator=g, dtype=torch.float64)) is None


def _deepseek_query(rows, q_b, x, eps):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    norm = DeepseekV3RMSNorm(rows.shape[0], eps=eps).double()
    with torch.no_grad():
        return norm(x @ rows.T) @ q_b.T


def test_query_ballast_is_exact_with_a_constant_direction():
    """Guards the biased query through q_a_proj -> q_a_layernorm -> q_b_proj: where the input norm's
    weight is undone and the input holds a constant direction, q_b (q_a_layernorm (q_a x)) is Q [x; 1]
    to rounding on held-out tokens, whatever the input's scale."""
    g = torch.Generator().manual_seed(1)
    width, eps = 16, 1e-6
    x, weight = _normed_inputs(400, width, g, eps, constant=True)
    q_aug = torch.randn(12, width + 1, generator=g, dtype=torch.float64)
    q_aug[:, -1] *= 5  # a bias of the size of the rest
    rows, q_b, err = fit_query_ballast(x, q_aug, dims=2, eps=eps, input_scale=steady_input_scale(x, weight))
    assert rows.shape == (width + 2, width) and q_b.shape == (12, width + 2)
    assert err < 1e-10
    test = x[300:]
    ref = test @ q_aug[:, :-1].T + q_aug[:, -1]
    assert float((_deepseek_query(rows, q_b, test, eps) - ref).norm() / ref.norm()) < 1e-6


def test_query_ballast_without_a_constant_direction_is_a_small_fit():
    """Guards the realistic case: no input direction is constant, so the bias rides on the best linear
    predictor of a constant; the error reported is the one the DeepSeek modules make, and undoing the
    input norm's weight is what keeps it small (the norm's scale otherwise moves with the token)."""
    g = torch.Generator().manual_seed(2)
    width, eps = 32, 1e-6
    x, weight = _normed_inputs(2000, width, g, eps, constant=True, wobble=0.2)  # a strong, not exact, constant direction
    q_aug = torch.randn(8, width + 1, generator=g, dtype=torch.float64)
    q_aug[:, -1] *= 0.3
    inv = steady_input_scale(x, weight)
    rows, q_b, err = fit_query_ballast(x, q_aug, dims=1, eps=eps, input_scale=inv)
    _, _, err_plain = fit_query_ballast(x, q_aug, dims=1, eps=eps, input_scale=None)
    test = x[1500:]
    ref = test @ q_aug[:, :-1].T + q_aug[:, -1]
    measured = float((_deepseek_query(rows, q_b, test, eps) - ref).pow(2).sum() / ref.pow(2).sum())
    assert abs(measured - err) < 1e-6 + 1e-3 * err
    assert err < 1e-3 and err <= err_plain


def test_biased_source_sets_only_the_biases_asked_for(tiny_model_dir, tmp_path):
    """Guards the ablation sources of benchmarks/deepseek_biased_cpu.md: `--biases k` sets the key bias
    alone (query and value biases zero), and a kept bias is the same draw as in the all-bias source."""
    from safetensors.torch import load_file
    from tiny_models import load_script

    module = load_script("biased_source")
    src = tiny_model_dir("llama")
    module.write_biased_qwen2(src, tmp_path / "all")
    module.write_biased_qwen2(src, tmp_path / "k", biases=("k",))
    every = load_file(str(next((tmp_path / "all").glob("*.safetensors"))))
    key_only = load_file(str(next((tmp_path / "k").glob("*.safetensors"))))
    name = "model.layers.0.self_attn.{}_proj.bias"
    assert torch.equal(key_only[name.format("k")], every[name.format("k")]) and bool(every[name.format("k")].any())
    assert not key_only[name.format("q")].any() and not key_only[name.format("v")].any()
    assert bool(every[name.format("q")].any()) and bool(every[name.format("v")].any())
