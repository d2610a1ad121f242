"""Calibration and training text: local files/folders (.txt, .jsonl, .parquet; .txt and .jsonl also
gzip-compressed) or a `datasets` name.

`sample_windows` turns text into a fixed number of token windows with a seed; the same function
feeds calibration and fine-tuning, so sample limits mean the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from latentkv.calibration.runner import release_freed_memory
from latentkv.data import DEFAULT_CALIBRATION, logical_suffix, open_text, resolve_text
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


# Text reaches the tokenizer in pieces of at most this many characters: whole lines, 2000 at a
# time, and a line longer than this is cut (memory stays flat whatever the file's shape).
PIECE_LINES = 2000
PIECE_CHARS = 1_000_000
# A .jsonl row must be parsed whole; one longer than this is refused rather than read.
MAX_ROW_CHARS = 256_000_000
# Calibration and training read text only until they have enough: at least MIN_CHARS_READ
# characters (about 4M tokens of a 50k-vocabulary tokenizer) and TOKENS_READ_FACTOR times the
# tokens they need. The shipped Gutenberg books (6M characters) are always read whole, whatever
# the tokenizer, so their windows are those of the whole text.
MIN_CHARS_READ = 16_000_000
TOKENS_READ_FACTOR = 8

Piece = tuple[str, bool]  # (text, whether it ends its document: EOS follows)


def enough_text(num_samples: int, seq_len: int) -> tuple[int, int]:
    """(tokens, characters) calibration reads before it stops, for `num_samples` windows of `seq_len`."""
    return TOKENS_READ_FACTOR * num_samples * seq_len, MIN_CHARS_READ


def text_value(value, where: str, field: str) -> str:
    """A row's text, refused unless it is a string (a null is not the text "None")."""
    if isinstance(value, str):
        return value
    what = "null" if value is None else f"a {type(value).__name__}"
    raise LatentKVError(f"{where}: field {field!r} is {what}, not text; fix or drop that row (or pass --text-field)")


def _line_pieces(lines) -> Iterator[str]:
    """Lines (each at most PIECE_CHARS long) grouped PIECE_LINES at a time, or fewer once a group
    would pass PIECE_CHARS characters."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > PIECE_CHARS:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
        if len(chunk) >= PIECE_LINES:
            yield "".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield "".join(chunk)


def _split_long(lines) -> Iterator[str]:
    for line in lines:
        for start in range(0, max(len(line), 1), PIECE_CHARS):
            yield line[start : start + PIECE_CHARS]


def _flag_last(pieces: Iterator[str]) -> Iterator[Piece]:
    """(piece, is_last) for a document's pieces; an empty document is one empty piece, so it still
    gets its EOS."""
    prev = next(pieces, "")
    for piece in pieces:
        yield prev, False
        prev = piece
    yield prev, True


def document_pieces(text: str) -> Iterator[Piece]:
    """One in-memory document as pieces; the last one carries the end flag."""
    yield from _flag_last(_line_pieces(_split_long(text.splitlines(keepends=True))))


def _file_lines(fh, path: Path) -> Iterator[str]:
    """Lines of an open text file, none longer than PIECE_CHARS (a longer one comes in parts), each
    split as str.splitlines splits (so a file gives the pieces its whole text would)."""
    for line in _raw_lines(fh, path, PIECE_CHARS):
        yield from line.splitlines(keepends=True) or [line]


def _raw_lines(fh, path: Path, limit: int) -> Iterator[str]:
    """fh.readline(limit) until the end, a decoding error named as a file that is not UTF-8."""
    while True:
        try:
            line = fh.readline(limit)
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc) from None
        if not line:
            return
        yield line


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> LatentKVError:
    return LatentKVError(f"{path} is not UTF-8 text ({exc.reason}); convert it to UTF-8 (e.g. iconv -t UTF-8)")


def _txt_pieces(path: Path) -> Iterator[Piece]:
    """A .txt file is one document, read line by line (never whole)."""
    with open_text(path, errors="replace") as fh:
        yield from _flag_last(_line_pieces(_file_lines(fh, path)))


def iter_jsonl(path: Path, field: str) -> Iterator[str]:
    """The `field` text of each row of a .jsonl file (plain or .gz), one row in memory at a time."""
    with open_text(path) as fh:
        for n, line in enumerate(_raw_lines(fh, path, MAX_ROW_CHARS), 1):
            if len(line) >= MAX_ROW_CHARS and not line.endswith("\n"):
                raise LatentKVError(f"{path}:{n} is a row of more than {MAX_ROW_CHARS:,} characters; split it "
                                    "into several rows")
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LatentKVError(f"{path}:{n} is not valid JSON ({exc}); fix the line or drop the file") from None
            if not isinstance(row, dict):
                raise LatentKVError(f"{path}:{n} is a JSON {type(row).__name__}, not an object like "
                                    f'{{"{field}": "..."}}; fix the line or drop the file')
            if field not in row:
                raise LatentKVError(f"{path}:{n} has no {field!r} field; pass --text-field with the right name")
            yield text_value(row[field], f"{path}:{n}", field)


def read_jsonl(path: Path, field: str) -> list[str]:
    return list(iter_jsonl(path, field))


def _iter_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise LatentKVError(f"{path} is not a readable Parquet file ({exc}); re-export it") from None
    if field not in pf.schema_arrow.names:
        raise LatentKVError(f"{path} has no column {field!r} (columns: {pf.schema_arrow.names}); pass --text-field")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield text_value(value, f"{path} row {row}", field)


def _file_pieces(path: Path, field: str) -> Iterator[Piece]:
    suffix = logical_suffix(path)
    if suffix == ".txt":
        yield from _txt_pieces(path)
    elif suffix == ".jsonl":
        for text in iter_jsonl(path, field):
            yield from document_pieces(text)
    elif suffix == ".parquet":
        for text in _iter_parquet(path, field):
            yield from document_pieces(text)
    else:
        raise LatentKVError(f"Unsupported text file {path}; use one of {', '.join(TEXT_SUFFIXES)}")


def _text_files(source: TextSource, allow_eval_text: bool = False) -> list[Path] | None:
    """The files of a local source in a stable order; None for a `datasets` name."""
    if not allow_eval_text and any(m in source.spec.lower() for m in EVAL_ONLY_MARKERS):
        raise LatentKVError(
            f"{source.spec} looks like WikiText, the evaluation text; calibrate or train on other text "
            f"(for example the default, {DEFAULT_CALIBRATION})"
        )
    path = Path(resolve_text(source.spec)).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if logical_suffix(p) in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise LatentKVError(f"No {', '.join(TEXT_SUFFIXES)} files under {path}")
        return files
    if "/" in source.spec and source.spec.startswith((".", "/", "~")):
        raise LatentKVError(f"No such file or folder: {source.spec}")
    return None


def read_pieces(source: TextSource, *, allow_eval_text: bool = False) -> Iterator[Piece]:
    """Every document of a source as pieces, read lazily: a caller that stops early reads no more."""
    files = _text_files(source, allow_eval_text)
    if files is None:
        for text in _iter_dataset(source):
            yield from document_pieces(text)
        return
    for f in files:
        yield from _file_pieces(f, source.text_field)


def load_texts(source: TextSource, *, allow_eval_text: bool = False) -> list[str]:
    """All documents of a source, in a stable order, in memory (small texts; calibration and
    training read `read_pieces` instead)."""
    docs: list[str] = []
    current: list[str] = []
    for piece, end in read_pieces(source, allow_eval_text=allow_eval_text):
        current.append(piece)
        if end:
            docs.append("".join(current))
            current = []
    return docs


def _iter_dataset(source: TextSource) -> Iterator[str]:
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
    for n, row in enumerate(ds, 1):
        yield text_value(row[source.text_field], f"{source.spec} row {n}", source.text_field)


def tokenize_pieces(tokenizer, pieces: Iterable[Piece], max_tokens: int | None = None,
                    batch_chars: int = 1_000_000, enough: tuple[int, int] | None = None) -> torch.Tensor:
    """Pieces joined into one token stream, EOS after each document's last piece.

    Reading stops (no more pieces are taken from `pieces`) after the first piece at which the
    stream holds `enough` = (tokens, characters) of both, and the stream is cut to `max_tokens`.
    Pieces go to the tokenizer in batches of about `batch_chars` characters, which a fast
    tokenizer encodes on all cores; the ids, and where reading stops, are the same as piece by piece.
    """
    eos = tokenizer.eos_token_id
    parts: list[torch.Tensor] = []  # int64 blocks of ids (a Python list would take 36 bytes a token)
    total = chars = 0
    batch: list[str] = []
    ends: list[bool] = []
    size = 0
    done = False

    def flush() -> None:
        nonlocal size, total, chars, done
        if batch:
            ids: list[int] = []
            for text, piece, end in zip(batch, tokenizer(batch, add_special_tokens=False)["input_ids"], ends):
                ids.extend(piece)
                if end and eos is not None:
                    ids.append(eos)
                chars += len(text)
                if enough is not None and len(ids) + total >= enough[0] and chars >= enough[1]:
                    done = True  # the pieces after this one in the batch are dropped
                    break
            parts.append(torch.tensor(ids, dtype=torch.long))
            total += len(ids)
        batch.clear()
        ends.clear()
        size = 0

    for piece, end in pieces:
        batch.append(piece)
        ends.append(end)
        size += len(piece)
        if size >= batch_chars:
            flush()
            if done or (max_tokens and total >= max_tokens):
                break
    else:
        flush()
    tokens = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return tokens[:max_tokens].clone() if max_tokens and tokens.numel() > max_tokens else tokens


def tokenize_stream(tokenizer, texts: Iterable[str], max_tokens: int | None = None,
                    batch_chars: int = 1_000_000) -> torch.Tensor:
    """In-memory documents joined with EOS into one token stream (see `tokenize_pieces`)."""
    return tokenize_pieces(tokenizer, (p for text in texts for p in document_pieces(text)), max_tokens, batch_chars)


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
    tokens = tokenize_pieces(tokenizer, read_pieces(source), enough=enough_text(num_samples, seq_len))
    windows = sample_windows(tokens, num_samples, seq_len, seed)
    log.info(
        "calibration text: %s -> %d tokens (read until %d tokens and %d characters), %d windows of %d (seed %d)",
        source.describe(), tokens.numel(), *enough_text(num_samples, seq_len), num_samples, seq_len, seed,
    )
    del tokens
    release_freed_memory()  # the tokenizer's batch buffers: only the windows are kept
    return windows


def fingerprint_tokens(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()[:16]
