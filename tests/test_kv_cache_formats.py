"""Quantized KV cache formats: the reference quantizers keep the error inside what each format allows
and store exactly the bytes counted; the evaluation cache stores what a serving cache reads back
(after RoPE, per part of a latentkv model), and `eval --kv-cache` reports it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from latentkv.cli import app
from latentkv.errors import LatentKVError
from latentkv.kvformats import (ENCODINGS, dequantize, error_bound, fake_quantize, pack_bits, parse_format,
                                      quantize, unpack_bits)
from tiny_models import TINY_TEXT

runner = CliRunner()
SPECS = ["bf16", "fp16", "fp8_e4m3", "fp8_e4m3/g128", "fp8_e4m3/head", "int8", "int8/token", "int4", "int4/g16",
         "int4/head", "int3", "int3/g8", "int3/head", "int3/token", "int2", "int2/g8", "int2/token", "int4/channel8",
         "int3/channel8", "int2/channel16"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(2, 3, 32, 64), (1, 1, 16, 37)])  # 37: ragged groups, an odd packed row
def test_round_trip_within_the_format_bound_and_bytes_exact(spec, shape):
    """Guards the reference quantizers: every value comes back within half a step of its group's stored
    scale (integers) or half a float spacing (casts, fp8); what is stored is exactly bytes_per_token per
    token; the cache's fake quantization equals dequantize(quantize(x))."""
    fmt = parse_format(spec)
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-2, 1, shape[-1])  # channels of very different ranges, like keys
    x[..., 0, :] += 5.0  # an outlier token
    packed = quantize(x, fmt)
    back = dequantize(packed)
    assert (x - back).abs().le(error_bound(x, fmt, packed)).all()
    assert torch.equal(fake_quantize(x, fmt), back)
    b, h, t, w = shape
    assert packed.nbytes == fmt.bytes_per_token(h, w) * b * t


def test_bytes_per_token_by_hand():
    """Guards the byte formula against counts done by hand for one head of 64 values."""
    expect = {"bf16": 128, "fp8_e4m3": 64, "fp8_e4m3/g64": 64 + 4, "int8/head": 64 + 4, "int4/g32": 32 + 2 * 4,
              "int2/g32": 16 + 2 * 4, "int2/token": 16 + 4, "int4/channel32": 32 + 64 * 4 / 32,
              "int3/g32": 24 + 2 * 4, "int3/channel32": 24 + 64 * 4 / 32, "int3/head": 24 + 4,
              "int2/channel128": 16 + 64 * 4 / 128}
    # a 48-wide RoPE key: fp8 unscaled, int4 per channel over 32 tokens (as KIVI keys)
    assert parse_format("fp8_e4m3").bytes_per_token(1, 48) == 48
    assert parse_format("int4/channel32").bytes_per_token(1, 48) == 24 + 48 * 4 / 32
    # int3 packs densely: 37 values take ceil(111 / 8) = 14 bytes of codes
    assert parse_format("int3/head").bytes_per_token(1, 37) == 14 + 4
    assert {s: parse_format(s).bytes_per_token(1, 64) for s in expect} == expect
    # FlashMLA's DeepSeek cache: a 512-wide FP8 latent with 4 float32 scales + a 64-wide bf16 RoPE key = 656 B
    assert parse_format("fp8_e4m3/g128").bytes_per_token(1, 512) + parse_format("bf16").bytes_per_token(1, 64) == 656


def test_integer_codes_use_every_level_and_groups_are_independent():
    """Guards the grouping: a group's range sets its own scale, so a large group leaves a small one exact
    to its own step, and the extreme values map to the first and last code."""
    fmt = parse_format("int4/g4")
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0, 100.0, 50.0, 25.0]).view(1, 1, 1, 8)
    packed = quantize(x, fmt)
    codes = unpack_bits(packed.codes, 4, 8)[0, 0]
    assert codes[0] == 0 and codes[3] == 15 and codes[4] == 0 and codes[5] == 15
    back = dequantize(packed)
    assert (back[..., :4] - x[..., :4]).abs().max() <= 0.1  # step 3/15 = 0.2: error at most half of it
    assert packed.scale.shape == (1, 1, 1, 2, 1) and packed.scale.dtype == torch.float16


def test_int3_packs_eight_codes_in_three_bytes():
    """Guards the dense 3-bit layout: code i occupies bits 3i..3i+2 of the row, lowest bits first."""
    codes = torch.arange(8, dtype=torch.uint8)[None]
    packed = pack_bits(codes, 3)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes[0]))
    assert packed[0].tolist() == [stream & 255, (stream >> 8) & 255, stream >> 16]


@pytest.mark.parametrize("spec", ["int4/channel32", "int3/channel32", "int2/channel32", "int3/g16", "int2/head"])
def test_integer_round_trip_matches_an_independent_reference(spec):
    """Guards the integer path against min/max quantization written out here: per group zero = min,
    scale = (max - min) / (2^bits - 1), code = round((x - zero) / scale); the library's float16 scale and
    zero-point (rounded outward) may move a value by at most one reference step."""
    fmt = parse_format(spec)
    torch.manual_seed(1)
    x = torch.randn(2, 1, 64, 48) * torch.linspace(0.1, 8, 48)  # a RoPE key's channels of unequal range
    levels = 2**fmt.encoding.bits - 1
    if fmt.per_channel:
        g = x.reshape(2, 1, 64 // fmt.group_size, fmt.group_size, 48)
        lo, hi = g.amin(-2, keepdim=True), g.amax(-2, keepdim=True)
    elif fmt.grouping == "head":
        g, lo, hi = x, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    else:
        g = x.reshape(2, 1, 64, 48 // fmt.group_size, fmt.group_size)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / levels
    ref = (torch.round((g - lo) / step) * step + lo).reshape(x.shape)
    back = dequantize(quantize(x, fmt))
    step_full = (step.expand(g.shape)).reshape(x.shape)
    assert (back - ref).abs().le(step_full * 1.01 + 1e-6).all()
    assert (back - x).abs().max() <= 0.5 * step.max() * 1.01 + 1e-3
    assert (back - x).abs().mean() < (x - ref).abs().mean() * 1.2 + 1e-6  # as good as the reference on average


def test_fp8_saturates_and_scaled_fp8_does_not():
    x = torch.tensor([1000.0, -1000.0, 1.0, 0.01]).view(1, 1, 1, 4)
    assert fake_quantize(x, parse_format("fp8_e4m3"))[0, 0, 0, :2].tolist() == [448.0, -448.0]
    scaled = fake_quantize(x, parse_format("fp8_e4m3/token"))
    assert scaled[0, 0, 0, :2].tolist() == [1000.0, -1000.0]


def test_pack_bits_round_trip():
    for bits in (2, 3, 4):
        codes = torch.randint(0, 2**bits, (3, 13), dtype=torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.shape == (3, math.ceil(13 * bits / 8)) and torch.equal(unpack_bits(packed, bits, 13), codes)


@pytest.mark.parametrize("spec,message", [
    ("int5", "Unknown KV cache encoding"), ("bf16/g32", "takes no grouping"), ("int4/none", "needs scale groups"),
    ("int4/g0", "Unknown grouping"), ("int4/rows", "Unknown grouping"),
])
def test_bad_formats_are_refused(spec, message):
    with pytest.raises(LatentKVError, match=message):
        parse_format(spec)


def test_table_defaults():
    """Guards the defaults the docs and the benchmark name: fp8 unscaled, int8 per head, int4/int2 in groups of 32."""
    assert [parse_format(n).name for n in ENCODINGS] == ["bf16", "fp16", "fp8_e4m3", "int8/head", "int4/g32", "int3/g32",
                                                   "int2/g32"]


# ---- the evaluation cache -----------------------------------------------------------------------------------


def _stored(model, ids, cache):
    from latentkv.modeling import cached_forward

    cached_forward(model, ids, cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _plain_and_token_by_token(model, formats, steps=20):
    """Layer caches of one plain write of `steps` random tokens, and the quantized cache after writing
    the same tokens one at a time."""
    from latentkv.eval.quantized_cache import QuantizedKVCache, slot_formats
    from latentkv.modeling import cached_forward, new_dynamic_cache

    ids = torch.randint(3, 256, (1, steps))
    plain = _stored(model, ids, new_dynamic_cache(model.config))
    cache = new_dynamic_cache(model.config, QuantizedKVCache, slot_formats=slot_formats(model.config, formats))
    for t in range(steps):
        cached_forward(model, ids[:, t : t + 1], cache)
    return plain, cache


def test_source_cache_stores_quantized_keys_after_rope(tiny_model_dir):
    """Guards what the source's cache stores: layer 0 (whose inputs a quantized cache cannot change)
    holds exactly the format's round trip of the keys and values a plain cache holds (which
    transformers writes after RoPE); writing token by token stores and reads the same as one write."""
    from latentkv.eval.quantized_cache import QuantizedKVCache, quantized_logits, slot_formats
    from latentkv.kvformats import parse_cache_formats
    from latentkv.modeling import load_model, new_dynamic_cache

    model = load_model(tiny_model_dir("llama"))
    formats = parse_cache_formats("keys=int4/g8,values=int2/head", ("keys", "values"))
    ids = torch.randint(3, 256, (2, 24))
    plain = _stored(model, ids, new_dynamic_cache(model.config))
    quant = _stored(model, ids, new_dynamic_cache(model.config, QuantizedKVCache,
                                                  slot_formats=slot_formats(model.config, formats)))
    assert torch.equal(quant[0][0], fake_quantize(plain[0][0], formats["keys"]))
    assert torch.equal(quant[0][1], fake_quantize(plain[0][1], formats["values"]))
    assert not torch.allclose(quant[1][0], fake_quantize(plain[1][0], formats["keys"]))  # later layers see quantized inputs
    whole = quantized_logits(model, ids, formats, chunk=24)
    assert torch.allclose(quantized_logits(model, ids, formats, chunk=1), whole, atol=1e-4)
    assert not torch.allclose(whole, model(ids).logits, atol=1e-3)


def test_per_channel_keys_keep_the_unfinished_group_unquantized(tiny_model_dir):
    """Guards KIVI's per-channel keys: groups of N tokens are quantized once full, the rest stays as written."""
    from latentkv.kvformats import parse_cache_formats
    from latentkv.modeling import load_model

    model = load_model(tiny_model_dir("llama"))
    formats = parse_cache_formats("keys=int2/channel8,values=bf16", ("keys", "values"))
    plain, cache = _plain_and_token_by_token(model, formats)
    keys = cache.layers[0].keys
    assert torch.allclose(keys[..., :16, :], fake_quantize(plain[0][0][..., :16, :], formats["keys"]), atol=1e-5)
    assert torch.allclose(keys[..., 16:, :], plain[0][0][..., 16:, :], atol=1e-5)
    assert not torch.allclose(keys[..., :16, :], plain[0][0][..., :16, :], atol=1e-3)


@pytest.fixture(scope="module")
def tiny_mla(tiny_model_dir, tmp_path_factory):
    src = tiny_model_dir("llama")
    out = tmp_path_factory.mktemp("kvq") / "mla"
    res = runner.invoke(app, ["convert", str(src), str(out), "--to", "mla", "--kv-budget", "0.5", "--calib-data",
                              str(TINY_TEXT), "--calib-samples", "8", "--calib-seq-len", "64",
                              "--calib-cache", str(out.parent / "cache")])
    assert res.exit_code == 0, res.output
    return src, out


def test_latent_and_rope_key_have_their_own_formats(tiny_mla):
    """Guards a converted model's cache: the latent slot holds the latent's format, the RoPE key slot its own."""
    from latentkv.eval.quantized_cache import QuantizedKVCache, cache_bytes, slot_formats
    from latentkv.kvformats import parse_cache_formats
    from latentkv.modeling import load_model, new_dynamic_cache

    model = load_model(tiny_mla[1])
    formats = parse_cache_formats("int4/g8", ("latent", "rope"), rope="bf16")
    ids = torch.randint(3, 256, (2, 16))
    plain = _stored(model, ids, new_dynamic_cache(model.config))
    quant = _stored(model, ids, new_dynamic_cache(model.config, QuantizedKVCache,
                                                  slot_formats=slot_formats(model.config, formats)))
    assert torch.equal(quant[0][0], fake_quantize(plain[0][0], formats["latent"]))
    assert torch.equal(quant[0][1], plain[0][1].to(torch.bfloat16).float())
    stored = cache_bytes(model, formats)
    by_hand = sum(math.ceil(s["kv_lora_rank"] / 2) + 4 * math.ceil(s["kv_lora_rank"] / 8) + 2 * s["rope_dim"]
                  for s in model.config.attention_layers)
    assert stored.per_token == by_hand and stored.layers == 2


@pytest.mark.parametrize("rope", ["int4/channel8", "fp8_e4m3", "int3/channel8"])
def test_rope_key_quantized_after_rope(tiny_mla, rope):
    """Guards a quantized RoPE key: the rope slot holds the format's round trip of the rotated key a
    plain cache holds (per-channel: groups of 8 tokens once full, the rest as written, as KIVI keys),
    beside a per-channel latent; the bytes count both parts' codes, scales and zero-points."""
    from latentkv.eval.quantized_cache import cache_bytes
    from latentkv.kvformats import parse_cache_formats
    from latentkv.modeling import load_model

    model = load_model(tiny_mla[1])
    formats = parse_cache_formats(f"latent=int4/channel8,rope={rope}", ("latent", "rope"))
    plain, cache = _plain_and_token_by_token(model, formats)
    k_rope = cache.layers[0].values
    fmt = formats["rope"]
    if fmt.per_channel:
        assert torch.allclose(k_rope[..., :16, :], fake_quantize(plain[0][1][..., :16, :], fmt), atol=1e-5)
        assert torch.allclose(k_rope[..., 16:, :], plain[0][1][..., 16:, :], atol=1e-5)
    else:
        assert torch.allclose(k_rope, fake_quantize(plain[0][1], fmt), atol=1e-5)
    assert not torch.allclose(k_rope[..., :16, :], plain[0][1][..., :16, :], atol=1e-4)
    stored = cache_bytes(model, formats)
    rope_bytes = {"int4/channel8": lambda d: d / 2 + 4 * d / 8, "int3/channel8": lambda d: math.ceil(3 * d / 8) + 4 * d / 8,
                  "fp8_e4m3": lambda d: d}[rope]
    by_hand = sum(math.ceil(s["kv_lora_rank"] / 2) + 4 * s["kv_lora_rank"] / 8 + rope_bytes(s["rope_dim"])
                  for s in model.config.attention_layers)
    assert stored.per_token == pytest.approx(by_hand) and stored.by_part["rope"] == pytest.approx(
        sum(rope_bytes(s["rope_dim"]) for s in model.config.attention_layers))


def _eval(*args):
    res = runner.invoke(app, ["eval", *map(str, args), "--json", "--eval-text", str(TINY_TEXT), "--eval-windows", "2",
                              "--eval-window", "64", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_eval_kv_cache_cli(tiny_mla):
    """Guards `eval --kv-cache`: bytes come from the format (scales included), agreement with the
    source falls as bits fall, a bf16 cache of an fp32 model barely moves perplexity, and bad
    part names are refused before any work."""
    src, mla = tiny_mla
    plain = _eval(src)
    bf16 = _eval(src, "--kv-cache", "bf16")
    assert bf16["kv_bytes_per_token"] == 2 * plain["kv_values_per_token"]
    assert bf16["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-2)
    int8 = _eval(src, "--kv-cache", "int8", "--source", src)
    int2 = _eval(src, "--kv-cache", "keys=int2/channel16,values=int2/g8", "--source", src)
    assert 0 < int8["agreement"]["kl_to_source"] < int2["agreement"]["kl_to_source"]
    assert int2["kv_cache_chunk"] is None and int2["kv_cache_reads"].startswith("one forward per window")
    assert "unfinished group (KIVI's residual) at full precision" in int2["kv_cache_reads"]
    assert "KIVI" not in int8["kv_cache_reads"]
    decode = _eval(src, "--kv-cache", "keys=int2/channel16,values=int2/g8", "--kv-cache-chunk", "1")
    assert decode["kv_cache_chunk"] == 1 and decode["perplexity"] == pytest.approx(int2["perplexity"], rel=1e-4)
    # 2 layers x (keys: 32 values at 2 bits + 32 / 16 channel groups... per token; values: 4 groups of 8)
    assert int2["kv_bytes_per_token"] == 2 * ((8 + 4 * 32 / 16) + (8 + 4 * 4))
    latent = _eval(mla, "--kv-cache", "fp8_e4m3/g128", "--kv-cache-rope", "bf16", "--source", src)
    assert latent["cache_dtype"] == "latent=fp8_e4m3/g128, rope=bf16" and latent["agreement"]["kl_to_source"] > 0
    kivi = _eval(mla, "--kv-cache", "latent=int2/channel16,rope=int4/channel16", "--source", src)
    assert kivi["cache_dtype"] == "latent=int2/channel16, rope=int4/channel16" and kivi["kv_cache_chunk"] is None
    assert kivi["kv_bytes_per_token"] < latent["kv_bytes_per_token"]
    for args, message in [((src, "--kv-cache-rope", "bf16", "--kv-cache", "int4"), "--kv-cache-rope is for latentkv"),
                          ((mla, "--kv-cache", "keys=int4"), "caches latent and rope"),
                          ((src, "--kv-cache", "int5"), "Unknown KV cache encoding"),
                          ((src, "--kv-cache-chunk", "4"), "add --kv-cache"),
                          ((mla, "--kv-cache", "int4", "--decode-check"), "perplexity pass only")]:
        res = runner.invoke(app, ["eval", *map(str, args)])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
