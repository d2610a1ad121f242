"""Decode kernels equal their PyTorch references (MLA, GLA, query length 1..8, paged caches).

On a machine without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set here, before
triton is imported) on small shapes; with CUDA they are compiled and larger, model-sized shapes
are added. Every comparison reports max abs / max rel / cosine / worst coordinate.
"""

from __future__ import annotations

import importlib
import math
import os
import random

import pytest
import torch
import tiny_models

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`
triton = pytest.importorskip("triton", reason="triton not installed: the decode kernels cannot be tested")

from latentkv.errors import LatentKVError  # noqa: E402
from latentkv.kernels import compare as cmp_mod  # noqa: E402

md = importlib.import_module("latentkv.kernels.mla_decode")  # the module (the package attribute is the function)
if not CUDA and type(md._kernels()[0]).__name__ != "InterpretedFunction":
    # triton was imported before this module could set TRITON_INTERPRET (latentkv.kernels itself
    # imports triton only on first launch); the interpreter cannot be switched on afterwards.
    pytest.skip(
        "triton was imported in compiled mode before tests/test_kernels.py set TRITON_INTERPRET=1 and "
        "there is no GPU; run with TRITON_INTERPRET=1 (or set it in conftest.py)",
        allow_module_level=True,
    )

DecodeConfig = md.DecodeConfig
DEVICE = "cuda" if CUDA else "cpu"
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# tolerance per dtype: (rtol, atol as a fraction of max|ref|, max 1 - cosine)
TOL = {
    BF16: (1e-2, 1e-2, 1e-4),
    FP16: (5e-3, 5e-3, 1e-5),
    FP32: ((5e-3, 5e-3, 1e-5) if CUDA else (1e-4, 1e-5, 1e-9)),  # tl.dot takes tf32 on GPUs
}


def make_case(
    *,
    batch_lens: tuple[int, ...],
    sq: int,
    heads: int,
    latent_heads: int,
    r_c: int,
    rope: int,
    page: int,
    dtype: torch.dtype,
    seed: int,
    spare_pages: int = 3,
    q_scale: float = 1.0,
):
    """Random paged cache with shuffled, non-contiguous block tables and unused garbage pages."""
    g = torch.Generator().manual_seed(seed)
    width = latent_heads * r_c + rope
    batch = len(batch_lens)
    need = [math.ceil(n / page) for n in batch_lens]
    max_pages = max(need) + 1  # one spare column: the table is wider than any sequence needs
    num_pages = sum(need) + spare_pages
    kv = torch.randn(num_pages, page, width, generator=g)
    perm = torch.randperm(num_pages, generator=g)
    table = torch.full((batch, max_pages + 2), -1, dtype=torch.int32)  # -1 where no page is assigned
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used : used + n].to(torch.int32)
        used += n
    # poison every cache row that no sequence owns (tails of partly filled pages, spare pages):
    owned = torch.zeros(num_pages, page, dtype=torch.bool)
    for b, n in enumerate(batch_lens):
        pos = torch.arange(n)
        owned[table[b, pos // page].long(), pos % page] = True
    kv[~owned] = float("nan")
    table = table[:, :max_pages]  # a column slice: row stride != row length
    q = torch.randn(batch, sq, heads, r_c + rope, generator=g) * q_scale
    to = dict(device=DEVICE)
    return (
        q.to(dtype).to(**to),
        kv.to(dtype).to(**to),
        table.to(**to),
        torch.tensor(batch_lens, dtype=torch.int32, device=DEVICE),
        1.0 / math.sqrt(r_c + rope),
    )


def check(out, ref, dtype, name):
    rtol, atol_frac, max_cos = TOL[dtype]
    atol = atol_frac * float(ref.abs().max())
    return cmp_mod.assert_close(out, ref, atol=atol, rtol=rtol, max_cos_diff=max_cos, name=name)


# id: (lens, Sq, H, latent_heads, r_c, rope, page, dtype, num_splits, config)
SMALL = DecodeConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)
CASES = {
    "mla-sq1-len1-odd": ((1, 17, 40), 1, 4, 1, 32, 16, 16, BF16, None, None),
    "mla-sq1-splits3": ((1, 33, 70), 1, 4, 1, 32, 16, 16, FP32, 3, SMALL),
    "mla-sq2-fp16-page8": ((2, 37), 2, 4, 1, 32, 16, 8, FP16, 2, None),
    "mla-sq4-lens-mixed": ((4, 19, 64, 65), 4, 4, 1, 32, 16, 16, BF16, 4, SMALL),
    "mla-sq8-two-hblocks": ((8, 45), 8, 4, 1, 32, 16, 16, FP32, 3, SMALL),
    "mla-empty-splits": ((1, 9), 1, 4, 1, 32, 16, 16, FP32, 5, SMALL),
    "mla-page24-gather": ((2, 61), 2, 4, 1, 32, 16, 24, BF16, 2, SMALL),
    "mla-rc40-rope8-padded": ((7, 50), 1, 4, 1, 40, 8, 16, FP32, 2, None),
    "mla-norope": ((3, 21), 3, 4, 1, 32, 0, 16, FP32, 2, None),
    "mla-auto-splits-long": ((300, 520), 1, 4, 1, 32, 16, 64, BF16, None, None),
    "gla2-sq1": ((1, 23, 50), 1, 4, 2, 16, 16, 16, BF16, 2, None),
    "gla2-sq2": ((2, 31, 47), 2, 8, 2, 32, 16, 16, BF16, 3, SMALL),
    "gla3-sq3-fp16": ((3, 41), 3, 6, 3, 16, 16, 8, FP16, 2, None),
    "gla3-sq5-direct": ((5, 30), 5, 6, 3, 32, 16, 16, BF16, 1, SMALL),
    "gla2-sq6-fp32": ((6, 27, 33), 6, 4, 2, 16, 16, 16, FP32, 2, None),
    "mla-sq7": ((7, 40), 7, 2, 1, 32, 16, 16, BF16, 2, None),
    "mla-kv-on-m": ((1, 33, 70), 1, 4, 1, 32, 16, 16, BF16, 3, DecodeConfig(16, 16, 4, 2, kv_on_m=True)),
    "gla2-kv-on-m-sq4": ((4, 29, 50), 4, 4, 2, 16, 16, 8, FP32, 2, DecodeConfig(16, 16, 4, 2, kv_on_m=True)),
    "mla-fused-combine": ((2, 33, 70), 2, 4, 1, 32, 16, 16, BF16, 3, DecodeConfig(16, 16, 4, 2, fuse_combine=True)),
    "gla2-peaky-scores": ((2, 45, 61), 2, 4, 2, 16, 16, 16, BF16, 1, DecodeConfig(16, 16, 4, 2)),
    "gla3-fused-empty-splits": ((3, 9, 41), 3, 6, 3, 16, 16, 8, FP32, 5, DecodeConfig(16, 16, 4, 2, fuse_combine=True)),
    # odd latent and RoPE widths (column-masked loads)
    "odd-mla-rc40-rope8": ((7, 50), 1, 4, 1, 40, 8, 16, BF16, 2, None),
    "odd-mla-rc44-rope20-sq2": ((2, 37, 19), 2, 4, 1, 44, 20, 8, FP32, 3, SMALL),
    "odd-gla3-rc24-rope12": ((3, 41), 3, 6, 3, 24, 12, 8, BF16, 2, None),
    "odd-gla2-rc20-norope-kv-on-m": ((4, 29), 2, 4, 2, 20, 0, 8, FP32, 2, DecodeConfig(16, 16, 4, 2, kv_on_m=True)),
    # wide latents (1024-column blocks): the rules' choice, and the output columns split over programs
    # (out_splits; 640 in slices of 256: 3 programs, the last one partly past the width)
    "wide-rc960-rope64-default": ((1, 29, 50), 1, 4, 1, 960, 64, 16, BF16, None, None),
    "wide-rc960-rope64-sq2-os2": ((2, 45), 2, 4, 1, 960, 64, 16, BF16, 2, DecodeConfig(16, 16, 4, 2, out_splits=2)),
    "wide-rc640-rope64-os2": ((5, 40), 1, 4, 1, 640, 64, 16, BF16, 2, DecodeConfig(16, 16, 4, 2, out_splits=2)),
    "wide-rc640-rope64-sq2-os4": ((3, 37), 2, 4, 1, 640, 64, 16, FP32, 3, DecodeConfig(16, 16, 4, 2, out_splits=4)),
    "wide-rc1024-norope-os2-direct": ((7, 33), 1, 4, 1, 1024, 0, 16, BF16, 1, DecodeConfig(16, 16, 4, 2, out_splits=2)),
    "wide-rc1024-norope-sq2-default": ((2, 21), 2, 4, 1, 1024, 0, 16, FP16, 2, None),
    "wide-rc1024-rope128-sq2-os4": ((5, 40), 2, 4, 1, 1024, 128, 16, FP16, 2, DecodeConfig(16, 16, 4, 2, out_splits=4)),
    "wide-rc1024-rope128-fp32-default": ((5, 40), 1, 4, 1, 1024, 128, 16, FP32, 2, None),  # rule: out_splits 2
    "wide-gla2-rc960-sq2-os2": ((2, 31, 47), 2, 8, 2, 960, 64, 16, BF16, 3, DecodeConfig(16, 16, 4, 2, out_splits=2)),
    "wide-gla2-rc640-sq1-os4": ((1, 23, 50), 1, 4, 2, 640, 64, 16, FP32, 2, DecodeConfig(16, 16, 4, 2, out_splits=4)),
    "wide-rc960-os2-fused-combine": ((2, 33, 70), 2, 4, 1, 960, 64, 16, BF16, 3,
                                     DecodeConfig(16, 16, 4, 2, fuse_combine=True, out_splits=2)),
    "wide-gla2-rc640-os4-fused-empty-splits": ((3, 9, 41), 2, 4, 2, 640, 64, 8, FP32, 5,
                                               DecodeConfig(16, 16, 4, 2, fuse_combine=True, out_splits=4)),
    "wide-rc960-os2-kv-on-m": ((1, 33, 70), 1, 4, 1, 960, 64, 16, BF16, 3, DecodeConfig(16, 16, 4, 2, kv_on_m=True,
                                                                                       out_splits=2)),
    "wide-rc640-peaky-scores-os2": ((2, 45, 61), 2, 4, 1, 640, 64, 16, BF16, 1, DecodeConfig(16, 16, 4, 2, out_splits=2)),
}
if CUDA:  # model-sized shapes where the kernels are compiled
    CASES.update(
        {
            "gpu-mla32-deepseek": ((1, 777, 2048, 4099), 1, 32, 1, 512, 64, 64, BF16, None, None),
            "gpu-mla32-split4": ((1, 777, 2048, 4099), 1, 32, 1, 512, 64, 64, BF16, 4, None),
            "gpu-mla128-sq2": ((5, 1000, 3001), 2, 128, 1, 512, 64, 64, BF16, None, None),
            "gpu-mla16-sq4-fp16": ((4, 999, 2500), 4, 16, 1, 512, 64, 64, FP16, 3, None),
            "gpu-gla2-h128-sq2": ((2, 1500, 2049), 2, 128, 2, 256, 64, 64, BF16, None, None),
            "gpu-gla3-h96-sq3": ((3, 700, 1777), 3, 96, 3, 128, 64, 32, BF16, 2, None),
            "gpu-mla32-sq8-page16": ((8, 333, 1025), 8, 32, 1, 512, 64, 16, BF16, None, None),
            "gpu-mla-rc448": ((1, 900), 1, 32, 1, 448, 64, 64, BF16, 2, None),
            "odd-gpu-mla-rc156-rope36": ((1, 777, 2048), 1, 9, 1, 156, 36, 64, BF16, None, None),
            "odd-gpu-mla-rc960-rope64": ((1, 777, 4099), 1, 32, 1, 960, 64, 64, BF16, None, None),
            "odd-gpu-gla2-rc100-rope28-fp16": ((2, 1500, 2049), 2, 32, 2, 100, 28, 64, FP16, None, None),
            "odd-gpu-mla-rc96-rope32-sq4": ((4, 999, 2500), 4, 32, 1, 96, 32, 64, BF16, None, None),
            "gpu-mla32-fp32": ((1, 700), 1, 32, 1, 512, 64, 64, FP32, 2, None),
            "gpu-mla32-kv-on-m": ((1, 777, 4099), 1, 32, 1, 512, 64, 64, BF16, None, DecodeConfig(32, 64, 8, 3, True)),
            "gpu-mla32-bm64": ((1, 777, 4099), 1, 32, 1, 512, 64, 64, BF16, 3, DecodeConfig(64, 32, 8, 3)),
            "gpu-mla32-fused": ((1, 777, 4099, 8191), 1, 32, 1, 512, 64, 64, BF16, 4, DecodeConfig(32, 64, 8, 5, fuse_combine=True)),
            "gpu-mla32-maxnreg": ((1, 777, 4099), 1, 32, 1, 512, 64, 64, BF16, 4, DecodeConfig(32, 32, 8, 5, maxnreg=128)),
            "gpu-mla128-peaky-scores": ((2, 1000, 3001), 2, 128, 1, 512, 64, 64, BF16, None, None),
            "gpu-gla2-fused-sq2": ((2, 1500, 2049), 2, 128, 2, 256, 64, 64, BF16, 3, DecodeConfig(128, 32, 8, 5, fuse_combine=True)),
            "gpu-wide-rc1024-rope64": ((1, 777, 4099), 1, 32, 1, 1024, 64, 64, BF16, None, None),
            "gpu-wide-rc640-rope64-sq2": ((2, 1000, 3001), 2, 32, 1, 640, 64, 64, BF16, None, None),
            "gpu-wide-rc1024-rope128-fp16": ((1, 777, 4099), 1, 32, 1, 1024, 128, 64, FP16, None, None),
            "gpu-wide-rc960-fp32": ((1, 700), 1, 32, 1, 960, 64, 64, FP32, 2, None),
            "gpu-wide-rc960-os2": ((1, 777, 4099), 1, 32, 1, 960, 64, 64, BF16, None, DecodeConfig(32, 16, 8, 3, out_splits=2)),
            "gpu-wide-rc640-os4-sq2": ((2, 1000, 3001), 2, 32, 1, 640, 64, 64, BF16, 3, DecodeConfig(16, 16, 8, 2, out_splits=4)),
            "gpu-wide-gla2-rc960-os2-fused": ((2, 1500, 2049), 2, 32, 2, 960, 64, 64, BF16, 4,
                                              DecodeConfig(16, 32, 8, 3, fuse_combine=True, out_splits=2)),
            "gpu-wide-rc960-bm16-n64": ((1, 777, 4099), 1, 32, 1, 960, 64, 64, BF16, None, DecodeConfig(16, 64, 8, 2)),
        }
    )
if CUDA and torch.cuda.get_device_capability()[0] == 9:  # the Gluon wgmma kernel (Hopper only)
    W = md.WGMMA_CONFIG
    CASES.update(
        {
            "wgmma-mla128-splits3-tails": ((1, 63, 64, 65, 4099), 1, 128, 1, 512, 64, 64, BF16, 3, W),
            "wgmma-mla128-direct": ((2, 1000, 3001), 1, 128, 1, 512, 64, 64, BF16, 1, W),
            "wgmma-mla64-sq2-fp16-page32": ((5, 1000, 2047), 2, 64, 1, 512, 64, 32, FP16, None, W),
            "wgmma-mla128-page16-sq4": ((4, 333, 1025), 4, 32, 1, 512, 64, 16, BF16, 2, W),
            "wgmma-mla128-page128": ((130, 3000), 1, 128, 1, 512, 64, 128, BF16, 2, W),
            "wgmma-mla96-rows-padded": ((7, 2000), 1, 96, 1, 512, 64, 64, BF16, 2, W),
            "wgmma-rc256-norope": ((9, 1500), 1, 64, 1, 256, 0, 64, BF16, 2, W),
            "wgmma-rc128-rope32": ((3, 777), 2, 64, 1, 128, 32, 64, FP16, 1, W),
            "wgmma-mla128-peaky-scores": ((2, 1000, 3001), 2, 128, 1, 512, 64, 64, BF16, 5, W),
            "wgmma-empty-splits": ((1, 9, 70), 1, 64, 1, 512, 64, 64, BF16, 6, W),
            "wgmma-mla32-rows-padded": ((1, 777, 4099), 1, 32, 1, 512, 64, 64, BF16, 4, W),
            "wgmma-mla16-rows-padded-fp16": ((5, 300), 1, 16, 1, 512, 64, 32, FP16, 2, W),
            "wgmma-gla2-h128-sq2": ((2, 1500, 2049), 2, 128, 2, 256, 64, 64, BF16, None, W),
            "wgmma-gla3-h96-sq3-splits": ((3, 700, 1777), 3, 96, 3, 128, 64, 32, BF16, 2, W),
            "wgmma-gla2-fp16-page16": ((1, 65, 999), 1, 64, 2, 256, 32, 16, FP16, 3, W),
        }
    )


@pytest.mark.parametrize("case_id", list(CASES))
def test_kernel_matches_reference(case_id):
    """Guards the kernel itself: paging, split-KV + combine, causal masking among query tokens,
    GLA head grouping, padded widths. Unowned cache rows hold NaN, so any read past a sequence's
    length or into the wrong page shows up; the output is NaN-poisoned before launch."""
    lens, sq, heads, hc, r_c, rope, page, dtype, splits, config = CASES[case_id]
    seed = random.SystemRandom().randrange(2**31)
    q, kv, table, seq_lens, scale = make_case(
        batch_lens=lens, sq=sq, heads=heads, latent_heads=hc, r_c=r_c, rope=rope, page=page, dtype=dtype, seed=seed,
        q_scale=8.0 if "peaky" in case_id else 1.0,  # scores spread over many powers of 2: rescales happen
    )
    kw = dict(latent_heads=hc, rope_dim=rope, softmax_scale=scale)
    out = md.mla_decode(q, kv, table, seq_lens, num_splits=splits, config=config, _poison=True, **kw)
    ref = md.mla_decode_reference(q, kv, table, seq_lens, out_dtype=torch.float32, **kw)
    assert out.dtype == dtype and out.shape == (len(lens), sq, heads, r_c)
    check(out, ref, dtype, f"{case_id} seed={seed}")


def test_aligned_rows_decode_as_contiguous_ones():
    """The runtime's pages (``empty_pages``: row stride rounded up to 16 bytes) decode to the same
    bytes as a contiguous copy of the same rows; the padding columns hold NaN, so a read of them
    shows. 36 + 10 bf16 values: a row of 92 bytes in a stride of 96."""
    seed = random.SystemRandom().randrange(2**31)
    q, kv, table, seq_lens, scale = make_case(batch_lens=(21, 40), sq=1, heads=4, latent_heads=1, r_c=36, rope=10,
                                              page=16, dtype=BF16, seed=seed)
    aligned = md.empty_pages(kv.shape[0], kv.shape[1], kv.shape[2], dtype=BF16, device=DEVICE)
    assert aligned.stride(1) == 48 and aligned.data_ptr() % 16 == 0
    full = aligned.as_strided((kv.shape[0], kv.shape[1], 48), aligned.stride())
    full.fill_(float("nan"))
    aligned.copy_(kv)
    kw = dict(latent_heads=1, rope_dim=10, softmax_scale=scale)
    out = md.mla_decode(q, aligned, table, seq_lens, num_splits=2, **kw)
    ref = md.mla_decode(q, kv.contiguous(), table, seq_lens, num_splits=2, **kw)
    assert torch.equal(out, ref), f"seed={seed}"
    rows = md.page_rows(aligned)
    assert rows.shape == (kv.shape[0] * kv.shape[1], 46)
    assert torch.equal(rows[17].view(torch.int16), aligned[1, 1].view(torch.int16))  # bits: unowned rows hold NaN


def test_wgmma_config_refused_where_it_cannot_run():
    """Guards the dispatch: asking for the Gluon wgmma kernel where it cannot run (CPU, GLA, too
    few query rows, float32) is a clear error, not a crash inside the compiler."""
    q, kv, table, seq_lens, scale = make_case(
        batch_lens=(5, 40), sq=1, heads=4, latent_heads=2, r_c=32, rope=16, page=16, dtype=FP32, seed=0
    )
    with pytest.raises(LatentKVError, match="wgmma decode kernel needs"):
        md.mla_decode(q, kv, table, seq_lens, latent_heads=2, rope_dim=16, softmax_scale=scale, config=md.WGMMA_CONFIG)
    with pytest.raises(LatentKVError, match="must be 'triton' or 'wgmma'"):
        md.mla_decode(q, kv, table, seq_lens, latent_heads=2, rope_dim=16, softmax_scale=scale,
                      config=DecodeConfig(16, 16, 4, 2, kernel="cutlass"))  # fmt: skip


def test_fused_combine_repeats():
    """Guards the fused combine's tickets: they must return to zero, so a second and third call
    on the same buffers still merge every split (a stale ticket would skip or double a merge)."""
    cfg = DecodeConfig(16 if not CUDA else 32, 16 if not CUDA else 64, 4 if not CUDA else 8, 2, fuse_combine=True)
    r_c, rope, dtype = (32, 16, FP32) if not CUDA else (512, 64, BF16)
    q, kv, table, seq_lens, scale = make_case(
        batch_lens=(5, 40, 77), sq=2, heads=4, latent_heads=1, r_c=r_c, rope=rope, page=16, dtype=dtype, seed=3
    )
    kw = dict(latent_heads=1, rope_dim=rope, softmax_scale=scale)
    ref = md.mla_decode_reference(q, kv, table, seq_lens, out_dtype=torch.float32, **kw)
    for i in range(3):
        out = md.mla_decode(q, kv, table, seq_lens, num_splits=3, config=cfg, _poison=True, **kw)
        check(out, ref, dtype, f"fused combine, call {i}")


def test_reference_matches_dense_attention():
    """Guards the reference and write_paged: a cache written through write_paged (shuffled pages)
    gives the same result as plain dense causal attention written out by hand."""
    g = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    batch, sq, heads, hc, r_c, rope, page = 2, 3, 6, 3, 8, 4, 4
    lens = [5, 11]
    width = hc * r_c + rope
    dense = torch.randn(batch, max(lens), width, generator=g, dtype=torch.float64)
    q = torch.randn(batch, sq, heads, r_c + rope, generator=g, dtype=torch.float64)
    num_pages = 8
    kv = torch.full((num_pages, page, width), float("nan"), dtype=torch.float64)
    table = torch.randperm(num_pages, generator=g)[: batch * 3].view(batch, 3).to(torch.int32)
    for b, n in enumerate(lens):
        md.write_paged(kv, table[b : b + 1], torch.arange(n)[None], dense[b : b + 1, :n])
    scale = 0.3
    q32 = q.float()
    got = md.mla_decode_reference(
        q32, kv.float(), table, torch.tensor(lens, dtype=torch.int32), latent_heads=hc, rope_dim=rope, softmax_scale=scale
    )
    want = torch.empty(batch, sq, heads, r_c, dtype=torch.float64)
    hg = heads // hc
    for b, n in enumerate(lens):
        for i in range(sq):
            pos = n - sq + i
            for h in range(heads):
                c = h // hg
                lat = dense[b, : pos + 1, c * r_c : (c + 1) * r_c]
                kpe = dense[b, : pos + 1, hc * r_c :]
                s = (lat @ q[b, i, h, :r_c] + kpe @ q[b, i, h, r_c:]) * scale
                want[b, i, h] = torch.softmax(s, 0) @ lat
    cmp_mod.assert_close(got, want, atol=1e-6, rtol=1e-5, max_cos_diff=1e-10, name="reference vs dense")


def test_facade_backends():
    """Guards the facade: 'reference' and 'triton' give the same answer, 'auto' picks the
    reference off CUDA, and an unknown backend is a clear error."""
    q, kv, table, seq_lens, scale = make_case(
        batch_lens=(3, 20), sq=1, heads=4, latent_heads=1, r_c=16, rope=16, page=16, dtype=FP32, seed=1
    )
    kw = dict(latent_heads=1, rope_dim=16, softmax_scale=scale)
    ref = md.decode_attention(q, kv, table, seq_lens, backend="reference", **kw)
    tri = md.decode_attention(q, kv, table, seq_lens, backend="triton", **kw)
    check(tri, ref, FP32, "facade triton vs reference")
    auto = md.decode_attention(q, kv, table, seq_lens, **kw)
    if not CUDA:
        assert torch.equal(auto, ref)
    with pytest.raises(LatentKVError, match="unknown decode backend"):
        md.decode_attention(q, kv, table, seq_lens, backend="cuda", **kw)


def _bad(**over):
    q, kv, table, seq_lens, scale = make_case(
        batch_lens=(3, 20), sq=2, heads=4, latent_heads=2, r_c=16, rope=16, page=16, dtype=BF16, seed=2
    )
    args = dict(q=q, kv_cache=kv, block_table=table, seq_lens=seq_lens)
    kw = dict(latent_heads=2, rope_dim=16, softmax_scale=scale)
    for k, v in over.items():
        (args if k in args else kw)[k] = v(args[k]) if callable(v) else v
    return args, kw


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(kv_cache=lambda t: t.half()), "share one dtype"),
        (dict(q=lambda t: t.to(torch.int8)), "share one dtype"),
        (dict(block_table=lambda t: t.long()), "int32"),
        (dict(seq_lens=lambda t: t.long()), "int32"),
        (dict(q=lambda t: t[:, :, :, :-1]), "kv_cache width"),
        (dict(latent_heads=3), "cannot be split evenly"),
        (dict(q=lambda t: t[0]), "4-d tensor"),
        (dict(seq_lens=lambda t: t[:1]), "batch sizes disagree"),
        (dict(rope_dim=-1), "non-negative"),
        (dict(block_table=lambda t: t[:, None].expand(-1, 3, -1).contiguous()), "one row of pages per latent head"),
        (dict(block_table=lambda t: t[:, None, None]), r"int32 tensor \[batch, max_pages\]"),
        (dict(block_table=lambda t: t[:, None].expand(-1, 2, -1).long()), "int32"),
    ],
)
def test_launcher_rejects_bad_input(over, message):
    """Guards the launcher's checks: wrong dtype, shape or head grouping is a LatentKVError
    that names the problem, never an assert or a wrong answer."""
    args, kw = _bad(**over)
    with pytest.raises(LatentKVError, match=message):
        md.mla_decode(**args, **kw)
    with pytest.raises(LatentKVError, match=message):
        md.mla_decode_reference(**args, **kw)


def test_launcher_rejects_short_sequences():
    """Guards the length check: a sequence shorter than the query length is refused on the CPU."""
    args, kw = _bad()
    args["seq_lens"] = torch.tensor([1, 20], dtype=torch.int32)
    if CUDA:
        pytest.skip("length values are checked only for CPU seq_lens (no device sync)")
    with pytest.raises(LatentKVError, match="include the 2 new query tokens"):
        md.mla_decode(**args, **kw)


def test_choose_num_splits():
    """Guards the split heuristic: short sequences never split, a small batch on a big GPU
    splits, a batch that already fills the GPU does not."""
    assert md.choose_num_splits(64, 200, 132, 32) == 1
    assert md.choose_num_splits(4, 8192, 132, 32) >= 16
    assert md.choose_num_splits(256, 8192, 132, 64) == 1
    assert md.choose_num_splits(64, 8192, 132, 32) == 2  # 128 programs, one per SM
    assert md.choose_num_splits(64, 8192, 132, 32, ctas_per_sm=2) == 4  # 256 programs, two per SM


def test_write_paged_rejects_out_of_range():
    """Guards write_paged: a position past the block table's capacity is an error, not a write
    into another sequence's page."""
    kv = torch.zeros(4, 4, 8)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(LatentKVError, match="block table capacity"):
        md.write_paged(kv, table, torch.tensor([[8]]), torch.ones(1, 1, 8))


# --------------------------------------------------------------------------------------------
# per-page attention masses (return_masses): the history of sparse decode
# --------------------------------------------------------------------------------------------
# id: (lens, Sq, H, latent_heads, r_c, rope, page, dtype, num_splits, config)
MASSES_CASES = {
    "mla-sq1-len1-odd-direct": ((1, 17, 40), 1, 4, 1, 32, 16, 16, FP32, 1, SMALL),  # tile = page
    "mla-sq2-splits3-bf16": ((2, 33, 70), 2, 4, 1, 32, 16, 16, BF16, 3, SMALL),
    "mla-sq1-page8-two-pages-per-tile": ((1, 13, 37), 1, 4, 1, 32, 16, 8, FP16, 2, DecodeConfig(16, 16, 4, 2)),
    "mla-sq2-page8-four-pages-per-tile": ((2, 29, 50), 2, 4, 1, 32, 16, 8, FP32, 2, DecodeConfig(16, 32, 4, 2)),
    "mla-sq1-page64-four-tiles-per-page": ((1, 63, 150), 1, 4, 1, 32, 16, 64, BF16, 3, SMALL),
    "mla-page48-three-tiles-per-page": ((5, 100), 1, 4, 1, 32, 16, 48, FP32, 2, None),  # default tile shrunk to 16
    "mla-norope-empty-splits": ((1, 9), 1, 4, 1, 32, 0, 16, FP32, 5, SMALL),
    "gla2-sq1-splits2": ((1, 23, 50), 1, 4, 2, 16, 16, 16, BF16, 2, None),
    "gla2-sq2-direct-fp16": ((2, 31, 47), 2, 8, 2, 32, 16, 16, FP16, 1, SMALL),
    "gla3-sq2-page8-splits3": ((3, 41), 2, 6, 3, 16, 16, 8, FP32, 3, DecodeConfig(16, 16, 4, 2)),
    "gla2-kv-on-m-page8": ((4, 29, 50), 2, 4, 2, 16, 16, 8, FP32, 2, DecodeConfig(16, 32, 4, 2, kv_on_m=True)),
    "mla-kv-on-m-sq1": ((1, 33, 70), 1, 4, 1, 32, 16, 16, BF16, 3, DecodeConfig(16, 16, 4, 2, kv_on_m=True)),
    "mla-fused-combine-sq2": ((2, 33, 70), 2, 4, 1, 32, 16, 16, FP32, 3, DecodeConfig(16, 16, 4, 2, fuse_combine=True)),
    "mla-sq2-peaky-scores": ((2, 45, 61), 2, 4, 1, 32, 16, 16, BF16, 2, SMALL),
    "wide-rc640-sq2-os2": ((2, 33, 70), 2, 4, 1, 640, 64, 16, BF16, 3, DecodeConfig(16, 16, 4, 2, out_splits=2)),
    "wide-gla2-rc640-os4-fused": ((1, 23, 50), 1, 4, 2, 640, 64, 16, FP32, 2,
                                  DecodeConfig(16, 16, 4, 2, fuse_combine=True, out_splits=4)),
}
if CUDA:
    MASSES_CASES.update({
        "gpu-mla32-deepseek": ((1, 777, 2048, 4099), 1, 32, 1, 512, 64, 64, BF16, None, None),
        "gpu-mla32-split4-page16": ((1, 777, 4099), 1, 32, 1, 512, 64, 16, BF16, 4, None),
        "gpu-mla128-sq2": ((5, 1000, 3001), 2, 128, 1, 512, 64, 64, BF16, None, None),
        "gpu-gla2-h128-sq2": ((2, 1500, 2049), 2, 128, 2, 256, 64, 64, BF16, None, None),
    })


@pytest.mark.parametrize("case_id", list(MASSES_CASES))
def test_kernel_masses_match_block_masses(case_id):
    """Guards the per-page masses the sparse history reads from the kernel: for every sequence
    they equal ``sparsity.masses.block_masses`` over its pages (and the reference's return_masses)
    -- MLA and GLA, odd lengths, length 1, partly filled pages, pages smaller / larger than a
    tile, split-KV with empty splits, Sq > 1 (causal), both MMA orientations, fused combine; table
    columns past a sequence's length are exactly 0; the output is bit-identical to the call
    without masses (the flag must not change attention; where the default tile must shrink to fit
    the pages, equal to the reference). Unowned cache rows hold NaN and the
    masses buffers are NaN-poisoned, so a wrong read or an unwritten column shows up."""
    from latentkv.sparsity.masses import block_masses, paged_rows

    lens, sq, heads, hc, r_c, rope, page, dtype, splits, config = MASSES_CASES[case_id]
    seed = random.SystemRandom().randrange(2**31)
    q, kv, table, seq_lens, scale = make_case(
        batch_lens=lens, sq=sq, heads=heads, latent_heads=hc, r_c=r_c, rope=rope, page=page, dtype=dtype, seed=seed,
        q_scale=8.0 if "peaky" in case_id else 1.0,
    )
    # the kernel a masses call runs (on Hopper the default for many heads is the Gluon kernel, which
    # writes no masses): the call without masses must use the same one to be comparable bit for bit
    cfg = config or md.choose_config(q, kv, hc, rope, need_masses=True)
    kw = dict(latent_heads=hc, rope_dim=rope, softmax_scale=scale, num_splits=splits)
    plain = md.mla_decode(q, kv, table, seq_lens, config=cfg, **kw)
    out, masses = md.mla_decode(q, kv, table, seq_lens, return_masses=True, _poison=True, config=config, **kw)
    if md._masses_config(cfg, page, explicit=False) == cfg:
        assert torch.equal(out, plain), f"{case_id}: return_masses changed the attention output"
    else:  # the default tile was shrunk to fit the pages: other tiles, same attention up to rounding
        check(out, md.mla_decode_reference(q, kv, table, seq_lens, out_dtype=torch.float32, **kw), dtype, case_id)
    kw["config"] = config
    assert masses.shape == (len(lens), sq, hc, table.shape[1]) and masses.dtype == torch.float32
    _, ref = md.mla_decode_reference(q, kv, table, seq_lens, return_masses=True, **kw)
    atol = 2e-3 if (CUDA and dtype == FP32) else 1e-5  # compiled fp32 dots run in TF32
    for b, length in enumerate(lens):
        n = math.ceil(length / page)
        want = block_masses(q[b].cpu(), paged_rows(kv, table[b, :n], length).cpu(), latent_heads=hc, rope_dim=rope,
                            scale=scale, page_size=page)  # [Sq, hc, n]
        name = f"{case_id} seq {b} (length {length}) seed={seed}"
        cmp_mod.assert_close(masses[b, :, :, :n], want, atol=atol, rtol=1e-3, max_cos_diff=1e-6, name=name)
        if CUDA:  # the reference's float32 products on the GPU round differently from the CPU's
            cmp_mod.assert_close(ref[b, :, :, :n].cpu(), want, atol=1e-6, rtol=1e-5, max_cos_diff=1e-9, name=name)
        else:
            assert torch.equal(ref[b, :, :, :n].cpu(), want), f"{name}: reference masses != block_masses"
        assert not masses[b, :, :, n:].any(), f"{name}: columns past the length are not 0"


def test_masses_page_size_errors():
    """Guards the one shape return_masses cannot serve: pages whose size neither divides nor is a
    multiple of a tile (24 tokens; or an explicit config's tile of 32 with pages of 48) are a clear
    LatentKVError naming the fix, never wrong masses; masses off, the same inputs decode as before."""
    q, kv, table, seq_lens, scale = make_case(
        batch_lens=(5, 50), sq=1, heads=4, latent_heads=1, r_c=32, rope=16, page=24, dtype=FP32, seed=4
    )
    kw = dict(latent_heads=1, rope_dim=16, softmax_scale=scale)
    with pytest.raises(LatentKVError, match="divide one another"):
        md.mla_decode(q, kv, table, seq_lens, return_masses=True, **kw)
    md.mla_decode(q, kv, table, seq_lens, **kw)
    q, kv, table, seq_lens, scale = make_case(
        batch_lens=(5, 50), sq=1, heads=4, latent_heads=1, r_c=32, rope=16, page=48, dtype=FP32, seed=4
    )
    with pytest.raises(LatentKVError, match="divide one another"):
        md.mla_decode(q, kv, table, seq_lens, return_masses=True, config=DecodeConfig(16, 32, 4, 2), **kw)


# --------------------------------------------------------------------------------------------
# a block table per latent head ([B, latent_heads, max_pages]): GLA sparse decode choosing pages per head
# --------------------------------------------------------------------------------------------
# id: (lens, Sq, H, latent_heads, r_c, rope, page, dtype, num_splits, config)
HEAD_TABLE_CASES = {
    "gla2-sq1-splits3": ((23, 90, 133), 1, 4, 2, 16, 16, 16, FP32, 3, SMALL),
    "gla2-sq2-direct-bf16": ((31, 110), 2, 8, 2, 32, 16, 16, BF16, 1, SMALL),
    "gla3-sq2-page8-splits2": ((41, 75), 2, 6, 3, 16, 16, 8, FP32, 2, DecodeConfig(16, 16, 4, 2)),
    "gla2-sq1-page8-kv-on-m-fused": ((29, 50), 1, 4, 2, 16, 16, 8, FP32, 3,
                                     DecodeConfig(16, 32, 4, 2, kv_on_m=True, fuse_combine=True)),
}
if CUDA:
    HEAD_TABLE_CASES.update({
        "gpu-gla2-h128-sq2": ((1500, 2049), 2, 128, 2, 256, 64, 64, BF16, None, None),
        "gpu-gla4-h32-sq1-fused": ((777, 4099), 1, 32, 4, 128, 64, 16, BF16, 4,
                                   DecodeConfig(16, 32, 8, 3, fuse_combine=True)),
    })


def _head_choices(lens, sq, page, latent_heads, g):
    """Per sequence, a set of blocks for every latent head, all of one size: the first block, the blocks
    of the last ``sq`` tokens (the last one partly filled) and half of the rest, in a random order taken
    from a different start by each head (so the heads' sets differ where there are enough blocks)."""
    choices = []
    for length in lens:
        n = math.ceil(length / page)
        forced = {0, *range((length - sq) // page, n)}
        rest = [j for j in range(n) if j not in forced]
        order = [rest[i] for i in torch.randperm(len(rest), generator=g).tolist()]
        extra = len(rest) // 2
        choices.append([sorted(forced | {order[(c + i) % len(rest)] for i in range(extra)})
                        for c in range(latent_heads)])
    return choices


def _masked_dense(q, kv, pages, length, keep_blocks, latent_heads, rope, page, scale):
    """Dense causal attention (float64) of one sequence's Sq query tokens over its first ``length`` rows,
    latent head c seeing only the tokens of its blocks ``keep_blocks[c]``: (output [Sq, H, r_c], masses
    [Sq, latent_heads, blocks] per block of the sequence, mean over the head's query heads)."""
    sq, heads, qw = q.shape
    r_c, hg = qw - rope, heads // latent_heads
    rows = kv[pages.long()].reshape(-1, kv.shape[-1])[:length].double()
    n = math.ceil(length / page)
    out = torch.empty(sq, heads, r_c, dtype=torch.float64)
    masses = torch.zeros(sq, latent_heads, n, dtype=torch.float64)
    for c in range(latent_heads):
        keep = torch.zeros(length, dtype=torch.bool)
        for j in keep_blocks[c]:
            keep[j * page : (j + 1) * page] = True
        lat = rows[:, c * r_c : (c + 1) * r_c]
        for i in range(sq):
            visible = keep & (torch.arange(length) <= length - sq + i)
            for h in range(c * hg, (c + 1) * hg):
                s = (lat @ q[i, h, :r_c].double() + rows[:, latent_heads * r_c :] @ q[i, h, r_c:].double()) * scale
                p = torch.softmax(s.masked_fill(~visible, float("-inf")), 0)
                out[i, h] = p @ lat
                masses[i, c] += torch.nn.functional.pad(p, (0, n * page - length)).view(n, page).sum(-1) / hg
    return out, masses


@pytest.mark.parametrize("case_id", list(HEAD_TABLE_CASES))
def test_head_tables_equal_masked_dense_attention(case_id):
    """Guards a block table per latent head: each latent head attends only the pages of its own row
    (different blocks per head, shuffled page ids, the partly filled current block last, compacted
    lengths) and equals dense attention with every other block masked for that head; the masses column j
    of head c is the mass of head c's j-th block, 0 past the length. The Triton kernel (splits, fused
    combine, both MMA orientations, Sq 1 and 2) and the reference both; unowned rows hold NaN."""
    lens, sq, heads, hc, r_c, rope, page, dtype, splits, config = HEAD_TABLE_CASES[case_id]
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    q, kv, table, seq_lens, scale = make_case(batch_lens=lens, sq=sq, heads=heads, latent_heads=hc, r_c=r_c, rope=rope,
                                              page=page, dtype=dtype, seed=seed)
    choices = _head_choices(lens, sq, page, hc, g)
    width = max(len(c[0]) for c in choices) + 1  # a spare column: the rows are wider than any length needs
    head_table = torch.full((len(lens), hc, width), -1, dtype=torch.int32)
    new_lens = []
    for b, (length, heads_ids) in enumerate(zip(lens, choices)):
        n = math.ceil(length / page)
        for c, ids in enumerate(heads_ids):
            head_table[b, c, : len(ids)] = table[b, ids].cpu()
        new_lens.append(length - (n - len(heads_ids[0])) * page)  # every chosen block is full but the last
    head_table, new_lens = head_table.to(DEVICE), torch.tensor(new_lens, dtype=torch.int32, device=DEVICE)
    kw = dict(latent_heads=hc, rope_dim=rope, softmax_scale=scale)
    out, masses = md.mla_decode(q, kv, head_table, new_lens, num_splits=splits, config=config, return_masses=True,
                                _poison=True, **kw)
    ref_out, ref_masses = md.mla_decode_reference(q, kv, head_table, new_lens, return_masses=True,
                                                  out_dtype=torch.float32, **kw)
    assert masses.shape == (len(lens), sq, hc, width)
    for b, (length, heads_ids) in enumerate(zip(lens, choices)):
        name = f"{case_id} seq {b} seed={seed}"
        n = math.ceil(length / page)
        want, want_masses = _masked_dense(q[b].cpu(), kv.cpu(), table[b, :n].cpu(), length, heads_ids, hc, rope,
                                          page, scale)
        check(out[b].cpu(), want, dtype, name)
        cmp_mod.assert_close(ref_out[b].cpu().double(), want, atol=1e-5 * float(want.abs().max()), rtol=1e-4,
                             max_cos_diff=1e-9, name=f"reference {name}")
        k = len(heads_ids[0])
        per_head = torch.stack([want_masses[:, c, ids] for c, ids in enumerate(heads_ids)], dim=1)  # [Sq, hc, k]
        atol = 2e-3 if (CUDA and dtype == FP32) else 1e-5  # compiled fp32 dots run in TF32
        for got, src in ((masses, "kernel"), (ref_masses, "reference")):
            cmp_mod.assert_close(got[b, :, :, :k].cpu().double(), per_head, atol=atol, rtol=1e-3, max_cos_diff=1e-6,
                                 name=f"{src} masses {name}")
            assert not got[b, :, :, k:].any(), f"{src} masses {name}: columns past the length are not 0"


@pytest.mark.parametrize("case_id", ["gla2-sq2-fp16-splits2", "gla3-sq1-fused", "mla-sq1-auto"])
def test_equal_head_rows_decode_as_one_table(case_id):
    """Guards that a per-latent-head table whose rows are all equal is the 2-d table exactly: the same
    output and masses, bit for bit (the kernel reads the same pages in the same order)."""
    lens, sq, heads, hc, config = {
        "gla2-sq2-fp16-splits2": ((5, 40, 61), 2, 4, 2, SMALL),
        "gla3-sq1-fused": ((17, 33), 1, 6, 3, DecodeConfig(16, 16, 4, 2, fuse_combine=True)),
        "mla-sq1-auto": ((29, 70), 1, 4, 1, None),
    }[case_id]
    dtype = FP16 if "fp16" in case_id else BF16
    seed = random.SystemRandom().randrange(2**31)
    q, kv, table, seq_lens, scale = make_case(batch_lens=lens, sq=sq, heads=heads, latent_heads=hc, r_c=16, rope=16,
                                              page=16, dtype=dtype, seed=seed)
    kw = dict(latent_heads=hc, rope_dim=16, softmax_scale=scale, num_splits=2, config=config, return_masses=True)
    out, masses = md.mla_decode(q, kv, table, seq_lens, **kw)
    same = table[:, None].expand(-1, hc, -1)
    out_3d, masses_3d = md.mla_decode(q, kv, same, seq_lens, **kw)
    assert torch.equal(out, out_3d) and torch.equal(masses, masses_3d), f"{case_id} seed={seed}"
    ref, ref_masses = md.mla_decode_reference(q, kv, table, seq_lens, **kw)
    ref_3d, ref_masses_3d = md.mla_decode_reference(q, kv, same, seq_lens, **kw)
    assert torch.equal(ref, ref_3d) and torch.equal(ref_masses, ref_masses_3d), f"reference {case_id} seed={seed}"


@pytest.mark.skipif(not (CUDA and torch.cuda.get_device_capability()[0] == 9), reason="the Gluon kernel: Hopper only")
def test_wgmma_refuses_head_tables():
    """Guards the Gluon kernel, which reads one table row for every head: asked for explicitly with a
    per-latent-head table it is a clear error; chosen automatically (MLA, many heads) the call falls
    back to the Triton kernel and gives the 2-d table's answer."""
    q, kv, table, seq_lens, scale = make_case(batch_lens=(100, 300), sq=1, heads=128, latent_heads=1, r_c=512,
                                              rope=64, page=64, dtype=BF16, seed=6)
    kw = dict(latent_heads=1, rope_dim=64, softmax_scale=scale, num_splits=2)
    with pytest.raises(LatentKVError, match="block table per latent head"):
        md.mla_decode(q, kv, table[:, None], seq_lens, config=md.WGMMA_CONFIG, **kw)
    out = md.mla_decode(q, kv, table[:, None], seq_lens, **kw)
    check(out, md.mla_decode_reference(q, kv, table, seq_lens, out_dtype=torch.float32, **kw), BF16, "wgmma fallback")


def test_bench_sparse_decode_smoke(capsys):
    """Guards the GPU timing script (scripts/bench_sparse_decode.py): in --smoke mode
    (tiny sizes, interpreted or compiled) it runs end to end, checks masses-on == masses-off output
    and the masses against the reference, and reports dense and every sparse fraction with masses
    off and on, the dense row at ratio 1."""
    module = tiny_models.load_script("bench_sparse_decode")
    result = module.main(["--smoke"])
    cases = [(r["case"], r["masses"]) for r in result["rows"]]
    assert cases == [(c, m) for c in ("dense", "sparse 0.25", "sparse 0.125") for m in (False, True)]
    assert result["rows"][0]["vs_dense"] == 1.0 and all(r["time_us"] > 0 for r in result["rows"])
    assert [r["pages_per_seq"] for r in result["rows"][::2]] == [9, 3, 2]
    assert "| sparse 0.125 |" in capsys.readouterr().out


def test_bench_sparse_decode_smoke_per_head():
    """Guards the script's --per-head rows (GLA): a table per latent head runs through the kernel with
    masses on and off (output equal, masses equal to the reference, checked by the script) beside the
    shared table of the same size."""
    module = tiny_models.load_script("bench_sparse_decode")
    result = module.main(["--smoke", "--latent-heads", "2", "--per-head", "--fractions", "0.25"])
    cases = [(r["case"], r["table"], r["masses"]) for r in result["rows"]]
    assert cases == [(c, t, m) for c, t in (("dense", "shared"), ("sparse 0.25", "shared"),
                                            ("sparse 0.25 per-head", "per latent head")) for m in (False, True)]
    assert [r["pages_per_seq"] for r in result["rows"][::2]] == [9, 3, 3]
