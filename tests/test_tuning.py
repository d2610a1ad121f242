"""The decode kernel's tuned-configuration table (latentkv.kernels.tuning): shape keys, the nearest-entry
lookup, and the candidate configurations the tuning script times. Pure functions: no GPU needed."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from latentkv.errors import LatentKVError
from latentkv.kernels import tuning

md = importlib.import_module("latentkv.kernels.mla_decode")  # the module (the package attribute is the function)


def test_shape_key_keeps_widths_and_buckets_rows():
    """Guards the key: the widths as they are (the kernel's padded blocks apart), rows to 16..128."""
    assert tuning.shape_key(32, 156, 36, 2) == (2, 156, 36, 32)
    assert tuning.shape_key(9, 960, 64, 2) == (2, 960, 64, 16)
    assert tuning.shape_key(512, 96, 0, 1) == (1, 96, 0, 128)
    assert tuning.padded_widths(156, 36) == (256, 64) and tuning.padded_widths(96, 0) == (128, 0)


def test_nearest_takes_same_widths_only():
    """Guards the lookup: an exact key wins; otherwise the nearest row bucket of the same element size
    and widths; other widths, even with the same padded blocks, keep the rules."""
    table = {(2, 192, 64, 32): {"block_m": 32}, (2, 192, 64, 16): {"block_m": 16}, (2, 192, 64, 64): {"block_m": 64},
             (2, 512, 64, 32): {"block_m": 99}}
    assert tuning.nearest(table, (2, 192, 64, 16))["block_m"] == 16
    assert tuning.nearest(table, (2, 192, 64, 128))["block_m"] == 64  # rows 64 is nearest to 128
    assert tuning.nearest(table, (2, 148, 40, 32)) is None  # same padded blocks as 192 + 64
    assert tuning.nearest(table, (2, 192, 32, 32)) is None
    assert tuning.nearest(table, (1, 192, 64, 32)) is None


def test_table_file_drives_default_config(tmp_path, monkeypatch):
    """Guards the hand-over: a table entry for the GPU family becomes default_config's answer for the
    shapes it covers, and shapes it does not cover keep the rules."""
    entry = {"key": [2, 156, 36, 32], "config": {"block_m": 32, "block_n": 16, "num_warps": 8, "num_stages": 3,
                                                   "ctas_per_sm": 2}}
    (tmp_path / "sm90.json").write_text(json.dumps({"entries": [entry]}))
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(tuning, "gpu_family", lambda device: "sm90")
    tuning.load_table.cache_clear()
    try:
        cfg = md.default_config(32, 156, 36, torch.bfloat16, torch.device("cpu"))
        assert cfg == md.DecodeConfig(block_m=32, block_n=16, num_warps=8, num_stages=3, ctas_per_sm=2)
        rules = md.default_config(32, 96, 32, torch.bfloat16)
        assert md.default_config(32, 96, 32, torch.bfloat16, torch.device("cpu")) == rules
    finally:
        tuning.load_table.cache_clear()


@pytest.mark.parametrize("rows,r_c,rope", [(32, 192, 64), (16, 960, 64), (64, 96, 32), (128, 448, 64), (32, 1024, 128)])
def test_candidates_fit_the_estimates(rows, r_c, rope):
    """Guards the candidate list: non-empty, unique, every entry a valid DecodeConfig within the
    register and shared-memory estimates the docstring states (the accumulator of one output column
    slice; the value slices' tiles counted in shared memory); wide latents get column splits."""
    cands = tuning.candidate_configs(rows, r_c, rope, 2)
    assert cands and len({tuple(sorted(c.items())) for c in cands}) == len(cands)
    block_r, block_dr = tuning.padded_widths(r_c, rope)
    for c in cands:
        cfg = md.DecodeConfig(**c)
        block_o, _ = md.output_slices(r_c, cfg.out_splits)
        threads = 32 * c["num_warps"]
        regs = (c["block_m"] * block_o * 4 + c["block_m"] * (block_r + block_dr) * 2
                + 2 * c["block_m"] * c["block_n"] * 4) / (4 * threads)
        assert regs <= 192
        slice_cols = block_o if cfg.out_splits > 1 else 0
        smem = ((c["num_stages"] - 1) * c["block_n"] * (block_r + block_dr + slice_cols) * 2
                + c["block_m"] * (block_r + block_dr) * 2)
        assert smem <= 220 * 1024
    splits = {c.get("out_splits", 1) for c in cands}
    assert splits == ({1, 2, 4} if block_r >= 1024 else {1})
    if block_r >= 1024:  # the rules' choice for wide latents is among the candidates
        rule = md.default_config(rows, r_c, rope, torch.bfloat16)
        key = lambda c: (c["block_m"], c["block_n"], c["num_warps"], c["num_stages"], c.get("out_splits", 1))  # noqa: E731
        assert key(rule.__dict__) in {key(c) for c in cands}


def test_wide_latent_rules():
    """Guards the wide-latent rules: 16 query rows per program for plain bf16 / fp16 caches; output
    column slices (at least 16 columns each) where 16 rows still do not fit (fp8 / int4 tiles, float32,
    latents over 1024); narrower latents keep out_splits 1."""
    bf = md.default_config(32, 960, 64, torch.bfloat16)
    assert (bf.block_m, bf.out_splits) == (16, 1)
    assert md.default_config(32, 640, 64, torch.float16).block_m == 16
    assert md.default_config(32, 960, 64, torch.bfloat16, kv_quant="fp8").out_splits == 2
    assert md.default_config(32, 1024, 0, torch.bfloat16, kv_quant="int4").out_splits == 4
    assert md.default_config(32, 960, 64, torch.float32).out_splits == 2
    assert md.default_config(16, 2048, 64, torch.bfloat16).out_splits == 4
    for r_c in (96, 448, 512):
        assert md.default_config(32, r_c, 64, torch.bfloat16).out_splits == 1
    assert md.output_slices(640, 2) == (512, 2) and md.output_slices(640, 4) == (256, 3)
    assert md.output_slices(960, 1) == (1024, 1)
    for bad in (3, 0, 128):
        with pytest.raises(LatentKVError):
            md.output_slices(960, bad)
