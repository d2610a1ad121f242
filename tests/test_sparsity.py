"""Sparse decode (latentkv.sparsity): policies, block masses, the reduced block table through the
decode kernel, the AttentionPredictor (save / load, training), and the errors users can hit.

Kernel cases run the Triton kernel interpreted on the CPU (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import tiny_models

from latentkv.errors import LatentKVError
from latentkv.sparsity import SparseAttention, SparseConfig, choose_blocks, parse_budget
from latentkv.sparsity.masses import block_masses
from latentkv.sparsity.policies import forced_blocks, policy_scores
from latentkv.sparsity.predictor import AttentionPredictor, PredictorConfig, load_predictor, save_predictor
from latentkv.sparsity.runtime import reduced_pages

CUDA = torch.cuda.is_available()
# Compiled on a GPU, the kernel's float32 dots run in TF32 (tests/test_kernels.py: the same tolerances).
KERNEL_RTOL = 5e-3 if CUDA else 1e-4

# ---------------------------------------------------------------------------------------------
# policies
# ---------------------------------------------------------------------------------------------
POLICY_CASES = [  # (policy, budget, sink, local)
    ("window", 0.25, 1, 1),
    ("window", 3, 1, 2),
    ("last-step", 0.125, 1, 1),
    ("last-step", 0.5, 2, 1),
    ("quest", 0.25, 1, 1),
    ("quest", 3, 0, 2),
    ("oracle", 0.25, 1, 1),
    ("oracle", 4, 0, 1),
    ("predictor", 0.25, 1, 1),
    ("predictor", 5, 1, 3),
]


@pytest.mark.parametrize("policy,budget,sink,local", POLICY_CASES)
@pytest.mark.parametrize("n_blocks", [1, 2, 5, 17, 64])
def test_policy_invariants(policy, budget, sink, local, n_blocks):
    """Guards the selection contract every policy shares: exactly blocks_for(n) blocks (never more
    than the budget, never fewer than the forced ones), ascending and unique, the sink blocks and the
    last local blocks (the current token's block last) always among them."""
    g = torch.Generator().manual_seed(n_blocks)
    cfg = SparseConfig(policy, budget=budget, sink_blocks=sink, local_blocks=local,
                       predictor="unused" if policy == "predictor" else None)
    history = torch.softmax(torch.randn(1, 6, n_blocks, generator=g) * 3, -1)
    current = torch.softmax(torch.randn(1, n_blocks, generator=g) * 3, -1)
    if policy == "quest":  # page-bound scores: one real number per block
        current = torch.randn(n_blocks, generator=g)
    predictor = AttentionPredictor(PredictorConfig(history=4, channels=4)) if policy == "predictor" else None
    ids = choose_blocks(policy_scores(cfg, n_blocks, history, current, predictor), cfg.blocks_for(n_blocks), sink, local)
    k = cfg.blocks_for(n_blocks)
    budget_blocks = int(budget) if budget >= 1 else math.ceil(budget * n_blocks)
    assert len(ids) == k == min(n_blocks, max(budget_blocks, sink + local))
    assert torch.equal(ids, ids.unique()) and int(ids.min()) >= 0 and int(ids.max()) == n_blocks - 1
    assert set(forced_blocks(n_blocks, sink, local).tolist()) <= set(ids.tolist())


def test_oracle_picks_true_top_k():
    """Guards the upper bound: the oracle keeps the forced blocks plus exactly the k - forced blocks
    of largest true mass among the rest (brute force over random masses)."""
    g = torch.Generator().manual_seed(0)
    for n in (6, 20, 51):
        current = torch.softmax(torch.randn(2, n, generator=g) * 2, -1)  # two latent heads
        cfg = SparseConfig("oracle", budget=0.3)
        ids = choose_blocks(policy_scores(cfg, n, None, current), cfg.blocks_for(n))
        mean = current.mean(0)
        rest = [j for j in range(1, n - 1)]
        best = sorted(rest, key=lambda j: -float(mean[j]))[: cfg.blocks_for(n) - 2]
        assert ids.tolist() == sorted([0, n - 1] + best)


def test_window_keeps_sink_and_most_recent():
    """Guards StreamingLLM's rule: the sink block plus the most recent blocks, nothing in between."""
    cfg = SparseConfig("window", budget=4)
    ids = choose_blocks(policy_scores(cfg, 10, None, None), cfg.blocks_for(10))
    assert ids.tolist() == [0, 7, 8, 9]


def test_last_step_follows_previous_masses():
    """Guards the cheap baseline: it ranks by the newest history row, not an older one."""
    hist = torch.zeros(1, 2, 8)
    hist[0, 0, 3] = 1.0  # old step: block 3
    hist[0, 1, 5] = 1.0  # last step: block 5
    cfg = SparseConfig("last-step", budget=3)
    assert choose_blocks(policy_scores(cfg, 8, hist, None), 3).tolist() == [0, 5, 7]


@pytest.mark.parametrize("latent_heads,rope_dim", [(1, 8), (2, 4), (3, 0)])
def test_quest_bounds_bound_every_key(latent_heads, rope_dim):
    """Guards Quest's page scores in the absorbed space: for every block, the score is >= the largest
    q_h . k over the block's rows and query heads (an upper bound), and equal to it for one-row blocks;
    the runtime's incrementally kept bounds equal the bounds computed from scratch at every length."""
    from latentkv.sparsity.policies import bound_scores, head_columns

    g = torch.Generator().manual_seed(latent_heads)
    heads, r_c, size = 6, 10, 4
    width = latent_heads * r_c + rope_dim
    q = torch.randn(heads, r_c + rope_dim, generator=g)
    kv = torch.randn(7, size, width, generator=g)
    pages = torch.randperm(7, generator=g)[:5]
    sparse = SparseAttention(SparseConfig("quest", budget=2), page_size=size)
    cols = head_columns(heads, latent_heads, r_c, rope_dim)
    for length in range(1, 5 * size + 1):  # grows one token at a time, as decoding does
        low, high = sparse.page_bounds(0, 0, kv, pages, length)
        rows = kv[pages].reshape(-1, width)[:length]
        n = -(-length // size)
        blocks = [rows[j * size : (j + 1) * size] for j in range(n)]
        assert torch.equal(low, torch.stack([b.amin(0) for b in blocks]))
        assert torch.equal(high, torch.stack([b.amax(0) for b in blocks]))
        scores = bound_scores(q, low, high, latent_heads, rope_dim)
        exact = torch.stack([(b[:, cols] * q[None]).sum(-1).max() for b in blocks])  # max over rows and heads
        assert torch.all(scores >= exact - 1e-5)
        one_row = torch.tensor([b.shape[0] == 1 for b in blocks])
        torch.testing.assert_close(scores[one_row], exact[one_row])


def test_quest_decodes_through_the_hook(tiny_mla):
    """Guards the quest policy end to end: a budget covering every block is bit-identical to dense
    decoding; a budget of 3 blocks attends to that fraction, with the Triton kernel equal to the
    reference backend."""
    from latentkv.sparsity.evaluate import teacher_forced

    plain = _plain_decode(tiny_mla, IDS, 45, 8)
    wide, _ = teacher_forced(tiny_mla, IDS, 45, SparseConfig("quest", budget=64), page_size=8, prefill_chunk=16)
    assert torch.equal(plain, wide)
    cfg = SparseConfig("quest", budget=3, track_recall=True)
    ref, stats = teacher_forced(tiny_mla, IDS[:53], 45, cfg, page_size=8, prefill_chunk=16)
    assert stats["blocks_attended_fraction"] == pytest.approx(3 / 7, abs=0.06) and 0 < stats["attention_recall"] < 1
    if importlib.util.find_spec("triton") is not None and not CUDA:
        tri, _ = teacher_forced(tiny_mla, IDS[:53], 45, cfg, page_size=8, prefill_chunk=16, backend="triton")
        torch.testing.assert_close(tri, ref, rtol=KERNEL_RTOL, atol=KERNEL_RTOL * float(ref.abs().max()))


def test_quest_bound_holds_in_the_kernel_space(tiny_mla):
    """Guards Quest against a brute-force reference on a real decode: at every decode step and layer,
    with the query the kernel attends with and the cache rows it reads, each page's true largest score
    (per query head: q_h[:r_c] . latent of its latent head + q_h[r_c:] . rotated RoPE key, over the
    page's rows written so far) never exceeds the page's bound sum_j max(q_j min_j, q_j max_j) from
    the element-wise min / max of the page's rows; the bounds are those of this step's cache (a page
    that filled since the last step included); and the policy attends exactly the forced blocks plus
    the best pages by the head-averaged softmax of the scaled bounds."""
    from latentkv.runtime.decode import forward_step
    from latentkv.sparsity.evaluate import prefilled, sparse_copy
    from latentkv.sparsity.policies import bound_scores, head_bounds

    size, prompt = 8, 45
    start = prefilled(tiny_mla, IDS, prompt, page_size=size, prefill_chunk=16)
    cache, seq, _, sparse = sparse_copy(start, SparseConfig("quest", budget=3))
    seen = []
    select = sparse.select

    def checked(module, q, kv, step):
        table, lens, max_len = select(module, q, kv, step)
        length, lh, rope = int(step["seq_lens"][0]), module.latent_heads, module.rope_dim
        n = -(-length // size)
        rows = kv[step["block_table"][0, :n].long()].reshape(-1, kv.shape[-1])[:length].float()
        qf = q[0, 0].float()  # [H, r_c + rope]: this step's query, W_UK folded in
        heads, r_c = qf.shape[0], qf.shape[1] - rope
        true = torch.empty(n, heads)
        for h in range(heads):
            c = h // (heads // lh)
            score = rows[:, c * r_c : (c + 1) * r_c] @ qf[h, :r_c] + rows[:, lh * r_c :] @ qf[h, r_c:]
            true[:, h] = torch.stack([score[j * size : (j + 1) * size].max() for j in range(n)])
        low = torch.stack([rows[j * size : (j + 1) * size].amin(0) for j in range(n)])
        high = torch.stack([rows[j * size : (j + 1) * size].amax(0) for j in range(n)])
        bound = head_bounds(qf, *sparse.page_bounds(seq, module.layer_idx, kv, step["block_table"][0, :n], length),
                            lh, rope)
        torch.testing.assert_close(bound, head_bounds(qf, low, high, lh, rope))  # kept bounds = fresh bounds
        assert torch.all(true <= bound + 1e-4 * bound.abs().clamp_min(1))
        scores = bound_scores(qf, low, high, lh, rope, scale=module.scaling)
        want = choose_blocks(scores, SparseConfig("quest", budget=3).blocks_for(n))
        assert torch.equal(sparse.last_choice[seq, module.layer_idx], want)
        seen.append(n)
        return table, lens, max_len

    sparse.select = checked
    for t in range(prompt, len(IDS) - 1):
        forward_step(tiny_mla, cache, [seq], torch.tensor([[IDS[t]]]))
    assert len(seen) == (len(IDS) - 1 - prompt) * len(cache.pages) and min(seen) < max(seen)  # pages filled


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=0), "budget"),
    (dict(budget=-0.5), "budget"),
    (dict(budget=float("nan")), "budget"),
    (dict(budget=2.5), "whole"),
    (dict(budget=2, sink_blocks=2, local_blocks=1), "raise --sparse-budget"),
    (dict(policy="random"), "unknown sparse policy"),
    (dict(policy="predictor"), "--predictor"),
    (dict(local_blocks=0), "local_blocks"),
    (dict(refresh=0), "refresh"),
    (dict(history_masses="kernel"), "history_masses"),
])
def test_bad_configs_raise(kwargs, match):
    """Guards user mistakes: each bad setting is a LatentKVError naming what to change, not an assert
    or a silent fallback."""
    with pytest.raises(LatentKVError, match=match):
        SparseConfig(**{"policy": "window", **kwargs})


def test_parse_budget():
    """Guards the CLI budget forms: fraction, percent, block count; junk is a clear error."""
    assert parse_budget("0.25") == 0.25 and parse_budget("12.5%") == 0.125 and parse_budget("16") == 16
    with pytest.raises(LatentKVError, match="fraction"):
        parse_budget("quarter")


# ---------------------------------------------------------------------------------------------
# block masses and the reduced block table through the kernel
# ---------------------------------------------------------------------------------------------
def test_block_masses_match_explicit_softmax():
    """Guards the history's numbers: masses equal a float64 softmax of the absorbed scores pooled
    by blocks (GLA: per latent head over its query heads), every row sums to 1, causal over the
    new tokens."""
    g = torch.Generator().manual_seed(1)
    s, heads, lh, r_c, rope, page, length = 3, 4, 2, 8, 4, 5, 23
    q = torch.randn(s, heads, r_c + rope, generator=g)
    rows = torch.randn(length, lh * r_c + rope, generator=g)
    got = block_masses(q, rows, latent_heads=lh, rope_dim=rope, scale=0.3, page_size=page)
    assert got.shape == (s, lh, math.ceil(length / page))
    for i in range(s):
        visible = length - s + i + 1
        for c in range(lh):
            hs = range(c * 2, c * 2 + 2)
            want = torch.zeros(got.shape[-1], dtype=torch.float64)
            for h in hs:
                sc = (q[i, h, :r_c].double() @ rows[:visible, c * r_c : (c + 1) * r_c].double().T
                      + q[i, h, r_c:].double() @ rows[:visible, lh * r_c :].double().T) * 0.3
                p = torch.softmax(sc, -1)
                for t in range(visible):
                    want[t // page] += p[t] / 2
            torch.testing.assert_close(got[i, c].double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(s, lh))


KERNEL_CASES = {  # lens (odd, partly filled last pages), heads, latent_heads, r_c, rope, page
    "mla-page16": ((37, 70), 4, 1, 32, 16, 16),
    "mla-page8-norope": ((29, 51), 4, 1, 32, 0, 8),
    "gla2-page16": ((61, 83), 4, 2, 16, 16, 16),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_sparse_kernel_equals_masked_reference(case, backend):
    """Guards exactness of sparse attention through the unchanged kernel: a reduced block table of the
    chosen pages (shuffled page ids, the current block last and partly filled) with the compacted
    length gives the same output as dense attention with the unchosen blocks masked, for fresh
    random inputs; poisoned (NaN) rows past each length must never be read."""
    if backend == "triton":
        pytest.importorskip("triton")
        md = importlib.import_module("latentkv.kernels.mla_decode")
        if not torch.cuda.is_available() and type(md._kernels()[0]).__name__ != "InterpretedFunction":
            pytest.skip("triton imported in compiled mode without a GPU; run with TRITON_INTERPRET=1")
    from latentkv.kernels.mla_decode import decode_attention

    lens, heads, lh, r_c, rope, page = KERNEL_CASES[case]
    g = torch.Generator().manual_seed(len(case))
    width = lh * r_c + rope
    need = [math.ceil(n / page) for n in lens]
    kv = torch.randn(sum(need) + 2, page, width, generator=g)
    perm = torch.randperm(kv.shape[0], generator=g)
    tables, used = [], 0
    for n, L in zip(need, lens):
        tables.append(perm[used : used + n])
        kv[perm[used + n - 1], L - (n - 1) * page :] = float("nan")  # tail of the partly filled page
        used += n
    q = torch.randn(len(lens), 1, heads, r_c + rope, generator=g)
    reduced, new_lens, refs = [], [], []
    for b, (n, L) in enumerate(zip(need, lens)):
        middle = torch.randperm(n - 2, generator=g)[: max(1, (n - 2) // 2)] + 1
        ids = torch.cat([torch.tensor([0, n - 1]), middle]).unique().sort().values
        pages, new_len = reduced_pages(tables[b], ids, L, page)
        reduced.append(pages)
        new_lens.append(new_len)
        refs.append(tiny_models.masked_attention_reference(q[b, 0], kv, tables[b], L, ids, page, lh, rope))
    table = torch.zeros(len(lens), max(len(p) for p in reduced), dtype=torch.int32)
    for b, p in enumerate(reduced):
        table[b, : len(p)] = p
    dev = "cuda" if CUDA and backend == "triton" else "cpu"  # compiled Triton reads CUDA tensors only
    out = decode_attention(q.to(dev), kv.to(dev), table.to(dev), torch.tensor(new_lens, dtype=torch.int32, device=dev),
                           latent_heads=lh, rope_dim=rope, softmax_scale=1 / math.sqrt(r_c + rope), backend=backend,
                           num_splits=2).cpu()
    from latentkv.kernels.compare import assert_close

    ref = torch.stack(refs)[:, None]
    tf32 = dev == "cuda"
    assert_close(out.double(), ref, atol=(5e-3 if tf32 else 1e-5) * float(ref.abs().max()), rtol=5e-3 if tf32 else 1e-4,
                 max_cos_diff=1e-5 if tf32 else 1e-9, name=case)


# ---------------------------------------------------------------------------------------------
# the decode loop with a policy (tiny converted model)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_mla_dir(tiny_converted):
    return tiny_converted("mla", kv_budget=0.5)


@pytest.fixture(scope="module")
def tiny_mla(tiny_mla_dir):
    from latentkv.modeling import load_model

    return load_model(tiny_mla_dir)


IDS = [(7 * i + 3) % 250 + 3 for i in range(61)]  # 61 tokens: 45 prompt + 15 decode steps, pages of 8


def _plain_decode(model, ids, prompt_len, page):
    from latentkv.runtime.decode import PagedLatentCache, forward_step, prefill

    cache = PagedLatentCache.for_model(model, max_seqs=1, max_seq_len=len(ids), page_size=page, backend="reference")
    seq = cache.add_sequence()
    rows = [prefill(model, cache, seq, ids[:prompt_len], 16)]
    for t in range(prompt_len, len(ids) - 1):
        rows.append(forward_step(model, cache, [seq], torch.tensor([[ids[t]]]))[0, -1])
    return torch.stack(rows)


def test_dense_policy_equals_dense_decode(tiny_mla):
    """Guards the hook: with the dense policy (and with any policy whose budget covers every block)
    the decode loop's logits are bit-identical to the loop without sparsity."""
    from latentkv.sparsity.evaluate import teacher_forced

    plain = _plain_decode(tiny_mla, IDS, 45, 8)
    dense, stats = teacher_forced(tiny_mla, IDS, 45, SparseConfig("dense", track_recall=True), page_size=8,
                                  prefill_chunk=16)
    assert torch.equal(plain, dense) and stats["attention_recall"] == pytest.approx(1.0)
    wide, _ = teacher_forced(tiny_mla, IDS, 45, SparseConfig("last-step", budget=64), page_size=8, prefill_chunk=16)
    assert torch.equal(plain, wide)


def test_sparse_decode_hook_triton_equals_reference(tiny_mla):
    """Guards the reduced tables the hook builds, through the real kernel: a sparse last-step policy
    (budget 3 of up to 8 blocks) decoded with the Triton kernel equals the same policy with the
    reference backend, differs from dense, and attends to the budgeted fraction of blocks."""
    pytest.importorskip("triton")
    from latentkv.sparsity.evaluate import teacher_forced

    cfg = SparseConfig("last-step", budget=3, track_recall=True)
    model = tiny_mla
    if CUDA:  # compiled Triton reads CUDA tensors only; the reference runs on the same device
        import copy

        model = copy.deepcopy(tiny_mla).cuda()
    ref, stats = teacher_forced(model, IDS[:53], 45, cfg, page_size=8, prefill_chunk=16)
    tri, _ = teacher_forced(model, IDS[:53], 45, cfg, page_size=8, prefill_chunk=16, backend="triton")
    torch.testing.assert_close(tri, ref, rtol=KERNEL_RTOL, atol=KERNEL_RTOL * float(ref.abs().max()))
    ref = ref.cpu()
    dense = _plain_decode(tiny_mla, IDS[:53], 45, 8)
    assert not torch.allclose(ref, dense)
    assert stats["blocks_attended_fraction"] == pytest.approx(3 / 7, abs=0.06) and 0 < stats["attention_recall"] < 1


def test_recall_tracking_is_a_pure_observer(tiny_mla):
    """Guards the measurement: computing the true masses for recall must not leak into the history
    (with refresh > 1 the history between refreshes holds only the attended blocks' masses), so the
    decoded logits are identical with and without tracking, and differ from refreshing every step."""
    from latentkv.sparsity.evaluate import teacher_forced

    runs = {}
    for refresh, track in ((3, False), (3, True), (1, False)):
        cfg = SparseConfig("last-step", budget=3, refresh=refresh, track_recall=track)
        runs[refresh, track], _ = teacher_forced(tiny_mla, IDS, 45, cfg, page_size=8, prefill_chunk=16)
    assert torch.equal(runs[3, False], runs[3, True])
    assert not torch.equal(runs[3, False], runs[1, False])


HISTORY_CASES = {  # name: SparseConfig kwargs (decoded over IDS[:53]: 45 prompt tokens, 7 steps, pages of 8)
    "last-step-refresh3": dict(policy="last-step", budget=3, refresh=3, track_recall=True),
    "predictor-refresh2": dict(policy="predictor", budget=3, refresh=2, predictor="random", track_recall=True),
    "last-step-dense-refresh3": dict(policy="last-step", budget=3, refresh=3, dense_refresh=True, track_recall=True),
}


def _random_predictor(page_size: int = 8):
    g = torch.Generator().manual_seed(5)
    model = AttentionPredictor(PredictorConfig(history=4, channels=4, page_size=page_size))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


_RECORD = SparseAttention._record


def _decode_recording_choices(model, cfg, backend, monkeypatch):
    """teacher_forced over IDS[:53] -> (logits, stats, [(layer, chosen block ids)] in decision order)."""
    from latentkv.sparsity.evaluate import teacher_forced

    choices = []
    record = _RECORD  # the unpatched method (a second call must not wrap the first call's spy)

    def spy(self, layer, ids, n, true):
        choices.append((layer, ids.tolist()))
        return record(self, layer, ids, n, true)

    monkeypatch.setattr(SparseAttention, "_record", spy)
    predictor = _random_predictor() if cfg.policy == "predictor" else None
    logits, stats = teacher_forced(model, IDS[:53], 45, cfg, page_size=8, prefill_chunk=16, backend=backend,
                                   predictor=predictor)
    return logits, stats, choices


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", sorted(HISTORY_CASES))
def test_decode_masses_same_choices_as_separate_pass(tiny_mla, case, backend, monkeypatch):
    """Guards the history taken from the attention pass (history_masses="decode": the Triton
    kernel's per-page masses, or the reference backend's probabilities) against the PyTorch second
    pass it replaces: the same block choice at every (step, layer), the same recall statistics and
    the same logits (the output does not depend on the flag), for last-step and a predictor, with
    refresh > 1 (so steps between refreshes take the attended pages' masses) and with dense refresh
    steps. A mis-normalised, mis-indexed (table column vs block id) or stale masses row changes
    the choices."""
    if backend == "triton":
        pytest.importorskip("triton")
    model = tiny_mla
    if CUDA and backend == "triton":
        import copy

        model = copy.deepcopy(tiny_mla).cuda()
    runs = {}
    for source in ("decode", "separate"):
        cfg = SparseConfig(**HISTORY_CASES[case], history_masses=source)
        runs[source] = _decode_recording_choices(model, cfg, backend, monkeypatch)
    (lg_d, st_d, ch_d), (lg_s, st_s, ch_s) = runs["decode"], runs["separate"]
    assert len(ch_d) == 7 * len(model.model.layers) and ch_d == ch_s
    assert any(len(ids) < 7 for _, ids in ch_d)  # some steps were sparse
    assert st_d["blocks_attended_fraction"] == st_s["blocks_attended_fraction"]
    assert st_d["attention_recall"] == pytest.approx(st_s["attention_recall"], rel=1e-6)
    torch.testing.assert_close(lg_d, lg_s, rtol=1e-6, atol=1e-6)


def test_decode_history_needs_no_separate_pass(tiny_mla, monkeypatch):
    """Guards the point of the kernel masses: with history_masses="decode" and dense refresh steps,
    prefill and decode never call the PyTorch masses pass (block_masses), yet the history is filled
    (every (sequence, layer) has rows, each a distribution over the blocks, zero on blocks not
    attended); the separate-pass reference does call it."""
    import latentkv.sparsity.runtime as runtime
    from latentkv.sparsity.evaluate import decode_after, prefilled

    calls = []
    real = runtime.block_masses
    monkeypatch.setattr(runtime, "block_masses", lambda *a, **k: calls.append(1) or real(*a, **k))
    start = prefilled(tiny_mla, IDS[:53], 45, page_size=8, keep_history=4)
    assert not calls and len(start[0].sparsity.history) == len(tiny_mla.model.layers)
    captured = {}
    init = SparseAttention.__init__

    def keep(self, *a, **k):
        init(self, *a, **k)
        captured["sparsity"] = self

    monkeypatch.setattr(SparseAttention, "__init__", keep)
    cfg = SparseConfig("last-step", budget=3, refresh=3, dense_refresh=True)
    decode_after(tiny_mla, start, IDS[:53], 45, cfg)
    assert not calls
    history = captured["sparsity"].history
    assert len(history) == len(tiny_mla.model.layers)
    for rows in history.values():  # [latent_heads, t, n_blocks]
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:2]))
        assert (rows[:, -1] == 0).any()  # the last step was sparse: unattended blocks hold 0
    decode_after(tiny_mla, start, IDS[:53], 45, SparseConfig("last-step", budget=3, refresh=3,
                                                              history_masses="separate"))
    assert calls


# ---------------------------------------------------------------------------------------------
# blocks chosen per latent head (GLA, SparseConfig.per_latent_head)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gla(tiny_converted):
    from latentkv.modeling import load_model

    return load_model(tiny_converted("gla", kv_budget=0.5, latent_heads=2))


PER_HEAD_CASES = {  # name: SparseConfig kwargs (IDS: 45 prompt tokens, 15 decode steps, pages of 8)
    "last-step-attended-history": dict(policy="last-step", budget=3, refresh=1000),  # rows: attended blocks only
    "predictor-refresh4": dict(policy="predictor", budget=3, refresh=4, predictor="random"),
    "quest": dict(policy="quest", budget=3),
    "oracle": dict(policy="oracle", budget=0.5),
    "window": dict(policy="window", budget=3),
}


@pytest.mark.parametrize("case", sorted(PER_HEAD_CASES))
def test_per_latent_head_attends_each_heads_blocks(tiny_gla, case, monkeypatch):
    """Guards per-latent-head sparse decode on a GLA model (2 latent heads) through a whole teacher-forced
    decode: at every step and layer the block table is [1, latent_heads, k] with row c the pages of the
    blocks latent head c chose (ascending, the current block last); the attention output equals dense
    attention in which latent head c sees only its own blocks (each head's blocks from its own history,
    bounds or masses, so the heads' choices differ); a history row taken from the attention covers, per
    head, exactly that head's blocks with that head's masked masses."""
    import latentkv.runtime.decode as decode_mod
    from latentkv.runtime.decode import forward_step
    from latentkv.sparsity.evaluate import prefilled, sparse_copy

    size, prompt = 8, 45
    cfg = SparseConfig(**PER_HEAD_CASES[case], per_latent_head=True)
    start = prefilled(tiny_gla, IDS, prompt, page_size=size, prefill_chunk=16, keep_history=4)
    cache, seq, _, sparse = sparse_copy(start, cfg, _random_predictor() if cfg.policy == "predictor" else None)
    want = {}  # the masked dense reference of the step in flight
    seen = {"steps": 0, "differ": 0, "history_rows": 0}
    select, record, attend = sparse.select, sparse.record, decode_mod.decode_attention

    def checked_select(module, q, kv, step):
        table, lens, max_len = select(module, q, kv, step)
        lh, length = module.latent_heads, int(step["seq_lens"][0])
        n = -(-length // size)
        full = step["block_table"][0, :n].cpu()
        ids = sparse.last_choice[seq, module.layer_idx]
        assert lh == 2 and ids.shape == (lh, cfg.blocks_for(n)) and table.shape == (1, lh, ids.shape[-1])
        assert torch.equal(table[0].cpu().long(), full[ids].long()) and bool((ids[:, -1] == n - 1).all())
        assert int(lens[0]) == (ids.shape[-1] - 1) * size + length - (n - 1) * size
        want["out"], want["masses"] = tiny_models.masked_attention_reference(
            q[0, 0].cpu(), kv.cpu(), full, length, ids, size, lh, module.rope_dim, module.scaling, return_masses=True)
        want["ids"] = ids
        seen["differ"] += not torch.equal(ids[0], ids[1])
        return table, lens, max_len

    def checked_attention(q, kv, table, lens, **kw):
        result = attend(q, kv, table, lens, **kw)
        out = result[0] if isinstance(result, tuple) else result
        torch.testing.assert_close(out[0, 0].cpu().double(), want["out"], rtol=1e-4, atol=1e-5)
        seen["steps"] += 1
        return result

    def checked_record(layer, masses):
        pending = sparse.wants_masses
        record(layer, masses)
        row = sparse.history[seq, layer][:, -1]  # [latent_heads, n]
        if pending and row.shape[-1] > want["ids"].shape[-1]:  # a sparse step: the row covers the attended blocks
            for c, ids in enumerate(want["ids"]):
                assert set(row[c].nonzero().flatten().tolist()) == set(ids.tolist())
                torch.testing.assert_close(row[c, ids].double(), want["masses"][c, ids], rtol=1e-4, atol=1e-6)
            seen["history_rows"] += 1

    sparse.select, sparse.record = checked_select, checked_record
    monkeypatch.setattr(decode_mod, "decode_attention", checked_attention)
    for t in range(prompt, len(IDS) - 1):
        forward_step(tiny_gla, cache, [seq], torch.tensor([[IDS[t]]]))
    layers = len(cache.pages)
    assert seen["steps"] == (len(IDS) - 1 - prompt) * layers
    if cfg.policy != "window":  # the window is one page set for every head by construction
        assert seen["differ"] > 0
    if cfg.needs_history:
        assert seen["history_rows"] > 0


def test_per_latent_head_kernel_and_history_sources_agree(tiny_gla, monkeypatch):
    """Guards the per-latent-head table through the Triton kernel and both history sources: a last-step
    policy choosing per latent head (refresh 3) makes the same choices at every (step, layer) with the
    kernel's per-page masses, the reference backend's, and the separate PyTorch pass over each head's
    blocks, with the same logits."""
    pytest.importorskip("triton")
    runs = {}
    for backend, source in (("reference", "separate"), ("reference", "decode"), ("triton", "decode")):
        if backend == "triton" and CUDA:
            continue  # compiled Triton reads CUDA tensors only; the kernel itself is tested in test_kernels.py
        cfg = SparseConfig("last-step", budget=3, refresh=3, history_masses=source, per_latent_head=True)
        runs[backend, source] = _decode_recording_choices(tiny_gla, cfg, backend, monkeypatch)
    (lg_ref, st_ref, ch_ref) = runs["reference", "separate"]
    assert any(len(ids) == 2 and ids[0] != ids[1] for _, ids in ch_ref)  # [latent_heads, k] choices that differ
    for key, (lg, st, ch) in runs.items():
        assert ch == ch_ref, key
        assert st["blocks_attended_fraction"] == st_ref["blocks_attended_fraction"]
        torch.testing.assert_close(lg, lg_ref, rtol=KERNEL_RTOL, atol=KERNEL_RTOL * float(lg_ref.abs().max()))


def test_per_latent_head_changes_nothing_with_one_latent_head(tiny_mla):
    """Guards the option's scope: on an MLA model (one latent head) per_latent_head decodes bit-identically
    to the shared choice."""
    from latentkv.sparsity.evaluate import teacher_forced

    runs = [teacher_forced(tiny_mla, IDS[:53], 45, SparseConfig("last-step", budget=3, per_latent_head=flag),
                           page_size=8, prefill_chunk=16)[0] for flag in (False, True)]
    assert torch.equal(*runs)


def test_cli_sparse_eval_per_head(tiny_converted):
    """Guards `eval --sparse-per-head` end to end on a tiny GLA model: the report comes from the policy
    choosing per latent head (the budgeted fraction of blocks, recall in (0, 1]); with --long-text --offload
    it decodes through host pages (pools sized for the heads' union) and last-step misses nothing."""
    import json

    from typer.testing import CliRunner

    from latentkv.cli import app

    folder = str(tiny_converted("gla", kv_budget=0.5, latent_heads=2))
    runner = CliRunner()
    res = runner.invoke(app, ["eval", folder, "--eval-text", str(tiny_models.TINY_TEXT), "--eval-window", "40",
                              "--eval-windows", "1", "--decode-tokens", "9", "--sparse", "last-step",
                              "--sparse-budget", "2", "--sparse-per-head", "--page-size", "8", "--json"])
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]
    sparse = json.loads(last[last.index('{"model"') :])["sparse"]
    assert sparse["per_latent_head"] and sparse["blocks_attended_fraction"] < 1
    assert 0 < sparse["attention_recall"] <= 1
    off = runner.invoke(app, ["eval", folder, "--sparse", "last-step", "--sparse-budget", "3", "--sparse-per-head",
                              "--page-size", "8", "--long-text", str(tiny_models.TINY_TEXT), "--context-tokens", "200",
                              "--long-span", "8", "--offload", "--json"])
    assert off.exit_code == 0, off.output
    last = off.output.strip().splitlines()[-1]
    row = json.loads(last[last.index("{") :])["teacher_forced"][1]
    assert row["policy"] == "last-step" and row["per_latent_head"]
    assert row["tokens"] == 8 and row["offload"]["pages_missed"] == 0 and row["blocks_attended_fraction"] < 1


def test_cli_sparse_eval_refresh(tiny_mla_dir):
    """Guards `eval --sparse-refresh R --sparse-dense-refresh`: the period and the dense refresh reach the
    SparseConfig the decode runs (the report says so), the sparse steps still attend the budget, and a
    period below 1 is the one-line LatentKVError, not a traceback."""
    import json

    from typer.testing import CliRunner

    from latentkv.cli import app

    runner = CliRunner()
    common = ["eval", str(tiny_mla_dir), "--eval-text", str(tiny_models.TINY_TEXT), "--eval-window", "40",
              "--eval-windows", "1", "--decode-tokens", "9", "--sparse", "last-step", "--sparse-budget", "2",
              "--page-size", "8"]
    res = runner.invoke(app, [*common, "--sparse-refresh", "4", "--sparse-dense-refresh", "--json"])
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]
    sparse = json.loads(last[last.index('{"model"') :])["sparse"]
    assert sparse["refresh"] == 4 and sparse["dense_refresh"] is True
    assert 2 / 6 < sparse["blocks_attended_fraction"] < 1  # 2 of 9 steps dense, the rest 2 blocks of 6
    bad = runner.invoke(app, [*common, "--sparse-refresh", "0"])
    assert bad.exit_code == 2 and "refresh must be >= 1" in bad.output and "Traceback" not in bad.output


def test_dense_refresh_steps_attend_every_block(tiny_mla, monkeypatch):
    """Guards the offload-compatible regime (refresh=R, dense_refresh): every R-th decode step attends
    every block of every layer, and the other steps only the budget."""
    cfg = SparseConfig("last-step", budget=3, refresh=3, dense_refresh=True)
    _, _, choices = _decode_recording_choices(tiny_mla, cfg, "reference", monkeypatch)
    layers = len(tiny_mla.model.layers)
    assert len(choices) == 7 * layers
    for i in range(1, 8):  # decode step i holds 45 + i tokens: ceil((45 + i) / 8) blocks of 8
        n = -(-(45 + i) // 8)
        for layer, ids in choices[(i - 1) * layers : i * layers]:
            if i % 3 == 0:
                assert ids == list(range(n)), (i, layer)
            else:
                assert len(ids) == 3 < n, (i, layer)


def test_per_latent_head_policy_scores():
    """Guards the per-head scores: each latent head's row is what the shared choice would compute from
    that head alone (last-step, oracle, quest bounds over its own query heads), and choose_blocks picks a
    row of blocks per head under the same contract (forced blocks, ascending, k each)."""
    from latentkv.sparsity.policies import bound_scores

    g = torch.Generator().manual_seed(3)
    n, lh, heads, r_c, rope = 12, 2, 4, 8, 4
    history = torch.softmax(torch.randn(lh, 3, n, generator=g) * 3, -1)
    current = torch.softmax(torch.randn(lh, n, generator=g) * 3, -1)
    for policy in ("last-step", "oracle"):
        cfg = SparseConfig(policy, budget=4)
        per_head = policy_scores(cfg, n, history, current, latent_heads=lh)
        for c in range(lh):
            alone = policy_scores(cfg, n, history[c : c + 1], current[c : c + 1])
            torch.testing.assert_close(per_head[c], alone)
        ids = choose_blocks(per_head, 4)
        assert ids.shape == (lh, 4)
        for c in range(lh):
            assert torch.equal(ids[c], choose_blocks(per_head[c], 4))
    q = torch.randn(heads, r_c + rope, generator=g)
    rows = torch.randn(n, 5, lh * r_c + rope, generator=g)
    low, high = rows.amin(1), rows.amax(1)
    for scale in (None, 0.3):
        per_head = bound_scores(q, low, high, lh, rope, scale, per_latent_head=True)
        for c in range(lh):
            heads_c = slice(c * heads // lh, (c + 1) * heads // lh)
            cols = torch.cat([torch.arange(c * r_c, (c + 1) * r_c), torch.arange(lh * r_c, lh * r_c + rope)])
            alone = bound_scores(q[heads_c], low[:, cols], high[:, cols], 1, rope, scale)
            torch.testing.assert_close(per_head[c], alone)
    window = choose_blocks(policy_scores(SparseConfig("window", budget=4), n, None, None, latent_heads=lh), 4)
    assert torch.equal(window, torch.tensor([[0, 9, 10, 11]] * lh))


def test_predictor_page_size_mismatch(tmp_path):
    """Guards a silent misuse: a predictor trained on blocks of 16 refuses a cache of pages of 8."""
    with pytest.raises(LatentKVError, match="--page-size 16"):
        SparseAttention(SparseConfig("predictor", predictor="x"), 8, AttentionPredictor(PredictorConfig(page_size=16)))


# ---------------------------------------------------------------------------------------------
# the predictor
# ---------------------------------------------------------------------------------------------
def test_predictor_save_load_round_trip(tmp_path):
    """Guards the saved format: a reloaded predictor gives identical forecasts, its config survives,
    and nothing but the two files is left (no temporary files)."""
    model = AttentionPredictor(PredictorConfig(history=6, channels=5, page_size=8))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    save_predictor(model, tmp_path / "pred", extra={"note": "test"})
    again = load_predictor(tmp_path / "pred")
    hist = torch.softmax(torch.randn(3, 4, 11), -1)
    assert again.config == model.config
    assert torch.equal(again.predict(hist), model.eval().predict(hist))
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["attention_predictor.json",
                                                                    "attention_predictor.safetensors"]


def test_load_predictor_errors(tmp_path):
    """Guards missing and mismatched predictor files: clear errors naming the fix."""
    with pytest.raises(LatentKVError, match="latentkv predictor train"):
        load_predictor(tmp_path)
    save_predictor(AttentionPredictor(PredictorConfig(channels=4)), tmp_path / "p")
    cfg = (tmp_path / "p" / "attention_predictor.json")
    cfg.write_text(cfg.read_text().replace('"channels": 4', '"channels": 6'))
    with pytest.raises(LatentKVError, match="does not match"):
        load_predictor(tmp_path / "p")


def test_untrained_predictor_is_last_step():
    """Guards the starting point of training: before any step the predictor's forecast is the last
    step's masses (normalised), so it chooses exactly what last-step chooses."""
    model = AttentionPredictor(PredictorConfig(history=6, channels=5))
    hist = torch.softmax(3 * torch.randn(4, 6, 40), -1).clamp_min(1e-5)
    hist = hist / hist.sum(-1, keepdim=True)
    pred = model.predict(hist)
    torch.testing.assert_close(pred, hist[:, -1], rtol=1e-4, atol=1e-7)
    for row in range(4):
        assert torch.equal(choose_blocks(pred[row], 9), choose_blocks(hist[row, -1], 9))


def test_keep_last_step_never_ranks_a_block_below_its_last_mass():
    """Guards the forecast's floor: whatever the weights, every block's forecast mass is at least its
    normalised last-step mass over the forecast's normaliser, so a block with more last-step mass than
    the whole chosen set's weakest forecast is kept; without the option (older predictors) no floor.
    Seeded draws (large random weights can overflow an unfloored CNN's logits)."""

    def floor_holds(seed: int, std: float, keep: bool) -> bool:
        g = torch.Generator().manual_seed(seed)
        hist = torch.softmax(4 * torch.randn(5, 6, 30, generator=g), -1)
        model = AttentionPredictor(PredictorConfig(history=6, channels=4, keep_last_step=keep))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(std=std, generator=g)
            envelope = model(model.feature(hist)).exp()  # unnormalised forecast
        assert bool(envelope.isfinite().all())
        last = hist[:, -1].clamp_min(1e-6)
        last = last / last.sum(-1, keepdim=True)
        return bool((envelope >= last * (1 - 1e-5)).all())

    assert all(floor_holds(seed, std, True) for seed in range(4) for std in (1.0, 3.0))
    assert not all(floor_holds(seed, 1.0, False) for seed in range(4))


def test_older_predictor_files_load_without_the_floor(tmp_path):
    """Guards compatibility: a predictor saved before ``keep_last_step`` existed loads as it was
    trained (no floor), a new one keeps its setting."""
    import json

    save_predictor(AttentionPredictor(PredictorConfig(channels=4)), tmp_path / "new")
    assert load_predictor(tmp_path / "new").config.keep_last_step
    cfg = tmp_path / "new" / "attention_predictor.json"
    raw = json.loads(cfg.read_text())
    del raw["keep_last_step"]
    cfg.write_text(json.dumps(raw))
    assert not load_predictor(tmp_path / "new").config.keep_last_step


def test_with_repeats_copies_spans_forward():
    """Guards the copy augmentation of training windows: each repeated span is an exact copy of an
    earlier span of the same window, placed after it; no repeats leaves the windows as they were, and
    the same seed gives the same windows."""
    from latentkv.sparsity.train import with_repeats

    windows = torch.arange(2 * 400).reshape(2, 400)  # every token distinct: copies are detectable
    assert torch.equal(with_repeats(windows, 0, 20, 0), windows)
    out = with_repeats(windows, 3, 20, 0)
    assert torch.equal(out, with_repeats(windows, 3, 20, 0)) and out.shape == windows.shape
    for row, orig in zip(out, windows):
        moved = (row != orig).nonzero().flatten()
        assert len(moved) > 0
        for i in moved.tolist():  # every changed token is an earlier token of the window
            src = int(row[i] - orig[0])
            assert src < i and orig[src] == row[i]


def _pattern_maps(count: int, length: int = 160, page: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Synthetic block-mass maps: a sink stripe, a fixed heavy stripe, and a diagonal that moves one
    block forward every step (a re-read that last-step always misses by one block)."""
    g = torch.Generator().manual_seed(seed)
    maps = []
    for _ in range(count):
        n = length // page
        m = torch.zeros(length, n)
        stripe = int(torch.randint(1, n // 2, (1,), generator=g))
        start = int(torch.randint(0, 5, (1,), generator=g))
        for t in range(length):
            alive = t // page + 1
            m[t, 0] += 0.3
            m[t, min(stripe, alive - 1)] += 0.2
            m[t, min((start + t) % max(1, alive - 1), alive - 1)] += 0.4
            m[t, alive - 1] += 0.1
            m[t, :alive] += 1e-3 * torch.rand(alive, generator=g)
            m[t] /= m[t].sum()
        maps.append(m.half())
    return maps


def test_training_learns_temporal_pattern():
    """Guards the training loop on a pattern with a known answer: the loss falls, and the trained
    predictor beats last-step on recall because it learns that the diagonal moves one block per step."""
    from latentkv.sparsity.train import fit

    maps = _pattern_maps(12)
    model, report = fit(maps[:10], maps[10:], PredictorConfig(history=4, channels=6, page_size=4), steps=150,
                        batch_size=32, lr=1e-2, budget=0.1, seed=0)
    curve = report["loss_curve"]
    assert curve[-1]["val_loss"] < 0.7 * curve[0]["val_loss"], curve
    assert report["val_recall_predictor"] > report["val_recall_last_step"] + 0.1, report


def test_recall_objective_scores_the_kept_mass():
    """Guards the "recall" objective: it is lowest when the logits' top-k (k = the budget's free
    blocks) holds the heavy blocks, one minus the kept mass (+ 0.1 x the cross-entropy); training on
    it beats last-step on the moving-diagonal pattern too (by less than the cross-entropy does in 150 steps), and its report gives every budget asked."""
    from latentkv.sparsity.train import _loss, fit

    class Fixed(torch.nn.Module):  # a "predictor" returning given logits
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def feature(self, x):
            return x

        def forward(self, x):
            return self.logits

    y = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05, 0.0]])  # blocks 1..4 rankable; 6 blocks exist
    rankable = torch.tensor([[False, True, True, True, True, False]])
    n_exist = torch.tensor([6])
    x = torch.zeros(1, 2, 6)
    good = torch.tensor([[0.0, 9.0, -9.0, 8.0, -9.0, 0.0]])  # top-2 free blocks: 1 and 3 (0.8 of 0.9)
    bad = torch.tensor([[0.0, -9.0, 9.0, -9.0, 8.0, 0.0]])
    budget = 4 / 6  # 4 blocks: sink + current + 2 free
    for logits, kept in ((good, 0.8 / 0.9), (bad, 0.1 / 0.9)):  # of the 0.9 on the rankable blocks
        recall = _loss(Fixed(logits), x, y, rankable, n_exist, budget, "recall")
        ce = _loss(Fixed(logits), x, y, rankable, n_exist, budget, "ce")
        assert float(recall - 0.1 * ce) == pytest.approx(1 - kept, abs=1e-3)
    with pytest.raises(LatentKVError, match="objective"):
        fit(_pattern_maps(2), _pattern_maps(1), PredictorConfig(history=4), steps=1, batch_size=2, lr=1e-3,
            budget=0.1, seed=0, objective="mse")
    maps = _pattern_maps(12)
    _, report = fit(maps[:10], maps[10:], PredictorConfig(history=4, channels=6, page_size=4), steps=150,
                    batch_size=32, lr=1e-2, budget=0.1, seed=0, objective="recall", report_budgets=(0.1, 0.2))
    assert report["val_recall_predictor"] > report["val_recall_last_step"] + 0.03, report  # measured: 0.628 vs 0.571
    assert set(report["val_recall"]) == {"0.1", "0.2"} and report["objective"] == "recall"


def test_cli_train_and_sparse_eval(tiny_mla_dir, tmp_path):
    """Guards the two commands end to end on a tiny model: `predictor train` collects, trains and
    writes a loadable predictor (and refuses a non-empty --out), `eval --sparse predictor` reports
    recall / agreement / KL, and a bad --sparse-budget fails before any work with a one-line error."""
    import json

    from typer.testing import CliRunner

    from latentkv.cli import app

    runner = CliRunner()
    out = tmp_path / "pred"
    args = ["predictor", "train", str(tiny_mla_dir), "--out", str(out), "--data", str(tiny_models.TINY_TEXT),
            "--windows", "3", "--seq-len", "64", "--page-size", "8", "--history", "4", "--steps", "4"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert load_predictor(out).config == PredictorConfig(history=4, channels=8, page_size=8)
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    res = runner.invoke(app, ["eval", str(tiny_mla_dir), "--eval-text", str(tiny_models.TINY_TEXT), "--eval-window",
                              "40", "--eval-windows", "1", "--decode-tokens", "9", "--sparse", "predictor",
                              "--sparse-budget", "2", "--predictor", str(out), "--page-size", "8", "--json"])
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]  # stderr (progress bars) shares the runner's output
    sparse = json.loads(last[last.index('{"model"') :])["sparse"]
    assert sparse["tokens"] == 9 and 0 < sparse["attention_recall"] <= 1 and 0 <= sparse["top1_agreement"] <= 1
    assert sparse["blocks_attended_fraction"] < 1 and sparse["kl_to_dense"] >= 0
    bad = runner.invoke(app, ["eval", str(tiny_mla_dir), "--sparse", "window", "--sparse-budget", "0"])
    assert bad.exit_code == 2 and "budget" in bad.output


# ---------------------------------------------------------------------------------------------
# histories recorded under sparse refreshes, replayed over dense maps (training on them)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_mla_head_per_latent(tiny_converted):
    """Every query head its own latent head: a map's per-latent-head masses are then one query
    head's, so a replayed partial row is exactly the runtime's (histories.py)."""
    from latentkv.modeling import load_model

    return load_model(tiny_converted("mla", kv_budget=0.5, latent_heads=4))


def _recorded_history(model, cfg, predictor=None):
    """Decode IDS (45 prompt tokens, then one per step, pages of 8) under ``cfg`` keeping every history
    row: -> (SparseAttention.history, [(layer, chosen ids)] in decision order)."""
    from latentkv.runtime.decode import PagedLatentCache, forward_step, prefill

    cache = PagedLatentCache.for_model(model, max_seqs=1, max_seq_len=len(IDS), page_size=8, backend="reference")
    cache.sparsity = SparseAttention(cfg, 8, predictor, keep_history=None)
    seq = cache.add_sequence()
    prefill(model, cache, seq, IDS[:45], 16)
    choices = []
    for t in range(45, len(IDS)):
        forward_step(model, cache, [seq], torch.tensor([[IDS[t]]]))
        choices.append(cache.sparsity.last_choice[seq, 0])
    return cache.sparsity.history, choices


REPLAY_CASES = {  # name: SparseConfig kwargs (45 prompt tokens, 16 decode steps of up to 8 blocks, budget 3)
    "last-step-refresh3": dict(policy="last-step", budget=3, refresh=3),
    "predictor-refresh4": dict(policy="predictor", budget=3, refresh=4, predictor="random"),
    "predictor-dense-refresh2": dict(policy="predictor", budget=3, refresh=2, dense_refresh=True, predictor="random"),
    "last-step-separate-refresh5": dict(policy="last-step", budget=4, refresh=5, history_masses="separate"),
}


@pytest.mark.parametrize("case", sorted(REPLAY_CASES))
def test_replayed_history_equals_the_recorded_one(tiny_mla_head_per_latent, case):
    """Guards the training histories of --refresh: ``histories.rollout`` over the dense maps of a
    decode gives the history ``SparseAttention`` records in a real sparse decode of it (the first
    layer, whose queries a sparse step leaves as they are): the same blocks chosen at every step,
    the prefill rows and the refresh rows bit for bit, the partial rows (the attended blocks' masses,
    renormalised, zero elsewhere) to float rounding -- for last-step and a predictor, sparse and dense
    refresh steps, masses from the attention pass and from the separate pass."""
    from latentkv.sparsity.histories import rollout

    cfg = SparseConfig(**REPLAY_CASES[case])
    predictor = _random_predictor() if cfg.policy == "predictor" else None
    dense, _ = _recorded_history(tiny_mla_head_per_latent, SparseConfig("dense"))
    recorded, choices = _recorded_history(tiny_mla_head_per_latent, cfg, predictor)
    maps = dense[0, 0][None]  # [1 (sequence, layer), latent_heads, 61 rows, 8 blocks]
    steps = len(IDS) - 45
    replayed = rollout(maps, 45, steps, cfg, 8, predictor)
    assert [ids.tolist() for ids in choices] == [ids[0].tolist() for ids in replayed.chosen]
    assert any(len(ids) < 8 for ids in choices)  # some steps were sparse
    rows = recorded[0, 0]  # [latent_heads, 61, 8]
    assert torch.equal(rows[:, :45], maps[0, :, :45])
    for i in range(1, steps + 1):
        full = i % cfg.refresh == 0 or len(choices[i - 1]) == 8
        got, want = replayed.rows[0, :, i - 1], rows[:, 44 + i]
        if full:
            assert torch.equal(got, want), i
        else:
            assert (want == 0).any() and torch.equal(got == 0, want == 0), i
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_refresh_1_trains_on_the_same_examples_as_before(monkeypatch):
    """Guards --refresh 1 (the default) against any change to training: the batches fit trains and
    validates on are byte-identical to those of the trainer before --refresh existed (their sha256,
    recorded with it), and a replayed decode with a refresh every step records the maps' own rows."""
    import hashlib

    import latentkv.sparsity.train as train
    from latentkv.sparsity.histories import rollout

    digests = []
    real = train._loss

    def spy(model, x, y, rankable, n_exist=None, *args):
        data = b"".join(t.numpy().tobytes() for t in (x, y, rankable, n_exist))
        digests.append(hashlib.sha256(data).hexdigest()[:16])
        return real(model, x, y, rankable, n_exist, *args)

    monkeypatch.setattr(train, "_loss", spy)
    maps = _pattern_maps(12)
    train.fit(maps[:10], maps[10:], PredictorConfig(history=4, channels=6, page_size=4), steps=3, batch_size=32,
              lr=1e-2, budget=0.1, seed=0, refresh=1)
    # training batch, validation set, alternately (validation every step when steps < 10)
    assert digests[:6] == ["da037afff5d41bc1", "ccf59fd6652be948", "ebbd7f9e8bc7cfed", "ccf59fd6652be948",
                           "145b631f86925ff9", "ccf59fd6652be948"]
    stacked = torch.stack(maps[:4]).float()[:, None]  # [4, 1, 160, 40]
    for policy in ("last-step", "predictor"):
        cfg = SparseConfig(policy, budget=0.1, refresh=1, predictor="random")
        replayed = rollout(stacked, 40, 100, cfg, 4, _random_predictor(4) if policy == "predictor" else None)
        assert torch.equal(replayed.rows, stacked[:, :, 40:140])



def test_refresh_trains_on_the_partial_histories_it_decodes_from():
    """Guards --refresh > 1: the training histories are replayed decodes -- rows off the refresh steps
    hold only the attended blocks (zero on others that exist), each row a distribution over its
    blocks, the targets the dense masses -- and fit reports each policy's recall on its own replayed
    decode of the validation maps, at every budget asked."""
    from latentkv.sparsity.train import OnPolicyHistories, Replay, fit

    maps = _pattern_maps(6)
    config = PredictorConfig(history=4, channels=4, page_size=4)
    histories = OnPolicyHistories(maps[:4], 1, config, refresh=4, budget=0.1, starts=2, steps=24,
                                  gen=torch.Generator().manual_seed(0))
    x, y, rankable, n_exist = histories.sample(256)
    torch.testing.assert_close(x.sum(-1), torch.ones(x.shape[:2]), atol=2e-2, rtol=0)
    existed = torch.arange(x.shape[-1])[None] < (n_exist - 1)[:, None]  # blocks the last row's step had
    assert ((x[:, -1] == 0) & existed).any(-1).float().mean() > 0.5  # most last rows are partial (3 steps of 4)
    assert (y[existed] > 0).all()  # the targets are dense
    _, report = fit(maps[:4], maps[4:], config, steps=12, batch_size=16, lr=1e-2, budget=0.1, seed=0, refresh=4,
                    report_budgets=(0.1, 0.2), replay=Replay(starts=2, steps=24, every=5, val_starts=2, val_steps=24))
    assert report["val_refresh"] == 4 and set(report["val_recall"]) == {"0.1", "0.2"}
    assert all(0 < r <= 1 for r in report["val_recall"]["0.2"].values())


def test_cli_train_with_refresh(tiny_mla_dir, tmp_path):
    """Guards `predictor train --refresh --budget` end to end: the predictor trains on replayed
    refresh-2 histories and its file records the refresh and the on-policy validation recall;
    a window too short for the replay fails before any work with a one-line error."""
    import json

    from typer.testing import CliRunner

    from latentkv.cli import app

    runner = CliRunner()
    out = tmp_path / "pred"
    args = ["predictor", "train", str(tiny_mla_dir), "--out", str(out), "--data", str(tiny_models.TINY_TEXT),
            "--windows", "3", "--seq-len", "96", "--page-size", "8", "--history", "4", "--steps", "4",
            "--refresh", "2", "--budget", "0.3"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "attention_predictor.json").read_text())
    assert saved["trained_on"]["refresh"] == 2 and saved["report"]["val_refresh"] == 2
    assert 0 < saved["report"]["val_recall_predictor"] <= 1
    short = runner.invoke(app, args[:10] + ["64"] + args[11:] + ["--overwrite"])
    assert short.exit_code != 0 and "--seq-len" in short.output
