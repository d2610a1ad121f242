"""Run a source model one decoder layer at a time from lazily read weights.

Only one layer's weights and the current activations are in memory: the model skeleton lives on
the `meta` device, each layer is materialised with `to_empty` and filled from the checkpoint,
run over every calibration window, and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from latentkv.arch import get_arch
from latentkv.errors import LatentKVError

log = logging.getLogger(__name__)


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if dtype not in table:
        raise LatentKVError(f"Unknown dtype {dtype!r}; use one of {', '.join(sorted(table))}")
    return table[dtype]


class LayerStream:
    """Source model as a sequence of decoder layers materialised one at a time."""

    def __init__(self, config, weights, *, device: str = "cpu", dtype: str | torch.dtype = "float32", batch_size: int = 8):
        from transformers import AutoModelForCausalLM

        self.config = config
        self.weights = weights
        self.arch = get_arch(config)
        self.device = torch.device(device)
        self.dtype = _resolve_dtype(dtype)
        self.batch_size = batch_size
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        # Rotary buffers are computed at construction: build this one for real.
        self.rotary = type(self.skeleton.model.rotary_emb)(config=config).to(self.device)
        self.num_layers = config.num_hidden_layers

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.rotary.inv_freq.detach().double().cpu()

    @property
    def attention_scaling(self) -> float:
        return float(getattr(self.rotary, "attention_scaling", 1.0))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.weights.get(self.arch.embed, dtype=self.dtype, device=self.device)
        return nn.functional.embedding(ids.to(self.device), table)

    def position_embeddings(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(seq_len, device=self.device)[None]
        dummy = torch.empty(1, seq_len, 1, device=self.device, dtype=self.dtype)
        return self.rotary(dummy, pos)

    def layer_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Tensors of layer i under transformers' in-memory module names (relative to the layer)."""
        prefix = self.arch.layer_key(i)
        disk = {k[len(prefix):]: k for k in self.weights.keys() if k.startswith(prefix)}
        out: dict[str, torch.Tensor] = {}
        consumed: set[str] = set()
        for module_name, patterns in self.arch.expert_stacks:
            num_experts = getattr(self.config, "num_local_experts", None) or getattr(self.config, "num_experts", 0)
            if not all(p.format(e=0) in disk for p in patterns):
                continue
            per_expert = []
            for e in range(num_experts):
                parts = [self.weights.get(disk[p.format(e=e)], dtype=self.dtype, device=self.device) for p in patterns]
                consumed.update(p.format(e=e) for p in patterns)
                per_expert.append(torch.cat(parts, dim=0) if len(parts) > 1 else parts[0])
            out[module_name] = torch.stack(per_expert)
        for rel, full in disk.items():
            if rel in consumed:
                continue
            name = rel
            for old, new in self.arch.disk_renames:
                name = name.replace(old, new)
            out[name] = self.weights.get(full, dtype=self.dtype, device=self.device)
        return out

    def load_layer(self, i: int) -> nn.Module:
        layer = self.skeleton.model.layers[i]
        layer = layer.to_empty(device=self.device)
        state = self.layer_state_dict(i)
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not m.endswith("inv_freq")]
        if missing or unexpected:
            raise LatentKVError(
                f"Layer {i} of the checkpoint does not match transformers' {type(layer).__name__}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}. The checkpoint may be from another "
                "architecture or transformers version."
            )
        layer.eval()
        return layer

    def release_layer(self, i: int) -> None:
        # Back to meta so the weights are freed.
        self.skeleton.model.layers[i] = self.skeleton.model.layers[i].to("meta")

    @torch.no_grad()
    def run(self, layer: nn.Module, hidden: torch.Tensor, pos_emb) -> torch.Tensor:
        """Apply a decoder layer to every window, in batches, in place."""
        for start in range(0, hidden.shape[0], self.batch_size):
            chunk = hidden[start : start + self.batch_size]
            out = layer(chunk, attention_mask=None, position_embeddings=pos_emb)
            hidden[start : start + self.batch_size] = out[0] if isinstance(out, tuple) else out
        return hidden

    def batches(self, hidden: torch.Tensor) -> Iterator[torch.Tensor]:
        for start in range(0, hidden.shape[0], self.batch_size):
            yield hidden[start : start + self.batch_size]
