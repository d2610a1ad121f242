"""Validation of the paged decode loop (`latentkv.runtime.decode`) against the model's own forward:
`decode_check` decodes a prompt through the paged latent cache and the decode kernels and compares
every step's logits with one full forward of the same model (and, optionally, greedy tokens with
transformers' DynamicCache)."""

from __future__ import annotations

import itertools
import logging
import time
from contextlib import contextmanager

import torch

from latentkv.errors import LatentKVError
from latentkv.kernels.compare import compare
from latentkv.runtime.decode import PagedLatentCache, check_length, encode_prompt, forward_step, prefill

log = logging.getLogger(__name__)

# decode_check tolerance on max |logit diff| / max |reference logit|, per model dtype
DECODE_CHECK_RTOL = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 5e-3}
TF32_RTOL = 5e-3  # float32 model, Triton kernel compiled for a GPU (its tl.dot takes TF32; as tests/test_kernels.py)


@torch.no_grad()
def hf_cache_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy tokens through the model's own forward with transformers' DynamicCache (no EOS stop)."""
    from latentkv.modeling import cached_forward, new_dynamic_cache

    device = next(model.parameters()).device
    cache = new_dynamic_cache(model.config)
    ids = torch.tensor([prompt], device=device)
    out = []
    for _ in range(num_tokens):
        logits = cached_forward(model, ids, cache).logits[0, -1]
        out.append(int(logits.argmax()))
        ids = torch.tensor([[out[-1]]], device=device)
    return out


def _max_rel(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """max over positions of max |out - ref| / max |ref| (rows = positions), and the worst position."""
    rel = (out - ref).abs().amax(-1) / ref.abs().amax(-1).clamp_min(1e-30)
    return float(rel.max()), int(rel.argmax())


@contextmanager
def _in_float32(model):
    """The model's floating weights and buffers as float32 copies for the duration (restored after)."""
    saved = []
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point() and t.dtype != torch.float32:
            saved.append((t, t.data))
            t.data = t.data.float()
    try:
        yield model
    finally:
        for t, data in saved:
            t.data = data


@torch.no_grad()
def decode_check(
    model,
    tokenizer,
    text_or_ids: str | list[int] | torch.Tensor,
    num_tokens: int = 256,
    *,
    backend: str = "auto",
    page_size: int = 64,
    prefill_chunk: int = 8,
    max_prompt_tokens: int | None = 64,
    rtol: float | None = None,
    hf_cache: bool = True,
    num_splits: int | None = None,
) -> dict:
    """Does the paged decode loop compute what the model computes?

    Feeds the prompt (chunks of ``prefill_chunk``) and ``num_tokens`` greedy tokens through the
    paged cache and the decode kernel (``backend``), keeping the logits at every position; then runs
    one full forward of the model (transformers' own path, no cache) over the same sequence
    (teacher-forced: the same tokens). Errors are max |logit diff| / max |reference logit| per
    position, the worst position reported.

    Passes when every logit is finite, every greedy token the two disagree on is a near tie of
    the reference (top-2 margin <= 2 * max |diff|), and
    - float32 / float64 models: the error is <= rtol (DECODE_CHECK_RTOL: 1e-4 for float32; 5e-3 with
      the Triton kernel on a GPU, whose float32 dot products run in TF32);
    - bfloat16 / float16 models: both the loop and the model's own forward are also compared with
      the float32 forward of the same weights, and the loop's error there is <= max(rtol, 2 x the
      model's own), i.e. the loop is as accurate as the model's forward in its dtype (rtol 2e-2
      for bfloat16).
    With ``hf_cache`` the model's own incremental decode (DynamicCache) is also run and its first
    divergence from the loop's tokens reported (in bf16 near ties can make it diverge).
    ``num_splits`` forces the kernel's split-KV count (None: its own choice).
    """
    model.eval()
    if isinstance(text_or_ids, str):
        prompt = encode_prompt(tokenizer, text_or_ids)
    elif isinstance(text_or_ids, torch.Tensor):
        prompt = [int(t) for t in text_or_ids.flatten().tolist()]
    else:
        prompt = [int(t) for t in text_or_ids]
    if max_prompt_tokens is not None:
        prompt = prompt[:max_prompt_tokens]
    if not prompt:
        raise LatentKVError("decode_check needs a prompt of at least one token.")
    if num_tokens < 1:
        raise LatentKVError(f"num_tokens must be >= 1; got {num_tokens}.")
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    resolved = backend if backend != "auto" else ("triton" if device.type == "cuda" else "reference")
    if rtol is None:
        rtol = DECODE_CHECK_RTOL.get(dtype, 2e-2)
        if dtype == torch.float32 and resolved == "triton" and device.type == "cuda":
            rtol = TF32_RTOL  # the kernel's float32 tl.dot runs in TF32 on the GPU's tensor cores

    # 1. paged: prompt logits (every position) + greedy decode one token per step
    check_length(model, len(prompt) + num_tokens)
    t0 = time.perf_counter()
    cache = PagedLatentCache.for_model(model, max_seqs=1, max_seq_len=len(prompt) + num_tokens, page_size=page_size,
                                       backend=backend, num_splits=num_splits)
    seq = cache.add_sequence()
    prompt_logits = prefill(model, cache, seq, prompt, prefill_chunk, all_logits=True)  # [P, V]
    rows, tokens = [], []
    step = prompt_logits[-1]
    for i in range(num_tokens):
        tokens.append(int(step.argmax()))
        if i + 1 < num_tokens:
            step = forward_step(model, cache, [seq], torch.tensor([[tokens[-1]]]))[0, -1]
            rows.append(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    paged_seconds = time.perf_counter() - t0
    paged = torch.cat([prompt_logits] + [r[None] for r in rows])  # [P + n - 1, V]: positions 0 .. P+n-2
    del cache

    # 2. reference: one full forward over prompt + generated tokens (teacher-forced)
    full = torch.tensor([prompt + tokens[:-1]], device=device)
    ref = model(full, use_cache=False).logits[0].float()  # [P + n - 1, V]
    max_rel, worst = _max_rel(paged, ref)
    max_abs = float((paged - ref).abs().max())
    cmp = compare(paged, ref, atol=rtol, rtol=rtol)
    finite = bool(torch.isfinite(paged).all())
    error = max_rel
    limit = rtol
    fp32 = None
    if dtype not in (torch.float32, torch.float64):
        with _in_float32(model):
            ref32 = model(full, use_cache=False).logits[0].float()
        loop_err, model_err = _max_rel(paged, ref32)[0], _max_rel(ref, ref32)[0]
        fp32 = {"loop_max_rel": loop_err, "model_max_rel": model_err}
        error, limit = loop_err, max(rtol, 2 * model_err)
        del ref32

    # 3. greedy tokens (decode positions only) vs the reference's argmax at the same positions
    dec = slice(len(prompt) - 1, None)
    ref_tok = ref[dec].argmax(-1).cpu()
    top2 = ref[dec].topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).cpu()
    mism = (ref_tok != torch.tensor(tokens)).nonzero().flatten().tolist()
    unexplained = [i for i in mism if float(margin[i]) > 2 * max_abs]
    first = None
    if mism:
        i = mism[0]
        first = {"index": i, "paged": tokens[i], "reference": int(ref_tok[i]), "reference_margin": float(margin[i])}

    report = {
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "backend": resolved,
        "page_size": page_size,
        "prefill_chunk": prefill_chunk,
        "prompt_tokens": len(prompt),
        "num_tokens": num_tokens,
        "tokens": tokens,
        "max_abs": max_abs,  # vs the model's forward in its own dtype
        "max_rel": max_rel,
        "worst_position": worst,
        "rel_l2": cmp.rel_l2,
        "cos_diff": cmp.cos_diff,
        "float32_reference": fp32,
        "error": error,  # what the pass test reads: max_rel, or the float32 loop error for bf16 / fp16
        "limit": limit,
        "rtol": rtol,
        "token_mismatches": len(mism),
        "unexplained_mismatches": len(unexplained),
        "first_mismatch": first,
        "paged_seconds": paged_seconds,
        "paged_tokens_per_s": (len(prompt) + num_tokens) / paged_seconds if paged_seconds > 0 else None,
        "passed": finite and error <= limit and not unexplained,
    }
    if hf_cache:
        hf = hf_cache_greedy(model, prompt, num_tokens)
        report["hf_cache_first_divergence"] = next((i for i, (a, b) in enumerate(zip(hf, tokens)) if a != b), None)
    return report
