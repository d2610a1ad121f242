"""Training FLOPs per token and model FLOPs utilisation (MFU), with the formula spelled out.

Counted: every matrix product with a weight (nn.Linear, the LM head included; the embedding
lookup is free). For N weights a forward pass costs 2N per token; the backward pass costs 2N for
the input gradients (needed through every layer, frozen or not) plus 2N_t for the gradients of
the N_t trained weights. So, per training token:

    student = 2N + 2N + 2N_t   (6N when everything trains; ~4N under LoRA, where N_t is the adapters)
    teacher = 2N_teacher       (forward only)

Attention-score products (q.k and p.v, 4 x layers x heads x (d_qk + d_v) / 2 x context per token
forward) are not in that count; `attention_flops_per_token` gives them for a second figure.
Recomputation under gradient checkpointing is not counted (it is not useful work).
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peak, FLOP/s (no sparsity), by a substring of the device name.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}

FORMULA = ("MFU = tokens/s x (2N_s + 2N_s + 2N_t + 2N_teacher) / peak; N_s: student weights in matrix "
           "products (LoRA adapters included), N_t: trained ones, N_teacher: teacher's; attention scores "
           "and recomputation not counted")


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(weights used in matrix products, those of them that train)."""
    total = trained = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            if id(w) in seen:
                continue
            seen.add(id(w))
            total += w.numel()
            trained += w.numel() if w.requires_grad else 0
    return total, trained


def flops_per_token(student: torch.nn.Module, teacher: torch.nn.Module | None) -> float:
    n, n_trained = matmul_params(student)
    n_teacher = matmul_params(teacher)[0] if teacher is not None else 0
    return float(4 * n + 2 * n_trained + 2 * n_teacher)


def attention_flops_per_token(config, seq_len: int, with_teacher: bool) -> float:
    """Score and value products per training token (forward + 2 x backward; teacher forward)."""
    layers = getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_attention_heads", 0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // max(heads, 1)
    context = (seq_len + 1) / 2  # causal: the mean number of keys a query sees
    forward = 2 * 2 * layers * heads * head_dim * context  # q.k and p.v, d_qk ~ d_v ~ head_dim
    return forward * 3 + (forward if with_teacher else 0)


def device_peak_flops(device: torch.device | str) -> tuple[float | None, str]:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, peak in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return peak, name
    return None, name
