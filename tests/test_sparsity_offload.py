"""The offloaded latent cache (latentkv.sparsity.offload): host pages, a device pool of page slots,
prefetch of the forecast pages and synchronous fetch of the ones it missed.

On this CPU the pool's device is the CPU (no streams); kernel cases run the Triton kernel
interpreted (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import tiny_models

from latentkv.errors import LatentKVError
from latentkv.sparsity import SparseConfig
from latentkv.sparsity.offload import OffloadedLatentCache, PagePool, pool_slots_for
from latentkv.sparsity.predictor import AttentionPredictor, PredictorConfig


POOL_CASES = {  # heads, latent_heads, r_c, rope, page, start lengths
    "mla": (4, 1, 32, 16, 8, (37, 50)),
    "gla2": (4, 2, 16, 16, 8, (45, 29)),
}


def _kernel_available(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        md = importlib.import_module("latentkv.kernels.mla_decode")
        if not torch.cuda.is_available() and type(md._kernels()[0]).__name__ != "InterpretedFunction":
            pytest.skip("triton imported in compiled mode without a GPU; run with TRITON_INTERPRET=1")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_pool_attention_equals_masked_dense(case, backend):
    """Guards exactness and the miss accounting of the pool: over several decode steps (rows appended,
    pages begun mid-run), attention through the pool's slot table equals dense attention with the
    unchosen pages masked, on fresh random inputs, for MLA and GLA; every step the forecast
    prefetched is deliberately wrong in part, and the pages fetched synchronously equal exactly the
    chosen pages that were not resident; the pool never holds more pages than its slots."""
    _kernel_available(backend)
    from latentkv.kernels.mla_decode import decode_attention

    heads, lh, r_c, rope, page, lens = POOL_CASES[case]
    steps, k = 6 if backend == "reference" else 3, 3  # blocks attended per sequence
    g = torch.Generator().manual_seed(len(case))
    width = lh * r_c + rope
    per_seq = math.ceil((max(lens) + steps) / page)
    host = torch.randn(len(lens) * per_seq, page, width, generator=g)
    perm = torch.randperm(host.shape[0], generator=g).tolist()
    tables = [perm[i * per_seq : (i + 1) * per_seq] for i in range(len(lens))]
    slots = len(lens) * (k + 1)
    # the compiled kernel on a GPU: a device pool over pinned host pages (copies on the side stream);
    # its float32 dots take TF32 on the tensor cores, hence the looser tolerance there
    cuda = backend == "triton" and torch.cuda.is_available()
    device, tol = ("cuda", 5e-3) if cuda else ("cpu", 1e-5)
    pool = PagePool(host.pin_memory() if cuda else host, slots, device=device)
    host = pool.host
    pool.prefetch([t[0] for t in tables])  # something resident before the first step
    lens = list(lens)
    expected_misses = pool.stats.pages_missed
    for step in range(steps):
        # this step's new row of each sequence: to the host, a slot for a page it begins, into the pool
        flat, new = [], []
        for b in range(len(lens)):
            pos = lens[b]
            flat.append(tables[b][pos // page] * page + pos % page)
            new.append(torch.randn(width, generator=g))
            lens[b] += 1
        flat_t, new_t = torch.tensor(flat), torch.stack(new)
        host.view(-1, width)[flat_t] = new_t
        pool.adopt([f // page for f in flat if f % page == 0])
        pool.write_rows(flat_t, new_t)
        chosen = []
        for b, length in enumerate(lens):
            n = math.ceil(length / page)
            middle = (torch.randperm(n - 2, generator=g)[: k - 2] + 1).tolist()
            chosen.append(sorted({0, n - 1, *middle}))
        want = [[tables[b][i] for i in ids] for b, ids in enumerate(chosen)]
        flat_pages = [p for w in want for p in w]
        expected_misses += sum(not pool.resident(p) for p in flat_pages)
        slot_ids = pool.ensure(flat_pages)
        assert pool.stats.pages_missed == expected_misses
        assert len(pool.slot_of) <= slots and len(set(pool.slot_of.values())) == len(pool.slot_of)
        table = torch.zeros(len(lens), k, dtype=torch.int32)
        new_lens, at = [], 0
        for b, ids in enumerate(chosen):
            table[b, : len(ids)] = slot_ids[at : at + len(ids)].to(torch.int32)
            at += len(ids)
            new_lens.append((len(ids) - 1) * page + lens[b] - (math.ceil(lens[b] / page) - 1) * page)
        q = torch.randn(len(lens), 1, heads, r_c + rope, generator=g)
        out = decode_attention(q.to(device), pool.pool, table.to(device),
                               torch.tensor(new_lens, dtype=torch.int32, device=device), latent_heads=lh,
                               rope_dim=rope, softmax_scale=1 / math.sqrt(r_c + rope), backend=backend,
                               num_splits=2).cpu()
        for b, ids in enumerate(chosen):
            ref = tiny_models.masked_attention_reference(q[b, 0], host, tables[b][: math.ceil(lens[b] / page)], lens[b], ids, page, lh, rope)
            torch.testing.assert_close(out[b, 0].double(), ref, atol=tol * float(ref.abs().max()), rtol=10 * tol)
        # a forecast for the next step that is partly wrong: a random other block of each sequence
        forecast = []
        for b, ids in enumerate(chosen):
            n = math.ceil(lens[b] / page)
            forecast += [tables[b][0], tables[b][n - 1], tables[b][int(torch.randint(1, n, (1,), generator=g))]]
        pool.prefetch(forecast)
        assert len(pool.slot_of) <= slots
    assert pool.stats.pages_missed > 0 and pool.stats.peak_resident <= slots
    assert pool.stats.bytes_moved == (pool.stats.pages_missed + pool.stats.pages_prefetched) * pool.page_bytes


def test_pool_refuses_a_step_that_cannot_fit():
    """Guards the pool's size: a step attending more pages than slots raises a clear error, and a
    prefetch past the size places only what fits."""
    host = torch.randn(10, 4, 8)
    pool = PagePool(host, 3)
    assert pool.prefetch(range(6)) == 3 and len(pool.slot_of) == 3
    with pytest.raises(LatentKVError, match="pool"):
        pool.ensure([0, 1, 2, 3])
    assert pool.ensure([7, 8]).tolist() == [pool.slot_of[7], pool.slot_of[8]]
    assert pool.stats.pages_missed == 2 and len(pool.slot_of) == 3 and pool.stats.evictions == 2


def test_pool_evicts_least_recently_used():
    """Guards the eviction rule: a full pool gives a new page the slot of the page used longest ago,
    never one of the pages the same call needs; dropped pages free their slots."""
    pool = PagePool(torch.randn(10, 2, 4), 3)
    pool.ensure([0, 1, 2])
    pool.ensure([1])
    pool.ensure([0])
    pool.ensure([5])  # 2 is the least recently used
    assert set(pool.slot_of) == {0, 1, 5}
    pool.ensure([1, 5, 6])  # 0 goes (1 and 5 are needed now)
    assert set(pool.slot_of) == {1, 5, 6}
    pool.drop([5, 6])
    assert set(pool.slot_of) == {1} and pool.stats.evictions == 2
    pool.ensure([7, 8])
    assert set(pool.slot_of) == {1, 7, 8} and pool.stats.evictions == 2


def test_pool_slots_for_budget():
    cfg = SparseConfig("window", budget=0.125)
    assert pool_slots_for(cfg, 8, 1024, 64) == 8 * (2 + 2)  # 16 pages: ceil(2) = sink + local forced
    assert pool_slots_for(SparseConfig("dense"), 2, 100, 16) == 2 * (7 + 2)
    per_head = SparseConfig("last-step", budget=0.25, per_latent_head=True)  # 16 pages: 4 a head, 2 of them forced
    assert pool_slots_for(per_head, 8, 1024, 64) == 8 * (4 + 2)  # one latent head: as if shared
    assert pool_slots_for(per_head, 8, 1024, 64, latent_heads=3) == 8 * (4 + 2 * 2 + 2)  # forced + 3 x 2 chosen
    assert pool_slots_for(per_head, 1, 160, 16, latent_heads=8) == 10 + 2  # never more than the pages
    shared = SparseConfig("last-step", budget=0.25)
    assert pool_slots_for(shared, 8, 1024, 64, latent_heads=3) == 8 * (4 + 2)  # one page set for every head


# ---------------------------------------------------------------------------------------------
# the decode loop: offloaded sparse decode = sparse decode
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_mla(tiny_converted):
    from latentkv.modeling import load_model

    return load_model(tiny_converted("mla", kv_budget=0.5))


IDS = [(7 * i + 3) % 250 + 3 for i in range(61)]  # 45 prompt tokens + 15 decode steps, pages of 8

LOOP_CASES = {  # SparseConfig kwargs; misses: whether a correct forecast can still miss
    "window": (dict(policy="window", budget=3), False),
    "last-step": (dict(policy="last-step", budget=3), False),
    "last-step-refresh3": (dict(policy="last-step", budget=3, refresh=3), False),
    "predictor": (dict(policy="predictor", budget=3, predictor="random"), False),
    "quest": (dict(policy="quest", budget=3), True),
    "oracle": (dict(policy="oracle", budget=3), True),
}


def _random_predictor():
    g = torch.Generator().manual_seed(5)
    model = AttentionPredictor(PredictorConfig(history=4, channels=4, page_size=8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("case", sorted(LOOP_CASES))
def test_offloaded_sparse_decode_equals_sparse_decode(tiny_mla, case):
    """Guards the offloaded cache in the decode loop: with the same policy, teacher-forced sparse
    decode through host pages and a pool of budget + 2 slots per layer gives bit-identical logits to
    sparse decode on the ordinary paged cache; history policies (window, last-step, predictor) are
    forecast exactly, so every page they attend was prefetched (no miss); the pool stays in size."""
    from latentkv.sparsity.evaluate import teacher_forced

    kwargs, may_miss = LOOP_CASES[case]
    cfg = SparseConfig(**kwargs)
    predictor = _random_predictor() if cfg.policy == "predictor" else None
    plain, plain_stats = teacher_forced(tiny_mla, IDS, 45, cfg, page_size=8, prefill_chunk=16, predictor=predictor)
    off, stats = teacher_forced(tiny_mla, IDS, 45, cfg, page_size=8, prefill_chunk=16, predictor=predictor, offload=5)
    assert torch.equal(plain, off)
    o = stats.pop("offload")
    assert stats == plain_stats
    layers = tiny_mla.config.num_hidden_layers
    assert o["layer_steps"] == (len(IDS) - 1 - 45) * layers and o["peak_resident"] <= 5
    assert o["pages_attended_per_step"] == pytest.approx(3.0)
    if not may_miss:
        assert o["pages_missed"] == 0
    assert o["bytes_moved"] > 0


@pytest.mark.parametrize("policy", ["last-step", "quest"])
def test_offloaded_per_latent_head_decode_equals_paged(tiny_converted, policy):
    """Guards blocks chosen per latent head (GLA, 2 latent heads) through host pages and a device pool:
    the pool serves a block table per latent head (the union of the heads' pages resident), the logits
    are bit-identical to the paged cache's, and last-step's forecast (the union of the heads' choices)
    is exact, so nothing it attends is missed."""
    from latentkv.modeling import load_model
    from latentkv.sparsity.evaluate import teacher_forced

    model = load_model(tiny_converted("gla", kv_budget=0.5, latent_heads=2))
    cfg = SparseConfig(policy, budget=3, per_latent_head=True)
    plain, plain_stats = teacher_forced(model, IDS, 45, cfg, page_size=8, prefill_chunk=16)
    off, stats = teacher_forced(model, IDS, 45, cfg, page_size=8, prefill_chunk=16, offload=8)
    assert torch.equal(plain, off)
    o = stats.pop("offload")
    assert stats == plain_stats and o["peak_resident"] <= 8
    if policy == "last-step":
        assert o["pages_missed"] == 0


def test_offloaded_per_latent_head_pools_sized_by_default(tiny_converted):
    """Guards the default pool size for choices per latent head (last-step, Quest, a predictor): the
    long-context comparison sizes each policy's pool with ``pool_slots_for`` and the model's latent
    heads, so per-head decoding through host pages runs without a pool error and equals the paged
    cache's rows to the last float; the pool the heads fill holds more pages than one shared page set
    would (the reason for the wider pool)."""
    from latentkv.modeling import load_model
    from latentkv.sparsity.long_context import long_text_compare

    model = load_model(tiny_converted("gla", kv_budget=0.5, latent_heads=2))
    ids = IDS + [(5 * i + 11) % 250 + 3 for i in range(29)]  # 90 tokens: 74 prefilled, 16 decoded, pages of 8
    configs = [SparseConfig(p, budget=3, per_latent_head=True, predictor="random" if p == "predictor" else None)
               for p in ("last-step", "quest", "predictor")]
    predictor = _random_predictor()
    paged = long_text_compare(model, ids, 74, configs, page_size=8, predictor=predictor)
    off = long_text_compare(model, ids, 74, configs, page_size=8, offload=True, predictor=predictor)
    for p, o in zip(paged, off):
        for key in ("top1_agreement", "kl_to_dense", "perplexity", "blocks_per_decision"):
            assert p[key] == o[key], (p["policy"], key)
    shared_slots = pool_slots_for(configs[0], 1, len(ids), 8)
    slots = pool_slots_for(configs[0], 1, len(ids), 8, latent_heads=2)
    assert slots > shared_slots
    peak = max(r["offload"]["peak_resident"] for r in off[1:])
    assert shared_slots - 2 < peak <= slots  # the heads' union is wider than one head's budget
    assert off[1]["offload"]["pages_missed"] == 0  # last-step's forecast (the heads' union) is exact
    assert off[3]["offload"]["pages_missed"] == 0  # so is the predictor's


def test_offloaded_dense_policy_equals_dense_decode(tiny_mla):
    """Guards the offloaded cache without a sparse saving: the dense policy through a pool that holds
    every page equals the ordinary paged cache bit for bit."""
    from latentkv.sparsity.evaluate import teacher_forced

    cfg = SparseConfig("dense")
    plain, _ = teacher_forced(tiny_mla, IDS, 45, cfg, page_size=8, prefill_chunk=16)
    off, stats = teacher_forced(tiny_mla, IDS, 45, cfg, page_size=8, prefill_chunk=16, offload=8)
    assert torch.equal(plain, off) and stats["offload"]["pages_missed"] == 0


def test_offloaded_pool_too_small_errors(tiny_mla):
    from latentkv.sparsity.evaluate import teacher_forced

    with pytest.raises(LatentKVError, match="pool"):
        teacher_forced(tiny_mla, IDS[:50], 45, SparseConfig("dense"), page_size=8, prefill_chunk=16, offload=3)


def test_offloaded_cache_keeps_host_pages(tiny_mla):
    """Guards where the pages live: the host store holds every page and the device pools only
    ``pool_pages`` slots per layer."""
    cache = OffloadedLatentCache.for_model(tiny_mla, max_seqs=2, max_seq_len=64, page_size=8,
                                           sparse=SparseConfig("window", budget=3))
    assert cache.pool_pages == 2 * (3 + 2) and all(p.shape[0] == 16 for p in cache.pages)
    assert all(p.slots == 10 and p.pool.shape[0] == 10 + 1 for p in cache.pools)  # + the trash slot


def test_bench_offload_decode_smoke(capsys):
    """Guards the GPU benchmark script (scripts/bench_offload_decode.py) in --smoke mode on the CPU:
    it runs end to end, reports every mode with ratios against the baselines of the same run, and
    the whole cache streamed from the host gives the resident cache's logits."""
    module = tiny_models.load_script("bench_offload_decode")
    result = module.main(["--smoke", "--contexts", "96", "--layers", "1", "--steps", "1", "--offload-steps", "1",
                          "--fractions", "0.25"])
    modes = [r["mode"] for r in result["rows"]]
    assert modes == ["dense-gpu", "dense-offload", "sparse-gpu 0.25", "sparse-offload 0.25"]
    assert result["rows"][0]["vs_dense_gpu"] == 1.0 and result["rows"][1]["max_rel_diff_vs_dense_gpu"] == 0.0
    sparse = result["rows"][3]
    assert sparse["max_rel_diff_vs_sparse_gpu"] == 0.0  # the pool attends the resident cache's rows
    assert sparse["offload"]["misses_per_step"] == 0 and sparse["cache_gpu_bytes"] < result["rows"][0]["cache_gpu_bytes"]
    assert sparse["offload"]["peak_resident"] <= sparse["pages_attended_per_seq"] * 2  # the budget, batch 2
    assert {"model", "choice", "bookkeeping", "copy_issue"} <= set(sparse["breakdown_ms"])
    out = capsys.readouterr().out
    assert "| 96 | sparse-offload 0.25 |" in out and "| 96 | sparse-gpu 0.25 |" in out


def test_bench_offload_decode_smoke_device_only(capsys):
    """Guards the benchmark's device-only row (--host-reads device: fetch_on_device / ensure_on_device and
    the rows written to the host pages by write_host_rows): its logits equal the resident sparse row's bit
    for bit, it misses nothing (the Quest forecast is the next step's choice), and it fetches pages (counted
    on the device)."""
    module = tiny_models.load_script("bench_offload_decode")
    result = module.main(["--smoke", "--contexts", "256", "--layers", "2", "--steps", "3", "--offload-steps", "1",
                          "--fractions", "0.25", "--host-reads", "direct,device", "--tokens", "random"])
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == ["dense-gpu", "dense-offload", "sparse-gpu 0.25", "sparse-offload 0.25",
                          "sparse-offload 0.25 device"]
    device, host = rows["sparse-offload 0.25 device"], rows["sparse-offload 0.25"]
    assert device["max_rel_diff_vs_sparse_gpu"] == 0.0 and host["max_rel_diff_vs_sparse_gpu"] == 0.0
    assert device["offload"]["misses_per_step"] == 0
    # fetched pages are counted when copied: at placement on the device path, one step later on the host
    # path, so the timed windows differ by one step's prefetch (the pool test compares exact counts)
    assert device["offload"]["pages_fetched_per_step"] > 0 and host["offload"]["pages_fetched_per_step"] > 0
    assert device["offload"]["layer_steps"] == host["offload"]["layer_steps"] == 3 * 2


@pytest.mark.parametrize("n, chunk_pages", [(70, 1), (70, 2), (64, 4), (5, 3)])
def test_bench_refresh_chunked_attention_matches_reference(n, chunk_pages):
    """The benchmark's refresh step (dense attention streamed in chunks of pages, online softmax) gives the
    decode reference's output and per-page masses over a paged cache, for n not a multiple of the page and
    chunks of one page to more than the sequence."""
    from latentkv.kernels.mla_decode import mla_decode_reference

    module = tiny_models.load_script("bench_offload_decode")
    g = torch.Generator().manual_seed(n * 10 + chunk_pages)
    B, H, r, rope, page = 3, 4, 24, 8, 16
    pages = -(-n // page)
    kv = torch.randn(B * pages, page, r + rope, generator=g)
    table = torch.arange(B * pages, dtype=torch.int32).view(B, pages)
    q = torch.randn(B, 1, H, r + rope, generator=g)
    lens = torch.full((B,), n, dtype=torch.int32)
    ref, ref_masses = mla_decode_reference(q, kv, table, lens, latent_heads=1, rope_dim=rope, softmax_scale=0.3,
                                           return_masses=True)
    rows = kv.view(B, pages * page, r + rope)
    chunks = ((p0 * page, rows[:, p0 * page : (p0 + chunk_pages) * page]) for p0 in range(0, pages, chunk_pages))
    out, masses = module.chunked_attention(q, chunks, n, 0.3, r, page)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masses, ref_masses[:, 0, 0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(masses.sum(-1), torch.ones(B))


def test_bench_offload_decode_smoke_predictor(capsys):
    """Guards the benchmark's predictor rows (--choices predictor): the pages chosen by the trained predictor
    from the mass history, a dense refresh streamed from the host every R steps; the offloaded rows' logits
    equal the resident ones' bit for bit (a refresh and a predicted step among the compared steps), the
    refresh steps are counted and their copies are in the row's bytes, and no page bounds are kept."""
    module = tiny_models.load_script("bench_offload_decode")
    result = module.main(["--smoke", "--contexts", "256", "--layers", "2", "--steps", "4", "--offload-steps", "2",
                          "--fractions", "0.25", "--host-reads", "direct,device", "--choices", "quest,predictor",
                          "--refresh", "2", "--refresh-chunk", "3", "--tokens", "random"])
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows)[2:] == ["sparse-gpu 0.25", "sparse-offload 0.25", "sparse-offload 0.25 device",
                              "sparse-gpu 0.25 predictor/2", "sparse-offload 0.25 predictor/2",
                              "sparse-offload 0.25 predictor/2 device"]
    for mode in ("sparse-offload 0.25 predictor/2", "sparse-offload 0.25 predictor/2 device"):
        r = rows[mode]
        assert r["max_rel_diff_vs_sparse_gpu"] == 0.0
        assert r["refresh_steps"] == 2 and r["refresh_bytes_per_step"] > 0
        assert r["h2d_bytes_per_step"] > r["offload"]["bytes_per_step"] * 2  # the pool's copies and the refreshes'
        assert "page_bounds_bytes" not in r and r["history_and_refresh_bytes"] > 0
    assert rows["sparse-gpu 0.25 predictor/2"]["refresh_steps"] == 2
    assert "predictor rows:" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the device-side bookkeeping: every layer and sequence at once
# ---------------------------------------------------------------------------------------------
class _ReferencePool:
    """The pool's placement rule one page at a time in Python (the per-page logic the vectorized
    placement replaced): per call the unique pages in ascending order; a resident page is touched;
    a missing page takes the free or least recently used slot (ties: the lower slot) that holds no
    page of this call and is not protected by the last prefetch; a strict call that cannot fit
    places nothing."""

    def __init__(self, slots):
        self.slots = slots
        self.slot_of, self.page_of = {}, [None] * slots
        self.last_used, self.protect = [-1] * slots, set()
        self.tick, self.evictions = 0, 0

    def place(self, pages, strict, protect=False):
        self.tick += 1
        if protect:
            self.protect = set()
        uniq = sorted({p for p in pages if p >= 0})
        keep = {self.slot_of[p] for p in uniq if p in self.slot_of}
        for s in keep:
            self.last_used[s] = self.tick
        missing = [p for p in uniq if p not in self.slot_of]
        free = sorted((s for s in range(self.slots) if s not in keep and s not in self.protect),
                      key=lambda s: (self.last_used[s], s))
        if strict and len(missing) > len(free):
            return None
        new = []
        for p, s in zip(missing, free):
            if self.page_of[s] is not None:
                del self.slot_of[self.page_of[s]]
                self.evictions += 1
            self.page_of[s], self.slot_of[p], self.last_used[s] = p, s, self.tick
            new.append(p)
        if protect:
            self.protect = {self.slot_of[p] for p in uniq if p in self.slot_of}
        return new

    def drop(self, pages):
        for p in pages:
            s = self.slot_of.pop(p, None)
            if s is not None:
                self.page_of[s], self.last_used[s] = None, -1
                self.protect.discard(s)


def test_vectorized_placement_equals_per_page_reference():
    """Guards the device-side bookkeeping: over random calls (prefetch, ensure, adopt, drop) of
    random page choices of a batch, with duplicates and padding, the pool's page -> slot map, its
    evictions, the pages copied and the misses equal the per-page reference rule's, and every
    resident slot holds its host page."""
    g = torch.Generator().manual_seed(11)
    host = torch.randn(40, 2, 3, generator=g)
    slots = 12
    pool, ref = PagePool(host, slots), _ReferencePool(slots)
    missed = 0
    for call in range(120):
        kind = ["prefetch", "ensure", "ensure", "adopt", "drop"][int(torch.randint(0, 5, (1,), generator=g))]
        n = int(torch.randint(1, 14 if kind != "adopt" else 3, (1,), generator=g))
        pages = torch.randint(-1, 40, (n,), generator=g)  # -1: padding
        if kind == "prefetch":
            placed = ref.place(pages.tolist(), strict=False, protect=True)
            assert pool.prefetch(pages) == len(placed)
        elif kind == "ensure":
            ref.protect = set()
            placed = ref.place(pages.tolist(), strict=True)
            if placed is None:
                with pytest.raises(LatentKVError, match="pool"):
                    pool.ensure(pages)
                continue
            missed += len(placed)
            slot_ids = pool.ensure(pages)
            assert slot_ids.tolist() == [ref.slot_of[p] if p >= 0 else -1 for p in pages.tolist()]
        elif kind == "adopt":
            fresh = [p for p in pages.tolist() if p >= 0 and p not in ref.slot_of]
            if ref.place(fresh, strict=True) is None:
                continue  # a pool that cannot adopt raises at the next ensure; covered below
            pool.adopt(torch.tensor(fresh, dtype=torch.long))
            if fresh:  # an adopted page is not copied: its rows are written (here all of them)
                flat = (torch.tensor(fresh)[:, None] * 2 + torch.arange(2)[None]).flatten()
                pool.write_rows(flat, host.view(-1, 3)[flat])
        else:
            ref.drop(pages.tolist())
            pool.drop(pages)
        assert pool.slot_of == ref.slot_of, (call, kind)
        assert pool.stats.evictions == ref.evictions and pool.stats.pages_missed == missed
        for page, slot in pool.slot_of.items():
            assert torch.equal(pool.pool[slot], host[page])


def test_adopt_that_cannot_fit_is_reported_by_ensure():
    pool = PagePool(torch.randn(10, 2, 3), 2)
    pool.ensure([0, 1])
    pool.prefetch([0, 1])  # both protected until the next ensure
    pool.adopt([5])
    with pytest.raises(LatentKVError, match="pool"):
        pool.ensure([0, 1])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_layered_offloaded_sparse_decode_equals_resident(backend):
    """Guards the batched path (one pool over every layer, the choice and the slot tables as device
    tensors, placement deferred): over several decode steps with changing pages, three sequences of
    different lengths and two layers, attention through the pools is byte-identical to the same
    sparse attention over the resident cache (same kernel, same reduced table, same split); a
    forecast that is the attended tensor misses nothing and needs no transfer, a forecast that is
    partly wrong is fetched synchronously and each missing page is counted once."""
    _kernel_available(backend)
    from latentkv.kernels.mla_decode import decode_attention

    g = torch.Generator().manual_seed(3)
    layers, heads, lh, r_c, rope, page, k = 2, 4, 1, 32, 16, 8, 3
    width = lh * r_c + rope
    lens = [37, 50, 21]
    B = len(lens)
    steps = 5 if backend == "reference" else 2
    per_seq = math.ceil((max(lens) + steps) / page)
    host = torch.randn(layers, B * per_seq, page, width, generator=g)
    # the compiled kernel on a GPU: a device pool over pinned host pages (copies on the side stream)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    pool = PagePool(host.pin_memory() if device == "cuda" else host, B * k, device=device)
    host = pool.host
    table = torch.arange(B)[:, None] * per_seq + torch.arange(per_seq)[None]

    def choice(lengths):  # [layers, B, k] ascending page ids: the sink, k - 2 random, the current page
        out = torch.empty(layers, B, k, dtype=torch.long)
        for l in range(layers):
            for b, n in enumerate(lengths):
                blocks = math.ceil(n / page)
                mid = (torch.randperm(blocks - 2, generator=g)[: k - 2] + 1).tolist()
                out[l, b] = table[b, sorted({0, blocks - 1, *mid})]
        return out

    forecast = None
    expected_missed = 0
    for step in range(steps):
        rows = torch.tensor([int(table[b, n // page]) * page + n % page for b, n in enumerate(lens)])
        lens = [n + 1 for n in lens]
        new = torch.randn(layers, B, width, generator=g)
        host.view(layers, -1, width)[:, rows] = new  # the truth
        exact = step % 2 == 0 and forecast is not None
        chosen = forecast if exact else choice(lens)
        if not exact:
            expected_missed += sum(not pool.resident(int(p), l) for l in range(layers)
                                   for p in chosen[l].flatten().unique())
        slots = pool.ensure(chosen, wait=False)
        pool.write_rows(rows, new)
        assert pool.stats.pages_missed == expected_missed
        seq_lens = torch.tensor([(k - 1) * page + n - (math.ceil(n / page) - 1) * page for n in lens],
                                dtype=torch.int32, device=device)
        q = torch.randn(B, 1, heads, width, generator=g).to(device)
        for l in range(layers):
            pool.wait(l)
            args = dict(latent_heads=lh, rope_dim=rope, softmax_scale=1 / math.sqrt(width), backend=backend,
                        num_splits=2, max_seq_len=k * page)
            got = decode_attention(q, pool.pools[l], slots[l].to(device, torch.int32), seq_lens, **args)
            want = decode_attention(q, host[l].to(device), chosen[l].to(device, torch.int32), seq_lens, **args)
            assert torch.equal(got, want), (step, l)
        # the next step's forecast: placed now, copied when the next step asks (deferred)
        forecast = choice([n + 1 for n in lens])
        pool.prefetch(forecast, defer=True)
    stats = pool.stats
    assert stats.pages_missed == expected_missed > 0 and stats.peak_resident <= B * k
    assert stats.bytes_moved == (stats.pages_missed + stats.pages_prefetched) * pool.page_bytes


def test_ensure_of_the_prefetched_tensor_reads_nothing_back(monkeypatch):
    """Guards the no-read-back path: ``ensure`` of the very tensor a deferred prefetch placed
    completely gives the slots without a device-to-host transfer of placed pages (the prefetch's own
    transfer is the only one), and counts no miss; any other tensor is checked (one transfer)."""
    pool = PagePool(torch.randn(2, 30, 4, 3), 6)  # two layers
    calls = []
    real = PagePool._announce
    monkeypatch.setattr(PagePool, "_announce", lambda self, *a: calls.append(1) or real(self, *a))
    chosen = torch.tensor([[[0, 4, 9], [10, 11, 12]], [[1, 2, 3], [20, 21, 29]]])  # [layers, batch, k]
    pool.prefetch(chosen, defer=True)
    assert len(calls) == 1
    slots = pool.ensure(chosen)
    assert len(calls) == 1 and slots.shape == chosen.shape
    for l in range(2):
        assert torch.equal(pool.pools[l][slots[l]], pool.host[l][chosen[l]])
    assert pool.stats.pages_missed == 0 and pool.stats.pages_prefetched == 12
    pool.ensure(chosen.clone())  # the same pages as another tensor: checked, nothing missing
    assert len(calls) == 2 and pool.stats.pages_missed == 0 and pool.stats.pages_attended == 24


# every latent target the decode loop runs: (method options, the policies that must forecast exactly)
TARGET_CASES = {
    "mla": dict(kv_budget=0.5),
    "gla": dict(kv_budget=0.5, latent_heads=2),
    "gta": dict(),
    "gta-s": dict(map_heads=2),
}


@pytest.mark.parametrize("policy", ["last-step", "quest"])
@pytest.mark.parametrize("method", sorted(TARGET_CASES))
def test_offloaded_sparse_decode_every_latent_target(tiny_converted, method, policy):
    """Guards sparse and offloaded decode on every latent target (MLA, GLA, GTA-T, GTA-S): the
    offloaded cache (default pool size) gives the paged cache's logits bit for bit, the sparse run
    attends fewer blocks than dense and differs from it (the policy acts), and last-step's forecast
    is exact (no miss)."""
    from latentkv.modeling import load_model
    from latentkv.sparsity.long_context import long_text_compare

    model = load_model(tiny_converted(method, **TARGET_CASES[method]))
    ids = IDS + [(5 * i + 11) % 250 + 3 for i in range(29)]  # 90 tokens: 74 prefilled, 16 decoded, pages of 8
    cfg = [SparseConfig(policy, budget=3)]
    paged = long_text_compare(model, ids, 74, cfg, page_size=8)
    off = long_text_compare(model, ids, 74, cfg, page_size=8, offload=True)
    for p, o in zip(paged, off):
        for key in ("top1_agreement", "kl_to_dense", "perplexity", "nll", "blocks_per_decision"):
            assert p[key] == o[key], (p["policy"], key)
    assert paged[1]["blocks_attended_fraction"] < 1 and paged[1]["kl_to_dense"] > 0
    if policy == "last-step":
        assert off[1]["offload"]["pages_missed"] == 0


# ---------------------------------------------------------------------------------------------
# placement and copies on the device alone (what a CUDA graph captures)
# ---------------------------------------------------------------------------------------------
COPY_CASES = {  # (host pages, pool rows, row words, pairs, word dtype)
    "int64-one-chunk": (9, 7, 40, 6, torch.int64),
    "int16-three-chunks": (5, 6, 2500, 5, torch.int16),
    "float32-no-pairs": (3, 3, 8, 0, torch.float32),
}


@pytest.mark.parametrize("case", sorted(COPY_CASES))
def test_copy_pages_kernel_equals_reference(case):
    """Guards the fixed-grid page copy against its reference on fresh random inputs: the pairs with a
    page are copied word for word (rows wider than one program's chunk included), the pairs without
    one (-1, with any slot, -1 too) leave the destination untouched."""
    from latentkv.kernels.page_copy import copy_pages, copy_pages_reference

    _kernel_available("triton")
    n_src, n_dst, words, pairs, dtype = COPY_CASES[case]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed = int(torch.randint(0, 2**31, (1,)))
    g = torch.Generator().manual_seed(seed)
    draw = (lambda *s: torch.randn(*s, generator=g).to(dtype)) if dtype.is_floating_point else \
        (lambda *s: torch.randint(-(2**15), 2**15, s, generator=g).to(dtype))
    src, dst = draw(n_src, words).to(device), draw(n_dst, words).to(device)
    slots = torch.randperm(n_dst, generator=g)[:pairs]
    pages = torch.randint(0, n_src, (pairs,), generator=g)
    drop = torch.rand(pairs, generator=g) < 0.4
    pages[drop], slots[drop] = -1, -1
    pages, slots = pages.to(device), slots.to(device)
    before, want = dst.clone(), dst.clone()
    copy_pages_reference(src, want, pages, slots)
    copy_pages(src, dst, pages, slots, backend="triton")
    assert torch.equal(dst, want), f"seed {seed}"
    kept = pages >= 0
    assert torch.equal(dst[slots[kept]], src[pages[kept]])
    untouched = torch.ones(n_dst, dtype=torch.bool, device=device)
    untouched[slots[kept]] = False
    assert torch.equal(dst[untouched], before[untouched])


def test_copy_pages_bad_input():
    from latentkv.kernels.page_copy import copy_pages

    x = torch.zeros(3, 4)
    with pytest.raises(LatentKVError, match="width and dtype"):
        copy_pages(x, torch.zeros(3, 5), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with pytest.raises(LatentKVError, match="int64"):
        copy_pages(x, x.clone(), torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.long))


def _pool_pair(layers: int, pages: int, slots: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    host = torch.randn(layers, pages, 4, 6, generator=g)
    return PagePool(host, slots), PagePool(host, slots), g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_device_only_pool_calls_equal_host_driven_ones(seed):
    """Guards ``fetch_on_device`` / ``ensure_on_device`` (the calls a CUDA graph captures) against
    ``prefetch`` / ``ensure``: over a run of random forecasts (some wrong, so some pages miss) on a
    pool of every layer, both pools end each step in the same state (page -> slot maps, LRU
    clocks, slot contents), give the same slots, the slots hold the host's pages, and the counts
    (prefetched, missed, attended, bytes, layer-steps, evictions) agree."""
    layers, n_pages, slots, k = 3, 20, 7, 4
    host_pool, dev_pool, g = _pool_pair(layers, n_pages, slots, seed)
    for step in range(12):
        chosen = torch.stack([torch.randperm(n_pages, generator=g)[:k] for _ in range(layers)])
        forecast = chosen.clone()
        wrong = torch.rand(layers, k, generator=g) < 0.3
        forecast[wrong] = torch.randint(0, n_pages, (int(wrong.sum()),), generator=g)
        if step % 4 == 3:
            forecast[:, -1] = -1  # no page
        host_pool.prefetch(forecast)
        dev_pool.fetch_on_device(forecast)
        a = host_pool.ensure(chosen.clone())
        b = dev_pool.ensure_on_device(chosen.clone())
        assert torch.equal(a, b)
        for name in ("slot_of_page", "page_of_slot", "last_used", "pools"):
            assert torch.equal(getattr(host_pool, name), getattr(dev_pool, name)), (step, name)
        for layer in range(layers):
            assert torch.equal(dev_pool.pools[layer, b[layer]], dev_pool.host[layer, chosen[layer]])
    sa, sb = host_pool.stats, dev_pool.stats
    assert sa == sb and sb.pages_missed > 0 and sb.pages_prefetched > 0
    assert sb.steps == 12 * layers and sb.bytes_moved == (sb.pages_missed + sb.pages_prefetched) * dev_pool.page_bytes


def test_ensure_on_device_overflow_raises_at_stats():
    """Guards the deferred overflow: a step of more pages than slots places nothing for that layer
    (slots -1, nothing waits for the device) and the next ``stats`` read raises the pool's error."""
    pool, _, _ = _pool_pair(1, 10, 3, 0)
    out = pool.ensure_on_device(torch.tensor([0, 1, 2, 3]))
    assert (out == -1).all()
    with pytest.raises(LatentKVError, match="pool_pages"):
        pool.stats


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_device_only_pool_calls_replay_in_a_cuda_graph():
    """Guards the reason for the device-only calls: one captured fetch + ensure over pinned host pages
    replays with new page sets written into its static input, and every replay leaves the chosen
    pages in the slots it returns, with the same state as the eager calls on a twin pool."""
    layers, n_pages, slots, k = 2, 64, 12, 5
    g = torch.Generator().manual_seed(3)
    host = torch.randn(layers, n_pages, 16, 64, generator=g).pin_memory()
    pool, twin = PagePool(host, slots, device="cuda", host_reads="direct"), PagePool(host, slots, device="cuda",
                                                                                       host_reads="direct")
    forecast = torch.zeros(layers, k, dtype=torch.long, device="cuda")
    chosen = torch.zeros(layers, k, dtype=torch.long, device="cuda")
    out = torch.empty(layers, k, dtype=torch.long, device="cuda")
    pool.fetch_on_device(forecast)  # warm-up: compile the copy kernel outside the capture
    out.copy_(pool.ensure_on_device(chosen))
    twin.fetch_on_device(forecast)
    twin.ensure_on_device(chosen)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        pool.fetch_on_device(forecast)
        out.copy_(pool.ensure_on_device(chosen))
    for step in range(6):
        pick = torch.stack([torch.randperm(n_pages, generator=g)[:k] for _ in range(layers)])
        guess = pick.clone()
        guess[:, :2] = torch.randint(0, n_pages, (layers, 2), generator=g)
        forecast.copy_(guess)
        chosen.copy_(pick)
        graph.replay()
        twin.fetch_on_device(guess.cuda())
        want = twin.ensure_on_device(pick.cuda())
        torch.cuda.synchronize()
        assert torch.equal(out, want)
        for layer in range(layers):
            assert torch.equal(pool.pools[layer, out[layer]].cpu(), host[layer, pick[layer]])
        for name in ("slot_of_page", "page_of_slot", "last_used"):
            assert torch.equal(getattr(pool, name), getattr(twin, name)), (step, name)
    assert pool.stats == twin.stats


def test_write_host_rows_lands_in_each_layers_pages():
    """Guards write_host_rows (the host truth a device-only step writes): row r of layer l lands at page
    r // page_size, row r % page_size of layer l's host pages; nothing else changes."""
    g = torch.Generator().manual_seed(4)
    host = torch.randn(3, 6, 4, 5, generator=g)
    pool = PagePool(host, 4)
    before = host.clone()
    flat = torch.tensor([0, 9, 23])
    rows = torch.randn(3, 3, 5, generator=g)
    pool.write_host_rows(flat, rows)
    want = before.clone()
    for layer in range(3):
        for i, r in enumerate(flat.tolist()):
            want[layer, r // 4, r % 4] = rows[layer, i]
    assert torch.equal(host, want)
