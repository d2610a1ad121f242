"""Serving engines as data (`convert.engines`): the geometries each MLA backend runs, `--engine`
fitting an export to one (or refusing before any work), and `inspect`'s rows."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
import transformers

from latentkv.convert.engines import ENGINES, engine_geometry, engine_rows, get_engine
from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert
from latentkv.errors import LatentKVError
from tiny_models import TINY_TEXT


def _geo(kv_heads, head_dim, rotary_dim=None):
    return SimpleNamespace(num_kv_heads=kv_heads, head_dim=head_dim, rotary_dim=rotary_dim or head_dim)


LLAMA3_8B = _geo(8, 128)  # 2048 K/V values per token per layer
SMOLLM2 = _geo(3, 64)  # 384


def test_every_row_says_where_it_was_read():
    """Each row names the engine version and the date its source was read, and what it accepts."""
    for engine in ENGINES.values():
        assert re.search(r"\d+\.\d+", engine.read_from) and re.search(r"read 20\d\d-\d\d-\d\d", engine.read_from), engine
        assert engine.page_sizes and engine.dtypes and engine.describe()
    assert get_engine("vllm-cpu").accepts(512, 64) and not get_engine("vllm-cpu").accepts(256, 64)
    assert not get_engine("vllm-cpu").accepts(156, 36)  # the 192-wide head vLLM rejected at the first step
    triton = get_engine("vllm-triton-mla")
    assert triton.accepts(256, 64) and triton.accepts(448, 64) and not triton.accepts(300, 64)
    with pytest.raises(LatentKVError, match="known: vllm-cpu"):
        get_engine("vllm")


def test_engine_geometry_fits_or_refuses_with_the_fraction():
    """Without a budget: the widest accepted geometry that caches less than the source. With one:
    the widest within it. None: a refusal naming the smallest geometry and its size next to the
    source's."""
    fit = engine_geometry(get_engine("vllm-cpu"), LLAMA3_8B)
    assert (fit.kv_lora_rank, fit.rope_dim, fit.values) == (512, 64, 576)
    fit = engine_geometry(get_engine("vllm-triton-mla"), LLAMA3_8B, kv_budget=0.25)
    assert (fit.kv_lora_rank, fit.rope_dim) == (448, 64)  # 512 of 2048 values, the 512 total
    assert engine_geometry(get_engine("vllm-triton-mla"), SMOLLM2).values == 320
    with pytest.raises(LatentKVError, match=r"1\.50x this model's 384 \(3 KV heads x 64 x 2\)"):
        engine_geometry(get_engine("vllm-cpu"), SMOLLM2)
    with pytest.raises(LatentKVError, match=r"raise --kv-budget to at least 0\.281"):
        engine_geometry(get_engine("vllm-cpu"), LLAMA3_8B, kv_budget=0.25)
    with pytest.raises(LatentKVError, match="runs 512\\+64, not 256\\+64"):
        engine_geometry(get_engine("vllm-cpu"), LLAMA3_8B, kv_lora_rank=256)
    with pytest.raises(LatentKVError, match="non-rotated query head of 64 or 128 or 192"):
        engine_geometry(get_engine("vllm-flashinfer-mla"), _geo(8, 96))
    # A backend that takes any geometry leaves the conversion's own choice.
    assert engine_geometry(get_engine("sglang-triton"), SMOLLM2, kv_budget=0.5).values is None
    rows = {r["engine"]: r for r in engine_rows(SMOLLM2)}
    assert rows["vllm-cpu"]["geometry"] == "none saves (512+64 = 150%)" and rows["vllm-triton-mla"]["values"] == 320


def _convert(src, out, tmp_path, engine, fmt="deepseek", method="mla", **options):
    return convert(ConvertOptions(
        source=str(src), output=str(out), method=method, method_options=options, format=fmt, engine=engine,
        calib=CalibOptions(data=str(TINY_TEXT), samples=8, seq_len=64, cache=str(tmp_path / f"cache-{out.name}"))))


def test_convert_for_an_engine_writes_its_geometry(tiny_model_dir, tmp_path):
    """--engine vllm-cpu on a model with 8 KV heads of 128 writes exactly 512+64 (511 fitted latent
    dims + 1 norm ballast dim; the latent is wider than the keys and values span, the extra dims
    zero), a head of its own and an untied config; the export runs in transformers."""
    src = tiny_model_dir("llama-wide-heads")
    out = tmp_path / "ds"
    result = _convert(src, out, tmp_path, "vllm-cpu")
    config = json.loads((out / "config.json").read_text())
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"], config["tie_word_embeddings"]) == (512, 64, False)
    assert result.kv_values_per_token == 576 * config["num_hidden_layers"]
    assert result.source_kv_values_per_token == 2048 * config["num_hidden_layers"]
    recipe = (out / "latentkv_recipe.yaml").read_text()
    assert "engine: vllm-cpu" in recipe and "vLLM's CPU_MLA backend" in (out / "README.md").read_text()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(6))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_engine_refusals_come_before_any_work(tiny_model_dir, tmp_path):
    """No engine geometry saves KV on the tiny Llama (2 KV heads of 16: 64 values): the refusal
    names the reason or the fraction, and neither calibration statistics nor an output folder appear."""
    src = tiny_model_dir("llama")
    with pytest.raises(LatentKVError, match="RoPE key wider than this model's 16-dim heads"):
        _convert(src, tmp_path / "out", tmp_path, "vllm-cpu")
    with pytest.raises(LatentKVError, match=r"5\.00x this model's 64"):  # 304+16 = 320, the narrowest total
        _convert(src, tmp_path / "out", tmp_path, "vllm-triton-mla")
    with pytest.raises(LatentKVError, match="add --format deepseek"):
        _convert(src, tmp_path / "out", tmp_path, "vllm-cpu", fmt="latentkv", kv_budget=0.5)
    with pytest.raises(LatentKVError, match="every engine serves as it is"):
        _convert(src, tmp_path / "out", tmp_path, "vllm-cpu", method="gqa", num_kv_heads=1)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache-out").exists()


def test_serving_doc_lists_every_engine():
    """docs/serving.md's table of cache shapes names every engine of the table in code."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    for name in ENGINES:
        assert f"| `{name}` |" in doc, name
