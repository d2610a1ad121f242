"""Fused decode kernels (Triton) with PyTorch references beside them.

``decode_attention`` is the facade the model side calls: the Triton kernel on CUDA when triton
imports, the reference otherwise, with ``backend=`` to force one.
"""

from latentkv.kernels.mla_decode import (
    DecodeConfig,
    choose_num_splits,
    decode_attention,
    default_config,
    mla_decode,
    mla_decode_reference,
    write_paged,
)

__all__ = [
    "DecodeConfig",
    "choose_num_splits",
    "decode_attention",
    "default_config",
    "mla_decode",
    "mla_decode_reference",
    "write_paged",
]
