"""Sparse decode with the latent cache offloaded to host memory.

Every page of every sequence lives in host memory (pinned when the compute device is a GPU). The
device holds, per layer, a pool of page slots sized to what a step attends (the sink pages, the
recent pages and the chosen ones of every sequence in the batch, plus slack); the block table the
decode kernel reads points at pool slots, never at host pages.

The order of one decode step t of one layer (``OffloadedLatentCache.attend_latent``):

1. the step's new cache rows are written to the host pages (the truth), the device waits for the
   copies prefetched for this layer during step t - 1, and the new rows are also written into the
   pool slots of the pages that are resident (a page whose first row this is gets a slot without a
   copy: a *fresh* page);
2. the policy chooses the pages (``SparseAttention.select``, reading the host pages where it needs
   them: Quest's bounds, the oracle's masses);
3. ``PagePool.ensure`` maps the chosen pages to slots; a page the forecast missed is copied now,
   synchronously on the compute stream, and counted (``OffloadStats.pages_missed``);
4. the kernel attends over the pool (exact: the same rows in the same order as the non-offloaded
   cache's reduced table, so the output is bit-identical);
5. the policy's choice for step t + 1 is made from the history up to t (``SparseAttention.forecast``)
   and the pages it lacks are copied host-to-device on a side CUDA stream (``PagePool.prefetch``:
   non-blocking copies from pinned memory, an event the next step waits on), overlapped with the
   rest of step t. The side stream first waits for the compute stream, so a slot is never
   overwritten while queued work still reads it.

For history policies (window, last-step, predictor) the forecast is the next step's choice, so
misses come only from refresh steps; Quest and the oracle need the next query, so their forecast is
this step's choice moved to the next length, and what they change is fetched as misses.

Eviction: the pool keeps its pages in least-recently-used order; a page is evicted only when a
slot is needed and it is not among the pages being placed. The pool never holds more pages than
its slots: a step whose pages cannot fit raises an error naming the size to ask for.

On the CPU (``device="cpu"``) the same code runs without streams or pinned memory (the tests).
Prefill chunks attend densely over a temporary device copy of the sequence's pages (prefill is
not offloaded: its peak is one layer's pages of the sequence being prefilled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from latentkv.errors import LatentKVError
from latentkv.runtime.decode import PagedLatentCache, score_options
from latentkv.kernels.mla_decode import decode_attention

__all__ = ["OffloadStats", "OffloadedLatentCache", "PagePool", "pool_slots_for"]


@dataclass
class OffloadStats:
    """Running totals over decode steps x layers (one ``ensure`` = one layer of one step)."""

    steps: int = 0  # layer-steps that attended through a pool
    pages_attended: int = 0
    pages_prefetched: int = 0  # copied ahead on the side stream
    pages_missed: int = 0  # chosen but not resident: copied synchronously
    pages_fresh: int = 0  # slots given to a page at its first row (no copy)
    evictions: int = 0
    bytes_moved: int = 0  # host-to-device, prefetch + misses
    peak_resident: int = 0

    def add(self, other: OffloadStats) -> None:
        for k in self.__dataclass_fields__:
            v = getattr(other, k)
            setattr(self, k, max(getattr(self, k), v) if k == "peak_resident" else getattr(self, k) + v)

    def summary(self) -> dict:
        per = max(1, self.steps)
        return {
            "layer_steps": self.steps,
            "pages_attended_per_step": self.pages_attended / per,
            "pages_fetched_per_step": (self.pages_prefetched + self.pages_missed) / per,
            "pages_prefetched_per_step": self.pages_prefetched / per,
            "misses_per_step": self.pages_missed / per,
            "pages_missed": self.pages_missed,
            "miss_fraction": self.pages_missed / max(1, self.pages_attended),
            "bytes_moved": self.bytes_moved,
            "bytes_per_step": self.bytes_moved / per,
            "evictions": self.evictions,
            "peak_resident": self.peak_resident,
        }


_SIDE_STREAMS: dict = {}


def side_stream(device: torch.device):
    """The copy stream of a CUDA device (one per device, made on first use)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(torch.device("cuda", key))
    return _SIDE_STREAMS[key]


def _runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(host page, slot) pairs -> (first page, first slot, count) runs of consecutive pages in
    consecutive slots (one copy each)."""
    runs: list[list[int]] = []
    for page, slot in sorted(pairs):
        if runs and page == runs[-1][0] + runs[-1][2] and slot == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([page, slot, 1])
    return [tuple(r) for r in runs]


class PagePool:
    """One layer's device pool of ``slots`` page slots over a host page store.

    host: [num_pages, page_size, width] (pinned for a CUDA device, for asynchronous copies).
    ``prefetch(pages)``: place pages ahead (side stream on CUDA); ``ensure(pages)``: the slots of
    pages about to be attended, copying the missing ones now; ``write_rows``: new rows into
    resident slots; ``adopt``: a slot for a page starting now (no copy).

    The mapping is kept in host tensors (page -> slot, slot -> page, slot -> last use), so a call
    costs a few vector operations whatever the number of pages, plus one copy per run of
    consecutive missing pages.
    """

    def __init__(self, host: torch.Tensor, slots: int, device: str | torch.device = "cpu",
                 stats: OffloadStats | None = None):
        if slots < 1:
            raise LatentKVError(f"a page pool needs at least one slot; got {slots}.")
        self.host = host
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not host.is_pinned():
            raise LatentKVError("the host pages of an offloaded cache must be pinned for asynchronous copies.")
        self.slots = slots
        self.pool = torch.zeros(slots, *host.shape[1:], dtype=host.dtype, device=self.device)
        self.slot_of_page = torch.full((host.shape[0],), -1, dtype=torch.long)
        self.page_of_slot = torch.full((slots,), -1, dtype=torch.long)
        self.last_used = torch.full((slots,), -1, dtype=torch.long)  # call counter; -1: free
        self.tick = 0
        self.stats = stats if stats is not None else OffloadStats()
        self.ready = None  # CUDA event: the last prefetch's copies are done
        self.page_bytes = host[0].numel() * host.element_size()

    # placement ----------------------------------------------------------------------------
    def resident(self, page: int) -> bool:
        return bool(self.slot_of_page[int(page)] >= 0)

    @property
    def slot_of(self) -> dict[int, int]:
        """{host page: slot} of the resident pages (inspection)."""
        used = (self.page_of_slot >= 0).nonzero().flatten()
        return dict(zip(self.page_of_slot[used].tolist(), used.tolist()))

    def _place(self, pages, strict: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots for the pages of ``pages`` not resident, evicting the least recently used pages
        not among ``pages``; returns the new (pages, slots). ``strict``: raise when they cannot
        fit, else place what fits, in the order given (a prefetch is best effort)."""
        pages = torch.as_tensor(pages, dtype=torch.long).flatten()
        if pages.numel() == 0:
            return pages, pages
        uniq, inverse = torch.unique(pages, return_inverse=True)
        first = torch.full((uniq.numel(),), pages.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(pages.numel()), "amin")
        pages = uniq[first.argsort()]  # unique, in the order first given
        self.tick += 1
        cur = self.slot_of_page[pages]
        here = cur >= 0
        self.last_used[cur[here]] = self.tick
        missing = pages[~here]
        if missing.numel() == 0:
            return missing, missing
        key = self.last_used.clone()
        key[cur[here]] = torch.iinfo(torch.long).max  # the pages of this call stay
        room = int((key < torch.iinfo(torch.long).max).sum())  # slots not holding a page of this call
        if missing.numel() > room:
            if strict:
                raise LatentKVError(
                    f"the device page pool has {self.slots} slots but this step attends to {pages.numel()} pages "
                    "of this layer; build the offloaded cache with more pool pages (pool_pages) or lower the "
                    "sparse budget."
                )
            missing = missing[:room]
            if missing.numel() == 0:
                return missing, missing
        victims = torch.topk(key, missing.numel(), largest=False).indices
        old = self.page_of_slot[victims]
        old = old[old >= 0]
        self.slot_of_page[old] = -1
        self.stats.evictions += old.numel()
        self.page_of_slot[victims] = missing
        self.slot_of_page[missing] = victims
        self.last_used[victims] = self.tick
        self.stats.peak_resident = max(self.stats.peak_resident, int((self.page_of_slot >= 0).sum()))
        return missing, victims

    def _copy(self, pages: torch.Tensor, slots: torch.Tensor, non_blocking: bool) -> None:
        for page, slot, count in _runs(list(zip(pages.tolist(), slots.tolist()))):
            self.pool[slot : slot + count].copy_(self.host[page : page + count], non_blocking=non_blocking)
        self.stats.bytes_moved += pages.numel() * self.page_bytes

    # the calls of a step ------------------------------------------------------------------
    def prefetch(self, pages) -> int:
        """Start copying the ``pages`` not resident (best effort: what fits beside them); on CUDA on
        the side stream, after the work already queued on the compute stream. Returns the count."""
        new, slots = self._place(pages, strict=False)
        if new.numel():
            if self.cuda:
                stream = side_stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))  # queued reads of evicted slots first
                with torch.cuda.stream(stream):
                    self._copy(new, slots, non_blocking=True)
                    self.ready = torch.cuda.Event()
                    self.ready.record(stream)
            else:
                self._copy(new, slots, non_blocking=False)
        self.stats.pages_prefetched += new.numel()
        return new.numel()

    def wait(self) -> None:
        """Order the compute stream after the last prefetch's copies (before the pool is written or read)."""
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.ready = None

    def adopt(self, pages) -> None:
        """Slots for pages whose first row is being written now (nothing to copy)."""
        self.wait()
        new, _ = self._place(pages, strict=True)
        self.stats.pages_fresh += new.numel()

    def write_rows(self, flat_rows, rows: torch.Tensor) -> None:
        """flat_rows [n] (host, long): row ids in the [num_pages * page_size] view; rows [n, width]
        (any device): written into the slots of the resident pages."""
        size = self.host.shape[1]
        flat_rows = torch.as_tensor(flat_rows, dtype=torch.long)
        slot = self.slot_of_page[flat_rows // size]
        keep = (slot >= 0).nonzero().flatten()
        if keep.numel() == 0:
            return
        self.wait()
        dst = (slot[keep] * size + flat_rows[keep] % size).to(self.device)
        self.pool.view(-1, self.pool.shape[-1]).index_copy_(0, dst, rows[keep.to(rows.device)].to(self.pool.dtype))

    def ensure(self, pages) -> torch.Tensor:
        """Slots [len(pages)] (long, host) of ``pages``, copying the missing ones now on the compute
        stream (misses)."""
        pages = torch.as_tensor(pages, dtype=torch.long).flatten()
        self.wait()
        new, slots = self._place(pages, strict=True)
        if new.numel():
            self._copy(new, slots, non_blocking=self.cuda)  # the compute stream: ordered before the attention
        self.stats.pages_missed += new.numel()
        self.stats.pages_attended += int(torch.unique(pages).numel())
        self.stats.steps += 1
        return self.slot_of_page[pages]

    def drop(self, pages) -> None:
        """Forget pages (a finished sequence's): their slots become free."""
        pages = torch.as_tensor(pages, dtype=torch.long).flatten()
        slots = self.slot_of_page[pages]
        slots = slots[slots >= 0]
        self.page_of_slot[slots] = -1
        self.last_used[slots] = -1
        self.slot_of_page[pages] = -1

    def __deepcopy__(self, memo):
        self.wait()
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        other = PagePool.__new__(PagePool)
        other.__dict__.update(self.__dict__)
        for name in ("pool", "slot_of_page", "page_of_slot", "last_used"):
            setattr(other, name, getattr(self, name).clone())
        other.stats = OffloadStats()
        other.ready = None
        other.host = memo.get(id(self.host), self.host)
        return other


def pool_slots_for(config, max_seqs: int, max_seq_len: int, page_size: int, slack: int = 2) -> int:
    """Slots per layer for ``max_seqs`` sequences of up to ``max_seq_len`` tokens under a
    ``SparseConfig``: the blocks a step attends at the longest length (sink + local + chosen), plus
    ``slack`` per sequence (the page a step starts and a forecast page beside the chosen ones)."""
    n = math.ceil(max_seq_len / page_size)
    k = config.blocks_for(n) if config is not None else n
    return max_seqs * (min(n, k) + slack)


# --------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------
class OffloadedLatentCache(PagedLatentCache):
    """A ``PagedLatentCache`` whose pages live in host memory, attended through per-layer device
    pools of ``pool_pages`` slots (``PagePool``). Same use as the paged cache; ``offload_stats``
    sums the pools' counters. A sparse policy (``cache.sparsity``) is what makes a pool smaller
    than the sequences worthwhile: without one every decode step needs every page resident.
    Cast cache formats only (a quantized latent is refused)."""

    def __init__(self, layer_widths, *, num_pages: int, pool_pages: int, page_size: int = 64,
                 dtype=torch.float32, device="cpu", backend: str = "auto", num_splits: int | None = None,
                 cache_format=None, latent_widths=None):
        latent = (cache_format or {}).get("latent")
        if latent is not None and latent.encoding.kind != "cast":
            raise LatentKVError("the offloaded cache holds cast formats only (bf16 / fp16 / fp32); "
                                f"the model's latent is stored as {latent.name}.")
        super().__init__(layer_widths, num_pages=1, page_size=page_size, dtype=dtype, device="cpu",
                         backend=backend, num_splits=num_splits, cache_format=cache_format,
                         latent_widths=latent_widths)
        self.device = torch.device(device)
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        pin = self.device.type == "cuda"
        self.pages = [torch.zeros(num_pages, page_size, w, dtype=dtype, pin_memory=pin) for w in layer_widths]
        self.pool_pages = pool_pages
        self.pools = [PagePool(p, pool_pages, self.device) for p in self.pages]

    @classmethod
    def for_model(cls, model, *, max_seqs: int, max_seq_len: int, page_size: int = 64, backend: str = "auto",
                  num_splits: int | None = None, pool_pages: int | None = None, sparse=None):
        """Sized for ``max_seqs`` x ``max_seq_len``; ``pool_pages`` per layer (default: what the
        ``SparseConfig`` ``sparse`` attends, ``pool_slots_for``)."""
        from latentkv.runtime.decode import latent_attentions
        from latentkv.kvformats import model_cache_formats

        attns = latent_attentions(model)
        param = next(model.parameters())
        pages = max_seqs * math.ceil(max_seq_len / page_size)
        if pool_pages is None:
            pool_pages = min(pages, pool_slots_for(sparse, max_seqs, max_seq_len, page_size))
        return cls([a.kv_lora_rank + a.rope_dim for a in attns], num_pages=pages, pool_pages=pool_pages,
                   page_size=page_size, dtype=param.dtype, device=param.device, backend=backend,
                   num_splits=num_splits, cache_format=model_cache_formats(model.config),
                   latent_widths=[a.kv_lora_rank for a in attns])

    @property
    def offload_stats(self) -> OffloadStats:
        total = OffloadStats()
        for p in self.pools:
            total.add(p.stats)
        return total

    def device_bytes(self) -> int:
        """Bytes of the device pools (every layer)."""
        return sum(p.pool.numel() * p.pool.element_size() for p in self.pools)

    def begin_step(self, seqs, num_new):
        positions = super().begin_step(seqs, num_new)
        step = self._step
        step["host_rows"] = step["rows"].cpu()
        size = self.page_size
        step["fresh"] = sorted({r // size for r in step["host_rows"].tolist() if r % size == 0})
        step["host_table"] = step["block_table"].cpu()
        return positions

    def attend_latent(self, module, q, rows, position_ids=None):
        step = self._current_step()
        b, s = q.shape[:2]
        layer = module.layer_idx
        if b != len(step["seqs"]) or s != step["num_new"]:
            raise LatentKVError(f"layer {layer} got {b} x {s} tokens but the step was begun for "
                                f"{len(step['seqs'])} x {step['num_new']}.")
        if position_ids is not None and position_ids is not step["positions"]:
            if not torch.equal(position_ids.expand(b, s).to(step["positions"].device), step["positions"]):
                raise LatentKVError("position_ids differ from the positions begin_step(...) returned; pass those.")
        host, pool = self.pages[layer], self.pools[layer]
        width = host.shape[-1]
        if width != module.kv_lora_rank + module.rope_dim or rows.shape[-1] != width:
            raise LatentKVError(f"layer {layer}: cache width {width} does not fit the module.")
        rows = self.rounded(rows.reshape(b * s, width), module.kv_lora_rank).to(host.dtype)
        host.view(-1, width).index_copy_(0, step["host_rows"], rows.cpu())  # the truth (a sync on a GPU)
        if s == 1 and step["fresh"]:
            pool.adopt(step["fresh"])
        pool.write_rows(step["host_rows"], rows)
        q = q.to(host.dtype)
        if self.sparsity is not None:
            table, lens, max_len = self.sparsity.select(module, q, host, step)
            masses = self.sparsity.wants_masses
        else:
            table, lens, max_len, masses = step["block_table"], step["seq_lens"], step["max_len"], False
        table = table.cpu()
        lens_host = lens.cpu().tolist()
        size = self.page_size
        if s > 1:  # prefill: dense, over a temporary device copy of the pages it reads
            used = [table[r, : -(-lens_host[r] // size)] for r in range(b)]
            order = torch.cat(used).unique()
            kv = host[order.long()].to(self.device)
            remap = torch.full((self.num_pages,), 0, dtype=torch.int32)
            remap[order.long()] = torch.arange(len(order), dtype=torch.int32)
            dev_table = remap[table.long()]
        else:
            dev_table = torch.zeros_like(table)
            wanted = [table[r, : -(-lens_host[r] // size)].tolist() for r in range(b)]
            slots = pool.ensure([p for w in wanted for p in w]).to(torch.int32)
            at = 0
            for r, w in enumerate(wanted):
                dev_table[r, : len(w)] = slots[at : at + len(w)]
                at += len(w)
            kv = pool.pool
        out = decode_attention(
            q, kv, dev_table.to(self.device), lens.to(self.device),
            latent_heads=module.latent_heads, rope_dim=module.rope_dim, softmax_scale=module.scaling,
            num_splits=self.num_splits, backend=self.backend, max_seq_len=max_len, return_masses=masses,
            **score_options(module),
        )  # fmt: skip
        if masses:
            out, page_masses = out
            self.sparsity.record(layer, page_masses)
        self._prefetch_next(layer, step)
        return out

    @property
    def sparsity(self):
        return self._sparsity

    @sparsity.setter
    def sparsity(self, value) -> None:
        """Attaching a policy prefetches its first step for the sequences held (their history is
        the policy's from then on)."""
        self._sparsity = value
        if value is not None and getattr(self, "pools", None) and self._step is None:
            seqs = [s for s in self._tables if self._lens[s]]
            if seqs:
                step = {"seqs": seqs, "starts": [self._lens[s] for s in seqs], "num_new": 0}
                for layer in range(len(self.pools)):
                    self._prefetch_next(layer, step)

    def _prefetch_next(self, layer: int, step: dict) -> None:
        """Forecast the next decode step's pages of every sequence (history up to this step) and
        start copying the ones not resident."""
        size = self.page_size
        pages = []
        for row, seq in enumerate(step["seqs"]):
            length = step["starts"][row] + step["num_new"]  # after this step
            table = self._tables[seq]
            if self.sparsity is None:
                ids = range(-(-(length + 1) // size))
            else:
                ids = self.sparsity.forecast(seq, layer, length + 1).tolist()
            pages.extend(table[i] for i in ids if i < len(table) and i * size < length)
        self.pools[layer].prefetch(pages)

    def free_sequence(self, seq: int) -> None:
        for pool in self.pools:
            pool.drop(self._tables.get(seq, []))
        super().free_sequence(seq)
