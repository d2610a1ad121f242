"""The one-pass quantized-cache evaluation (`latentkv eval --kv-cache`): every query reads what a
streaming cache holds after writing its token, so one forward over a window equals a token-by-token
decode loop through the same quantized cache (per-token formats, KIVI per-channel groups with their
full-precision residual, a latent and RoPE key with their own formats); and, with KIVI's value
residual, it follows transformers' QuantizedCache."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from latentkv.eval.quantized_cache import quantized_logits, streaming_layout, streaming_logits
from latentkv.kvformats import cache_parts, parse_cache_formats
from latentkv.modeling import load_model

CASES = [
    ("llama", "int4/g8"),  # per token: quantized on write, a token reads its own row quantized
    ("llama", "keys=int2/channel8,values=int2/g8"),  # KIVI: per-channel keys with a residual, per-token values
    ("llama", "keys=int3/channel16,values=int4/channel8"),  # two block sizes: three stored states
    ("mla", "latent=int2/channel8,rope=fp8_e4m3"),
    ("mla", "latent=int3/channel8,rope=int4/channel16"),
    ("gta-s", "latent=int4/channel8,rope=int2/g8"),
]


def _model(name, tiny_model_dir, tiny_converted, dtype=torch.float32):
    if name == "llama":
        return load_model(tiny_model_dir("llama"), dtype=dtype)
    return load_model(tiny_converted(name, **({"kv_budget": 0.5} if name == "mla" else {})), dtype=dtype)


def _formats(model, spec):
    parts = tuple(dict.fromkeys(p for layer in cache_parts(model.config) for p in layer))
    return parse_cache_formats(spec, parts)


@pytest.mark.parametrize("name,spec", CASES)
def test_one_pass_equals_decode_loop(name, spec, tiny_model_dir, tiny_converted):
    """Guards the evaluation's faithfulness: one forward per window gives the logits of feeding the same
    tokens one at a time through a cache that quantizes on write (a finished per-channel group at once,
    its unfinished tokens kept as written), keys after RoPE; 37 tokens leave an unfinished group. In
    float64, so that no rounding code flips between the two orders of summation (in float32 a code that
    lands on a rounding boundary in a later layer may flip, moving a logit by 1e-4)."""
    model = _model(name, tiny_model_dir, tiny_converted, dtype=torch.float64)
    formats = _formats(model, spec)
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (2, 37))
    one_pass = streaming_logits(model, ids, formats)
    decode = quantized_logits(model, ids, formats, chunk=1)
    assert (one_pass - decode).abs().max() < 1e-10
    assert not torch.allclose(one_pass, model(ids).logits, atol=1e-3)  # the format does change the logits
    if any(f.per_channel for f in formats.values()):  # chunks of a group read their own group quantized
        chunked = quantized_logits(model, ids, formats, chunk=8)
        assert (chunked - decode).abs().max() > 100 * (one_pass - decode).abs().max()


def test_layout_reads_each_key_once():
    """Guards the mask: each causal (query, key) pair reads exactly one stored copy, none past the query;
    a key is read quantized once its group is complete (after the query's write), as written before."""
    formats = parse_cache_formats("keys=int2/channel4,values=int2/g8", ("keys", "values"))
    layout = streaming_layout(formats, 10)
    assert layout.blocks == (4,) and layout.copies == ((False,), (True,))
    seen = layout.visible.view(10, 2, 10)
    assert torch.equal(seen.sum(1), torch.ones(10, 10, dtype=torch.long).tril())
    quantized = seen[:, 1]
    assert quantized[3, :4].all() and not quantized[2, :3].any() and not quantized[9, 8:].any()
    assert quantized[9, :8].all() and not quantized[6, 4:].any() and quantized[6, :4].all() and quantized[7, :8].all()
    after = streaming_layout(formats, 10, quantize_after_read=True).visible.view(10, 2, 10)[:, 1]
    assert not after[3, :4].any() and after[4, :4].all()
    assert streaming_layout(parse_cache_formats("int4/g8", ("keys", "values")), 10).copies == ((),)


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None,
                    reason="optimum-quanto is not installed")
def test_matches_transformers_quantized_cache(tiny_model_dir):
    """Guards the settings that match transformers' QuantizedCache (quanto, KIVI axes: per-channel keys
    over 16 tokens, values in groups of 16 along the head, residual 16, fed as generate() feeds it): with
    the value residual and the completing token reading its group unquantized, the one-pass evaluation
    gives nearly its logits (quanto keeps float32 scales, latentkv float16 ones), much nearer than with
    values quantized on write or with the residual ignored (chunks of 16 tokens)."""
    from latentkv.eval.quantized_cache import transformers_quantized_logits

    model = load_model(tiny_model_dir("llama"))
    formats = parse_cache_formats("keys=int2/channel16,values=int2/g16", ("keys", "values"))
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (1, 64))
    hf = transformers_quantized_logits(model, ids, nbits=2, axis_key=-1, axis_value=0, group=16)
    matched = streaming_logits(model, ids, formats, residual=16, quantize_after_read=True)
    on_write = streaming_logits(model, ids, formats)
    chunked = quantized_logits(model, ids, formats, chunk=16)
    gap = (matched - hf).abs().max()
    assert gap < 0.5 * (on_write - hf).abs().max() and gap < 0.25 * (chunked - hf).abs().max()
