"""Sparse decode at long context: the teacher-forced comparison with dense decoding and passkey
retrieval (``retrieval``) over thousands of tokens, optionally through an offloaded cache.

``long_text_compare``: a text of ``prompt + span`` tokens, the prompt prefilled densely once, then
the span decoded teacher-forced under dense decoding and under every policy given: KL(dense ||
sparse), top-1 agreement, perplexity of the span, pages read per layer-step and, through an
offloaded cache (``offload=True``: host pages, device pools sized by ``pool_slots_for`` for each
policy's budget), the pages its forecast missed. Offloaded decode gives the same logits as the
paged cache, so one run gives both.

``long_context_eval``: what `latentkv eval MODEL --sparse POLICY --long-text TEXT [--retrieval]`
runs (one policy and budget against dense).
"""

from __future__ import annotations

import torch

from latentkv.errors import LatentKVError
from latentkv.sparsity.policies import SparseConfig

DEFAULT_DEPTHS = (0.1, 0.5, 0.9)


def parse_depths(text: str) -> tuple[float, ...]:
    """'0.1,0.5,0.9' -> (0.1, 0.5, 0.9): needle depths, each in [0, 1]."""
    try:
        depths = tuple(float(d) for d in str(text).split(",") if d.strip())
    except ValueError:
        raise LatentKVError(f"--needle-depths {text!r}: give comma-separated fractions, e.g. 0.1,0.5,0.9.") from None
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise LatentKVError(f"--needle-depths {text!r}: each depth must be in [0, 1].")
    return depths


def check_long_options(*, sparse: str | None, long_text: str | None, retrieval: bool, offload: bool,
                       context_tokens: int, span: int, depths: str) -> tuple[float, ...]:
    """The `eval --long-text` options checked before any work; returns the needle depths."""
    if not long_text:
        raise LatentKVError("--retrieval and --offload apply to the long-context evaluation: pass --long-text TEXT.")
    if not sparse:
        raise LatentKVError("--long-text evaluates a sparse policy: pass --sparse POLICY (dense for the baseline alone).")
    if context_tokens < 64:
        raise LatentKVError(f"--context-tokens must be >= 64; got {context_tokens}.")
    if span < 2 or span >= context_tokens // 2:
        raise LatentKVError(f"--long-span must be >= 2 and under half of --context-tokens; got {span}.")
    read_long_text(long_text)  # exists
    return parse_depths(depths)


def long_text_compare(model, ids: list[int], prompt_len: int, configs: list[SparseConfig], *, page_size: int = 16,
                      predictor=None, offload: bool = False, backend: str = "reference",
                      prefill_chunk: int = 128, start=None) -> list[dict]:
    """Rows {"policy", "budget", "per_latent_head", "refresh", "dense_refresh" (those three not in the
    dense row), top1_agreement, kl_to_dense,
    perplexity, nll, blocks_per_decision, ...} for dense decoding then each config, decoding
    ids[prompt_len:] teacher-forced after one dense prefill of ids[:prompt_len]."""
    from latentkv.sparsity.evaluate import compare_logits, decode_after, for_config, long_prefill

    if not 0 < prompt_len < len(ids) - 1:
        raise LatentKVError(f"the prompt ({prompt_len} tokens) must leave at least 2 of the {len(ids)} tokens to decode.")
    if start is None:
        start = long_prefill(model, ids, prompt_len, page_size=page_size, predictor=predictor, offload=offload,
                             backend=backend, prefill_chunk=prefill_chunk)
    targets = torch.tensor(ids[prompt_len:])
    dense, stats = decode_after(model, start, ids, prompt_len, SparseConfig("dense"))
    rows = [{"policy": "dense", "budget": 1.0, **compare_logits(dense, dense, targets), **stats}]
    for cfg in configs:
        pred = predictor if cfg.policy == "predictor" else None
        logits, stats = decode_after(model, for_config(start, cfg, len(ids)), ids, prompt_len, cfg, predictor=pred)
        rows.append({"policy": cfg.policy, "budget": cfg.budget, "per_latent_head": cfg.per_latent_head,
                     "refresh": cfg.refresh, "dense_refresh": cfg.dense_refresh,
                     **compare_logits(dense, logits, targets), **stats})
    return rows


def read_long_text(path: str) -> str:
    """A text file (plain or .gz), or the name of one of the package's Gutenberg books
    (``chesterton-thursday`` or ``chesterton-thursday.txt``)."""
    from pathlib import Path

    from latentkv.data import CALIBRATION_TEXT, read_text

    p = Path(path)
    if not p.exists():
        name = p.name if p.name.endswith(".txt.gz") else (p.name if p.name.endswith(".txt") else p.name + ".txt") + ".gz"
        p = CALIBRATION_TEXT / name
        if not p.exists():
            raise LatentKVError(f"long text {path} not found (a file, or a book of latentkv's Gutenberg set).")
    return read_text(p, errors="replace")


def long_context_eval(model_path: str, config: SparseConfig, *, text: str, context_tokens: int = 4096,
                      span: int = 64, skip: int = 2000, retrieval: bool = False, depths=DEFAULT_DEPTHS,
                      page_size: int = 16, offload: bool = False, device: str = "cpu",
                      dtype: str = "float32", chat: bool = False) -> dict:
    """`latentkv eval --sparse POLICY --long-text TEXT`: the teacher-forced comparison over
    ``context_tokens`` tokens of the text (after ``skip``; the last ``span`` decoded) and, with
    ``retrieval``, the passkey test at each depth (``chat``: the prompt in the tokenizer's chat
    template, ``retrieval.needle_case``), for ``config`` and dense decoding."""
    from latentkv.calibration.runner import resolve_dtype
    from latentkv.io.source import open_source
    from latentkv.modeling import load_model
    from latentkv.runtime.decode import latent_attentions
    from latentkv.sparsity.predictor import load_predictor
    from latentkv.sparsity.retrieval import make_key, needle_case, retrieval_start, retrieve

    if span < 2 or context_tokens <= span + 1:
        raise LatentKVError(f"--long-span {span} must be >= 2 and below the context of {context_tokens} tokens.")
    predictor = load_predictor(config.predictor) if config.policy == "predictor" else None
    source = open_source(model_path)
    tokenizer = source.tokenizer()
    model = load_model(source.folder, dtype=resolve_dtype(dtype), device=device)
    latent_attentions(model)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and context_tokens + 16 > limit:
        raise LatentKVError(f"a context of {context_tokens} tokens exceeds the model's {limit} positions.")
    ids = tokenizer(read_long_text(text), add_special_tokens=False)["input_ids"]
    if len(ids) < skip + context_tokens:
        raise LatentKVError(f"{text} has {len(ids)} tokens; {skip} skipped + {context_tokens} are needed.")
    window = ids[skip : skip + context_tokens]
    configs = [] if config.policy == "dense" else [config]
    report = {"text": text, "context_tokens": context_tokens, "span": span, "page_size": page_size, "chat": chat,
              "teacher_forced": long_text_compare(model, window, context_tokens - span, configs, page_size=page_size,
                                                  predictor=predictor, offload=offload)}
    if retrieval:
        rows = []
        for i, depth in enumerate(depths):
            case = needle_case(tokenizer, window, context_tokens=context_tokens, depth=depth, key=make_key(i),
                               chat=chat)
            start = retrieval_start(model, case, page_size=page_size, predictor=predictor, offload=offload)
            for cfg in [SparseConfig("dense"), *configs]:
                rows.append(retrieve(model, tokenizer, case, cfg, start=start, page_size=page_size,
                                     predictor=predictor if cfg.policy == "predictor" else None, offload=offload))
        report["retrieval"] = rows
    return report
