"""Texts shipped inside the package (see README.md here for what they are and their licences),
and the one reader of text files that every part of latentkv uses (plain or gzip-compressed)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import IO

DATA_DIR = Path(__file__).resolve().parent
# Default calibration and training text: 13 public-domain Project Gutenberg books.
CALIBRATION_TEXT = DATA_DIR / "gutenberg"
# The WikiText-2 raw test split: the evaluation text of the perplexity protocol (never for training).
EVAL_TEXT = DATA_DIR / "wikitext-2" / "wiki.test.raw.gz"


def logical_suffix(path: Path) -> str:
    """The suffix that says what a file holds, a trailing `.gz` looked through: `a.jsonl.gz` -> `.jsonl`."""
    path = Path(path)
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def logical_name(path: Path) -> str:
    """The file's name without a trailing `.gz`, so `book.txt.gz` can be named as `book.txt`."""
    path = Path(path)
    return path.stem if path.suffix == ".gz" else path.name


def open_text(path: Path, errors: str = "strict") -> IO[str]:
    """Open a UTF-8 text file for reading, decompressing it if its name ends in `.gz`."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors=errors)
    return open(path, encoding="utf-8", errors=errors)


def read_text(path: Path, errors: str = "strict") -> str:
    """A whole text file (plain or `.gz`) as one string."""
    with open_text(path, errors=errors) as fh:
        return fh.read()


# Names that stand for the shipped texts wherever a text path is taken (stable across installs,
# so help texts and recipes never show a path of one machine).
BUILTIN_TEXTS = {"latentkv:gutenberg": CALIBRATION_TEXT, "latentkv:wikitext2-test": EVAL_TEXT}
DEFAULT_CALIBRATION = "latentkv:gutenberg"
DEFAULT_EVAL = "latentkv:wikitext2-test"


def resolve_text(spec: str) -> str:
    """A shipped text's name -> its path; any other spec unchanged."""
    return str(BUILTIN_TEXTS.get(spec, spec))
