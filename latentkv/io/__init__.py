"""Reading and writing checkpoints: lazy readers, crash-safe writers, sources, cards.

Names are imported on first use (PEP 562), so `import latentkv.io.card` or the Hub code does not
pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LazyCheckpoint": "latentkv.io.lazy",
    "OutputFolder": "latentkv.io.writer",
    "ShardedWriter": "latentkv.io.writer",
    "copy_sidecars": "latentkv.io.writer",
    "parse_size": "latentkv.io.writer",
    "Source": "latentkv.io.source",
    "open_source": "latentkv.io.source",
    "gguf_to_folder": "latentkv.io.source",
    "latentkv_cache_dir": "latentkv.io.source",
    "smollm2_folder": "latentkv.io.assets",
    "write_model_card": "latentkv.io.card",
    "write_recipe": "latentkv.io.card",
    "redact_secrets": "latentkv.io.card",
}

__all__ = [
    "LazyCheckpoint",
    "OutputFolder",
    "ShardedWriter",
    "Source",
    "copy_sidecars",
    "gguf_to_folder",
    "latentkv_cache_dir",
    "open_source",
    "parse_size",
    "redact_secrets",
    "smollm2_folder",
    "write_model_card",
    "write_recipe",
]

if TYPE_CHECKING:
    from latentkv.io.assets import smollm2_folder
    from latentkv.io.card import redact_secrets, write_model_card, write_recipe
    from latentkv.io.lazy import LazyCheckpoint
    from latentkv.io.source import Source, gguf_to_folder, latentkv_cache_dir, open_source
    from latentkv.io.writer import OutputFolder, ShardedWriter, copy_sidecars, parse_size


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'latentkv.io' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
