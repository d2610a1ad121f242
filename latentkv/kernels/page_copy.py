"""Copy pages into device slots from a list of (page, slot) pairs of fixed length, skipping the
entries whose page is -1: ``dst[slots[i]] = src[pages[i]]`` wherever ``pages[i] >= 0``.

Why a kernel: an offloaded cache places the next step's pages on the device
(``latentkv.sparsity.offload.PagePool``), so how many of them are new is known only there. Reading
that count back to the host, then launching one gather of that size, is a device-to-host wait per
step and cannot be captured in a CUDA graph. Here the launch has a fixed grid (one program per pair
and row chunk); a program whose page is -1 masks all of its loads and stores, so it moves no bytes:
only the new pages cross the host link when ``src`` is pinned host memory mapped into the device's
address space (``latentkv.sparsity.offload.mapped_host_rows``).

Kernel, launcher and reference follow Triton's tutorials; tests in tests/test_sparsity_offload.py.
"""

from __future__ import annotations

import os

import torch

from latentkv.errors import LatentKVError

__all__ = ["copy_pages", "copy_pages_reference"]

BLOCK = 1024  # words of a page row per program

_JIT: dict[str, object] = {}


def _kernel():
    """The jitted kernel, built on first use (importing triton fixes TRITON_INTERPRET; see mla_decode)."""
    if "copy" not in _JIT:
        import triton
        import triton.language as tl

        @triton.jit
        def copy_pages_kernel(src, dst, pages, slots, row_words, BLOCK: tl.constexpr):
            pair = tl.program_id(0)
            page = tl.load(pages + pair)
            slot = tl.load(slots + pair)
            offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            keep = (offs < row_words) & (offs * 0 + page >= 0)  # page -1: every lane masked, no memory traffic
            words = tl.load(src + page.to(tl.int64) * row_words + offs, mask=keep)
            tl.store(dst + slot.to(tl.int64) * row_words + offs, words, mask=keep)

        _JIT["copy"] = copy_pages_kernel
    return _JIT["copy"]


def copy_pages_reference(src: torch.Tensor, dst: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor) -> None:
    """What ``copy_pages`` does, in PyTorch (the boolean selection waits for the device on a GPU)."""
    keep = pages >= 0
    dst[slots[keep]] = src[pages[keep]]


def copy_pages(src: torch.Tensor, dst: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor,
               backend: str = "auto") -> None:
    """dst[slots[i]] = src[pages[i]] for every i with pages[i] >= 0 (slots[i] is then a valid row of
    dst; where pages[i] is -1, slots[i] is ignored). src [P, W] and dst [S, W]: rows of the same
    dtype and width (word views of pages); pages, slots [n] int64 on dst's device. Nothing waits for
    the device. backend "auto": the kernel on CUDA, the reference elsewhere; "triton": the kernel
    (on CPU tensors under TRITON_INTERPRET=1); "reference"."""
    if backend not in ("auto", "triton", "reference"):
        raise LatentKVError(f"copy_pages backend must be auto, triton or reference; got {backend!r}.")
    if src.dim() != 2 or dst.dim() != 2 or src.shape[1] != dst.shape[1] or src.dtype != dst.dtype:
        raise LatentKVError(f"copy_pages needs rows of one width and dtype: src {tuple(src.shape)} {src.dtype}, "
                            f"dst {tuple(dst.shape)} {dst.dtype}.")
    if pages.shape != slots.shape or pages.dim() != 1 or pages.dtype != torch.long or slots.dtype != torch.long:
        raise LatentKVError("copy_pages takes pages and slots as two int64 vectors of one length.")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise LatentKVError("copy_pages needs contiguous src and dst rows.")
    use_kernel = backend == "triton" or (backend == "auto" and dst.is_cuda)
    if not use_kernel:
        copy_pages_reference(src, dst, pages, slots)
        return
    if not dst.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise LatentKVError("the copy_pages kernel runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1.")
    if pages.numel() == 0:
        return
    words = src.shape[1]
    _kernel()[(pages.numel(), -(-words // BLOCK))](src, dst, pages, slots, words, BLOCK=BLOCK)
