"""Registry of conversion methods: name -> implementation, imported only when used.

A method provides: `make_config(options, format)` (its typed config, validated), `validate(...)`
(refuse impossible requests before any work), `plan(...)` (widths per layer from statistics),
`sequential_module(...)` (the converted attention for sequential calibration) and `write(...)`.
"""

from __future__ import annotations

import importlib

from latentkv.errors import LatentKVError

METHODS: dict[str, str] = {
    "mla": "latentkv.convert.mla_method:MLAMethod",
    "gla": "latentkv.convert.mla_method:GLAMethod",
    "gta": "latentkv.convert.mla_method:GTAMethod",
}

# Paper each method follows (cited by the model card).
PAPERS: dict[str, list[str]] = {
    "mla": ["TransMLA (arXiv 2502.07864)", "MHA2MLA (arXiv 2502.14837)", "CARE (ICLR 2026)"],
    "gta": ["Hardware-Efficient Attention for Fast Decoding, Zadouri, Strauss, Dao (arXiv 2505.21487)"],
    "gla": ["Hardware-Efficient Attention for Fast Decoding, Zadouri, Strauss, Dao (arXiv 2505.21487)"],
}


def register_method(name: str, target: str, papers: list[str]) -> None:
    METHODS[name] = target
    PAPERS[name] = papers


def get_method(name: str):
    target = METHODS.get(name)
    if target is None:
        raise LatentKVError(f"Unknown conversion target {name!r}; known: {', '.join(sorted(METHODS))}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()


register_method("gqa", "latentkv.convert.gqa_method:GQAMethod", ["Effectively Compress KV Heads for LLM, Yu et al. 2024 (arXiv 2406.07056)"])
register_method("gta-s", "latentkv.convert.gtas_method:GTASMethod", ["GTA: Grouped-head latenT Attention, Sun et al. 2025 (arXiv 2506.17286)"])

