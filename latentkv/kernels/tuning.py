"""Launch configurations of the split decode kernel measured per shape on a GPU.

``scripts/tune_decode.py`` times every candidate configuration (``candidate_configs``) of a grid of
shapes and writes the fastest one without register spills per shape into ``tuned/<family>.json``.
``mla_decode.default_config`` asks ``tuned_config`` first and falls back to its rules where no table
covers the GPU or the shape.

A shape is keyed by the element bytes of the cache, the latent and RoPE widths as they are, and the
query rows per latent head rounded up to a power of 2 (16 .. 128). A shape between table rows takes
the nearest row bucket of the same widths; other widths keep the rules. Widths are not pooled by
their padded blocks: on an H100 the configuration measured best at 192 + 64 spilled 410 registers at
148 + 40 (same padded blocks) and ran 2.7x slower there than the rules' choice.
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


def padded_widths(r_c: int, rope_dim: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_DR): the kernel's power-of-2 column blocks of a latent and RoPE width."""
    return max(16, next_pow2(r_c)), (max(16, next_pow2(rope_dim)) if rope_dim > 0 else 0)


def shape_key(rows: int, r_c: int, rope_dim: int, elt: int) -> tuple[int, int, int, int]:
    """(element bytes, latent width, RoPE width, row bucket) of a table entry."""
    return elt, r_c, rope_dim, row_bucket(rows)


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
    """The entry of ``key``, else the one of the same element size and widths with the nearest row
    bucket (in log2 steps); None when those widths are not in the table."""
    if key in table:
        return table[key]
    elt, r_c, rope_dim, rows = key
    near = [k for k in table if k[:3] == (elt, r_c, rope_dim)]
    if not near:
        return None
    return table[min(near, key=lambda k: (abs(math.log2(k[3]) - math.log2(rows)), k[3]))]


def tuned_config(device, rows: int, r_c: int, rope_dim: int, elt: int) -> dict | None:
    """Configuration fields measured for this shape on this GPU family, or None."""
    family = gpu_family(device)
    if family is None:
        return None
    return nearest(load_table(family), shape_key(rows, r_c, rope_dim, elt))


def candidate_configs(rows: int, r_c: int, rope_dim: int, elt: int) -> list[dict]:
    """Configurations worth timing for one shape: block sizes whose accumulators, query block and
    scores fit the registers (estimate: <= 192 32-bit registers a thread) and whose pipelined cache
    tiles fit shared memory (<= 220 KB), with 4 or 8 warps and 2-7 stages. Wide latents (a padded
    block of >= 1024 columns) also try splitting the output columns over 2 or 4 programs
    (``out_splits``: the accumulator shrinks by that factor; each program also loads its value
    slice of every tile, counted in the shared-memory estimate)."""
    block_r, block_dr = padded_widths(r_c, rope_dim)
    m0 = row_bucket(rows)
    ms = [m for m in (128, 64, 32, 16) if m <= m0][:3]  # smaller M: a smaller accumulator (wide latents)
    out = []
    for out_splits in (1, 2, 4) if block_r >= 1024 else (1,):
        block_o = block_r // out_splits
        for block_m in ms:
            for block_n in (16, 32, 64, 128):
                for num_warps in (4, 8):
                    threads = 32 * num_warps
                    regs = (block_m * block_o * 4 + block_m * (block_r + block_dr) * elt
                            + 2 * block_m * block_n * 4) / (4 * threads)  # fmt: skip
                    if regs > 192:
                        continue
                    for num_stages in (2, 3, 5, 7):
                        tile = block_n * (block_r + block_dr + (block_o if out_splits > 1 else 0)) * elt
                        if (num_stages - 1) * tile + block_m * (block_r + block_dr) * elt > 220 * 1024:
                            continue
                        c = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
                        out.append(c if out_splits == 1 else dict(c, out_splits=out_splits))
    return out
