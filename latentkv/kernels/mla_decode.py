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

Kernel shape (the design note of the issue, kept here so the code can be read against it):
- every query row that shares one latent head -- (query token, head) pairs -- goes into the M
  dimension of one ``tl.dot``; a ``[BLOCK_N, r_c]`` latent tile is loaded once and used as the
  key (``q @ tile^T``) and as the value (``p @ tile``). That turns MLA decode from a
  matrix-vector into a matrix-matrix problem;
- online softmax in float32 (base 2, ``log2 e`` folded into the scale);
- split-KV: grid ``(latent_heads * head_blocks, splits, batch)``; with one split the kernel
  writes the normalised output directly, otherwise each split writes a float32 partial output
  and its log-sum-exp and ``_mla_decode_combine_kernel`` merges them.

Order in this file (Triton tutorial order): kernels, launcher, reference, facade and helpers.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from latentkv.errors import LatentKVError

try:  # triton is an optional dependency (extra "kernels"); the reference works without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

log = logging.getLogger(__name__)

__all__ = [
    "DecodeConfig",
    "choose_num_splits",
    "decode_attention",
    "default_config",
    "mla_decode",
    "mla_decode_reference",
    "write_paged",
]

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _mla_decode_split_kernel(
        Q,  # [B, SQ, H, R_C + ROPE_DIM], last dim contiguous
        KV,  # [num_pages, PAGE_SIZE, LATENT_HEADS * R_C + ROPE_DIM], last dim contiguous
        BLOCK_TABLE,  # [B, max_pages] int32
        SEQ_LENS,  # [B] int32 (includes the SQ new tokens)
        OUT,  # [B, SQ, H, R_C] (written when NUM_SPLITS == 1)
        O_PART,  # [B, SQ, H, NUM_SPLITS, R_C] float32 (written when NUM_SPLITS > 1)
        LSE_PART,  # [B, SQ, H, NUM_SPLITS] float32, log2 domain
        stride_qb,
        stride_qs,
        stride_qh,
        stride_kvp,
        stride_kvt,
        stride_btb,
        stride_ob,
        stride_os,
        stride_oh,
        qk_scale,  # softmax_scale * log2(e)
        SQ: tl.constexpr,
        H: tl.constexpr,
        HG: tl.constexpr,  # query heads per latent head
        R_C: tl.constexpr,
        ROPE_DIM: tl.constexpr,
        ROPE_OFF: tl.constexpr,  # column of the RoPE key = LATENT_HEADS * R_C
        PAGE_SIZE: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        NUM_HBLOCKS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_DR: tl.constexpr,
        UPCAST_DOT: tl.constexpr,  # interpreter only: its tl.dot multiplies bf16 bit patterns
    ):
        pid_hc = tl.program_id(0)  # latent head * NUM_HBLOCKS + head block (adjacent: L2 reuse)
        pid_s = tl.program_id(1)
        pid_b = tl.program_id(2)
        c = pid_hc // NUM_HBLOCKS
        hb = pid_hc % NUM_HBLOCKS

        # M rows = (query token, head of this latent group) pairs, token-major.
        rows = hb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < SQ * HG
        tok = rows // HG
        head = c * HG + rows % HG
        offs_r = tl.arange(0, BLOCK_R)
        if BLOCK_R == R_C:
            r_ok = offs_r < BLOCK_R  # folds to all-true
        else:
            r_ok = offs_r < R_C

        q_row = Q + pid_b.to(tl.int64) * stride_qb + tok * stride_qs + head * stride_qh
        q = tl.load(q_row[:, None] + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        if ROPE_DIM > 0:
            offs_dr = tl.arange(0, BLOCK_DR)
            dr_ok = offs_dr < ROPE_DIM
            q_pe = tl.load(
                q_row[:, None] + R_C + offs_dr[None, :], mask=row_ok[:, None] & dr_ok[None, :], other=0.0
            )
            if UPCAST_DOT:
                q_pe = q_pe.to(tl.float32)
        if UPCAST_DOT:
            q = q.to(tl.float32)

        seq_len = tl.load(SEQ_LENS + pid_b)
        split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = pid_s * split_len
        end = tl.minimum(start + split_len, seq_len)
        # last key position each row may see: causal among the SQ new tokens, clipped to the split
        last = tl.minimum(seq_len - SQ + tok, end - 1)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        bt_row = BLOCK_TABLE + pid_b.to(tl.int64) * stride_btb
        lat_cols = c * R_C + offs_r

        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            if PAGE_SIZE % BLOCK_N == 0:
                # the tile lies in one page (splits and tiles start at multiples of BLOCK_N)
                page = tl.load(bt_row + start_n // PAGE_SIZE).to(tl.int64)
                kv_row = page * stride_kvp + (offs_n % PAGE_SIZE) * stride_kvt
            else:
                page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
                kv_row = page * stride_kvp + (offs_n % PAGE_SIZE) * stride_kvt
            # [BLOCK_N, BLOCK_R] latent tile: loaded once, used as key and as value
            kv = tl.load(KV + kv_row[:, None] + lat_cols[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            kv_d = kv
            if UPCAST_DOT:
                kv_d = kv.to(tl.float32)
            s = tl.dot(q, tl.trans(kv_d))
            if ROPE_DIM > 0:
                k_pe = tl.load(
                    KV + kv_row[:, None] + (ROPE_OFF + offs_dr)[None, :],
                    mask=n_ok[:, None] & dr_ok[None, :],
                    other=0.0,
                )
                if UPCAST_DOT:
                    k_pe = k_pe.to(tl.float32)
                s = tl.dot(q_pe, tl.trans(k_pe), s)
            s = s * qk_scale
            s = tl.where(offs_n[None, :] <= last[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            p_d = p.to(kv.dtype)  # rounded to the cache dtype, as the tensor cores take it
            if UPCAST_DOT:
                p_d = p_d.to(tl.float32)
            acc = tl.dot(p_d, kv_d, acc)
            m_i = m_new

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        if NUM_SPLITS == 1:
            o_row = OUT + pid_b.to(tl.int64) * stride_ob + tok * stride_os + head * stride_oh
            tl.store(
                o_row[:, None] + offs_r[None, :],
                out.to(OUT.dtype.element_ty),
                mask=row_ok[:, None] & r_ok[None, :],
            )
        else:
            part = ((pid_b.to(tl.int64) * SQ + tok) * H + head) * NUM_SPLITS + pid_s  # [BLOCK_M]
            lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(LSE_PART + part, lse, mask=row_ok)
            tl.store(O_PART + part[:, None] * R_C + offs_r[None, :], out, mask=row_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _mla_decode_combine_kernel(
        O_PART,  # [B, SQ, H, NUM_SPLITS, R_C] float32
        LSE_PART,  # [B, SQ, H, NUM_SPLITS] float32 (log2 domain)
        OUT,  # [B, SQ, H, R_C]
        stride_ob,
        stride_os,
        stride_oh,
        SQ: tl.constexpr,
        H: tl.constexpr,
        R_C: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)  # one (batch, token, head) row
        b = pid // (SQ * H)
        tok = (pid // H) % SQ
        head = pid % H
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < NUM_SPLITS
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R_C
        base = pid.to(tl.int64) * NUM_SPLITS
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


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeConfig:
    """Block sizes of the split kernel.

    block_m: query rows ((token, head) pairs of one latent head) per program; power of 2, >= 16.
    block_n: cache rows per tile; power of 2, >= 16.
    num_warps / num_stages: Triton's warps per program and software-pipelining depth.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MIN_SPLIT_LEN = 256  # do not split a sequence into pieces shorter than this many keys
_MAX_SPLITS = 64


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _check_inputs(q, kv_cache, block_table, seq_lens, latent_heads, rope_dim) -> tuple[int, int, int, int, int]:
    """Shape / dtype checks shared by kernel and reference; returns (B, Sq, H, r_c, page_size)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise LatentKVError(
            f"q must be a 4-d tensor [batch, query_len, heads, r_c + rope_dim]; got shape "
            f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}."
        )
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 3:
        raise LatentKVError(
            "kv_cache must be a 3-d tensor [num_pages, page_size, latent_heads * r_c + rope_dim]; got shape "
            f"{tuple(kv_cache.shape) if isinstance(kv_cache, torch.Tensor) else type(kv_cache).__name__}."
        )
    if q.dtype not in _SUPPORTED_DTYPES or kv_cache.dtype != q.dtype:
        raise LatentKVError(
            f"q and kv_cache must share one dtype among bfloat16, float16, float32; got q {q.dtype}, "
            f"kv_cache {kv_cache.dtype}. Cast the query to the cache dtype."
        )
    if block_table.dim() != 2 or block_table.dtype != torch.int32:
        raise LatentKVError(
            f"block_table must be a 2-d int32 tensor [batch, max_pages]; got {block_table.dtype} of shape "
            f"{tuple(block_table.shape)}. Use block_table.to(torch.int32)."
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
        if hi > block_table.shape[1] * page_size:
            raise LatentKVError(
                f"a sequence of length {hi} needs more than the block table's {block_table.shape[1]} pages of "
                f"{page_size}; grow block_table."
            )
    return batch, sq, heads, r_c, page_size


def default_config(rows: int, r_c: int, rope_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """Block sizes for ``rows`` query rows per latent head and latent width ``r_c``.

    BLOCK_M x BLOCK_R float32 accumulators live in registers: keep them at most 32K elements
    (128 registers a thread at 8 warps), so BLOCK_M <= 64 at r_c = 512 and <= 128 at r_c = 256.
    """
    block_r = max(16, _next_pow2(r_c))
    block_m = max(16, min(_next_pow2(rows), 128, max(16, 32768 // block_r)))
    block_n = 32 if block_r >= 512 else 64
    num_warps = 8 if block_m * block_r >= 16384 else 4
    num_stages = 2
    return DecodeConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


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


def _sm_count(device: torch.device) -> int:
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
    _poison: bool = False,
) -> torch.Tensor:
    """Absorbed MLA / GLA decode attention through the Triton kernels.

    q:           [B, Sq, H, r_c + rope_dim]  latent part first, rotated RoPE part last
    kv_cache:    [num_pages, page_size, latent_heads * r_c + rope_dim]
    block_table: [B, max_pages] int32;  seq_lens: [B] int32, including the Sq new tokens
    returns      [B, Sq, H, r_c] in q's dtype; query head h reads latent head h // (H // latent_heads).

    num_splits:  split-KV pieces per sequence (None: from the SM count and ``max_seq_len``).
    max_seq_len: bound on seq_lens used to choose splits; None takes seq_lens.max() when seq_lens
                 is on the CPU, else the block table's capacity (no device sync).
    out:         optional output buffer [B, Sq, H, r_c] in q's dtype.
    config:      block sizes override (tuning and tests); None picks ``default_config``.
    """
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
    if kv_cache.stride(-1) != 1:
        raise LatentKVError("kv_cache must be contiguous in its last dimension.")
    block_table = block_table.contiguous()
    seq_lens = seq_lens.contiguous()

    hg = heads // latent_heads
    rows = sq * hg
    cfg = config or default_config(rows, r_c, rope_dim, q.dtype)
    block_r = max(16, _next_pow2(r_c))
    block_dr = max(16, _next_pow2(rope_dim)) if rope_dim > 0 else 16
    n_hblocks = triton.cdiv(rows, cfg.block_m)
    programs_per_split = batch * latent_heads * n_hblocks

    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max()) if seq_lens.device.type == "cpu" else block_table.shape[1] * page_size
        num_splits = choose_num_splits(programs_per_split, max_seq_len, _sm_count(q.device), cfg.block_n)
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
        lse_part = torch.empty((batch, sq, heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out  # unused by the kernel
    if _poison:
        out.fill_(float("nan"))
        if num_splits > 1:
            o_part.fill_(float("nan"))
            lse_part.fill_(float("nan"))

    grid = (latent_heads * n_hblocks, num_splits, batch)
    _mla_decode_split_kernel[grid](
        q, kv_cache, block_table, seq_lens, out, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2),
        kv_cache.stride(0), kv_cache.stride(1),
        block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        float(softmax_scale) * _LOG2E,
        SQ=sq, H=heads, HG=hg, R_C=r_c, ROPE_DIM=rope_dim, ROPE_OFF=latent_heads * r_c,
        PAGE_SIZE=page_size, NUM_SPLITS=num_splits, NUM_HBLOCKS=n_hblocks,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=block_r, BLOCK_DR=block_dr,
        UPCAST_DOT=interpret and q.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _mla_decode_combine_kernel[(batch * sq * heads,)](
            o_part, lse_part, out,
            out.stride(0), out.stride(1), out.stride(2),
            SQ=sq, H=heads, R_C=r_c, NUM_SPLITS=num_splits,
            BLOCK_S=max(2, _next_pow2(num_splits)), BLOCK_R=block_r,
            num_warps=4 if block_r >= 256 else 2,
        )  # fmt: skip
    return out


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
    **_unused,
) -> torch.Tensor:
    """Plain-torch MLA / GLA decode: gathers each sequence's pages, float32 math.

    Returns [B, Sq, H, r_c] in ``out_dtype`` (default: q's dtype).
    """
    batch, sq, heads, r_c, page_size = _check_inputs(q, kv_cache, block_table, seq_lens, latent_heads, rope_dim)
    hg = heads // latent_heads
    width = kv_cache.shape[2]
    out = torch.empty((batch, sq, heads, r_c), dtype=torch.float32, device=q.device)
    lens = seq_lens.tolist()
    for b in range(batch):
        length = int(lens[b])
        if length < sq or length > block_table.shape[1] * page_size:
            raise LatentKVError(
                f"sequence {b}: length {length} must lie in [query_len={sq}, block table capacity "
                f"{block_table.shape[1] * page_size}]."
            )
        pages = block_table[b, : -(-length // page_size)].long()
        rows = kv_cache[pages].reshape(-1, width)[:length].float()  # [L, width]
        k_pe = rows[:, latent_heads * r_c :]  # [L, rope_dim]
        qb = q[b].float()  # [Sq, H, r_c + rope_dim]
        pos = length - sq + torch.arange(sq, device=q.device)  # position of each new token
        visible = torch.arange(length, device=q.device)[None, :] <= pos[:, None]  # [Sq, L]
        for c in range(latent_heads):
            lat = rows[:, c * r_c : (c + 1) * r_c]  # [L, r_c]
            qc = qb[:, c * hg : (c + 1) * hg]  # [Sq, hg, r_c + rope_dim]
            s = torch.einsum("shr,lr->shl", qc[..., :r_c], lat)
            if rope_dim:
                s = s + torch.einsum("shd,ld->shl", qc[..., r_c:], k_pe)
            s = (s * softmax_scale).masked_fill(~visible[:, None, :], float("-inf"))
            p = torch.softmax(s, dim=-1)
            out[b, :, c * hg : (c + 1) * hg] = torch.einsum("shl,lr->shr", p, lat)
    return out.to(out_dtype or q.dtype)


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
    reference; "triton" / "reference" force one (tests, debugging).
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


def write_paged(
    kv_cache: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor, new_entries: torch.Tensor
) -> None:
    """Write cache rows in place: entry [b, t] goes to position positions[b, t] of sequence b.

    kv_cache:    [num_pages, page_size, width]
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
    kv_cache[pages.reshape(-1), (pos % page_size).reshape(-1)] = new_entries.reshape(-1, kv_cache.shape[2]).to(
        kv_cache.dtype
    )
