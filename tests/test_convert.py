"""Invariants of the MLA / GLA conversion, generic over one table of cases (architecture x method)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from latentkv.convert import lowrank, rope
from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert
from latentkv.errors import LatentKVError
from latentkv.modeling import load_model
from tiny_models import TINY_TEXT

ARCHS = ["llama", "mistral", "qwen2", "mixtral", "llama3-scaled", "llama-mha", "gemma", "phi3", "phi3-partial",
         "gpt_neox", "gpt_neox-serial", "qwen3", "qwen3-moe", "gemma2", "gemma3_text", "smollm3", "olmo2",
         "mistral-head-dim"]
# (method, options) at no compression: RoPE key = every key dim, latent = every value dim.
FULL_RANK = {
    "mla": dict(kv_budget=1.0),
    "gla": dict(kv_budget=1.0, latent_heads=2),
}
# Where the source's own width cannot hold the method at full rank: one KV head shared by two latent
# heads, each of which must then hold the whole value (Gemma 3's single KV head).
FULL_RANK_WIDER = {("gemma3_text", "gla"): dict(kv_lora_rank=32, qk_rope_dim=16, latent_heads=2)}


def _source_model(src):
    """The source as transformers computes it exactly (eager attention where scores are soft-capped:
    some releases' SDPA path drops the cap)."""
    from latentkv.arch import get_arch

    config = transformers.AutoConfig.from_pretrained(src)
    return transformers.AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, attn_implementation=get_arch(config).attention_implementation(config)).eval()


def _convert(src, out, tmp_path, method="mla", fmt="latentkv", **options):
    return convert(
        ConvertOptions(
            source=str(src), output=str(out), method=method, method_options=options, format=fmt,
            calib=CalibOptions(data=str(TINY_TEXT), samples=8, seq_len=64, cache=str(tmp_path / f"cache-{out.name}")),
        )
    )


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


def _tensor_names(folder) -> list[str]:
    from safetensors import safe_open

    names = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            names += list(h.keys())
    return names


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", sorted(FULL_RANK))
@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_reproduces_source(arch, method, tiny_model_dir, tmp_path):
    """Guards the core promise: at no compression the converted model computes the source's logits
    (rotation basis, RoPE frequencies, biases, latent fit and modeling code all exact), over 48 tokens,
    which is past the 16-token windows of the sliding layers (Gemma 2/3), with soft-capped scores and
    logits, per-type RoPE tables, layers without RoPE and q/k norms over all heads."""
    src = tiny_model_dir(arch)
    out = tmp_path / f"{arch}-{method}"
    result = _convert(src, out, tmp_path, method, **FULL_RANK_WIDER.get((arch, method), FULL_RANK[method]))
    if (arch, method) not in FULL_RANK_WIDER:
        assert result.kv_values_per_token == result.source_kv_values_per_token
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    ref = _logits(_source_model(src), ids)
    got = _logits(load_model(out), ids)
    assert torch.isfinite(got).all()
    assert _rel(got, ref) < 1e-5


@pytest.mark.parametrize("arch", ["gemma2", "smollm3", "mistral-head-dim", "llama"])
def test_gqa_with_the_source_heads_reproduces_source(arch, tiny_model_dir, tmp_path):
    """Guards --to gqa on the new rows that allow it (no q/k norm): keeping every KV head it writes
    the source's own architecture computing the source's logits (soft-caps, sliding layer, a layer
    without RoPE, a head dim that is not hidden / heads)."""
    src = tiny_model_dir(arch)
    out = tmp_path / "gqa"
    _convert(src, out, tmp_path, "gqa", num_kv_heads=transformers.AutoConfig.from_pretrained(src).num_key_value_heads)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    assert _rel(_logits(_source_model(out), ids), _logits(_source_model(src), ids)) < 1e-5


FRESH_PROCESS = textwrap.dedent(
    """
    import sys, json, torch
    class NoLatentKV:
        def find_spec(self, name, path=None, target=None):
            if name == "latentkv" or name.startswith("latentkv."):
                raise ImportError("latentkv must not be needed to load a converted model")
    sys.meta_path.insert(0, NoLatentKV())
    import transformers
    out, ids_path, logits_path = sys.argv[1:4]
    config = json.load(open(out + "/config.json"))
    # soft-capped scores (Gemma 2) need eager attention: some releases' SDPA path drops the cap
    capped = (config.get("source_config") or config).get("attn_logit_softcapping")
    extra = {"attn_implementation": "eager"} if capped else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                                              **extra).eval()
    ids = torch.load(ids_path)
    with torch.no_grad():
        full = model(ids).logits
        torch.save(full, logits_path)
        # the model's own cache, under the name this transformers version gives it
        fields = transformers.modeling_outputs.CausalLMOutputWithPast.__dataclass_fields__
        name = "cache" if "cache" in fields else "past_key_values"
        cache = transformers.DynamicCache(config=model.config)
        steps = [model(ids[:, :8], use_cache=True, **{name: cache}).logits]
        steps += [model(ids[:, t : t + 1], use_cache=True, **{name: cache}).logits for t in range(8, ids.shape[1])]
        incremental = torch.cat(steps, dim=1)
        rel = float((incremental - full).double().norm() / full.double().norm())
        prompt = ids[:, :6]
        greedy = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
        with_cache = model.generate(prompt, use_cache=True, **greedy)
        without_cache = model.generate(prompt, use_cache=False, **greedy)
    per_token = sum(t.numel() // t.shape[0] // t.shape[-2] for l in cache.layers for t in (l.keys, l.values)
                    if t is not None and t.numel())
    print(json.dumps({"cache_values_per_token": per_token, "incremental_rel": rel,
                      "generate_same": with_cache.tolist() == without_cache.tolist()}))
    """
)


def reload_in_fresh_process(out, tmp_path) -> tuple[float, dict]:
    """Loads `out` in a fresh Python with latentkv blocked: (relative difference of its logits from
    latentkv's loader on the same ids, and what the fresh process measured of the model's own cache:
    values per token it holds, the relative difference of incremental decoding from the full forward,
    and whether greedy generate() gives the same tokens with the cache as without)."""
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(2))
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(tmp_path / "logits.pt").double()
    return _rel(fresh, _logits(load_model(out), ids)), json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch,method,options", [
    ("qwen2", "mla", dict(kv_budget=0.5)),
    ("mixtral", "gla", dict(kv_budget=0.5, latent_heads=2)),
    ("llama", "gta", dict()),
    ("gemma", "gta", dict()),
    ("phi3", "mla", dict(kv_budget=0.5)),
    ("gpt_neox", "mla", dict(kv_budget=0.5)),
    ("gpt_neox-serial", "gla", dict(kv_budget=0.5, latent_heads=2)),
    ("phi3-partial", "gta", dict()),
    ("qwen3", "mla", dict(kv_budget=0.5, sequential=True, refit_output=True)),
    ("qwen3-moe", "gta", dict()),
    ("mistral", "gqa", dict(num_kv_heads=1)),
    ("gemma2", "mla", dict(kv_budget=0.5)),
    ("gemma2", "gqa", dict(num_kv_heads=1)),
    ("gemma3_text", "mla", dict(kv_budget=0.5)),
    ("smollm3", "mla", dict(kv_budget=0.5)),
    ("olmo2", "gla", dict(kv_budget=0.5, latent_heads=2)),
    ("mistral-head-dim", "mla", dict(kv_budget=0.5)),
])
def test_reload_in_fresh_process_without_latentkv(arch, method, options, tiny_model_dir, tmp_path):
    """Guards the self-contained export on the installed transformers: a fresh Python with latentkv
    blocked loads the folder with trust_remote_code, computes the same logits as our loader, its HF
    cache holds only what the config declares, and decoding with that cache is not silently wrong:
    incremental logits equal the full forward and greedy generate() gives the same tokens with the
    cache as without (a transformers release once renamed the cache argument and the modeling file
    silently decoded without it)."""
    out = tmp_path / "out"
    result = _convert(tiny_model_dir(arch), out, tmp_path, method, **options)
    rel, fresh = reload_in_fresh_process(out, tmp_path)
    assert rel < 1e-6
    assert fresh["cache_values_per_token"] == result.kv_values_per_token < result.source_kv_values_per_token
    assert fresh["incremental_rel"] < 1e-5
    assert fresh["generate_same"]
    if method == "gqa":  # the source's own architecture: no remote code
        return
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_latentkv.LatentKVForCausalLM"
    for name in ("modeling_latentkv.py", "tokenizer.json", "generation_config.json", "README.md", "latentkv_recipe.yaml"):
        assert (out / name).exists(), name
    assert (out / "tokenizer.json").read_bytes() == (tiny_model_dir(arch) / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compression_degrades_gracefully(arch, tiny_model_dir, tmp_path):
    """Guards the rank cut: fewer cached values give a larger but finite error, never NaN, and the
    widths written to the config are the ones the cache holds (Qwen3: a latent of the normalised keys)."""
    src = tiny_model_dir(arch)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    ref = _logits(transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), ids)
    errors = []
    for budget in (1.0, 0.75, 0.5):
        out = tmp_path / f"b{budget}"
        res = _convert(src, out, tmp_path, kv_budget=budget)
        assert res.kv_values_per_token == round(budget * 64) * 2
        errors.append(_rel(_logits(load_model(out), ids), ref))
    assert errors[0] < 1e-5
    assert all(math.isfinite(e) for e in errors)
    assert errors[0] < errors[1] <= errors[2] * 1.5


@pytest.mark.parametrize("method,fmt,options", [("mla", "latentkv", dict(kv_budget=0.5)), ("gta", "latentkv", dict()),
                                                ("mla", "deepseek", dict(kv_lora_rank=24, qk_rope_dim=16))])
def test_output_refit_is_exact_at_full_rank_and_helps_when_compressed(method, fmt, options, tiny_model_dir, tmp_path):
    """Guards the o_proj refit (`convert.refit`): at full rank the regression returns the source's
    output projection (logits unchanged); compressed, the refit layers' output error on the
    calibration text is lower than the plain one-shot's, layer after layer compounded."""
    from transformers import AutoTokenizer

    from latentkv.calibration.data import TextSource, token_windows

    src = tiny_model_dir("llama")
    windows = token_windows(AutoTokenizer.from_pretrained(src), TextSource(str(TINY_TEXT)), 8, 64, 0)
    ref = _logits(transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), windows)
    full = _convert(src, tmp_path / "full", tmp_path, kv_budget=1.0, refit_output=True)
    assert full.kv_values_per_token == full.source_kv_values_per_token
    assert _rel(_logits(load_model(tmp_path / "full"), windows), ref) < 1e-4
    _convert(src, tmp_path / "plain", tmp_path, method, fmt, **options)
    _convert(src, tmp_path / "refit", tmp_path, method, fmt, refit_output=True, **options)
    if fmt == "deepseek":  # vLLM/SGLang build DeepSeek's o_proj without a bias: the refit adds none
        assert not any("o_proj.bias" in k for k in _tensor_names(tmp_path / "refit"))
    plain = _rel(_logits(load_model(tmp_path / "plain"), windows), ref)
    refit = _rel(_logits(load_model(tmp_path / "refit"), windows), ref)
    assert refit < plain, (refit, plain)


def test_one_pass_sequential_calibration(tiny_model_dir, tmp_path, monkeypatch):
    """Guards sequential calibration in one pass (`plan_in_pass`): with fixed widths it builds the
    same model as the two-pass route (source statistics for the plan, then the converted pass); with
    a budget each layer's width is chosen from its own sequential statistics, the budget is kept,
    and sequential + refit beats the plain one-shot on the calibration text."""
    from transformers import AutoTokenizer

    from latentkv.calibration.data import TextSource, token_windows
    from latentkv.convert.mla_method import MLAMethod

    src = tiny_model_dir("llama")
    windows = token_windows(AutoTokenizer.from_pretrained(src), TextSource(str(TINY_TEXT)), 8, 64, 0)
    ref = _logits(transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), windows)
    fixed = dict(kv_lora_rank=24, qk_rope_dim=16, sequential=True, refit_output=True)
    _convert(src, tmp_path / "one", tmp_path, **fixed)
    budget = _convert(src, tmp_path / "budget", tmp_path, kv_budget=0.5, sequential=True, refit_output=True)
    _convert(src, tmp_path / "plain", tmp_path, kv_budget=0.5)
    monkeypatch.setattr(MLAMethod, "plan_in_pass", None)  # the two-pass route
    _convert(src, tmp_path / "two", tmp_path, **fixed)
    one = _logits(load_model(tmp_path / "one"), windows)
    assert _rel(one, _logits(load_model(tmp_path / "two"), windows)) < 1e-5
    assert budget.kv_values_per_token == budget.source_kv_values_per_token // 2
    seq = _rel(_logits(load_model(tmp_path / "budget"), windows), ref)
    plain = _rel(_logits(load_model(tmp_path / "plain"), windows), ref)
    assert seq < plain, (seq, plain)


def _random_problem(G=3, H=6, d=8, D=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4000, D, generator=g, dtype=torch.float64) @ torch.randn(D, D, generator=g, dtype=torch.float64)
    x_aug = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    moment = x_aug.T @ x_aug / len(x)
    wk = torch.randn(G * d, D + 1, generator=g, dtype=torch.float64)
    wq = torch.randn(H * d, D + 1, generator=g, dtype=torch.float64)
    return wk, wq, moment, x_aug


@pytest.mark.parametrize("mix", ["complex", "real", "none"])
def test_key_basis_commutes_with_rope(mix):
    """Guards the rotation step: re-expressing keys in the per-frequency basis (and folding the
    inverse into queries) leaves every RoPE score unchanged at any pair of positions."""
    G, H, d = 3, 6, 8
    wk, wq, moment, x_aug = _random_problem(G, H, d)
    group = torch.arange(H) // (H // G)
    zk, zq = rope.complex_pairs(wk, G, d), rope.complex_pairs(wq, H, d)
    basis = rope.key_basis(zk, zq, moment, group, mix=mix)
    assert torch.allclose(basis.A @ basis.B, torch.eye(G, dtype=torch.complex128).expand_as(basis.A), atol=1e-9)
    comps = [(j, m) for j in range(d // 2) for m in range(G)]
    w = rope.component_rows(basis, zk, comps) @ x_aug[:5].T.to(torch.complex128)  # [n, tokens]
    u = rope.query_coefficients(basis, comps, group)[:, :, None] * (zq[:, [j for j, _ in comps]] @ x_aug[:5].T.to(torch.complex128))
    theta = torch.rand(d // 2, dtype=torch.float64)
    phase = torch.exp(1j * theta[[j for j, _ in comps]] * 7.0)[:, None]  # Delta = 7
    zk_x = zk @ x_aug[:5].T.to(torch.complex128)  # [G, P, tokens]
    zq_x = zq @ x_aug[:5].T.to(torch.complex128)  # [H, P, tokens]
    src = (zq_x * zk_x[group].conj() * torch.exp(1j * theta * 7.0)[None, :, None]).real.sum(1)  # [H, tokens]
    new = (u * w.conj()[None] * phase[None]).real.sum(1)
    assert torch.allclose(new, src, rtol=1e-8, atol=1e-8)


def test_low_rank_fit_exact_at_full_rank_and_error_is_tail():
    """Guards the latent step: at full rank the code reconstructs z exactly; at rank r the metric
    error equals the sum of the dropped spectrum (so the planner's predictions are right)."""
    _, wq, moment, x_aug = _random_problem()
    rows = wq[:12]
    g = torch.Generator().manual_seed(5)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    metric = a @ a.T + 0.1 * torch.eye(12, dtype=torch.float64)
    full = lowrank.fit_low_rank(rows, moment, metric, 12)
    assert torch.allclose(full.up @ full.down, rows, atol=1e-7)
    for centered in (False, True):
        fit = lowrank.fit_low_rank(rows, moment, metric, 5, centered=centered)
        z = x_aug @ rows.T
        zhat = x_aug @ (fit.up @ fit.down).T
        err = z - zhat
        if centered:
            err = err - err.mean(0)
        measured = float(torch.einsum("ti,ij,tj->", err, metric, err) / len(z))
        assert measured == pytest.approx(float(fit.spectrum[5:].sum()), rel=1e-6)
        # The planner's eigenvalue-only path gives the same spectrum, for full-rank and singular metrics.
        b = torch.randn(12, 4, generator=g, dtype=torch.float64)
        for m in (metric, b @ b.T):
            direct = lowrank.metric_spectrum(rows, moment, m, centered)[0]
            fast = lowrank.metric_spectrum_values(rows, moment, m, centered)
            # The two floor a singular metric differently (clamped vs added 1e-9 x max eigenvalue):
            # the directions it does not see differ at that scale only.
            assert torch.allclose(fast, direct, rtol=1e-6, atol=1e-8 * float(direct[0]))


def test_unsupported_architecture_lists_supported(tmp_path):
    """Guards the error path: an unknown model_type is refused before any work, naming the supported ones."""
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(LatentKVError, match="gemma, gemma2, gemma3_text, gpt_neox, llama, mistral, mixtral, olmo2"):
        _convert(tmp_path / "gpt2", tmp_path / "out", tmp_path, kv_budget=0.5)
    assert not (tmp_path / "out").exists()


def test_impossible_settings_are_refused(tiny_model_dir, tmp_path):
    """Guards user-input validation: ranks past the key/value span, odd RoPE widths, MoE in the
    DeepSeek format (and Gemma's norms, Phi-3's fused MLP, GPT-NeoX's parallel residual and LayerNorm
    biases, Qwen3's QK norms there), GPT-NeoX to fewer KV heads and unknown settings all fail with a
    message naming the fix, writing nothing."""
    src = tiny_model_dir("llama")
    out = tmp_path / "out"
    with pytest.raises(LatentKVError, match="larger than possible"):
        _convert(src, out, tmp_path, kv_lora_rank=4096, qk_rope_dim=16)
    with pytest.raises(LatentKVError, match="even"):
        _convert(src, out, tmp_path, kv_budget=0.5, qk_rope_dim=7)
    with pytest.raises(LatentKVError, match="mixture of experts"):
        _convert(tiny_model_dir("mixtral"), out, tmp_path, fmt="deepseek", kv_lora_rank=16)
    with pytest.raises(LatentKVError, match=r"cannot hold gemma: its RMSNorms scale by \(1 \+ w\)"):
        _convert(tiny_model_dir("gemma"), out, tmp_path, fmt="deepseek", kv_lora_rank=16)
    with pytest.raises(LatentKVError, match="cannot hold phi3: its MLP fuses"):
        _convert(tiny_model_dir("phi3"), out, tmp_path, fmt="deepseek", kv_lora_rank=16)
    with pytest.raises(LatentKVError, match="cannot hold gpt_neox: its layers may add attention and MLP in parallel"):
        _convert(tiny_model_dir("gpt_neox"), out, tmp_path, fmt="deepseek", kv_lora_rank=16)
    with pytest.raises(LatentKVError, match="cannot write gpt_neox with fewer KV heads: GPTNeoXAttention has one"):
        _convert(tiny_model_dir("gpt_neox"), out, tmp_path, method="gqa", num_kv_heads=2)
    with pytest.raises(LatentKVError, match="rotated key dims"):
        _convert(tiny_model_dir("gpt_neox"), out, tmp_path, kv_budget=0.5, qk_rope_dim=18)
    with pytest.raises(LatentKVError, match="cannot hold qwen3: its attention RMS-normalises .* --format latentkv"):
        _convert(tiny_model_dir("qwen3"), out, tmp_path, fmt="deepseek", kv_lora_rank=16)
    with pytest.raises(LatentKVError, match="Unknown mla settings"):
        _convert(src, out, tmp_path, kv_budget=0.5, rope_mixx="real")
    with pytest.raises(LatentKVError, match="Unknown conversion target"):
        _convert(src, out, tmp_path, method="mqa", kv_budget=0.5)
    assert not out.exists()


def test_partial_rotary_geometry_and_gta_refusal():
    """Guards partial rotary's geometry (rotary_dim as transformers computes it, from rope_parameters
    or GPT-NeoX's rotary_pct; an odd count refused) and GTA-T's refusal where the rotated key dims
    cannot fill its RoPE key of half the head dim."""
    from latentkv.arch import geometry_of, get_arch
    from latentkv.convert.registry import get_method

    small = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=96, vocab_size=64)

    def phi3(partial, kv_heads=2):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial}
        return transformers.Phi3Config(**small, num_key_value_heads=kv_heads, rope_parameters=rope)

    assert geometry_of(phi3(0.25)).rotary_dim == 4 and geometry_of(phi3(1.0)).rotary_dim == 16
    neox = geometry_of(transformers.GPTNeoXConfig(**small, rotary_pct=0.5))
    assert (neox.rotary_dim, neox.head_dim, neox.num_kv_heads) == (8, 16, 4)
    with pytest.raises(LatentKVError, match="rotates 5 dims; RoPE needs an even number"):
        geometry_of(phi3(0.3125))
    gta = get_method("gta")
    config = phi3(0.25, kv_heads=1)  # 1 KV head x 4 rotated dims < the 8-dim RoPE key
    with pytest.raises(LatentKVError, match="RoPE turns only 1 x 4 key dims"):
        gta.validate(config, get_arch(config), gta.make_config({}, "latentkv"), "latentkv")
    config = phi3(0.25)  # 2 x 4 fills it
    gta.validate(config, get_arch(config), gta.make_config({}, "latentkv"), "latentkv")


def test_non_empty_output_is_refused_before_work(tiny_model_dir, tmp_path):
    """Guards existing results: a non-empty output folder is refused (before calibration) unless overwrite."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LatentKVError, match="--overwrite"):
        _convert(tiny_model_dir("llama"), out, tmp_path, kv_budget=0.5)
    assert (out / "keep.txt").read_text() == "mine"


def test_calibration_cache_resumes_and_refuses_mismatch(tiny_model_dir, tmp_path):
    """Guards resumability: a second run reuses the cached statistics (same result), and a cache
    folder made with other settings is refused rather than silently reused."""
    src = tiny_model_dir("llama")
    cache = tmp_path / "cache"
    opts = dict(source=str(src), method_options=dict(kv_budget=0.5))
    calib = dict(data=str(TINY_TEXT), samples=8, seq_len=64, cache=str(cache))
    convert(ConvertOptions(output=str(tmp_path / "a"), calib=CalibOptions(**calib), **opts))
    layer_files = sorted(cache.glob("layer_*.pt"))
    assert len(layer_files) == 2
    stamp = [f.stat().st_mtime_ns for f in layer_files]
    convert(ConvertOptions(output=str(tmp_path / "b"), calib=CalibOptions(**calib), **opts))
    assert [f.stat().st_mtime_ns for f in layer_files] == stamp  # reused, not recomputed
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    with pytest.raises(LatentKVError, match="other settings"):
        convert(ConvertOptions(output=str(tmp_path / "c"), calib=CalibOptions(**{**calib, "seq_len": 32}), **opts))


def test_statistics_equal_direct_computation(tiny_model_dir, tmp_path):
    """Guards the streaming calibration: layer-by-layer second moments equal those of a hooked
    full-model forward over the same windows."""
    from latentkv.calibration.data import TextSource, token_windows
    from latentkv.calibration.runner import LayerStream
    from latentkv.calibration.stats import StatsCache
    from latentkv.convert.pipeline import collect_stats
    from latentkv.io.source import open_source

    source = open_source(str(tiny_model_dir("qwen2")))
    windows = token_windows(source.tokenizer(), TextSource(str(TINY_TEXT)), 4, 32, 0)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2"), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states
        inputs = [layer.input_layernorm(hidden[i]) for i, layer in enumerate(model.model.layers)]
    stream = LayerStream(source.config, source.weights)
    stats = collect_stats(stream, windows, StatsCache(tmp_path / "c", {"k": 1}), CalibOptions(profile_samples=2))
    for i, st in enumerate(stats):
        x = inputs[i].reshape(-1, inputs[i].shape[-1]).double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        direct = x.T @ x / len(x)
        assert torch.allclose(st.moment, direct, rtol=1e-4, atol=1e-5)
        assert st.distance.shape == (4, 32) and torch.allclose(st.distance.sum(1), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("arch", ["llama", "phi3-partial", "gpt_neox"])
def test_distance_profile_equals_source_attention(tiny_model_dir, arch):
    """Guards the RoPE that calibration applies (`stats.source_qk`, fused q/k/v rows included): the
    attention-distance profile must equal the one read off the source's own attention probabilities,
    with RoPE on part of each head as well as on all of it; else the RoPE shrink is measured on
    wrong scores (or, for partial rotary, the shapes do not even broadcast)."""
    from latentkv.arch import geometry_of, get_arch
    from latentkv.calibration.data import TextSource, token_windows
    from latentkv.calibration.stats import attention_distance_profile, source_qk

    folder = tiny_model_dir(arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64,
                                                              attn_implementation="eager").eval()
    windows = token_windows(transformers.AutoTokenizer.from_pretrained(folder), TextSource(str(TINY_TEXT)), 2, 24, 0)
    spec, geo = get_arch(model.config), geometry_of(model.config)
    decoder = getattr(model, spec.base_model)
    with torch.no_grad():
        out = model(windows, output_attentions=True, output_hidden_states=True)
        pos_emb = decoder.rotary_emb(out.hidden_states[0], torch.arange(24)[None])
        t = torch.arange(24)
        distance = (t[:, None] - t[None, :]).clamp(min=0).flatten()
        for i, layer in enumerate(decoder.layers):
            x = layer.get_submodule(spec.input_norm)(out.hidden_states[i])
            got = attention_distance_profile(*source_qk(layer, spec, x, pos_emb, geo))
            mass = out.attentions[i].sum(0).reshape(geo.num_heads, -1)  # [H, L*L], summed over windows
            expected = torch.zeros(geo.num_heads, 24, dtype=torch.float64).index_add_(1, distance, mass) / (2 * 24)
            assert torch.allclose(got, expected, atol=1e-6), (i, float((got - expected).abs().max()))


def test_qk_norm_statistics_equal_hooked_forward(tiny_model_dir, tmp_path):
    """Guards the QK-norm calibration (Qwen3): the streamed moments are those of what transformers'
    own forward computes after k_norm / v_proj (keys and values) and after q_norm (queries), so the
    latent reads exactly what the source attention reads; the distance profile is of normalised q, k."""
    from latentkv.calibration.data import TextSource, token_windows
    from latentkv.calibration.runner import LayerStream
    from latentkv.calibration.stats import StatsCache
    from latentkv.convert.pipeline import collect_stats
    from latentkv.io.source import open_source

    src = tiny_model_dir("qwen3")
    source = open_source(str(src))
    windows = token_windows(source.tokenizer(), TextSource(str(TINY_TEXT)), 4, 32, 0)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    seen: dict = {}
    for i, layer in enumerate(model.model.layers):
        for name in ("q_norm", "k_norm", "v_proj"):
            layer.self_attn.get_submodule(name).register_forward_hook(
                lambda _m, _a, out, key=(i, name): seen.__setitem__(key, out.flatten(-2) if out.dim() == 4 else out))
    with torch.no_grad():
        model(windows)

    def moment(t):
        x = t.reshape(-1, t.shape[-1]).double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        return x.T @ x / len(x)

    stream = LayerStream(source.config, source.weights)
    stats = collect_stats(stream, windows, StatsCache(tmp_path / "c", {"k": 1}), CalibOptions(profile_samples=2))
    for i, st in enumerate(stats):
        kv = torch.cat([seen[i, "k_norm"], seen[i, "v_proj"]], dim=-1)
        assert st.moment.shape == (2 * 2 * 16 + 1,) * 2 and st.q_moment.shape == (4 * 16 + 1,) * 2
        assert torch.allclose(st.moment, moment(kv), rtol=1e-4, atol=1e-5)
        assert torch.allclose(st.q_moment, moment(seen[i, "q_norm"]), rtol=1e-4, atol=1e-5)
        assert torch.allclose(st.distance.sum(1), torch.ones(4, dtype=torch.float64))


def test_deepseek_shared_rope_width(tiny_model_dir, tmp_path):
    """Guards the DeepSeek format's one RoPE width under --kv-budget: `shared_split` picks the width
    with the least summed per-layer relative error (not the first, not one layer's favourite), and
    a budget conversion writes that one width for every layer, within the budget."""
    from latentkv.convert.mla_method import shared_split

    def curve(errors_at_rank):  # {rope_dim: (rotation loss, [spectrum])}: error = rot + spectrum tail
        return {rd: (rot, [torch.tensor(tail, dtype=torch.float64)]) for rd, (rot, tail) in errors_at_rank.items()}

    # Budget 4: rope 0 -> rank 4, rope 2 -> rank 2. Layer A prefers rope 0 a little; layer B needs rope 2.
    a = curve({0: (1.0, [4, 3, 2, 1]), 2: (0.0, [4, 3, 1.5, 1])})  # errors 1.0 vs 2.5... relative 0.4 vs 1
    b = curve({0: (9.0, [4, 3, 2, 1]), 2: (0.0, [4, 3, 1, 1])})  # errors 9.0 vs 2.0: relative 1 vs 0.22
    choice = shared_split([a, b], 4, 1)
    assert [(rd, r) for _, rd, r in choice] == [(2, 2), (2, 2)]
    assert [(rd, r) for _, rd, r in shared_split([a, a], 4, 1)] == [(0, 4), (0, 4)]

    src = tiny_model_dir("llama")
    r = _convert(src, tmp_path / "ds", tmp_path, fmt="deepseek", kv_budget=0.5)
    config = json.loads((tmp_path / "ds" / "config.json").read_text())
    per_layer = config["kv_lora_rank"] + config["qk_rope_head_dim"]
    assert 0 < config["qk_rope_head_dim"] <= 16 and r.kv_values_per_token == per_layer * config["num_hidden_layers"]
    assert per_layer <= 0.5 * r.source_kv_values_per_token / config["num_hidden_layers"]
    # --sequential: the shared width needs every layer's curve (a source pass first); a width given
    # on the command line leaves one pass.
    from types import SimpleNamespace

    from latentkv.convert.mla_method import MLAMethod

    stream = SimpleNamespace(config=transformers.AutoConfig.from_pretrained(src))
    method = MLAMethod()
    assert method.plan_in_pass(stream, method.make_config(dict(kv_budget=0.5), "deepseek"), "deepseek") is None
    assert method.plan_in_pass(stream, method.make_config(dict(kv_budget=0.5, qk_rope_dim=8), "deepseek"), "deepseek")


def test_deepseek_export_of_a_tied_source_writes_its_head(tiny_model_dir, tmp_path):
    """Guards against a silent head-less model: vLLM's and SGLang's DeepseekV3 never tie the LM head,
    so the export of a tied-embedding source writes `lm_head.weight` (the embedding) and an untied
    config; transformers computes the same logits from it as with the head tied."""
    from safetensors import safe_open

    src = tiny_model_dir("llama-tied")
    out = tmp_path / "ds"
    _convert(src, out, tmp_path, fmt="deepseek", kv_lora_rank=24, qk_rope_dim=16)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys() if k in ("lm_head.weight", "model.embed_tokens.weight")})
    assert set(tensors) == {"lm_head.weight", "model.embed_tokens.weight"}
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    with safe_open(next(src.glob("*.safetensors")), "pt") as h:
        assert torch.equal(tensors["lm_head.weight"], h.get_tensor("model.embed_tokens.weight"))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    untied = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tied = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, tie_word_embeddings=True).eval()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert torch.equal(_logits(untied, ids), _logits(tied, ids))


def test_norm_ballast_steadies_the_latent_rms():
    """A latent whose per-token RMS varies (chi-distributed) gets a near-constant scale once one
    ballast dim reads a direction of the input with a steady projection; held-out error drops."""
    from latentkv.convert.export_deepseek import fit_norm_ballast

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 24, generator=g, dtype=torch.float64)
    x[:, 0] = 3.0 + 0.01 * x[:, 0]  # like the steady channels of real attention inputs
    latent_rows = torch.randn(6, 24, generator=g, dtype=torch.float64)
    latent_rows[:, 0] = 0
    rows, weight, plain, err = fit_norm_ballast(x, latent_rows, dims=1, eps=1e-6)
    assert rows.shape == (1, 24) and weight.shape == (6,)
    assert plain > 0.01 and err < 0.1 * plain
    none, _, plain0, err0 = fit_norm_ballast(x, latent_rows, dims=0, eps=1e-6)
    assert none.shape == (0, 24) and err0 == plain0 and math.isclose(plain0, plain, rel_tol=1e-3)


def test_deepseek_export_matches_latentkv_up_to_latent_norm(tiny_model_dir, tmp_path):
    """Guards the DeepSeek export: a stock DeepseekV3ForCausalLM (no remote code) whose latent
    RMSNorm is bypassed computes exactly what the latentkv export with the same widths computes
    (interleaved RoPE on the rewritten theta, folded softmax scale, weight layout), and with the
    fitted norm stays close."""
    src = tiny_model_dir("llama")
    # kv_lora_rank 40 in the DeepSeek format = 39 fitted latent dims + 1 norm ballast dim.
    _convert(src, tmp_path / "ds", tmp_path, fmt="deepseek", kv_lora_rank=40, qk_rope_dim=16)
    _convert(src, tmp_path / "plain", tmp_path, fmt="deepseek", kv_lora_rank=39, qk_rope_dim=16, norm_ballast=0)
    _convert(src, tmp_path / "lk", tmp_path, rope_frequency_grid=True, center=False, kv_lora_rank=39, qk_rope_dim=16)
    # A RoPE key narrower than the head (8 of 16 dims): on source pairs 0-3 (step 1, theta' =
    # theta^(1/2)) or 0, 2, 4, 6 (step 2, theta kept): the rewritten theta lands on those pairs.
    for step in (1, 2):
        _convert(src, tmp_path / f"ds-step{step}", tmp_path, fmt="deepseek", kv_lora_rank=39, qk_rope_dim=8,
                 rope_grid_step=step, norm_ballast=0)
        _convert(src, tmp_path / f"lk-step{step}", tmp_path, rope_frequency_grid=True, center=False, kv_lora_rank=39,
                 qk_rope_dim=8, rope_grid_step=step)
    with pytest.raises(LatentKVError, match="rope_grid_step <= 2"):
        _convert(src, tmp_path / "bad", tmp_path, fmt="deepseek", kv_lora_rank=39, qk_rope_dim=8, rope_grid_step=3)
    config = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and "auto_map" not in config
    assert config["kv_lora_rank"] == 40 and config["qk_rope_head_dim"] == 16 and config["rope_interleave"]
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(4))
    ref = _logits(load_model(tmp_path / "lk"), ids)
    errors = {}
    for name in ("ds", "plain"):
        ds = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()
        errors[name] = _rel(_logits(ds, ids), ref)
        for layer in ds.model.layers:
            layer.self_attn.kv_a_layernorm = torch.nn.Identity()
        assert _rel(_logits(ds, ids), ref) < 1e-5  # the ballast reaches no key or value
    assert errors["ds"] < 0.5
    theta = config["rope_parameters"]["rope_theta"]  # a RoPE key as wide as the head: the source's theta
    for step in (1, 2):
        narrow = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"ds-step{step}", dtype=torch.float32).eval()
        assert math.isclose(narrow.config.rope_parameters["rope_theta"], theta ** (step * 8 / 16))
        for layer in narrow.model.layers:
            layer.self_attn.kv_a_layernorm = torch.nn.Identity()
        assert _rel(_logits(narrow, ids), _logits(load_model(tmp_path / f"lk-step{step}"), ids)) < 1e-5
    import yaml

    norm = yaml.safe_load((tmp_path / "ds" / "latentkv_recipe.yaml").read_text())["measured"]["deepseek_latent_norm_rel_error"]
    assert norm["norm_ballast"] == 1 and norm["mean"] <= norm["mean_without_ballast"]
    # `latentkv eval` reads the format: the latent and RoPE key per layer, as the cache holds them.
    from latentkv.eval.report import evaluate

    report = evaluate(str(tmp_path / "ds"), eval_text=str(TINY_TEXT), window=16, windows=2)
    assert report["kv_values_per_token"] == (40 + 16) * config["num_hidden_layers"]
    from latentkv.eval.report import inspect_model

    assert inspect_model(str(tmp_path / "ds"))["architecture"]["RoPE + latent per layer"] == "16+40"
    assert math.isfinite(report["perplexity"])


def test_latent_bias_rides_on_the_norm_ballast():
    """Guards the DeepSeek export's kv path for a biased source: the latent's constant (value bias, and
    value constants for an o_proj bias) is read off kv_a_layernorm's output by a least-squares predictor
    on top of the unbiased export's norm ballast; the error it reports is the one the written tensors make
    when applied as DeepseekV3 applies them (RMSNorm with its weight, then kv_b); it falls as a direction of
    the input becomes steady, to the floor the latent's own scale leaves; with no bias it is the unbiased
    export's kv path."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    from latentkv.convert.export_deepseek import fit_latent_bias, fit_norm_ballast

    g = torch.Generator().manual_seed(0)
    latent_rows = torch.randn(6, 24, generator=g, dtype=torch.float64)
    bias = 3 * torch.randn(6, generator=g, dtype=torch.float64)
    out_map = torch.randn(10, 7, generator=g, dtype=torch.float64)  # 6 latent dims and the constant
    errors = []
    for spread in (1.0, 1e-2, 1e-4):
        x = torch.randn(4000, 24, generator=g, dtype=torch.float64)
        x[:, 0] = 3.0 + spread * x[:, 0]  # a channel as steady as `spread` allows
        rows, weight, kv_b, err = fit_latent_bias(x, latent_rows, bias, True, out_map, dims=1, eps=1e-6)
        assert rows.shape == (1, 24) and weight.shape == (7,) and kv_b.shape == (10, 7)
        test = x[3000:]  # the held-out quarter
        norm = DeepseekV3RMSNorm(7, eps=1e-6).double()
        with torch.no_grad():
            norm.weight.copy_(weight)
            out = norm(torch.cat([test @ latent_rows.T, test @ rows.T], dim=1)) @ kv_b.T
        ref = torch.cat([test @ latent_rows.T + bias, torch.ones(len(test), 1, dtype=torch.float64)], dim=1) @ out_map.T
        # DeepseekV3RMSNorm normalises in float32: the same error to float32's precision
        assert math.isclose(float((out - ref).pow(2).sum() / ref.pow(2).sum()), err, rel_tol=1e-4, abs_tol=1e-12)
        errors.append(err)
    assert errors[0] > errors[1] >= errors[2] * 0.99
    rows, weight, kv_b, err = fit_latent_bias(x, latent_rows, torch.zeros(6, dtype=torch.float64), False,
                                              out_map[:, :6], dims=1, eps=1e-6)
    plain_rows, plain_weight, _, _ = fit_norm_ballast(x, latent_rows, 1, 1e-6)
    assert torch.equal(rows, plain_rows) and torch.equal(weight[:6], plain_weight)
    assert torch.equal(kv_b, torch.cat([out_map[:, :6], torch.zeros(10, 1, dtype=torch.float64)], dim=1))


def test_rope_key_bias_and_o_bias_stand_ins():
    """Guards the two exact pieces of the biased DeepSeek export: a RoPE key bias is replaced by
    its least-squares linear stand-in (exact where the input has a constant direction, untouched
    where the bias is zero), and an o_proj bias becomes per-head value constants that o_proj maps
    back onto it exactly (full row rank)."""
    from latentkv.convert.export_deepseek import rope_key_without_bias, value_constant

    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64)
    x[:, 3] = 2.0  # a constant direction: the bias has an exact linear stand-in
    aug = torch.cat([x, torch.ones(500, 1, dtype=torch.float64)], dim=1)
    moment = aug.T @ aug / 500
    rows = torch.randn(4, 9, generator=g, dtype=torch.float64)
    weight, err = rope_key_without_bias(rows, moment)
    assert err < 1e-20 and torch.allclose(x @ weight.T, aug @ rows.T, atol=1e-10)
    x[:, 3] = torch.randn(500, generator=g, dtype=torch.float64)
    aug = torch.cat([x, torch.ones(500, 1, dtype=torch.float64)], dim=1)
    _, err = rope_key_without_bias(rows, aug.T @ aug / 500)
    assert err > 1e-3  # no constant direction: an error, reported
    unbiased = torch.cat([rows[:, :-1], torch.zeros(4, 1, dtype=torch.float64)], dim=1)
    kept, err = rope_key_without_bias(unbiased, moment)
    assert torch.equal(kept, unbiased[:, :-1]) and err == 0.0
    o_weight, o_bias = torch.randn(8, 4 * 3, generator=g), torch.randn(8, generator=g)  # 4 heads of 3
    column, miss = value_constant(o_weight, o_bias, num_heads=4, head_dim=3)
    per_head = column.view(4, 6)  # [key rows; value rows] per head, as kv_b_proj's rows
    assert miss < 1e-6 and torch.equal(per_head[:, :3], torch.zeros(4, 3, dtype=torch.float64))
    assert torch.allclose(o_weight.double() @ per_head[:, 3:].reshape(-1), o_bias.double(), atol=1e-6)


def test_latent_drops_the_position_free_key_bias_exactly(tiny_model_dir, tmp_path):
    """Guards the key-bias drop: a constant on a position-free key shifts every score of a query
    alike, so the uncentred latent leaves it out, and the full-rank conversion of a biased Qwen2 still
    reproduces the source; the latent's bias is then the values' alone."""
    from safetensors import safe_open

    src = tiny_model_dir("qwen2")
    out = tmp_path / "lk"
    _convert(src, out, tmp_path, center=False, **FULL_RANK["mla"])
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    assert _rel(_logits(load_model(out), ids), _logits(_source_model(src), ids)) < 1e-5
    spec = json.loads((out / "config.json").read_text())["attention_layers"][0]
    with safe_open(next(out.glob("*.safetensors")), "pt") as h:
        latent_bias = h.get_tensor("model.layers.0.self_attn.kv_a_proj.bias")[: spec["kv_lora_rank"]].double()
        up = h.get_tensor("model.layers.0.self_attn.kv_b_proj.weight").double()
    keys = up.view(4, spec["qk_nope_head_dim"] + 16, -1)[:, : spec["qk_nope_head_dim"]]
    assert float((keys @ latent_bias).norm()) < 1e-4 * float((up @ latent_bias).norm())


def test_deepseek_export_of_a_biased_source(tiny_model_dir, tmp_path):
    """Guards the DeepSeek export of a Qwen2 (q/k/v biases): a stock DeepseekV3ForCausalLM loaded
    without remote code, the query through q_a_proj -> q_a_layernorm -> q_b_proj, no bias tensor
    anywhere, each layer's fit errors in latentkv_layers.json, the recipe and the card, and logits
    as close to the latentkv export with the same widths as the unbiased export's are."""
    import yaml

    src = tiny_model_dir("qwen2")
    r = _convert(src, tmp_path / "ds", tmp_path, fmt="deepseek", kv_lora_rank=40, qk_rope_dim=16)
    _convert(src, tmp_path / "lk", tmp_path, rope_frequency_grid=True, center=False, kv_lora_rank=39, qk_rope_dim=16)
    config = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and "auto_map" not in config
    assert config["q_lora_rank"] == 64 + 1 and config["attention_bias"] is False
    assert not [n for n in _tensor_names(tmp_path / "ds") if n.endswith(".bias")]
    rows = json.loads((tmp_path / "ds" / "latentkv_layers.json").read_text())
    assert [row["layer"] for row in rows] == [0, 1]
    for row in rows:
        assert {"q_rel_error", "kv_rel_error", "rope_key_bias_rel_error"} <= set(row)
        assert all(0 <= row[k] < 1 for k in ("q_rel_error", "kv_rel_error", "rope_key_bias_rel_error"))
    fit = yaml.safe_load((tmp_path / "ds" / "latentkv_recipe.yaml").read_text())["measured"]["deepseek_bias_fit"]
    assert math.isclose(fit["q_rel_error"]["max"], max(row["q_rel_error"] for row in rows))
    assert "key bias on the latent's position-free part dropped (exact" in (tmp_path / "ds" / "README.md").read_text()
    assert "dropped (exact" in r.notes[0]
    tok = transformers.AutoTokenizer.from_pretrained(src)  # text like the calibration's: the tiny model's inputs
    ids = tok(TINY_TEXT.read_text()[-4000:], return_tensors="pt").input_ids[:, :160].view(4, 40)
    ds = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ds", dtype=torch.float32).eval()
    assert type(ds).__name__ == "DeepseekV3ForCausalLM"
    assert _rel(_logits(ds, ids), _logits(load_model(tmp_path / "lk"), ids)) < 0.5


def test_deepseek_refusals_come_before_calibration(tiny_model_dir, tmp_path, monkeypatch):
    """Guards the order of work: what --format deepseek cannot hold is known from the config, so
    it is refused before any calibration text is read; `inspect` says the same per model."""
    from latentkv.convert import pipeline
    from latentkv.eval.report import inspect_model

    def unreachable(*args, **kwargs):
        raise AssertionError("calibration started before a config-only refusal")

    monkeypatch.setattr(pipeline, "token_windows", unreachable)
    monkeypatch.setattr(pipeline, "collect_stats", unreachable)
    out = tmp_path / "out"
    for name, message in (("phi3-partial", "cannot hold phi3: its MLP fuses"), ("qwen3", "cannot hold qwen3"),
                          ("gpt_neox", "cannot hold gpt_neox"), ("gemma", "cannot hold gemma")):
        with pytest.raises(LatentKVError, match=message):
            _convert(tiny_model_dir(name), out, tmp_path, fmt="deepseek", kv_budget=0.5)
    with pytest.raises(LatentKVError, match="norm_ballast >= 1"):
        _convert(tiny_model_dir("qwen2"), out, tmp_path, fmt="deepseek", kv_budget=0.5, norm_ballast=0)
    assert not out.exists()
    qwen2 = inspect_model(str(tiny_model_dir("qwen2")))
    assert qwen2["architecture"]["--format deepseek"].startswith("held; its q/k/v biases are fitted")
    assert any(t["target"].startswith("mla --format deepseek") for t in qwen2["targets"])
    assert inspect_model(str(tiny_model_dir("llama")))["architecture"]["--format deepseek"] == "held"
    for name in ("phi3-partial", "qwen3"):
        report = inspect_model(str(tiny_model_dir(name)))
        assert report["architecture"]["--format deepseek"].startswith("refused: ")
        assert not any("deepseek" in t["target"] for t in report["targets"]) and not report["engines"]
