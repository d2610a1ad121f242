"""What a sparse policy does to the model: teacher-forced decoding against dense decoding.

A text of ``prompt + n`` tokens: the prompt is prefilled densely, then the next ``n`` tokens are
fed one per step (teacher forcing: the true text, not the model's choices), each step attending
through the paged cache under the policy. Compared with the same run under the dense policy:
top-1 agreement, KL(dense || sparse) of the next-token distributions, perplexity of the n
continuation tokens, and the attention recall (true mass inside the chosen blocks, mean over
layers, latent heads and steps).
"""

from __future__ import annotations

import math

import torch

from latentkv.sparsity.policies import SparseConfig


@torch.no_grad()
def prefilled(model, ids: list[int], prompt_len: int, *, page_size: int = 16, keep_history: int = 64,
              backend: str = "reference", prefill_chunk: int = 128, offload: int | None = None,
              max_seq_len: int | None = None):
    """The dense prefill of ids[:prompt_len], shared by the policies that decode after it:
    (cache with its recorded history of ``keep_history`` steps, sequence id, last logits).
    ``offload``: the cache's pages in host memory, attended through device pools of that many
    page slots per layer (``latentkv.sparsity.offload``). ``max_seq_len``: the cache's room
    (default len(ids); more for tokens generated after ids)."""
    from latentkv.runtime.decode import PagedLatentCache, prefill
    from latentkv.sparsity.runtime import SparseAttention

    if offload:
        from latentkv.sparsity.offload import OffloadedLatentCache

        cache = OffloadedLatentCache.for_model(model, max_seqs=1, max_seq_len=max_seq_len or len(ids),
                                               page_size=page_size, backend=backend, pool_pages=offload)
    else:
        cache = PagedLatentCache.for_model(model, max_seqs=1, max_seq_len=max_seq_len or len(ids),
                                           page_size=page_size, backend=backend)
    cache.sparsity = SparseAttention(SparseConfig("dense"), page_size, keep_history=keep_history)
    seq = cache.add_sequence()
    return cache, seq, prefill(model, cache, seq, ids[:prompt_len], prefill_chunk).cpu()


def sparse_copy(start, config: SparseConfig, predictor=None):
    """A copy of the cache of ``start`` (from ``prefilled``) decoding under ``config``, with the
    prefill's history: (cache, sequence id, last logits, its SparseAttention)."""
    import copy

    from latentkv.sparsity.runtime import SparseAttention

    base, seq, first = start
    cache = copy.deepcopy(base)
    sparsity = SparseAttention(config, cache.page_size, predictor)
    keep = sparsity.keep_history
    if keep:
        sparsity.history = {k: v[:, -keep:].clone() for k, v in base.sparsity.history.items()}
    cache.sparsity = sparsity
    return cache, seq, first, sparsity


def summarize(cache, sparsity) -> dict:
    """The policy's ``SparseStats`` summary, with an offloaded cache's copies and misses."""
    summary = sparsity.stats.summary()
    if hasattr(cache, "offload_stats"):
        summary["offload"] = cache.offload_stats.summary()
    return summary


@torch.no_grad()
def greedy_after(model, start, ids: list[int], prompt_len: int, config: SparseConfig, *, new_tokens: int,
                 predictor=None, stop=None):
    """From a copy of ``start`` (the prefill of ids[:prompt_len]; its cache must have room for
    len(ids) + new_tokens), feed ids[prompt_len:] one per step under ``config`` (teacher-forced),
    then greedily generate up to ``new_tokens`` tokens under it; ``stop(tokens)`` true ends early.
    Returns (generated ids, ``SparseStats`` summary)."""
    from latentkv.runtime.decode import forward_step

    cache, seq, logits, sparsity = sparse_copy(start, config, predictor)
    for t in range(prompt_len, len(ids)):
        logits = forward_step(model, cache, [seq], torch.tensor([[ids[t]]]))[0, -1]
    out: list[int] = []
    for i in range(new_tokens):
        out.append(int(logits.argmax()))
        if (stop is not None and stop(out)) or i == new_tokens - 1:
            break
        logits = forward_step(model, cache, [seq], torch.tensor([[out[-1]]]))[0, -1]
    return out, summarize(cache, sparsity)


@torch.no_grad()
def decode_after(model, start, ids: list[int], prompt_len: int, config: SparseConfig, *, predictor=None):
    """Teacher-forced decode of ids[prompt_len:] from a copy of ``start`` (from ``prefilled``) under
    ``config``: logits [len(ids) - prompt_len, vocab] predicting ids[prompt_len:] (float32, CPU)
    and the policy's ``SparseStats`` summary."""
    from latentkv.runtime.decode import forward_step

    cache, seq, first, sparsity = sparse_copy(start, config, predictor)
    rows = [first]
    for t in range(prompt_len, len(ids) - 1):
        rows.append(forward_step(model, cache, [seq], torch.tensor([[ids[t]]]))[0, -1].cpu())
    return torch.stack(rows), summarize(cache, sparsity)


def teacher_forced(model, ids: list[int], prompt_len: int, config: SparseConfig, *, page_size: int = 16,
                   predictor=None, backend: str = "reference", prefill_chunk: int = 128, offload: int | None = None):
    """Prefill ids[:prompt_len] densely, then decode the rest under ``config`` (``decode_after``);
    ``offload``: page slots per layer of an offloaded cache (``prefilled``)."""
    start = prefilled(model, ids, prompt_len, page_size=page_size, backend=backend, prefill_chunk=prefill_chunk,
                      keep_history=predictor.config.history if predictor is not None else 1, offload=offload)
    return decode_after(model, start, ids, prompt_len, config, predictor=predictor)


def compare_logits(dense: torch.Tensor, sparse: torch.Tensor, targets: torch.Tensor) -> dict:
    """dense / sparse logits [n, V], targets [n]: agreement, KL(dense || sparse), perplexity."""
    from latentkv.eval.agreement import compare_logits as compare

    r = compare(dense, sparse, targets)
    r["kl_to_dense"] = r.pop("kl")
    return r


def sparse_eval(model_path: str, config: SparseConfig, *, eval_text: str | None = None, tokens: int = 256,
                prompt_tokens: int = 1024, page_size: int = 16, device: str = "cpu", dtype: str = "float32") -> dict:
    """`latentkv eval --sparse`: the first prompt_tokens + tokens tokens of the evaluation text,
    decoded teacher-forced under ``config`` and densely; returns the comparison."""
    from pathlib import Path

    from latentkv.calibration.runner import resolve_dtype
    from latentkv.runtime.decode import latent_attentions
    from latentkv.eval.perplexity import DEFAULT_EVAL_TEXT, read_eval_text
    from latentkv.io.source import open_source
    from latentkv.modeling import load_model
    from latentkv.errors import LatentKVError
    from latentkv.sparsity.predictor import load_predictor

    predictor = load_predictor(config.predictor) if config.policy == "predictor" else None
    source = open_source(model_path)
    model = load_model(source.folder, dtype=resolve_dtype(dtype), device=device)
    latent_attentions(model)
    path = Path(eval_text or DEFAULT_EVAL_TEXT)
    if not path.exists():
        raise LatentKVError(f"evaluation text {path} not found; pass --eval-text.")
    ids = source.tokenizer()(read_eval_text(path)[:2_000_000], add_special_tokens=False)["input_ids"]
    ids = ids[: prompt_tokens + tokens]
    if len(ids) < prompt_tokens + 2:
        raise LatentKVError(f"{path} has only {len(ids)} tokens; lower the prompt or use a longer text.")
    start = prefilled(model, ids, prompt_tokens, page_size=page_size,
                      keep_history=predictor.config.history if predictor is not None else 1)
    dense, _ = decode_after(model, start, ids, prompt_tokens, SparseConfig("dense"))
    sparse, stats = decode_after(model, start, ids, prompt_tokens, config, predictor=predictor)
    targets = torch.tensor(ids[prompt_tokens:])
    return {"policy": config.policy, "budget": config.budget, "per_latent_head": config.per_latent_head,
            "refresh": config.refresh, "dense_refresh": config.dense_refresh, "page_size": page_size,
            "prompt_tokens": prompt_tokens,
            "dense_perplexity": compare_logits(dense, dense, targets)["perplexity"],
            **compare_logits(dense, sparse, targets), **stats}


def long_prefill(model, ids: list[int], prompt_len: int, *, page_size: int = 16, predictor=None,
                 offload: bool = False, extra: int = 0, backend: str = "reference", prefill_chunk: int = 128):
    """``evaluate.prefilled`` for a cache with room for len(ids) + ``extra`` tokens; offloaded, its
    pools hold every page (the dense run); ``for_config`` gives each policy its own pool size."""
    room = len(ids) + extra
    slots = math.ceil(room / page_size) + 2 if offload else None
    return prefilled(model, ids, prompt_len, page_size=page_size, backend=backend, prefill_chunk=prefill_chunk,
                     keep_history=predictor.config.history if predictor is not None else 1, offload=slots,
                     max_seq_len=room)


def for_config(start, config: SparseConfig, room: int):
    """``start`` as the policy ``config`` decodes from it: unchanged for a paged cache; for an
    offloaded one, a copy whose pools (empty) have the slots ``config`` needs for sequences of up to
    ``room`` tokens (``pool_slots_for``), so forecast misses are counted at that pool size."""
    import copy

    cache, seq, first = start
    if not hasattr(cache, "pools"):
        return start
    from latentkv.sparsity.offload import PagePool, pool_slots_for

    slots = min(cache.num_pages, pool_slots_for(config, 1, room, cache.page_size, latent_heads=cache.latent_heads))
    sparsity, pools = cache.sparsity, cache.pools
    cache.pools = []  # not copied: replaced
    try:
        new = copy.deepcopy(cache)
    finally:
        cache.pools = pools
    new.pools = [PagePool(p, slots, new.device) for p in new.pages]
    new._sparsity = sparsity  # the prefill's history (the setter would prefetch for it)
    return new, seq, first
