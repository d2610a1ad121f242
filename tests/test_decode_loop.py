"""The paged decode loop (latentkv.runtime.decode) computes what the converted model computes.

Tiny Llama converted to MLA and to GLA (kv_budget 0.5: per-layer ranks, rope_dim 4 / 2 / 0), run
through the paged latent cache with the reference backend and with the Triton kernel (interpreted
on the CPU: conftest sets TRITON_INTERPRET=1 when there is no GPU; compiled on a GPU).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import tiny_models

from latentkv.errors import LatentKVError

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
METHODS = {"mla": dict(kv_budget=0.5), "gla": dict(kv_budget=0.5, latent_heads=2), "gta": dict(),
           "gta-s": dict(map_heads=2)}
PROMPT = "To be, or not to be, that is the question"


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    """Factory: converted("mla" | "gla" | "gta", arch="llama") -> output folder (converted once per module)."""
    from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert

    built = {}

    def make(method: str, arch: str = "llama"):
        if (method, arch) not in built:
            root = tmp_path_factory.mktemp(f"decode_{method}_{arch}")
            convert(ConvertOptions(
                source=str(tiny_model_dir(arch)), output=str(root / "out"), method=method,
                method_options=METHODS[method],
                calib=CalibOptions(data=str(tiny_models.TINY_TEXT), samples=8, seq_len=64, cache=str(root / "cache")),
            ))  # fmt: skip
            built[method, arch] = root / "out"
        return built[method, arch]

    return make


def _load(folder, dtype=torch.float32):
    from transformers import AutoTokenizer

    from latentkv.modeling import load_model

    return load_model(folder, dtype=dtype, device=DEVICE), AutoTokenizer.from_pretrained(folder)


def _triton_or_skip():
    pytest.importorskip("triton", reason="triton not installed")
    md = importlib.import_module("latentkv.kernels.mla_decode")
    if not CUDA and type(md._kernels()[0]).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported in compiled mode without a GPU; run with TRITON_INTERPRET=1")


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decode_check_passes(converted, method, backend):
    """Guards the absorbed paged path (W_UK folded into q, W_UV on the latent output, RoPE key in
    the cache row, page tables, chunked prefill with several query tokens, GLA head-to-latent
    mapping; GTA-S: map keys in the row's key slots, each query head zero outside its map head's
    slot, the gated per-head decoder after the kernel): its logits at every position must equal one full forward in float32 (rel 1e-4; 5e-3
    for the kernel compiled on a GPU, whose float32 dots run in TF32),
    with identical greedy tokens, over 40 generated tokens crossing several 16-token pages."""
    if backend == "triton":
        _triton_or_skip()
    from latentkv.eval.decode_check import decode_check

    model, tok = _load(converted(method))
    report = decode_check(model, tok, PROMPT, num_tokens=40, backend=backend, page_size=16, prefill_chunk=8,
                          max_prompt_tokens=12, num_splits=2 if backend == "triton" else None)
    assert report["passed"], report
    assert report["backend"] == backend
    if CUDA and backend == "triton":  # compiled: the kernel's float32 dots run in TF32
        assert report["max_rel"] < 5e-3 and report["unexplained_mismatches"] == 0, report
    else:
        assert report["max_rel"] < 1e-4 and report["token_mismatches"] == 0, report
        assert report["hf_cache_first_divergence"] is None, report
    assert len(report["tokens"]) == 40 and report["prompt_tokens"] == 12


@pytest.mark.parametrize("arch,backend", [("gemma", "reference"), ("phi3", "reference"), ("gpt_neox", "triton"),
                                          ("gpt_neox-serial", "reference"), ("phi3-partial", "triton"),
                                          ("qwen3", "reference"), ("gemma2", "triton"), ("gemma2", "reference"),
                                          ("gemma3_text", "reference"), ("smollm3", "reference"), ("olmo2", "triton"),
                                          ("mistral-head-dim", "reference")])
def test_decode_check_other_architectures(converted, arch, backend):
    """Guards the loop that calls embeddings, layers and norm itself on other decoder layers: Gemma's
    sqrt(hidden) embedding scale (inside transformers' embedding module since 5.x) and (1 + w) norms,
    Phi-3's layer around a converted fused-QKV attention, GPT-NeoX's decoder under its own names
    (gpt_neox.embed_in, final_layer_norm, `attention`, parallel or serial residual) and partial rotary
    (RoPE keys of widths that are no power of two, through the kernel), Qwen3's qk_norm layers (the
    latent read from the normalised keys, the query map after q_norm); Gemma 2's soft-capped scores and
    logits and Gemma 2/3's 16-token sliding windows (36 tokens decoded: the kernel's window mask),
    Gemma 3's local and global RoPE, SmolLM3's layer without a RoPE key, OLMo-2's norms over all heads
    and a head dim that is not hidden / heads; else the logits differ from the full forward."""
    from latentkv.eval.decode_check import decode_check

    if backend == "triton":
        _triton_or_skip()
    model, tok = _load(converted("mla", arch))
    report = decode_check(model, tok, PROMPT, num_tokens=24, backend=backend, page_size=16, prefill_chunk=8,
                          max_prompt_tokens=12)
    assert report["passed"], report
    if CUDA and backend == "triton":  # compiled: the kernel's float32 dots run in TF32
        assert report["max_rel"] < 5e-3 and report["unexplained_mismatches"] == 0, report
    else:
        assert report["max_rel"] < 1e-4 and report["token_mismatches"] == 0, report


def test_decode_check_bfloat16(converted):
    """Guards the dtype handling of the loop (cache rows, kernel query and W_UV product in the model
    dtype) and the bf16 tolerance: a bf16 model passes at rel 2e-2."""
    from latentkv.eval.decode_check import decode_check

    model, tok = _load(converted("mla"), dtype=torch.bfloat16)
    report = decode_check(model, tok, PROMPT, num_tokens=16, backend="reference", page_size=16,
                          max_prompt_tokens=8, hf_cache=False)
    assert report["dtype"] == "bfloat16" and report["rtol"] == 2e-2
    assert report["passed"], report


def test_decode_check_detects_wrong_attention(converted, monkeypatch):
    """Guards against a vacuous check: an attention output off by 1% must fail it."""
    import latentkv.runtime.decode as dec
    from latentkv.eval.decode_check import decode_check

    real = dec.decode_attention
    monkeypatch.setattr(dec, "decode_attention", lambda *a, **k: real(*a, **k) * 1.01)
    model, tok = _load(converted("mla"))
    report = decode_check(model, tok, PROMPT, num_tokens=6, backend="reference", max_prompt_tokens=8,
                              hf_cache=False)
    assert not report["passed"] and report["max_rel"] > 1e-4, report


def test_batch_equals_single_prompts(converted):
    """Guards per-sequence lengths in a batch: two prompts of different lengths decoded together
    (interleaved pages, different seq_lens and positions in one kernel call) give the same tokens
    and logits as each prompt decoded alone."""
    _triton_or_skip()
    from latentkv.runtime.decode import generate, generate_ids

    model, tok = _load(converted("gla"))
    prompts = [[5, 77, 31, 200, 9, 14, 150, 3, 99, 42, 61], [17, 88, 4]]
    kw = dict(backend="triton", page_size=8, prefill_chunk=4, return_logits=True)
    batch_tokens, batch_logits = generate_ids(model, prompts, 12, **kw)
    for i, p in enumerate(prompts):
        tokens, logits = generate_ids(model, [p], 12, **kw)
        assert tokens[0] == batch_tokens[i]
        tol = 5e-3 if CUDA else 1e-5  # on a GPU: TF32 dots, and split counts that follow the batch size
        assert torch.allclose(logits[0], batch_logits[i], rtol=tol, atol=tol * float(logits[0].abs().max()))
    gen = generate(model, tok, ["Hi", PROMPT], max_new_tokens=5, backend="reference", stop_at_eos=False)
    assert [len(t) for t in gen.token_ids] == [5, 5] and len(gen.texts) == 2 and gen.new_tokens == 10


def test_eos_stops_one_sequence(converted):
    """Guards the batch bookkeeping when one sequence finishes early: the other goes on alone and
    still matches its own single-prompt decode."""
    from latentkv.runtime.decode import generate_ids

    model, _ = _load(converted("mla"))
    prompts = [[5, 77, 31, 200, 9], [17, 88, 4, 120]]
    free = generate_ids(model, prompts, 8, backend="reference", page_size=4)
    eos = free[0][2]  # the first prompt's third token becomes its stop token
    stopped = generate_ids(model, prompts, 8, backend="reference", page_size=4, eos_token_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    cut = free[1].index(eos) + 1 if eos in free[1] else 8
    assert stopped[1] == free[1][:cut]


def test_dynamic_cache_path_unchanged(converted):
    """Guards the hook's isolation: with transformers' DynamicCache (no `latent_attention`), the
    model's incremental decode still equals its full forward."""
    from latentkv.modeling import cached_forward, new_dynamic_cache

    model, _ = _load(converted("mla"))
    ids = torch.tensor([[5, 77, 31, 200, 9, 14, 150, 3, 99, 42, 61, 8]], device=DEVICE)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = new_dynamic_cache(model.config)
        parts = [cached_forward(model, ids[:, :7], cache).logits]
        for t in range(7, ids.shape[1]):
            parts.append(cached_forward(model, ids[:, t : t + 1], cache).logits)
    inc = torch.cat(parts, dim=1)
    assert torch.allclose(inc, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))


def test_cache_errors(converted, tiny_model_dir):
    """Guards the clear errors: a model without latent attention, a cache out of pages, layers run
    without a step."""
    from latentkv.runtime.decode import PagedLatentCache, forward_step, generate_ids
    from latentkv.modeling import load_model

    with pytest.raises(LatentKVError, match="latentkv format"):
        generate_ids(load_model(tiny_model_dir("llama")), [[1, 2]], 2)
    model, _ = _load(converted("mla"))
    cache = PagedLatentCache.for_model(model, max_seqs=1, max_seq_len=8, page_size=4, backend="reference")
    seq = cache.add_sequence()
    forward_step(model, cache, [seq], torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))
    assert cache.seq_len(seq) == 8 and cache.free_pages() == 0
    with pytest.raises(LatentKVError, match="out of pages"):
        forward_step(model, cache, [seq], torch.tensor([[9]]))
    assert cache.seq_len(seq) == 8
    cache.free_sequence(seq)
    assert cache.free_pages() == 2
    with pytest.raises(LatentKVError, match="begin_step"):
        cache.latent_attention(model.model.layers[0].self_attn, None, None, None, None)


def test_generate_cli_and_tensor_prompt(converted):
    """Guards the entry points the CLI uses: `generate_cli` (folder -> texts) and `decode_check`
    given a token tensor (as `latentkv eval --decode-check` passes an evaluation window)."""
    from latentkv.eval.decode_check import decode_check
    from latentkv.runtime.decode import generate_cli

    folder = converted("mla")
    texts = generate_cli(str(folder), ["Hi", PROMPT], max_new_tokens=4, backend="reference", device=DEVICE)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    model, tok = _load(folder)
    report = decode_check(model, tok, torch.arange(3, 40), num_tokens=4, backend="reference", max_prompt_tokens=16,
                          hf_cache=False)
    assert report["passed"] and report["prompt_tokens"] == 16, report


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method,arch", [("mla", "llama"), ("gla", "llama"), ("gta-s", "llama"), ("gta", "llama"),
                                         ("mla", "gpt_neox"), ("mla", "qwen3"), ("mla", "gemma"), ("mla", "phi3")])
def test_cuda_graph_generation_equals_eager(converted, method, arch, caplog):
    """Guards the captured decode step (CapturedDecodeStep): replaying one CUDA graph per step,
    its static buffers refreshed from the page bookkeeping and its split count fixed at capture,
    must give the eager loop's tokens and (up to TF32 rounding) logits for prompts of different
    lengths whose sequences cross several pages, for every latent layer kind and the other decoder
    layers (GPT-NeoX, Qwen3's qk_norm, Gemma, Phi-3); a stale table, position or row buffer, or a
    value read on the host at capture time, shows up as different tokens. With an EOS that stops one
    sequence mid-way, the step the graph launched before the host saw that token must be dropped."""
    _triton_or_skip()
    from latentkv.runtime.decode import generate_ids

    model, tok = _load(converted(method, arch))
    prompts = [tok(PROMPT).input_ids[:n] for n in (3, 11, 7)]
    kw = dict(backend="triton", page_size=16, return_logits=True)
    with caplog.at_level("WARNING", logger="latentkv.runtime.decode"):
        graph_tokens, graph_logits = generate_ids(model, prompts, 30, cuda_graph=True, **kw)
    assert "capture of the decode step failed" not in caplog.text  # the graph ran, not the eager fallback
    eager_tokens, eager_logits = generate_ids(model, prompts, 30, cuda_graph=False, **kw)
    assert graph_tokens == eager_tokens
    for g, e in zip(graph_logits, eager_logits):
        assert float((g - e).abs().max() / e.abs().max()) < 5e-3
    # sequences that stop at an EOS while the graph has already launched the next step
    eos = eager_tokens[1][9]
    stopped = generate_ids(model, prompts, 30, cuda_graph=True, eos_token_id=eos, **kw)[0]
    assert stopped == generate_ids(model, prompts, 30, cuda_graph=False, eos_token_id=eos, **kw)[0]
    assert len(stopped[1]) == eager_tokens[1].index(eos) + 1 < 30


def test_per_layer_widths_share_one_paged_cache():
    """Layers of different latent / RoPE widths keep their own widths in one page allocation (no
    padding to a common width: one launch per layer at its own width)."""
    from latentkv.runtime.decode import PagedLatentCache

    widths = [(156, 36), (120, 24), (168, 72), (64, 0)]  # per-layer (latent, RoPE) of a 50% conversion
    cache = PagedLatentCache([r + d for r, d in widths], num_pages=5, page_size=16, dtype=torch.bfloat16,
                             device="cpu")
    assert [tuple(p.shape) for p in cache.pages] == [(5, 16, r + d) for r, d in widths]
    assert all(p.abs().sum() == 0 for p in cache.pages)  # pages start zeroed (finite rows past a sequence)
