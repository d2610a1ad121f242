"""Read one tensor at a time from a checkpoint folder, never the whole model.

Safetensors tensors are read with plain file reads at the offsets their headers give, not through a
memory map: mapped pages would stay resident (and count against the process) for as long as the
shard is open, so a pass over every layer would end up holding the whole checkpoint. The headers
are parsed up front (a few kilobytes each) so a missing, truncated or corrupt shard is reported when
the folder is opened, not an hour into a conversion. PyTorch `.bin` files are read only with
`torch.load(weights_only=True, mmap=True)`: no pickle code runs and nothing is copied into RAM
until a tensor is asked for.
"""

from __future__ import annotations

import difflib
import json
import logging
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from latentkv.errors import LatentKVError

logger = logging.getLogger(__name__)

# The file names transformers itself writes, in the order it prefers them.
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
LOOKED_FOR = (SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE, "*.safetensors.index.json", "*.safetensors")

# The safetensors format caps its JSON header at 100 MB; anything larger is a corrupt length field.
_MAX_HEADER = 100_000_000

# safetensors dtype strings -> torch dtypes (the float8 ones only exist in recent torch builds).
_ST_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",
        "C64": "complex64",
    }.items()
    if hasattr(torch, attr)
}


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lives and what it is, known without reading its data."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a dtype this torch build cannot represent
    nbytes: int
    offset: int | None = None  # safetensors: where the tensor's bytes start in the file


def _read_span(path: Path, offset: int, nbytes: int) -> torch.Tensor:
    """`nbytes` bytes of a file from `offset`, as a fresh uint8 tensor (read, not mapped)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy()) if nbytes else memoryview(b"")
    with path.open("rb", buffering=0) as fh:
        fh.seek(offset)
        done = 0
        while done < nbytes:  # one read() returns at most ~2 GB on Linux
            got = fh.readinto(view[done:])
            if not got:
                raise OSError(f"unexpected end of file at byte {offset + done}")
            done += got
    return buf


def _read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header; return it and the file offset where the data begins. Raise a
    LatentKVError naming the file if it is damaged."""
    fix = f"re-download or re-export {path.name}"
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise LatentKVError(f"Shard {path} is truncated ({size} bytes, no header); {fix}.")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise LatentKVError(
                    f"Shard {path} has a corrupt or truncated header (declares {header_len} header bytes, "
                    f"file has {size}); {fix}."
                )
            header_bytes = fh.read(header_len)
    except OSError as exc:
        raise LatentKVError(f"Could not read shard {path}: {exc}; check the file permissions or {fix}.") from exc
    try:
        header = json.loads(header_bytes.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise LatentKVError(f"Shard {path} has a corrupt header ({exc}); {fix}.") from exc

    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype_name = str(info["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LatentKVError(f"Shard {path} has a corrupt header entry for {name!r}; {fix}.") from exc
        if not 0 <= begin <= end:
            raise LatentKVError(f"Shard {path} has corrupt offsets for {name!r}; {fix}.")
        if end > data_size:
            raise LatentKVError(
                f"Shard {path} is truncated: tensor {name!r} ends at byte {end} of the data section but only "
                f"{data_size} bytes are present; {fix}."
            )
        dtype = _ST_DTYPES.get(dtype_name)
        if dtype is not None:
            numel = 1
            for d in shape:
                numel *= d
            if numel * dtype.itemsize != end - begin:
                raise LatentKVError(
                    f"Shard {path} is corrupt: tensor {name!r} has shape {shape} {dtype_name} but "
                    f"{end - begin} bytes; {fix}."
                )
    return header, 8 + header_len


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map a PyTorch checkpoint without running pickle code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError as exc:
        raise LatentKVError(f"Weights file {path} is missing; re-download the checkpoint.") from exc
    except Exception as exc:  # torch raises plain RuntimeError / UnpicklingError for many causes
        raise LatentKVError(
            f"Could not read {path} safely with torch.load(weights_only=True, mmap=True): {exc}. "
            "It is damaged, in the legacy (pre-1.6) format, or holds more than tensors; "
            "convert it to safetensors, or re-download it."
        ) from exc
    # Some trainers wrap the weights: {"state_dict": {...}} or {"model": {...}}.
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and len(obj) <= 3:
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LatentKVError(f"{path} does not hold a flat dict of tensors; convert it to safetensors first.")
    return obj


def _read_index(path: Path) -> dict[str, str]:
    """The weight_map of a `*.index.json` file: tensor name -> shard file name."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LatentKVError(f"Index {path} is unreadable or malformed ({exc}); re-download the checkpoint.") from exc
    return {str(k): str(v) for k, v in weight_map.items()}


def _hash_sampled(fh, begin: int, end: int, h, block: int, samples: int) -> None:
    """Feed `h` the bytes [begin, end) of an open file: all of them if small, else `samples` blocks."""
    n = end - begin
    if n <= block * samples:
        fh.seek(begin)
        h.update(fh.read(n))
        return
    step = (n - block) / (samples - 1)
    for k in range(samples):
        fh.seek(begin + int(k * step))
        h.update(fh.read(block))


def check_shard_name(index_path: Path, name: str) -> None:
    """An index may name only files inside its own folder: a plain relative path, no '..', not
    absolute (a crafted index must not read, or smuggle into an output, some other file)."""
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or name.startswith(("/", "\\")) or ".." in parts or "\\" in name \
            or ":" in name:
        raise LatentKVError(
            f"Index {index_path} names shard {name!r}, which is not a file inside {index_path.parent}; the index is "
            "corrupt or crafted: re-download the checkpoint."
        )


class LazyCheckpoint:
    """A checkpoint folder whose tensors are read one at a time, on demand.

    `LazyCheckpoint(folder)` finds the weights (sharded or single safetensors, else `.bin`),
    checks every shard's header, and then `get(name)` returns one tensor.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise LatentKVError(f"Checkpoint folder {self.folder} does not exist; pass a folder holding the weights.")
        self._entries: dict[str, _Entry] = {}
        self._handles: dict[Path, Any] = {}  # safetensors: open safe_open objects (memory maps)
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}  # .bin: memory-mapped state dicts
        self.format: str = ""
        self.files: list[Path] = []
        self._discover()

    # ---- discovery -------------------------------------------------------------------------

    def _discover(self) -> None:
        f = self.folder
        if (f / SAFE_INDEX).is_file():
            self._open_safetensors_index(f / SAFE_INDEX)
        elif (f / SAFE_SINGLE).is_file():
            self._open_safetensors_files([f / SAFE_SINGLE])
        elif (f / BIN_INDEX).is_file():
            self._open_bin_index(f / BIN_INDEX)
        elif (f / BIN_SINGLE).is_file():
            self._open_bin_files([f / BIN_SINGLE])
        else:
            # Non-standard names (e.g. a custom prefix): accept one index, or every safetensors file.
            indexes = sorted(f.glob("*.safetensors.index.json"))
            shards = sorted(p for p in f.glob("*.safetensors") if not p.name.startswith("."))
            if len(indexes) == 1:
                self._open_safetensors_index(indexes[0])
            elif shards and not indexes:
                logger.info("No %s in %s; reading all %d *.safetensors files", SAFE_SINGLE, f, len(shards))
                self._open_safetensors_files(shards)
            else:
                present = sorted(p.name for p in f.iterdir())[:20]
                raise LatentKVError(
                    f"No weights found in {f}: looked for {', '.join(LOOKED_FOR)}. "
                    f"The folder holds: {', '.join(present) or 'nothing'}. "
                    "Pass a folder with a complete Hugging Face checkpoint (or a .gguf file)."
                )
        if not self._entries:
            raise LatentKVError(f"The weights in {f} hold no tensors; re-download or re-export the checkpoint.")

    def _shard_paths(self, index_path: Path, weight_map: dict[str, str]) -> dict[str, Path]:
        names = sorted(set(weight_map.values()))
        for name in names:
            check_shard_name(index_path, name)
        paths = {name: index_path.parent / name for name in names}
        missing = [name for name, p in paths.items() if not p.is_file()]
        if missing:
            raise LatentKVError(
                f"Index {index_path.name} in {index_path.parent} names shard {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + ", which is missing; the download is incomplete: re-download the checkpoint "
                "(e.g. `hf download REPO --local-dir FOLDER`)."
            )
        return paths

    def _open_safetensors_index(self, index_path: Path) -> None:
        weight_map = _read_index(index_path)
        paths = self._shard_paths(index_path, weight_map)
        headers = {name: _read_safetensors_header(p) for name, p in paths.items()}
        self.format = "safetensors"
        self.files = list(paths.values())
        for tensor, shard in weight_map.items():
            header, data_start = headers[shard]
            info = header.get(tensor)
            if info is None:
                raise LatentKVError(
                    f"Index {index_path.name} says {tensor!r} is in {shard}, but that shard does not hold it; "
                    "the checkpoint is inconsistent: re-download it."
                )
            self._entries[tensor] = self._entry(paths[shard], info, data_start)

    def _open_safetensors_files(self, files: list[Path]) -> None:
        self.format = "safetensors"
        self.files = files
        for path in files:
            header, data_start = _read_safetensors_header(path)
            for tensor, info in header.items():
                if tensor == "__metadata__":
                    continue
                if tensor in self._entries:
                    raise LatentKVError(
                        f"Tensor {tensor!r} appears in both {self._entries[tensor].file.name} and {path.name}; "
                        "remove the stray file from the folder."
                    )
                self._entries[tensor] = self._entry(path, info, data_start)

    @staticmethod
    def _entry(path: Path, info: dict[str, Any], data_start: int) -> _Entry:
        begin, end = info["data_offsets"]
        return _Entry(path, tuple(int(d) for d in info["shape"]), _ST_DTYPES.get(info["dtype"]), int(end) - int(begin),
                      offset=data_start + int(begin))

    def _open_bin_index(self, index_path: Path) -> None:
        weight_map = _read_index(index_path)
        paths = self._shard_paths(index_path, weight_map)
        self.format = "bin"
        self.files = list(paths.values())
        for tensor, shard in weight_map.items():
            sd = self._bin_state(paths[shard])
            if tensor not in sd:
                raise LatentKVError(
                    f"Index {index_path.name} says {tensor!r} is in {shard}, but that file does not hold it; "
                    "the checkpoint is inconsistent: re-download it."
                )
            t = sd[tensor]
            self._entries[tensor] = _Entry(paths[shard], tuple(t.shape), t.dtype, t.numel() * t.element_size())

    def _open_bin_files(self, files: list[Path]) -> None:
        self.format = "bin"
        self.files = files
        logger.info("Reading PyTorch .bin weights from %s (weights_only, memory-mapped)", self.folder)
        for path in files:
            for tensor, t in self._bin_state(path).items():
                self._entries[tensor] = _Entry(path, tuple(t.shape), t.dtype, t.numel() * t.element_size())

    def _bin_state(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bin:
            self._bin[path] = _load_bin(path)
        return self._bin[path]

    # ---- queries ---------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Every tensor name, in checkpoint order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def _lookup(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, self._entries.keys(), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise LatentKVError(
                f"No tensor named {name!r} in {self.folder} ({len(self._entries)} tensors).{hint} "
                "Check the architecture table's weight names against `keys()`."
            )
        return entry

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor, from the header (no data read)."""
        return self._lookup(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of a tensor, from the header (no data read)."""
        entry = self._lookup(name)
        if entry.dtype is None:
            raise LatentKVError(f"Tensor {name!r} has a dtype this torch build cannot represent; upgrade torch.")
        return entry.dtype

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the checkpoint (as stored)."""
        return sum(e.nbytes for e in self._entries.values())

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read exactly one tensor (a fresh tensor; changing it never touches the file)."""
        entry = self._lookup(name)
        if self.format == "safetensors" and entry.dtype is not None and sys.byteorder == "little":
            try:
                raw = _read_span(entry.file, entry.offset, entry.nbytes)
            except OSError as exc:
                raise LatentKVError(
                    f"Could not read {name!r} from {entry.file}: {exc}; the shard is damaged: re-download it."
                ) from exc
            # Already a private buffer: copied again only for a dtype or device change.
            tensor = raw.view(entry.dtype).reshape(entry.shape)
            return tensor.to(device=device, dtype=dtype if dtype is not None else tensor.dtype)
        if self.format == "safetensors":  # a big-endian host: safetensors' own reader swaps the bytes
            handle = self._handle(entry.file)
            try:
                tensor = handle.get_tensor(name)
            except Exception as exc:  # safetensors raises its own SafetensorError for I/O or format faults
                raise LatentKVError(
                    f"Could not read {name!r} from {entry.file}: {exc}; the shard is damaged: re-download it."
                ) from exc
        else:
            tensor = self._bin_state(entry.file)[name]
        # Both readers hand out views of a private memory map, and repeated reads share it: an
        # in-place edit by the caller would show up in the next read. One copy (fused with the
        # dtype / device change) makes every returned tensor independent.
        return tensor.to(device=device, dtype=dtype if dtype is not None else tensor.dtype, copy=True)

    def get_many(
        self, prefix: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """All tensors whose name starts with `prefix` (e.g. `"model.layers.3."` for one layer)."""
        names = [n for n in self._entries if n.startswith(prefix)]
        # Read shard by shard, each file front to back.
        names.sort(key=lambda n: (str(self._entries[n].file), self._entries[n].offset or 0))
        got = {n: self.get(n, dtype=dtype, device=device) for n in names}
        return {n: got[n] for n in self._entries if n in got}  # back to checkpoint order

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:
                raise LatentKVError(f"Could not open shard {path}: {exc}; re-download it.") from exc
        return self._handles[path]

    # ---- identity --------------------------------------------------------------------------

    def content_digest(self, block: int = 4096, per_tensor: int = 16, bin_stride: int = 1 << 20) -> str:
        """A hash of the weights' content that is cheap on large checkpoints: every file's name,
        size and header, and `per_tensor` evenly spaced blocks of every tensor (all of a small
        one). Two checkpoints of one shape whose weights differ anywhere but in a few isolated
        bytes get different digests. `.bin` files have no header to walk: one block per
        `bin_stride` bytes of the file is read instead."""
        import hashlib

        h = hashlib.sha256()
        for path in sorted(self.files, key=lambda p: p.name):
            try:
                size = path.stat().st_size
                h.update(f"{path.name}\0{size}\0".encode())
                with path.open("rb") as fh:
                    if self.format == "safetensors":
                        (header_len,) = struct.unpack("<Q", fh.read(8))
                        raw = fh.read(header_len)
                        h.update(raw)
                        header = json.loads(raw.decode("utf-8"))
                        base = 8 + header_len
                        spans = sorted(tuple(info["data_offsets"]) for name, info in header.items()
                                       if name != "__metadata__")
                        for begin, end in spans:
                            _hash_sampled(fh, base + int(begin), base + int(end), h, block, per_tensor)
                    else:
                        _hash_sampled(fh, 0, size, h, block, max(per_tensor, size // bin_stride))
            except (OSError, ValueError, struct.error) as exc:
                raise LatentKVError(f"Could not read {path} to fingerprint it ({exc}); re-download the checkpoint.") from exc
        return h.hexdigest()[:16]

    # ---- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the memory maps (tensors already returned stay valid)."""
        self._handles.clear()
        if self._bin:
            # Re-opened lazily if needed again.
            self._bin.clear()

    def __enter__(self) -> "LazyCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"LazyCheckpoint({str(self.folder)!r}, format={self.format}, tensors={len(self._entries)}, "
            f"files={len(self.files)}, bytes={self.total_bytes})"
        )
