"""Absorbed MLA decode for Hopper, written in Gluon: explicit warpgroup layouts, TMA, async wgmma.

Why a second kernel: with 64 query rows per program and 8 warps, Triton lays the score product of
``mla_decode._mla_decode_split_kernel`` out as ``warpsPerCTA [8, 1]`` because the scores feed the
PV product (its rule for chained dots), so both warpgroups compute the same 64 x N scores and
~1/3 of the executed tensor work is wasted (NOTES.md, "Why MLA with 128 heads stays at ~260
TFLOP/s"). Gluon lets the kernel choose the layouts itself:

- scores ``S = q @ tile^T`` [64, BLOCK_N] with warps [4, 2]: warpgroup w computes the scores of
  its half of the tile's keys (no duplication);
- the row max / row sum of the online softmax reduce across the two warpgroups (the compiler's
  cross-warp reduction);
- ``P`` goes to shared memory, and ``O += P @ tile[:, :R_C]`` [64, R_C] with warps [4, 2]:
  warpgroup w owns output columns ``w * R_C/2 ...`` and reads all of P (FlashMLA's split of the
  512-wide accumulator over two warpgroups, without warp specialisation);
- each latent tile arrives once by TMA (one copy per page, or per BLOCK_N rows of a larger page)
  into a ring of 2-4 stages (``num_stages``: as many as shared memory holds) and serves as key and
  value; the next tile's copy is issued as soon as
  both warpgroups have finished the previous tile's PV product;
- ``S_t`` is issued while ``PV_{t-1}`` still runs (both async), so the tensor cores see the two
  products back to back.

Scope: MLA and GLA (latent head c's tiles are its own r_c columns plus the shared RoPE key), r_c
a power of 2 in 64..512, rope_dim 0 or a power of 2 >= 16 (64 in DeepSeek/FlashMLA), bf16 / fp16,
pages that are a power of 2 >= 16 rows and contiguous in memory, CUDA capability 9.x.

fp8 latent caches (``QuantizedPages`` in fp8_e4m3 with scale groups of 4 or more a latent head, so
that a token's scales are one 16-byte TMA row): the codes, scales and RoPE key of a tile arrive by
TMA into the ring (656 instead of 1152 bytes a token at 512 + 64), and once per tile the warps turn
the codes into the model dtype (code x its group's scale, the rounding of the reference) in one
shared tile that both products read. Why not the codes at the MMA: wgmma reads an 8-bit operand
only as fp8 x fp8, which would round the query and P to fp8; and Triton's dequantize-in-registers
path reads the value operand byte by byte from shared memory (NOTES.md). The shared tile is
single-buffered (shared memory holds no second one next to q at 512 + 64), so converting tile t
waits for the PV product of tile t - 1.
``wgmma_supported`` says whether a call qualifies; ``mla_decode.choose_config`` picks this kernel by
default for MLA with >= 64 query rows (fewer rows pad the wgmma's M = 64; GLA measured faster on the
Triton kernel), and otherwise the Triton kernel. The output contract (direct output, or float32 partials + log2-domain LSE merged by the same combine kernel)
is the Triton kernel's. Rows past the sequence's end inside the last tile hold whatever the page
held; they are zeroed in shared memory before use, since ``0 * NaN`` would poison the PV product.
"""

from __future__ import annotations

import importlib.util

import torch

from latentkv.errors import LatentKVError

__all__ = ["fp8_groups", "launch", "wgmma_supported"]

BLOCK_M = 64  # query rows per program: one wgmma M tile
BLOCK_N = 64  # cache rows per tile
SMEM_BUDGET = 220 * 1024  # of the 227 KB a program may use (the rest: barriers, reduction scratch)
MAX_STAGES = 4  # tiles in the shared-memory ring: 2 at r_c 512 + 64 (q + 2 tiles + P = 221 KB), more when narrower


SMEM_LIMIT = 227 * 1024 - 1024  # a Hopper program's shared memory, less the compiler's scratch (~0.5 KB measured)


def num_stages(r_c: int, rope_dim: int, scale_groups: int = 0) -> int:
    """Tiles in the ring; ``scale_groups`` > 0: fp8 codes with that many float32 scales a token, plus
    the one converted tile in the model dtype (0 where two stages do not fit)."""
    width = r_c + max(rope_dim, 16)
    fixed = BLOCK_M * width * 2 + BLOCK_M * BLOCK_N * 2  # q and P
    if not scale_groups:
        return max(2, min(MAX_STAGES, (SMEM_BUDGET - fixed) // (BLOCK_N * width * 2)))
    fixed += BLOCK_N * r_c * 2
    tile = BLOCK_N * (r_c + max(rope_dim, 16) * 2 + 4 * scale_groups)
    stages = min(MAX_STAGES, (SMEM_LIMIT - fixed) // tile)
    return stages if stages >= 2 else 0

_JIT: dict[str, object] = {}


def _build():
    """The Gluon kernel, defined on first use (importing triton fixes TRITON_INTERPRET; see mla_decode)."""
    if "kernel" in _JIT:
        return _JIT["kernel"]
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )

    @gluon.jit
    def _load_tile(lat_desc, pe_desc, sc_desc, bar, lat_buf, pe_buf, sc_buf, bt_row, start_n, last_page, lat_col,
                   sc_col, PAGE_SIZE: gl.constexpr, COPY_ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                   ROPE_DIM: gl.constexpr, FP8: gl.constexpr, pred):  # fmt: skip
        row_bytes: gl.constexpr = (lat_desc.block_type.shape[1] * lat_desc.dtype.primitive_bitwidth // 8
                                   + ROPE_DIM * pe_desc.dtype.primitive_bitwidth // 8
                                   + (sc_desc.block_type.shape[1] * 4 if FP8 else 0))  # fmt: skip
        mbarrier.expect(bar, BLOCK_N * row_bytes, pred=pred)
        for j in gl.static_range(BLOCK_N // COPY_ROWS):
            pos = start_n + j * COPY_ROWS
            # pages past the sequence's last one are clamped to it (their rows are zeroed later)
            page = gl.load(bt_row + gl.minimum(pos // PAGE_SIZE, last_page), mask=pred, other=0)
            row = page.to(gl.int32) * PAGE_SIZE + pos % PAGE_SIZE
            tma.async_copy_global_to_shared(lat_desc, [row, lat_col], bar, lat_buf.slice(j * COPY_ROWS, COPY_ROWS),
                                            pred=pred)
            if ROPE_DIM > 0:
                tma.async_copy_global_to_shared(pe_desc, [row, 0], bar, pe_buf.slice(j * COPY_ROWS, COPY_ROWS), pred=pred)
            if FP8:
                tma.async_copy_global_to_shared(sc_desc, [row, sc_col], bar, sc_buf.slice(j * COPY_ROWS, COPY_ROWS),
                                                pred=pred)

    @gluon.jit
    def _zero_rows_from(buf, first_bad, WIDTH: gl.constexpr, BLOCK_N: gl.constexpr, num_warps: gl.constexpr):
        """Zero rows >= first_bad of a [BLOCK_N, WIDTH] shared tile, 64 columns at a time."""
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        chunk: gl.constexpr = 64 if WIDTH >= 64 else WIDTH
        rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, blk))
        for j in gl.static_range(WIDTH // chunk):
            part = buf.slice(j * chunk, chunk, dim=1)
            x = part.load(blk)
            part.store(gl.where((rows < first_bad)[:, None], x, gl.zeros_like(x)))

    @gluon.jit
    def _convert_tile(codes_buf, sc_buf, out_buf, valid, R_C: gl.constexpr, GROUP: gl.constexpr,
                      NUM_GROUPS: gl.constexpr, BLOCK_N: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        """out_buf = codes x their group's scale in out_buf's dtype; rows >= valid zero (they may hold
        another sequence's or NaN codes)."""
        chunk: gl.constexpr = 128 if GROUP >= 128 else GROUP
        cv: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // chunk, chunk // 16], [num_warps, 1], [1, 0])
        sc_layout: gl.constexpr = gl.BlockedLayout([1, NUM_GROUPS], [32, 1], [num_warps, 1], [1, 0])
        sc = sc_buf.load(sc_layout)  # [BLOCK_N, NUM_GROUPS] float32
        groups = gl.arange(0, NUM_GROUPS, layout=gl.SliceLayout(0, sc_layout))
        rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, cv))
        keep = (rows < valid)[:, None]
        for j in gl.static_range(R_C // chunk):
            g = j * chunk // GROUP
            scale = gl.sum(gl.where(groups[None, :] == g, sc, 0.0), 1)  # that group's column
            scale = gl.convert_layout(scale, gl.SliceLayout(1, cv))
            x = codes_buf.slice(j * chunk, chunk, dim=1).load(cv).to(gl.float32) * scale[:, None]
            out_buf.slice(j * chunk, chunk, dim=1).store(gl.where(keep, x, 0.0).to(out_buf.dtype))

    @gluon.jit
    def _mla_decode_wgmma_kernel(
        Q,  # [B, SQ, H, R_C + ROPE_DIM]
        lat_desc,  # TMA descriptor over the cache rows' latent columns [num_pages * PAGE_SIZE, LATENT_HEADS * R_C], block [COPY_ROWS, R_C]
        pe_desc,  # same rows, the RoPE columns, block [COPY_ROWS, ROPE_DIM] (unused if ROPE_DIM == 0)
        sc_desc,  # FP8: the rows' float32 scales [rows, groups], block [COPY_ROWS, NUM_GROUPS]; else unused
        BLOCK_TABLE,  # [B, max_pages] int32
        SEQ_LENS,  # [B] int32
        OUT,  # [B, SQ, H, R_C] (DIRECT)
        O_PART,  # [B, SQ, H, num_splits, R_C] float32
        LSE_PART,  # [B, SQ, H, num_splits] float32, log2 domain
        stride_qb, stride_qs, stride_qh, stride_btb, stride_ob, stride_os, stride_oh,
        qk_scale,  # softmax_scale * log2(e)
        num_splits,
        SQ: gl.constexpr, H: gl.constexpr, HG: gl.constexpr, R_C: gl.constexpr, ROPE_DIM: gl.constexpr,
        PAGE_SIZE: gl.constexpr, COPY_ROWS: gl.constexpr, DIRECT: gl.constexpr, NUM_HBLOCKS: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr,
        FP8: gl.constexpr = False,  # the latent is fp8 codes + scales (lat_desc over the codes)
        GROUP: gl.constexpr = 1, NUM_GROUPS: gl.constexpr = 1, SCALE_OFF: gl.constexpr = 0,  # FP8: kernel_groups
    ):  # fmt: skip
        pid_hc = gl.program_id(0)  # latent head * NUM_HBLOCKS + head block (adjacent: L2 reuse)
        c = pid_hc // NUM_HBLOCKS
        hb = pid_hc % NUM_HBLOCKS
        pid_s = gl.program_id(1)
        pid_b = gl.program_id(2)
        dtype: gl.constexpr = Q.dtype.element_ty
        DR: gl.constexpr = ROPE_DIM if ROPE_DIM > 0 else 16  # placeholder width when there is no RoPE part

        # Layouts: scores split over the two warpgroups by key, outputs by latent column.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, num_warps // 4], instr_shape=[16, BLOCK_N // (num_warps // 4), 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, num_warps // 4], instr_shape=[16, R_C // (num_warps // 4), 16]
        )
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        q_lat_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        q_pe_sl: gl.constexpr = gl.NVMMASharedLayout(
            swizzle_byte_width=128 if DR * 2 >= 128 else DR * 2, element_bitwidth=16, rank=2
        )
        p_sl: gl.constexpr = gl.NVMMASharedLayout(
            swizzle_byte_width=128 if BLOCK_N * 2 >= 128 else BLOCK_N * 2, element_bitwidth=16, rank=2
        )

        # ---- query block -> shared memory (rows = (token, head of latent head c) pairs, token-major) ----
        rows_ld = hb * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
        row_ok_ld = rows_ld < SQ * HG
        q_row = Q + pid_b.to(gl.int64) * stride_qb + (rows_ld // HG) * stride_qs + (c * HG + rows_ld % HG) * stride_qh
        cols = gl.arange(0, R_C, layout=gl.SliceLayout(0, ld_layout))
        q_lat = gl.load(q_row[:, None] + cols[None, :], mask=row_ok_ld[:, None], other=0.0)
        q_lat_s = gl.allocate_shared_memory(dtype, [BLOCK_M, R_C], q_lat_sl, q_lat)
        cols_pe = gl.arange(0, DR, layout=gl.SliceLayout(0, ld_layout))
        q_pe = gl.load(q_row[:, None] + R_C + cols_pe[None, :], mask=row_ok_ld[:, None] & (cols_pe[None, :] < ROPE_DIM),
                       other=0.0)  # fmt: skip
        q_pe_s = gl.allocate_shared_memory(dtype, [BLOCK_M, DR], q_pe_sl, q_pe)

        lat_bufs = gl.allocate_shared_memory(lat_desc.dtype, [NUM_STAGES, BLOCK_N, R_C], lat_desc.layout)
        pe_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, DR], pe_desc.layout)
        if FP8:
            sc_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_N, NUM_GROUPS], sc_desc.layout)
            # the converted tile both products read (same layout as q's latent part: 16-bit, 128-byte swizzle)
            tile_s = gl.allocate_shared_memory(dtype, [BLOCK_N, R_C], q_lat_sl)
        else:
            sc_bufs = pe_bufs  # unused
            tile_s = lat_bufs  # unused
        p_s = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N], p_sl)
        bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(bars.index(i), count=1)

        seq_len = gl.load(SEQ_LENS + pid_b)
        split_len = gl.cdiv(gl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        start = pid_s * split_len
        end = gl.minimum(start + split_len, seq_len)
        n_tiles = gl.maximum(gl.cdiv(end - start, BLOCK_N), 0)
        last_page = gl.cdiv(seq_len, PAGE_SIZE) - 1
        bt_row = BLOCK_TABLE + pid_b.to(gl.int64) * stride_btb

        fence_async_shared()  # q's generic-proxy stores and the barrier inits before any async use
        gl.thread_barrier()
        for i in gl.static_range(NUM_STAGES):
            _load_tile(lat_desc, pe_desc, sc_desc, bars.index(i), lat_bufs.index(i), pe_bufs.index(i),
                       sc_bufs.index(i), bt_row, start + i * BLOCK_N, last_page, c * R_C, c * SCALE_OFF, PAGE_SIZE,
                       COPY_ROWS, BLOCK_N, ROPE_DIM, FP8, i < n_tiles)  # fmt: skip

        rows = hb * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        last = gl.minimum(seq_len - SQ + rows // HG, end - 1)  # last key each row may see
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        # an async-wgmma accumulator from the start: the loop carries PV_t in flight to iteration t+1
        acc = warpgroup_mma_init(gl.zeros([BLOCK_M, R_C], gl.float32, o_layout))
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))

        for t in range(n_tiles):
            stage = t % NUM_STAGES
            start_n = start + t * BLOCK_N
            lat = lat_bufs.index(stage)
            pe = pe_bufs.index(stage)
            mbarrier.wait(bars.index(stage), (t // NUM_STAGES) & 1)
            if FP8:
                # PV_{t-1} reads the converted tile: it must be done before the tile is overwritten
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                gl.thread_barrier()
                _convert_tile(lat, sc_bufs.index(stage), tile_s, seq_len - start_n, R_C, GROUP, NUM_GROUPS, BLOCK_N,
                              num_warps)  # fmt: skip
                kv = tile_s
                if ROPE_DIM > 0 and start_n + BLOCK_N > seq_len:
                    _zero_rows_from(pe, seq_len - start_n, DR, BLOCK_N, num_warps)
                fence_async_shared()
                gl.thread_barrier()
            else:
                kv = lat
                if start_n + BLOCK_N > seq_len:  # the sequence's last, partly filled tile
                    _zero_rows_from(lat, seq_len - start_n, R_C, BLOCK_N, num_warps)
                    if ROPE_DIM > 0:
                        _zero_rows_from(pe, seq_len - start_n, DR, BLOCK_N, num_warps)
                    fence_async_shared()
                    gl.thread_barrier()

            s = warpgroup_mma(q_lat_s, kv.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            if ROPE_DIM > 0:
                s = warpgroup_mma(q_pe_s, pe.permute((1, 0)), s, is_async=True)
            if FP8:
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            else:
                # waits for S_t and for PV_{t-1} (issued last iteration, still running until here)
                s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s, acc))
                # both warpgroups are past PV_{t-1}: the previous stage and P may be overwritten
                gl.thread_barrier()
                if t >= 1:
                    prev = (t - 1) % NUM_STAGES
                    _load_tile(lat_desc, pe_desc, sc_desc, bars.index(prev), lat_bufs.index(prev), pe_bufs.index(prev),
                               sc_bufs.index(prev), bt_row, start_n + (NUM_STAGES - 1) * BLOCK_N, last_page, c * R_C,
                               c * SCALE_OFF, PAGE_SIZE, COPY_ROWS, BLOCK_N, ROPE_DIM, FP8,
                               t - 1 + NUM_STAGES < n_tiles)  # fmt: skip

            s = s * qk_scale
            s = gl.where((start_n + keys)[None, :] <= last[:, None], s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            p_s.store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()
            if FP8:  # both warpgroups are past S_t: this stage's codes, scales and RoPE key may be overwritten
                _load_tile(lat_desc, pe_desc, sc_desc, bars.index(stage), lat, pe, sc_bufs.index(stage), bt_row,
                           start_n + NUM_STAGES * BLOCK_N, last_page, c * R_C, c * SCALE_OFF, PAGE_SIZE, COPY_ROWS,
                           BLOCK_N, ROPE_DIM, FP8, t + NUM_STAGES < n_tiles)  # fmt: skip
            acc = warpgroup_mma(p_s, kv, acc, is_async=True)

        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(bars.index(i))

        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        l_safe = gl.where(l_o > 0.0, l_o, 1.0)
        out = acc / l_safe[:, None]
        rows_o = hb * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        row_ok = rows_o < SQ * HG
        cols_o = gl.arange(0, R_C, layout=gl.SliceLayout(0, o_layout))
        tok = rows_o // HG
        head = c * HG + rows_o % HG
        if DIRECT:
            o_row = OUT + pid_b.to(gl.int64) * stride_ob + tok * stride_os + head * stride_oh
            gl.store(o_row[:, None] + cols_o[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
        else:
            part = ((pid_b.to(gl.int64) * SQ + tok) * H + head) * num_splits + pid_s
            m_o = gl.convert_layout(m_i, gl.SliceLayout(1, o_layout))
            lse = gl.where(l_o > 0.0, m_o + gl.log2(l_safe), float("-inf"))
            gl.store(LSE_PART + part, lse, mask=row_ok)
            gl.store(O_PART + part[:, None] * R_C + cols_o[None, :], out, mask=row_ok[:, None])

    _JIT["kernel"] = _mla_decode_wgmma_kernel
    return _mla_decode_wgmma_kernel


_CAPABILITY: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def _has_gluon() -> bool:
    # checked only for CUDA tensors: find_spec of a submodule imports triton (see mla_decode's note)
    if "gluon" not in _JIT:
        _JIT["gluon"] = (
            importlib.util.find_spec("triton") is not None
            and importlib.util.find_spec("triton.experimental.gluon.language.nvidia.hopper") is not None
        )
    return bool(_JIT["gluon"])


def wgmma_supported(q: torch.Tensor, kv_cache: torch.Tensor, latent_heads: int, rope_dim: int) -> bool:
    """Whether ``launch`` can run this call (see the module docstring's scope)."""
    if q.device.type != "cuda" or _capability(q.device)[0] != 9:
        return False
    if not _has_gluon():
        return False
    if q.dtype not in (torch.bfloat16, torch.float16):
        return False
    r_c = q.shape[-1] - rope_dim
    page_size = kv_cache.shape[1]
    pow2 = lambda x: x > 0 and (x & (x - 1)) == 0  # noqa: E731
    return (
        pow2(r_c) and 64 <= r_c <= 512
        and (rope_dim == 0 or (pow2(rope_dim) and 16 <= rope_dim <= 128))
        and pow2(page_size) and page_size >= 16
        and kv_cache.stride(2) == 1 and kv_cache.stride(0) == page_size * kv_cache.stride(1)
        and (kv_cache.stride(1) * kv_cache.element_size()) % 16 == 0
        and kv_cache.data_ptr() % 16 == 0
    )  # fmt: skip


def fp8_groups(quant, latent_heads: int) -> tuple[int, int, int] | None:
    """(GROUP, NUM_GROUPS, SCALE_OFF) under which ``launch`` reads this quantized cache, or None where it
    cannot: fp8 only, a latent head's scales one TMA box (4 or more float32 a token, whole groups of 16
    or more columns), and two tiles in shared memory beside q (at 512 + 64: groups of 128, not 64)."""
    from latentkv.kernels.quantized_pages import kernel_groups

    if quant.kernel.switch != "fp8" or quant.latent_width % latent_heads:
        return None
    r_c = quant.latent_width // latent_heads
    try:
        group, num_groups, scale_off = kernel_groups(quant.fmt, quant.latent_width, latent_heads, r_c)
    except LatentKVError:  # groups straddling latent heads: the Triton kernel's error says what to do
        return None
    # whole groups a latent head, 4 or more: a head's scales (and so every token's) are 16-byte rows
    ok = (num_groups % 4 == 0 and group >= 16 and group * num_groups == r_c
          and quant.codes.is_contiguous() and quant.scales.is_contiguous()
          and num_stages(r_c, quant.rope.shape[-1], num_groups) > 0)  # fmt: skip
    return (group, num_groups, scale_off) if ok else None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[num_pages, page_size, width] -> [num_pages * page_size, width] (a view)."""
    return t.view(t.shape[0] * t.shape[1], t.shape[2]) if t.is_contiguous() else t.flatten(0, 1)


def launch(q, kv_cache, block_table, seq_lens, out, o_part, lse_part, *, rope_dim, softmax_scale, num_splits,
           quant=None):
    """Run the Gluon kernel (inputs already checked by ``mla_decode``; ``wgmma_supported`` is true, and
    with a ``QuantizedPages`` ``quant`` -- ``kv_cache`` then its RoPE key -- ``fp8_groups`` is not None)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    def descriptor(t2d, col0, width, block_cols, dtype):
        base = t2d[:, col0:] if col0 else t2d
        layout = gl.NVMMASharedLayout.get_default_for([copy_rows, block_cols], dtype)
        return TensorDescriptor(base, [t2d.shape[0], width], [t2d.stride(0), 1], [copy_rows, block_cols], layout)

    kernel = _build()
    batch, sq, heads, width = q.shape
    r_c = width - rope_dim
    num_pages, page_size, cache_width = kv_cache.shape
    copy_rows = min(page_size, BLOCK_N)
    gl_dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    dr = rope_dim if rope_dim > 0 else 16
    fp8 = {}
    if quant is None:
        latent_heads = (cache_width - rope_dim) // r_c
        rows2d = _rows(kv_cache)
        lat_desc = descriptor(rows2d, 0, latent_heads * r_c, r_c, gl_dtype)
        pe_desc = descriptor(rows2d, latent_heads * r_c if rope_dim else 0, dr, dr, gl_dtype)
        sc_desc = pe_desc  # unused
        stages = num_stages(r_c, rope_dim)
    else:
        latent_heads = quant.latent_width // r_c
        group, num_groups, scale_off = fp8_groups(quant, latent_heads)
        codes = _rows(quant.codes).view(torch.float8_e4m3fn)
        lat_desc = descriptor(codes, 0, quant.latent_width, r_c, gl.float8e4nv)
        scales = quant.scales.view(num_pages * page_size, -1)
        sc_desc = descriptor(scales, 0, scales.shape[1], num_groups, gl.float32)
        # without a RoPE key, a placeholder of the right dtype that the kernel never reads
        pe_rows = _rows(kv_cache) if rope_dim else torch.zeros(copy_rows, dr, dtype=q.dtype, device=q.device)
        pe_desc = descriptor(pe_rows, 0, dr, dr, gl_dtype)
        stages = num_stages(r_c, rope_dim, scale_groups=num_groups)
        fp8 = {"FP8": True, "GROUP": group, "NUM_GROUPS": num_groups, "SCALE_OFF": scale_off}
    hg = heads // latent_heads
    n_hblocks = -(-(sq * hg) // BLOCK_M)
    return kernel[(latent_heads * n_hblocks, num_splits, batch)](
        q, lat_desc, pe_desc, sc_desc, block_table, seq_lens, out, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2), block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        float(softmax_scale) * 1.4426950408889634, num_splits,
        SQ=sq, H=heads, HG=hg, R_C=r_c, ROPE_DIM=rope_dim, PAGE_SIZE=page_size, COPY_ROWS=copy_rows,
        DIRECT=num_splits == 1, NUM_HBLOCKS=n_hblocks, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        NUM_STAGES=stages, num_warps=8, **fp8,
    )  # fmt: skip
