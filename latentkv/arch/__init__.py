"""Per-architecture facts as data: adding an architecture is adding a row."""

from latentkv.arch.tables import ARCHITECTURES, ArchSpec, AttentionGeometry, geometry_of, get_arch

__all__ = ["ARCHITECTURES", "ArchSpec", "AttentionGeometry", "geometry_of", "get_arch"]
