"""What is trained, per output format: a table, and the two ways of making it trainable.

A row names the linears of the converted attention (and of the MLP, for `--target attention+mlp`)
by their module names; the format is read from the model's `model_type`. Adding a format is adding
a row.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from latentkv.convert.registry import trainable_modules
from latentkv.errors import LatentKVError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FormatTargets:
    """The trainable modules of one checkpoint format.

    attention: linears inside each layer's attention (`self_attn`, or the source's name for it in a
        latentkv config's `source_modules`; names that are absent are skipped, so
        optional ones such as DeepSeek's q_a_proj / q_b_proj can be listed).
    mlp: linears inside each layer's `mlp`.
    extra: small tensors trained in full in both modes (peft `modules_to_save` under LoRA), such as
        the latent norm of the DeepSeek format that no linear rewrite can reproduce.
    """

    attention: tuple[str, ...]
    # gate_up_proj: Phi-3; dense_h_to_4h / dense_4h_to_h: GPT-NeoX
    mlp: tuple[str, ...] = ("gate_proj", "up_proj", "gate_up_proj", "down_proj", "dense_h_to_4h", "dense_4h_to_h")
    extra: tuple[str, ...] = ()


FORMAT_TARGETS: dict[str, FormatTargets] = {
    # model_type -> targets. latentkv: every latent target's `TargetRecord.trainable` (LatentAttention's
    # projections; GTA-S's GroupedLatentAttention: map keys k_proj, value latent c_proj, its gated decoder
    # v_up_proj / g_proj), and the per-head query map q_head_proj of the qk_norm layers of a Qwen3 conversion.
    "latentkv": FormatTargets(attention=trainable_modules(), extra=("q_head_proj",)),
    # Stock transformers DeepseekV3ForCausalLM written by `--format deepseek`.
    "deepseek_v3": FormatTargets(
        attention=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
        extra=("kv_a_layernorm",),
    ),
}


def targets_for(config) -> FormatTargets:
    model_type = getattr(config, "model_type", None)
    row = FORMAT_TARGETS.get(model_type)
    if row is None:
        raise LatentKVError(
            f"{model_type!r} is not a converted model that latentkv can heal; point at the output of "
            f"`latentkv convert` (formats: {', '.join(sorted(FORMAT_TARGETS))})"
        )
    return row


def target_pattern(row: FormatTargets, target: str, attention: str = "self_attn") -> str:
    """A regex over full module names (peft's `target_modules` as a string): whole-name match."""
    groups = [rf"{re.escape(attention)}\.({'|'.join(row.attention)})"]
    if target == "attention+mlp":
        groups.append(rf"mlp\.({'|'.join(row.mlp)})")
    return rf".*\.layers\.\d+\.({'|'.join(groups)})"


def attention_name(model: torch.nn.Module) -> str:
    """A layer's attention attribute in this model (a latentkv model of GPT-NeoX: `attention`)."""
    return (getattr(getattr(model, "config", None), "source_modules", None) or {}).get("attention", "self_attn")


def matching_modules(model: torch.nn.Module, pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rx.fullmatch(name)]


def _check_found(model, names: list[str], pattern: str, target: str) -> None:
    if not names:
        raise LatentKVError(
            f"No linear layers of {type(model).__name__} match the {target!r} targets ({pattern}); "
            "for a mixture-of-experts MLP use --target attention"
        )


def freeze_all_but(model: torch.nn.Module, row: FormatTargets, target: str) -> list[str]:
    """`--mode attention`: train the target modules' full weights (and the `extra` tensors) only."""
    pattern = target_pattern(row, target, attention_name(model))
    names = matching_modules(model, pattern)
    _check_found(model, names, pattern, target)
    model.requires_grad_(False)
    for name in names:
        model.get_submodule(name).requires_grad_(True)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in row.extra:
            module.requires_grad_(True)
    return names


def add_lora(model: torch.nn.Module, row: FormatTargets, target: str, rank: int, alpha: float, dropout: float):
    """`--mode lora`: peft LoRA adapters on the target modules; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    pattern = target_pattern(row, target, attention_name(model))
    names = matching_modules(model, pattern)
    _check_found(model, names, pattern, target)
    route_latent_expansion_through_modules(model)
    extra = [n for n in row.extra if any(name.endswith("." + n) for name, _ in model.named_modules())]
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none",
        modules_to_save=extra or None, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config), names


def lora_config_of(peft_model):
    return peft_model.peft_config["default"]


# --- LatentAttention reads kv_b_proj.weight directly (an einsum over latent heads), so a LoRA
# wrapper's forward would never run. Route the expansion through the module instead: the same
# numbers for the plain weight, and the adapter's delta is now applied (and merges exactly).

def _expand_latent_via_module(self, c: torch.Tensor):
    """c: [b, s, r] -> k_nope [b, H, s, d_nope], v [b, H, s, d_v], calling `self.kv_b_proj`."""
    b, s, _ = c.shape
    if self.latent_heads == 1:
        kv = self.kv_b_proj(c).view(b, s, self.num_heads, -1)
    else:
        # Each latent head serves a contiguous group of query heads: expand every latent head
        # with the whole projection, then keep for each group only its own heads' rows.
        groups, per = self.latent_heads, self.num_heads // self.latent_heads
        full = self.kv_b_proj(c.view(b, s, groups, self.latent_head_dim))  # [b, s, L, H * D]
        full = full.view(b, s, groups, groups, per, -1)  # [b, s, latent head, head group, per, D]
        kv = torch.diagonal(full, dim1=2, dim2=3).permute(0, 1, 4, 2, 3).reshape(b, s, self.num_heads, -1)
    kv = kv.transpose(1, 2)
    return kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)


def _decode_values_via_module(self, out: torch.Tensor) -> torch.Tensor:
    """GTA-S: out [b, s, H, r] -> [b, s, H, d] calling `self.v_up_proj` (every head's rows on every
    head's attention output, then each head's own block)."""
    b, s, heads, _ = out.shape
    full = self.v_up_proj(out).view(b, s, heads, heads, -1)  # [b, s, output of head, rows of head, d]
    return torch.diagonal(full, dim1=2, dim2=3).permute(0, 1, 3, 2)


# class name -> patch applied to every module of that class before LoRA is added.
_LORA_PATCHES = {
    "LatentAttention": ("expand_latent", _expand_latent_via_module),
    "GroupedLatentAttention": ("decode_values", _decode_values_via_module),
}


def route_latent_expansion_through_modules(model: torch.nn.Module) -> int:
    import types

    patched = 0
    for module in model.modules():
        patch = _LORA_PATCHES.get(type(module).__name__)
        if patch is not None and not getattr(module, "tied", False):  # tied (GTA-T) layers have no kv_b_proj
            setattr(module, patch[0], types.MethodType(patch[1], module))
            patched += 1
    if patched:
        log.info("routing the latent expansion of %d attention layers through kv_b_proj / v_up_proj so LoRA "
                 "applies to it", patched)
    return patched
