"""What `latentkv eval` and `latentkv inspect` compute (the CLI only prints these dicts)."""

from __future__ import annotations

import math
import time

import torch

from latentkv.errors import LatentKVError

DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


def _open(spec: str, gguf_file, trust_remote_code: bool):
    from latentkv.io.source import open_source

    return open_source(spec, gguf_file=gguf_file, trust_remote_code=trust_remote_code)


# Formats whose transformers modeling may cache more than a serving engine does (some transformers
# versions' DeepseekV3Attention cache decompressed per-head keys and values; vLLM/SGLang the latent).
EXPANDED_IN_TRANSFORMERS = {"deepseek_v3"}


def declared_kv_values(config) -> tuple[int, int] | None:
    """(values per token summed over layers, number of layers) from a config, as a runtime that
    caches what the architecture defines holds them (the latent and RoPE key for DeepSeek-V3);
    None for an architecture outside the conversion table (its cache is then only measured)."""
    from latentkv.arch import ARCHITECTURES, geometry_of

    if getattr(config, "model_type", None) == "latentkv":
        return config.kv_values_per_token(), len(config.attention_layers)
    if getattr(config, "model_type", None) == "deepseek_v3":
        layers = config.num_hidden_layers
        return (config.kv_lora_rank + config.qk_rope_head_dim) * layers, layers
    if getattr(config, "model_type", None) not in ARCHITECTURES:
        return None
    geo = geometry_of(config)
    return geo.kv_values_per_token_per_layer * geo.num_layers, geo.num_layers


@torch.no_grad()
def measured_kv_layers(model, tokens: int = 16) -> list[tuple[int, int | None]]:
    """Per cache layer of the model's own transformers cache after a short forward: (values per
    token it holds, the window it keeps for a sliding-window layer, else None)."""
    from latentkv.modeling import cached_forward, new_dynamic_cache, output_cache

    device = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", None) or model.get_input_embeddings().num_embeddings
    ids = torch.arange(1, tokens + 1, device=device)[None] % vocab
    try:
        cache = new_dynamic_cache(model.config)
        out = cached_forward(model, ids, cache)
    except Exception as exc:  # noqa: BLE001 - any model: name what failed, before the long pass
        raise LatentKVError(
            f"{type(model).__name__} did not run with transformers' DynamicCache ({type(exc).__name__}: {exc}); "
            "latentkv eval measures the KV cache through it"
        ) from exc
    cache = output_cache(out) or cache
    layers = []
    for layer in getattr(cache, "layers", []):
        width = sum(t.numel() // t.shape[0] // t.shape[-2] for t in (getattr(layer, "keys", None),
                                                                       getattr(layer, "values", None))
                    if t is not None and t.numel())
        window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
        layers.append((width, int(window) if window else None))
    if not any(width for width, _ in layers):
        raise LatentKVError(f"{type(model).__name__}'s cache held no keys or values after a {tokens}-token forward; "
                            "latentkv eval measures KV caches of attention models")
    return layers


def measured_kv_values(model, tokens: int = 16) -> int:
    """Values per token that the model's HF cache really holds (summed over layers)."""
    return sum(width for width, _ in measured_kv_layers(model, tokens))


def context_tokens(config) -> int:
    """The context length KV bytes per sequence are stated at: the model's max_position_embeddings."""
    source = getattr(config, "source_config", None) or {}
    return int(getattr(config, "max_position_embeddings", None) or source.get("max_position_embeddings") or 4096)


def evaluate(spec: str, *, eval_text=None, window=512, windows=64, batch_size=4, device="cpu", dtype="float32",
             gguf_file=None, trust_remote_code=False, decode_check=False, decode_tokens=256, source=None,
             kv_cache=None, kv_cache_rope=None, kv_cache_chunk=None) -> dict:
    """Perplexity and KV values of ``spec``; with ``source`` also its agreement with that model
    (KL(source || model) per token and top-1 agreement on the same windows). With ``kv_cache`` (a
    format spec, see latentkv.kvformats.parse_cache_formats) every query reads the keys and values a
    streaming cache in that format holds after writing its token (one forward per window, see
    latentkv.eval.quantized_cache), or with ``kv_cache_chunk`` the windows are fed that many tokens per
    forward through a cache that quantizes on write; the KV bytes are the format's.
    A model whose config carries a cache format (``convert --cache-format``) runs in it by default: its
    own attention quantizes, and the bytes are that format's; ``kv_cache`` overrides it."""
    from latentkv.calibration.runner import check_device, resolve_dtype
    from latentkv.eval.perplexity import PerplexityProtocol, eval_windows, perplexity
    from latentkv.kvformats import model_cache_formats
    from latentkv.modeling import load_model

    check_device(device)  # before anything is read
    torch_dtype = resolve_dtype(dtype)
    opened = _open(spec, gguf_file, trust_remote_code)
    formats = cache_formats_of(opened.config, kv_cache, kv_cache_rope, kv_cache_chunk)
    carried = model_cache_formats(opened.config) if getattr(opened.config, "model_type", None) == "latentkv" else None
    model = load_model(opened.folder, dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code)
    tokenizer = opened.tokenizer()
    protocol = PerplexityProtocol(**({"text": eval_text} if eval_text else {}), window=window, windows=windows)
    ids = eval_windows(tokenizer, protocol)
    # Everything that can refuse, and the KV measurement (one short forward), before the long pass.
    if decode_check:
        from latentkv.runtime.decode import check_decodable

        check_decodable(model, min(ids.shape[1], 64) + decode_tokens)
    logits_of, chunk = None, None
    if formats is not None:
        from latentkv.eval.quantized_cache import own_cache_format_off, quantized_logits, streaming_logits

        chunk = kv_cache_chunk

        def logits_of(batch):  # the model's own format off: what it computes is quantized once, in `formats`
            with own_cache_format_off(model):
                if chunk is None:
                    return streaming_logits(model, batch, formats)
                return quantized_logits(model, batch, formats, chunk)
    kv = kv_report(model, torch_dtype, formats or carried, chunk)
    if carried is not None:
        kv["kv_cache_format_from"] = "--kv-cache (overrides the config's)" if formats is not None else "the model's config"
    agreement = None
    t0 = time.perf_counter()
    if source is None:
        ppl = perplexity(model, ids, batch_size=batch_size, logits_of=logits_of)
    else:  # the model's perplexity comes from the same forward passes as its agreement with the source
        agreement = source_agreement(model, tokenizer, source, ids, batch_size=batch_size, device=device,
                                     dtype=torch_dtype, trust_remote_code=trust_remote_code, logits_of=logits_of)
        ppl = agreement["perplexity"]
    seconds = time.perf_counter() - t0
    report = {
        "model": spec,
        "perplexity": ppl,
        "protocol": protocol.describe(),
        "predicted_tokens": int(ids[:, 1:].numel()),
        **kv,
        "eval_seconds": round(seconds, 1),
    }
    if agreement is not None:
        report["agreement"] = agreement
    if decode_check:
        from latentkv.eval.decode_check import decode_check as run_check

        report["decode_check"] = run_check(model, tokenizer, ids[0], num_tokens=decode_tokens)
    return report


def kv_report(model, torch_dtype, formats=None, chunk=None) -> dict:
    """KV values and bytes of a model from its real cache (checked against what a latentkv or
    table config declares), per token and for one sequence at the model's context length, where
    a sliding-window layer holds at most its window. With cache ``formats`` (``--kv-cache``) the bytes
    are those formats' (codes, scales and zero-points), and ``kv_cache_reads`` says how the cache was read
    (one forward per window as a streaming cache holds it, or ``chunk`` tokens per forward)."""
    from latentkv.arch import LayerAttention, kv_values_at_context

    measured_layers = measured_kv_layers(model)
    measured = sum(width for width, _ in measured_layers)
    declared = declared_kv_values(model.config)
    values, layers = declared if declared is not None else (measured, len(measured_layers))
    expanded = measured != values and model.config.model_type in EXPANDED_IN_TRANSFORMERS
    if measured != values and not expanded:
        raise LatentKVError(
            f"The model's cache holds {measured} values per token but its config declares {values}; "
            "the checkpoint's modeling code and config disagree"
        )
    elem = DTYPE_BYTES.get(torch_dtype, 2)
    context = context_tokens(model.config)
    windows = [LayerAttention(sliding_window=w) for _, w in measured_layers]
    widths = [w for w, _ in measured_layers]
    at_context = kv_values_at_context(widths, windows, context) * values // max(measured, 1)
    report = {
        "kv_values_per_token_per_layer": values / layers,
        "kv_values_per_token": values,
        "kv_bytes_per_token": values * elem,
        "kv_bytes_per_token_per_layer": values * elem / layers,
        "kv_context_tokens": context,
        "kv_bytes_per_sequence_at_context": at_context * elem,
        "sliding_window_layers": sum(1 for _, w in measured_layers if w),
        "cache_dtype": str(torch_dtype).replace("torch.", ""),
        "kv_source": "declared by the config and measured in the cache" if declared is not None
                     else "measured in transformers' cache (architecture outside the conversion table)",
    }
    if formats is not None:
        from latentkv.eval.quantized_cache import cache_bytes, describe_evaluation
        from latentkv.kvformats import describe_formats

        stored = cache_bytes(model, formats)
        report.update({
            "kv_bytes_per_token": stored.per_token,
            "kv_bytes_per_token_per_layer": stored.per_token_per_layer,
            "kv_bytes_by_part": stored.by_part,
            "cache_dtype": describe_formats(formats),
            "kv_cache_chunk": chunk,
            "kv_cache_reads": describe_evaluation(formats, chunk),
        })
    if expanded:
        report["transformers_cache_values_per_token"] = measured
        report["note"] = (f"transformers' {type(model).__name__} caches decompressed keys and values ({measured} values per "
                          "token); vLLM and SGLang cache the latent and RoPE key counted above")
    return report


def cache_formats_of(config, kv_cache, kv_cache_rope, kv_cache_chunk):
    """The format per cached part that `--kv-cache` / `--kv-cache-rope` ask for (None: the model's dtype),
    checked against what the model caches before anything is loaded."""
    if kv_cache is None:
        if kv_cache_rope is not None or kv_cache_chunk is not None:
            raise LatentKVError("--kv-cache-rope and --kv-cache-chunk refine --kv-cache; add --kv-cache FORMAT")
        return None
    from latentkv.kvformats import cache_parts, parse_cache_formats

    if kv_cache_chunk is not None and kv_cache_chunk < 1:
        raise LatentKVError(f"--kv-cache-chunk must be a positive number of tokens, got {kv_cache_chunk}")
    parts = tuple(dict.fromkeys(p for layer in cache_parts(config) for p in layer))
    return parse_cache_formats(kv_cache, parts, rope=kv_cache_rope)


def source_agreement(model, tokenizer, source: str, ids: torch.Tensor, *, batch_size: int, device, dtype,
                     trust_remote_code: bool, logits_of=None) -> dict:
    """`latentkv eval --source`: the source model run over the same windows as ``model``."""
    from latentkv.eval.agreement import agreement
    from latentkv.io.source import check_same_tokenizer
    from latentkv.modeling import load_model

    reference = _open(source, None, trust_remote_code)
    check_same_tokenizer(tokenizer, reference.tokenizer(), source, role="--source")
    ref_model = load_model(reference.folder, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return {"source": source, **agreement(model, ref_model, ids, batch_size=batch_size, logits_of=logits_of)}


def cache_format_rows(config) -> dict:
    """inspect's rows for the cache format a latentkv config carries (none without one)."""
    from latentkv.kvformats import config_bytes_per_token

    stored = config_bytes_per_token(config)
    if stored is None:
        return {}
    return {"KV cache format": stored[1], "KV bytes per token (all layers, scales included)": f"{stored[0]:g}"}


def target_rows(geo, arch, config) -> list[tuple[str, str, int, bool]]:
    """(target, what it caches, values per token per layer, keeps sliding layers) of every registered
    target's `inspect` rows: those that keep the source's own architecture first, then the latent
    targets in registration order."""
    from latentkv.convert.registry import load, targets

    records = sorted((r for r in targets() if r.inspect), key=lambda r: r.attention != "source")
    return [(row.target, row.what, row.values, row.keeps_sliding)
            for r in records for row in load(r.inspect)(geo, arch, config)]


def inspect_model(spec: str, *, gguf_file=None, trust_remote_code=False) -> dict:
    from latentkv.arch import geometry_of, get_arch
    from latentkv.convert.engines import engine_rows

    source = _open(spec, gguf_file, trust_remote_code)
    config = source.config
    if getattr(config, "model_type", None) == "latentkv":
        layers = config.attention_layers
        return {
            "architecture": {
                "model_type": "latentkv",
                "source model_type": config.source_config.get("model_type"),
                "layers": len(layers),
                "query heads": config.num_attention_heads,
                "method": config.method,
                "KV values per token (all layers)": config.kv_values_per_token(),
                "RoPE + latent per layer": ", ".join(f"{s['rope_dim']}+{s['kv_lora_rank']}" for s in layers),
                **cache_format_rows(config),
            },
            "targets": [],
        }
    if getattr(config, "model_type", None) == "deepseek_v3":  # e.g. a `--format deepseek` output
        values, layers = declared_kv_values(config)
        return {
            "architecture": {
                "model_type": "deepseek_v3",
                "layers": layers,
                "query heads": config.num_attention_heads,
                "KV values per token (all layers)": values,
                "RoPE + latent per layer": f"{config.qk_rope_head_dim}+{config.kv_lora_rank}",
            },
            "targets": [],
        }
    from latentkv.arch import hybrid_sliding, kv_values_at_context

    arch = get_arch(config)
    geo = geometry_of(config)
    G, d, L = geo.num_kv_heads, geo.head_dim, geo.num_layers
    src = 2 * G * d
    layers = arch.layer_attentions(config)
    context = context_tokens(config)
    kept = hybrid_sliding(layers)  # sliding-window layers stay at the source's width (mla/gla --set sliding_layers)

    def at_context(values: int, keep_sliding: bool) -> int:
        """bf16 bytes of one `context`-token sequence: `values` per token in each layer, the source's
        width in the sliding-window layers that are kept, each of those holding at most its window."""
        widths = [src if keep_sliding and layer.sliding_window else values for layer in layers]
        return 2 * kv_values_at_context(widths, layers, context)

    params = sum(math.prod(source.weights.shape(k)) for k in source.weights.keys())
    info = {
        "model_type": config.model_type,
        "parameters": params,
        "layers": L,
        "hidden size": geo.hidden_size,
        "query heads": geo.num_heads,
        "KV heads": G,
        "head dim": d,
        "RoPE": f"theta {geo.rope_theta:g}, {(getattr(config, 'rope_parameters', None) or {}).get('rope_type', 'default')}"
                + (f", first {geo.rotary_dim} of {d} dims per head" if geo.rotary_dim < d else ""),
        "q/k/v bias": arch.has_bias(config, "q"),
        "mixture of experts": arch.moe,
        "q/k norm before RoPE": arch.qk_norm,
    }
    scale = arch.softmax_scale(config, geo)
    if abs(scale - d**-0.5) > 1e-12:
        info["softmax scale"] = f"{scale:.4g} (query_pre_attn_scalar, not head dim)"
    for which in ("attention", "final"):
        if arch.softcap(config, which) is not None:
            info[f"{which} logit soft-cap"] = arch.softcap(config, which)
    if arch.rope_free_layers(config):
        info["layers without RoPE"] = ", ".join(map(str, arch.rope_free_layers(config)))
    windows = [i for i, layer in enumerate(layers) if layer.sliding_window]
    if windows:
        info["sliding-window layers"] = (
            f"{len(windows)} of {L} (window {layers[windows[0]].sliding_window} tokens: their cache holds at most "
            f"that many; " + ("mla/gla keep them at the source's width, the budget goes to the full-attention layers)"
                              if kept else "every layer slides, so every layer is converted)"))
    info["KV bytes (bf16) per sequence"] = f"{at_context(src, False):,} at {context} tokens of context"
    rows = [("source (GQA)" if G < geo.num_heads else "source (MHA)", f"K and V: 2 x {G} x {d}", src, False)]
    rows += target_rows(geo, arch, config)
    from latentkv.convert.export_deepseek import deepseek_refusal

    refusal = deepseek_refusal(config, arch)
    info["--format deepseek"] = f"refused: {refusal}" if refusal else (
        "held; its q/k/v biases are fitted (key bias dropped exactly, the rest carried by norm ballast dims, "
        "errors per layer in latentkv_layers.json)" if arch.has_bias(config, "q") or arch.has_bias(config, "o")
        else "held")
    if not refusal:
        rows.append(("mla --format deepseek --kv-lora-rank 4d", f"{4 * d} + {min(64, d)}", 4 * d + min(64, d), False))
    targets = [
        {"target": t, "what": w, "values": v, "percent": 100 * v / src, "bytes_bf16_all_layers": 2 * v * L,
         "context_tokens": context,
         # GQA, GTA and the DeepSeek format rewrite every layer; mla/gla keep the sliding layers of a hybrid model
         "bytes_bf16_at_context": at_context(v, kept and keeps_sliding)}
        for t, w, v, keeps_sliding in rows
    ]
    engines = [] if refusal else engine_rows(geo)
    return {"architecture": info, "targets": targets, "engines": engines}
