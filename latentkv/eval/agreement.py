"""Agreement of a model with a reference on the same tokens: how far a converted (or healed, or
sparsely decoded) model's next-token distributions are from the ones it replaces.

Perplexity alone mixes two things: how well the source predicted the text and how much of that
the conversion kept. KL(reference || model) per token and top-1 agreement measure the second
alone, and they can be taken on any text (the source's own samples, a training corpus, the
evaluation text) to see where a healed student still differs from its teacher.
"""

from __future__ import annotations

import math

import torch


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, targets: torch.Tensor) -> dict:
    """reference / candidate logits [n, V], targets [n]: top-1 agreement, KL(reference || candidate)
    and the candidate's NLL, each a mean over the n positions."""
    logp_r, logp_c = torch.log_softmax(reference.float(), -1), torch.log_softmax(candidate.float(), -1)
    kl = (logp_r.exp() * (logp_r - logp_c)).sum(-1)
    nll = -logp_c.gather(1, targets[:, None])[:, 0]
    return {
        "top1_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).float().mean()),
        "kl": float(kl.mean()),
        "nll": float(nll.mean()),
        "perplexity": math.exp(float(nll.mean())),
        "tokens": int(targets.numel()),
    }


@torch.no_grad()
def agreement(model, reference, windows: torch.Tensor, batch_size: int = 4, logits_of=None) -> dict:
    """Both models over the same windows [n, T] (each position predicts the next token): mean
    KL(reference || model) in nats per token, top-1 agreement, and both perplexities.
    logits_of(batch) -> logits: how `model` is run (default: one forward without a cache)."""
    device = next(model.parameters()).device
    logits_of = logits_of or (lambda batch: model(batch, use_cache=False).logits)
    ref_device = next(reference.parameters()).device
    sums = {"kl": 0.0, "top1_agreement": 0.0, "nll": 0.0, "reference_nll": 0.0}
    tokens = 0
    vocab = model.config.vocab_size
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        # the last position has no target; logits beyond the tokenizer's vocabulary (padding rows) are dropped
        cand = logits_of(batch.to(device))[:, :-1, :vocab].reshape(-1, vocab)
        ref = reference(batch.to(ref_device), use_cache=False).logits[:, :-1, :vocab].reshape(-1, vocab).to(cand.device)
        targets = batch[:, 1:].reshape(-1).to(cand.device)
        r = compare_logits(ref, cand, targets)
        n = r["tokens"]
        for key in ("kl", "top1_agreement", "nll"):
            sums[key] += r[key] * n
        sums["reference_nll"] += float(torch.nn.functional.cross_entropy(ref.float(), targets, reduction="sum"))
        tokens += n
    mean = {k: v / tokens for k, v in sums.items()}
    return {
        "kl_to_source": mean["kl"],
        "top1_agreement": mean["top1_agreement"],
        "perplexity": math.exp(mean["nll"]),
        "source_perplexity": math.exp(mean["reference_nll"]),
        "tokens": tokens,
    }
