"""Decode a latentkv model through its own paged latent cache and the MLA / GLA decode kernels.

`PagedLatentCache` holds, per layer, pages of ``[c | RoPE(k_rope)]`` rows (width
``kv_lora_rank + rope_dim``, the model dtype) and one block table per sequence; sequences of a batch
have their own lengths. A model whose config carries a cache format (``kv_cache_format``) gets its
latent stored as fp8 / int4 codes with per-token group scales (``QuantizedPages``, quantized as rows
are appended, dequantized inside the decode kernel) or rounded to bf16 / fp16, and its RoPE key
rounded to its format, as the model's own forward reads them. Passed as the decoder layers' cache
argument, it takes over `LatentAttention` through the module's duck-typed hook
(``latent_attention``): it appends the new rows to the pages and attends in the absorbed form

    q_lat_h = W_UK_h^T q_nope_h                 # [r_c]: the query in latent space
    o_lat_h = attend([q_lat_h | RoPE(q_rope_h)], cache rows of the latent head of h)   # kernel
    v_h     = W_UV_h o_lat_h;   out = concat_h v_h   (o_proj: the module)

The loop (`forward_step`) calls embeddings -> decoder layers -> final norm -> lm_head itself, so
none of transformers' mask or cache machinery is involved. `generate` is greedy decoding of a
batch of prompts; `latentkv.eval.decode_check` validates the loop against one full forward of the
same model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from latentkv.errors import LatentKVError
from latentkv.kvformats import KVFormat, fake_quantize
from latentkv.kvformats import model_cache_formats
from latentkv.kernels.mla_decode import decode_attention, empty_pages, page_rows
from latentkv.kernels.quantized_pages import QuantizedPages, check_groups
from latentkv.kvformats import check_paged_formats
from latentkv.modeling.modeling_latentkv import cache_keyword

log = logging.getLogger(__name__)

__all__ = ["Generation", "PagedLatentCache", "check_decodable", "forward_step", "generate", "generate_cli", "generate_ids"]



# --------------------------------------------------------------------------------------------
# Paged latent cache
# --------------------------------------------------------------------------------------------
class PagedLatentCache:
    """Pages of latent cache rows for every layer, one block table per sequence.

    layer_widths: per layer ``kv_lora_rank + rope_dim``; every layer shares the page allocation.
    num_pages / page_size: the pool (pages are handed to sequences as they grow).
    backend: "auto" | "triton" | "reference" (``latentkv.kernels.decode_attention``).
    cache_format: formats of "latent" and "rope" (``latentkv.kvformats.parse_model_cache_format``);
        None: both at ``dtype``. A quantized latent needs ``latent_widths`` (per layer ``kv_lora_rank``).

    Use: ``seq = cache.add_sequence()``; per forward step ``positions = cache.begin_step(seqs, n)``,
    run the layers with the cache and ``position_ids=positions``, then ``cache.end_step()``.
    """

    def __init__(
        self,
        layer_widths: list[int],
        *,
        num_pages: int,
        page_size: int = 64,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        backend: str = "auto",
        num_splits: int | None = None,
        cache_format: dict[str, KVFormat] | None = None,
        latent_widths: list[int] | None = None,
    ):
        if page_size < 1 or num_pages < 1:
            raise LatentKVError(f"page_size and num_pages must be positive; got {page_size}, {num_pages}.")
        self.page_size = page_size
        self.num_pages = num_pages
        self.dtype = dtype
        self.device = torch.device(device)
        self.backend = backend
        self.num_splits = num_splits
        self.layer_widths = list(layer_widths)
        self.cache_format = dict(cache_format or {})
        check_paged_formats(self.cache_format)
        self.latent_widths = list(latent_widths) if latent_widths is not None else None
        latent = self.cache_format.get("latent")
        if latent is not None and latent.encoding.kind != "cast":
            if self.latent_widths is None or len(self.latent_widths) != len(self.layer_widths):
                raise LatentKVError("a quantized latent cache needs latent_widths, one kv_lora_rank per layer.")
            self.pages = [QuantizedPages.empty(latent, num_pages=num_pages, page_size=page_size, latent_width=r,
                                               rope_dim=w - r, dtype=dtype, device=self.device)
                          for w, r in zip(self.layer_widths, self.latent_widths)]
        else:  # one [num_pages, page_size, width] tensor per layer, rows 16-byte aligned
            self.pages = [empty_pages(num_pages, page_size, w, dtype=dtype, device=self.device) for w in layer_widths]
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self._tables: dict[int, list[int]] = {}  # sequence id -> its pages
        self._lens: dict[int, int] = {}  # sequence id -> tokens written
        self._next_id = 0
        self._step: dict | None = None
        self.sparsity = None  # a latentkv.sparsity.SparseAttention: decode steps attend to chosen pages only

    @classmethod
    def for_model(
        cls, model, *, max_seqs: int, max_seq_len: int, page_size: int = 64, backend: str = "auto",
        num_splits: int | None = None,
    ) -> PagedLatentCache:
        """A cache sized for ``max_seqs`` sequences of up to ``max_seq_len`` tokens of ``model``."""
        attns = latent_attentions(model)
        param = next(model.parameters())
        pages = max_seqs * math.ceil(max_seq_len / page_size)
        widths = [a.kv_lora_rank + a.rope_dim for a in attns]
        formats = model_cache_formats(model.config)
        if formats is not None and formats["latent"].encoding.kind != "cast":
            for a in attns:  # before any page is allocated
                check_groups(formats["latent"], a.kv_lora_rank, a.latent_heads)
        cache = cls(widths, num_pages=pages, page_size=page_size, dtype=param.dtype, device=param.device,
                    backend=backend, num_splits=num_splits, cache_format=formats,
                    latent_widths=[a.kv_lora_rank for a in attns])
        log.info(
            "paged latent cache: %d pages of %d tokens, %d values per token over %d layers, %s on %s; %s, "
            "%d bytes a token (%d a page, every layer)", pages, page_size, sum(widths), len(widths), param.dtype,
            param.device, ", ".join(f"{p}={f.name}" for p, f in cache.cache_format.items()) or "no cache format",
            cache.bytes_per_token(), cache.bytes_per_token() * page_size,
        )
        return cache

    def bytes_per_token(self) -> int:
        """Bytes one token takes over every layer (codes, scales and RoPE key for a quantized latent)."""
        return sum(p.bytes_per_token() if isinstance(p, QuantizedPages) else p[0, 0].numel() * p.element_size()
                   for p in self.pages)

    # sequences ---------------------------------------------------------------------------
    def add_sequence(self) -> int:
        seq = self._next_id
        self._next_id += 1
        self._tables[seq], self._lens[seq] = [], 0
        return seq

    def free_sequence(self, seq: int) -> None:
        self._free.extend(reversed(self._tables.pop(seq)))
        del self._lens[seq]
        if self.sparsity is not None:
            self.sparsity.forget(seq)

    def seq_len(self, seq: int) -> int:
        return self._lens[seq]

    def free_pages(self) -> int:
        return len(self._free)

    def _current_step(self) -> dict:
        if self._step is None:
            raise LatentKVError("PagedLatentCache: call begin_step(...) before running the layers.")
        return self._step

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens already cached, for callers that pass no position_ids (sequences of one length only)."""
        starts = set(self._current_step()["starts"])
        if len(starts) != 1:
            raise LatentKVError("sequences of different lengths: pass position_ids from begin_step(...).")
        return starts.pop()

    # steps -------------------------------------------------------------------------------
    def begin_step(self, seqs: list[int], num_new: int) -> torch.Tensor:
        """Reserve room for ``num_new`` tokens of each sequence in ``seqs`` (the batch rows, in
        order); returns their positions [len(seqs), num_new] (long, on the cache device)."""
        if self._step is not None:
            raise LatentKVError("PagedLatentCache: the previous step was not ended (end_step / abort_step).")
        if not seqs or num_new < 1:
            raise LatentKVError(f"a step needs sequences and new tokens; got {len(seqs)} sequences, {num_new} tokens.")
        starts = [self._lens[s] for s in seqs]
        for s, start in zip(seqs, starts):
            need = math.ceil((start + num_new) / self.page_size) - len(self._tables[s])
            if need > len(self._free):
                raise LatentKVError(
                    f"the paged cache is out of pages ({self.num_pages} of {self.page_size} tokens); "
                    "build it with a larger max_seq_len / max_seqs."
                )
            self._tables[s].extend(self._free.pop() for _ in range(need))
        ends = [start + num_new for start in starts]
        max_pages = max(len(self._tables[s]) for s in seqs)
        table = torch.zeros(len(seqs), max_pages, dtype=torch.int32)
        for row, s in enumerate(seqs):
            table[row, : len(self._tables[s])] = torch.tensor(self._tables[s], dtype=torch.int32)
        positions = torch.tensor(starts)[:, None] + torch.arange(num_new)[None, :]  # [b, num_new]
        # flat row index of every new token in a [num_pages * page_size, width] view
        rows = torch.gather(table.long(), 1, positions // self.page_size) * self.page_size + positions % self.page_size
        self._step = {
            "seqs": list(seqs),
            "starts": starts,
            "num_new": num_new,
            "max_len": max(ends),
            "positions": self._to_device(positions),
            "rows": self._to_device(rows.reshape(-1)),
            "block_table": self._to_device(table),
            "seq_lens": self._to_device(torch.tensor(ends, dtype=torch.int32)),
        }
        return self._step["positions"]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        # On a GPU through pinned memory without a host sync, so the host can prepare the next step
        # while the GPU still runs this one (the pinned block is not reused before its copy is done).
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def end_step(self) -> None:
        """Commit the step: every layer has written its rows."""
        step = self._take_step()
        for s in step["seqs"]:
            self._lens[s] += step["num_new"]

    def abort_step(self) -> None:
        """Forget a step that failed (the rows written stay beyond the lengths and are overwritten later)."""
        self._step = None

    def _take_step(self) -> dict:
        if self._step is None:
            raise LatentKVError("PagedLatentCache: no step in progress; call begin_step(...) first.")
        step, self._step = self._step, None
        return step

    # the hook LatentAttention calls --------------------------------------------------------
    def latent_attention(self, module, q_nope, q_rope, latent, k_rope, position_ids=None) -> torch.Tensor:
        """MLA / GLA / GTA-T layers: append this step's rows and attend in the absorbed form.

        q_nope [b, H, s, d_nope], q_rope [b, H, s, rope_dim] (rotated), latent [b, s, r],
        k_rope [b, 1, s, rope_dim] (rotated); returns [b, s, H * d_v] (before o_proj).
        """
        self._current_step()  # the clear error before any work
        w_uk, w_uv = module.absorbed_weights()  # [H, d_nope, r_c], [H, d_v, r_c]
        q_lat = torch.einsum("bhsd,hdr->bshr", q_nope, w_uk)
        q = torch.cat([q_lat, q_rope.transpose(1, 2)], dim=-1)  # [b, s, H, r_c + rope_dim]
        out = self.attend_latent(module, q, torch.cat([latent, k_rope[:, 0]], dim=-1), position_ids=position_ids)
        v = torch.einsum("bshr,hvr->bshv", out.to(w_uv.dtype), w_uv)  # [b, s, H, d_v]
        b, s, heads = v.shape[:3]
        return v.reshape(b, s, heads * module.v_head_dim)

    def attend_latent(self, module, q, rows, position_ids=None) -> torch.Tensor:
        """Append ``rows`` [b, s, width] (this step's cache rows of layer ``module.layer_idx``) and
        attend with the absorbed queries q [b, s, H, r_c + rope_dim]; returns [b, s, H, r_c] in the
        cache dtype. ``module`` gives layer_idx, kv_lora_rank, rope_dim, latent_heads and scaling
        (MLA, GLA, GTA-T and GTA-S layers all reduce to this call)."""
        step = self._current_step()
        b, s = q.shape[:2]
        if b != len(step["seqs"]) or s != step["num_new"]:
            raise LatentKVError(
                f"layer {module.layer_idx} got {b} x {s} tokens but the step was begun for "
                f"{len(step['seqs'])} x {step['num_new']}."
            )
        if position_ids is not None and position_ids is not step["positions"]:
            if not torch.equal(position_ids.expand(b, s).to(step["positions"].device), step["positions"]):
                raise LatentKVError("position_ids differ from the positions begin_step(...) returned; pass those.")
        kv = self.pages[module.layer_idx]  # [num_pages, page_size, r + rope_dim] (or QuantizedPages)
        width = kv.shape[-1]
        if width != module.kv_lora_rank + module.rope_dim or rows.shape[-1] != width:
            raise LatentKVError(f"layer {module.layer_idx}: cache width {width} does not fit the module.")
        rows = self.rounded(rows.reshape(b * s, width), module.kv_lora_rank)
        if isinstance(kv, QuantizedPages):
            kv.write_rows(step["rows"], rows)
        else:
            page_rows(kv).index_copy_(0, step["rows"], rows.to(kv.dtype))
        q = q.to(kv.dtype)
        table, lens, max_len = step["block_table"], step["seq_lens"], step["max_len"]
        masses = False
        if self.sparsity is not None:  # a reduced block table of the chosen pages (exact attention over them)
            table, lens, max_len = self.sparsity.select(module, q, kv, step)
            masses = self.sparsity.wants_masses  # the policy's history comes from this attention pass
        out = decode_attention(
            q, kv, table, lens,
            latent_heads=module.latent_heads, rope_dim=module.rope_dim, softmax_scale=module.scaling,
            num_splits=self.num_splits, backend=self.backend, max_seq_len=max_len, return_masses=masses,
            **score_options(module),
        )  # [b, s, H, r_c]  # fmt: skip
        if masses:
            out, page_masses = out
            self.sparsity.record(module.layer_idx, page_masses)
        return out


    def rounded(self, rows: torch.Tensor, latent_width: int) -> torch.Tensor:
        """rows [n, latent_width + rope_dim] with each part in a cast format (bf16, fp16) rounded to it,
        as the model's forward reads it (a quantized latent is quantized by its pages)."""
        parts = {"latent": slice(0, latent_width), "rope": slice(latent_width, None)}
        casts = {p: f for p, f in self.cache_format.items() if f.encoding.kind == "cast"}
        if not casts:
            return rows
        rows = rows.clone()
        for part, fmt in casts.items():
            rows[:, parts[part]] = fake_quantize(rows[None, None, :, parts[part]], fmt)[0, 0]
        return rows


def score_options(module) -> dict:
    """The soft-cap and sliding window of a layer's scores, for the kernel (only where set, so a
    model converted before these existed decodes as before)."""
    options = {"softcap": getattr(module, "softcap", None), "window": getattr(module, "sliding_window", None)}
    return {k: v for k, v in options.items() if v}


def latent_attentions(model) -> list:
    """The LatentAttention modules of a latentkv model, in layer order (error for other models)."""
    names = getattr(model.config, "source_modules", None)
    layers = getattr(model.get_decoder(), "layers", None) if names else None
    attns = [getattr(layer, names["attention"], None) for layer in layers] if layers is not None else []
    # MLA / GLA / GTA-T layers absorb their up-projections; GTA-S layers cache [c | map keys] (the
    # modeling file of a checkpoint converted before GTA-S decoded here lacks rope_dim on them)
    if not attns or not all(hasattr(a, "absorbed_weights") or hasattr(a, "rope_dim") for a in attns):
        raise LatentKVError(
            f"{type(model).__name__} has no latent attention; the decode loop runs models converted to the "
            f"latentkv format with --to {', '.join(paged_targets())} (latentkv convert --format latentkv)."
        )
    return attns


def paged_targets() -> list[str]:
    """The conversion targets whose layers this loop decodes (`TargetRecord.paged_decode`)."""
    from latentkv.convert.registry import targets

    return [r.name for r in targets() if r.paged_decode]


def _shared_rotary(model) -> bool:
    """Whether some layer rotates with the decoder's shared (cos, sin): a layer of a target whose
    decode adapter is "grouped" (GTA-S; its modules carry `map_heads`)."""
    from latentkv.convert.registry import targets

    grouped = {r.layer_class for r in targets() if r.decode_adapter == "grouped"}
    names = getattr(model.config, "source_modules", None) or {}
    layers = getattr(model.get_decoder(), "layers", [])
    return any(type(getattr(layer, names.get("attention", "self_attn"), None)).__name__ in grouped
               for layer in layers)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def _run_layers(model, cache, input_ids: torch.Tensor, positions: torch.Tensor, last_only: bool) -> torch.Tensor:
    """Embeddings, every decoder layer over the paged cache (a step begun), norm and LM head:
    input_ids [b, n] -> logits [b, n or 1, vocab] (float32)."""
    hidden = model.get_input_embeddings()(input_ids)
    # GTA-S layers rotate with the decoder's shared (cos, sin); MLA / GLA / GTA-T layers rotate themselves
    rotary = getattr(model.get_decoder(), "rotary_emb", None) if _shared_rotary(model) else None
    pos_emb = rotary(hidden, positions) if rotary is not None else None
    layers = model.get_decoder().layers
    cache_kw = {cache_keyword(type(layers[0]).forward): cache}  # the name depends on the transformers version
    for layer in layers:
        hidden = layer(
            hidden, attention_mask=None, position_ids=positions, use_cache=True, position_embeddings=pos_emb,
            **cache_kw,
        )  # fmt: skip
        if isinstance(hidden, tuple):  # older decoder layers return (hidden, ...)
            hidden = hidden[0]
    hidden = model.get_final_norm()(hidden[:, -1:] if last_only else hidden)
    final = getattr(model, "final_logits", None) or model.get_output_embeddings()  # soft-capped where the source caps
    return final(hidden).float()


@torch.no_grad()
def forward_step(model, cache: PagedLatentCache, seqs: list[int], input_ids: torch.Tensor, last_only: bool = False):
    """input_ids [len(seqs), n] appended to ``seqs``; returns logits [b, n or 1, vocab] (float32)."""
    positions = cache.begin_step(seqs, input_ids.shape[1])
    try:
        logits = _run_layers(model, cache, input_ids.to(cache.device), positions, last_only)
    except BaseException:
        cache.abort_step()
        raise
    cache.end_step()
    return logits


class CapturedDecodeStep:
    """One decode step (one new token for each of ``batch`` sequences) replayed from a CUDA graph.

    A decode step of a small model is bound by the host's launches (hundreds per step); the graph
    replays them at once. It reads static device buffers -- token ids, positions, the cache rows to
    write, block table and lengths -- that each call refreshes from the cache's page bookkeeping.
    The kernel reads the lengths on the device and its split count is fixed at capture from
    ``max_pages`` (the block table's width), so one graph serves every length up to it. Capture
    writes the cache rows the static buffers point at (page 0), so build it before any sequence
    holds data. Returns logits [batch, 1, vocab] in a buffer the next call overwrites.
    """

    def __init__(self, model, cache: PagedLatentCache, batch: int, max_pages: int):
        if cache.device.type != "cuda" or cache.sparsity is not None:
            raise LatentKVError("a captured decode step needs a CUDA cache without sparse decode.")
        dev = cache.device
        self.model, self.cache, self.batch = model, cache, batch
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.static = {
            "seqs": list(range(batch)), "starts": [0] * batch, "num_new": 1, "max_len": max_pages * cache.page_size,
            "positions": torch.zeros(batch, 1, dtype=torch.long, device=dev),
            "rows": torch.zeros(batch, dtype=torch.long, device=dev),
            "block_table": torch.zeros(batch, max_pages, dtype=torch.int32, device=dev),
            "seq_lens": torch.ones(batch, dtype=torch.int32, device=dev),
        }  # fmt: skip
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        cache._step = self.static
        try:
            with torch.no_grad():
                with torch.cuda.stream(side):  # warm-up: compiles the kernels, settles the allocator
                    for _ in range(2):
                        self._body()
                torch.cuda.current_stream(dev).wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.logits = self._body()
        finally:
            cache._step = None

    def _body(self) -> torch.Tensor:
        return _run_layers(self.model, self.cache, self.ids, self.static["positions"], last_only=False)

    def __call__(self, seqs: list[int], input_ids: torch.Tensor) -> torch.Tensor:
        if len(seqs) != self.batch or input_ids.shape != (self.batch, 1):
            raise LatentKVError(f"the captured step decodes {self.batch} sequences x 1 token; got {len(seqs)}.")
        self.cache.begin_step(seqs, 1)
        try:
            step = self.cache._current_step()
            width = step["block_table"].shape[1]
            if width > self.static["block_table"].shape[1]:
                raise LatentKVError("a sequence outgrew the captured block table; capture with more max_pages.")
            for key in ("positions", "rows", "seq_lens"):
                self.static[key].copy_(step[key])
            self.static["block_table"][:, :width].copy_(step["block_table"])
            self.ids.copy_(input_ids)
            self.graph.replay()
        except BaseException:
            self.cache.abort_step()
            raise
        self.cache.end_step()
        return self.logits

def prefill(model, cache: PagedLatentCache, seq: int, ids: list[int], chunk: int, all_logits: bool = False):
    """Feed a prompt in chunks of ``chunk`` query tokens; returns the logits of its last token
    [vocab] (or of every token [len, vocab] with ``all_logits``)."""
    if not ids:
        raise LatentKVError("an empty prompt: give at least one token (or a tokenizer that adds BOS).")
    if chunk < 1:
        raise LatentKVError(f"prefill_chunk must be >= 1; got {chunk}.")
    out = []
    for start in range(0, len(ids), chunk):
        piece = torch.tensor([ids[start : start + chunk]], dtype=torch.long)
        logits = forward_step(model, cache, [seq], piece, last_only=not all_logits)
        out.append(logits[0])
    return torch.cat(out) if all_logits else out[-1][-1]


def check_decodable(model, total: int) -> None:
    """Refuse, before any work, a model the paged loop cannot decode for `total` tokens."""
    latent_attentions(model)
    check_length(model, total)


def check_length(model, total: int) -> None:
    src = getattr(model.config, "source_config", {}) or {}
    window = src.get("sliding_window")
    if getattr(model.config, "layer_types", None):
        return  # each sliding layer knows its window (`layer_window`) and the kernel applies it
    if window and src.get("use_sliding_window", True) and total > window:
        raise LatentKVError(
            f"sequences of {total} tokens exceed the source's sliding window ({window}); the paged decode "
            "attends to the whole sequence. Generate fewer tokens."
        )


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    backend: str = "auto",
    page_size: int = 64,
    prefill_chunk: int = 8,
    eos_token_id: int | list[int] | None = None,
    return_logits: bool = False,
    num_splits: int | None = None,
    cuda_graph: bool = True,
):
    """Greedy decoding of token-id prompts (any lengths) through the paged cache.

    Each prompt is prefilled on its own (chunks of ``prefill_chunk`` query tokens through the
    kernel), then all sequences decode together, one token per step, each at its own length; a
    sequence stops after an EOS token. Returns the new tokens per prompt, and with
    ``return_logits`` the logits [n_new, vocab] (float32, CPU) that chose each of them.
    ``cuda_graph``: on a GPU (Triton kernel, no sparse decode) decode steps of the full batch replay
    one captured CUDA graph (``CapturedDecodeStep``), each launched before the previous step's tokens
    are read on the host (no host sync per step); steps after some sequences stopped run eagerly.
    """
    model.eval()
    latent_attentions(model)
    if max_new_tokens < 1:
        raise LatentKVError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
    longest = max(len(p) for p in prompts) + max_new_tokens
    check_length(model, longest)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    cache = PagedLatentCache.for_model(
        model, max_seqs=len(prompts), max_seq_len=longest, page_size=page_size, backend=backend, num_splits=num_splits
    )
    graphed = None
    if cuda_graph and cache.device.type == "cuda" and backend != "reference" and max_new_tokens > 1:
        # captured before any sequence holds data: capture writes the rows the static buffers name
        try:
            graphed = CapturedDecodeStep(model, cache, len(prompts), max_pages=math.ceil(longest / page_size))
        except RuntimeError as exc:  # an op of this model that a graph cannot hold: decode eagerly
            log.warning("CUDA-graph capture of the decode step failed (%s); decoding eagerly.", str(exc)[:200])
    seqs = [cache.add_sequence() for _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    logits_out: list[list[torch.Tensor]] = [[] for _ in prompts]
    nxt = []
    for i, ids in enumerate(prompts):
        logits = prefill(model, cache, seqs[i], list(ids), prefill_chunk)
        nxt.append(logits)
    active = list(range(len(prompts)))
    step_logits = torch.stack(nxt)  # [b, vocab]
    chosen_dev = step_logits.argmax(-1)
    while True:
        # All sequences decode in step, so they hold the same number of tokens. While the full batch
        # runs on the graph, the next step is launched before this step's tokens reach the host (its
        # input ids stay on the GPU): the host reads them and checks EOS while the GPU runs ahead. A
        # sequence that just stopped was computed one step too far; that step's row is dropped.
        kept_logits = step_logits.cpu() if return_logits else None  # before a replay overwrites them
        ahead = None
        if graphed is not None and len(active) == graphed.batch and len(tokens[active[0]]) + 1 < max_new_tokens:
            ahead = graphed([seqs[i] for i in active], chosen_dev[:, None])[:, -1]
        chosen = chosen_dev.tolist()
        still = []
        for row, i in enumerate(active):
            tokens[i].append(chosen[row])
            if return_logits:
                logits_out[i].append(kept_logits[row])
            if chosen[row] not in eos and len(tokens[i]) < max_new_tokens:
                still.append((row, i))
        if not still:
            break
        rows = [row for row, _ in still]
        active = [i for _, i in still]
        if ahead is not None:
            step_logits = ahead if len(rows) == len(chosen) else ahead[rows]
        else:
            ids = torch.tensor([[tokens[i][-1]] for i in active], dtype=torch.long)
            step_logits = forward_step(model, cache, [seqs[i] for i in active], ids)[:, -1]
        chosen_dev = step_logits.argmax(-1)
    if return_logits:
        return tokens, [torch.stack(x) for x in logits_out]
    return tokens


@dataclass
class Generation:
    texts: list[str]
    token_ids: list[list[int]]  # new tokens per prompt (an EOS that stopped it included)
    prompt_ids: list[list[int]]
    seconds: float
    new_tokens: int = field(init=False)

    def __post_init__(self):
        self.new_tokens = sum(len(t) for t in self.token_ids)


def encode_prompt(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    return list(ids)


def _eos_ids(model, tokenizer):
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return eos


def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    *,
    backend: str = "auto",
    page_size: int = 64,
    prefill_chunk: int = 8,
    stop_at_eos: bool = True,
) -> Generation:
    """Greedy generation for a batch of text prompts through the paged latent cache."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    t0 = time.perf_counter()
    tokens = generate_ids(
        model, prompt_ids, max_new_tokens, backend=backend, page_size=page_size, prefill_chunk=prefill_chunk,
        eos_token_id=_eos_ids(model, tokenizer) if stop_at_eos else None,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return Generation(texts=texts, token_ids=tokens, prompt_ids=prompt_ids, seconds=seconds)


def generate_cli(
    model_path: str,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    backend: str = "auto",
    device: str = "cpu",
    dtype: str = "float32",
    page_size: int = 64,
    prefill_chunk: int = 8,
) -> list[str]:
    """`latentkv generate`: load a latentkv model (folder or Hub id) and its tokenizer, return one
    text per prompt."""
    from latentkv.calibration.runner import resolve_dtype
    from latentkv.io.source import open_source
    from latentkv.modeling import load_model

    source = open_source(model_path)
    model = load_model(source.folder, dtype=resolve_dtype(dtype), device=device)
    tokenizer = source.tokenizer()
    gen = generate(model, tokenizer, list(prompts), max_new_tokens, backend=backend, page_size=page_size,
                   prefill_chunk=prefill_chunk)
    log.info("generated %d tokens in %.2f s (%.1f tokens/s)", gen.new_tokens, gen.seconds,
             gen.new_tokens / gen.seconds if gen.seconds > 0 else float("nan"))
    return gen.texts
