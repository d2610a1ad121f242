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
``wgmma_supported`` says whether a call qualifies; ``mla_decode.choose_config`` picks this kernel by
default for MLA with >= 64 query rows (fewer rows pad the wgmma's M = 64; GLA measured faster on the
Triton kernel), and otherwise the Triton kernel. The output contract (direct output, or float32 partials + log2-domain LSE merged by the same combine kernel)
is the Triton kernel's. Rows past the sequence's end inside the last tile hold whatever the page
held; they are zeroed in shared memory before use, since ``0 * NaN`` would poison the PV product.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["launch", "wgmma_supported"]

BLOCK_M = 64  # query rows per program: one wgmma M tile
BLOCK_N = 64  # cache rows per tile
SMEM_BUDGET = 220 * 1024  # of the 227 KB a program may use (the rest: barriers, reduction scratch)
MAX_STAGES = 4  # tiles in the shared-memory ring: 2 at r_c 512 + 64 (q + 2 tiles + P = 221 KB), more when narrower


def num_stages(r_c: int, rope_dim: int) -> int:
    width = r_c + max(rope_dim, 16)
    tile = BLOCK_N * width * 2
    free = SMEM_BUDGET - BLOCK_M * width * 2 - BLOCK_M * BLOCK_N * 2  # minus q and P
    return max(2, min(MAX_STAGES, free // tile))

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
    def _load_tile(lat_desc, pe_desc, bar, lat_buf, pe_buf, bt_row, start_n, last_page, lat_col,
                   PAGE_SIZE: gl.constexpr, COPY_ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                   ROPE_DIM: gl.constexpr, pred):  # fmt: skip
        nbytes: gl.constexpr = BLOCK_N * (lat_desc.block_type.shape[1] + ROPE_DIM) * lat_desc.dtype.primitive_bitwidth // 8
        mbarrier.expect(bar, nbytes, pred=pred)
        for j in gl.static_range(BLOCK_N // COPY_ROWS):
            pos = start_n + j * COPY_ROWS
            # pages past the sequence's last one are clamped to it (their rows are zeroed later)
            page = gl.load(bt_row + gl.minimum(pos // PAGE_SIZE, last_page), mask=pred, other=0)
            row = page.to(gl.int32) * PAGE_SIZE + pos % PAGE_SIZE
            tma.async_copy_global_to_shared(lat_desc, [row, lat_col], bar, lat_buf.slice(j * COPY_ROWS, COPY_ROWS),
                                            pred=pred)
            if ROPE_DIM > 0:
                tma.async_copy_global_to_shared(pe_desc, [row, 0], bar, pe_buf.slice(j * COPY_ROWS, COPY_ROWS), pred=pred)

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
    def _mla_decode_wgmma_kernel(
        Q,  # [B, SQ, H, R_C + ROPE_DIM]
        lat_desc,  # TMA descriptor over the cache rows' latent columns [num_pages * PAGE_SIZE, LATENT_HEADS * R_C], block [COPY_ROWS, R_C]
        pe_desc,  # same rows, the RoPE columns, block [COPY_ROWS, ROPE_DIM] (unused if ROPE_DIM == 0)
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
    ):  # fmt: skip
        pid_hc = gl.program_id(0)  # latent head * NUM_HBLOCKS + head block (adjacent: L2 reuse)
        c = pid_hc // NUM_HBLOCKS
        hb = pid_hc % NUM_HBLOCKS
        pid_s = gl.program_id(1)
        pid_b = gl.program_id(2)
        dtype: gl.constexpr = lat_desc.dtype
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

        lat_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, R_C], lat_desc.layout)
        pe_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, DR], pe_desc.layout)
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
            _load_tile(lat_desc, pe_desc, bars.index(i), lat_bufs.index(i), pe_bufs.index(i), bt_row,
                       start + i * BLOCK_N, last_page, c * R_C, PAGE_SIZE, COPY_ROWS, BLOCK_N, ROPE_DIM,
                       i < n_tiles)  # fmt: skip

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
            if start_n + BLOCK_N > seq_len:  # the sequence's last, partly filled tile
                _zero_rows_from(lat, seq_len - start_n, R_C, BLOCK_N, num_warps)
                if ROPE_DIM > 0:
                    _zero_rows_from(pe, seq_len - start_n, DR, BLOCK_N, num_warps)
                fence_async_shared()
                gl.thread_barrier()

            s = warpgroup_mma(q_lat_s, lat.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            if ROPE_DIM > 0:
                s = warpgroup_mma(q_pe_s, pe.permute((1, 0)), s, is_async=True)
            # waits for S_t and for PV_{t-1} (issued last iteration, still running until here)
            s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s, acc))
            # both warpgroups are past PV_{t-1}: the previous stage and P may be overwritten
            gl.thread_barrier()
            if t >= 1:
                prev = (t - 1) % NUM_STAGES
                _load_tile(lat_desc, pe_desc, bars.index(prev), lat_bufs.index(prev), pe_bufs.index(prev), bt_row,
                           start_n + (NUM_STAGES - 1) * BLOCK_N, last_page, c * R_C, PAGE_SIZE, COPY_ROWS, BLOCK_N,
                           ROPE_DIM, t - 1 + NUM_STAGES < n_tiles)  # fmt: skip

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
            acc = warpgroup_mma(p_s, lat, acc, is_async=True)

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


def launch(q, kv_cache, block_table, seq_lens, out, o_part, lse_part, *, rope_dim, softmax_scale, num_splits):
    """Run the Gluon kernel (inputs already checked by ``mla_decode``; ``wgmma_supported`` is true)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    kernel = _build()
    batch, sq, heads, width = q.shape
    r_c = width - rope_dim
    num_pages, page_size, cache_width = kv_cache.shape
    latent_heads = (cache_width - rope_dim) // r_c
    copy_rows = min(page_size, BLOCK_N)
    gl_dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    rows2d = kv_cache.view(num_pages * page_size, cache_width) if kv_cache.is_contiguous() else kv_cache.flatten(0, 1)
    lat_layout = gl.NVMMASharedLayout.get_default_for([copy_rows, r_c], gl_dtype)
    lat_desc = TensorDescriptor(rows2d, [rows2d.shape[0], latent_heads * r_c], [rows2d.stride(0), 1], [copy_rows, r_c],
                                lat_layout)  # fmt: skip
    dr = rope_dim if rope_dim > 0 else 16
    pe_base = rows2d[:, latent_heads * r_c :] if rope_dim > 0 else rows2d
    pe_layout = gl.NVMMASharedLayout.get_default_for([copy_rows, dr], gl_dtype)
    pe_desc = TensorDescriptor(pe_base, [rows2d.shape[0], dr], [rows2d.stride(0), 1], [copy_rows, dr], pe_layout)
    hg = heads // latent_heads
    n_hblocks = -(-(sq * hg) // BLOCK_M)
    return kernel[(latent_heads * n_hblocks, num_splits, batch)](
        q, lat_desc, pe_desc, block_table, seq_lens, out, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2), block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        float(softmax_scale) * 1.4426950408889634, num_splits,
        SQ=sq, H=heads, HG=hg, R_C=r_c, ROPE_DIM=rope_dim, PAGE_SIZE=page_size, COPY_ROWS=copy_rows,
        DIRECT=num_splits == 1, NUM_HBLOCKS=n_hblocks, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        NUM_STAGES=num_stages(r_c, rope_dim), num_warps=8,
    )  # fmt: skip
