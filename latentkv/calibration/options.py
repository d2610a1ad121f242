"""`CalibOptions`: which calibration text and how much of it. Its fields are the `--calib-*` flags
of the commands that calibrate (`latentkv.schema`), so the defaults live here only; nothing heavy
is imported."""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from pathlib import Path

from latentkv.data import DEFAULT_CALIBRATION
from latentkv.schema import parameter_names, setting

PANEL = "Calibration"
# Flags that other commands share with calibration (`setting(..., **SPLIT)`): one help text each.
SPLIT = dict(panel=PANEL, help="Split when --calib-data is a datasets name.")
TEXT_FIELD = dict(panel=PANEL, help="Text column/field in .jsonl/.parquet/datasets.")
SEED = dict(panel=PANEL, help="Seed for picking windows.")


@dataclass
class CalibOptions:
    """Calibration data and how much of it: shared by every command that calibrates."""

    data: str = setting(DEFAULT_CALIBRATION, flag="calib_data", panel=PANEL, help=(
        "Calibration text: file/folder (.txt/.jsonl/.parquet) or datasets name[:config]."))
    split: str = setting("train", flag="calib_split", **SPLIT)
    text_field: str = setting("text", **TEXT_FIELD)
    samples: int = setting(128, flag="calib_samples", panel=PANEL, help="Number of calibration windows.")
    seq_len: int = setting(512, flag="calib_seq_len", panel=PANEL, help="Tokens per calibration window.")
    seed: int = setting(0, flag="calib_seed", **SEED)
    cache: str | None = setting(None, flag="calib_cache", panel=PANEL, cli_type=Path | None, help=(
        "Folder for resumable statistics (default: ~/.cache/latentkv/calibration/<fingerprint>)."))
    # Windows used to measure each head's attention distances (for the RoPE shrink); recipe only.
    profile_samples: int = 8


def recipe_keys() -> dict[str, tuple[str, type]]:
    """Each field's (name, type) in a flat `convert` recipe: its flag's name (`calib_samples`,
    `text_field`), else `calib_<field>`. The statistics' folder is a place on one machine: no recipe
    sets it."""
    names, hints = parameter_names(CalibOptions), typing.get_type_hints(CalibOptions)
    return {f.name: (names.get(f.name, f"calib_{f.name}"), hints[f.name]) for f in fields(CalibOptions)
            if f.name != "cache"}
