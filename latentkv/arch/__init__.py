"""Per-architecture facts as data: adding an architecture is adding a row."""

from latentkv.arch.tables import (
    ARCHITECTURES,
    ArchSpec,
    AttentionGeometry,
    LayerAttention,
    geometry_of,
    get_arch,
    hybrid_sliding,
    kv_values_at_context,
)

__all__ = ["ARCHITECTURES", "ArchSpec", "AttentionGeometry", "LayerAttention", "geometry_of", "get_arch",
           "hybrid_sliding", "kv_values_at_context"]
