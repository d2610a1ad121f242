"""Calibration and training text: local files/folders (.txt, .jsonl, .parquet; .txt and .jsonl also
gzip-compressed) or a `datasets` name.

`sample_windows` turns text into a fixed number of token windows with a seed; the same function
feeds calibration and fine-tuning, so sample limits mean the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from latentkv.calibration.runner import release_freed_memory
from latentkv.data import DEFAULT_CALIBRATION, logical_suffix, open_text, read_text, resolve_text
from latentkv.errors import LatentKVError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Never calibrate or train on the evaluation text (docs/evaluation.md).
EVAL_ONLY_MARKERS = ("wikitext", "wiki.test")


@dataclass(frozen=True)
class TextSource:
    """Where text comes from: a path (file or folder) or `datasets` `name[:config]` with a split."""

    spec: str
    split: str = "train"
    text_field: str = "text"

    def describe(self) -> str:
        return self.spec if Path(resolve_text(self.spec)).exists() else f"{self.spec} [{self.split}]"


def read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    with open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LatentKVError(f"{path}:{n} is not valid JSON ({exc}); fix the line or drop the file") from None
            if field not in row:
                raise LatentKVError(f"{path}:{n} has no {field!r} field; pass --text-field with the right name")
            texts.append(str(row[field]))
    return texts


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if field not in table.column_names:
        raise LatentKVError(f"{path} has no column {field!r} (columns: {table.column_names}); pass --text-field")
    return [str(t) for t in table.column(field).to_pylist()]


def _read_file(path: Path, field: str) -> list[str]:
    suffix = logical_suffix(path)
    if suffix == ".txt":
        return [read_text(path, errors="replace")]
    if suffix == ".jsonl":
        return read_jsonl(path, field)
    if suffix == ".parquet":
        return _read_parquet(path, field)
    raise LatentKVError(f"Unsupported text file {path}; use one of {', '.join(TEXT_SUFFIXES)}")


def load_texts(source: TextSource, *, allow_eval_text: bool = False) -> list[str]:
    """All documents of a source, in a stable order."""
    if not allow_eval_text and any(m in source.spec.lower() for m in EVAL_ONLY_MARKERS):
        raise LatentKVError(
            f"{source.spec} looks like WikiText, the evaluation text; calibrate or train on other text "
            f"(for example the default, {DEFAULT_CALIBRATION})"
        )
    path = Path(resolve_text(source.spec)).expanduser()
    if path.is_file():
        return _read_file(path, source.text_field)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if logical_suffix(p) in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise LatentKVError(f"No {', '.join(TEXT_SUFFIXES)} files under {path}")
        texts: list[str] = []
        for f in files:
            texts.extend(_read_file(f, source.text_field))
        return texts
    if "/" in source.spec and source.spec.startswith((".", "/", "~")):
        raise LatentKVError(f"No such file or folder: {source.spec}")
    return _load_dataset(source)


def _load_dataset(source: TextSource) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise LatentKVError("Reading a Hub dataset needs the `datasets` package: pip install datasets") from None
    name, _, config = source.spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=source.split)
    except Exception as exc:  # offline, unknown name, unknown split: all user-fixable
        raise LatentKVError(
            f"Could not load dataset {source.spec!r} split {source.split!r} ({type(exc).__name__}: {exc}); "
            "check the name and your connection, or pass a local .txt/.jsonl/.parquet file or folder"
        ) from None
    if source.text_field not in ds.column_names:
        raise LatentKVError(f"Dataset {source.spec} has no column {source.text_field!r}; pass --text-field")
    return [str(t) for t in ds[source.text_field]]


def _chunks(text: str, lines: int = 2000) -> Iterator[str]:
    """A document in pieces of whole lines, so memory stays flat on long documents."""
    chunk: list[str] = []
    for line in text.splitlines(keepends=True):
        chunk.append(line)
        if len(chunk) >= lines:
            yield "".join(chunk)
            chunk = []
    if chunk:
        yield "".join(chunk)


def tokenize_stream(tokenizer, texts: list[str], max_tokens: int | None = None,
                    batch_chars: int = 1_000_000) -> torch.Tensor:
    """Documents joined with EOS into one token stream (stopping once max_tokens are reached).

    Pieces go to the tokenizer in batches of about `batch_chars` characters, which a fast
    tokenizer encodes on all cores; the ids are the same as piece by piece.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    batch: list[str] = []
    ends: list[bool] = []  # whether a piece is the last of its document (EOS follows)
    size = 0

    def flush() -> None:
        nonlocal size
        if batch:
            for piece, end in zip(tokenizer(batch, add_special_tokens=False)["input_ids"], ends):
                ids.extend(piece)
                if end and eos is not None:
                    ids.append(eos)
        batch.clear()
        ends.clear()
        size = 0

    for text in texts:
        pieces = list(_chunks(text)) or [""]
        for n, piece in enumerate(pieces):
            batch.append(piece)
            ends.append(n == len(pieces) - 1)
            size += len(piece)
            if size >= batch_chars:
                flush()
                if max_tokens and len(ids) >= max_tokens:
                    return torch.tensor(ids[:max_tokens], dtype=torch.long)
    flush()
    if max_tokens:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(tokens: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens at random non-overlapping offsets: [num_samples, seq_len]."""
    if num_samples < 1 or seq_len < 2:
        raise LatentKVError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    available = tokens.numel() // seq_len
    if available < num_samples:
        raise LatentKVError(
            f"The text gives only {available} windows of {seq_len} tokens but {num_samples} were asked for; "
            "add text, or lower --calib-samples / --calib-seq-len"
        )
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(available, generator=gen)[:num_samples].sort().values
    windows = tokens[: available * seq_len].view(available, seq_len)
    return windows[picks].clone()


def token_windows(tokenizer, source: TextSource, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Text source -> [num_samples, seq_len] token ids, logging what was used."""
    texts = load_texts(source)
    tokens = tokenize_stream(tokenizer, texts)
    windows = sample_windows(tokens, num_samples, seq_len, seed)
    log.info(
        "calibration text: %s -> %d tokens, %d windows of %d (seed %d)",
        source.describe(), tokens.numel(), num_samples, seq_len, seed,
    )
    del texts, tokens
    release_freed_memory()  # the tokenizer's batch buffers: only the windows are kept
    return windows


def fingerprint_tokens(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()[:16]
