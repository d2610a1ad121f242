"""Perplexity with the project's protocol (docs/evaluation.md): the text joined as in the file, tokenized
once, cut into non-overlapping windows; PPL = exp(mean NLL over every predicted token)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from latentkv.errors import LatentKVError

from latentkv.data import DEFAULT_EVAL as DEFAULT_EVAL_TEXT
from latentkv.data import logical_name, logical_suffix, read_text, resolve_text


@dataclass(frozen=True)
class PerplexityProtocol:
    text: str = DEFAULT_EVAL_TEXT
    window: int = 512
    windows: int = 64

    def describe(self) -> str:
        return f"{logical_name(resolve_text(self.text))}, {self.windows} x {self.window}-token windows, PPL = exp(mean NLL)"


def read_eval_text(path: Path) -> str:
    """A .txt/.raw file as it is; a .jsonl file (e.g. `latentkv sample` output) as its "text" fields
    joined by blank lines."""
    if logical_suffix(path) == ".jsonl":
        from latentkv.calibration.data import read_jsonl

        return "\n\n".join(read_jsonl(path, "text"))
    return read_text(path)


def eval_windows(tokenizer, protocol: PerplexityProtocol) -> torch.Tensor:
    path = Path(resolve_text(protocol.text))
    if not path.exists():
        raise LatentKVError(f"Evaluation text {path} not found; pass --eval-text with a .txt/.raw/.jsonl file")
    ids = tokenizer(read_eval_text(path), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // protocol.window
    if n < protocol.windows:
        raise LatentKVError(f"{path} gives only {n} windows of {protocol.window} tokens; lower --eval-windows")
    return ids[: protocol.windows * protocol.window].view(protocol.windows, protocol.window)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress=None, logits_of=None) -> float:
    """logits_of(batch) -> logits: how the model is run (default: one forward without a cache)."""
    device = next(model.parameters()).device
    logits_of = logits_of or (lambda batch: model(batch, use_cache=False).logits)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = logits_of(batch).float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
        if progress is not None:
            progress(start)
    return math.exp(total_nll / total_tokens)
