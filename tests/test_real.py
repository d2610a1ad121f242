"""The real SmolLM2-135M-Instruct (built once from its PyPI wheel, cached): quality, not just shapes."""

from __future__ import annotations

import pytest
import torch

from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert
from latentkv.eval.report import evaluate

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def source_report(smollm2_dir):
    torch.set_num_threads(2)
    return evaluate(str(smollm2_dir), windows=8)


def test_eval_gives_trained_model_perplexity(source_report):
    """Guards eval and the GGUF path end to end: a trained model scores tens on WikiText-2 (the
    protocol's 64 windows give 29.53; 8 windows here), a random one tens of thousands; KV bytes
    follow from the real cache (3 KV heads x 64 x 2 per layer)."""
    assert 15 < source_report["perplexity"] < 60
    assert source_report["kv_values_per_token_per_layer"] == 384
    assert source_report["kv_values_per_token"] == 384 * 30


def test_mla_half_cache_keeps_quality(smollm2_dir, tmp_path, source_report):
    """Guards conversion quality on real weights: MLA at 50% of the KV cache, one-shot, stays within
    1.6x of the source's perplexity (measured 42.3 vs 29.53 on the full protocol, 1.43x), and the
    cache really holds half the values."""
    out = tmp_path / "mla50"
    convert(ConvertOptions(
        source=str(smollm2_dir), output=str(out), method_options=dict(kv_budget=0.5),
        calib=CalibOptions(samples=32, seq_len=256, cache=str(tmp_path / "c")),
    ))
    report = evaluate(str(out), windows=8)
    assert report["kv_values_per_token_per_layer"] == 192
    assert report["perplexity"] < 1.6 * source_report["perplexity"]
