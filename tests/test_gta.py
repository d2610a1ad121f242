"""GTA-T (`--to gta`): the tied-state fit, the tied layout of LatentAttention, and healing it."""

from __future__ import annotations

import json

import pytest
import torch
import tiny_models

from latentkv.convert import gta, lowrank
from latentkv.modeling import load_model


@pytest.fixture(scope="module")
def gta_model(tiny_model_dir, tmp_path_factory):
    from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert

    root = tmp_path_factory.mktemp("gta")
    result = convert(ConvertOptions(
        source=str(tiny_model_dir("llama")), output=str(root / "out"), method="gta",
        calib=CalibOptions(data=str(tiny_models.TINY_TEXT), samples=8, seq_len=64, cache=str(root / "cache")),
    ))  # fmt: skip
    return result, root / "out"


def _random_problem(n_k=10, d=8, dim=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n_k + d, dim + 1, generator=gen, dtype=torch.float64)
    x = torch.randn(4000, dim, generator=gen, dtype=torch.float64) @ torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    x = torch.cat([x + 0.3, torch.ones(4000, 1, dtype=torch.float64)], 1)
    moment = x.T @ x / x.shape[0]
    a = torch.randn(n_k + d, n_k + d, generator=gen, dtype=torch.float64)
    metric = torch.block_diag((a @ a.T)[:n_k, :n_k], (a @ a.T)[n_k:, n_k:])
    return rows, metric, n_k, moment, d


@pytest.mark.parametrize("centered", [False, True])
def test_tied_fit_errors_are_what_the_readouts_leave(centered):
    """Guards the fit of module docstring step 2: the reported errors equal the measured error of
    the read-outs on the statistics; a key weight of 0 keeps the values exact (a and b span them);
    the chosen weight is the best of those tried; more key weight never fits the keys worse."""
    rows, metric, n_k, moment, d = _random_problem()
    fits = {w: gta.fit_tied_state(rows, metric, n_k, moment, d, (w,), centered) for w in (0.0, 1.0, 8.0)}
    assert fits[0.0].value_error < 1e-8 * fits[0.0].value_energy
    assert fits[8.0].key_error <= fits[1.0].key_error * (1 + 1e-9) <= fits[0.0].key_error * (1 + 1e-9)
    best = gta.fit_tied_state(rows, metric, n_k, moment, d, (0.0, 1.0, 8.0), centered)
    assert best.key_error + best.value_error == min(f.key_error + f.value_error for f in fits.values())
    # Reported errors against a direct computation over the (centred) covariance.
    cov = moment - (torch.outer(moment[:, -1], moment[:, -1]) if centered else 0)
    a = best.down[: d // 2]
    k_res = rows[:n_k] - best.key_up @ a
    v_res = rows[n_k:] - best.value_up @ best.down
    assert torch.isclose(torch.trace(metric[:n_k, :n_k] @ k_res @ cov @ k_res.T), torch.tensor(best.key_error, dtype=torch.float64))
    assert torch.isclose(torch.trace(metric[n_k:, n_k:] @ v_res @ cov @ v_res.T), torch.tensor(best.value_error, dtype=torch.float64))
    # The key read-out is the regression on a: its residual is uncorrelated with a.
    assert (k_res @ cov @ a.T).abs().max() < 1e-8 * (rows @ cov @ rows.T).abs().max()
    full = lowrank.fit_low_rank(rows, moment, metric, rows.shape[0], centered)
    assert float(full.spectrum.sum()) > 0


def test_gta_shapes_cache_and_report(gta_model):
    """Guards the GTA-T geometry: a state of the head dim per KV head plus a half-head-dim RoPE key
    in the cache (and in the HF cache at generation), no kv_b_proj, q/o of the source's shapes, and
    the per-layer fit errors written beside the weights."""
    from latentkv.modeling import cached_forward, new_dynamic_cache

    result, out = gta_model
    G, d, H, L = 2, 16, 4, 2  # tiny_models geometry
    assert result.kv_values_per_token == L * (G * d + d // 2)
    model = load_model(out)
    attn = model.model.layers[0].self_attn
    assert attn.tied and not hasattr(attn, "kv_b_proj")
    assert attn.q_proj.weight.shape == (H * d, 64) and attn.o_proj.weight.shape == (64, H * d)
    assert attn.kv_a_proj.weight.shape == (G * d + d // 2, 64)
    cache = new_dynamic_cache(model.config)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached_forward(model, ids, cache)
    stored = sum(t.shape[-1] for layer in cache.layers for t in (layer.keys, layer.values))
    assert stored == result.kv_values_per_token
    rows = json.loads((out / "latentkv_layers.json").read_text())
    assert len(rows) == L and all(0 <= r["key_rel_error"] < 1 and 0 <= r["value_rel_error"] < 1 for r in rows)


def test_tied_layout_equals_explicit_expansion(gta_model):
    """Guards the tied path of LatentAttention: the same layer written as an untied latent layer
    whose kv_b_proj is [I 0] for keys and I for values gives the same logits."""
    from latentkv.modeling.modeling_latentkv import LatentAttention

    _, out = gta_model
    model = load_model(out)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tied = model(ids).logits
    for i, layer in enumerate(model.model.layers):
        spec = dict(model.config.attention_layers[i], tied=False)
        model.config.attention_layers[i] = spec
        explicit = LatentAttention(model.config, i)
        state = {k: v for k, v in layer.self_attn.state_dict().items()}
        w_uk, w_uv = layer.self_attn.absorbed_weights()  # [H, d/2, d], [H, d, d]
        per = explicit.num_heads // explicit.latent_heads
        w = torch.cat([w_uk, w_uv], 1).view(explicit.latent_heads, per, -1, explicit.latent_head_dim)
        state["kv_b_proj.weight"] = w.reshape(-1, explicit.latent_head_dim).clone()
        explicit.load_state_dict(state)
        layer.self_attn = explicit
    with torch.no_grad():
        untied = model(ids).logits
    assert torch.allclose(tied, untied, atol=1e-5, rtol=1e-5)


def test_gta_heals(gta_model, tiny_model_dir, tmp_path):
    """Guards `latentkv finetune` on GTA-T (GTA-T needs healing): LoRA lands on q_proj,
    kv_a_proj and o_proj (there is no kv_b_proj), distillation lowers the loss, and the merged
    model keeps the tied layout and equals the adapter."""
    _, converted = gta_model
    out = tiny_models.damaged_copy(converted, tmp_path / "damaged", "kv_a_proj.weight")  # noise on the tied states
    _, merged, kl, rel = tiny_models.heal_adapter_and_merged(out, tiny_model_dir("llama"), tmp_path)
    assert sum(kl[-2:]) / 2 < 0.8 * kl[0], kl
    assert load_model(merged).model.layers[0].self_attn.tied
    assert rel < 1e-5
