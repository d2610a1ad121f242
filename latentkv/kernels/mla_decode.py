"""One decode step of absorbed MLA / GLA attention over a paged latent cache (Triton).

The query is already in latent space (W_UK folded into it), so each query head attends with
one vector of width ``r_c + rope_dim`` against a cache row ``[latent_0 | ... | latent_{h_c-1} | k_rope]``
and its output stays in latent space (W_UV is applied afterwards by the caller):

    s_h(t)  = scale * (q_h[:r_c] . latent_c(t) + q_h[r_c:] . k_rope(t))
    o_h     = sum_t softmax(s_h)(t) * latent_c(t)            c = h // (H // h_c)

MLA is ``latent_heads == 1`` (DeepSeek / FlashMLA: r_c = 512, rope_dim = 64); GLA splits the
latent into ``latent_heads`` contiguous column groups, each serving its own contiguous group of
query heads, with one shared RoPE key. ``Sq > 1`` query tokens (speculative decoding) are
causal among themselves: token i sits at position ``seq_len - Sq + i``.

Kernel shape (the design this code follows):
- every query row that shares one latent head -- (query token, head) pairs -- goes into the M
  dimension of one ``tl.dot``; a ``[BLOCK_N, r_c]`` latent tile is loaded once and used as the
  key (``q @ tile^T``) and as the value (``p @ tile``). That turns MLA decode from a
  matrix-vector into a matrix-matrix problem;
- online softmax in float32 (base 2, ``log2 e`` folded into the scale);
- wide latents (r_c > 512): ``DecodeConfig.out_splits`` splits the output columns over adjacent
  programs; each computes the full scores of its tiles but accumulates (and loads as value) only
  its column slice, so its float32 accumulator shrinks by that factor;
- split-KV: grid ``(latent_heads * head_blocks * column_slices, splits, batch)``; with one split the kernel
  writes the normalised output directly, otherwise each split writes a float32 partial output
  and its log-sum-exp and ``_mla_decode_combine_kernel`` merges them (or, with
  ``DecodeConfig.fuse_combine``, the last split to finish merges them in the same launch);
- quantized latents (``QuantizedPages``): fp8 / int4 codes stay exact in the model dtype, as
  [groups, BLOCK_N, group width] tiles; batched dots over the groups give per-group scores that the
  token's group scales (and int4 zero-points) weight in float32, and the probabilities times each
  group's scale multiply that group's codes (``SCALED_DOTS``); narrow groups dequantize the tile;
  fp8 with at most 4 groups a tile can instead take one plain 2-D dot per group (``GROUP_DOTS``,
  ``DecodeConfig.group_dots``).
Block sizes per shape: ``default_config`` (tuned on an H100; numbers in NOTES.md).

Order in this file (Triton tutorial order): kernels, launcher, reference, facade and helpers.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
from dataclasses import dataclass, replace

import torch

from latentkv.errors import LatentKVError
from latentkv.kernels.quantized_pages import QuantizedPages, kernel_groups

# triton is an optional dependency (extra "kernels") and is imported on the first launch, not
# here: TRITON_INTERPRET is read when triton is imported, so importing latentkv.kernels (the
# model code does) must not fix the mode before a CPU test has set it. ``_kernels()`` imports
# triton, binds the module globals ``triton`` / ``tl`` that the kernel bodies use, and applies
# ``triton.jit`` to the two functions below.
HAS_TRITON = importlib.util.find_spec("triton") is not None
triton = None
tl = None

log = logging.getLogger(__name__)

__all__ = [
    "DecodeConfig",
    "WGMMA_CONFIG",
    "choose_config",
    "choose_num_splits",
    "decode_attention",
    "default_config",
    "mla_decode",
    "mla_decode_reference",
    "output_slices",
    "programs_per_split",
    "write_paged",
]

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
def _load_latent_tile(  # triton.jit applied by _kernels() (bound as _latent_tile)
    KV, LAT_CODES, LAT_SCALES,
    kv_row,  # [BLOCK_N] element offsets of the cache rows in KV
    page, slot,  # [BLOCK_N] or scalar page and [BLOCK_N] slot of each row (KV_QUANT only)
    n_ok,  # [BLOCK_N] rows inside the split
    c,  # latent head
    col0,  # first column of the tile within the latent head
    stride_cp, stride_ct, stride_sp, stride_st,
    R_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,  # columns of the tile (a power of 2)
    MASK_COLS: tl.constexpr,  # some columns of the tile lie past R_C
    KV_QUANT: tl.constexpr,
    GROUP: tl.constexpr,  # KV_QUANT: columns a scale covers
    SUB: tl.constexpr,  # fp8: columns per [.., SUB] piece of the 3-D view, min(GROUP, BLOCK_C)
    NUM_SUB: tl.constexpr,  # fp8: BLOCK_C // SUB
    SCALE_OFF: tl.constexpr,
    SCALE_FIELDS: tl.constexpr,
):
    """[BLOCK_N, BLOCK_C] columns col0 .. col0 + BLOCK_C of latent head c of the cache rows: the cache's
    values (plain), or float32 dequantized values (fp8 / int4); columns past R_C read as 0."""
    offs_c = col0 + tl.arange(0, BLOCK_C)
    # Column masks only where the width is not a power of 2: a mask that varies along the
    # contiguous dim stops 16-byte vector loads (and with them cp.async pipelining).
    if MASK_COLS:
        c_ok = offs_c[None, :] < R_C
    else:
        c_ok = tl.full([1, BLOCK_C], 1, tl.int1)
    if KV_QUANT == "":
        kv = tl.load(KV + kv_row[:, None] + (c * R_C + offs_c)[None, :], mask=n_ok[:, None] & c_ok, other=0.0)
    elif KV_QUANT == "fp8":
        # ---- fp8 latent: the code tile is loaded once and dequantized in registers, viewed as
        # [BLOCK_N, NUM_SUB, SUB] so each token's group scale broadcasts along its columns
        g_cols = col0 + tl.arange(0, NUM_SUB) * SUB  # first column of each piece within the latent head
        in_group = tl.arange(0, SUB)
        if MASK_COLS:
            code_ok = n_ok[:, None, None] & ((g_cols[:, None] + in_group[None, :]) < R_C)[None, :, :]
        else:
            code_ok = n_ok[:, None, None]
        codes = tl.load(LAT_CODES + (page * stride_cp + slot * stride_ct)[:, None, None]
                        + (c * R_C + g_cols[:, None] + in_group[None, :])[None, :, :],
                        mask=code_ok, other=0)  # uint8 [BLOCK_N, NUM_SUB, SUB]
        scale_at = (LAT_SCALES + (page * stride_sp + slot * stride_st)[:, None]
                    + ((c * SCALE_OFF + g_cols // GROUP) * SCALE_FIELDS)[None, :])  # [BLOCK_N, NUM_SUB]
        scale = tl.load(scale_at, mask=n_ok[:, None] & (g_cols < R_C)[None, :], other=0.0).to(tl.float32)
        values = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, :, None]
        kv = tl.reshape(values, [BLOCK_N, BLOCK_C])
    else:
        # ---- int4 latent: two codes a byte, lowest nibble first; asymmetric, code * scale + zero.
        # Each column reads its byte and its group's scale and zero-point (repeated addresses are
        # served by L1), so the tile is built in its [BLOCK_N, BLOCK_C] layout directly.
        col_ok = n_ok[:, None] & c_ok
        byte = tl.load(LAT_CODES + (page * stride_cp + slot * stride_ct)[:, None] + ((c * R_C + offs_c) // 2)[None, :],
                       mask=col_ok, other=0).to(tl.int32)
        nibble = (byte >> ((offs_c % 2) * 4)[None, :]) & 15
        scale_at = (LAT_SCALES + (page * stride_sp + slot * stride_st)[:, None]
                    + ((c * SCALE_OFF + offs_c // GROUP) * SCALE_FIELDS)[None, :])  # [BLOCK_N, BLOCK_C]
        scale = tl.load(scale_at, mask=col_ok, other=0.0).to(tl.float32)
        zero = tl.load(scale_at + 1, mask=col_ok, other=0.0).to(tl.float32)
        kv = nibble.to(tl.float32) * scale + zero
    return kv


def _load_fp8_groups(  # triton.jit applied by _kernels() (bound as _fp8_groups)
    LAT_CODES, LAT_SCALES,
    page, slot,  # [BLOCK_N] or scalar page and [BLOCK_N] slot of each row
    n_ok,  # [BLOCK_N] rows inside the split
    c,  # latent head
    col0,  # first column of the tile within the latent head
    stride_cp, stride_ct, stride_sp, stride_st,
    R_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PIECE: tl.constexpr,  # columns of a piece: min(GROUP, tile width); every piece lies in one group
    NUM_PIECES: tl.constexpr,  # pieces of the tile
    MASK_COLS: tl.constexpr,  # some columns of the tile lie past R_C
    GROUP: tl.constexpr,
    SCALE_OFF: tl.constexpr,
    SCALE_FIELDS: tl.constexpr,
):
    """fp8 codes of columns col0 .. col0 + NUM_PIECES * PIECE of latent head c as [NUM_PIECES, BLOCK_N,
    PIECE] float8e4nv (the contiguous columns innermost; columns past R_C and rows outside the split
    read as 0) and each piece's float32 scale per row, [NUM_PIECES, BLOCK_N] (0 outside the split).
    Nothing is dequantized: the scales go to the scores and the probabilities (see the split kernel)."""
    p_cols = col0 + tl.arange(0, NUM_PIECES) * PIECE  # first column of each piece within the latent head
    in_piece = tl.arange(0, PIECE)
    cols = p_cols[:, None, None] + in_piece[None, None, :]  # [NUM_PIECES, 1, PIECE]
    if MASK_COLS:
        code_ok = n_ok[None, :, None] & (cols < R_C)
    else:
        code_ok = n_ok[None, :, None]
    row_at = (page * stride_cp + slot * stride_ct)[None, :, None]  # [1, BLOCK_N, 1]
    codes = tl.load(LAT_CODES + row_at + c * R_C + cols, mask=code_ok, other=0)  # uint8
    scale_at = (LAT_SCALES + (page * stride_sp + slot * stride_st)[None, :]
                + ((c * SCALE_OFF + p_cols // GROUP) * SCALE_FIELDS)[:, None])  # [NUM_PIECES, BLOCK_N]
    scale = tl.load(scale_at, mask=n_ok[None, :] & (p_cols < R_C)[:, None], other=0.0).to(tl.float32)
    return codes.to(tl.float8e4nv, bitcast=True), scale


def _load_int4_groups(  # triton.jit applied by _kernels() (bound as _int4_groups)
    LAT_CODES, LAT_SCALES,
    page, slot, n_ok, c, col0,  # as _load_fp8_groups
    stride_cp, stride_ct, stride_sp, stride_st,
    R_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PIECE: tl.constexpr,  # columns of a piece: min(GROUP, tile width); every piece lies in one group
    NUM_PIECES: tl.constexpr,
    MASK_COLS: tl.constexpr,
    GROUP: tl.constexpr,
    SCALE_OFF: tl.constexpr,
    SCALE_FIELDS: tl.constexpr,
):
    """int4 codes of columns col0 .. col0 + NUM_PIECES * PIECE of latent head c, split by the nibble order
    (two codes a byte, lowest nibble first): the even columns (low nibbles) and the odd columns (high
    nibbles), each [NUM_PIECES, BLOCK_N, PIECE // 2] float32, and each piece's float32 scale and zero-point
    per row, [NUM_PIECES, BLOCK_N] (0 outside the split). The codes come centred, code - 8 in -8..7 (exact in
    any dtype), with the zero-point moved to zero + 8 * scale: the value is the same, and the two terms the
    kernel sums apart, p x scale x code and p x zero, are about half as large, so the rounding of p x scale
    to the model dtype costs half as much. Columns past R_C read as code -8 (q is 0 there, and those output
    columns are not stored)."""
    p_cols = col0 + tl.arange(0, NUM_PIECES) * PIECE  # first column of each piece within the latent head (even)
    pair = tl.arange(0, PIECE // 2)
    cols = p_cols[:, None, None] + 2 * pair[None, None, :]  # [NUM_PIECES, 1, PIECE // 2] even columns
    if MASK_COLS:  # R_C is even: an even column inside R_C has its odd neighbour inside too
        code_ok = n_ok[None, :, None] & (cols < R_C)
    else:
        code_ok = n_ok[None, :, None]
    row_at = (page * stride_cp + slot * stride_ct)[None, :, None]  # [1, BLOCK_N, 1]
    byte = tl.load(LAT_CODES + row_at + (c * R_C + cols) // 2, mask=code_ok, other=0)  # uint8
    scale_at = (LAT_SCALES + (page * stride_sp + slot * stride_st)[None, :]
                + ((c * SCALE_OFF + p_cols // GROUP) * SCALE_FIELDS)[:, None])  # [NUM_PIECES, BLOCK_N]
    g_ok = n_ok[None, :] & (p_cols < R_C)[:, None]
    scale = tl.load(scale_at, mask=g_ok, other=0.0).to(tl.float32)
    zero = tl.load(scale_at + 1, mask=g_ok, other=0.0).to(tl.float32)
    lo = (byte & 15).to(tl.float32) - 8.0
    hi = (byte >> 4).to(tl.float32) - 8.0
    return lo, hi, scale, zero + 8.0 * scale


def _load_fp8_group(  # triton.jit applied by _kernels() (bound as _fp8_group)
    LAT_CODES, LAT_SCALES,
    page, slot,  # [BLOCK_N] or scalar page and [BLOCK_N] slot of each row
    n_ok,  # [BLOCK_N] rows inside the split
    c,  # latent head
    g,  # group of the tile (its columns g * GROUP .. (g + 1) * GROUP within the latent head)
    stride_cp, stride_ct, stride_sp, stride_st,
    R_C: tl.constexpr,
    GROUP: tl.constexpr,
    MASK_COLS: tl.constexpr,  # some columns of the tile lie past R_C
    SCALE_OFF: tl.constexpr,
    SCALE_FIELDS: tl.constexpr,
):
    """fp8 codes of group g of latent head c as plain 2-D float8e4nv tiles, [BLOCK_N, GROUP] (for the value
    dot) and [GROUP, BLOCK_N] (for the score dot), columns past R_C and rows outside the split read as 0,
    and the group's float32 scale per row, [BLOCK_N] (0 outside the split). No scale in the tiles, no 3-D
    view, no reshape: the caller converts them to the model dtype at the dots (``_up``; exact)."""
    cols = g * GROUP + tl.arange(0, GROUP)
    row_at = page * stride_cp + slot * stride_ct  # [BLOCK_N]
    if MASK_COLS:
        code_ok = n_ok[:, None] & (cols < R_C)[None, :]
    else:
        code_ok = n_ok[:, None]
    codes = tl.load(LAT_CODES + row_at[:, None] + (c * R_C + cols)[None, :], mask=code_ok, other=0)  # uint8
    codes = codes.to(tl.float8e4nv, bitcast=True)
    # the same codes as [GROUP, BLOCK_N] for the score dot (its second operand, columns on K): a load of
    # its own, so that each load has one user and goes through the software pipeline (the second read
    # of the bytes is served by L2)
    codes_t = tl.load(LAT_CODES + row_at[None, :] + (c * R_C + cols)[:, None], mask=tl.trans(code_ok), other=0)
    codes_t = codes_t.to(tl.float8e4nv, bitcast=True)
    scale_at = LAT_SCALES + page * stride_sp + slot * stride_st + (c * SCALE_OFF + g) * SCALE_FIELDS
    scale = tl.load(scale_at, mask=n_ok & (g * GROUP < R_C), other=0.0).to(tl.float32)
    return codes, codes_t, scale


def _upcast_codes(  # triton.jit applied by _kernels() (bound as _up)
    codes,  # float8e4nv tile
    Q,  # the query pointer: its element type is the model dtype
    UPCAST_DOT: tl.constexpr,
):
    """fp8 codes in the model dtype (exact), at the dot that reads them: converted after the layout change
    of the dot operand, so the 8-bit tile is what the pipeline stages in shared memory."""
    x = codes.to(Q.dtype.element_ty)
    if UPCAST_DOT:
        x = x.to(tl.float32)
    return x


def _load_q_group(  # triton.jit applied by _kernels() (bound as _q_group)
    q_row,  # [BLOCK_M] pointers to the query rows
    row_ok,  # [BLOCK_M]
    g,  # group: columns g * GROUP .. (g + 1) * GROUP
    R_C: tl.constexpr,
    GROUP: tl.constexpr,
    MASK_COLS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """[BLOCK_M, GROUP] columns of group g of the query rows (0 past R_C)."""
    cols = g * GROUP + tl.arange(0, GROUP)
    if MASK_COLS:
        ok = row_ok[:, None] & (cols < R_C)[None, :]
    else:
        ok = row_ok[:, None]
    qg = tl.load(q_row[:, None] + cols[None, :], mask=ok, other=0.0)
    if UPCAST_DOT:
        qg = qg.to(tl.float32)
    return qg


def _mla_decode_split_kernel(  # triton.jit applied by _kernels()
    Q,  # [B, SQ, H, R_C + ROPE_DIM], last dim contiguous
    KV,  # [num_pages, PAGE_SIZE, LATENT_HEADS * R_C + ROPE_DIM], last dim contiguous
    BLOCK_TABLE,  # [B, max_pages] int32, or [B, LATENT_HEADS, max_pages] with HEAD_TABLES
    SEQ_LENS,  # [B] int32 (includes the SQ new tokens)
    OUT,  # [B, SQ, H, R_C] (written when DIRECT)
    O_PART,  # [B, SQ, H, num_splits, R_C] float32 (written unless DIRECT)
    LSE_PART,  # [NUM_OSPLITS, B, SQ, H, num_splits] float32, log2 domain (one copy per column slice)
    SEMAPHORE,  # [B * LATENT_HEADS * NUM_HBLOCKS * NUM_OSPLITS] int32 zeros (FUSE_COMBINE only; left at zero)
    CHUNK_LSE,  # [B, n_chunks, SQ, H] float32, log2 domain (MASSES only): log2 sum_t exp2(s(t)) per chunk
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kvp,
    stride_kvt,
    stride_btb,
    stride_btc,  # a latent head's row of a [B, LATENT_HEADS, max_pages] table (HEAD_TABLES only)
    stride_ob,
    stride_os,
    stride_oh,
    qk_scale,  # softmax_scale * log2(e)
    num_splits,  # runtime: changing the split count does not recompile
    n_chunks,  # block table columns * PAGE_SIZE // CHUNK (MASSES only)
    softcap,  # tanh cap of the scores (SOFTCAP only): s = softcap * tanh(scale * q.k / softcap)
    window,  # a query sees only the last `window` positions (WINDOW only)
    LAT_CODES,  # [num_pages, PAGE_SIZE, code bytes] uint8 (KV_QUANT only; KV then holds the RoPE key alone)
    LAT_SCALES,  # [num_pages, PAGE_SIZE, groups, SCALE_FIELDS]: fp8 float32 scale; int4 float16 scale, zero
    stride_cp,
    stride_ct,
    stride_sp,
    stride_st,
    SQ: tl.constexpr,
    H: tl.constexpr,
    HG: tl.constexpr,  # query heads per latent head
    R_C: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    ROPE_OFF: tl.constexpr,  # column of the RoPE key = LATENT_HEADS * R_C
    PAGE_SIZE: tl.constexpr,
    DIRECT: tl.constexpr,  # num_splits == 1: write the normalised output, skip the combine
    NUM_HBLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: its tl.dot multiplies bf16 bit patterns
    KV_ON_M: tl.constexpr,  # put cache rows on the MMA's M side (few query rows per latent head)
    FUSE_COMBINE: tl.constexpr,  # the last split to finish merges the partials (no second launch)
    MASSES: tl.constexpr,  # also write CHUNK_LSE (per-page attention masses; off: the kernel is unchanged)
    CHUNK: tl.constexpr,  # tokens per CHUNK_LSE entry: min(BLOCK_N, PAGE_SIZE), one divides the other
    SOFTCAP: tl.constexpr = False,  # soft-capped scores (Gemma 2); off: the kernel is unchanged
    WINDOW: tl.constexpr = False,  # sliding-window attention; off: the kernel is unchanged
    KV_QUANT: tl.constexpr = "",  # "fp8" / "int4": the latent is read as codes and scales; "": the kernel is unchanged
    GROUP: tl.constexpr = 1,  # KV_QUANT: columns per scale group within a tile (a power of 2)
    NUM_GROUPS: tl.constexpr = 1,  # KV_QUANT: BLOCK_R // GROUP
    SCALE_OFF: tl.constexpr = 0,  # KV_QUANT: latent head c's first group is c * SCALE_OFF
    SCALE_FIELDS: tl.constexpr = 1,  # KV_QUANT: values stored per group (fp8: scale; int4: scale, zero)
    NUM_OSPLITS: tl.constexpr = 1,  # programs splitting the output columns (> 1: wide latents)
    BLOCK_O: tl.constexpr = 16,  # output columns per program: BLOCK_R // out_splits
    OGROUP: tl.constexpr = 1,  # fp8: min(GROUP, BLOCK_O), the 3-D view of a value slice
    ONUM_GROUPS: tl.constexpr = 1,  # fp8: BLOCK_O // OGROUP
    SCALED_DOTS: tl.constexpr = False,  # fp8 (GROUP >= 16), int4 (GROUP >= 32): scales on scores / probabilities
    P_SCALE: tl.constexpr = 1.0,  # SCALED_DOTS / GROUP_DOTS: power of 2 on p * scale (fp16: out of the subnormals)
    GROUP_DOTS: tl.constexpr = False,  # fp8, NUM_GROUPS <= 4, no KV_ON_M, one output slice: a 2-D dot per group
    HEAD_TABLES: tl.constexpr = False,  # each latent head reads its own row of the block table; off: unchanged
):
    # program_id(0) = (latent head * NUM_HBLOCKS + head block) * NUM_OSPLITS + column slice: the
    # programs that read one cache tile are adjacent, so they run together and share it in L2
    pid_x = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    if NUM_OSPLITS > 1:
        pid_o = pid_x % NUM_OSPLITS
        pid_hc = pid_x // NUM_OSPLITS
    else:
        pid_o = 0
        pid_hc = pid_x
    c = pid_hc // NUM_HBLOCKS
    hb = pid_hc % NUM_HBLOCKS

    # M rows = (query token, head of this latent group) pairs, token-major.
    rows = hb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < SQ * HG
    tok = rows // HG
    head = c * HG + rows % HG
    offs_r = tl.arange(0, BLOCK_R)
    # Column masks only where the width is not a power of 2: a mask that varies along the
    # contiguous dim stops 16-byte vector loads (and with them cp.async pipelining).
    if BLOCK_R == R_C:
        r_ok = tl.full([1, BLOCK_R], 1, tl.int1)
    else:
        r_ok = offs_r[None, :] < R_C
    # output columns of this program: all of them, or slice pid_o of a wide latent (the scores
    # still take every column; only the value product and the accumulator are sliced)
    if NUM_OSPLITS > 1:
        offs_v = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        if BLOCK_O * NUM_OSPLITS == R_C:
            v_ok = tl.full([1, BLOCK_O], 1, tl.int1)
        else:
            v_ok = offs_v[None, :] < R_C
    else:
        offs_v = offs_r
        v_ok = r_ok

    q_row = Q + pid_b.to(tl.int64) * stride_qb + tok * stride_qs + head * stride_qh
    if SCALED_DOTS and KV_QUANT == "int4":
        # the even and the odd columns of q as [NUM_GROUPS, BLOCK_M, GROUP // 2], as the code tiles
        # (low and high nibbles), and the float32 sum of each group's columns (for the zero-points)
        g_cols = (tl.arange(0, NUM_GROUPS) * GROUP)[:, None, None] + 2 * tl.arange(0, GROUP // 2)[None, None, :]
        if BLOCK_R == R_C:
            q_ok = row_ok[None, :, None]
        else:
            q_ok = row_ok[None, :, None] & (g_cols < R_C)
        q = tl.load(q_row[None, :, None] + g_cols, mask=q_ok, other=0.0)
        q_hi = tl.load(q_row[None, :, None] + g_cols + 1, mask=q_ok, other=0.0)
        q_sum = tl.sum(q.to(tl.float32) + q_hi.to(tl.float32), 2)  # [NUM_GROUPS, BLOCK_M]
        if UPCAST_DOT:
            q_hi = q_hi.to(tl.float32)
    elif SCALED_DOTS:
        # q as [NUM_GROUPS, BLOCK_M, GROUP], the layout of the code tiles: one batched dot gives every
        # group's partial scores, which its scale weights before the sum over groups
        g_cols = (tl.arange(0, NUM_GROUPS) * GROUP)[:, None, None] + tl.arange(0, GROUP)[None, None, :]
        if BLOCK_R == R_C:
            q_ok = row_ok[None, :, None]
        else:
            q_ok = row_ok[None, :, None] & (g_cols < R_C)
        q = tl.load(q_row[None, :, None] + g_cols, mask=q_ok, other=0.0)
    elif GROUP_DOTS:
        # q split by group once: [BLOCK_M, GROUP] pieces, one per group's 2-D score dot
        tl.static_assert(NUM_GROUPS <= 4)
        q = _q_group(q_row, row_ok, 0, R_C, GROUP, BLOCK_R != R_C, UPCAST_DOT)
        if NUM_GROUPS > 1:
            q_1 = _q_group(q_row, row_ok, 1, R_C, GROUP, BLOCK_R != R_C, UPCAST_DOT)
        if NUM_GROUPS > 2:
            q_2 = _q_group(q_row, row_ok, 2, R_C, GROUP, BLOCK_R != R_C, UPCAST_DOT)
            q_3 = _q_group(q_row, row_ok, 3, R_C, GROUP, BLOCK_R != R_C, UPCAST_DOT)
    else:
        q = tl.load(q_row[:, None] + offs_r[None, :], mask=row_ok[:, None] & r_ok, other=0.0)
    if ROPE_DIM > 0:
        offs_dr = tl.arange(0, BLOCK_DR)
        if BLOCK_DR == ROPE_DIM:
            dr_ok = tl.full([1, BLOCK_DR], 1, tl.int1)
        else:
            dr_ok = offs_dr[None, :] < ROPE_DIM
        q_pe = tl.load(q_row[:, None] + R_C + offs_dr[None, :], mask=row_ok[:, None] & dr_ok, other=0.0)
        if UPCAST_DOT:
            q_pe = q_pe.to(tl.float32)
    if UPCAST_DOT and not GROUP_DOTS:
        q = q.to(tl.float32)

    seq_len = tl.load(SEQ_LENS + pid_b)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * split_len
    end = tl.minimum(start + split_len, seq_len)
    # last key position each row may see: causal among the SQ new tokens, clipped to the split
    last = tl.minimum(seq_len - SQ + tok, end - 1)
    if WINDOW:
        first = seq_len - SQ + tok - window + 1  # the window's first key position of each row

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SCALED_DOTS and KV_QUANT == "int4":  # even and odd columns apart, and p . zero-point per group
        if KV_ON_M:
            acc = tl.zeros([ONUM_GROUPS, OGROUP // 2, BLOCK_M], dtype=tl.float32)
            acc_hi = tl.zeros([ONUM_GROUPS, OGROUP // 2, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([ONUM_GROUPS, BLOCK_M, OGROUP // 2], dtype=tl.float32)
            acc_hi = tl.zeros([ONUM_GROUPS, BLOCK_M, OGROUP // 2], dtype=tl.float32)
        acc_z = tl.zeros([ONUM_GROUPS, BLOCK_M], dtype=tl.float32)
    elif SCALED_DOTS:  # one accumulator per group of output columns, [groups, columns, rows] with KV_ON_M
        if KV_ON_M:
            acc = tl.zeros([ONUM_GROUPS, OGROUP, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([ONUM_GROUPS, BLOCK_M, OGROUP], dtype=tl.float32)
    elif GROUP_DOTS:  # one [BLOCK_M, GROUP] accumulator per group
        acc = tl.zeros([BLOCK_M, GROUP], dtype=tl.float32)
        if NUM_GROUPS > 1:
            acc_1 = tl.zeros([BLOCK_M, GROUP], dtype=tl.float32)
        if NUM_GROUPS > 2:
            acc_2 = tl.zeros([BLOCK_M, GROUP], dtype=tl.float32)
            acc_3 = tl.zeros([BLOCK_M, GROUP], dtype=tl.float32)
    elif KV_ON_M:
        acc = tl.zeros([BLOCK_O, BLOCK_M], dtype=tl.float32)  # o^T
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    bt_row = BLOCK_TABLE + pid_b.to(tl.int64) * stride_btb
    if HEAD_TABLES:  # latent head c attends its own pages (a sparse choice per latent head)
        bt_row += c * stride_btc
    if MASSES:
        # [B, n_chunks, SQ, H]: the rows of one chunk are adjacent, so the stores coalesce
        lse_rows = CHUNK_LSE + pid_b.to(tl.int64) * n_chunks * (SQ * H) + tok * H + head  # [BLOCK_M]
        if NUM_OSPLITS > 1:
            # the column slices hold the same scores: the first writes them
            mass_ok = row_ok & ((tok * 0 + pid_o) == 0)
        else:
            mass_ok = row_ok

    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        if PAGE_SIZE % BLOCK_N == 0:
            # the tile lies in one page (splits and tiles start at multiples of BLOCK_N)
            page = tl.load(bt_row + start_n // PAGE_SIZE).to(tl.int64)
        else:
            page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        kv_row = page * stride_kvp + (offs_n % PAGE_SIZE) * stride_kvt  # [BLOCK_N] element offsets
        slot = offs_n % PAGE_SIZE
        if SCALED_DOTS and KV_QUANT == "int4":
            # int4 codes as even / odd column tiles [groups, BLOCK_N, GROUP // 2] of the model dtype (-8..7,
            # exact) and their scales and zero-points [groups, BLOCK_N]
            codes, codes_hi, scale, zero = _int4_groups(
                LAT_CODES, LAT_SCALES, page, slot, n_ok, c, 0, stride_cp, stride_ct, stride_sp, stride_st, R_C,
                BLOCK_N, GROUP, NUM_GROUPS, BLOCK_R != R_C, GROUP, SCALE_OFF, SCALE_FIELDS)
            if not UPCAST_DOT:
                codes = codes.to(Q.dtype.element_ty)
                codes_hi = codes_hi.to(Q.dtype.element_ty)
            if NUM_OSPLITS > 1:  # this program's value columns (from L2, as below)
                codes_v, codes_hi_v, scale_v, zero_v = _int4_groups(
                    LAT_CODES, LAT_SCALES, page, slot, n_ok, c, pid_o * BLOCK_O, stride_cp, stride_ct, stride_sp,
                    stride_st, R_C, BLOCK_N, OGROUP, ONUM_GROUPS, BLOCK_O * NUM_OSPLITS != R_C, GROUP, SCALE_OFF,
                    SCALE_FIELDS)
                if not UPCAST_DOT:
                    codes_v = codes_v.to(Q.dtype.element_ty)
                    codes_hi_v = codes_hi_v.to(Q.dtype.element_ty)
            else:
                codes_v, codes_hi_v, scale_v, zero_v = codes, codes_hi, scale, zero
        elif SCALED_DOTS:
            # fp8 codes as [groups, BLOCK_N, GROUP] tiles of the model dtype (every e4m3 value is exact
            # there) and their scales [groups, BLOCK_N]: no dequantized float32 tile, no reshape
            codes, scale = _fp8_groups(LAT_CODES, LAT_SCALES, page, slot, n_ok, c, 0, stride_cp, stride_ct, stride_sp,
                                       stride_st, R_C, BLOCK_N, GROUP, NUM_GROUPS, BLOCK_R != R_C, GROUP, SCALE_OFF,
                                       SCALE_FIELDS)
            codes = codes.to(Q.dtype.element_ty)
            if UPCAST_DOT:
                codes = codes.to(tl.float32)
            if NUM_OSPLITS > 1:  # this program's value columns (from L2, as below)
                codes_v, scale_v = _fp8_groups(LAT_CODES, LAT_SCALES, page, slot, n_ok, c, pid_o * BLOCK_O, stride_cp,
                                               stride_ct, stride_sp, stride_st, R_C, BLOCK_N, OGROUP, ONUM_GROUPS,
                                               BLOCK_O * NUM_OSPLITS != R_C, GROUP, SCALE_OFF, SCALE_FIELDS)
                codes_v = codes_v.to(Q.dtype.element_ty)
                if UPCAST_DOT:
                    codes_v = codes_v.to(tl.float32)
            else:
                codes_v, scale_v = codes, scale
            scale_v = scale_v * P_SCALE
        elif GROUP_DOTS:
            # each group's fp8 codes as its own [BLOCK_N, GROUP] tile of the model dtype and its scales
            kv, kv_t, scale = _fp8_group(LAT_CODES, LAT_SCALES, page, slot, n_ok, c, 0, stride_cp, stride_ct,
                                         stride_sp, stride_st, R_C, GROUP, BLOCK_R != R_C, SCALE_OFF, SCALE_FIELDS)
            if NUM_GROUPS > 1:
                kv_1, kv_t_1, scale_1 = _fp8_group(LAT_CODES, LAT_SCALES, page, slot, n_ok, c, 1, stride_cp,
                                                   stride_ct, stride_sp, stride_st, R_C, GROUP, BLOCK_R != R_C,
                                                   SCALE_OFF, SCALE_FIELDS)
            if NUM_GROUPS > 2:
                kv_2, kv_t_2, scale_2 = _fp8_group(LAT_CODES, LAT_SCALES, page, slot, n_ok, c, 2, stride_cp,
                                                   stride_ct, stride_sp, stride_st, R_C, GROUP, BLOCK_R != R_C,
                                                   SCALE_OFF, SCALE_FIELDS)
                kv_3, kv_t_3, scale_3 = _fp8_group(LAT_CODES, LAT_SCALES, page, slot, n_ok, c, 3, stride_cp,
                                                   stride_ct, stride_sp, stride_st, R_C, GROUP, BLOCK_R != R_C,
                                                   SCALE_OFF, SCALE_FIELDS)
        else:
            # [BLOCK_N, BLOCK_R] latent tile: loaded once, used as key (and as value unless the output
            # columns are split)
            kv = _latent_tile(KV, LAT_CODES, LAT_SCALES, kv_row, page, slot, n_ok, c, 0,
                              stride_cp, stride_ct, stride_sp, stride_st, R_C, BLOCK_N, BLOCK_R, BLOCK_R != R_C,
                              KV_QUANT, GROUP, GROUP, NUM_GROUPS, SCALE_OFF, SCALE_FIELDS)
            if KV_QUANT != "":
                kv = kv.to(Q.dtype.element_ty)  # as the reference rounds it
            kv_d = kv
            if UPCAST_DOT:
                kv_d = kv.to(tl.float32)
            if NUM_OSPLITS > 1:
                # this program's value columns: the same rows again (from L2 -- the adjacent programs
                # read the tile at the same time), BLOCK_O columns wide
                kv_v = _latent_tile(KV, LAT_CODES, LAT_SCALES, kv_row, page, slot, n_ok, c, pid_o * BLOCK_O,
                                    stride_cp, stride_ct, stride_sp, stride_st, R_C, BLOCK_N, BLOCK_O,
                                    BLOCK_O * NUM_OSPLITS != R_C, KV_QUANT, GROUP, OGROUP, ONUM_GROUPS, SCALE_OFF,
                                    SCALE_FIELDS)
                kv_v = kv_v.to(Q.dtype.element_ty)
                if UPCAST_DOT:
                    kv_v = kv_v.to(tl.float32)
            else:
                kv_v = kv_d
        if ROPE_DIM > 0:
            k_pe = tl.load(
                KV + kv_row[:, None] + (ROPE_OFF + offs_dr)[None, :],
                mask=n_ok[:, None] & dr_ok,
                other=0.0,
            )
            if UPCAST_DOT:
                k_pe = k_pe.to(tl.float32)
        if KV_ON_M:
            # cache rows on the M side: s^T = tile @ q^T, o^T += tile^T @ p^T (no padding of
            # the MMA's M when a latent head serves few query rows)
            if SCALED_DOTS and KV_QUANT == "int4":  # + zero x (sum of q's group columns)
                s = tl.dot(codes_hi, tl.trans(q_hi, (0, 2, 1)), tl.dot(codes, tl.trans(q, (0, 2, 1))))
                s = tl.sum(s * scale[:, :, None] + zero[:, :, None] * q_sum[:, None, :], 0)
            elif SCALED_DOTS:  # sum over groups of scale x (codes . q): [BLOCK_N, BLOCK_M]
                s = tl.sum(tl.dot(codes, tl.trans(q, (0, 2, 1))) * scale[:, :, None], 0)
            else:
                s = tl.dot(kv_d, tl.trans(q))  # [BLOCK_N, BLOCK_M]
            if ROPE_DIM > 0:
                s = tl.dot(k_pe, tl.trans(q_pe), s)
            if SOFTCAP:  # cap * tanh(x / cap), tanh(y) = 2 sigmoid(2y) - 1; qk_scale = scale * log2(e)
                s = (2.0 * tl.sigmoid(2.0 * s * (qk_scale / 1.4426950408889634) / softcap) - 1.0) * (softcap * 1.4426950408889634)
            else:
                s = s * qk_scale
            seen = offs_n[:, None] <= last[None, :]
            if WINDOW:
                seen = seen & (offs_n[:, None] >= first[None, :])
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[None, :])
            p_sum = tl.sum(p, 0)
            l_i = l_i * alpha + p_sum
            if MASSES:
                if BLOCK_N != CHUNK:  # several pages per tile: [BLOCK_M, BLOCK_N // CHUNK] page sums
                    c_sum = tl.trans(tl.sum(tl.reshape(p, [BLOCK_N // CHUNK, CHUNK, BLOCK_M]), 1))
            if SCALED_DOTS:  # o_g^T += codes_g^T @ (p x scale_g)^T per group of output columns
                acc = acc * alpha[None, None, :]
                p_g = (p[None, :, :] * scale_v[:, :, None]).to(Q.dtype.element_ty)  # [groups, BLOCK_N, BLOCK_M]
                if UPCAST_DOT:
                    p_g = p_g.to(tl.float32)
                acc = tl.dot(tl.trans(codes_v, (0, 2, 1)), p_g, acc)
                if KV_QUANT == "int4":  # odd columns; the zero-point adds p . zero to every column
                    acc_hi = tl.dot(tl.trans(codes_hi_v, (0, 2, 1)), p_g, acc_hi * alpha[None, None, :])
                    acc_z = acc_z * alpha[None, :] + tl.sum(p[None, :, :] * zero_v[:, :, None], 1)
            else:
                acc = acc * alpha[None, :]
                p_d = p.to(kv.dtype)  # rounded to the cache dtype, as the tensor cores take it
                if UPCAST_DOT:
                    p_d = p_d.to(tl.float32)
                acc = tl.dot(tl.trans(kv_v), p_d, acc)
        else:
            if SCALED_DOTS and KV_QUANT == "int4":  # + zero x (sum of q's group columns)
                s = tl.dot(q_hi, tl.trans(codes_hi, (0, 2, 1)), tl.dot(q, tl.trans(codes, (0, 2, 1))))
                s = tl.sum(s * scale[:, None, :] + q_sum[:, :, None] * zero[:, None, :], 0)
            elif SCALED_DOTS:  # sum over groups of scale x (q . codes): [BLOCK_M, BLOCK_N]
                s = tl.sum(tl.dot(q, tl.trans(codes, (0, 2, 1))) * scale[:, None, :], 0)
            elif GROUP_DOTS:  # sum over groups of scale_g x (q_g . codes_g), 2-D dots
                s = tl.dot(q, _up(kv_t, Q, UPCAST_DOT)) * scale[None, :]
                if NUM_GROUPS > 1:
                    s += tl.dot(q_1, _up(kv_t_1, Q, UPCAST_DOT)) * scale_1[None, :]
                if NUM_GROUPS > 2:
                    s += tl.dot(q_2, _up(kv_t_2, Q, UPCAST_DOT)) * scale_2[None, :]
                    s += tl.dot(q_3, _up(kv_t_3, Q, UPCAST_DOT)) * scale_3[None, :]
            else:
                s = tl.dot(q, tl.trans(kv_d))  # [BLOCK_M, BLOCK_N]
            if ROPE_DIM > 0:
                s = tl.dot(q_pe, tl.trans(k_pe), s)
            if SOFTCAP:
                s = (2.0 * tl.sigmoid(2.0 * s * (qk_scale / 1.4426950408889634) / softcap) - 1.0) * (softcap * 1.4426950408889634)
            else:
                s = s * qk_scale
            seen = offs_n[None, :] <= last[:, None]
            if WINDOW:
                seen = seen & (offs_n[None, :] >= first[:, None])
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            p_sum = tl.sum(p, 1)
            l_i = l_i * alpha + p_sum
            if MASSES:
                if BLOCK_N != CHUNK:
                    c_sum = tl.sum(tl.reshape(p, [BLOCK_M, BLOCK_N // CHUNK, CHUNK]), 2)
            if SCALED_DOTS:  # o_g += (p x scale_g) @ codes_g per group of output columns
                acc = acc * alpha[None, :, None]
                p_g = (p[None, :, :] * scale_v[:, None, :]).to(Q.dtype.element_ty)  # [groups, BLOCK_M, BLOCK_N]
                if UPCAST_DOT:
                    p_g = p_g.to(tl.float32)
                acc = tl.dot(p_g, codes_v, acc)
                if KV_QUANT == "int4":  # odd columns; the zero-point adds p . zero to every column
                    acc_hi = tl.dot(p_g, codes_hi_v, acc_hi * alpha[None, :, None])
                    acc_z = acc_z * alpha[None, :] + tl.sum(p[None, :, :] * zero_v[:, None, :], 2)
            elif GROUP_DOTS:  # o_g += (p x scale_g) @ codes_g, rounded to the model dtype as the MMAs take it
                p_g = (p * (scale * P_SCALE)[None, :]).to(Q.dtype.element_ty)
                if UPCAST_DOT:
                    p_g = p_g.to(tl.float32)
                acc = tl.dot(p_g, _up(kv, Q, UPCAST_DOT), acc * alpha[:, None])
                if NUM_GROUPS > 1:
                    p_g = (p * (scale_1 * P_SCALE)[None, :]).to(Q.dtype.element_ty)
                    if UPCAST_DOT:
                        p_g = p_g.to(tl.float32)
                    acc_1 = tl.dot(p_g, _up(kv_1, Q, UPCAST_DOT), acc_1 * alpha[:, None])
                if NUM_GROUPS > 2:
                    p_g = (p * (scale_2 * P_SCALE)[None, :]).to(Q.dtype.element_ty)
                    if UPCAST_DOT:
                        p_g = p_g.to(tl.float32)
                    acc_2 = tl.dot(p_g, _up(kv_2, Q, UPCAST_DOT), acc_2 * alpha[:, None])
                    p_g = (p * (scale_3 * P_SCALE)[None, :]).to(Q.dtype.element_ty)
                    if UPCAST_DOT:
                        p_g = p_g.to(tl.float32)
                    acc_3 = tl.dot(p_g, _up(kv_3, Q, UPCAST_DOT), acc_3 * alpha[:, None])
            else:
                acc = acc * alpha[:, None]
                p_d = p.to(kv.dtype)
                if UPCAST_DOT:
                    p_d = p_d.to(tl.float32)
                acc = tl.dot(p_d, kv_v, acc)
        if MASSES:
            # log2 of each chunk's sum of exp2(score), relative to the running max m_use: the
            # masses kernel normalises them with the row's final log-sum-exp afterwards
            if BLOCK_N == CHUNK:  # the tile is the chunk: its sum is the one the softmax took
                seen = p_sum > 0.0  # else no visible key in the chunk: -inf (log2 of a dummy 1)
                c_lse = tl.where(seen, m_use + tl.log2(tl.where(seen, p_sum, 1.0)), float("-inf"))
                tl.store(lse_rows + (start_n // CHUNK) * (SQ * H), c_lse, mask=mass_ok)
            else:
                seen = c_sum > 0.0
                c_lse = tl.where(seen, m_use[:, None] + tl.log2(tl.where(seen, c_sum, 1.0)), float("-inf"))
                chunk = start_n // CHUNK + tl.arange(0, BLOCK_N // CHUNK)
                tl.store(
                    lse_rows[:, None] + chunk[None, :] * (SQ * H),
                    c_lse,
                    mask=mass_ok[:, None] & (chunk < n_chunks)[None, :],  # the last tile may pass the table
                )
        m_i = m_new

    if SCALED_DOTS:  # [groups, rows, columns] (or [groups, columns, rows]) -> [BLOCK_M, BLOCK_O], once
        if KV_ON_M:
            acc = tl.permute(acc, (0, 2, 1))
            if KV_QUANT == "int4":
                acc_hi = tl.permute(acc_hi, (0, 2, 1))
        if KV_QUANT == "int4":  # interleave the even and odd columns, add the zero-point terms
            acc = tl.reshape(tl.join(acc + acc_z[:, :, None], acc_hi + acc_z[:, :, None]),
                             [ONUM_GROUPS, BLOCK_M, OGROUP])
        acc = tl.reshape(tl.permute(acc, (1, 0, 2)), [BLOCK_M, BLOCK_O])
        if P_SCALE != 1.0:
            acc = acc * (1.0 / P_SCALE)
    elif GROUP_DOTS:  # the groups' accumulators side by side as [BLOCK_M, BLOCK_R], once
        if NUM_GROUPS == 2:
            acc = tl.reshape(tl.permute(tl.join(acc, acc_1), (0, 2, 1)), [BLOCK_M, BLOCK_R])
        if NUM_GROUPS == 4:  # join(join(0, 1), join(2, 3))[m, j, x, y] is group 2y + x
            acc = tl.join(tl.join(acc, acc_1), tl.join(acc_2, acc_3))
            acc = tl.reshape(tl.permute(acc, (0, 3, 2, 1)), [BLOCK_M, BLOCK_R])
        if P_SCALE != 1.0:
            acc = acc * (1.0 / P_SCALE)
    elif KV_ON_M:
        acc = tl.trans(acc)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if DIRECT:
        o_row = OUT + pid_b.to(tl.int64) * stride_ob + tok * stride_os + head * stride_oh
        tl.store(
            o_row[:, None] + offs_v[None, :],
            out.to(OUT.dtype.element_ty),
            mask=row_ok[:, None] & v_ok,
        )
    else:
        part = ((pid_b.to(tl.int64) * SQ + tok) * H + head) * num_splits + pid_s  # [BLOCK_M]
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        if NUM_OSPLITS > 1:
            # every column slice computes the same scores, so the same log-sum-exp; each writes its
            # own copy (the fused merge below reads only what its own slice's programs wrote)
            lse_part = LSE_PART + pid_o * (tl.num_programs(2) * (SQ * H) * num_splits)
        else:
            lse_part = LSE_PART
        tl.store(lse_part + part, lse, mask=row_ok)
        tl.store(O_PART + part[:, None] * R_C + offs_v[None, :], out, mask=row_ok[:, None] & v_ok)
        if FUSE_COMBINE:
            # Split-K "last block reduces": the CTA's stores are ordered before a release
            # atomic (barrier + acq_rel by one thread, CUTLASS's semaphore pattern); the CTA
            # that draws the last ticket acquires and merges every split of its rows.
            tl.debug_barrier()
            sem = SEMAPHORE + pid_b * tl.num_programs(0) + pid_x
            ticket = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
            if ticket == num_splits - 1:
                row0 = part - pid_s
                m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
                den = tl.zeros([BLOCK_M], dtype=tl.float32)
                final = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
                for s_i in range(0, num_splits):
                    lse_s = tl.load(lse_part + row0 + s_i, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                    o_s = tl.load(
                        O_PART + (row0 + s_i)[:, None] * R_C + offs_v[None, :],
                        mask=row_ok[:, None] & v_ok,
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    m_new = tl.maximum(m_run, lse_s)
                    m_u = tl.where(m_new == float("-inf"), 0.0, m_new)
                    a = tl.exp2(m_run - m_u)
                    b = tl.exp2(lse_s - m_u)
                    final = final * a[:, None] + o_s * b[:, None]
                    den = den * a + b
                    m_run = m_new
                final = final / tl.where(den > 0.0, den, 1.0)[:, None]
                o_row = OUT + pid_b.to(tl.int64) * stride_ob + tok * stride_os + head * stride_oh
                tl.store(
                    o_row[:, None] + offs_v[None, :],
                    final.to(OUT.dtype.element_ty),
                    mask=row_ok[:, None] & v_ok,
                )
                tl.atomic_xchg(sem, 0)  # leave the counter at zero for the next call


def _mla_decode_combine_kernel(  # triton.jit applied by _kernels()
    O_PART,  # [B, SQ, H, num_splits, R_C] float32
    LSE_PART,  # [B, SQ, H, num_splits] float32 (log2 domain)
    OUT,  # [B, SQ, H, R_C]
    stride_ob,
    stride_os,
    stride_oh,
    num_splits,
    SQ: tl.constexpr,
    H: tl.constexpr,
    R_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)  # one (batch, token, head) row
    b = pid // (SQ * H)
    tok = (pid // H) % SQ
    head = pid % H
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    offs_r = tl.arange(0, BLOCK_R)
    if BLOCK_R == R_C:
        r_ok = tl.full([BLOCK_R], 1, tl.int1)  # constant mask keeps the accesses vectorised
    else:
        r_ok = offs_r < R_C
    base = pid.to(tl.int64) * num_splits
    lse = tl.load(LSE_PART + base + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # 0 for empty splits and padding
    o = tl.load(
        O_PART + (base + offs_s)[:, None] * R_C + offs_r[None, :],
        mask=s_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    den = tl.sum(w, 0)
    den = tl.where(den > 0.0, den, 1.0)
    out = tl.sum(o * w[:, None], 0) / den
    o_ptr = OUT + b.to(tl.int64) * stride_ob + tok * stride_os + head * stride_oh + offs_r
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=r_ok)


def _mla_decode_masses_kernel(  # triton.jit applied by _kernels()
    CHUNK_LSE,  # [B, n_chunks, SQ, H] float32, log2 domain (written by the split kernel)
    SEQ_LENS,  # [B] int32
    MASSES,  # [B, SQ, LATENT_HEADS, max_pages] float32
    n_chunks,
    max_pages,
    SQ: tl.constexpr,
    H: tl.constexpr,
    HG: tl.constexpr,
    LATENT_HEADS: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS_PER_PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr,  # >= HG, power of 2
    BLOCK_C: tl.constexpr,  # chunks per iteration of the first pass
    BLOCK_P: tl.constexpr,  # pages per iteration of the second pass
):
    """masses[b, tok, c, j] = mean over the query heads h of latent head c of
    sum_{chunks of page j} exp2(chunk_lse - lse_h), lse_h = log2 sum_{all chunks} exp2(chunk_lse)."""
    pid = tl.program_id(0)  # one (batch, token, latent head)
    b = pid // (SQ * LATENT_HEADS)
    tok = (pid // LATENT_HEADS) % SQ
    c = pid % LATENT_HEADS
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HG
    rows = CHUNK_LSE + b.to(tl.int64) * n_chunks * (SQ * H) + tok * H + c * HG + offs_h  # [BLOCK_H]
    n_valid = tl.cdiv(tl.load(SEQ_LENS + b), CHUNK)  # chunks past the length were never written
    # pass 1: each head's log-sum-exp over every chunk (online, as the softmax)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_H], dtype=tl.float32)
    for c0 in range(0, n_valid, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(rows[:, None] + ch[None, :] * (SQ * H), mask=h_ok[:, None] & (ch < n_valid)[None, :],
                    other=float("-inf"))  # [BLOCK_H, BLOCK_C]
        m_new = tl.maximum(m, tl.max(x, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        den = den * tl.exp2(m - m_use) + tl.sum(tl.exp2(x - m_use[:, None]), 1)
        m = m_new
    lse = tl.where(den > 0.0, m + tl.log2(tl.where(den > 0.0, den, 1.0)), 0.0)
    # pass 2: normalise, average over the heads, pool the chunks of each page; every column written
    out = MASSES + pid.to(tl.int64) * max_pages
    for p0 in range(0, max_pages, BLOCK_P):
        page = p0 + tl.arange(0, BLOCK_P)
        acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        for k in tl.static_range(CHUNKS_PER_PAGE):
            ch = page * CHUNKS_PER_PAGE + k
            x = tl.load(rows[:, None] + ch[None, :] * (SQ * H), mask=h_ok[:, None] & (ch < n_valid)[None, :],
                        other=float("-inf"))  # [BLOCK_H, BLOCK_P]
            acc += tl.sum(tl.exp2(x - lse[:, None]), 0)
        tl.store(out + page, acc / HG, mask=page < max_pages)


_JIT: dict[str, object] = {}
_latent_tile = None  # triton.jit(_load_latent_tile), bound by _kernels(): the split kernel calls it by this name
_fp8_groups = None  # triton.jit(_load_fp8_groups), likewise
_int4_groups = None  # triton.jit(_load_int4_groups), likewise


def _kernels():
    """(split kernel, combine kernel), jitted on first use (see the note at the imports)."""
    global triton, tl, _latent_tile, _fp8_groups, _int4_groups, _fp8_group, _q_group, _up
    if not _JIT:
        import triton as _triton
        import triton.language as _tl

        triton, tl = _triton, _tl
        _latent_tile = triton.jit(_load_latent_tile)
        _fp8_groups = triton.jit(_load_fp8_groups)
        _int4_groups = triton.jit(_load_int4_groups)
        _fp8_group = triton.jit(_load_fp8_group)
        _q_group = triton.jit(_load_q_group)
        _up = triton.jit(_upcast_codes)
        _JIT["split"] = triton.jit(_mla_decode_split_kernel)
        _JIT["combine"] = triton.jit(_mla_decode_combine_kernel)
        _JIT["masses"] = triton.jit(_mla_decode_masses_kernel)
    return _JIT["split"], _JIT["combine"]


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeConfig:
    """Block sizes of the split kernel.

    block_m: query rows ((token, head) pairs of one latent head) per program; power of 2, >= 16.
    block_n: cache rows per tile; power of 2, >= 16.
    num_warps / num_stages: Triton's warps per program and software-pipelining depth.
    kv_on_m: compute s^T = tile q^T and o^T += tile^T p^T, so the cache rows, not the query rows,
        fill the MMA's M dimension (Hopper's wgmma needs M = 64; 32 query heads would pad).
    fuse_combine: with splits, the last split program to finish merges the partial results
        (an atomic ticket per (batch, head block)) instead of a second kernel launch.
    maxnreg: register cap per thread (e.g. 128 lets two 8-warp programs share an SM).
    ctas_per_sm: programs of this config resident per SM (from registers / shared memory as
        compiled); only used to choose the number of splits.
    out_splits: split the latent's output columns over this many programs (a power of 2; each
        program's slice, BLOCK_R // out_splits columns, at least 16). Every program of a (head block,
        KV split) computes the full scores of its cache tiles but accumulates only its slice of the
        output, so the float32 accumulator a program holds shrinks by this factor: for wide latents
        (r_c > 512), whose [block_m, r_c] accumulator and query block do not fit the registers
        together. The programs of one tile are adjacent in the grid and read it through L2. Slices
        entirely past r_c are not launched.
    dequant_tile: quantized caches: dequantize each tile of codes to a [block_n, width] tile in registers
        and use it in the plain dots. Off (the default), fp8 groups of at least 16 columns and int4 groups
        of at least 32 keep the codes exact in the model dtype and apply the scales (and int4's
        zero-points) to the scores and the probabilities instead, through batched dots over the groups
        (narrower groups always take the dequantized tile).
    group_dots: fp8 caches: one plain 2-D dot per scale group and tile, each group's codes loaded as their
        own [block_n, group width] tile of the model dtype; the group's scale weights its partial scores
        and p x scale multiplies its codes into that group's accumulator. Taken where it applies (groups of
        16 or more columns, at most 4 groups a tile, no kv_on_m, one output slice); elsewhere the call
        falls back to the path ``dequant_tile`` selects.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    kv_on_m: bool = False
    fuse_combine: bool = False
    maxnreg: int | None = None
    ctas_per_sm: int = 1
    kernel: str = "triton"  # "wgmma": the Gluon Hopper kernel (mla_decode_wgmma; fixed 64 x 64 tiles, 8 warps)
    out_splits: int = 1
    dequant_tile: bool = False
    group_dots: bool = False


# The Gluon kernel's only configuration (block sizes are fixed by its layouts; see its module).
WGMMA_CONFIG = DecodeConfig(block_m=64, block_n=64, num_warps=8, num_stages=2, kernel="wgmma")


_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MIN_SPLIT_LEN = 256  # do not split a sequence into pieces shorter than this many keys
_MAX_SPLITS = 64


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def output_slices(r_c: int, out_splits: int) -> tuple[int, int]:
    """(columns per program, programs) of the output of one latent head of width ``r_c`` split
    ``out_splits`` ways (``DecodeConfig.out_splits``): slices of BLOCK_R // out_splits columns, and as
    many as hold columns below r_c."""
    block_r = max(16, _next_pow2(r_c))
    if not isinstance(out_splits, int) or out_splits < 1 or out_splits & (out_splits - 1):
        raise LatentKVError(f"DecodeConfig.out_splits must be a power of 2 (1, 2, 4, ...); got {out_splits!r}.")
    if block_r // out_splits < 16:
        raise LatentKVError(f"DecodeConfig.out_splits={out_splits} leaves fewer than 16 of the {block_r} latent "
                            f"columns (r_c = {r_c}) to a program; use at most {block_r // 16}.")
    block_o = block_r // out_splits
    return block_o, -(-r_c // block_o)


def programs_per_split(batch: int, latent_heads: int, rows: int, r_c: int, cfg: DecodeConfig) -> int:
    """Programs of the split kernel per KV split (``choose_num_splits``' first argument): batch x latent
    heads x head blocks of ``cfg.block_m`` query rows x output column slices."""
    slices = 1 if cfg.kernel == "wgmma" else output_slices(r_c, cfg.out_splits)[1]
    return batch * latent_heads * -(-rows // cfg.block_m) * slices


def _check_inputs(q, kv_cache, block_table, seq_lens, latent_heads, rope_dim) -> tuple[int, int, int, int, int]:
    """Shape / dtype checks shared by kernel and reference; returns (B, Sq, H, r_c, page_size)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise LatentKVError(
            f"q must be a 4-d tensor [batch, query_len, heads, r_c + rope_dim]; got shape "
            f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}."
        )
    if not isinstance(kv_cache, (torch.Tensor, QuantizedPages)) or kv_cache.dim() != 3:
        raise LatentKVError(
            "kv_cache must be a 3-d tensor [num_pages, page_size, latent_heads * r_c + rope_dim]; got shape "
            f"{tuple(kv_cache.shape) if isinstance(kv_cache, torch.Tensor) else type(kv_cache).__name__}."
        )
    if q.dtype not in _SUPPORTED_DTYPES or kv_cache.dtype != q.dtype:
        raise LatentKVError(
            f"q and kv_cache must share one dtype among bfloat16, float16, float32; got q {q.dtype}, "
            f"kv_cache {kv_cache.dtype}. Cast the query to the cache dtype."
        )
    if block_table.dim() not in (2, 3) or block_table.dtype != torch.int32:
        raise LatentKVError(
            f"block_table must be an int32 tensor [batch, max_pages] (or [batch, latent_heads, max_pages]: a "
            f"table per latent head); got {block_table.dtype} of shape {tuple(block_table.shape)}. "
            "Use block_table.to(torch.int32)."
        )
    if seq_lens.dim() != 1 or seq_lens.dtype != torch.int32:
        raise LatentKVError(
            f"seq_lens must be a 1-d int32 tensor [batch]; got {seq_lens.dtype} of shape {tuple(seq_lens.shape)}. "
            "Use seq_lens.to(torch.int32)."
        )
    batch, sq, heads, width = q.shape
    if batch < 1 or sq < 1 or heads < 1:
        raise LatentKVError(f"q has an empty dimension: shape {tuple(q.shape)}.")
    if block_table.shape[0] != batch or seq_lens.shape[0] != batch:
        raise LatentKVError(
            f"batch sizes disagree: q has {batch}, block_table {block_table.shape[0]}, seq_lens {seq_lens.shape[0]}."
        )
    if not isinstance(latent_heads, int) or latent_heads < 1:
        raise LatentKVError(f"latent_heads must be a positive int; got {latent_heads!r}.")
    if block_table.dim() == 3 and block_table.shape[1] != latent_heads:
        raise LatentKVError(
            f"a 3-d block_table holds one row of pages per latent head, [batch, latent_heads={latent_heads}, "
            f"max_pages]; got shape {tuple(block_table.shape)}. Give every latent head a row (the same pages "
            "for all heads: a 2-d table [batch, max_pages])."
        )
    if not isinstance(rope_dim, int) or rope_dim < 0:
        raise LatentKVError(f"rope_dim must be a non-negative int; got {rope_dim!r}.")
    if heads % latent_heads:
        raise LatentKVError(
            f"{heads} query heads cannot be split evenly over latent_heads={latent_heads}; "
            "each latent head serves a contiguous group of H // latent_heads query heads."
        )
    r_c = width - rope_dim
    if r_c < 1:
        raise LatentKVError(f"q's last dim {width} leaves no latent part after rope_dim={rope_dim}.")
    if kv_cache.shape[2] != latent_heads * r_c + rope_dim:
        raise LatentKVError(
            f"kv_cache width {kv_cache.shape[2]} != latent_heads * r_c + rope_dim = {latent_heads} * {r_c} + "
            f"{rope_dim} (r_c = q width {width} - rope_dim). Check latent_heads and rope_dim."
        )
    for name, t in (("kv_cache", kv_cache), ("block_table", block_table), ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise LatentKVError(f"{name} is on {t.device} but q is on {q.device}; put all inputs on one device.")
    page_size = kv_cache.shape[1]
    if seq_lens.device.type == "cpu":  # value checks only where they cost no device sync
        lo, hi = int(seq_lens.min()), int(seq_lens.max())
        if lo < sq:
            raise LatentKVError(
                f"seq_lens must include the {sq} new query tokens (every length >= query_len); smallest is {lo}. "
                "Write the new tokens into the cache before attending."
            )
        if hi > block_table.shape[-1] * page_size:
            raise LatentKVError(
                f"a sequence of length {hi} needs more than the block table's {block_table.shape[-1]} pages of "
                f"{page_size}; grow block_table."
            )
    return batch, sq, heads, r_c, page_size


def default_config(rows: int, r_c: int, rope_dim: int, dtype: torch.dtype, device=None, *,
                   kv_quant: str = "") -> DecodeConfig:
    """Block sizes for ``rows`` query rows per latent head and latent width ``r_c``: the measured
    table of the GPU family of ``device`` where it covers the shape (``latentkv.kernels.tuning``;
    measured on plain caches, so not for a quantized one: ``kv_quant`` "fp8" / "int4"), else the
    rules below (tuned on an H100 at r_c = 512, estimates elsewhere).

    BLOCK_M x BLOCK_R float32 accumulators live in registers: keep them at most 32K elements
    (128 registers a thread at 8 warps), so BLOCK_M <= 64 at r_c = 512 and <= 128 at r_c = 256.
    Shared memory holds the query block plus the pipelined cache tiles (about two tiles at
    num_stages 5 or 2, one at 3); keep the estimate under ~200 KB of the 227 KB a program may use.
    Measurements behind the choices: latentkv/kernels/NOTES.md and benchmarks/decode_h100.md.

    Wide latents (r_c > 512, a 1024-column block): at 16 or more query rows the [32, 1024] float32
    accumulator and the tiles take every register (255 a thread and spills at 8 warps on an H100).
    The rules shrink block_m to 16 first (two programs share each cache tile through L2; no score is
    computed twice) and split the output columns (``DecodeConfig.out_splits``) only where 16 rows
    still do not fit: a quantized tile (dequantized in registers), float32 caches, latents wider
    than 1024. Each choice compiles without spills for sm_90a (``scripts/kernel_registers.py``).
    Timed on an H100: 16 rows x 64 columns of cache per tile, 8 warps, 2 stages is the fastest
    candidate at 960 + 64 and 1024 + 64 (benchmarks/decode_widths_h100.md).
    """
    block_r = max(16, _next_pow2(r_c))
    block_dr = max(16, _next_pow2(rope_dim)) if rope_dim > 0 else 0
    elt = torch.finfo(dtype).bits // 8
    if device is not None and not kv_quant:
        from latentkv.kernels import tuning

        fields = tuning.tuned_config(device, rows, r_c, rope_dim, elt)
        if fields is not None:
            return DecodeConfig(**fields)
    row_bytes = (block_r + block_dr) * elt
    if block_r >= 1024:
        if kv_quant == "int4":  # per-column scale and zero-point loads: the heaviest tile in registers
            return DecodeConfig(block_m=16, block_n=16, num_warps=8, num_stages=2, out_splits=block_r // 256)
        if kv_quant or elt == 4:
            return DecodeConfig(block_m=16, block_n=16, num_warps=8, num_stages=3 if elt == 2 else 2,
                                out_splits=block_r // 512)
        if block_r == 1024 and block_dr <= 64:
            # measured on an H100 at 960 + 64 and 1024 + 64, 16 and 32 rows: the fastest of the tuner's
            # candidates at both widths (698 us against 780 us at block_n 32, num_stages 3)
            return DecodeConfig(block_m=16, block_n=64, num_warps=8, num_stages=2)
        if block_r == 1024:
            return DecodeConfig(block_m=16, block_n=32, num_warps=8, num_stages=3)
        return DecodeConfig(block_m=16, block_n=16, num_warps=8, num_stages=2, out_splits=block_r // 512)
    block_m = max(16, min(_next_pow2(rows), 128, max(16, 32768 // block_r)))
    if kv_quant == "int4":
        # int4 tiles dequantized in registers load a scale and a zero-point per column: narrow tiles over
        # 8 warps were the fastest of a block_n x warps x stages grid on an H100 at 512 + 64 (2.1 ms
        # against 4.8 ms). The batched-dot path (groups of >= 32, scales on the scores) at the same
        # configuration: 1990 us against 2122 us for the dequantized tile (H100, g32, 32 rows).
        return DecodeConfig(block_m=block_m, block_n=16, num_warps=8, num_stages=2)
    if kv_quant == "fp8":
        # Timed on an H100 at 512 + 64, g128, 32 rows, batch 64, context 8192: the batched-dot path
        # (scales on the scores) 1331 us at 32 x 32, 8 warps, 4 stages; the dequantized tile 741 us at
        # that configuration and 427 us at the plain cache's rule (bf16: 232 us). fp8 reads the
        # dequantized tile at the plain rules; DecodeConfig(dequant_tile=False) selects the other path.
        # The 2-D dots per group (group_dots) at the same shape: 501 us at 32 x 16, 4 warps, 7 stages and
        # 538 us at 32 x 32, 8 warps, 5 stages (bf16 224 us, dequantized tile 427 us in the same run).
        return replace(default_config(rows, r_c, rope_dim, dtype), dequant_tile=True)
    if elt == 2 and block_r == 512 and block_m <= 32:
        # MLA with few heads per latent head (memory-bound): mma.sync tiles, 4 warps, two
        # 36 KB tiles in flight; 255 regs x 128 threads and 112 KB smem -> 2 programs per SM.
        return DecodeConfig(block_m=block_m, block_n=32, num_warps=4, num_stages=5, ctas_per_sm=2)
    if elt == 2 and block_r == 512:
        # MLA with many heads (compute-bound): wgmma on 64 rows, two 72 KB tiles, no spills at s2.
        return DecodeConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)
    num_warps = 8 if block_m * block_r >= 16384 else 4
    for block_n, num_stages in ((64, 5), (32, 5), (32, 3), (16, 3), (16, 2)):
        if block_m * row_bytes + 2 * block_n * row_bytes <= 200 * 1024:
            break
    # Narrow latents: splits sized for two programs per SM. On an H100 (32 rows, batch 64, context
    # 8192) this was the fastest split count at 64 + 16, 96 + 32, 148 + 40, 156 + 36 and 192 + 64
    # (96 + 32: 74.6 us against 98-100 us at one program per SM).
    ctas = 2 if block_r <= 256 and num_warps == 4 else 1
    return DecodeConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                        ctas_per_sm=ctas)


_AUTO_CONFIGS: dict[tuple, DecodeConfig] = {}


def choose_config(
    q, kv_cache, latent_heads: int, rope_dim: int, config: DecodeConfig | None = None, *, need_masses: bool = False,
    kv_quant: str = "",
) -> DecodeConfig:
    """The split kernel's configuration for this call: ``config`` if given (checked), else the
    Gluon wgmma kernel where it applies (Hopper, MLA with >= 64 query rows: it computes each score
    once instead of once per warpgroup), else ``default_config``. Per-page masses
    (``need_masses``) come from the Triton kernel only."""
    from latentkv.kernels import mla_decode_wgmma

    if config is None:  # the automatic choice depends only on these (cached: it runs on every launch)
        key = (q.device, q.dtype, q.shape[1], q.shape[2], q.shape[3], kv_cache.shape[1], kv_cache.stride(),
               kv_cache.data_ptr() % 16, latent_heads, rope_dim, need_masses, kv_quant)  # fmt: skip
        cfg = _AUTO_CONFIGS.get(key)
        if cfg is None:
            rows = q.shape[1] * (q.shape[2] // latent_heads)
            wgmma = mla_decode_wgmma.wgmma_supported(q, kv_cache, latent_heads, rope_dim) and not need_masses
            if wgmma and latent_heads == 1 and rows >= WGMMA_CONFIG.block_m:
                cfg = WGMMA_CONFIG
            else:
                cfg = default_config(rows, q.shape[-1] - rope_dim, rope_dim, q.dtype, q.device, kv_quant=kv_quant)
            _AUTO_CONFIGS[key] = cfg
        return cfg
    if config.kernel == "wgmma" and (need_masses or not mla_decode_wgmma.wgmma_supported(q, kv_cache, latent_heads,
                                                                                         rope_dim)):
        raise LatentKVError(
            "the wgmma decode kernel needs a Hopper GPU, bf16/fp16, power-of-2 latent and RoPE widths and pages "
            "of >= 16 rows laid out contiguously, and does not write per-page masses (return_masses); leave "
            "config=None to get the Triton kernel."
        )
    if config.kernel not in ("triton", "wgmma"):
        raise LatentKVError(f"DecodeConfig.kernel must be 'triton' or 'wgmma'; got {config.kernel!r}.")
    if config.kernel == "wgmma" and config.out_splits != 1:
        raise LatentKVError("the wgmma decode kernel does not split the output columns; use out_splits=1.")
    output_slices(q.shape[-1] - rope_dim, config.out_splits)  # a valid split of this width, else an error
    return config


def _masses_config(cfg: DecodeConfig, page_size: int, *, explicit: bool) -> DecodeConfig:
    """The config with a tile size that fits the page size for ``return_masses``: every chunk of
    ``min(block_n, page_size)`` tokens must lie in one page, so one of the two divides the other."""
    if page_size % cfg.block_n == 0 or cfg.block_n % page_size == 0:
        return cfg
    fits = [n for n in (64, 32, 16) if n < cfg.block_n and page_size % n == 0]
    if explicit or not fits:
        raise LatentKVError(
            f"return_masses needs the page size and the tile size block_n to divide one another; got page_size "
            f"{page_size}, block_n {cfg.block_n}. Use a power-of-2 page size (16, 64) or a matching config."
        )
    log.info("decode masses: block_n %d -> %d so that tiles do not straddle pages of %d", cfg.block_n, fits[0],
             page_size)
    return replace(cfg, block_n=fits[0])


@functools.lru_cache(maxsize=4096)  # called on every launch with a handful of distinct arguments
def choose_num_splits(
    programs_per_split: int, max_len: int, sm_count: int, block_n: int, *, ctas_per_sm: int = 1
) -> int:
    """Splits of the sequence so that programs fill the GPU in whole waves.

    Cost model: waves * (tiles per split + 2 tiles of prologue/epilogue) + a combine pass when
    split; the shortest estimate wins (ties: fewer splits). Splits shorter than 256 keys are not
    considered. With ``programs_per_split`` about the SM count this lands near "batch * splits
    fills the GPU about twice".
    """
    limit = max(1, min(_MAX_SPLITS, max_len // _MIN_SPLIT_LEN))
    slots = max(1, sm_count * ctas_per_sm)
    best, best_cost = 1, float("inf")
    for s in range(1, limit + 1):
        waves = math.ceil(programs_per_split * s / slots)
        tiles = math.ceil(math.ceil(max_len / s) / block_n)
        cost = waves * (tiles + 2) + (4 if s > 1 else 0)
        if cost < best_cost:
            best, best_cost = s, cost
    return best


_SM_COUNT: dict[int, int] = {}
_SEMAPHORES: dict[tuple, torch.Tensor] = {}


def _semaphores(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tickets for fused combines, one buffer per (device, stream); the kernel
    leaves every ticket at zero, so the buffer is reused without a memset. Calls that overlap on
    one stream are ordered by the stream; different streams get different buffers."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _SEMAPHORES.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _SEMAPHORES[key] = buf
    return buf


LAST_COMPILED: dict[str, object] = {}  # the last launched compiled split kernel (bench reads its registers)


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter runs: a small fixed "GPU" so the choice is deterministic
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    latent_heads: int,
    rope_dim: int,
    softmax_scale: float,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    return_masses: bool = False,
    softcap: float | None = None,
    window: int | None = None,
    _poison: bool = False,
    _skip_combine: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA / GLA decode attention through the Triton kernels.

    q:           [B, Sq, H, r_c + rope_dim]  latent part first, rotated RoPE part last
    kv_cache:    [num_pages, page_size, latent_heads * r_c + rope_dim], or a ``QuantizedPages`` (the
                 latent as fp8 / int4 codes with per-token group scales, dequantized inside the kernel)
    block_table: [B, max_pages] int32, or [B, latent_heads, max_pages] int32: latent head c attends the
                 pages of row c (sparse decode choosing pages per latent head); every row covers the same
                 seq_len positions.  seq_lens: [B] int32, including the Sq new tokens
    returns      [B, Sq, H, r_c] in q's dtype; query head h reads latent head h // (H // latent_heads).
    Query token i sits at position seq_len - Sq + i and sees keys 0..that position.

    num_splits:  split-KV pieces per sequence (None: from the SM count and ``max_seq_len``).
    max_seq_len: bound on seq_lens used to choose splits; None takes seq_lens.max() when seq_lens
                 is on the CPU, else the block table's capacity (no device sync).
    out:         optional output buffer [B, Sq, H, r_c] in q's dtype.
    config:      block sizes override (tuning and tests); None picks ``default_config``.
    return_masses: also return the attention masses per page of the block table,
                 [B, Sq, latent_heads, max_pages] float32: for latent head c, the probability its
                 query heads put on the tokens of table column j (of its own row with a 3-d table),
                 summed over the tokens, averaged
                 over the heads (0 for columns past a sequence's length; ``mla_decode_reference``
                 and ``latentkv.sparsity.masses.block_masses`` compute the same). The split kernel
                 writes per chunk of ``min(block_n, page_size)`` tokens the log2-sum-exp2 of its
                 scores (~4 bytes per chunk and query head) and a small kernel normalises them.
                 Needs ``page_size`` and ``block_n`` to divide one another; off, the split kernel
                 is compiled without it (same code, same registers as before).
    softcap:     scores soft-capped as softcap * tanh(score / softcap) (Gemma 2); None: plain.
    window:      query token at position p sees keys p - window + 1 .. p only (a sliding-window layer).
    _poison / _skip_combine: tests fill outputs and workspaces with NaN before launch; the bench
                 times the split kernel alone.
    """
    if (softcap or window) and return_masses:
        raise LatentKVError("per-page masses (sparse decode) are not computed for soft-capped or sliding-window "
                            "attention; decode such a model without sparsity.")
    if not HAS_TRITON:
        raise LatentKVError("mla_decode needs triton (pip install 'latentkv[kernels]'); or use backend='reference'.")
    batch, sq, heads, r_c, page_size = _check_inputs(q, kv_cache, block_table, seq_lens, latent_heads, rope_dim)
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if q.device.type != "cuda" and not interpret:
        raise LatentKVError(
            f"mla_decode runs on CUDA tensors (got {q.device}); set TRITON_INTERPRET=1 before importing triton "
            "to run it on the CPU, or use decode_attention(..., backend='reference')."
        )
    if q.stride(-1) != 1:
        q = q.contiguous()
    quant = kv_cache if isinstance(kv_cache, QuantizedPages) else None
    if quant is not None:
        kv_cache = quant.rope  # the kernel's KV argument holds the RoPE key alone
    if kv_cache.stride(-1) != 1:
        raise LatentKVError("kv_cache must be contiguous in its last dimension.")
    block_table = block_table.contiguous()
    seq_lens = seq_lens.contiguous()

    hg = heads // latent_heads
    rows = sq * hg
    cfg = choose_config(q, kv_cache, latent_heads, rope_dim, config, need_masses=return_masses,
                        kv_quant=quant.kernel.switch if quant else "")
    head_tables = block_table.dim() == 3
    gluon_cannot = softcap or window or head_tables or (quant and not _wgmma_reads(quant, latent_heads))
    if cfg.kernel == "wgmma" and gluon_cannot:
        cfg = replace(cfg, kernel="triton") if config is None else cfg  # the Gluon kernel has none: the portable one
        if cfg.kernel == "wgmma":
            raise LatentKVError("the wgmma decode kernel has no soft-cap, sliding window or block table per latent "
                                "head, and reads only fp8 caches with 4 or more scale groups a latent head; drop its "
                                "config")
    if return_masses:
        cfg = _masses_config(cfg, page_size, explicit=config is not None)
    block_r = max(16, _next_pow2(r_c))
    block_o, n_oslices = output_slices(r_c, cfg.out_splits) if cfg.kernel != "wgmma" else (block_r, 1)
    quant_args = _quantized_args(quant, kv_cache, latent_heads, block_r, block_o, dequant_tile=cfg.dequant_tile,
                                 group_dots=cfg.group_dots and not cfg.kv_on_m)
    block_dr = max(16, _next_pow2(rope_dim)) if rope_dim > 0 else 16
    n_hblocks = -(-rows // cfg.block_m)
    n_programs = programs_per_split(batch, latent_heads, rows, r_c, cfg)

    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max()) if seq_lens.device.type == "cpu" else block_table.shape[-1] * page_size
        num_splits = choose_num_splits(
            n_programs, max_seq_len, sm_count(q.device), cfg.block_n, ctas_per_sm=cfg.ctas_per_sm
        )
    if not isinstance(num_splits, int) or num_splits < 1:
        raise LatentKVError(f"num_splits must be a positive int or None; got {num_splits!r}.")

    if out is None:
        out = torch.empty((batch, sq, heads, r_c), dtype=q.dtype, device=q.device)
    elif out.shape != (batch, sq, heads, r_c) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise LatentKVError(
            f"out must be [{batch}, {sq}, {heads}, {r_c}] {q.dtype} with a contiguous last dim; "
            f"got {tuple(out.shape)} {out.dtype}."
        )
    if num_splits > 1:
        o_part = torch.empty((batch, sq, heads, num_splits, r_c), dtype=torch.float32, device=q.device)
        # one copy per output column slice (the same values); the combine reads the first
        lse_part = torch.empty((n_oslices, batch, sq, heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out  # unused by the kernel
    if _poison:
        out.fill_(float("nan"))
        if num_splits > 1:
            o_part.fill_(float("nan"))
            lse_part.fill_(float("nan"))

    if return_masses:
        chunk = min(cfg.block_n, page_size)
        n_chunks = block_table.shape[-1] * page_size // chunk
        chunk_lse = torch.empty((batch, n_chunks, sq, heads), dtype=torch.float32, device=q.device)
        masses = torch.empty((batch, sq, latent_heads, block_table.shape[-1]), dtype=torch.float32, device=q.device)
        if _poison:
            chunk_lse.fill_(float("nan"))
            masses.fill_(float("nan"))
    else:
        chunk, n_chunks, chunk_lse = cfg.block_n, 0, seq_lens  # unused by the kernel

    fuse = cfg.fuse_combine and num_splits > 1
    sem = _semaphores(q.device, batch * latent_heads * n_hblocks * n_oslices) if fuse else seq_lens
    extra = {} if (cfg.maxnreg is None or interpret) else {"maxnreg": cfg.maxnreg}
    grid = (latent_heads * n_hblocks * n_oslices, num_splits, batch)
    split_kernel, combine_kernel = _kernels()
    if cfg.kernel == "wgmma":
        from latentkv.kernels import mla_decode_wgmma

        LAST_COMPILED["split"] = mla_decode_wgmma.launch(
            q, kv_cache, block_table, seq_lens, out, o_part, lse_part,
            rope_dim=rope_dim, softmax_scale=softmax_scale, num_splits=num_splits, quant=quant,
        )  # fmt: skip
    else:
        LAST_COMPILED["split"] = split_kernel[grid](
            q, kv_cache, block_table, seq_lens, out, o_part, lse_part, sem, chunk_lse,
            q.stride(0), q.stride(1), q.stride(2),
            kv_cache.stride(0), kv_cache.stride(1),
            block_table.stride(0), block_table.stride(1) if head_tables else 0,
            out.stride(0), out.stride(1), out.stride(2),
            float(softmax_scale) * _LOG2E,
            num_splits, n_chunks, float(softcap or 1.0), int(window or 0),
            *quant_args["tensors"],
            SQ=sq, H=heads, HG=hg, R_C=r_c, ROPE_DIM=rope_dim, ROPE_OFF=0 if quant else latent_heads * r_c,
            PAGE_SIZE=page_size, DIRECT=num_splits == 1, NUM_HBLOCKS=n_hblocks,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r, BLOCK_DR=block_dr,
            UPCAST_DOT=interpret and q.dtype == torch.bfloat16,
            KV_ON_M=cfg.kv_on_m, FUSE_COMBINE=fuse, MASSES=return_masses, CHUNK=chunk,
            SOFTCAP=bool(softcap), WINDOW=bool(window), **quant_args["constants"],
            NUM_OSPLITS=n_oslices, BLOCK_O=block_o, HEAD_TABLES=head_tables,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra,
        )  # fmt: skip
    if num_splits > 1 and not fuse and not _skip_combine:
        combine_kernel[(batch * sq * heads,)](
            o_part, lse_part, out,
            out.stride(0), out.stride(1), out.stride(2),
            num_splits,
            SQ=sq, H=heads, R_C=r_c,
            BLOCK_S=max(2, _next_pow2(num_splits)), BLOCK_R=block_r,
            num_warps=4 if block_r >= 256 else 2,
        )  # fmt: skip
    if not return_masses:
        return out
    _JIT["masses"][(batch * sq * latent_heads,)](
        chunk_lse, seq_lens, masses, n_chunks, block_table.shape[-1],
        SQ=sq, H=heads, HG=hg, LATENT_HEADS=latent_heads, CHUNK=chunk, CHUNKS_PER_PAGE=page_size // chunk,
        BLOCK_H=max(2, _next_pow2(hg)), BLOCK_C=max(2, min(128, _next_pow2(n_chunks))),
        BLOCK_P=max(2, min(128, _next_pow2(block_table.shape[-1]))), num_warps=4,
    )  # fmt: skip
    return out, masses


def _wgmma_reads(quant: QuantizedPages, latent_heads: int) -> bool:
    from latentkv.kernels import mla_decode_wgmma

    return mla_decode_wgmma.fp8_groups(quant, latent_heads) is not None


def group_dots_apply(quant: QuantizedPages, latent_heads: int, block_r: int, block_o: int) -> bool:
    """Whether ``DecodeConfig.group_dots`` (a 2-D dot per fp8 scale group) can read this cache at this
    tiling: fp8, groups of 16 or more columns (tl.dot's K and N), at most 4 groups in a tile of ``block_r``
    columns (one accumulator each), and the whole width in one program (``block_o == block_r``); the
    orientation (no kv_on_m) is the caller's to check."""
    if quant.kernel.switch != "fp8":
        return False
    group, num_groups, _ = kernel_groups(quant.fmt, quant.latent_width, latent_heads, block_r)
    return group >= 16 and num_groups <= 4 and block_o == block_r


def _quantized_args(quant: QuantizedPages | None, kv_cache: torch.Tensor, latent_heads: int, block_r: int,
                    block_o: int, *, dequant_tile: bool = False, group_dots: bool = False) -> dict:
    """The split kernel's quantized-latent arguments: tensors and strides (unused placeholders for a
    plain cache) and the constexprs that switch the dequantization on (``block_o``: the columns of
    an output slice, ``DecodeConfig.out_splits``; ``dequant_tile``: ``DecodeConfig.dequant_tile``;
    ``group_dots``: ``DecodeConfig.group_dots`` and no kv_on_m, taken where ``group_dots_apply``)."""
    if quant is None:
        return {"tensors": (kv_cache, kv_cache, 0, 0, 0, 0), "constants": {}}
    group, num_groups, scale_off = kernel_groups(quant.fmt, quant.latent_width, latent_heads, block_r)
    codes, scales = quant.codes, quant.scales
    if codes.stride(-1) != 1 or scales.stride(-1) != 1 or scales.stride(-2) != scales.shape[-1]:
        raise LatentKVError("QuantizedPages codes and scales must be contiguous per token (QuantizedPages.empty).")
    ogroup = min(group, block_o)
    # scales on the scores: every batched dot needs 16 or more columns a group (tl.dot's K and N); int4
    # dots take the even and the odd columns of a group apart, so 32
    min_group = {"fp8": 16, "int4": 32}[quant.kernel.switch]
    per_group = group_dots and group_dots_apply(quant, latent_heads, block_r, block_o)
    scaled = not per_group and not dequant_tile and ogroup >= min_group
    return {
        "tensors": (codes, scales, codes.stride(0), codes.stride(1), scales.stride(0), scales.stride(1)),
        "constants": {"KV_QUANT": quant.kernel.switch, "GROUP": group, "NUM_GROUPS": num_groups,
                      "SCALE_OFF": scale_off, "OGROUP": ogroup, "ONUM_GROUPS": block_o // ogroup,
                      "SCALE_FIELDS": quant.kernel.scale_fields, "SCALED_DOTS": scaled,
                      # fp16: p x scale (scale = amax / 448 <= 146) times 256 stays below 65504 and
                      # above the subnormals where small probabilities would lose bits
                      "P_SCALE": 256.0 if (scaled or per_group) and quant.kernel.switch == "fp8"
                      and quant.dtype == torch.float16 else 1.0,
                      "GROUP_DOTS": per_group},
    }


# --------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------
def mla_decode_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    latent_heads: int,
    rope_dim: int,
    softmax_scale: float,
    num_splits: int | None = None,  # accepted for a drop-in signature; the reference never splits
    out_dtype: torch.dtype | None = None,
    return_masses: bool = False,
    softcap: float | None = None,
    window: int | None = None,
    **_unused,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch MLA / GLA decode: gathers each sequence's pages, float32 math (a ``QuantizedPages``
    cache: its pages dequantized to the model dtype, as the kernel dequantizes them). A block table
    [B, latent_heads, max_pages] gives each latent head its own pages (see ``mla_decode``).

    Returns [B, Sq, H, r_c] in ``out_dtype`` (default: q's dtype); with ``return_masses`` also the
    per-page masses [B, Sq, latent_heads, max_pages] float32 (see ``mla_decode``), from the same
    probabilities.
    """
    batch, sq, heads, r_c, page_size = _check_inputs(q, kv_cache, block_table, seq_lens, latent_heads, rope_dim)
    hg = heads // latent_heads
    width = kv_cache.shape[2]
    max_pages = block_table.shape[-1]
    out = torch.empty((batch, sq, heads, r_c), dtype=torch.float32, device=q.device)
    if return_masses:
        masses = torch.zeros((batch, sq, latent_heads, max_pages), dtype=torch.float32, device=q.device)
    lens = seq_lens.tolist()
    for b in range(batch):
        length = int(lens[b])
        if length < sq or length > max_pages * page_size:
            raise LatentKVError(
                f"sequence {b}: length {length} must lie in [query_len={sq}, block table capacity "
                f"{max_pages * page_size}]."
            )
        n_pages = -(-length // page_size)
        if block_table.dim() == 2:  # every latent head reads the same rows
            rows = kv_cache[block_table[b, :n_pages].long()].reshape(-1, width)[:length].float()  # [L, width]
            probs = attention_probs(q[b], rows, latent_heads=latent_heads, rope_dim=rope_dim, scale=softmax_scale,
                                    softcap=softcap, window=window)
            heads_rows = ((c, p, rows[:, c * r_c : (c + 1) * r_c]) for c, p in probs)
        else:
            heads_rows = _head_table_probs(q[b], kv_cache, block_table[b, :, :n_pages], length,
                                           latent_heads=latent_heads, rope_dim=rope_dim, scale=softmax_scale,
                                           softcap=softcap, window=window)
        for c, p, latent in heads_rows:
            out[b, :, c * hg : (c + 1) * hg] = torch.einsum("shl,lr->shr", p, latent)
            if return_masses:
                masses[b, :, c, :n_pages] = pool_pages(p, page_size)
    out = out.to(out_dtype or q.dtype)
    return (out, masses) if return_masses else out


def _head_table_probs(q, kv_cache, tables, length, *, latent_heads, rope_dim, scale, softcap, window):
    """Yields (latent head c, probabilities [s, H // latent_heads, L] of its query heads, its latent rows
    [L, r_c]) where latent head c reads the pages tables[c] (one sequence of a per-latent-head table):
    each head is an MLA problem of its own over its rows ``[latent_c | k_rope]``."""
    r_c = q.shape[-1] - rope_dim
    hg = q.shape[1] // latent_heads
    width = kv_cache.shape[2]
    for c in range(latent_heads):
        rows = kv_cache[tables[c].long()].reshape(-1, width)[:length].float()
        head_rows = torch.cat([rows[:, c * r_c : (c + 1) * r_c], rows[:, latent_heads * r_c :]], dim=1)
        (_, p), = attention_probs(q[:, c * hg : (c + 1) * hg], head_rows, latent_heads=1, rope_dim=rope_dim,
                                  scale=scale, softcap=softcap, window=window)
        yield c, p, head_rows[:, :r_c]


def attention_probs(q: torch.Tensor, rows: torch.Tensor, *, latent_heads: int, rope_dim: int, scale: float,
                    softcap: float | None = None, window: int | None = None):
    """Yields (latent head c, softmax probabilities [s, H // latent_heads, L] of its query heads), float32.

    q [s, H, r_c + rope_dim] (the s newest tokens of one sequence), rows [L, latent_heads * r_c +
    rope_dim] (its cache rows in order, the s new ones last); query token i sees rows 0 .. L - s + i
    (only the last `window` of them with a window); scores soft-capped by `softcap` where given.
    """
    s, heads, q_width = q.shape
    length = rows.shape[0]
    r_c = q_width - rope_dim
    hg = heads // latent_heads
    rows, qf = rows.float(), q.float()
    k_pe = rows[:, latent_heads * r_c :]  # [L, rope_dim]
    pos = length - s + torch.arange(s, device=q.device)  # position of each new token
    visible = torch.arange(length, device=q.device)[None, :] <= pos[:, None]  # [s, L]
    if window:
        visible &= torch.arange(length, device=q.device)[None, :] > pos[:, None] - window
    for c in range(latent_heads):
        qc = qf[:, c * hg : (c + 1) * hg]  # [s, hg, r_c + rope_dim]
        scores = torch.einsum("shr,lr->shl", qc[..., :r_c], rows[:, c * r_c : (c + 1) * r_c])
        if rope_dim:
            scores = scores + torch.einsum("shd,ld->shl", qc[..., r_c:], k_pe)
        scores = scores * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        yield c, torch.softmax(scores.masked_fill(~visible[:, None, :], float("-inf")), dim=-1)


def pool_pages(p: torch.Tensor, page_size: int) -> torch.Tensor:
    """p [s, hg, L] probabilities -> [s, ceil(L / page_size)]: summed over each page's tokens,
    averaged over the heads."""
    s, hg, length = p.shape
    n = -(-length // page_size)
    return torch.nn.functional.pad(p, (0, n * page_size - length)).view(s, hg, n, page_size).sum(-1).mean(1)


# --------------------------------------------------------------------------------------------
# Facade and helpers
# --------------------------------------------------------------------------------------------
_BACKENDS = ("auto", "triton", "reference")
_logged_choice: set[tuple[str, str]] = set()


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    latent_heads: int,
    rope_dim: int,
    softmax_scale: float,
    num_splits: int | None = None,
    backend: str = "auto",
    **kwargs,
) -> torch.Tensor:
    """Decode attention through the Triton kernel or the reference.

    backend="auto" takes the Triton kernel for CUDA tensors when triton imports, else the
    reference; "triton" / "reference" force one (tests, debugging). Keyword arguments go to the
    backend (``max_seq_len``, ``config``, ``return_masses``: then returns (output, per-page masses)).
    """
    if backend not in _BACKENDS:
        raise LatentKVError(f"unknown decode backend {backend!r}; choose one of {', '.join(_BACKENDS)}.")
    if backend == "auto":
        backend = "triton" if (HAS_TRITON and q.is_cuda) else "reference"
        key = (backend, q.device.type)
        if key not in _logged_choice:
            _logged_choice.add(key)
            why = "CUDA tensors and triton available" if backend == "triton" else (
                "triton not installed" if not HAS_TRITON else f"tensors on {q.device.type}, not CUDA"
            )
            log.info("decode attention: %s backend (%s)", backend, why)
    fn = mla_decode if backend == "triton" else mla_decode_reference
    return fn(
        q, kv_cache, block_table, seq_lens,
        latent_heads=latent_heads, rope_dim=rope_dim, softmax_scale=softmax_scale, num_splits=num_splits,
        **kwargs,
    )  # fmt: skip


ROW_ALIGN_BYTES = 16


def empty_pages(num_pages: int, page_size: int, width: int, *, dtype: torch.dtype,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """Zeroed cache pages [num_pages, page_size, width] whose rows start on 16-byte boundaries.

    The row stride is ``width`` rounded up to 16 bytes (148 + 40 bf16 values: 192), so the decode
    kernel loads every row with 16-byte vector loads whatever width a conversion chose; the padding
    columns are never read. On an H100 at 148 + 40 (batch 64, context 8192) unaligned rows took 1.55x
    as long (206 us against 133 us). Flat row access: ``page_rows``."""
    elt = torch.empty((), dtype=dtype).element_size()
    per = max(1, ROW_ALIGN_BYTES // elt)
    stride = -(-width // per) * per
    return torch.zeros(num_pages, page_size, stride, dtype=dtype, device=device)[..., :width]


def page_rows(pages: torch.Tensor) -> torch.Tensor:
    """[num_pages * page_size, width]: the rows of ``pages`` (row r = page r // page_size, slot r %
    page_size) as a view of the same memory, also where the row stride is padded (``empty_pages``)."""
    if pages.stride(-1) != 1 or pages.stride(0) != pages.shape[1] * pages.stride(1):
        raise LatentKVError("page_rows needs pages laid out as [num_pages, page_size, row stride] (empty_pages).")
    return pages.as_strided((pages.shape[0] * pages.shape[1], pages.shape[2]), (pages.stride(1), 1))


def write_paged(
    kv_cache: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor, new_entries: torch.Tensor
) -> None:
    """Write cache rows in place: entry [b, t] goes to position positions[b, t] of sequence b.

    kv_cache:    [num_pages, page_size, width], or a ``QuantizedPages`` (the latent quantized as written)
    block_table: [B, max_pages] (int)
    positions:   [B, T] (int) absolute positions in each sequence
    new_entries: [B, T, width]
    """
    if positions.dim() != 2 or new_entries.dim() != 3 or new_entries.shape[:2] != positions.shape:
        raise LatentKVError(
            f"positions must be [B, T] and new_entries [B, T, width]; got {tuple(positions.shape)} and "
            f"{tuple(new_entries.shape)}."
        )
    if new_entries.shape[2] != kv_cache.shape[2]:
        raise LatentKVError(f"new_entries width {new_entries.shape[2]} != cache width {kv_cache.shape[2]}.")
    if block_table.shape[0] != positions.shape[0]:
        raise LatentKVError(f"block_table has {block_table.shape[0]} rows, positions {positions.shape[0]}.")
    page_size = kv_cache.shape[1]
    pos = positions.long()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= block_table.shape[1] * page_size):
        raise LatentKVError(
            f"positions must lie in [0, {block_table.shape[1] * page_size}) (block table capacity); grow block_table."
        )
    pages = torch.gather(block_table.long(), 1, pos // page_size)  # [B, T]
    if isinstance(kv_cache, QuantizedPages):
        flat_rows = (pages * page_size + pos % page_size).reshape(-1)
        kv_cache.write_rows(flat_rows, new_entries.reshape(-1, kv_cache.shape[2]))
        return
    kv_cache[pages.reshape(-1), (pos % page_size).reshape(-1)] = new_entries.reshape(-1, kv_cache.shape[2]).to(
        kv_cache.dtype
    )
