"""A converted model's own cache format (`latentkv convert --cache-format`): carried in its config,
honoured by its self-contained modeling file, `latentkv eval`, `inspect` and the paged decode loop
(latent quantized as it is appended, dequantized inside the decode kernel).

Tiny Llama converted to MLA, GLA and GTA-S; the Triton kernel runs interpreted on the CPU (conftest
sets TRITON_INTERPRET=1 when there is no GPU) and compiled on a GPU.
"""

from __future__ import annotations

import importlib
import json
import random

import pytest
import torch
import tiny_models
from typer.testing import CliRunner

from latentkv.cli import app
from latentkv.kvformats import fake_quantize, parse_format
from latentkv.eval.quantized_cache import own_cache_format_off, quantized_logits
from latentkv.kvformats import parse_cache_formats
from latentkv.modeling import load_model
from latentkv.modeling.modeling_latentkv import stored_as

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PROMPT = "To be, or not to be, that is the question"
# method -> (method options, --cache-format): each layout the paged cache has (fp8 groups with a shorter
# last group, int4 per latent head across GLA heads, a bf16 latent beside GTA-S's map keys)
CASES = {
    "mla": (dict(kv_budget=0.5), "fp8_e4m3/g16"),
    "gla": (dict(kv_budget=0.5, latent_heads=2), "latent=int4/head,rope=bf16"),
    "gta-s": (dict(map_heads=2), "latent=fp8_e4m3/g8,rope=fp16"),
}
EXPECTED_ENTRY = {"mla": {"latent": "fp8_e4m3/g16", "rope": "bf16"},
                  "gla": {"latent": "int4/head", "rope": "bf16"},
                  "gta-s": {"latent": "fp8_e4m3/g8", "rope": "fp16"}}


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    """converted(method) -> folder of tiny Llama converted with that case's --cache-format (once per module)."""
    from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert

    built = {}

    def make(method: str):
        if method not in built:
            root = tmp_path_factory.mktemp(f"cachefmt_{method}")
            options, spec = CASES[method]
            convert(ConvertOptions(
                source=str(tiny_model_dir("llama")), output=str(root / "out"), method=method, method_options=options,
                cache_format=spec,
                calib=CalibOptions(data=str(tiny_models.TINY_TEXT), samples=8, seq_len=64, cache=str(root / "cache")),
            ))  # fmt: skip
            built[method] = root / "out"
        return built[method]

    return make


FORMATS = ["bf16", "fp16", "fp8_e4m3", "fp8_e4m3/g16", "fp8_e4m3/g5", "fp8_e4m3/head", "fp8_e4m3/token", "int8/head",
           "int4/g32", "int4/g7", "int4/token", "int2/g16"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modeling_file_round_trip_equals_kv_formats(fmt, dtype):
    """Guards the modeling file's own copy of the formats' arithmetic (it may import only torch):
    bit for bit what latentkv.kvformats stores and reads back, on fresh random values."""
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    x = (torch.randn(2, 3, 5, 40, generator=g) * torch.rand(1, 1, 1, 40, generator=g) * 10).to(dtype)
    assert torch.equal(stored_as(x, fmt), fake_quantize(x, parse_format(fmt)))


@pytest.mark.parametrize("method", sorted(CASES))
def test_config_carries_the_format_and_the_model_reads_it(converted, method):
    """Guards the modeling file: the config holds the format; the model's forward equals its weights
    run through transformers' cache stored in that format (QuantizedKVCache), and differs from them
    without it."""
    folder = converted(method)
    config = json.loads((folder / "config.json").read_text())
    assert config["kv_cache_format"] == EXPECTED_ENTRY[method]
    model = load_model(folder)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    formats = parse_cache_formats(",".join(f"{k}={v}" for k, v in EXPECTED_ENTRY[method].items()), ("latent", "rope"))
    with torch.no_grad():
        own = model(ids).logits
        with own_cache_format_off(model):
            plain = model(ids).logits
            through_cache = quantized_logits(model, ids, formats, chunk=ids.shape[1])
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(own, through_cache) < 1e-5
    assert rel(own, plain) > 1e-4  # the format is not a no-op on these widths


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_paged_loop_agrees_with_the_model_under_its_format(converted, method, backend):
    """Guards the paged path under a cache format: the latent stored quantized at append time
    (codes + scales) and dequantized by the kernel (or the reference) gives the logits of the
    model's own forward within decode_check's float32 tolerance (1e-4; TF32 on a GPU: 5e-3), since
    both read bit-identical dequantized values; the greedy tokens equal those of transformers'
    cache path (hf_cache_first_divergence None), over 24 tokens crossing 16-token pages, splits 2."""
    if backend == "triton":
        pytest.importorskip("triton", reason="triton not installed")
        md = importlib.import_module("latentkv.kernels.mla_decode")
        if not CUDA and type(md._kernels()[0]).__name__ != "InterpretedFunction":
            pytest.skip("triton was imported in compiled mode without a GPU; run with TRITON_INTERPRET=1")
    from transformers import AutoTokenizer

    from latentkv.eval.decode_check import decode_check
    from latentkv.runtime.decode import PagedLatentCache
    from latentkv.kernels.quantized_pages import QuantizedPages

    folder = converted(method)
    model = load_model(folder, device=DEVICE)
    cache = PagedLatentCache.for_model(model, max_seqs=1, max_seq_len=16)
    quantized = EXPECTED_ENTRY[method]["latent"] not in ("bf16", "fp16")
    assert all(isinstance(p, QuantizedPages) == quantized for p in cache.pages)
    report = decode_check(model, AutoTokenizer.from_pretrained(folder), PROMPT, num_tokens=24, backend=backend,
                          page_size=16, prefill_chunk=8, max_prompt_tokens=12,
                          num_splits=2 if backend == "triton" else None)
    assert report["passed"], report
    assert report["hf_cache_first_divergence"] is None, report


def test_bytes_per_token_count_scales(converted):
    """Guards the byte accounting: the paged cache's bytes a token (codes, group scales, RoPE key at
    the model dtype) and `inspect`'s count from the config (RoPE key at its bf16 format)."""
    from latentkv.runtime.decode import PagedLatentCache
    from latentkv.kvformats import config_bytes_per_token
    from latentkv.eval.report import inspect_model

    folder = converted("mla")
    model = load_model(folder)
    layers = model.config.attention_layers
    cache = PagedLatentCache.for_model(model, max_seqs=1, max_seq_len=16)
    # fp8: a byte a value, a float32 scale per started group of 16; RoPE key float32 (the model dtype)
    assert cache.bytes_per_token() == sum(s["kv_lora_rank"] + 4 * -(-s["kv_lora_rank"] // 16) + 4 * s["rope_dim"]
                                          for s in layers)
    stored = sum(s["kv_lora_rank"] + 4 * -(-s["kv_lora_rank"] // 16) + 2 * s["rope_dim"] for s in layers)
    assert config_bytes_per_token(model.config) == (stored, "latent=fp8_e4m3/g16, rope=bf16")
    rows = inspect_model(str(folder))["architecture"]
    assert rows["KV cache format"] == "latent=fp8_e4m3/g16, rope=bf16"
    assert rows["KV bytes per token (all layers, scales included)"] == f"{stored:g}"
    assert "latent=fp8_e4m3/g16, rope=bf16" in (folder / "README.md").read_text()
    assert "cache_format: fp8_e4m3/g16" in (folder / "latentkv_recipe.yaml").read_text()


def test_eval_uses_the_carried_format_unless_overridden(converted):
    """Guards `latentkv eval`: by default the model runs in its config's format and reports its bytes;
    an explicit --kv-cache replaces it (the model's own quantization switched off)."""
    from latentkv.kvformats import config_bytes_per_token
    from latentkv.eval.report import evaluate

    folder = converted("mla")
    text = str(tiny_models.TINY_TEXT)
    carried = evaluate(str(folder), eval_text=text, window=32, windows=2, batch_size=2)
    assert carried["cache_dtype"] == "latent=fp8_e4m3/g16, rope=bf16"
    assert carried["kv_cache_format_from"] == "the model's config"
    assert carried["kv_bytes_per_token"] == config_bytes_per_token(load_model(folder).config)[0]
    same = evaluate(str(folder), eval_text=text, window=32, windows=2, batch_size=2,
                    kv_cache="latent=fp8_e4m3/g16,rope=bf16")
    assert same["perplexity"] == pytest.approx(carried["perplexity"], rel=1e-5)
    plain = evaluate(str(folder), eval_text=text, window=32, windows=2, batch_size=2, kv_cache="fp16")
    assert plain["cache_dtype"] == "latent=fp16, rope=fp16"
    assert plain["kv_cache_format_from"].startswith("--kv-cache")
    assert plain["perplexity"] != carried["perplexity"]


@pytest.mark.parametrize("spec, message", [
    ("int4/channel32", "per-channel"),
    ("int2/g32", "does not read int2/g32"),
    ("latent=fp8_e4m3/g128,rope=int8/head", "RoPE key at the model dtype"),
    ("fp8_e4m3/g96", "power-of-2"),
    ("keys=int4/g32", "caches latent and rope"),
])
def test_convert_refuses_formats_the_paged_cache_cannot_store(spec, message, tiny_model_dir, tmp_path):
    """Guards the refusal before any work: exit 2, the reason and the formats the paged cache stores
    named, no output folder."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(tiny_model_dir("llama")), str(out), "--cache-format", spec,
                                      "--calib-cache", str(tmp_path / "cache")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_convert_refuses_a_cache_format_without_a_latent(tiny_model_dir, tmp_path):
    for extra in (["--to", "gqa", "--num-kv-heads", "1"], ["--format", "deepseek"]):
        result = CliRunner().invoke(app, ["convert", str(tiny_model_dir("llama")), str(tmp_path / "out"),
                                          "--cache-format", "fp8_e4m3/g128", *extra])
        assert result.exit_code == 2, result.output
        assert "--cache-format is carried by latentkv-format outputs" in result.output


def test_reload_in_fresh_process_without_latentkv(converted, tmp_path):
    """Guards self-containedness: a fresh Python with latentkv blocked loads the quantized-format
    folder, computes our loader's logits, and its incremental decode through transformers' cache equals
    its full forward (every part quantized per token, so chunking changes nothing)."""
    from test_convert import reload_in_fresh_process

    rel, fresh = reload_in_fresh_process(converted("mla"), tmp_path)
    assert rel < 1e-6
    assert fresh["incremental_rel"] < 1e-5
    assert fresh["generate_same"]


def test_recipe_key_reaches_the_check(tiny_model_dir, tmp_path):
    """Guards the recipe key: `cache_format` in a recipe is checked like the flag (exit 2 before work)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("cache_format: int4/channel32\n")
    result = CliRunner().invoke(app, ["convert", str(tiny_model_dir("llama")), str(tmp_path / "out"), "--recipe",
                                      str(recipe)])
    assert result.exit_code == 2 and "per-channel" in result.output, result.output


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", sorted(CASES))
def test_cuda_graph_generation_equals_eager(converted, method, caplog):
    """Guards the captured decode step with a quantized cache: the append-time quantization runs
    inside the graph (no host sync), and replaying it gives the eager loop's tokens and logits."""
    from latentkv.runtime.decode import generate_ids

    model = load_model(converted(method), device=DEVICE)
    prompts = [list(range(5, 5 + n)) for n in (3, 11, 7)]
    kw = dict(backend="triton", page_size=16, return_logits=True)
    with caplog.at_level("WARNING", logger="latentkv.runtime.decode"):
        graph_tokens, graph_logits = generate_ids(model, prompts, 30, cuda_graph=True, **kw)
    assert "capture of the decode step failed" not in caplog.text  # the graph ran, not the eager fallback
    eager_tokens, eager_logits = generate_ids(model, prompts, 30, cuda_graph=False, **kw)
    assert graph_tokens == eager_tokens
    for g, e in zip(graph_logits, eager_logits):
        assert float((g - e).abs().max() / e.abs().max()) < 5e-3  # TF32 rounding, as tests/test_decode_loop.py
