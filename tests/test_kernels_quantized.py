"""The decode kernel over a quantized latent cache (fp8 / int4 codes, per-token group scales) equals
its PyTorch reference, and the reference equals attention over the cache formats' own round trip.

Without CUDA the kernel runs under TRITON_INTERPRET=1 (set before triton is imported) on tiny
shapes; with CUDA it is compiled and model-sized shapes are added.
"""

from __future__ import annotations

import importlib
import math
import os
import random

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`
triton = pytest.importorskip("triton", reason="triton not installed: the decode kernels cannot be tested")

from latentkv.errors import LatentKVError  # noqa: E402
from latentkv.kvformats import fake_quantize, parse_format  # noqa: E402
from latentkv.kernels import compare as cmp_mod  # noqa: E402
from latentkv.kernels.quantized_pages import QuantizedPages, check_paged_formats  # noqa: E402

md = importlib.import_module("latentkv.kernels.mla_decode")
if not CUDA and type(md._kernels()[0]).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported in compiled mode before TRITON_INTERPRET=1 was set and there is no GPU; "
                "run with TRITON_INTERPRET=1", allow_module_level=True)

DecodeConfig = md.DecodeConfig
DEVICE = "cuda" if CUDA else "cpu"
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# (rtol, atol as a fraction of max|ref|, max 1 - cosine): the plain kernel's (tests/test_kernels.py);
# the kernel and the reference read the same dequantized values, so quantization adds no error here
TOL = {BF16: (1e-2, 1e-2, 1e-4), FP16: (5e-3, 5e-3, 1e-5),
       FP32: ((5e-3, 5e-3, 1e-5) if CUDA else (1e-4, 1e-5, 1e-9))}


def make_quantized_case(*, lens, sq, heads, latent_heads, r_c, rope, page, dtype, fmt, seed):
    """A random cache written through QuantizedPages.write_rows into shuffled pages; every slot no
    sequence owns gets NaN scales and RoPE keys, so a read past a length or into a wrong page shows."""
    g = torch.Generator().manual_seed(seed)
    width = latent_heads * r_c + rope
    need = [math.ceil(n / page) for n in lens]
    num_pages = sum(need) + 2
    pages = QuantizedPages.empty(parse_format(fmt), num_pages=num_pages, page_size=page,
                                 latent_width=latent_heads * r_c, rope_dim=rope, dtype=dtype, device=DEVICE)
    rows = (torch.randn(num_pages * page, width, generator=g) * torch.rand(1, width, generator=g) * 4).to(dtype)
    pages.write_rows(torch.arange(num_pages * page, device=DEVICE), rows.to(DEVICE))
    perm = torch.randperm(num_pages, generator=g)
    table = torch.full((len(lens), max(need) + 1), -1, dtype=torch.int32)
    owned = torch.zeros(num_pages, page, dtype=torch.bool)
    used = 0
    for b, (n, k) in enumerate(zip(lens, need)):
        table[b, :k] = perm[used : used + k].to(torch.int32)
        used += k
        pos = torch.arange(n)
        owned[table[b, pos // page].long(), pos % page] = True
    owned = owned.to(DEVICE)
    pages.scales[~owned] = float("nan")
    pages.rope[~owned] = float("nan")
    q = torch.randn(len(lens), sq, heads, r_c + rope, generator=g).to(dtype).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return q, pages, table.to(DEVICE), seq_lens, rows, 1.0 / math.sqrt(r_c + rope)


# id: (lens, Sq, H, latent_heads, r_c, rope, page, dtype, format, num_splits, config)
SMALL = DecodeConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)
CASES = {
    "fp8-g16-mla-sq1-splits3": ((1, 33, 70), 1, 4, 1, 32, 16, 16, BF16, "fp8_e4m3/g16", 3, SMALL),
    "fp8-g16-mla48-sq2": ((2, 37), 2, 4, 1, 48, 16, 8, BF16, "fp8_e4m3/g16", 2, None),
    "fp8-g32-mla48-ragged-group": ((5, 29), 1, 4, 1, 48, 16, 16, FP32, "fp8_e4m3/g32", 2, SMALL),
    "fp8-head-gla2-sq2": ((2, 31, 47), 2, 8, 2, 16, 16, 16, BF16, "fp8_e4m3/head", 3, SMALL),
    "fp8-g8-gla2-fp16": ((1, 23, 50), 1, 4, 2, 16, 16, 16, FP16, "fp8_e4m3/g8", 2, None),
    "int4-g16-mla48-sq2": ((2, 45), 2, 4, 1, 48, 16, 16, BF16, "int4/g16", 2, SMALL),
    "int4-g32-mla48-ragged-sq1": ((1, 17, 40), 1, 4, 1, 48, 16, 16, FP32, "int4/g32", 3, SMALL),
    "int4-g8-gla2-sq1-direct": ((3, 21), 1, 4, 2, 16, 16, 8, BF16, "int4/g8", 1, None),
    "int4-token-gla2-sq2": ((2, 27, 33), 2, 4, 2, 16, 16, 16, FP32, "int4/token", 2, None),
    "fp8-g16-kv-on-m": ((1, 33, 70), 1, 4, 1, 32, 16, 16, BF16, "fp8_e4m3/g16", 3, DecodeConfig(16, 16, 4, 2, kv_on_m=True)),
    "int4-g16-fused-combine": ((2, 33), 2, 4, 1, 32, 16, 16, BF16, "int4/g16", 3,
                               DecodeConfig(16, 16, 4, 2, fuse_combine=True)),
    "fp8-g16-norope": ((3, 21), 2, 4, 1, 32, 0, 16, FP32, "fp8_e4m3/g16", 2, None),
    # wide latents, the output columns split over programs (each dequantizes its value slice)
    "fp8-g128-rc960-default": ((1, 29, 50), 1, 4, 1, 960, 64, 16, BF16, "fp8_e4m3/g128", 2, None),  # out_splits 2
    "fp8-g128-rc960-ragged-sq2-os4": ((2, 37), 2, 4, 1, 960, 64, 16, BF16, "fp8_e4m3/g128", 2,
                                      DecodeConfig(16, 16, 4, 2, out_splits=4)),
    "fp8-head-rc640-os2": ((5, 29), 1, 4, 1, 640, 64, 16, FP32, "fp8_e4m3/head", 3, DecodeConfig(16, 16, 4, 2, out_splits=2)),
    "fp8-g64-gla2-rc640-os4": ((2, 31, 47), 2, 8, 2, 640, 64, 16, BF16, "fp8_e4m3/g64", 3,
                               DecodeConfig(16, 16, 4, 2, out_splits=4)),
    "int4-g32-rc960-sq2-os2": ((2, 45), 2, 4, 1, 960, 64, 16, BF16, "int4/g32", 2, DecodeConfig(16, 16, 4, 2, out_splits=2)),
    "int4-token-rc1024-default": ((3, 21), 1, 4, 1, 1024, 0, 16, FP32, "int4/token", 1, None),  # out_splits 4
    # fp8 groups of >= 16 columns: scales on the scores and probabilities (batched dots per group)
    "fp8-token-mla48-sq2": ((2, 37), 2, 4, 1, 48, 16, 16, BF16, "fp8_e4m3/token", 2, SMALL),  # one group, masked
    "fp8-g32-gla2-rc96-fused": ((2, 31, 47), 2, 8, 2, 96, 16, 16, BF16, "fp8_e4m3/g32", 3,
                                DecodeConfig(16, 16, 4, 2, fuse_combine=True)),  # a group past r_c
    "fp8-g16-fp16-kv-on-m-sq2": ((3, 29), 2, 4, 1, 32, 16, 16, FP16, "fp8_e4m3/g16", 2,
                                 DecodeConfig(16, 16, 4, 2, kv_on_m=True)),
    "fp8-g64-rc160-kv-on-m-os2": ((2, 45), 2, 4, 1, 160, 32, 16, BF16, "fp8_e4m3/g64", 2,
                                  DecodeConfig(16, 32, 4, 2, kv_on_m=True, out_splits=2)),
    "fp8-g32-fp16-direct-n32": ((3, 21, 70), 1, 8, 1, 64, 16, 16, FP16, "fp8_e4m3/g32", 1,
                                DecodeConfig(16, 32, 4, 2)),  # tiles of two pages
    "fp8-g16-dequant-tile": ((2, 33, 70), 2, 4, 1, 48, 16, 16, BF16, "fp8_e4m3/g16", 3,
                             DecodeConfig(16, 16, 4, 2, dequant_tile=True)),  # the dequantized-tile path
    # fp8 group_dots: a plain 2-D dot per group (4, 2 or 1 groups a tile), or the fallback where it does not apply
    "fp8-g16-group-dots-mla48-sq2": ((2, 33, 70), 2, 4, 1, 48, 16, 16, BF16, "fp8_e4m3/g16", 3,
                                     DecodeConfig(16, 16, 4, 2, group_dots=True)),  # a group past r_c
    "fp8-g32-group-dots-fp32-fused": ((2, 31, 47), 1, 8, 1, 64, 16, 16, FP32, "fp8_e4m3/g32", 3,
                                      DecodeConfig(16, 16, 4, 2, fuse_combine=True, group_dots=True)),
    "fp8-head-group-dots-gla2-fp16-sq2": ((2, 31, 47), 2, 8, 2, 32, 16, 16, FP16, "fp8_e4m3/head", 2,
                                          DecodeConfig(16, 16, 4, 2, group_dots=True)),  # one group
    "fp8-g16-group-dots-gla2-direct-n32": ((3, 21, 70), 1, 8, 2, 32, 16, 16, BF16, "fp8_e4m3/g16", 1,
                                           DecodeConfig(16, 32, 4, 2, group_dots=True)),  # tiles of two pages
    "fp8-g16-group-dots-kv-on-m-fallback": ((2, 33), 2, 4, 1, 32, 16, 16, BF16, "fp8_e4m3/g16", 2,
                                            DecodeConfig(16, 16, 4, 2, kv_on_m=True, group_dots=True)),
    "fp8-g16-group-dots-8-groups-fallback": ((2, 33), 1, 4, 1, 128, 16, 16, BF16, "fp8_e4m3/g16", 2,
                                             DecodeConfig(16, 16, 4, 2, group_dots=True)),
    "fp8-g64-group-dots-rc640-os2-fallback": ((2, 29), 1, 4, 1, 640, 64, 16, BF16, "fp8_e4m3/g64", 2,
                                              DecodeConfig(16, 16, 4, 2, out_splits=2, group_dots=True)),
    # int4 groups of >= 32 columns: the same with the even and odd columns of each group apart
    "int4-g32-mla64-sq2-bf16": ((2, 37, 70), 2, 4, 1, 64, 16, 16, BF16, "int4/g32", 3, SMALL),
    "int4-token-mla48-fp16": ((3, 29), 1, 8, 1, 48, 16, 16, FP16, "int4/token", 2, SMALL),  # one group, masked
    "int4-g32-gla2-rc96-kv-on-m": ((2, 31, 47), 2, 8, 2, 96, 16, 16, BF16, "int4/g32", 3,
                                   DecodeConfig(16, 16, 4, 2, kv_on_m=True)),  # a group past r_c
    "int4-g64-rc160-kv-on-m-os2-fused": ((2, 45), 2, 4, 1, 160, 32, 16, FP16, "int4/g64", 2,
                                         DecodeConfig(16, 32, 4, 2, kv_on_m=True, out_splits=2, fuse_combine=True)),
    "int4-g32-dequant-tile": ((2, 33), 1, 4, 1, 64, 16, 16, BF16, "int4/g32", 2,
                              DecodeConfig(16, 16, 4, 2, dequant_tile=True)),
}
if CUDA:  # model-sized shapes where the kernel is compiled (the 656-byte FlashMLA row first)
    CASES.update({
        "gpu-fp8-g128-mla32-deepseek": ((1, 777, 2048, 4099), 1, 32, 1, 512, 64, 64, BF16, "fp8_e4m3/g128", None, None),
        "gpu-int4-g32-mla32": ((1, 777, 4099), 1, 32, 1, 512, 64, 64, BF16, "int4/g32", 4, None),
        "gpu-fp8-g128-mla128-sq2": ((5, 1000, 3001), 2, 128, 1, 512, 64, 64, BF16, "fp8_e4m3/g128", None, None),
        "gpu-fp8-g128-gla2-h128-sq2": ((2, 1500, 2049), 2, 128, 2, 256, 64, 64, BF16, "fp8_e4m3/g128", None, None),
        "gpu-int4-g64-gla2-fp16": ((2, 999), 2, 64, 2, 256, 64, 32, FP16, "int4/g64", 3, None),
        "gpu-fp8-g64-rc448": ((1, 900), 1, 32, 1, 448, 64, 64, BF16, "fp8_e4m3/g64", 2, None),
        "gpu-fp8-g128-rc960": ((1, 777, 4099), 1, 32, 1, 960, 64, 64, BF16, "fp8_e4m3/g128", None, None),
        "gpu-int4-g32-rc1024-sq2": ((2, 999), 2, 32, 1, 1024, 64, 64, BF16, "int4/g32", 3, None),
    })
if CUDA and torch.cuda.get_device_capability()[0] == 9:  # fp8 through the Gluon kernel (Hopper)
    WG = md.WGMMA_CONFIG
    CASES.update({
        "gpu-wgmma-fp8-g128-mla32": ((1, 777, 2048, 4099), 1, 32, 1, 512, 64, 64, BF16, "fp8_e4m3/g128", None, WG),
        "gpu-wgmma-fp8-g128-mla32-splits3": ((1, 63, 65, 700), 1, 32, 1, 512, 64, 64, BF16, "fp8_e4m3/g128", 3, WG),
        "gpu-wgmma-fp8-g128-mla128-sq2-direct": ((5, 1000, 3001), 2, 128, 1, 512, 64, 64, BF16, "fp8_e4m3/g128", 1, WG),
        "gpu-wgmma-fp8-g128-mla64-page16": ((3, 500, 1025), 1, 64, 1, 512, 64, 16, BF16, "fp8_e4m3/g128", 2, WG),
        "gpu-wgmma-fp8-g32-rc256-page128-fp16": ((2, 999), 2, 32, 1, 256, 32, 128, FP16, "fp8_e4m3/g32", 3, WG),
        "gpu-wgmma-fp8-g64-gla2-h128-sq2": ((2, 1500, 2049), 2, 128, 2, 256, 64, 64, BF16, "fp8_e4m3/g64", None, WG),
        "gpu-wgmma-fp8-g16-rc64-rope16": ((1, 333), 1, 64, 1, 64, 16, 32, BF16, "fp8_e4m3/g16", 2, WG),
    })


@pytest.mark.parametrize("case_id", list(CASES))
def test_quantized_kernel_matches_reference(case_id):
    """Guards the kernel's dequantization: group scales (ragged last group, one group per latent
    head or across GLA heads), int4 nibble order, the code tile used as key and value, with splits,
    query lengths 1 and 2 and a non-power-of-2 latent width."""
    lens, sq, heads, hc, r_c, rope, page, dtype, fmt, splits, config = CASES[case_id]
    seed = random.SystemRandom().randrange(2**31)
    q, pages, table, seq_lens, _, scale = make_quantized_case(
        lens=lens, sq=sq, heads=heads, latent_heads=hc, r_c=r_c, rope=rope, page=page, dtype=dtype, fmt=fmt, seed=seed)
    kw = dict(latent_heads=hc, rope_dim=rope, softmax_scale=scale)
    out = md.mla_decode(q, pages, table, seq_lens, num_splits=splits, config=config, _poison=True, **kw)
    ref = md.mla_decode_reference(q, pages, table, seq_lens, out_dtype=torch.float32, **kw)
    assert out.dtype == dtype and out.shape == (len(lens), sq, heads, r_c)
    rtol, atol_frac, max_cos = TOL[dtype]
    cmp_mod.assert_close(out, ref, atol=atol_frac * float(ref.abs().max()), rtol=rtol, max_cos_diff=max_cos,
                         name=f"{case_id} seed={seed}")


@pytest.mark.parametrize("fmt", ["fp8_e4m3/g16", "fp8_e4m3/head", "int4/g8", "int4/g32", "int4/token"])
def test_pages_read_back_the_formats_round_trip(fmt):
    """Guards the storage: what QuantizedPages gives back (what the reference and the kernel read)
    is kvformats' fake_quantize of the latent, and the RoPE key as written."""
    dtype = BF16
    q, pages, table, seq_lens, rows, _ = make_quantized_case(
        lens=(40,), sq=1, heads=4, latent_heads=2, r_c=24, rope=8, page=8, dtype=dtype, fmt=fmt,
        seed=random.SystemRandom().randrange(2**31))
    flat = table[0, :5].long().cpu()  # the 5 pages of the sequence, in order
    got = pages[table[0, :5].long()].reshape(-1, rows.shape[1]).cpu()
    written = rows.view(pages.shape[0], pages.shape[1], -1)[flat].reshape(-1, rows.shape[1])
    latent = written[:, :48].to(DEVICE)  # quantized where the pages live: CPU and GPU may round a scale apart
    expected = fake_quantize(latent[None, None], parse_format(fmt))[0, 0].cpu()
    assert torch.equal(got[:, :48], expected)
    assert torch.equal(got[:, 48:], written[:, 48:])


def test_flashmla_row_bytes():
    """The fp8_e4m3/g128 latent of 512 with a 64-wide bf16 RoPE key takes FlashMLA's 656 bytes a token."""
    pages = QuantizedPages.empty(parse_format("fp8_e4m3/g128"), num_pages=1, page_size=1, latent_width=512,
                                 rope_dim=64, dtype=BF16, device="cpu")
    assert pages.bytes_per_token() == 656
    int4 = QuantizedPages.empty(parse_format("int4/g32"), num_pages=1, page_size=1, latent_width=512,
                                rope_dim=64, dtype=BF16, device="cpu")
    assert int4.bytes_per_token() == 256 + 16 * 4 + 128


def test_write_paged_quantizes_at_append():
    """Guards write_paged on a quantized cache: the rows land, quantized, at their pages."""
    fmt = parse_format("int4/g16")
    pages = QuantizedPages.empty(fmt, num_pages=3, page_size=4, latent_width=32, rope_dim=8, dtype=FP32, device="cpu")
    table = torch.tensor([[2, 0]], dtype=torch.int32)
    entries = torch.randn(1, 6, 40)
    md.write_paged(pages, table, torch.arange(6)[None], entries)
    got = torch.cat([pages[torch.tensor([2])][0], pages[torch.tensor([0])][0, :2]])
    assert torch.equal(got[:, :32], fake_quantize(entries[:, None, :, :32], fmt)[0, 0])
    assert torch.equal(got[:, 32:], entries[0, :, 32:])


@pytest.mark.parametrize("part, fmt, message", [
    ("latent", "int2/g32", "does not read int2/g32"),
    ("latent", "int4/channel32", "per-channel"),
    ("latent", "fp8_e4m3", "has no scale"),
    ("latent", "fp8_e4m3/g48", "power-of-2"),
    ("rope", "fp8_e4m3/g64", "RoPE key at the model dtype"),
])
def test_unstorable_formats_are_refused(part, fmt, message):
    with pytest.raises(LatentKVError, match=message) as err:
        check_paged_formats({part: parse_format(fmt)})
    assert "fp8_e4m3/g<N>, int4/g<N>" in str(err.value)  # the message names what the cache stores


def test_groups_across_gla_heads_are_refused():
    fmt = parse_format("fp8_e4m3/g32")
    pages = QuantizedPages.empty(fmt, num_pages=2, page_size=8, latent_width=96, rope_dim=16, dtype=FP32, device=DEVICE)
    q = torch.randn(1, 1, 4, 48 + 16, device=DEVICE)
    with pytest.raises(LatentKVError, match="straddle the 2 latent heads"):
        md.mla_decode(q, pages, torch.zeros(1, 2, dtype=torch.int32, device=DEVICE),
                      torch.tensor([3], dtype=torch.int32, device=DEVICE), latent_heads=2, rope_dim=16, softmax_scale=1.0)


def test_bench_inputs_store_the_format():
    """Guards the benchmark's quantized inputs: the cache it times is the format asked for, and the
    kernel over it equals the reference."""
    from latentkv.kernels import bench

    q, kv, table, seq_lens, r_c = bench.make_paged_inputs(
        heads=4, latent_rank=32, rope_dim=16, batch=2, context=40, query_len=1, latent_heads=1, dtype=BF16,
        page_size=16, device=DEVICE, kv_format="int4/g16")
    assert isinstance(kv, QuantizedPages) and kv.fmt.name == "int4/g16"
    kw = dict(latent_heads=1, rope_dim=16, softmax_scale=0.125)
    ref = md.mla_decode_reference(q, kv, table, seq_lens, out_dtype=torch.float32, **kw)
    cmp_mod.assert_close(md.mla_decode(q, kv, table, seq_lens, num_splits=2, **kw), ref,
                         atol=1e-2 * float(ref.abs().max()), rtol=1e-2, max_cos_diff=1e-4, name="bench inputs")


@pytest.mark.skipif(not CUDA, reason="run_decode_bench times on a GPU")
@pytest.mark.parametrize("fmt", ["fp8_e4m3/g128", "int4/g32"])
def test_bench_quantized_smoke(fmt):
    """The timing path of scripts/bench_decode_quantized.py on a small shape: runs, checks, counts bytes."""
    from latentkv.kernels import bench

    r = bench.run_decode_bench(32, 512, 64, batch=4, context=1024, query_len=1, source_geometry=None,
                               cuda_graph=False, kv_format=fmt)
    assert r["check"]["ok"], r["check"]
    per_token = {"fp8_e4m3/g128": 656, "int4/g32": 256 + 64 + 128}[fmt]
    assert r["cache_bytes"] == 4 * 1024 * per_token


@pytest.mark.parametrize("fmt, config", [("int4/g16", SMALL), ("fp8_e4m3/g16", SMALL),
                                         ("fp8_e4m3/g16", DecodeConfig(16, 32, 4, 2, kv_on_m=True)),
                                         ("fp8_e4m3/g16", DecodeConfig(16, 16, 4, 2, group_dots=True)),
                                         ("int4/g32", SMALL)])
def test_quantized_kernel_masses_match_reference(fmt, config):
    """Guards the per-page masses (sparse decode's history) over a quantized cache: the same switch
    combinations compile and give the reference's masses."""
    q, pages, table, seq_lens, _, scale = make_quantized_case(
        lens=(2, 33, 70), sq=2, heads=4, latent_heads=1, r_c=32, rope=16, page=16, dtype=FP32, fmt=fmt,
        seed=random.SystemRandom().randrange(2**31))
    kw = dict(latent_heads=1, rope_dim=16, softmax_scale=scale, return_masses=True)
    out, masses = md.mla_decode(q, pages, table, seq_lens, num_splits=2, config=config, **kw)
    ref, ref_masses = md.mla_decode_reference(q, pages, table, seq_lens, out_dtype=torch.float32, **kw)
    rtol, atol_frac, max_cos = TOL[FP32]
    cmp_mod.assert_close(out, ref, atol=atol_frac * float(ref.abs().max()), rtol=rtol, max_cos_diff=max_cos, name="out")
    atol = 2e-3 if CUDA else 1e-5  # as tests/test_kernels.py's masses: compiled fp32 dots run in TF32
    cmp_mod.assert_close(masses, ref_masses, atol=atol, rtol=1e-3, max_cos_diff=1e-6, name="masses")


@pytest.mark.parametrize("fmt, config", [("fp8_e4m3/g16", SMALL), ("int4/g32", SMALL),
                                         ("fp8_e4m3/g16", DecodeConfig(16, 16, 4, 2, kv_on_m=True))])
def test_quantized_kernel_head_tables_match_reference(fmt, config):
    """Guards a block table per latent head ([B, latent_heads, max_pages], sparse decode choosing per GLA
    latent head) over a quantized cache: each head reads the codes and scales of its own pages, output
    and masses as the reference's."""
    seed = random.SystemRandom().randrange(2**31)
    lens, page, hc = (37, 90), 16, 2
    q, pages, table, seq_lens, _, scale = make_quantized_case(
        lens=lens, sq=1, heads=4, latent_heads=hc, r_c=32, rope=16, page=page, dtype=FP32, fmt=fmt, seed=seed)
    g = torch.Generator().manual_seed(seed)
    head_table = torch.full((len(lens), hc, table.shape[1]), -1, dtype=torch.int32)
    new_lens = []
    for b, length in enumerate(lens):
        n = math.ceil(length / page)
        keep = n // 2 + 1  # blocks per head: some of the full ones, then the partly filled last one
        for c in range(hc):
            ids = torch.randperm(n - 1, generator=g)[: keep - 1].sort().values.tolist() + [n - 1]
            head_table[b, c, :keep] = table[b, ids].cpu()
        new_lens.append(length - (n - keep) * page)
    head_table, new_lens = head_table.to(DEVICE), torch.tensor(new_lens, dtype=torch.int32, device=DEVICE)
    kw = dict(latent_heads=hc, rope_dim=16, softmax_scale=scale, return_masses=True)
    out, masses = md.mla_decode(q, pages, head_table, new_lens, num_splits=2, config=config, _poison=True, **kw)
    ref, ref_masses = md.mla_decode_reference(q, pages, head_table, new_lens, out_dtype=torch.float32, **kw)
    rtol, atol_frac, max_cos = TOL[FP32]
    name = f"{fmt} seed={seed}"
    cmp_mod.assert_close(out, ref, atol=atol_frac * float(ref.abs().max()), rtol=rtol, max_cos_diff=max_cos, name=name)
    atol = 2e-3 if CUDA else 1e-5
    cmp_mod.assert_close(masses, ref_masses, atol=atol, rtol=1e-3, max_cos_diff=1e-6, name=f"masses {name}")


@pytest.mark.parametrize("fmt, config", [("fp8_e4m3/g16", SMALL),
                                         ("fp8_e4m3/g16", DecodeConfig(16, 16, 4, 2, kv_on_m=True)),
                                         ("fp8_e4m3/g16", DecodeConfig(16, 16, 4, 2, dequant_tile=True)),
                                         ("fp8_e4m3/g16", DecodeConfig(16, 16, 4, 2, group_dots=True)),
                                         ("int4/g32", SMALL)])
def test_quantized_kernel_softcap_window_match_reference(fmt, config):
    """Guards soft-capped and sliding-window scores over a quantized cache (the scales applied to the
    scores, in both orientations, the dequantized tile and fp8's 2-D dots per group)."""
    q, pages, table, seq_lens, _, scale = make_quantized_case(
        lens=(5, 40, 70), sq=2, heads=4, latent_heads=1, r_c=64, rope=16, page=16, dtype=BF16, fmt=fmt,
        seed=random.SystemRandom().randrange(2**31))
    kw = dict(latent_heads=1, rope_dim=16, softmax_scale=scale, softcap=2.0, window=23)
    out = md.mla_decode(q, pages, table, seq_lens, num_splits=3, config=config, _poison=True, **kw)
    ref = md.mla_decode_reference(q, pages, table, seq_lens, out_dtype=torch.float32, **kw)
    rtol, atol_frac, max_cos = TOL[BF16]
    cmp_mod.assert_close(out, ref, atol=atol_frac * float(ref.abs().max()), rtol=rtol, max_cos_diff=max_cos,
                         name="softcap window")


@pytest.mark.parametrize("fmt", ["fp8_e4m3/g32", "int4/g32"])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_scaled_dots_as_exact_as_the_dequantized_tile(fmt, dtype):
    """The path with scales on the scores rounds differently from the reference: the codes stay
    exact, the float32 scale (and int4's zero-point) applies to float32 scores, and p x scale (not p
    and code x scale + zero) is rounded to the model dtype for the value dot. So besides matching the
    model-dtype reference within TOL (the case table), its error against the exact attention of the
    dequantized values (code x scale + zero in float32, float32 math) is compared with the
    dequantized tile's on the same inputs: summed over six random caches, it must stay within 10% of it.
    Measured per cache: 0.50-0.99 of the dequantized tile's error on the CPU interpreter (12 seeds a
    format and dtype), 0.49-0.98 on an H100 (16 seeds); yet one run of this test on an H100 summed to
    1.03 for int4/g32 in bf16 over three caches, so "never larger" does not hold on every input. fp8's
    2-D dots per group (``group_dots``) round as the batched dots do and are held to the same."""
    paths = {"dequant": DecodeConfig(16, 16, 4, 2, dequant_tile=True), "scaled": DecodeConfig(16, 16, 4, 2)}
    if fmt.startswith("fp8"):
        paths["group"] = DecodeConfig(16, 16, 4, 2, group_dots=True)
    err = dict.fromkeys(paths, 0.0)
    for _ in range(6):
        q, pages, table, seq_lens, _, scale = make_quantized_case(
            lens=(40, 90), sq=2, heads=8, latent_heads=1, r_c=64, rope=16, page=16, dtype=dtype,
            fmt=fmt, seed=random.SystemRandom().randrange(2**31))
        n_pages, page = pages.codes.shape[:2]
        fields = pages.scales.float()  # [pages, page, 2 groups, scale (, zero-point)]
        if fmt.startswith("fp8"):
            codes = pages.codes.view(torch.float8_e4m3fn).float()
            latent = codes.view(n_pages, page, 2, 32) * fields
        else:  # two codes a byte, lowest nibble first
            byte = pages.codes.long()
            codes = torch.stack([byte & 15, byte >> 4], -1).float()
            latent = codes.view(n_pages, page, 2, 32) * fields[..., :1] + fields[..., 1:]
        exact_kv = torch.cat([latent.view(n_pages, page, 64), pages.rope.float()], -1)
        kw = dict(latent_heads=1, rope_dim=16, softmax_scale=scale)
        exact = md.mla_decode_reference(q.float(), exact_kv, table, seq_lens, **kw)
        for path, config in paths.items():
            out = md.mla_decode(q, pages, table, seq_lens, num_splits=2, config=config, **kw)
            err[path] += float((out.float() - exact).pow(2).mean().sqrt())
    assert all(e <= 1.1 * err["dequant"] for e in err.values()), err


@pytest.mark.parametrize("fmt, r_c, rope, latent_heads, expected", [
    ("fp8_e4m3/g128", 512, 64, 1, (128, 4, 4)),  # FlashMLA's 656-byte row
    ("fp8_e4m3/g64", 256, 64, 2, (64, 4, 4)),  # GLA-2: latent head 1's scales start at group 4
    ("fp8_e4m3/g32", 256, 32, 1, (32, 8, 8)),
    ("fp8_e4m3/g64", 512, 64, 1, None),  # 8 scales a token: two tiles no longer fit beside q
    ("fp8_e4m3/head", 512, 64, 1, None),  # one scale a token is under TMA's 16-byte box
    ("fp8_e4m3/g8", 64, 16, 1, None),  # groups under 16 columns
    ("int4/g32", 512, 64, 1, None),
])
def test_which_quantized_caches_the_gluon_kernel_reads(fmt, r_c, rope, latent_heads, expected):
    from latentkv.kernels import mla_decode_wgmma

    pages = QuantizedPages.empty(parse_format(fmt), num_pages=2, page_size=16, latent_width=latent_heads * r_c,
                                 rope_dim=rope, dtype=BF16, device="cpu")
    assert mla_decode_wgmma.fp8_groups(pages, latent_heads) == expected
