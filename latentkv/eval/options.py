"""`EvalOptions`: the settings of `latentkv eval`. Each field is a flag of the command (`setting`: its
help text and panel, `latentkv.schema`), so the defaults live here only; nothing heavy is imported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from latentkv.schema import AS_JSON, DEVICE, DTYPE, GGUF_FILE, SOURCE, TRUST_REMOTE_CODE, setting

EVALUATION, SPARSE, KV_CACHE = "Evaluation", "Sparse decode", "KV cache format"  # help panels


@dataclass
class EvalOptions:
    """Perplexity (and KV cache bytes) of one model; optionally its agreement with the source, the
    paged decode loop checked against the forward pass, or a sparse KV policy compared with dense
    decoding (at long context: `long_text`)."""

    model: str = setting(**SOURCE)
    eval_text: Path | None = setting(None, panel=EVALUATION, help=(
        "Evaluation text: .txt/.raw, or .jsonl of {\"text\": ...} rows (default: WikiText-2 test)."))
    eval_window: int = setting(512, panel=EVALUATION, help="Tokens per evaluation window.")
    eval_windows: int = setting(64, panel=EVALUATION, help="Number of evaluation windows.")
    batch_size: int = setting(4, panel=EVALUATION, help="Windows per forward pass.")
    decode_check: bool = setting(False, panel=EVALUATION, help=(
        "Also check that our paged-kernel decode loop equals the HF forward pass (latentkv format)."))
    decode_tokens: int = setting(256, panel=EVALUATION, help="Tokens for --decode-check.")
    sparse: str | None = setting(None, panel=SPARSE, help=(
        "Also decode --decode-tokens teacher-forced after an --eval-window-token prompt with a sparse KV "
        "policy (dense, window, last-step, quest, oracle, predictor), compared with dense decoding."))
    sparse_budget: str = setting("0.25", panel=SPARSE, help="Blocks per step: a fraction (0.25, 25%) or a count (16).")
    sparse_per_head: bool = setting(False, panel=SPARSE, help=(
        "With --sparse on a GLA model (several latent heads): each latent head chooses its own blocks "
        "from its own scores, attended through a block table per latent head."))
    sparse_refresh: int = setting(1, panel=SPARSE, help=(
        "With --sparse: the policy's history row is the full (dense) block masses every R decode steps, "
        "else the masses over the attended blocks only (1: dense history every step)."))
    sparse_dense_refresh: bool = setting(False, panel=SPARSE, help=(
        "With --sparse: each refresh step attends to every block (its output is dense attention and its masses "
        "give the history row), so no separate dense pass is needed (the regime an offloaded cache can run)."))
    predictor: Path | None = setting(None, panel=SPARSE, help="AttentionPredictor folder (--sparse predictor).")
    page_size: int = setting(16, panel=SPARSE, help="Tokens per cache page (= block) for --sparse.")
    long_text: str | None = setting(None, panel=SPARSE, help=(
        "Instead of the perplexity pass, evaluate --sparse at long context on this text (a file, or a book of "
        "latentkv's Gutenberg set, e.g. chesterton-thursday): --context-tokens tokens, the last --long-span "
        "decoded teacher-forced, compared with dense decoding."))
    context_tokens: int = setting(4096, panel=SPARSE, help=(
        "Tokens per --long-text context (prompt + span; the retrieval prompt)."))
    long_span: int = setting(64, panel=SPARSE, help="Tokens decoded teacher-forced at the end of the --long-text context.")
    retrieval: bool = setting(False, panel=SPARSE, help=(
        "With --long-text: also a passkey retrieval test (a needle at each --needle-depths, greedy answer "
        "under the policy and densely)."))
    needle_depths: str = setting("0.1,0.5,0.9", panel=SPARSE, help="Comma-separated needle depths in [0, 1] for --retrieval.")
    retrieval_chat: bool = setting(False, panel=SPARSE, help=(
        "With --retrieval: the prompt as one user turn of the tokenizer's chat template, the assistant's answer "
        "begun with 'The pass key is' (what an instruct model retrieves with)."))
    offload: bool = setting(False, panel=SPARSE, help=(
        "With --long-text: decode through an offloaded cache (host pages, a device pool sized to the budget) "
        "and report the forecast's misses."))
    source: str | None = setting(None, panel=EVALUATION, help=(
        "Also measure agreement with this model (the one MODEL was converted from): KL(source || model) per "
        "token and top-1 agreement on the same windows."))
    kv_cache: str | None = setting(None, panel=KV_CACHE, help=(
        "Run the windows through a KV cache stored in this format (quantized on write, dequantized on read) "
        "and report its bytes: ENCODING\\[/GROUPING] with bf16, fp16, fp8_e4m3, int8, int4, int3, int2 and "
        "/token, /head, /g<N>, /channel<N> (KIVI keys); or per part, e.g. keys=int2/channel32,values=int2/g32 "
        "(source) or latent=fp8_e4m3/g128,rope=bf16 (latentkv). Replaces the format a converted model's config "
        "carries (convert --cache-format), which is used by default."))
    kv_cache_rope: str | None = setting(None, panel=KV_CACHE, help=(
        "Format of the RoPE key of a latentkv model (default: --kv-cache's)."))
    kv_cache_chunk: int | None = setting(None, panel=KV_CACHE, help=(
        "Feed N tokens per forward through a cache that quantizes on write, instead of the default one forward "
        "per window in which every query reads the cache a streaming decode loop holds after writing its token "
        "(per-token formats quantized on write, /channel<N> groups once complete, the unfinished group at full "
        "precision). 1 is that decode loop; a larger N lets a chunk read the groups it completes quantized."))
    as_json: bool = setting(False, **AS_JSON)
    device: str = setting("cpu", **DEVICE)
    dtype: str = setting("float32", **DTYPE)
    gguf_file: str | None = setting(None, **GGUF_FILE)
    trust_remote_code: bool = setting(False, **TRUST_REMOTE_CODE)
