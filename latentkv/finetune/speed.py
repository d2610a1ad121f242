"""torch.compile for training: one compilation per distinct layer shape, not one per layer.

Every decoder layer is compiled in place ("regional compilation"): layers with the same code and
shapes share one compiled graph, so a 30-layer model compiles in seconds. The latent attention
keeps its RoPE frequencies as a Python list (a different one per layer), which torch.compile
would guard on and recompile for at every layer; `use_frequency_buffers` gives each layer the
same numbers as a (non-persistent) buffer instead, which compiled code takes as an input.
"""

from __future__ import annotations

import logging
import types

import torch

from latentkv.convert.registry import ATTENTION_KINDS
from latentkv.errors import LatentKVError

log = logging.getLogger(__name__)


def _rope_from_buffer(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """LatentAttention._rope with the frequencies read from the `rope_freq` buffer (same numbers)."""
    if self.rope_dim == 0:
        return x
    freqs = positions[:, None, :, None].float() * self.rope_freq[None, None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * self.rope_attention_scaling).to(x.dtype)
    sin = (emb.sin() * self.rope_attention_scaling).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def use_frequency_buffers(model: torch.nn.Module) -> int:
    """Give every LatentAttention its RoPE frequencies as a buffer and read them from there."""
    patched = 0
    for module in model.modules():
        if type(module).__name__ == ATTENTION_KINDS["latent"]["layer_class"] and not hasattr(module, "rope_freq"):
            weight = module.q_proj.weight
            freq = torch.tensor(module.rope_inv_freq, dtype=torch.float32, device=weight.device)
            module.register_buffer("rope_freq", freq, persistent=False)
            module._rope = types.MethodType(_rope_from_buffer, module)
            patched += 1
    return patched


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
