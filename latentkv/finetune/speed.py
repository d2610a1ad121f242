"""torch.compile for training: one compilation per distinct layer shape, not one per layer.

Every decoder layer is compiled in place ("regional compilation"): layers with the same code and
shapes share one compiled graph, so a 30-layer model compiles in seconds. The latent attention
keeps its RoPE frequencies as a Python list (a different one per layer), which torch.compile
would guard on and recompile for at every layer; `use_frequency_buffers` calls each layer's
`use_rope_frequency_buffer` hook, which gives it the same numbers as a (non-persistent) buffer
instead, which compiled code takes as an input.
"""

from __future__ import annotations

import logging

import torch

from latentkv.errors import LatentKVError
from latentkv.finetune.targets import call_attention_hooks

log = logging.getLogger(__name__)


def use_frequency_buffers(model: torch.nn.Module) -> int:
    """Have every latentkv attention with RoPE frequencies of its own read them from a buffer (its
    `use_rope_frequency_buffer` hook; the same numbers). Returns the number of layers."""

    def check_older(name: str, module: torch.nn.Module) -> None:
        if isinstance(getattr(module, "rope_inv_freq", None), list):
            raise LatentKVError(
                f"{name or type(module).__name__}: its modeling file was written by an older latentkv and keeps "
                "the RoPE frequencies as a Python list (no `use_rope_frequency_buffer` hook), on which "
                "torch.compile would recompile every layer. Convert the source again with the current latentkv "
                "(`latentkv convert`), or run without --compile."
            )

    return call_attention_hooks(model, "use_rope_frequency_buffer", check_older)


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder layer in place (the `layers` list of a HF causal LM)."""
    import torch._dynamo

    # A few distinct layer shapes (per-layer latent widths) each compile once; leave room for them.
    for key in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 64))
    use_frequency_buffers(model)
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            for layer in module:
                layer.compile(dynamic=False)
            return len(module)
    raise LatentKVError(f"{type(model).__name__} has no `layers` list to compile; run without --compile")
