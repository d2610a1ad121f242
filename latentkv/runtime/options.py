"""`GenerateOptions`: the settings of `latentkv generate`. Each field is a flag of the command
(`setting`, `latentkv.schema`), so the defaults live here only; nothing heavy is imported."""

from __future__ import annotations

from dataclasses import dataclass

from latentkv.schema import DEVICE, DTYPE, SOURCE, setting


@dataclass
class GenerateOptions:
    """Greedy generation of `max_new_tokens` after each prompt, through the paged latent cache."""

    model: str = setting(**SOURCE)
    prompt: tuple[str, ...] = setting(help="Prompt (repeat for a batch).", cli_type=list[str])
    max_new_tokens: int = setting(64, help="Tokens to generate.")
    backend: str = setting("auto", help="auto (Triton on CUDA), triton, reference.")
    device: str = setting("cpu", **DEVICE)
    dtype: str = setting("float32", **DTYPE)
