"""Training text packed into fixed-length sequences, in an order that a step number recovers.

Text comes through the calibration reader (`read_pieces`, which refuses WikiText and reads lazily,
and `tokenize_pieces`, documents joined with EOS, stopping once it has `enough`); `sample_windows` cuts the stream into every
non-overlapping window. Sequence i of the run is window perm_e[i mod n] of epoch e = i // n, with
one seeded permutation per epoch: the data position of a checkpoint is just a sequence count,
and any number of GPUs reads the same global batches.
"""

from __future__ import annotations

import logging

import torch

from latentkv.calibration.data import TextSource, read_pieces, sample_windows, tokenize_pieces
from latentkv.errors import LatentKVError

log = logging.getLogger(__name__)


_STREAMS: dict[tuple, torch.Tensor] = {}  # one process tokenises a text once (a probe, then the run)


def _token_stream(tokenizer, source: TextSource, enough: tuple[int, int] | None) -> torch.Tensor:
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), source, enough)
    if key not in _STREAMS:
        _STREAMS.clear()
        _STREAMS[key] = tokenize_pieces(tokenizer, read_pieces(source), enough=enough)
    return _STREAMS[key]


class PackedSequences:
    """All `seq_len` windows of a text source (or of its start, once it gave `enough` = (tokens,
    characters): the text is read no further); `batch(start, count)` -> [count, seq_len] token ids."""

    def __init__(self, tokenizer, source: TextSource, seq_len: int, seed: int,
                 enough: tuple[int, int] | None = None):
        tokens = _token_stream(tokenizer, source, enough)
        available = tokens.numel() // seq_len
        if available < 1:
            raise LatentKVError(
                f"{source.describe()} gives {tokens.numel()} tokens, less than one sequence of {seq_len}; "
                "add text or lower --seq-len"
            )
        self.windows = sample_windows(tokens, available, seq_len, seed)  # [n, seq_len], in text order
        self.seq_len = seq_len
        self.seed = seed
        self._perm: dict[int, torch.Tensor] = {}
        log.info("training text: %s -> %d tokens, %d sequences of %d", source.describe(), tokens.numel(),
                 len(self), seq_len)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = {epoch: torch.randperm(len(self), generator=gen)}  # keep one epoch's order
        return self._perm[epoch]

    def batch(self, start: int, count: int) -> torch.Tensor:
        """Sequences start .. start+count-1 of the run (wrapping into later epochs)."""
        n = len(self)
        rows = []
        for i in range(start, start + count):
            rows.append(self._order(i // n)[i % n])
        return self.windows[torch.stack(rows)]

    def epochs(self, sequences: int) -> float:
        return sequences / len(self)
