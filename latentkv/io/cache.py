"""What latentkv keeps under its cache folder (`$LATENTKV_CACHE`, else `~/.cache/latentkv`): list it
with sizes, and prune it. Calibration statistics (`calibration/<key>/`) and GGUF dequantizations
(`gguf/<digest>/`) can be pruned; they are made again when needed."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from latentkv.errors import LatentKVError

PRUNABLE = ("calibration", "gguf")


@dataclass
class CacheEntry:
    kind: str  # "calibration", "gguf", or the name of another top-level folder
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch
    about: str  # what it was made from, where known
    state: str = "done"  # "done", "unfinished" (a resumable calibration), "leftover" (a killed run's temporary)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _newest(path: Path) -> float:
    newest = path.stat().st_mtime
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, f)).st_mtime)
            except OSError:
                pass
    return newest


def _describe(kind: str, path: Path) -> tuple[str, str]:
    """(what it was made from, state) of one cache folder."""
    from latentkv.io.writer import LEFTOVER_RE

    if LEFTOVER_RE.match(path.name):
        return "temporary folder of an interrupted run", "leftover"
    if kind == "calibration":
        about = ""
        try:
            info = json.loads((path / "about.json").read_text(encoding="utf-8"))
            about = f"{info.get('source', '?')} on {info.get('calib_data', '?')}"
        except (OSError, ValueError, AttributeError):
            pass
        state = "unfinished" if (path / "hidden.pt").exists() else "done"
        return about, state
    if kind == "gguf":
        try:
            info = json.loads((path / "latentkv_gguf_source.json").read_text(encoding="utf-8"))
            return f"dequantized {info.get('gguf_file', '?')}", "done"
        except (OSError, ValueError, AttributeError):
            return "", "done"
    return "", "done"


def cache_entries(root: Path | None = None) -> list[CacheEntry]:
    """Every folder of the cache: one per calibration setting and per GGUF file, one per other asset."""
    from latentkv.io.source import latentkv_cache_dir

    root = Path(root) if root is not None else latentkv_cache_dir()
    if not root.is_dir():
        return []
    entries: list[CacheEntry] = []
    for top in sorted(root.iterdir()):
        if top.name in PRUNABLE and top.is_dir():
            items = sorted(p for p in top.iterdir() if p.is_dir() and not p.is_symlink())
        else:
            items = [top]
        for p in items:
            kind = top.name
            about, state = _describe(kind, p) if kind in PRUNABLE else ("", "done")
            entries.append(CacheEntry(kind, p, _size(p), _newest(p), about, state))
    return entries


def prune_cache(older_than_days: float | None = 30.0, everything: bool = False, dry_run: bool = False,
                root: Path | None = None) -> list[CacheEntry]:
    """Delete calibration statistics and GGUF dequantizations last used more than `older_than_days`
    ago (all of them with `everything`), and leftovers of killed runs; return what was (or, with
    `dry_run`, would be) deleted. Other assets are never touched."""
    from latentkv.io.writer import LEFTOVER_RE, pid_alive

    if older_than_days is not None and older_than_days < 0:
        raise LatentKVError(f"--older-than must be >= 0 days, got {older_than_days}")
    now = time.time()
    gone: list[CacheEntry] = []
    for e in cache_entries(root):
        if e.kind not in PRUNABLE:
            continue
        if e.state == "leftover":
            pid = LEFTOVER_RE.match(e.path.name).group("pid")
            if pid is not None and pid_alive(int(pid)):
                continue  # a live run is writing it
        elif not everything and (older_than_days is None or now - e.last_used < older_than_days * 86400):
            continue
        gone.append(e)
        if not dry_run:
            shutil.rmtree(e.path, ignore_errors=True)
    return gone
