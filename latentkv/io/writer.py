"""Write outputs so that a crash, a full disk or Ctrl-C never leaves a half-written folder.

`OutputFolder` builds everything in a hidden temp folder beside the target and moves it into
place only when the work finished; `ShardedWriter` writes each tensor to disk as it comes (so a
model is never held whole in memory) and names them once their count is known.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from types import TracebackType

import torch

from latentkv.errors import LatentKVError

logger = logging.getLogger(__name__)

# The files a tokenizer may be spread over, plus the generation defaults: copied unchanged.
SIDECAR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# Decimal units as transformers' `max_shard_size` reads them ("5GB" = 5e9); binary ones for "GiB".
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(size: str | int) -> int:
    """`"5GB"` -> 5_000_000_000, `"500MB"`, `"2GiB"`, or a byte count; must be positive."""
    if isinstance(size, bool):  # bool is an int subclass; True bytes is surely a mistake
        raise LatentKVError(f"Invalid size {size!r}; use e.g. 5GB, 500MB or a number of bytes.")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE_RE.match(str(size))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise LatentKVError(f"Could not read size {size!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes.")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise LatentKVError(f"Size {size!r} must be positive; use e.g. 5GB or 500MB.")
    return value


def is_disk_full(exc: BaseException) -> bool:
    """True if `exc` (or what caused it) is 'no space left on device'.

    safetensors reports I/O failures as its own error type with the OS message inside, so the
    errno alone is not enough.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return True
        text = str(cur)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


# Written into every output folder latentkv makes, listing the files it wrote: --overwrite
# replaces a folder only when everything in it is on that list (nothing of the user's is lost).
MARKER_FILE = ".latentkv-output.json"
# Temporary folders beside an output: `.NAME.partial-PID-RANDOM` while building, `.NAME.old-PID-RANDOM`
# for the moment of the swap. The PID says whether the run that made one is still alive.
LEFTOVER_RE = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?:(?P<pid>\d+)-)?[0-9a-z_]+$")


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists on this machine (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def folder_files(folder: Path) -> list[str]:
    """Every file and folder under `folder`, as sorted relative POSIX paths (symlinks not followed)."""
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        found += [(rel / d).as_posix() + "/" for d in dirs]
        found += [(rel / f).as_posix() for f in files]
    return sorted(found)


def _size_of(folder: Path, names: list[str]) -> int:
    total = 0
    for n in names:
        try:
            p = folder / n
            total += 0 if p.is_symlink() or p.is_dir() else p.stat().st_size
        except OSError:
            pass
    return total


def _listing(folder: Path, names: list[str], show: int = 8) -> str:
    files = [n for n in names if not n.endswith("/")]
    head = ", ".join(names[:show]) + (f", ... ({len(names) - show} more)" if len(names) > show else "")
    return f"{head} ({len(files)} file(s), {_size_of(folder, files) / 1e6:.1f} MB)"


def read_marker(folder: Path) -> set[str] | None:
    """The files latentkv wrote into `folder` (from its marker), or None if it has no valid marker."""
    try:
        data = json.loads((Path(folder) / MARKER_FILE).read_text(encoding="utf-8"))
        files = data["files"]
        if data.get("written_by") != "latentkv" or not isinstance(files, list):
            return None
        return {str(f) for f in files}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_marker(folder: Path) -> None:
    """Mark `folder` as latentkv's own, listing everything in it now."""
    from latentkv import __version__

    files = [f for f in folder_files(folder) if f != MARKER_FILE]
    (folder / MARKER_FILE).write_text(
        json.dumps({"written_by": "latentkv", "version": __version__, "files": files}, indent=1) + "\n",
        encoding="utf-8",
    )


# The files outputs of latentkv versions that wrote no marker hold: convert (latentkv, DeepSeek and
# GQA formats: weights, config, copied tokenizer files, `modeling_latentkv.py`, `latentkv_layers.json`,
# `latentkv_recipe.yaml`, README.md) and finetune (full weights or a LoRA adapter, `latentkv_finetune.json`).
LEGACY_OUTPUT_FILES = frozenset({
    "config.json", "model.safetensors", "model.safetensors.index.json", "README.md", "modeling_latentkv.py",
    "latentkv_layers.json", "latentkv_recipe.yaml", "latentkv_finetune.json", "adapter_config.json",
    "adapter_model.safetensors", *SIDECAR_FILES,
})
LEGACY_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def foreign_to_legacy_output(present: list[str]) -> list[str]:
    """The entries of a folder that no marker-less latentkv output holds."""
    return [f for f in present if f not in LEGACY_OUTPUT_FILES and not LEGACY_SHARD_RE.match(f)]


def has_latentkv_marks(folder: Path) -> bool:
    """Whether a folder's own files say latentkv wrote it: a config of model_type `latentkv`, a
    recipe naming the latentkv version that wrote it, or a healing run's record."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and config.get("model_type") == "latentkv":
        return True
    import yaml

    try:
        recipe = yaml.safe_load((folder / "latentkv_recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        recipe = None
    if isinstance(recipe, dict) and "latentkv_version" in recipe:
        return True
    return (folder / "latentkv_finetune.json").is_file()


def is_legacy_output(folder: Path, present: list[str]) -> bool:
    """A folder an older latentkv wrote before outputs carried a marker: only files it writes, and its marks."""
    return not foreign_to_legacy_output(present) and has_latentkv_marks(folder)


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_not_source(target: str | Path, sources=()) -> None:
    """Refuse an output that is one of the inputs, or a folder holding one (replacing it would delete it)."""
    t = _resolved(target)
    for src in sources:
        if src is None or not Path(str(src)).expanduser().exists():
            continue  # a Hub id or a path that does not exist: nothing local to protect
        s = _resolved(str(src))
        if t == s:
            raise LatentKVError(f"The output {target} is the input {src} itself; choose another output folder.")
        if t in s.parents:
            raise LatentKVError(
                f"The output {target} holds the input {src}; writing it would delete the input. "
                "Choose an output folder outside it."
            )


def check_replaceable(target: Path, overwrite: bool) -> None:
    """Refuse a target whose contents would be lost: a file, or a non-empty folder unless --overwrite
    and everything in it was written by latentkv (its marker lists it)."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise LatentKVError(f"Output path {target} is a file or a link, not a folder; choose another path.")
    if not target.is_dir():
        return
    present = folder_files(target)
    if not present:
        return
    ours = read_marker(target)
    legacy = ours is None and is_legacy_output(target, present)
    if not overwrite:
        advice = ("pass --overwrite to replace it or choose another path" if ours is not None or legacy else
                  "it was not written by latentkv, so --overwrite will not replace it: choose another path")
        raise LatentKVError(f"Output folder {target} is not empty; {advice}")
    if legacy:
        logger.info("%s has no %s but holds only files latentkv writes, with its marks: an output of an older "
                    "latentkv, replaced", target, MARKER_FILE)
        return
    if ours is None and has_latentkv_marks(target):
        raise LatentKVError(
            f"Output folder {target} holds files latentkv did not write; --overwrite would lose "
            f"{_listing(target, foreign_to_legacy_output(present))}. Move them away, or choose another path."
        )
    if ours is None:
        raise LatentKVError(
            f"Output folder {target} was not written by latentkv (no {MARKER_FILE}); --overwrite would lose "
            f"{_listing(target, present)}. Choose another path, or move those files away yourself."
        )
    foreign = [f for f in present if f != MARKER_FILE and f not in ours and not (f.endswith("/") and
               any(o.startswith(f) for o in ours))]
    if foreign:
        raise LatentKVError(
            f"Output folder {target} holds files latentkv did not write; --overwrite would lose "
            f"{_listing(target, foreign)}. Move them away, or choose another path."
        )


def check_output_file(target: str | Path, overwrite: bool, sources=(), is_ours=None) -> None:
    """The same rules for an output that is one file: never an input, never a folder, replaced only
    with --overwrite and only if `is_ours(path)` says latentkv wrote it."""
    target = Path(target).expanduser()
    check_not_source(target, sources)
    if target.is_dir():
        raise LatentKVError(f"Output {target} is a folder; name a file (e.g. {target / 'samples.jsonl'}).")
    if not target.exists():
        return
    if not overwrite:
        raise LatentKVError(f"{target} exists; pass --overwrite to replace it or choose another file")
    if is_ours is not None and not is_ours(target):
        size = target.stat().st_size
        raise LatentKVError(
            f"{target} was not written by latentkv; --overwrite would lose it ({size / 1e6:.1f} MB). "
            "Choose another file, or move it away yourself."
        )


def clean_leftovers(target: Path) -> list[Path]:
    """Remove the temporary folders that a killed run left beside `target`; return those still held
    by a live run or of unknown owner (reported, not touched)."""
    kept: list[Path] = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return kept
    for p in siblings:
        m = LEFTOVER_RE.match(p.name)
        if m is None or m.group("name") != target.name or not p.is_dir() or p.is_symlink():
            continue
        pid = m.group("pid")
        if pid is not None and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            logger.warning("Removed %s, left by an interrupted run", p)
        else:
            kept.append(p)
            logger.warning("%s was left by an earlier run (or another run is writing %s now); delete it if no "
                           "run is writing there", p, target)
    return kept


class OutputFolder:
    """Context manager giving a temp folder that becomes `path` only if the block succeeds.

    Every command that writes an output folder goes through this: it refuses an output that is
    an input (`sources`) or holds one, and a non-empty folder unless `overwrite` and latentkv wrote
    everything in it; it removes what killed runs left beside the target; it marks what it writes.

    >>> with OutputFolder("out") as out:
    ...     save_things(out.tmp)
    """

    def __init__(self, path: str | Path, overwrite: bool = False, sources=()) -> None:
        self.path = Path(path).expanduser().absolute()
        self.overwrite = overwrite
        self.sources = tuple(sources)
        self.tmp: Path = Path()  # set in __enter__
        self._check_target()
        clean_leftovers(self.path)

    def _check_target(self) -> None:
        check_not_source(self.path, self.sources)
        check_replaceable(self.path, self.overwrite)

    def __enter__(self) -> "OutputFolder":
        # Checked again: the folder may have been filled between construction and entry.
        self._check_target()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Beside the target so the final rename stays on one filesystem (and so is atomic).
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-{os.getpid()}-", dir=self.path.parent))
            # mkdtemp makes a private (0700) folder; the output should get the usual permissions.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)
        except OSError as exc:
            raise self._os_error(exc) from exc
        logger.debug("Building %s in %s", self.path, self.tmp)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is not None:
            # Any failure, Ctrl-C included: nothing half-written may remain.
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, Exception) and is_disk_full(exc):
                raise LatentKVError(
                    f"disk full while writing {self.path}; free space or choose another --output"
                ) from exc
            return False
        try:
            write_marker(self.tmp)
            self._move_into_place()
        except LatentKVError:
            raise
        except OSError as err:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise self._os_error(err) from err
        return False

    def _move_into_place(self) -> None:
        target = self.path
        try:
            check_replaceable(target, self.overwrite)
        except LatentKVError as exc:
            # Someone filled it while we worked: keep our finished result rather than destroy theirs.
            raise LatentKVError(f"{exc} (the finished output was left in {self.tmp})") from None
        if not target.exists():
            os.rename(self.tmp, target)
            return
        # rename() cannot replace a non-empty folder, so swap through a hidden name: the old folder
        # is moved aside, the new one in, then the old one deleted. If the second step fails, the
        # old folder is put back.
        aside = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, aside)
        try:
            os.rename(self.tmp, target)
        except OSError:
            os.rename(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        logger.info("Replaced the previous contents of %s", target)

    def _os_error(self, exc: OSError) -> LatentKVError:
        if is_disk_full(exc):
            return LatentKVError(f"disk full while writing {self.path}; free space or choose another --output")
        return LatentKVError(f"Could not write {self.path}: {exc}; check permissions or choose another --output")


# safetensors' dtype names, in the order of its Rust `Dtype` enum: a shard lays its tensors out by
# this rank, highest first, then by name (what `safetensors.torch.save_file` writes).
_ST_DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
                   "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
_TORCH_TO_ST = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
                "float8_e8m0fnu": "F8_E8M0", "int16": "I16", "uint16": "U16", "float16": "F16", "bfloat16": "BF16",
                "int32": "I32", "uint32": "U32", "float32": "F32", "complex64": "C64", "float64": "F64",
                "int64": "I64", "uint64": "U64"}
_COPY_CHUNK = 16 << 20  # bytes moved at a time from a shard's spill file into the shard


def _safetensors_dtype(name: str, tensor: torch.Tensor) -> str:
    st = _TORCH_TO_ST.get(str(tensor.dtype).removeprefix("torch."))
    if st is None:
        raise LatentKVError(f"Tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store; cast it first.")
    return st


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _Shard:
    """One shard being filled: its tensors' bytes go straight to a spill file, in arrival order;
    only their names, dtypes, shapes and spill offsets are kept in memory."""

    def __init__(self, spill: Path) -> None:
        self.spill = spill
        self.fh = spill.open("wb", buffering=0)  # unbuffered: a tensor's bytes leave the process at once
        self.entries: list[tuple[str, str, list[int], int, int]] = []  # name, dtype, shape, spill offset, bytes
        self.nbytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        data, done = _tensor_bytes(t), 0
        while done < nbytes:  # a raw write may take fewer bytes than offered
            done += self.fh.write(data[done:])
        self.entries.append((name, _safetensors_dtype(name, t), list(t.shape), self.nbytes, nbytes))
        self.nbytes += nbytes

    def write(self, path: Path, metadata: dict[str, str]) -> list[str]:
        """The finished shard at `path`, laid out byte for byte as safetensors' `save_file` lays out
        the same tensors; return its tensor names in that order."""
        self.fh.close()
        ordered = sorted(self.entries, key=lambda e: (-_ST_DTYPE_ORDER.index(e[1]), e[0]))
        header: dict = {"__metadata__": metadata}
        begin = 0
        for name, dtype, shape, _, nbytes in ordered:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + nbytes]}
            begin += nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors pads it
        chunk = bytearray(min(_COPY_CHUNK, max(self.nbytes, 1)))
        with self.spill.open("rb") as src, path.open("wb") as dst:
            dst.write(len(raw).to_bytes(8, "little"))
            dst.write(raw)
            for _, _, _, offset, nbytes in ordered:
                src.seek(offset)
                while nbytes:
                    got = src.readinto(memoryview(chunk)[: min(nbytes, len(chunk))])
                    if not got:
                        raise OSError(f"spill file {self.spill} ended early")
                    dst.write(memoryview(chunk)[:got])
                    nbytes -= got
        self.spill.unlink()
        return [e[0] for e in ordered]

    def discard(self) -> None:
        self.fh.close()
        self.spill.unlink(missing_ok=True)


class ShardedWriter:
    """Write tensors into safetensors shards of at most `max_shard_size` bytes, as they come.

    Each tensor's bytes go to disk when it is added (nothing is buffered in memory: a conversion
    holds one layer, not the model); a full shard is then laid out in safetensors' order. Shards get
    temporary names while written and their final `model-0000i-of-0000N` names at `close()`, when
    N is known. A tensor larger than the limit gets a shard of its own.
    """

    def __init__(self, folder: str | Path, max_shard_size: str | int = "5GB", prefix: str = "model") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_size = parse_size(max_shard_size)
        self.prefix = prefix
        self._shard: _Shard | None = None
        self._shards: list[tuple[Path, list[str]]] = []  # (temp path, tensor names)
        self._names: set[str] = set()
        self._total = 0
        self._closed = False
        self._tag = uuid.uuid4().hex[:8]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor; finishes the current shard first if this tensor would overflow it."""
        if self._closed:
            raise LatentKVError("ShardedWriter is closed; create a new writer to write more tensors.")
        if name in self._names:
            raise LatentKVError(f"Tensor {name!r} was written twice; each weight name must be unique.")
        if tensor.device.type == "meta":
            raise LatentKVError(f"Tensor {name!r} is on the meta device (never materialised); load its weights first.")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self._shard is not None and self._shard.entries and self._shard.nbytes + nbytes > self.max_shard_size:
            self._flush()
        try:
            if self._shard is None:
                self._shard = _Shard(self._temp_path("spill"))
            self._shard.add(name, t)
        except OSError as exc:
            if is_disk_full(exc):
                raise self._disk_full() from exc
            raise
        self._names.add(name)
        self._total += nbytes

    def _temp_path(self, kind: str) -> Path:
        return self.folder / f".{self.prefix}-{self._tag}-{len(self._shards) + 1:05d}.{kind}.partial.safetensors"

    def _disk_full(self) -> LatentKVError:
        return LatentKVError(f"disk full while writing {self.folder}; free space or choose another --output")

    def _flush(self) -> None:
        shard, self._shard = self._shard, None
        if shard is None or not shard.entries:
            if shard is not None:
                shard.discard()
            return
        path = self._temp_path("shard")
        try:
            names = shard.write(path, {"format": "pt"})
        except Exception as exc:
            shard.discard()
            path.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise self._disk_full() from exc
            raise
        self._shards.append((path, names))
        logger.debug("Wrote shard %d (%d tensors, %d bytes)", len(self._shards), len(names), shard.nbytes)

    def close(self) -> dict:
        """Write the last shard, give every shard its final name, write the index; return it.

        One shard is `model.safetensors` with no index file (as transformers writes it); several
        are `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`. The returned
        dict has the index's shape in both cases.
        """
        if self._closed:
            raise LatentKVError("ShardedWriter.close() called twice.")
        self._flush()
        self._closed = True
        if not self._shards:
            raise LatentKVError("No tensors were written; nothing to save.")
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (tmp_path, names) in enumerate(self._shards, start=1):
            final = f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp_path, self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        if n > 1:
            (self.folder / f"{self.prefix}.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8"
            )
        logger.info(
            "Wrote %d tensors (%.1f MB) in %d shard(s) to %s", len(weight_map), self._total / 1e6, n, self.folder
        )
        return index

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None and not self._closed:
            self.close()
        elif exc is not None:
            # Leave no stray temp shards; the enclosing OutputFolder would delete them anyway.
            if self._shard is not None:
                self._shard.discard()
            for tmp_path, _ in self._shards:
                tmp_path.unlink(missing_ok=True)


class SpilledLayers:
    """Layers built during a pass and written after it, kept on disk meanwhile: a pass that builds
    every layer then holds one layer's tensors, not the model's.

    `spill[i] = tensors` or `(tensors, extra)`; `spill[i]` reads the tensors back (same names, order,
    dtypes, devices and values) with `extra` (small: a layer's spec), which stays in memory. The
    files live in a temporary folder beside the output, named like a partial output so that a killed
    run's folder is removed by the next run (`clean_leftovers`); `close()` removes it.
    """

    def __init__(self, beside: str | Path) -> None:
        self.beside = Path(beside).expanduser().absolute()
        self.folder: Path | None = None
        self._layers: dict[int, tuple[list[str], dict[str, torch.device], object, bool]] = {}

    def __contains__(self, i: object) -> bool:
        return i in self._layers

    def __setitem__(self, i: int, value) -> None:
        from safetensors.torch import save_file

        has_extra = isinstance(value, tuple)
        tensors, extra = value if has_extra else (value, None)
        if self.folder is None:
            self.beside.parent.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=f".{self.beside.name}.partial-{os.getpid()}-",
                                                dir=self.beside.parent))
        # Own copies: safetensors refuses tensors that share storage.
        save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()},
                  str(self.folder / f"layer-{i}.safetensors"))
        self._layers[i] = (list(tensors), {k: v.device for k, v in tensors.items()}, extra, has_extra)

    def __getitem__(self, i: int):
        from safetensors.torch import load_file

        names, devices, extra, has_extra = self._layers[i]
        loaded = load_file(str(self.folder / f"layer-{i}.safetensors"))
        tensors = {k: loaded[k].to(devices[k]) for k in names}  # the order they came in (shards follow it)
        return (tensors, extra) if has_extra else tensors

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        self._layers.clear()


def copy_sidecars(src_folder: str | Path, dst_folder: str | Path) -> list[str]:
    """Copy the tokenizer files and generation_config.json byte for byte; return the names copied.

    A file that fails to copy is a warning, not an error: the weights are the essential output.
    """
    src, dst = Path(src_folder), Path(dst_folder)
    copied: list[str] = []
    for name in SIDECAR_FILES:
        s = src / name
        if not s.is_file():
            continue
        try:
            if name == "tokenizer_config.json" and _copy_without_auto_map(s, dst / name):
                copied.append(name)
                continue
            shutil.copyfile(s, dst / name)
            copied.append(name)
        except OSError as exc:
            logger.warning("Could not copy %s from %s to %s (%s); continuing without it", name, src, dst, exc)
    if not any(n.startswith(("tokenizer", "vocab")) for n in copied):
        logger.warning("No tokenizer files found in %s; the output at %s will need one added by hand", src, dst)
    return copied


def _copy_without_auto_map(src: Path, dst: Path) -> bool:
    """Copy a tokenizer_config.json that names tokenizer code (auto_map) without that entry: the code
    is not copied (latentkv never carries a checkpoint's code), and an auto_map to absent files
    breaks loading. Returns False (copy it unchanged) when it names no code or is not a JSON object."""
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(data, dict) or "auto_map" not in data:
        return False
    dropped = data.pop("auto_map")
    dst.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.warning(
        "%s names tokenizer code (auto_map %s) that latentkv does not copy; the output's copy leaves that entry out. "
        "If the tokenizer needs that code, copy its .py files and the auto_map entry into %s by hand.",
        src, json.dumps(dropped)[:200], dst.parent,
    )
    return True
