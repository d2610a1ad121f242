"""The healing loss: KL divergence to the teacher's next-token distribution, mixed with the LM loss,

    loss = (1 - w) * T^2 * KL(p_teacher^T || p_student^T) + w * CE(student, next token)

with p^T = softmax(logits / T), the KL averaged over every position (the last one too: the teacher
has a distribution there), the CE over every position that has a next token. Computed in float32.

`hidden_state_loss` is the optional match of every layer's hidden state (`--hidden-weight`, added
by a trainer plug-in, latentkv/finetune/plugins.py) and the attention-transfer loss:

    mean_l ||x_student^l - x_teacher^l||^2 / ||x_teacher^l||^2

with x^l the residual stream after decoder layer l (summed over positions and rows before the
ratio, so each layer counts the same whatever its scale). The converted model keeps the source's
layers, widths and residual stream, so the teacher's hidden states are a target it can reach layer
by layer: the term gives hundreds of numbers per token where the KL gives one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,  # [b, s, V]
    teacher_logits: torch.Tensor | None,  # [b, s, V] or None (LM loss only)
    input_ids: torch.Tensor,  # [b, s]
    temperature: float = 1.0,
    lm_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scalar loss and its parts (detached): {"kl": ..., "lm": ...}."""
    vocab = student_logits.shape[-1]
    parts: dict[str, torch.Tensor] = {}
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if lm_weight > 0 or teacher_logits is None:
        lm = F.cross_entropy(student_logits[:, :-1].reshape(-1, vocab).float(), input_ids[:, 1:].reshape(-1))
        parts["lm"] = lm.detach()
        loss = loss + (1.0 if teacher_logits is None else lm_weight) * lm
    if teacher_logits is not None and lm_weight < 1:
        # Same tokenizer (checked before training); rows past the shorter vocab are padding.
        v = min(vocab, teacher_logits.shape[-1])
        s = F.log_softmax(student_logits[..., :v].reshape(-1, v).float() / temperature, dim=-1)
        t = F.log_softmax(teacher_logits[..., :v].reshape(-1, v).float() / temperature, dim=-1)
        kl = F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
        parts["kl"] = kl.detach()
        loss = loss + (1.0 - lm_weight) * kl
    return loss, parts


def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over layers of the relative squared error of the student's per-layer tensors to the
    teacher's (hidden states here; attention outputs in the attention-transfer phase)."""
    ratios = [
        (s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
        for s, t in zip(student, teacher, strict=True)
    ]
    return torch.stack(ratios).mean()
