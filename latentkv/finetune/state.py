"""Resumable training checkpoints, written atomically beside the output.

`<output>.checkpoints/step-0000123/` holds:
- `trainable.safetensors`: the trained tensors (adapters, or the trained attention weights);
- `optimizer-<rank>.pt`: the optimizer state of each process (tensors and numbers only, read back
  with `weights_only=True`);
- `state.json`: step, tokens, data position (sequences consumed), scheduler state, the settings the
  run must share to be resumed, and the random-number state.
A checkpoint is built in a `.partial` folder (every process writes its part, then the main process
writes state.json last) and renamed when complete; only complete ones are ever read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from latentkv.errors import LatentKVError

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    dirs = _step_dirs(root)
    return dirs[-1] if dirs else None


def check_resumable(path: Path, resume_key: dict) -> dict:
    """The checkpoint's state, if it was made with the same settings; else a clear error."""
    state = json.loads((path / STATE_FILE).read_text())
    saved = state.get("resume_key", {})
    diff = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in resume_key.items() if saved.get(k) != v]
    if diff:
        raise LatentKVError(
            f"The checkpoints in {path.parent} come from a run with other settings ({'; '.join(diff)}); "
            f"rerun with the same settings to resume, or delete {path.parent} to start over"
        )
    return state


def write_trainable(tmp: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / TRAINABLE_FILE))


def write_optimizer(tmp: Path, rank: int, optimizer_state: dict) -> None:
    torch.save(optimizer_state, tmp / f"optimizer-{rank}.pt")


def finish(tmp: Path, step: int, state: dict, keep: int) -> Path:
    """Write state.json last, rename into place, drop all but the `keep` newest (main process)."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    final = tmp.parent / f"step-{step:07d}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in _step_dirs(tmp.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in tmp.parent.glob(".step-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    log.info("checkpoint: %s", final)
    return final


def read_trainable(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / TRAINABLE_FILE))


def read_optimizer(path: Path, rank: int, world: int, saved_world: int) -> dict:
    """This process's optimizer state (data parallel: every process holds the same, so any file serves)."""
    f = path / f"optimizer-{rank}.pt"
    if not f.is_file():
        if saved_world != world:
            f = path / "optimizer-0.pt"
        if not f.is_file():
            raise LatentKVError(f"{path} lacks the optimizer state {f.name}; delete {path} to resume from an older one")
    return torch.load(f, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
