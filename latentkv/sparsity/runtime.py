"""Sparse decode through the paged latent cache: each decode step attends only to chosen pages.

``SparseAttention`` is attached to a ``PagedLatentCache`` (``cache.sparsity = ...``); the cache's
attention hook asks it, per layer, for the block table and lengths to attend with. For a decode
step (one query token) it picks ``k`` blocks per sequence and returns a reduced block table of
their page ids in ascending order -- the block of the current token last -- with length

    (k - 1) * page_size + (tokens in the current block)

Every block but the current one is full, so the kernel reads exactly the chosen pages, and since
the cached RoPE key is already rotated at its true position, the result is exact attention over
the chosen tokens (no kernel change; the kernel's causal rule "key <= length - 1" holds for the
compacted positions too). Prefill chunks (several query tokens) attend densely.

The history each policy reads is one row of block masses per step: the full masses on "refresh"
steps (every ``refresh`` decode steps, and during prefill), else the masses over the attended
blocks only (zero elsewhere). With ``history_masses="decode"`` (default) the attention pass itself
returns them (``decode_attention(..., return_masses=True)``: the Triton split kernel writes the
log2-sum-exp2 of each page's scores and a small kernel normalises them with each row's final
log-sum-exp; the reference backend pools its own probabilities), so ``select`` leaves the history
row pending and ``record`` fills it after the attention -- no step re-reads the cache for its
history, except a refresh step that attends sparsely (``dense_refresh=False``), which needs the
full masses from a separate dense QK pass (``masses.block_masses``; on a memory-bound GPU the read
of the whole cache the sparse step avoids). With ``dense_refresh=True`` a refresh step attends to
every block and takes its full masses from that same pass: then no step needs a separate pass
(the refresh step's output is then dense attention, unlike the separate-pass history). The oracle
policy and ``track_recall`` still compute this step's full masses in PyTorch (measurement tools).
``history_masses="separate"`` keeps the second PyTorch pass over the attended pages (the
reference the kernel's masses are tested against). The predictor's forecast for step t reads
only steps < t, so it can be computed while step t - 1 finishes (the paper's cross-token
prefetch); here it runs at the start of step t, which gives the same blocks. The choice runs on
the host, per sequence and layer (a small loop; on a GPU it costs a sync per layer). A batched
device-side choice -- one top-k over every (layer, sequence) of Quest bounds, feeding a layered
``offload.PagePool`` -- is what ``scripts/bench_offload_decode.py`` runs; this class does not yet.

With ``SparseConfig.per_latent_head`` and a GLA layer (latent_heads > 1), each latent head chooses
its own ``k`` blocks from its own scores, and the reduced table is [b, latent_heads, k_max] (the
kernel's block table per latent head); the length above is the same for every head, since each
keeps ``k`` blocks and the current block last. Each head's history row holds the masses of its own
attended blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from latentkv.errors import LatentKVError
from latentkv.sparsity.masses import block_masses, paged_rows
from latentkv.sparsity.policies import SparseConfig, bound_scores, choose_blocks, policy_scores


def reduced_pages(pages: torch.Tensor, ids: torch.Tensor, length: int, page_size: int) -> tuple[torch.Tensor, int]:
    """The pages of blocks ``ids`` (ascending, the sequence's last block last; or [latent_heads, k], a
    row per latent head) of a sequence of ``length`` tokens whose pages are ``pages``, and the length
    to attend with: every chosen block is full except the last, which holds ``length - (n - 1) *
    page_size`` tokens."""
    n = pages.shape[0]
    return pages[ids], (ids.shape[-1] - 1) * page_size + length - (n - 1) * page_size


def is_refresh_step(decode_step: int, refresh: int) -> bool:
    """Whether decode step ``decode_step`` (1 = the first after the prefill) records the full masses."""
    return decode_step % refresh == 0


def attended_history_row(part: torch.Tensor, ids: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """The history row of a step that attended only blocks ``ids``: part [..., k] their masses (the
    sparse attention's own, so they sum to 1 over the attended blocks) -> [..., n_blocks], zero on
    every block not attended (the step saw nothing of them). ids: [k], or any shape that broadcasts
    to ``part`` (a batch of choices; [latent_heads, k]: latent head c attended blocks ids[c])."""
    return part.new_zeros(*part.shape[:-1], n_blocks).scatter_(-1, ids.expand(part.shape), part)


@dataclass
class SparseStats:
    """Running totals over decode steps x layers x sequences."""

    decisions: int = 0
    blocks_attended: int = 0
    blocks_total: int = 0
    recall_sum: float = 0.0  # sum of the true mass inside the chosen blocks (track_recall)
    recall_count: int = 0
    per_layer_recall: dict = field(default_factory=dict)  # layer -> [sum, count]

    def summary(self) -> dict:
        return {
            "decisions": self.decisions,
            "blocks_attended_fraction": self.blocks_attended / max(1, self.blocks_total),
            "blocks_per_decision": self.blocks_attended / max(1, self.decisions),  # pages read per layer-step
            "attention_recall": self.recall_sum / self.recall_count if self.recall_count else None,
        }


class SparseAttention:
    """Block choice and attention history for every (sequence, layer) of one paged cache.

    config: the policy and budget; page_size: the cache's; predictor: an AttentionPredictor for
    policy "predictor"; keep_history: rows of history kept per (sequence, layer) (None: all, for
    collecting training data; default: what the policy reads).
    """

    def __init__(self, config: SparseConfig, page_size: int, predictor=None, keep_history: int | None = -1):
        if config.policy == "predictor":
            if predictor is None:
                raise LatentKVError("the predictor policy needs a loaded AttentionPredictor.")
            if predictor.config.page_size != page_size:
                raise LatentKVError(
                    f"the predictor was trained on blocks of {predictor.config.page_size} tokens but the cache pages "
                    f"hold {page_size}; decode with --page-size {predictor.config.page_size}."
                )
        self.config = config
        self.page_size = page_size
        self.predictor = predictor
        if keep_history == -1:
            keep_history = predictor.config.history if predictor is not None else (1 if config.needs_history else 0)
        self.keep_history = keep_history
        self.history: dict[tuple[int, int], torch.Tensor] = {}  # (seq, layer) -> [latent_heads, t, n_blocks]
        self.steps: dict[int, int] = {}  # seq -> decode steps begun
        self.stats = SparseStats()
        self.last_choice: dict[tuple[int, int], torch.Tensor] = {}  # (seq, layer) -> chosen block ids
        self._pending: list[tuple] = []  # history rows waiting for this layer's attention masses (record)
        self.bounds: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (seq, layer) -> full blocks' min / max

    def page_bounds(self, seq: int, layer: int, kv: torch.Tensor, pages: torch.Tensor, length: int):
        """(low, high) [n_blocks, width] float32: the element-wise min / max of each block's rows. A
        full block's bounds are computed once, when it fills (Quest keeps them as page metadata); the
        current, partly filled block is recomputed each step (one page read)."""
        size = self.page_size
        full = length // size
        low, high = self.bounds.get((seq, layer), (kv.new_empty(0, kv.shape[-1], dtype=torch.float32),) * 2)
        if low.shape[0] < full:
            rows = kv[pages[low.shape[0] : full].to(kv.device).long()].float()  # [m, size, width]
            low, high = torch.cat([low, rows.amin(1)]), torch.cat([high, rows.amax(1)])
            self.bounds[seq, layer] = (low, high)
        if length % size:
            rows = kv[int(pages[full]), : length % size].float()
            low, high = torch.cat([low, rows.amin(0, keepdim=True)]), torch.cat([high, rows.amax(0, keepdim=True)])
        return low, high

    # history -------------------------------------------------------------------------------
    def _push(self, seq: int, layer: int, rows: torch.Tensor) -> None:
        """rows: [s, latent_heads, n] masses of s new steps (n may exceed the stored width)."""
        if self.keep_history == 0:
            return
        rows = rows.transpose(0, 1)  # [latent_heads, s, n]
        old = self.history.get((seq, layer))
        if old is not None:
            old = torch.nn.functional.pad(old, (0, rows.shape[-1] - old.shape[-1]))  # new blocks: empty so far
            rows = torch.cat([old, rows], dim=1)
        if self.keep_history is not None:
            rows = rows[:, -self.keep_history :]
        self.history[seq, layer] = rows

    # the hooks PagedLatentCache calls --------------------------------------------------------
    def select(self, module, q: torch.Tensor, kv: torch.Tensor, step: dict):
        """q [b, s, H, r_c + rope_dim] (cache dtype), kv [num_pages, page_size, width] (this step's
        rows written) -> (block_table [b, k_max] int32, seq_lens [b] int32, max_len) to attend with;
        a decode step with ``per_latent_head`` on a layer of several latent heads gives a block table
        [b, latent_heads, k_max]. When ``wants_masses`` is then true, pass the attention's
        ``return_masses`` output to ``record``."""
        cfg, size = self.config, self.page_size
        layer = module.layer_idx
        b, s = q.shape[:2]
        table = step["block_table"].cpu()
        lens = step["seq_lens"].cpu().tolist()
        geometry = dict(latent_heads=module.latent_heads, rope_dim=module.rope_dim, scale=module.scaling, page_size=size)
        want_history = self.keep_history != 0
        from_decode = want_history and cfg.history_masses == "decode"
        self._pending = []  # (batch row, seq, attended block ids, n_blocks, query tokens kept): filled by record()
        if s > 1:  # prefill chunk: dense; the history gets the masses of the tokens it keeps
            if want_history:
                take = s if self.keep_history is None else min(s, self.keep_history)
                for row, seq in enumerate(step["seqs"]):
                    n = -(-lens[row] // size)
                    if from_decode:
                        self._pending.append((row, seq, torch.arange(n), n, take))
                    else:
                        rows = paged_rows(kv, table[row, :n], lens[row])
                        self._push(seq, layer, block_masses(q[row, -take:].cpu(), rows.cpu(), **geometry))
            return step["block_table"], step["seq_lens"], step["max_len"]

        heads = module.latent_heads if cfg.per_latent_head and module.latent_heads > 1 else None
        chosen_rows, new_lens = [], []
        for row, seq in enumerate(step["seqs"]):
            if layer == 0:
                self.steps[seq] = self.steps.get(seq, 0) + 1
            length = lens[row]
            n = -(-length // size)
            pages = table[row, :n]
            k = cfg.blocks_for(n)
            refresh = is_refresh_step(self.steps.get(seq, 1), cfg.refresh)
            attend_all = k >= n or (refresh and cfg.dense_refresh)
            full_history = want_history and (refresh or attend_all)  # the history row covers every block
            need_true = cfg.policy == "oracle" or cfg.track_recall or (full_history and not (from_decode and attend_all))
            true = None
            if need_true:
                true = block_masses(q[row].cpu(), paged_rows(kv, pages, length).cpu(), **geometry)[0]  # [lh, n]
            if attend_all:
                ids = torch.arange(n).expand(heads, n) if heads else torch.arange(n)
            else:
                current = true
                if cfg.policy == "quest":
                    low, high = self.page_bounds(seq, layer, kv, pages, length)
                    current = bound_scores(q[row, 0], low, high, module.latent_heads, module.rope_dim,
                                           scale=module.scaling, per_latent_head=bool(heads)).cpu()
                scores = policy_scores(cfg, n, self.history.get((seq, layer)), current, self.predictor,
                                       latent_heads=heads)
                ids = choose_blocks(scores, k, cfg.sink_blocks, cfg.local_blocks)  # [k], or [heads, k]
            if want_history:
                if from_decode and (attend_all or not full_history):  # the attention pass gives this row
                    self._pending.append((row, seq, ids, n, 1))
                elif full_history:
                    self._push(seq, layer, true[None])
                else:  # masses over the attended blocks only (even when ``true`` was computed for recall)
                    part = self._attended_masses(q[row], kv, pages, ids, length, geometry)
                    self._push(seq, layer, attended_history_row(part, ids, n)[None])
            self._record(layer, ids, n, true)
            self.last_choice[seq, layer] = ids
            chosen, new_len = reduced_pages(pages, ids, length, size)
            chosen_rows.append(chosen)
            new_lens.append(new_len)
        k_max = max(r.shape[-1] for r in chosen_rows)
        reduced = torch.zeros(b, *([heads] if heads else []), k_max, dtype=torch.int32)
        for row, pages in enumerate(chosen_rows):
            reduced[row, ..., : pages.shape[-1]] = pages
        dev = step["block_table"].device
        return reduced.to(dev), torch.tensor(new_lens, dtype=torch.int32).to(dev), max(new_lens)

    def forecast(self, seq: int, layer: int, length: int) -> torch.Tensor:
        """Ascending block ids the next decode step of (seq, layer) is expected to attend, for a
        sequence that will then hold ``length`` tokens, from the history up to now (what an
        offloaded cache prefetches, ``latentkv.sparsity.offload``). For window, last-step and
        predictor this is the choice ``select`` will make (the history it reads is already here);
        Quest and the oracle need the next query, so their forecast is the last choice (plus the
        forced blocks), the rest of the budget by recency. With ``per_latent_head``: the union of
        the latent heads' choices."""
        cfg, size = self.config, self.page_size
        n = -(-length // size)
        k = cfg.blocks_for(n)
        if k >= n or (cfg.dense_refresh and is_refresh_step(self.steps.get(seq, 0) + 1, cfg.refresh)):
            return torch.arange(n)
        if cfg.policy in ("quest", "oracle"):
            last = self.last_choice.get((seq, layer))
            lasts = last.reshape(-1, last.shape[-1]) if last is not None else torch.empty(1, 0, dtype=torch.long)
            scores = (torch.arange(n, dtype=torch.float32) / n).repeat(lasts.shape[0], 1)  # a row per head's choice
            for row, ids in zip(scores, lasts):
                row[ids[ids < n]] += 1.0
        else:  # the history has a row per latent head: what choosing per head needs, before any select
            history = self.history.get((seq, layer))
            heads = history.shape[0] if cfg.per_latent_head and history is not None and history.shape[0] > 1 else None
            scores = policy_scores(cfg, n, history, None, self.predictor, latent_heads=heads)
        return choose_blocks(scores, k, cfg.sink_blocks, cfg.local_blocks).unique()

    @property
    def wants_masses(self) -> bool:
        """Whether the history of the last ``select`` waits for the attention's per-page masses."""
        return bool(self._pending)

    def record(self, layer: int, masses: torch.Tensor) -> None:
        """masses [b, s, latent_heads, table columns]: the ``return_masses`` output of the attention
        run with the block table ``select`` returned (column j = the j-th attended block); pushes the
        history rows ``select`` left pending (zero for blocks not attended)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        masses = masses.float().cpu()
        for row, seq, ids, n, take in pending:
            part = masses[row, -take:, :, : ids.shape[-1]]  # [take, lh, attended blocks]
            self._push(seq, layer, attended_history_row(part, ids, n))

    def _attended_masses(self, q: torch.Tensor, kv: torch.Tensor, pages: torch.Tensor, ids: torch.Tensor,
                         length: int, geometry: dict) -> torch.Tensor:
        """[latent_heads, k] masses of one decode query (q [1, H, w]) over the blocks ``ids`` it attends
        (a separate PyTorch pass); ids [latent_heads, k]: each latent head over its own blocks."""
        def masses(head_ids):
            rows = paged_rows(kv, *reduced_pages(pages, head_ids, length, self.page_size))
            return block_masses(q.cpu(), rows.cpu(), **geometry)[0]  # [lh, k]

        if ids.dim() == 1:
            return masses(ids)
        return torch.stack([masses(head_ids)[c] for c, head_ids in enumerate(ids)])

    def _record(self, layer: int, ids: torch.Tensor, n: int, true: torch.Tensor | None) -> None:
        """ids [k], or [latent_heads, k] (the blocks each latent head attended)."""
        st = self.stats
        st.decisions += 1
        st.blocks_attended += ids.shape[-1]
        st.blocks_total += n
        if true is not None and self.config.track_recall:
            recall = float(true.gather(1, ids.expand(true.shape[0], -1)).sum(-1).mean())
            st.recall_sum += recall
            st.recall_count += 1
            acc = st.per_layer_recall.setdefault(layer, [0.0, 0])
            acc[0] += recall
            acc[1] += 1

    def forget(self, seq: int) -> None:
        """Drop a finished sequence's state."""
        for key in [k for k in self.history if k[0] == seq]:
            del self.history[key]
        for key in [k for k in self.bounds if k[0] == seq]:
            del self.bounds[key]
        self.steps.pop(seq, None)
