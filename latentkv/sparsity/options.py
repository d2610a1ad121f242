"""`TrainOptions`: the settings of `latentkv predictor train`. A field declared with `setting` is a flag
of the command (`latentkv.schema`), so its default lives here only; the others are the trainer's own.
Nothing heavy is imported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from latentkv.calibration.options import SEED
from latentkv.data import DEFAULT_CALIBRATION
from latentkv.errors import LatentKVError
from latentkv.schema import OVERWRITE, setting


@dataclass(frozen=True)
class TrainOptions:
    """model: a latentkv-format MLA/GLA folder; out: predictor folder; data: training text (folder
    or file; WikiText refused); exclude: file names under ``data`` left out (held out for
    evaluation); windows / seq_len: collected windows (10% go to validation); repeats / repeat_len:
    spans of each window copied to a later point of it (``train.with_repeats``); steps / batch_size / lr:
    Adam on the predictor; budget: fraction of blocks the decode attends (validation recall, and the
    choices of the replayed decodes); refresh: the decode's dense-refresh period -- above 1 the
    training histories are the ones the predictor's own sparse decode records (``train.OnPolicyHistories``)."""

    model: str = setting(argument=True, help="Converted model folder (latentkv format, MLA or GLA).")
    out: str = setting(cli_type=Path, help="Folder for attention_predictor.safetensors + .json.")
    data: str = setting(DEFAULT_CALIBRATION, help="Training text, file or folder (WikiText refused).")
    exclude: tuple[str, ...] = setting((), cli_type=list[str] | None,
                                       help="File name under --data to hold out; repeatable.")
    windows: int = setting(24, help="Text windows to collect attention from (10% validate).")
    seq_len: int = setting(1024, help="Tokens per window.")
    repeats: int = setting(0, help="Spans of each window repeated later in it (teaches copy / retrieval).")
    repeat_len: int = setting(48, help="Tokens per repeated span.")
    page_size: int = setting(16, help="Tokens per block (= the decode cache's page size).")
    history: int = setting(16, help="Steps of history the predictor reads.")
    channels: int = 8
    steps: int = setting(1500, help="Optimizer steps.")
    batch_size: int = 128
    lr: float = 3e-3
    budget: float = setting(0.25, help="Fraction of blocks a decode step attends (validation recall; --refresh's "
                                       "replayed decodes).")
    refresh: int = setting(1, help="Train on the histories a sparse decode with a dense refresh every R steps "
                                   "records (1: dense histories).")
    seed: int = setting(0, **SEED)
    overwrite: bool = setting(False, **OVERWRITE)

    def __post_init__(self):
        if self.windows < 2:
            raise LatentKVError("--windows must be >= 2 (one at least for validation).")
        if self.seq_len < 4 * self.page_size or self.seq_len <= self.history + 1:
            raise LatentKVError(f"--seq-len {self.seq_len} is too short for pages of {self.page_size} and a "
                                f"history of {self.history}; use >= {max(4 * self.page_size, self.history + 2)}.")
        if self.repeats < 0 or self.repeat_len < 1 or (self.repeats and self.seq_len < 4 * self.repeat_len):
            raise LatentKVError(f"--repeats must be >= 0 and --repeat-len >= 1, with --seq-len >= 4 x --repeat-len; got "
                                f"{self.repeats}, {self.repeat_len}, {self.seq_len}.")
        if not 0 < self.budget < 1 or self.refresh < 1:
            raise LatentKVError(f"--budget must be a fraction in (0, 1) and --refresh >= 1; got {self.budget}, "
                                f"{self.refresh}.")
        if self.refresh > 1 and self.seq_len < self.history + 64:
            raise LatentKVError(f"--refresh replays 64 decode steps after a history of {self.history}: use "
                                f"--seq-len >= {self.history + 64}.")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise LatentKVError("--steps, --batch-size and --lr must be positive.")
