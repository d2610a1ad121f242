"""`latentkv eval` on any causal LM: perplexity and KV bytes from the real cache, refusals before the pass."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from latentkv.errors import LatentKVError
from tiny_models import TINY_TEXT, build_tokenizer


def _forbid_long_pass(monkeypatch):
    """Makes the perplexity pass fail loudly, so a refusal is shown to come before it."""
    import latentkv.eval.perplexity as perplexity

    def never(*_a, **_k):
        raise AssertionError("the perplexity pass ran before the refusal")

    monkeypatch.setattr(perplexity, "perplexity", never)


def test_eval_of_a_model_outside_the_table(tmp_path):
    """Guards eval for any model transformers loads: a GPT-2 (no conversion row) gets its perplexity,
    and its KV values per token are what its own cache holds (2 x hidden per layer)."""
    from latentkv.eval.report import evaluate

    folder = tmp_path / "gpt2"
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=128,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    build_tokenizer(folder)
    report = evaluate(str(folder), eval_text=str(TINY_TEXT), window=32, windows=4)
    assert math.isfinite(report["perplexity"]) and report["perplexity"] > 1
    assert report["kv_values_per_token"] == 2 * 2 * 32
    assert report["kv_bytes_per_sequence_at_context"] == 4 * 2 * 2 * 32 * 128
    assert "measured" in report["kv_source"]


def test_eval_refuses_before_the_pass(tiny_model_dir, monkeypatch):
    """Guards the order of eval: what it cannot do (the paged decode check of a model without latent
    attention) is refused before the perplexity pass, not after it."""
    from latentkv.eval.report import evaluate

    _forbid_long_pass(monkeypatch)
    with pytest.raises(LatentKVError, match="no latent attention"):
        evaluate(str(tiny_model_dir("llama")), eval_text=str(TINY_TEXT), window=16, windows=2, decode_check=True)


def test_eval_counts_sliding_window_layers_at_context(tiny_model_dir):
    """Guards the KV bytes of a hybrid model (Gemma 2: layer 0 slides over 16 tokens, layer 1 is
    full): read from the real cache, the sliding layer holds at most its window at the stated context."""
    from latentkv.eval.report import evaluate

    report = evaluate(str(tiny_model_dir("gemma2")), eval_text=str(TINY_TEXT), window=32, windows=2)
    assert report["sliding_window_layers"] == 1 and report["kv_context_tokens"] == 512
    per_layer = 2 * 2 * 16  # K and V of 2 heads of 16
    assert report["kv_bytes_per_sequence_at_context"] == 4 * per_layer * (16 + 512)
    assert math.isfinite(report["perplexity"])
