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
   and placed in the pool on the device (``PagePool.prefetch(..., defer=True)``); one layer later
   the host reads the placed (page, slot) pairs back and copies the missing pages host-to-device on
   a side CUDA stream (``PagePool.issue``: per layer, one device gather that reads the pinned host
   pages in place over the host link -- or, where the driver maps no pinned memory into the device's
   address space, one host gather into a pinned staging buffer and a non-blocking copy --, an event
   the next step waits on), overlapped with the rest of step t. The side stream
   first waits for the compute stream, so a slot is never overwritten while queued work still
   reads it.

For history policies (window, last-step, predictor) the forecast is the next step's choice, so
misses come only from refresh steps; Quest and the oracle need the next query, so their forecast is
this step's choice moved to the next length, and what they change is fetched as misses.

Eviction: the pool keeps its pages in least-recently-used order; a page is evicted only when a
slot is needed and it is not among the pages being placed (nor, until the next ``ensure``, among
the last prefetch's). The pool never holds more pages than its slots: a step whose pages cannot
fit raises an error naming the size to ask for.

Bookkeeping: the maps are device tensors and one ``PagePool`` may hold every layer, so the pages of
a whole batch (and of every layer) are placed by one fixed batch of vector operations without a
loop over sequences or pages; see ``PagePool``. ``scripts/bench_offload_decode.py`` drives it that
way (the choice made on the device for every sequence, one placement and one read-back per step).

For a CUDA graph, ``PagePool.fetch_on_device`` / ``ensure_on_device`` do the placement and the copies
with no host involvement at all: the pairs the placement writes go straight to a fixed-grid copy
kernel (``latentkv.kernels.page_copy``) whose programs for "no page" move nothing, so a captured
step replays with new pages and only they cross the host link; the counts stay on the device until
``stats`` is read (which also raises a pool overflow). The same pool state results as from
``prefetch`` + ``ensure`` (tested).

On the CPU (``device="cpu"``) the same code runs without streams or pinned memory (the tests).
Prefill chunks attend densely over a temporary device copy of the sequence's pages (prefill is
not offloaded: its peak is one layer's pages of the sequence being prefilled).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from latentkv.errors import LatentKVError
from latentkv.runtime.decode import PagedLatentCache, score_options
from latentkv.kernels.mla_decode import decode_attention

__all__ = ["OffloadStats", "OffloadedLatentCache", "PagePool", "mapped_host_rows", "pool_slots_for"]

HOST_READS = ("auto", "direct", "staging")


class _DeviceArray:
    """A pointer described by the CUDA array interface (what ``torch.as_tensor`` reads)."""

    def __init__(self, ptr: int, shape: tuple, typestr: str):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False), "version": 2,
                                         "strides": None}


def mapped_host_rows(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor over the pinned ``host`` tensor's own memory, one row per ``host[i]`` as 8-, 4-
    or 2-byte words, or None where the driver does not map it. With unified addressing a pinned
    page is readable by device kernels at its host address, so a device gather reads only the
    pages it selects, straight over the host link: no host-side gather, no staging copy."""
    if device.type != "cuda" or not host.is_pinned() or not host.is_contiguous():
        return None
    rows = host.reshape(host.shape[0], -1)
    nbytes = rows.shape[1] * rows.element_size()
    word, typestr = next((w, t) for w, t in ((torch.int64, "<i8"), (torch.int32, "<i4"), (torch.int16, "<i2"),
                                             (torch.uint8, "|u1")) if nbytes % w.itemsize == 0)
    try:
        view = torch.as_tensor(_DeviceArray(rows.data_ptr(), (rows.shape[0], nbytes // word.itemsize), typestr),
                               device=device)
    except (RuntimeError, TypeError, ValueError):  # no unified addressing, or memory not registered
        return None
    return view if view.is_cuda and view.data_ptr() == rows.data_ptr() else None


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


_DEVICE_COUNTERS = ("evictions", "pages_attended", "pages_fresh", "peak_resident", "unchecked",
                    "fetched", "missed", "steps", "overflowed")  # the last four: fetch / ensure_on_device
_COUNTER = {name: i for i, name in enumerate(_DEVICE_COUNTERS)}


class PagePool:
    """Device pools of ``slots`` page slots per layer over a host page store.

    host: [num_pages, page_size, width] (one layer) or [layers, num_pages, page_size, width] (every
    layer of a step at once), pinned for a CUDA device. ``prefetch(pages)``: place pages ahead (the
    copies on a side stream on CUDA); ``ensure(pages)``: the slots of pages about to be attended,
    copying the missing ones now; ``write_rows`` / ``row_index``: new rows into resident slots;
    ``adopt``: a slot for a page starting now (no copy). Pages are given as a tensor (any device)
    of page ids, ``[n]`` for one layer or ``[layers, ...]``; -1 = no page; duplicates allowed (a
    whole ``[batch, k]`` block table is one call).

    The mapping lives on the device (page -> slot, slot -> page, slot -> last use, with spare
    "trash" entries that masked-off writes land in), so placing any number of pages of any number
    of layers is a fixed, short sequence of vector operations that never waits for the device. The
    host learns which pages to copy from one small device-to-host transfer per call (the new
    (page, slot) pairs); the copy is one gather of those host pages into a pinned staging buffer,
    then per layer one host-to-device copy and one scatter into the pool (side stream, an event per
    layer). ``prefetch(..., defer=True)`` leaves the host part for later (``issue``), so the host
    need not wait for the device right away. ``ensure`` of the very tensor the last prefetch placed
    completely skips the transfer: a prefetch's pages are never evicted before the next ``ensure``.
    """

    def __init__(self, host: torch.Tensor, slots: int, device: str | torch.device = "cpu",
                 stats: OffloadStats | None = None, host_reads: str = "auto"):
        if slots < 1:
            raise LatentKVError(f"a page pool needs at least one slot; got {slots}.")
        if host_reads not in HOST_READS:
            raise LatentKVError(f"host_reads must be one of {', '.join(HOST_READS)}; got {host_reads!r}.")
        self.host = host
        self.device = dev = torch.device(device)
        self.cuda = dev.type == "cuda"
        if self.cuda and not host.is_pinned():
            raise LatentKVError("the host pages of an offloaded cache must be pinned for asynchronous copies.")
        self.layered = host.dim() == 4
        self.layers = host.shape[0] if self.layered else 1
        self.num_pages = P = host.shape[-3]
        self.slots = S = slots
        L = self.layers
        self._host_flat = host.reshape(L * P, *host.shape[-2:])  # a view: the same storage
        # per layer slot S is its trash slot; global page L * P is the trash page
        self.pools = torch.zeros(L, S + 1, *host.shape[-2:], dtype=host.dtype, device=dev)
        self.pool = self.pools if self.layered else self.pools[0]
        self._pool_flat = self.pools.view(L * (S + 1), *host.shape[-2:])
        self.slot_of_page = torch.full((L * P + 1,), -1, dtype=torch.long, device=dev)  # global slot
        self.page_of_slot = torch.full((L * (S + 1),), -1, dtype=torch.long, device=dev)  # global page
        self.last_used = torch.full((L, S + 1), -1, dtype=torch.long, device=dev)  # call counter; -1: free
        self.protect = torch.zeros(L, S + 1, dtype=torch.bool, device=dev)  # the last prefetch's slots
        self.counters = torch.zeros(len(_DEVICE_COUNTERS), dtype=torch.long, device=dev)
        self._page_base = (torch.arange(L, device=dev) * P)[:, None]
        self._slot_base = (torch.arange(L, device=dev) * (S + 1))[:, None]
        self._trash_slot = L * (S + 1) - 1
        self.tick = torch.zeros(1, dtype=torch.long, device=dev)  # placement calls (on the device: graph replays count)
        self._host_stats = stats if stats is not None else OffloadStats()
        self.ready = [None] * L  # CUDA events: a layer's prefetched copies are done
        self.page_bytes = host[..., 0, :, :].numel() // L * host.element_size()
        self._pending = None  # a deferred prefetch: (pairs handle, the pages tensor given)
        self._prefetched = None  # the pages tensor of the last prefetch, while all of it is resident
        self._overflow = None  # device flag: an adopt did not fit (raised by the next ensure)
        self._stage = self._stage_idx = self._pairs = None
        self._stage_free = None  # CUDA event: the staging buffer's last copy has left it
        # direct reads: device gathers from the pinned host pages themselves (see mapped_host_rows)
        self._host_words = mapped_host_rows(self._host_flat, dev) if self.cuda and host_reads != "staging" else None
        if host_reads == "direct" and self._host_words is None:
            raise LatentKVError("host_reads='direct' needs pinned host pages that the CUDA driver maps into the "
                                "device's address space (unified addressing); use host_reads='auto' or 'staging'.")
        self._pool_words = (self._pool_flat.reshape(self._pool_flat.shape[0], -1).view(self._host_words.dtype)
                            if self._host_words is not None else None)
        self.host_reads = "direct" if self._host_words is not None else ("staging" if self.cuda else "cpu")
        self.host_wait_s = 0.0  # host time spent waiting for the device (placed pairs, staging buffer)

    # stats --------------------------------------------------------------------------------
    @property
    def stats(self) -> OffloadStats:
        """The counters (reading the device ones waits for the device)."""
        values = dict(zip(_DEVICE_COUNTERS, self.counters.tolist()))
        if values.pop("unchecked"):
            raise LatentKVError("pages assumed resident were not: ensure(...) was given the tensor of a prefetch "
                                "that had changed since.")
        if values.pop("overflowed"):
            raise LatentKVError(self._too_small)
        fetched, missed, steps = values.pop("fetched"), values.pop("missed"), values.pop("steps")
        values["peak_resident"] = max(values["peak_resident"], self._resident_max())
        st = self._host_stats
        for name, v in values.items():
            setattr(st, name, v)
        if fetched or missed or steps:  # the device-side calls' counts beside the host's own
            st = replace(st, pages_prefetched=st.pages_prefetched + fetched, pages_missed=st.pages_missed + missed,
                         steps=st.steps + steps, bytes_moved=st.bytes_moved + (fetched + missed) * self.page_bytes)
        return st

    def _count(self, name: str, value) -> None:
        """Add ``value`` (a device scalar or int) to the device counter ``name`` (no wait)."""
        i = _COUNTER[name]
        self.counters[i : i + 1].add_(value)

    def reset_stats(self) -> None:
        self.counters.zero_()
        self._host_stats.__init__()

    def _resident_max(self) -> int:
        return int((self.page_of_slot.view(self.layers, -1)[:, : self.slots] >= 0).sum(1).max())

    # placement ----------------------------------------------------------------------------
    def _pages(self, pages) -> torch.Tensor:
        """[layers, n] device long (local page ids, -1 = none)."""
        if not isinstance(pages, torch.Tensor):
            pages = torch.as_tensor(list(pages), dtype=torch.long)
        return pages.to(self.device, torch.long, non_blocking=True).reshape(self.layers, -1)

    def resident(self, page: int, layer: int = 0) -> bool:
        return bool(self.slot_of_page[layer * self.num_pages + int(page)] >= 0)

    @property
    def slot_of(self) -> dict[int, int]:
        """{host page: slot} of the resident pages of layer 0 (inspection)."""
        page_of_slot = self.page_of_slot[: self.slots].cpu()
        used = (page_of_slot >= 0).nonzero().flatten()
        return dict(zip(page_of_slot[used].tolist(), used.tolist()))

    def _place(self, pages: torch.Tensor, strict: bool, protect: bool = False):
        """Slots for the pages of ``pages`` ([layers, n] device long, -1 = none) not resident,
        evicting per layer the least recently used pages not among ``pages`` (nor protected by the
        last prefetch). Device operations only. Returns (new global pages [layers, n] (-1 where
        none), their global slots, overflow [layers, 1]: some page did not fit -- ``strict``: then
        that layer places nothing, else the pages that fit are placed, in ascending page order --,
        the number of unique pages)."""
        L, S, P, MAX = self.layers, self.slots, self.num_pages, torch.iinfo(torch.long).max
        trash_page, trash_slot = L * P, self._trash_slot
        self.tick.add_(1)
        if protect:  # a new prefetch replaces the last one's protection
            self.protect.zero_()
        lp = torch.where(pages >= 0, pages, P).sort(dim=1).values  # no page (P) sorts last
        uniq = torch.ones_like(lp, dtype=torch.bool)
        uniq[:, 1:] = lp[:, 1:] != lp[:, :-1]
        uniq &= lp < P
        gp = torch.where(uniq, lp + self._page_base, trash_page)
        cur = self.slot_of_page[gp]
        here = cur >= 0
        need = uniq & ~here
        here_slot = torch.where(here, cur, trash_slot).flatten()
        self.last_used.view(-1).scatter_(0, here_slot, self.tick.expand(here_slot.numel()))
        key = self.last_used.masked_fill(self.protect, MAX)
        key.view(-1).index_fill_(0, here_slot, MAX)  # this call's pages stay
        order = key[:, :S].sort(dim=1, stable=True)
        room = (order.values < MAX).sum(1, keepdim=True)
        rank = need.cumsum(1) - 1
        if strict:
            overflow = need.sum(1, keepdim=True) > room
            ok = need & ~overflow
        else:
            ok = need & (rank < room)
            overflow = (need & ~ok).any(1, keepdim=True)
        gslot = torch.where(ok, order.indices.gather(1, rank.clamp(0, S - 1)) + self._slot_base, trash_slot)
        old = self.page_of_slot[gslot]
        evicted = ok & (old >= 0)
        self.slot_of_page.index_fill_(0, torch.where(evicted, old, trash_page).flatten(), -1)
        self.page_of_slot.index_copy_(0, gslot.flatten(), gp.flatten())
        self.slot_of_page.index_copy_(0, torch.where(ok, gp, trash_page).flatten(), gslot.flatten())
        self.slot_of_page.narrow(0, trash_page, 1).fill_(-1)  # a kernel, not a host scalar copy: CUDA-graph safe
        self.last_used.view(-1).scatter_(0, gslot.flatten(), self.tick.expand(gslot.numel()))
        if protect:
            placed = self.slot_of_page[gp]
            self.protect.view(-1).index_fill_(0, torch.where(placed >= 0, placed, trash_slot).flatten(), True)
        self._count("evictions", evicted.sum())
        return torch.where(ok, gp, -1), torch.where(ok, gslot, -1), overflow, uniq.sum()

    def _announce(self, new: torch.Tensor, slots: torch.Tensor, overflow: torch.Tensor):
        """Start the device-to-host transfer of the placed pairs (one copy, then an event)."""
        packed = torch.cat([new.flatten(), slots.flatten(), overflow.flatten().long()])
        if not self.cuda:
            return packed, None, new.numel()
        if self._pairs is None or self._pairs.numel() < packed.numel():
            self._pairs = torch.empty(packed.numel(), dtype=torch.long, pin_memory=True)
        buf = self._pairs[: packed.numel()]
        buf.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return buf, event, new.numel()

    def _synchronize(self, event) -> None:
        if event is not None:
            t0 = time.perf_counter()
            event.synchronize()
            self.host_wait_s += time.perf_counter() - t0

    def _overflowed(self, handle) -> bool:
        buf, event, n = handle
        self._synchronize(event)
        return bool(buf[2 * n :].any())

    def _copy(self, handle, side: bool) -> int:
        """The host part of a placement: wait for its pairs, gather the host pages into the pinned
        staging buffer, copy them in per layer (on the side stream, after the work queued so far,
        when ``side``). Returns the pages copied."""
        buf, event, n = handle
        self._synchronize(event)
        sel = (buf[:n] >= 0).nonzero().flatten()
        m = sel.numel()
        if m == 0:
            return 0
        pages, slots = buf[:n][sel], buf[n : 2 * n][sel]
        self._host_stats.bytes_moved += m * self.page_bytes
        if not self.cuda:
            self._pool_flat.index_copy_(0, slots, self._host_flat.index_select(0, pages))
            return m
        self._synchronize(self._stage_free)  # the staging buffers' previous copy has left them
        direct = self._host_words is not None
        if self._stage_idx is None or self._stage_idx.shape[0] < 2 * m:
            size = 2 * max(m, self.slots)
            self._stage_idx = torch.empty(size, dtype=torch.long, pin_memory=True)
            if not direct:
                self._stage = torch.empty(size // 2, *self._host_flat.shape[1:], dtype=self.host.dtype, pin_memory=True)
        idx = self._stage_idx[: 2 * m]
        idx[m:].copy_(slots)
        if direct:
            idx[:m].copy_(pages)
        else:
            torch.index_select(self._host_flat, 0, pages, out=self._stage[:m])
        # per layer: its own copy and event, so a layer waits only for its pages
        ends = torch.bincount(sel // (n // self.layers), minlength=self.layers).cumsum(0).tolist()
        compute = torch.cuda.current_stream(self.device)
        stream = side_stream(self.device) if side else compute
        if side:
            stream.wait_stream(compute)  # queued reads of the evicted slots first
        with torch.cuda.stream(stream):
            idx_dev = idx.to(self.device, non_blocking=True)  # made on (freed to) this stream
            start = 0
            for layer, end in enumerate(ends):
                if end == start:
                    continue
                slot_ids = idx_dev[m + start : m + end]
                if direct:  # the device reads the chosen host pages in place
                    self._pool_words.index_copy_(0, slot_ids, self._host_words.index_select(0, idx_dev[start:end]))
                else:
                    rows = self._stage[start:end].to(self.device, non_blocking=True)
                    self._pool_flat.index_copy_(0, slot_ids, rows)
                if side:
                    self.ready[layer] = torch.cuda.Event()
                    self.ready[layer].record(stream)
                start = end
            self._stage_free = torch.cuda.Event()
            self._stage_free.record(stream)
        return m

    # the calls of a step ------------------------------------------------------------------
    def prefetch(self, pages, defer: bool = False) -> int | None:
        """Place the ``pages`` not resident (best effort: what fits beside them) and copy them; on
        CUDA on the side stream, after the work already queued on the compute stream. Returns the
        count, or None with ``defer``: the host part (which waits for the device to have placed
        them) is left to ``issue``, which ``ensure``, ``wait``, ``write_rows`` and the next
        ``prefetch`` call first."""
        self.issue()
        new, slots, overflow, _ = self._place(self._pages(pages), strict=False, protect=True)
        self._pending = (self._announce(new, slots, overflow), pages)
        return None if defer else self.issue()

    def issue(self) -> int:
        """The host part of a deferred prefetch (no-op without one); returns the pages copied."""
        if self._pending is None:
            return 0
        handle, given = self._pending
        self._pending = None
        m = self._copy(handle, side=self.cuda)
        self._prefetched = None if self._overflowed(handle) else given
        self._host_stats.pages_prefetched += m
        return m

    def wait(self, layer: int | None = None) -> None:
        """Order the compute stream after the prefetched copies of ``layer`` (every layer when
        None), before the pool is written or read there."""
        self.issue()
        for i in range(self.layers) if layer is None else (layer,):
            if self.ready[i] is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready[i])
                self.ready[i] = None

    def adopt(self, pages) -> None:
        """Slots for pages whose first row is being written now (nothing to copy). Does not wait for
        the device: a page that does not fit is reported by the next ``ensure``."""
        self.wait()
        new, _, overflow, _ = self._place(self._pages(pages), strict=True)
        self._count("pages_fresh", (new >= 0).sum())
        self._overflow = overflow if self._overflow is None else self._overflow | overflow

    def row_index(self, flat_rows) -> torch.Tensor:
        """[layers, n] indices into ``rows_of(layer)`` of the rows ``flat_rows`` ([n], any device:
        row ids in the [num_pages * page_size] view of a layer); a row of a page not resident goes
        to the trash slot. Call after ``wait`` (placement order)."""
        size = self.host.shape[-2]
        flat_rows = flat_rows.to(self.device, torch.long, non_blocking=True) if isinstance(flat_rows, torch.Tensor) \
            else torch.as_tensor(flat_rows, dtype=torch.long, device=self.device)
        slot = self.slot_of_page[flat_rows // size + self._page_base]  # [layers, n] global
        return (torch.where(slot >= 0, slot - self._slot_base, self.slots) + self._slot_base) * size + flat_rows % size

    def rows_of(self) -> torch.Tensor:
        """The pools of every layer as one [layers * (slots + 1) * page_size, width] row view."""
        return self._pool_flat.view(-1, self._pool_flat.shape[-1])

    def write_rows(self, flat_rows, rows: torch.Tensor) -> None:
        """flat_rows [n] (long, any device): row ids in a layer's [num_pages * page_size] view; rows
        [n, width] (one layer) or [layers, n, width]: written into the slots of the resident pages."""
        self.wait()
        index = self.row_index(flat_rows)
        self.rows_of().index_copy_(0, index.flatten(), rows.to(self.device, self.pool.dtype).reshape(index.numel(), -1))

    def ensure(self, pages, wait: bool = True) -> torch.Tensor:
        """Slots (long, on the device, per layer; -1 for a -1 page) of ``pages``, in their shape,
        copying the missing ones now on the compute stream (misses, counted). Without a transfer
        to the host when ``pages`` is the very tensor the last prefetch placed completely.
        ``wait=False``: the compute stream does not wait for the prefetched copies here; call
        ``wait(layer)`` before the layer's pool is written or read."""
        trusted = (self._pending is not None and pages is self._pending[1]) or \
            (self._pending is None and pages is self._prefetched)
        self.issue()
        trusted = trusted and self._prefetched is not None
        self._prefetched = None
        if wait or not trusted:  # a miss's slot may be one a prefetch copy still targets
            self.wait()
        flat = self._pages(pages)
        if trusted:  # every page is resident (a page that is not is counted; the stats read raises)
            slot = self._slots_held(flat)
            self._count("pages_attended", (slot >= 0).sum())
            self._count("unchecked", ((slot < 0) & (flat >= 0)).sum())
            self._host_stats.steps += self.layers
        else:
            self.protect.zero_()  # the prefetch is consumed: its pages not chosen now may go
            new, slots, overflow, attended = self._place(flat, strict=True)
            if self._overflow is not None:
                overflow, self._overflow = overflow | self._overflow, None
            handle = self._announce(new, slots, overflow)
            if self._overflowed(handle):
                raise LatentKVError(self._too_small)
            self._host_stats.pages_missed += self._copy(handle, side=False)  # compute stream: before the attention
            self._count("pages_attended", attended)
            self._host_stats.steps += self.layers
            slot = self._slots_held(flat)
        self.protect.zero_()
        return self._layer_slots(slot, pages)

    def _slots_held(self, flat: torch.Tensor) -> torch.Tensor:
        """Global slots [layers, n] of the pages ``flat`` ([layers, n] local ids), -1 where not resident or none."""
        return self.slot_of_page[torch.where(flat >= 0, flat + self._page_base, self.layers * self.num_pages)]

    def _layer_slots(self, slot: torch.Tensor, pages) -> torch.Tensor:
        """Global slots -> slots within their layer (-1 kept), in the shape ``pages`` was given."""
        out = torch.where(slot >= 0, slot - self._slot_base, -1)
        if isinstance(pages, torch.Tensor):
            return out.view(pages.shape)
        return out.view(-1) if not self.layered else out

    @property
    def _too_small(self) -> str:
        return (f"the device page pool has {self.slots} slots per layer but a step attends to more pages of a layer; "
                "build the offloaded cache with more pool pages (pool_pages) or lower the sparse budget.")

    # the same calls on the device alone (CUDA graphs) ----------------------------------------
    def _word_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(host pages, pool slots) as [rows, words] views over the global page / slot ids of ``_place``."""
        if not self.cuda:
            return self._host_flat.reshape(self._host_flat.shape[0], -1), self._pool_flat.view(self._pool_flat.shape[0], -1)
        if self._host_words is None:
            raise LatentKVError("copies on the device alone need pinned host pages that the CUDA driver maps into the "
                                "device's address space (host_reads 'direct').")
        return self._host_words, self._pool_words

    def write_host_rows(self, flat_rows: torch.Tensor, rows: torch.Tensor) -> None:
        """rows [n, width] (one layer) or [layers, n, width] into the host pages at ``flat_rows`` ([n]
        long: row ids in a layer's [num_pages * page_size] view), written by the device itself where
        the host pages are mapped into its address space (nothing waits; capturable), else by the host."""
        size, width = self.host.shape[-2], self.host.shape[-1]
        flat_rows = flat_rows.to(rows.device if self._host_words is not None else "cpu", torch.long)
        index = (flat_rows[None] + (torch.arange(self.layers, device=flat_rows.device) * self.num_pages * size)[:, None])
        if self._host_words is None:
            self._host_flat.view(-1, width).index_copy_(0, index.flatten(), rows.reshape(-1, width).to("cpu", self.host.dtype))
            return
        host_rows = self._host_words.view(-1).view(torch.uint8).view(self.host.dtype).view(-1, width)
        host_rows.index_copy_(0, index.flatten(), rows.reshape(-1, width).to(self.host.dtype))

    def fetch_on_device(self, pages) -> None:
        """``prefetch`` without the host: place ``pages`` (best effort, protected until the next
        ensure, as ``prefetch``) and copy the new ones on the current stream with
        ``latentkv.kernels.page_copy.copy_pages``, reading the host pages in place. Nothing waits
        for the device and the host learns nothing, so a CUDA graph can capture the call (``pages``
        a static device tensor refilled before each replay); run it on the stream that should do
        the copies and order the reads after it. Counted on the device (``stats``)."""
        from latentkv.kernels.page_copy import copy_pages

        src, dst = self._word_rows()
        self.issue()  # a host-driven prefetch still pending goes first (a no-op when the calls are not mixed)
        self._prefetched = None  # ensure() trusts no earlier prefetch after this placement
        new, slots, _, _ = self._place(self._pages(pages), strict=False, protect=True)
        copy_pages(src, dst, new.flatten(), slots.flatten())
        self._count("fetched", (new >= 0).sum())

    def ensure_on_device(self, pages) -> torch.Tensor:
        """``ensure`` without the host: the slots of ``pages`` (long, on the device, in their shape;
        -1 for a -1 page), the missing pages copied now on the current stream and counted as misses.
        Capturable like ``fetch_on_device``. A layer whose pages do not all fit places none of them
        (its slots come back -1) and the next ``stats`` read raises the error ``ensure`` raises."""
        from latentkv.kernels.page_copy import copy_pages

        src, dst = self._word_rows()
        self.issue()
        self._prefetched = None
        flat = self._pages(pages)
        self.protect.zero_()  # the prefetch is consumed: its pages not chosen now may go
        new, slots, overflow, attended = self._place(flat, strict=True)
        copy_pages(src, dst, new.flatten(), slots.flatten())
        self._count("pages_attended", attended)
        self._count("missed", (new >= 0).sum())
        self._count("steps", self.layers)
        self._count("overflowed", overflow.sum())
        return self._layer_slots(self._slots_held(flat), pages)

    def drop(self, pages) -> None:
        """Forget pages (a finished sequence's): their slots become free."""
        self.wait()
        flat = self._pages(pages)
        if flat.numel() == 0:
            return
        i = _COUNTER["peak_resident"]
        peak = self.counters[i : i + 1]
        peak.copy_(torch.maximum(peak, (self.page_of_slot.view(self.layers, -1)[:, : self.slots] >= 0).sum(1).max()))
        gp = torch.where(flat >= 0, flat + self._page_base, self.layers * self.num_pages)
        slots = self.slot_of_page[gp]
        slots = torch.where(slots >= 0, slots, self._trash_slot).flatten()
        self.page_of_slot.index_fill_(0, slots, -1)
        self.last_used.view(-1).index_fill_(0, slots, -1)
        self.protect.view(-1).index_fill_(0, slots, False)
        self.slot_of_page.index_fill_(0, gp.flatten(), -1)

    def __deepcopy__(self, memo):
        self.wait()
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        other = PagePool.__new__(PagePool)
        other.__dict__.update(self.__dict__)
        for name in ("pools", "slot_of_page", "page_of_slot", "last_used", "protect", "tick"):
            setattr(other, name, getattr(self, name).clone())
        other.pool = other.pools if other.layered else other.pools[0]
        other._pool_flat = other.pools.view(-1, *other.pools.shape[2:])
        other.counters = torch.zeros_like(self.counters)
        other._host_stats = OffloadStats()
        other.ready = [None] * self.layers
        other._stage_free = other._pending = other._prefetched = other._overflow = None
        other._stage = other._stage_idx = other._pairs = None
        other.host = memo.get(id(self.host), self.host)
        other._host_flat = other.host.reshape(self._host_flat.shape)
        return other


def pool_slots_for(config, max_seqs: int, max_seq_len: int, page_size: int, *, latent_heads: int = 1,
                   slack: int = 2) -> int:
    """Slots per layer for ``max_seqs`` sequences of up to ``max_seq_len`` tokens under a
    ``SparseConfig``: the blocks a step attends at the longest length (sink + local + chosen), plus
    ``slack`` per sequence (the page a step starts and a forecast page beside the chosen ones).
    With ``per_latent_head`` on a layer of ``latent_heads`` > 1, each head chooses its own blocks
    beside the shared forced ones, so a step may attend up to ``latent_heads`` times the chosen
    blocks (the union of the heads' pages is what must be resident)."""
    n = math.ceil(max_seq_len / page_size)
    k = config.blocks_for(n) if config is not None else n
    if config is not None and config.per_latent_head and latent_heads > 1:
        chosen = max(0, k - config.sink_blocks - config.local_blocks)
        k += (latent_heads - 1) * chosen
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
                 cache_format=None, latent_widths=None, latent_heads: int = 1):
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
        self.latent_heads = latent_heads  # the most of any layer: per-head choices widen a step's page set
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
        heads = max(a.latent_heads for a in attns)
        if pool_pages is None:
            pool_pages = min(pages, pool_slots_for(sparse, max_seqs, max_seq_len, page_size, latent_heads=heads))
        return cls([a.kv_lora_rank + a.rope_dim for a in attns], num_pages=pages, pool_pages=pool_pages,
                   page_size=page_size, dtype=param.dtype, device=param.device, backend=backend,
                   num_splits=num_splits, cache_format=model_cache_formats(model.config),
                   latent_widths=[a.kv_lora_rank for a in attns], latent_heads=heads)

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
            blocks = (lens.cpu().long() + size - 1) // size
            blocks = blocks.view(-1, *[1] * (table.dim() - 1))  # a table per latent head: [b, latent_heads, k]
            pages = torch.where(torch.arange(table.shape[-1]) < blocks, table.long(), -1)
            dev_table = pool.ensure(pages.to(self.device)).clamp_min(0).to(torch.int32)
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
        self.pools[layer - 1].issue()  # the last layer's forecast copies (its placement has had a layer's time)
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
        self.pools[layer].prefetch(torch.tensor(pages, dtype=torch.long), defer=True)

    def free_sequence(self, seq: int) -> None:
        for pool in self.pools:
            pool.drop(self._tables.get(seq, []))
        super().free_sequence(seq)
