"""Launch configurations of the split decode kernel measured per shape on a GPU.

``scripts/tune_decode.py`` times every candidate configuration (``candidate_configs``) of a grid of
shapes and writes the fastest one without register spills per shape into ``tuned/<family>.json``.
``mla_decode.default_config`` asks ``tuned_config`` first and falls back to its rules where no table
covers the GPU or the shape.

A shape is keyed by what the compiled kernel depends on: element bytes of the cache, the padded
latent width ``BLOCK_R`` and RoPE width ``BLOCK_DR`` (powers of 2), and the query rows per latent
head rounded up to a power of 2 (16 .. 128). A shape between table rows takes the nearest row of the
same widths (rows, then RoPE width); other widths are not extrapolated.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

TABLE_DIR = Path(__file__).parent / "tuned"
ROW_BUCKETS = (16, 32, 64, 128)


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def row_bucket(rows: int) -> int:
    return max(ROW_BUCKETS[0], min(ROW_BUCKETS[-1], next_pow2(rows)))


def shape_key(rows: int, r_c: int, rope_dim: int, elt: int) -> tuple[int, int, int, int]:
    """(element bytes, BLOCK_R, BLOCK_DR, row bucket): what a compiled kernel's speed depends on."""
    block_dr = max(16, next_pow2(rope_dim)) if rope_dim > 0 else 0
    return elt, max(16, next_pow2(r_c)), block_dr, row_bucket(rows)


def gpu_family(device) -> str | None:
    """Table name of a CUDA device: ``sm<major><minor>`` (H100 and H200 are both sm90)."""
    import torch

    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@functools.lru_cache(maxsize=8)
def load_table(family: str) -> dict[tuple[int, int, int, int], dict]:
    """Shape key -> configuration fields, from ``tuned/<family>.json`` ({} when there is none)."""
    path = TABLE_DIR / f"{family}.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {tuple(e["key"]): e["config"] for e in data["entries"]}


def nearest(table: dict, key: tuple[int, int, int, int]) -> dict | None:
    """The entry of ``key``, else the one of the same element size and latent block with the nearest
    row bucket and RoPE block (in log2 steps); None when the latent block is not in the table."""
    if key in table:
        return table[key]
    elt, block_r, block_dr, rows = key
    near = [k for k in table if k[0] == elt and k[1] == block_r]
    if not near:
        return None

    def distance(k):
        return (abs(math.log2(k[3]) - math.log2(rows)), abs(math.log2(max(k[2], 8)) - math.log2(max(block_dr, 8))))

    return table[min(near, key=distance)]


def tuned_config(device, rows: int, r_c: int, rope_dim: int, elt: int) -> dict | None:
    """Configuration fields measured for this shape on this GPU family, or None."""
    family = gpu_family(device)
    if family is None:
        return None
    return nearest(load_table(family), shape_key(rows, r_c, rope_dim, elt))


def candidate_configs(rows: int, r_c: int, rope_dim: int, elt: int) -> list[dict]:
    """Configurations worth timing for one shape: block sizes whose accumulators, query block and
    scores fit the registers (estimate: <= 192 32-bit registers a thread) and whose pipelined cache
    tiles fit shared memory (<= 220 KB), with 4 or 8 warps and 2-7 stages."""
    _, block_r, block_dr, m0 = shape_key(rows, r_c, rope_dim, elt)
    ms = [m for m in (128, 64, 32, 16) if m <= m0][:3]  # smaller M: a smaller accumulator (wide latents)
    out = []
    for block_m in ms:
        for block_n in (16, 32, 64, 128):
            for num_warps in (4, 8):
                threads = 32 * num_warps
                regs = (block_m * block_r * 4 + block_m * (block_r + block_dr) * elt + 2 * block_m * block_n * 4) / (
                    4 * threads
                )
                if regs > 192:
                    continue
                for num_stages in (2, 3, 5, 7):
                    tile = block_n * (block_r + block_dr) * elt
                    if (num_stages - 1) * tile + block_m * (block_r + block_dr) * elt > 220 * 1024:
                        continue
                    out.append(dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages))
    return out
