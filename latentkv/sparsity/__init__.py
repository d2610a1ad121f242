"""Token sparsity at decode: each decode step attends only to the KV blocks (cache pages) a policy
picks -- dense, window (StreamingLLM), last-step, oracle, or a learned AttentionPredictor
(Yang et al., arXiv 2502.04077). Policies: ``policies``; block masses: ``masses``; the hook the
paged cache calls: ``runtime``; the predictor model: ``predictor``; training: ``train``;
teacher-forced comparison with dense decoding: ``evaluate``; the cache in host memory with a
device page pool and prefetch of the forecast pages: ``offload``."""

import importlib

# Loaded on first use: the CLI reads `latentkv.sparsity.options` without torch (`--help` stays instant).
_EXPORTS = {"POLICIES": "policies", "SparseConfig": "policies", "choose_blocks": "policies",
            "parse_budget": "policies", "SparseAttention": "runtime"}

__all__ = ["POLICIES", "SparseAttention", "SparseConfig", "choose_blocks", "parse_budget"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
