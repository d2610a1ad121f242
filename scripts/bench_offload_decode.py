#!/usr/bin/env python
"""Decode throughput with the latent cache offloaded to host memory: dense on the GPU, dense
streamed from the host, and a sparse policy with prefetch through a small device page pool.

A stack of random-weight layers of a 1B-like shape (by default Llama-3.2-1B's geometry converted to
MLA: hidden 2048, 16 layers, 32 heads, latent 512 + RoPE 64, MLP 8192, vocabulary 128256), bf16,
``--batch`` sequences of ``--contexts`` tokens each, decoding one token per sequence per step
(warm-up steps, then timed steps; eager launches, no CUDA graph). Every decode step of every
layer: the query and the new cache row, the absorbed MLA attention through the Triton kernel over a
paged latent cache, the output and MLP projections; then the LM head. Rows:

- ``dense-gpu``: the whole cache on the GPU, every page read (skipped where it does not fit);
- ``dense-offload``: the whole cache in pinned host memory, every page of a layer copied to the GPU
  each step (one copy per layer on a side stream into two alternating layer buffers, overlapped with
  the previous layer's compute) -- the bound of offloading without sparsity;
- ``sparse-gpu f``: the whole cache on the GPU, each step attending ceil(f x pages) pages of each
  sequence (sink + current + chosen) -- Quest page bounds (per-page min / max of the cache rows,
  kept on the GPU) scored with the previous step's query, for every sequence at once on the device
  (a batched top-k), so the choice for step t + 1 is known while step t runs;
- ``sparse-offload f``: the same choice with the cache in pinned host memory and one device pool
  over every layer of batch x ceil(f x pages) slots per layer -- the budget, sink and current page
  included (``latentkv.sparsity.offload.PagePool``): at the end of step t the next step's pages of
  every layer are placed in one batch of device operations, and from the start of step t + 1 the
  missing ones are brought in per layer on a side stream (an event per layer), overlapped with the
  earlier layers: by default (``--host-reads direct``) one device gather per layer reading the
  chosen pages of the pinned host cache in place; ``sparse-offload f staging`` gathers them on the
  host into a pinned staging buffer and copies that. One read-back of the placed pages and one
  host wait per step; its logits must equal ``sparse-gpu f``'s bit for bit (checked);
- ``sparse-gpu f predictor/R`` and ``sparse-offload f predictor/R`` (``--choices predictor``): the
  pages chosen by an AttentionPredictor (``--predictor``) from the history of page masses, as
  ``latentkv eval --sparse predictor --sparse-refresh R --sparse-dense-refresh`` decodes: every R-th
  step of a sequence attends densely -- the layer's cache streamed from the host in chunks of
  ``--refresh-chunk`` pages through two small device buffers, exact attention and the masses of
  every page computed chunk by chunk (online softmax) --, the other steps attend to the chosen pages
  through the pool and the kernel returns their masses (``return_masses``); at the end of step t
  the predictor reads every layer's history (one batched forward) and its top pages are placed for
  step t + 1 as above. No page bounds are kept. The refresh steps' bytes count in the row's copies.

Also measured in the same run: the host-to-device copy bandwidth from pinned memory. Reported:
decode tokens/s, the GPU memory the cache takes in each mode (pool + page bounds for the sparse
rows), the pages copied per layer-step, misses, ratios against the baselines of the same run, and
for the sparse rows where a step's time goes (host time per phase, host time blocked on the device,
the device's span of a step).
Random weights make the attention pattern -- hence how many chosen pages change per step and must
be copied -- unlike a trained model's: read the pages fetched per step with the throughput. By
default every step feeds the same token (``--tokens same``); ``--tokens random`` changes the query
each step (more pages change).

    python scripts/bench_offload_decode.py                            # H100: batch 8, contexts 32k and 128k
    python scripts/bench_offload_decode.py --json out.json --md out.md
    python scripts/bench_offload_decode.py --smoke                    # CPU, tiny sizes: checks the script only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GIB = 1 << 30
SMOKE = dict(hidden=64, layers=2, heads=4, nope_dim=8, rope_dim=8, latent_rank=32, v_dim=8, intermediate=128,
             vocab=100, batch=2, contexts="256,512", page_size=16, warmup=1, steps=2, offload_steps=2,
             copy_mib=4, fractions="0.125,0.0625")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--contexts", default="32768,131072", help="tokens per sequence, comma separated")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--nope-dim", type=int, default=64, help="query head dim without RoPE (absorbed into the latent)")
    p.add_argument("--rope-dim", type=int, default=64)
    p.add_argument("--latent-rank", type=int, default=512)
    p.add_argument("--v-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--fractions", default="0.125,0.0625", help="fractions of the pages a sparse step attends")
    p.add_argument("--host-reads", default="direct,staging",
                   help="how the sparse-offload rows read the missing pages, comma separated (a row each): direct "
                        "(device gathers from the pinned host pages in place), staging (host gather into a pinned "
                        "buffer, then a copy), device (direct reads placed and copied with no host read-back: "
                        "PagePool.fetch_on_device / ensure_on_device, the step's rows written to the host pages by "
                        "the device)")
    p.add_argument("--choices", default="quest",
                   help="how the sparse rows choose pages, comma separated (a row each): quest (page bounds scored "
                        "with the last query), predictor (an AttentionPredictor over the page-mass history)")
    p.add_argument("--predictor", default=str(Path(__file__).resolve().parents[1] / "benchmarks"
                                              / "attention_predictor_smollm2-mla-1.0_4k_keep"),
                   help="AttentionPredictor folder for --choices predictor")
    p.add_argument("--refresh", type=int, default=16,
                   help="predictor rows: every R-th step attends densely and records every page's mass")
    p.add_argument("--refresh-chunk", type=int, default=128,
                   help="pages per sequence streamed at a time by a refresh step")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed row")
    p.add_argument("--steps", type=int, default=10, help="timed steps (GPU-resident and sparse rows)")
    p.add_argument("--offload-steps", type=int, default=3, help="timed steps of the dense-offload row (slow)")
    p.add_argument("--tokens", choices=("same", "random"), default="same",
                   help="input token of each step: the same every step, or random")
    p.add_argument("--copy-mib", type=int, default=1024, help="bytes of the host-to-device bandwidth test")
    p.add_argument("--host-fraction", type=float, default=0.7,
                   help="largest share of the host's memory the pinned cache may take (a context needing more is skipped)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--md", help="write the table (markdown) here")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks that the script runs; times mean nothing)")
    args = p.parse_args(argv)
    if args.smoke:  # tiny defaults; options given on the command line still win
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def h2d_bandwidth(device, mib: int) -> dict:
    """Host-to-device copy bandwidth from pinned memory (bytes/s, median of 10 copies)."""
    n = mib << 20
    pin = device.type == "cuda"
    src = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    times = []
    for i in range(12):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=pin)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"bytes": n, "pinned": pin, "bytes_per_s": n / times[len(times) // 2]}


class Stack:
    """Random-weight MLA decoder layers (absorbed attention) + embedding + LM head."""

    def __init__(self, args, device, dtype):
        g = torch.Generator(device=device).manual_seed(0)
        a = self.a = args
        self.device, self.dtype = device, dtype
        H = a.heads
        self.width = a.latent_rank + a.rope_dim

        def w(*shape, fan_in):
            return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) / math.sqrt(fan_in)).to(dtype)

        self.layers = [dict(
            q=w(a.hidden, H * (a.nope_dim + a.rope_dim), fan_in=a.hidden),
            uk=w(H, a.nope_dim, a.latent_rank, fan_in=a.nope_dim),
            kv=w(a.hidden, self.width, fan_in=a.hidden),
            uv=w(H, a.v_dim, a.latent_rank, fan_in=a.latent_rank),
            o=w(H * a.v_dim, a.hidden, fan_in=H * a.v_dim),
            gate=w(a.hidden, a.intermediate, fan_in=a.hidden),
            up=w(a.hidden, a.intermediate, fan_in=a.hidden),
            down=w(a.intermediate, a.hidden, fan_in=a.intermediate),
        ) for _ in range(a.layers)]  # fmt: skip
        self.embed = w(a.vocab, a.hidden, fan_in=1)
        self.head = w(a.hidden, a.vocab, fan_in=a.hidden)
        self.scale = 1.0 / math.sqrt(a.nope_dim + a.rope_dim)
        self.weight_bytes = sum(t.numel() * t.element_size() for L in self.layers for t in L.values()) + \
            2 * self.embed.numel() * self.embed.element_size()

    @staticmethod
    def norm(x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)

    def qkv(self, l, x):
        """x [b, hidden] -> absorbed query [b, 1, H, r + rope], new cache row [b, r + rope]."""
        a, L = self.a, self.layers[l]
        h = self.norm(x)
        qr = (h @ L["q"]).view(x.shape[0], a.heads, a.nope_dim + a.rope_dim)
        q_lat = torch.einsum("bhd,hdr->bhr", qr[..., : a.nope_dim], L["uk"])
        q = torch.cat([q_lat, qr[..., a.nope_dim :]], -1)[:, None]
        return q, h @ L["kv"]

    def out(self, l, x, o):
        """o [b, 1, H, r] attention output in latent space -> the layer's new hidden state."""
        L = self.layers[l]
        v = torch.einsum("bhr,hvr->bhv", o[:, 0].to(self.dtype), L["uv"]).reshape(x.shape[0], -1)
        x = x + v @ L["o"]
        h = self.norm(x)
        return x + (torch.nn.functional.silu(h @ L["gate"]) * (h @ L["up"])) @ L["down"]

    def logits(self, x):
        return self.norm(x) @ self.head


def attend(stack, q, kv, table, lens, max_len, backend, masses=False):
    from latentkv.kernels.mla_decode import decode_attention

    return decode_attention(q, kv, table, lens, latent_heads=1, rope_dim=stack.a.rope_dim,
                            softmax_scale=stack.scale, backend=backend, max_seq_len=max_len, return_masses=masses)


def chunked_attention(q, chunks, n, scale, r_c, page):
    """Exact attention of q [B, 1, H, w] over the first n cached tokens of every sequence, read as
    chunks ((first token, rows [B, t, w]), a whole number of pages each but the last), with an online
    softmax in float32 -> the output [B, 1, H, r_c] in q's dtype and the masses per page [B,
    ceil(n / page)] (each head's probability summed over the page's tokens, averaged over the heads:
    what the kernel's ``return_masses`` gives for the pages it reads)."""
    qf = q[:, 0].float()
    B, H, _ = qf.shape
    m = torch.full((B, H), float("-inf"), device=q.device)
    s = torch.zeros(B, H, device=q.device)
    acc = torch.zeros(B, H, r_c, device=q.device)
    page_lse = []
    for start, rows in chunks:
        rows = rows[:, : n - start].float()
        sc = torch.einsum("bhw,btw->bht", qf, rows) * scale
        pad = -sc.shape[-1] % page
        page_lse.append(torch.nn.functional.pad(sc, (0, pad), value=float("-inf")).view(B, H, -1, page).logsumexp(-1))
        m_new = torch.maximum(m, sc.amax(-1))
        alpha = torch.exp(m - m_new)
        p = torch.exp(sc - m_new[..., None])
        s = s * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("bht,btr->bhr", p, rows[..., :r_c])
        m = m_new
    lse = m + s.log()
    masses = torch.exp(torch.cat(page_lse, -1) - lse[..., None]).mean(1)
    return (acc / s[..., None]).to(q.dtype)[:, None], masses


class Cache:
    """The pinned host pages of every layer (every sequence's pages contiguous) and the bookkeeping
    of one run: lengths, where the next row goes."""

    def __init__(self, stack, args, context, device):
        self.page = args.page_size
        self.batch = args.batch
        self.per_seq = math.ceil((context + args.warmup + max(args.steps, args.offload_steps) + 1) / self.page)
        self.num_pages = self.batch * self.per_seq
        self.context = context
        pin = device.type == "cuda"
        # every layer's pages in one pinned tensor (the sparse row's pool gathers across layers)
        self.host_all = torch.empty(args.layers, self.num_pages, self.page, stack.width, dtype=stack.dtype,
                                    pin_memory=pin)
        self.host = list(self.host_all.unbind(0))
        g = torch.Generator(device=device).manual_seed(1)
        for h in self.host:
            for start in range(0, self.num_pages, 4096):  # random rows made on the device, copied down
                chunk = h[start : start + 4096]
                chunk.copy_(torch.randn(chunk.shape, generator=g, device=device, dtype=torch.float32).to(stack.dtype))
        self.table = (torch.arange(self.batch)[:, None] * self.per_seq + torch.arange(self.per_seq)[None]).to(torch.int32)
        self.reset()

    def reset(self):
        self.lens = [self.context] * self.batch

    def layer_bytes(self):
        h = self.host[0]
        return h.numel() * h.element_size()

    def new_rows(self):
        """Flat row ids (host) of the rows the next step writes, and the pages that begin there."""
        rows = [int(self.table[b, n // self.page]) * self.page + n % self.page for b, n in enumerate(self.lens)]
        fresh = [r // self.page for r in rows if r % self.page == 0]
        return rows, fresh

    def write_host(self, l, rows, row_values):
        """The new rows into the pinned host pages (device-to-host copies, asynchronous on a GPU)."""
        flat = self.host[l].view(-1, self.host[l].shape[-1])
        for i, r in enumerate(rows):
            flat[r].copy_(row_values[i], non_blocking=True)


# --------------------------------------------------------------------------------------------
# the modes
# --------------------------------------------------------------------------------------------
def run_dense_gpu(stack, cache, args, device, backend, steps):
    kv = [h.to(device) for h in cache.host]
    table = cache.table.to(device)

    def step(x):
        rows, _ = cache.new_rows()
        rows_dev = torch.tensor(rows, device=device)
        lens = torch.tensor([n + 1 for n in cache.lens], dtype=torch.int32, device=device)
        for l in range(args.layers):
            q, row = stack.qkv(l, x)
            kv[l].view(-1, stack.width).index_copy_(0, rows_dev, row)
            x = stack.out(l, x, attend(stack, q, kv[l], table, lens, max(cache.lens) + 1, backend))
        cache.lens = [n + 1 for n in cache.lens]
        return stack.logits(x)

    result = timed(step, stack, cache, args, device, steps)
    result["cache_gpu_bytes"] = sum(t.numel() * t.element_size() for t in kv)
    del kv
    return result


def run_dense_offload(stack, cache, args, device, backend, steps):
    """Every page of each layer copied to the GPU every step, into two alternating layer buffers."""
    cuda = device.type == "cuda"
    bufs = [torch.empty_like(cache.host[0], device=device) for _ in range(2)]
    table = cache.table.to(device)
    side = torch.cuda.Stream(device) if cuda else None
    events = [None, None]
    L = args.layers

    def issue(l):  # copy layer l into buffer l % 2 after the work queued so far (its previous reader)
        buf = bufs[l % 2]
        if cuda:
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                buf.copy_(cache.host[l], non_blocking=True)
                events[l % 2] = torch.cuda.Event()
                events[l % 2].record(side)
        else:
            buf.copy_(cache.host[l])

    state = {"issued": False}

    def step(x):
        if not state["issued"]:
            issue(0)
            issue(1 % L)
            state["issued"] = True
        rows, _ = cache.new_rows()
        rows_dev = torch.tensor(rows, device=device)
        lens = torch.tensor([n + 1 for n in cache.lens], dtype=torch.int32, device=device)
        for l in range(L):
            buf = bufs[l % 2]
            if cuda and events[l % 2] is not None:
                torch.cuda.current_stream(device).wait_event(events[l % 2])
            q, row = stack.qkv(l, x)
            buf.view(-1, stack.width).index_copy_(0, rows_dev, row)
            cache.write_host(l, rows, row)
            x = stack.out(l, x, attend(stack, q, buf, table, lens, max(cache.lens) + 1, backend))
            issue((l + 2) % L)  # the next step's layer when l + 2 >= L (its rows written by then)
        cache.lens = [n + 1 for n in cache.lens]
        return stack.logits(x)

    result = timed(step, stack, cache, args, device, steps)
    result["cache_gpu_bytes"] = sum(b.numel() * b.element_size() for b in bufs)
    result["bytes_per_step"] = cache.layer_bytes() * L
    del bufs
    return result


class Clock:
    """Host time per phase of a step (perf_counter), and the device time of each step (CUDA events)."""

    def __init__(self, device):
        self.device = device
        self.host: dict[str, float] = {}
        self.on = False
        self.spans: list = []

    def add(self, name: str, t0: float) -> float:
        t1 = time.perf_counter()
        if self.on:
            self.host[name] = self.host.get(name, 0.0) + t1 - t0
        return t1

    def event(self):
        if self.device.type != "cuda" or not self.on:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def per_step_ms(self, steps: int) -> dict:
        out = {k: 1e3 * v / steps for k, v in self.host.items()}
        if self.spans:
            out["gpu_span"] = sum(a.elapsed_time(b) for a, b in self.spans) / len(self.spans)
        return out


def run_sparse_offload(stack, cache, args, device, backend, steps, fraction, resident=False, host_reads="auto",
                       predictor=None):
    """Quest page bounds scored with this step's query (or, given ``predictor``, the predictor over
    the page-mass history, with a dense refresh every ``args.refresh`` steps) choose the next step's
    pages, for every sequence at once on the device; one pool over every layer (``PagePool`` with a
    layer dimension) places all layers' pages with one batch of device operations per step and
    copies the missing ones per layer on a side stream while the next step's earlier layers run.
    ``resident``: the same choice over the whole cache on the GPU (no pool): the same attention,
    hence the same logits, without the offload's work."""
    from latentkv.sparsity.offload import PagePool
    from latentkv.sparsity.runtime import attended_history_row

    cuda = device.type == "cuda"
    L, B, page, per_seq, width = args.layers, cache.batch, cache.page, cache.per_seq, stack.width
    k = min(per_seq, max(2, math.ceil(fraction * math.ceil(cache.context / page))))  # sink + current + chosen
    device_only = host_reads == "device"  # placement, copies and host-row writes with no host read-back
    if device_only:
        host_reads = "direct" if cuda else "auto"
    pool = None if resident else PagePool(cache.host_all, B * k, device, host_reads=host_reads)
    side = torch.cuda.Stream(device) if device_only and cuda else None
    kv_all = cache.host_all.to(device) if resident else None
    clock = Clock(device)
    # per-page bounds of the cache rows on the GPU (Quest's page metadata); pages past a length empty
    bounds_shape = (L, cache.num_pages if predictor is None else 0, width)
    low = torch.full(bounds_shape, float("inf"), dtype=stack.dtype, device=device)
    high = torch.full_like(low, float("-inf"))
    for l in range(L if predictor is None else 0):
        for b, n in enumerate(cache.lens):
            for start in range(0, n, 1 << 14):  # chunks of pages: bounded temporaries
                stop = min(n, start + (1 << 14))
                first, last = start // page, -(-stop // page)
                rows = cache.host[l][int(cache.table[b, first]) : int(cache.table[b, last - 1]) + 1].to(device)
                valid = (torch.arange(first * page, last * page, device=device) < n).view(-1, page, 1)
                pg = cache.table[b, first:last].to(device).long()
                low[l, pg] = torch.minimum(low[l, pg], rows.masked_fill(~valid, float("inf")).amin(1))
                high[l, pg] = torch.maximum(high[l, pg], rows.masked_fill(~valid, float("-inf")).amax(1))
    meta_bytes = 2 * low.numel() * low.element_size()
    seq_base = (torch.arange(B, device=device) * per_seq)[:, None]  # page id of a sequence's first block
    rows_host = torch.empty(L, B, width, dtype=stack.dtype, pin_memory=cuda)  # this step's rows, for the host pages
    host_rows = cache.host_all.view(-1, width)
    forced = {}
    layer_base = (torch.arange(L, device=device) * cache.num_pages)[:, None]  # page id offset of a layer
    if predictor is not None:
        predictor = predictor.to(device)
        T, chunk = predictor.config.history, args.refresh_chunk
        hist = torch.zeros(L, B, T, per_seq, device=device)  # page masses of the last T steps, oldest first
        bufs = [] if resident else [torch.empty(B, chunk * page, width, dtype=stack.dtype, device=device)
                                    for _ in range(2)]
        events = [None, None]
        refresh_side = torch.cuda.Stream(device) if cuda and not resident else None
        mapped = None  # the pinned host cache as device memory ([L, B, per_seq, words per page]), where mapped
        if refresh_side is not None:
            from latentkv.sparsity.offload import mapped_host_rows

            words = mapped_host_rows(cache.host_all.view(L * B * per_seq, -1), device)
            mapped = None if words is None else words.view(L, B, per_seq, -1)
        meta_bytes = hist.numel() * hist.element_size() + sum(b.numel() * b.element_size() for b in bufs)
        state_refresh = {"step": 0, "bytes": 0}

    def refresh_chunks(l, n_tok, row):
        """The rows of layer l's first n_tok tokens of every sequence, chunk by chunk: from the
        resident cache, or copied from the host pages on a side stream into two alternating buffers
        (a copy waits for the work queued before it, which includes the last reader of its buffer);
        the host pages lack this step's row, which is written into its chunk from ``row``."""
        n_pages = -(-n_tok // page)
        for i, p0 in enumerate(range(0, n_pages, chunk)):
            m_pages = min(chunk, n_pages - p0)
            if resident:
                rows = torch.stack([kv_all[l][b * per_seq + p0 : b * per_seq + p0 + m_pages] for b in range(B)])
                yield p0 * page, rows.view(B, m_pages * page, width)
                continue
            buf = bufs[i % 2][:, : m_pages * page]

            def copy_chunk():
                if mapped is not None:  # one strided device copy reading the pinned pages in place
                    buf.view(mapped.dtype).view(B, m_pages, -1).copy_(mapped[l][:, p0 : p0 + m_pages])
                    return
                for b in range(B):
                    buf[b].view(m_pages, page, width).copy_(
                        cache.host[l][b * per_seq + p0 : b * per_seq + p0 + m_pages], non_blocking=cuda)

            if cuda:
                refresh_side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(refresh_side):
                    copy_chunk()
                    events[i % 2] = torch.cuda.Event()
                    events[i % 2].record(refresh_side)
                torch.cuda.current_stream(device).wait_event(events[i % 2])
            else:
                copy_chunk()
            if clock.on:
                state_refresh["bytes"] += buf.numel() * buf.element_size()
            last = n_tok - 1 - p0 * page
            if 0 <= last < m_pages * page:
                buf[:, last] = row
            yield p0 * page, buf

    def choose(qs, n):
        """[L, B, k] page ids of the next step of every layer and sequence (n blocks then), from this
        step's queries qs [L, B, H, w]: the sink, the current page and the top Quest bounds, one
        batched top-k over every (layer, sequence)."""
        qf = qs.view(L * B, *qs.shape[2:])
        lo, hi = low.view(L * B, per_seq, width)[:, :n], high.view(L * B, per_seq, width)[:, :n]
        qp = qf.clamp_min(0)
        bound = torch.baddbmm(torch.bmm(lo, (qf - qp).transpose(1, 2)), hi, qp.transpose(1, 2)).amax(-1)  # [L*B, n]
        if n not in forced:
            forced[n] = torch.tensor([0, n - 1], device=device)
        bound = bound.float().nan_to_num_(nan=float("-inf")).index_fill_(1, forced[n], float("inf"))
        return bound.topk(k, dim=-1).indices.sort(-1).values.view(L, B, k) + seq_base

    def choose_predicted(n):
        """[L, B, k] page ids of the next step (n blocks then) from every layer's mass history: one
        predictor forward over every (layer, sequence), the sink and current page forced."""
        if n not in forced:
            forced[n] = torch.tensor([0, n - 1], device=device)
        scores = predictor.predict(hist.view(L * B, T, per_seq)[:, :, :n]).index_fill_(1, forced[n], float("inf"))
        return scores.topk(k, dim=-1).indices.sort(-1).values.view(L, B, k) + seq_base

    state = {"flat": None}

    def place(chosen):  # the next step's pages of every layer: placed now, copied from the next step's start
        state["chosen"] = chosen
        if resident:
            return
        if device_only:  # placed and copied on a side stream, after the work queued so far
            if side is None:
                pool.fetch_on_device(chosen)
                return
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                pool.fetch_on_device(chosen)
            state["fetched"] = torch.cuda.Event()
            state["fetched"].record(side)
            return
        pool.prefetch(chosen, defer=True)
        state["rows_ready"] = torch.cuda.Event() if cuda else None
        if cuda:
            state["rows_ready"].record()

    n0 = -(-(cache.lens[0] + 1) // page)  # the first step: the sink and the most recent pages (no query yet)
    ids = torch.tensor([0] + list(range(n0 - k + 1, n0)), device=device)
    place((ids[None, None] + seq_base[None]).expand(L, B, k).contiguous())

    def fetch(t):
        """The host part of the last placement: the host pages get the last step's rows (the truth),
        then the placed pages are gathered and their copies issued; returns the slot tables."""
        if device_only:  # the last step's rows went to the host pages from the device; no host part
            if state.get("fetched") is not None:
                torch.cuda.current_stream(device).wait_event(state["fetched"])
            slots = pool.ensure_on_device(state["chosen"]).to(torch.int32)
            clock.add("copy_issue", t)
            return slots
        if state["flat"] is not None:
            if state["rows_ready"] is not None:
                state["rows_ready"].synchronize()
            t = clock.add("wait_device", t)
            host_rows.index_copy_(0, state["flat"], rows_host.view(-1, width))
            t = clock.add("host_rows", t)
        waited = pool.host_wait_s
        slots = pool.ensure(state["chosen"], wait=False).to(torch.int32)  # [L, B, k]; copies issued
        clock.add("copy_issue", t)
        if clock.on:  # the part of it spent waiting for the placed pairs
            waited = pool.host_wait_s - waited
            clock.host["copy_issue"] -= waited
            clock.host["wait_device"] = clock.host.get("wait_device", 0.0) + waited
        return slots

    def step(x):
        t = time.perf_counter()
        span0 = clock.event()
        rows, _ = cache.new_rows()
        rows_t = torch.tensor(rows)
        rows_dev = rows_t.to(device, non_blocking=True)
        bound_index = ((rows_dev // page)[None] + layer_base).view(-1, 1).expand(L * B, width)
        length = cache.lens[0] + 1
        n = -(-length // page)
        lens_dev = torch.full((B,), (k - 1) * page + length - (n - 1) * page, dtype=torch.int32, device=device)
        flat = (torch.arange(L)[:, None] * (cache.num_pages * page) + rows_t[None]).flatten()
        if resident:
            tables = state["chosen"].to(torch.int32)
        refresh = predictor is not None and state_refresh["step"] % args.refresh == 0
        t = clock.add("bookkeeping", t)
        qs, new_rows, hist_rows = [], [], []
        for l in range(L):
            q, row = stack.qkv(l, x)
            t = clock.add("model", t)
            if resident:
                kv, table = kv_all[l], tables[l]
                kv.view(-1, width).index_copy_(0, rows_dev, row)
            else:
                if l == 0:  # layer 0's first kernels are queued: the device has work while the host waits
                    tables = fetch(t)
                    state["flat"] = flat
                    t = time.perf_counter()
                    index = pool.row_index(rows_dev)  # [L, B] rows in the pools (after any placement)
                    pool_rows = pool.rows_of()
                kv, table = pool.pools[l], tables[l]
                pool.wait(l)
                pool_rows.index_copy_(0, index[l], row)
            t = clock.add("bookkeeping", t)
            if predictor is None:
                o = attend(stack, q, kv, table, lens_dev, k * page, backend)
            elif refresh:  # every page attended: the exact output and every page's mass
                o, full = chunked_attention(q, refresh_chunks(l, length, row), length, stack.scale, args.latent_rank, page)
                hist_rows.append(torch.nn.functional.pad(full, (0, per_seq - full.shape[1])))
                t = clock.add("refresh", t)
            else:  # the chosen pages, and their masses from the same kernel pass
                o, ms = attend(stack, q, kv, table, lens_dev, k * page, backend, masses=True)
                blocks = state["chosen"][l] - seq_base
                hist_rows.append(attended_history_row(ms[:, 0, 0], blocks, per_seq))
            x = stack.out(l, x, o)
            qs.append(q[:, 0])
            new_rows.append(row)
            t = clock.add("model", t)
        rows_all = torch.stack(new_rows)  # [L, B, w]: the page bounds, and the host pages at the next step
        if predictor is None:
            low.view(-1, width).scatter_reduce_(0, bound_index, rows_all.view(-1, width), "amin")
            high.view(-1, width).scatter_reduce_(0, bound_index, rows_all.view(-1, width), "amax")
        if device_only:
            pool.write_host_rows(rows_dev, rows_all)
        elif not resident:
            rows_host.copy_(rows_all, non_blocking=cuda)
        t = clock.add("bookkeeping", t)
        n_next = -(-(length + 1) // page)
        if predictor is None:
            chosen = choose(torch.stack(qs), n_next)  # from this step's queries: the next step's
        else:
            hist[:, :, :-1] = hist[:, :, 1:].clone()
            hist[:, :, -1] = torch.stack(hist_rows)
            chosen = choose_predicted(n_next)
            state_refresh["step"] += 1
            if clock.on:
                state_refresh["refreshes"] = state_refresh.get("refreshes", 0) + refresh
        t = clock.add("choice", t)
        place(chosen)
        t = clock.add("bookkeeping", t)
        cache.lens = [length] * B
        logits = stack.logits(x)
        clock.add("model", t)
        if span0 is not None:
            clock.spans.append((span0, clock.event()))
        return logits

    if resident:
        result = timed(step, stack, cache, args, device, steps, reset=False, clock=clock)
        result["cache_gpu_bytes"] = kv_all.numel() * kv_all.element_size() + meta_bytes
    else:
        pool.reset_stats()
        result = timed(step, stack, cache, args, device, steps, reset=False, pools=[pool], clock=clock)
        result["cache_gpu_bytes"] = pool.pools.numel() * pool.pools.element_size() + meta_bytes
        result["pool_bytes"] = pool.pools.numel() * pool.pools.element_size()
    result["page_bounds_bytes" if predictor is None else "history_and_refresh_bytes"] = meta_bytes
    result["pages_attended_per_seq"] = k
    if predictor is not None:
        result["refresh"] = args.refresh
        result["refresh_steps"] = state_refresh.get("refreshes", 0)
        result["refresh_bytes_per_step"] = state_refresh["bytes"] / steps
        if not resident:
            result["bytes_per_step"] = result["offload"]["bytes_per_step"] * L + result["refresh_bytes_per_step"]
    del pool, kv_all, low, high
    return result


def timed(step, stack, cache, args, device, steps, reset=True, pools=None, clock=None):
    """Warm-up steps, then ``steps`` timed steps from the context length: tokens/s of the batch.
    Also kept: the logits after ``warmup + check_steps`` steps (every mode stops there at the same
    position, so the modes' logits can be compared)."""
    if reset:
        cache.reset()
    g = torch.Generator(device="cpu").manual_seed(2)
    token = torch.randint(0, args.vocab, (cache.batch,), generator=g)
    check_at = min(args.steps, args.offload_steps)

    def one():
        ids = token if args.tokens == "same" else torch.randint(0, args.vocab, (cache.batch,), generator=g)
        x = stack.embed[ids.to(device)]
        return step(x)

    for _ in range(args.warmup):
        one()
    sync(device)
    if pools is not None:
        for p in pools:
            p.reset_stats()
    if clock is not None:
        clock.on = True
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    check = None
    for i in range(steps):
        logits = one()
        if i + 1 == check_at:
            check = logits.float().clone()  # stays on the device: no sync inside the timed loop
    sync(device)
    seconds = time.perf_counter() - t0
    if clock is not None:
        clock.on = False
    if not bool(torch.isfinite(logits.float()).all()):
        raise SystemExit("non-finite logits: the benchmark's random stack diverged; report this as a bug.")
    out = {"steps": steps, "seconds": seconds, "tokens_per_s": cache.batch * steps / seconds,
           "step_ms": 1e3 * seconds / steps,
           "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
           "check_logits": check.cpu() if check is not None else None, "check_step": args.warmup + check_at}
    if pools is not None:
        from latentkv.sparsity.offload import OffloadStats

        total = OffloadStats()
        for p in pools:
            total.add(p.stats)
        out["offload"] = total.summary()
    if clock is not None:
        out["breakdown_ms"] = clock.per_step_ms(steps)
    return out


# --------------------------------------------------------------------------------------------
def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def repo_relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (what a result file should name)."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def sparse_mode(fraction: float, choice: str, refresh: int, reads: str | None = None, all_reads=()) -> str:
    """Row name of a sparse run: sparse-gpu (``reads`` None) or sparse-offload, the fraction, the
    choice (Quest unnamed) and the host-read mode (the first one listed unnamed)."""
    name = f"sparse-{'gpu' if reads is None else 'offload'} {fraction:g}"
    name += "" if choice == "quest" else f" {choice}/{refresh}"
    return name + ("" if reads is None or reads == all_reads[0] else f" {reads}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("no CUDA GPU found: this benchmark times GPU decode; run with --smoke to check the script "
                         "on the CPU (tiny sizes).")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    backend = "triton" if cuda else "reference"
    if cuda:
        try:
            import triton  # noqa: F401
        except ImportError:
            raise SystemExit("triton is not installed: the GPU rows need the Triton decode kernel.") from None
    contexts = [int(c) for c in str(args.contexts).split(",")]
    host_reads = [h for h in str(args.host_reads).split(",") if h]
    unknown = sorted(set(host_reads) - {"direct", "staging", "auto", "device"})
    if unknown or not host_reads:
        raise SystemExit(f"--host-reads: {','.join(unknown) or 'nothing given'}; give direct, staging, auto or device")
    if not cuda:  # on the CPU there is nothing to read across; the device-only calls still run
        host_reads = ["auto"] + (["device"] if "device" in host_reads else [])
    fractions = [float(f) for f in str(args.fractions).split(",")]
    choices = [c for c in str(args.choices).split(",") if c]
    if not choices or set(choices) - {"quest", "predictor"}:
        raise SystemExit(f"--choices: give quest and / or predictor, comma separated; got {args.choices!r}")
    if args.refresh < 1 or args.refresh_chunk < 1:
        raise SystemExit(f"--refresh and --refresh-chunk must be >= 1; got {args.refresh}, {args.refresh_chunk}")
    predictor = None
    if "predictor" in choices:
        from latentkv.errors import LatentKVError
        from latentkv.sparsity.predictor import load_predictor

        try:
            predictor = load_predictor(args.predictor)
        except LatentKVError as exc:
            raise SystemExit(f"--predictor: {exc}") from None
    t_start = time.perf_counter()
    bw = h2d_bandwidth(device, args.copy_mib)
    print(f"host-to-device copy (pinned={bw['pinned']}): {bw['bytes_per_s'] / 1e9:.1f} GB/s", file=sys.stderr)
    stack = Stack(args, device, dtype)
    host_total = host_memory_bytes()
    rows = []
    for context in contexts:
        width = args.latent_rank + args.rope_dim
        need = args.layers * args.batch * math.ceil((context + args.warmup + max(args.steps, args.offload_steps) + 1)
                                                    / args.page_size) * args.page_size * width * (2 if cuda else 4)
        if host_total and need > args.host_fraction * host_total:
            print(f"context {context}: the pinned cache needs {need / GIB:.1f} GiB, over {args.host_fraction:.0%} of the "
                  f"host's {host_total / GIB:.0f} GiB; skipped (lower --batch or --layers).", file=sys.stderr)
            rows.append({"context": context, "mode": "all", "skipped": "host memory"})
            continue
        try:
            cache = Cache(stack, args, context, device)
        except RuntimeError as exc:
            raise SystemExit(f"context {context}: allocating {need / GIB:.1f} GiB of pinned host memory failed ({exc}); "
                             "lower --batch, --layers or --contexts.") from None
        print(f"context {context}: cache {need / GIB:.2f} GiB in pinned host memory", file=sys.stderr)
        modes = [("dense-gpu", None, None, None), ("dense-offload", None, None, None)]  # (row, fraction, reads, choice)
        for f in fractions:
            for choice in choices:
                modes.append((sparse_mode(f, choice, args.refresh), f, None, choice))
                modes += [(sparse_mode(f, choice, args.refresh, reads, host_reads), f, reads, choice)
                          for reads in host_reads]
        for name, fraction, reads, choice in modes:
            cache.reset()
            t0 = time.perf_counter()
            try:
                if name == "dense-gpu":
                    r = run_dense_gpu(stack, cache, args, device, backend, args.steps)
                elif name == "dense-offload":
                    r = run_dense_offload(stack, cache, args, device, backend, args.offload_steps)
                else:
                    r = run_sparse_offload(stack, cache, args, device, backend, args.steps, fraction,
                                           resident=reads is None, host_reads=reads or "auto",
                                           predictor=predictor if choice == "predictor" else None)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"context {context}, {name}: out of GPU memory; skipped.", file=sys.stderr)
                rows.append({"context": context, "mode": name, "skipped": "GPU memory"})
                continue
            if cuda:
                torch.cuda.empty_cache()
            r.update(context=context, mode=name, fraction=fraction, wall_s=time.perf_counter() - t0)
            rows.append(r)
            print(f"context {context}, {name}: {r['tokens_per_s']:.1f} tokens/s, cache on the GPU "
                  f"{r['cache_gpu_bytes'] / GIB:.2f} GiB ({r['wall_s']:.1f} s)", file=sys.stderr)
            if r.get("breakdown_ms"):
                print("  per step (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in r["breakdown_ms"].items()),
                      file=sys.stderr)
        del cache
    # the same computation over the same rows: the streamed dense row runs the resident row's
    # kernels with the same split over the same rows, step for step, so its logits must be equal bit
    # for bit at the same step (any difference is a copy or ordering bug, not rounding)
    mismatch = []
    for context in contexts:
        got = {r["mode"]: r.pop("check_logits") for r in rows if r["context"] == context and "check_logits" in r}
        pairs = [("dense-offload", "dense-gpu")] + [
            (sparse_mode(f, c, args.refresh, h, host_reads), sparse_mode(f, c, args.refresh))
            for f in fractions for c in choices for h in host_reads]
        for mode, base in pairs:
            if got.get(mode) is None or got.get(base) is None:
                continue
            ref, out = got[base], got[mode]
            err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            for r in rows:
                if r["context"] == context and r["mode"] == mode:
                    r["max_rel_diff_vs_" + base.split(" ")[0].replace("-", "_")] = err
            if err != 0.0:
                mismatch.append(f"context {context}: the {mode} logits differ from {base}'s at the same step (max rel "
                                f"{err:.2e}); the offloaded cache is not the resident one -- a bug in the copies or their "
                                "ordering.")
    for r in rows:
        r.pop("check_logits", None)
        if "skipped" in r:
            continue
        base = {m: next((x for x in rows if x["context"] == r["context"] and x["mode"] == m and "skipped" not in x), None)
                for m in ("dense-gpu", "dense-offload")}
        r["vs_dense_gpu"] = r["tokens_per_s"] / base["dense-gpu"]["tokens_per_s"] if base["dense-gpu"] else None
        r["vs_dense_offload"] = (r["tokens_per_s"] / base["dense-offload"]["tokens_per_s"]
                                 if base["dense-offload"] else None)
        moved = r.get("bytes_per_step") or (r.get("offload", {}).get("bytes_per_step", 0) * args.layers)
        r["h2d_bytes_per_step"] = moved
        r["h2d_bound_tokens_per_s"] = (args.batch * bw["bytes_per_s"] / moved) if moved else None
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (--smoke: tiny sizes; times mean nothing)",
        "dtype": str(dtype).replace("torch.", ""),
        "shape": {k: getattr(args, k) for k in ("batch", "layers", "hidden", "heads", "nope_dim", "rope_dim",
                                               "latent_rank", "v_dim", "intermediate", "vocab", "page_size", "tokens")},
        "predictor": {"folder": repo_relative(args.predictor), "page_size": predictor.config.page_size, "refresh": args.refresh,
                      "refresh_chunk": args.refresh_chunk} if predictor is not None else None,
        "weight_bytes": stack.weight_bytes,
        "h2d_copy": bw,
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "seconds": time.perf_counter() - t_start,
        "rows": rows,
    }
    md = markdown(result)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.md:
        Path(args.md).write_text(md)
    if mismatch:
        raise SystemExit("\n".join(mismatch))
    return result


def markdown(result) -> str:
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    bw = result["h2d_copy"]["bytes_per_s"]
    lines = [
        f"{result['device']}, {result['dtype']}; shape {result['shape']}; weights {result['weight_bytes'] / GIB:.2f} GiB",
        f"host-to-device copy from pinned memory: {bw / 1e9:.1f} GB/s (measured in this run)",
        *([f"predictor rows: `{Path(result['predictor']['folder']).name}` (trained on pages of "
           f"{result['predictor']['page_size']} tokens of a trained model; here it reads the random stack's pages of "
           f"{result['shape']['page_size']}: its choices, hence the pages fetched, are not a trained model's), a dense "
           f"refresh every {result['predictor']['refresh']} steps streamed in chunks of "
           f"{result['predictor']['refresh_chunk']} pages"] if result.get("predictor") else []),
        "",
        "| context | mode | tokens/s | step ms | vs dense GPU | vs dense offload | cache on GPU (GiB) | "
        "H2D MB / step | pages fetched / layer-step | misses / layer-step | copy-bound tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['context']} | {r['mode']} | skipped ({r['skipped']}) | | | | | | | | |")
            continue
        o = r.get("offload") or {}
        lines.append(
            f"| {r['context']} | {r['mode']} | {r['tokens_per_s']:.1f} | {r['step_ms']:.2f} | "
            f"{fmt(r['vs_dense_gpu'], '.3f')} | {fmt(r['vs_dense_offload'], '.2f')} | {r['cache_gpu_bytes'] / GIB:.3f} | "
            f"{r['h2d_bytes_per_step'] / 1e6:.1f} | {fmt(o.get('pages_fetched_per_step'), '.1f')} | "
            f"{fmt(o.get('misses_per_step'), '.2f')} | {fmt(r['h2d_bound_tokens_per_s'], '.1f')} |")
    parts = [r for r in result["rows"] if r.get("breakdown_ms")]
    if parts:
        names = ["model", "choice", "refresh", "bookkeeping", "copy_issue", "host_rows", "wait_device", "gpu_span"]
        lines += [
            "",
            "Per decode step (ms), sparse rows: host time launching the model's work (model), choosing the next "
            "step's pages (choice), a refresh step's streamed dense attention (refresh), pool bookkeeping (placement, slot table, row writes, bounds), issuing the copies "
            "(gather into the staging buffer, host-to-device), writing the last step's rows to the host pages "
            "(host_rows), host time blocked on the device (wait_device); gpu_span: device time from a step's first "
            "to its last operation.",
            "",
            "| context | mode | step ms | " + " | ".join(names) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |",
        ]
        for r in parts:
            b = r["breakdown_ms"]
            lines.append(f"| {r['context']} | {r['mode']} | {r['step_ms']:.2f} | "
                         + " | ".join(fmt(b.get(n), ".2f") for n in names) + " |")
    lines.append("")
    lines.append(f"total {result['seconds']:.0f} s; `{result['command']}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
