"""What is trained, per output format: a table, and the two ways of making it trainable.

A row names the linears of the converted attention (and of the MLP, for `--target attention+mlp`)
by their module names; the format is read from the model's `model_type`. Adding a format is adding
a row.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
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
    route_projections_through_modules(model, names)
    extra = [n for n in row.extra if any(name.endswith("." + n) for name, _ in model.named_modules())]
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none",
        modules_to_save=extra or None, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config), names


def lora_config_of(peft_model):
    return peft_model.peft_config["default"]


# Projections a latentkv attention reads as weights (einsums over heads: GLA's kv_b_proj, GTA-S's
# v_up_proj), so that a LoRA wrapper's forward would not run, unless its hook
# `route_projections_through_modules` makes them module calls; each with the attention method that
# reads it (in every modeling file, also those written before the hook).
WEIGHT_READ_PROJECTIONS = {"kv_b_proj": "expand_latent", "v_up_proj": "decode_values"}


def call_attention_hooks(model: torch.nn.Module, hook: str, check_older) -> int:
    """Call the method `hook` of every module of `model` that has it (the attention classes of the
    modeling file); `check_older(name, module)` sees each module without it, which may be an attention
    from a modeling file written before the hook (and refuses it where that would be silently wrong).
    Returns the number of hooks called."""
    called = 0
    for name, module in model.named_modules():
        method = getattr(module, hook, None)
        if callable(method):
            method()
            called += 1
        else:
            check_older(name, module)
    return called


def route_projections_through_modules(model: torch.nn.Module, adapted: Collection[str] | None = None) -> int:
    """Have every latentkv attention in `model` call its up-projections as modules (its
    `route_projections_through_modules` hook; the same numbers for plain weights), so adapters on
    kv_b_proj / v_up_proj apply and merge exactly. Returns the number of attention layers routed.

    adapted: full module names (in `model`) that carry or will carry adapters. An attention whose
    modeling file predates the hook is refused where one of its weight-read projections is among them
    (None: wherever it has one); elsewhere it is left as it is, having nothing to route.
    """

    def check_older(name: str, module: torch.nn.Module) -> None:
        prefix = f"{name}." if name else ""
        bypassed = [proj for proj, reader in WEIGHT_READ_PROJECTIONS.items()
                    if callable(getattr(module, reader, None))
                    and isinstance(getattr(module, proj, None), torch.nn.Module)
                    and (adapted is None or prefix + proj in adapted)
                    # one latent head: older forwards already call kv_b_proj as a module
                    and not (proj == "kv_b_proj" and getattr(module, "latent_heads", 1) == 1)]
        if bypassed:
            raise LatentKVError(
                f"{name or type(module).__name__}: its modeling file, written by an older latentkv, has no "
                f"`route_projections_through_modules` hook, so LoRA adapters on {' and '.join(bypassed)} could be "
                "bypassed (its forward may read their weights directly). Convert the source again with the current "
                "latentkv (`latentkv convert`), or train full weights with --mode attention."
            )

    routed = call_attention_hooks(model, "route_projections_through_modules", check_older)
    if routed:
        log.info("routing the latent up-projections of %d attention layers through kv_b_proj / v_up_proj so LoRA "
                 "applies to them", routed)
    return routed
