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


def declared_kv_values(config) -> tuple[int, int]:
    """(values per token summed over layers, number of layers) from a config, as a runtime that
    caches what the architecture defines holds them (the latent and RoPE key for DeepSeek-V3)."""
    if getattr(config, "model_type", None) == "latentkv":
        return config.kv_values_per_token(), len(config.attention_layers)
    if getattr(config, "model_type", None) == "deepseek_v3":
        layers = config.num_hidden_layers
        return (config.kv_lora_rank + config.qk_rope_head_dim) * layers, layers
    from latentkv.arch import geometry_of

    geo = geometry_of(config)
    return geo.kv_values_per_token_per_layer * geo.num_layers, geo.num_layers


@torch.no_grad()
def measured_kv_values(model, tokens: int = 16) -> int:
    """Values per token that the model's HF cache really holds (summed over layers)."""
    from latentkv.modeling import cached_forward, new_dynamic_cache

    device = next(model.parameters()).device
    ids = torch.arange(1, tokens + 1, device=device)[None] % model.config.vocab_size
    cache = new_dynamic_cache(model.config)
    cached_forward(model, ids, cache)
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and t.numel():
                total += t.numel() // t.shape[0] // t.shape[-2]
    return total


def evaluate(spec: str, *, eval_text=None, window=512, windows=64, batch_size=4, device="cpu", dtype="float32",
             gguf_file=None, trust_remote_code=False, decode_check=False, decode_tokens=256, source=None) -> dict:
    """Perplexity and KV values of ``spec``; with ``source`` also its agreement with that model
    (KL(source || model) per token and top-1 agreement on the same windows)."""
    from latentkv.calibration.runner import check_device, resolve_dtype
    from latentkv.eval.perplexity import PerplexityProtocol, eval_windows, perplexity
    from latentkv.modeling import load_model

    check_device(device)  # before anything is read
    torch_dtype = resolve_dtype(dtype)
    opened = _open(spec, gguf_file, trust_remote_code)
    model = load_model(opened.folder, dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code)
    tokenizer = opened.tokenizer()
    protocol = PerplexityProtocol(**({"text": eval_text} if eval_text else {}), window=window, windows=windows)
    ids = eval_windows(tokenizer, protocol)
    agreement = None
    t0 = time.perf_counter()
    if source is None:
        ppl = perplexity(model, ids, batch_size=batch_size)
    else:  # the model's perplexity comes from the same forward passes as its agreement with the source
        agreement = source_agreement(model, tokenizer, source, ids, batch_size=batch_size, device=device,
                                     dtype=torch_dtype, trust_remote_code=trust_remote_code)
        ppl = agreement["perplexity"]
    seconds = time.perf_counter() - t0
    values, layers = declared_kv_values(model.config)
    measured = measured_kv_values(model)
    expanded = measured != values and model.config.model_type in EXPANDED_IN_TRANSFORMERS
    if measured != values and not expanded:
        raise LatentKVError(
            f"The model's cache holds {measured} values per token but its config declares {values}; "
            "the checkpoint's modeling code and config disagree"
        )
    elem = DTYPE_BYTES.get(torch_dtype, 2)
    report = {
        "model": spec,
        "perplexity": ppl,
        "protocol": protocol.describe(),
        "predicted_tokens": int(ids[:, 1:].numel()),
        "kv_values_per_token_per_layer": values / layers,
        "kv_values_per_token": values,
        "kv_bytes_per_token": values * elem,
        "kv_bytes_per_token_per_layer": values * elem / layers,
        "cache_dtype": str(torch_dtype).replace("torch.", ""),
        "eval_seconds": round(seconds, 1),
    }
    if expanded:
        report["transformers_cache_values_per_token"] = measured
        report["note"] = (f"transformers' {type(model).__name__} caches decompressed keys and values ({measured} values per "
                          "token); vLLM and SGLang cache the latent and RoPE key counted above")
    if agreement is not None:
        report["agreement"] = agreement
    if decode_check:
        from latentkv.eval.decode import decode_check as run_check

        report["decode_check"] = run_check(model, tokenizer, ids[0], num_tokens=decode_tokens)
    return report


def source_agreement(model, tokenizer, source: str, ids: torch.Tensor, *, batch_size: int, device, dtype,
                     trust_remote_code: bool) -> dict:
    """`latentkv eval --source`: the source model run over the same windows as ``model``."""
    from latentkv.eval.agreement import agreement
    from latentkv.finetune.pipeline import check_same_tokenizer
    from latentkv.modeling import load_model

    reference = _open(source, None, trust_remote_code)
    check_same_tokenizer(tokenizer, reference.tokenizer(), source, role="--source")
    ref_model = load_model(reference.folder, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return {"source": source, **agreement(model, ref_model, ids, batch_size=batch_size)}


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
    arch = get_arch(config)
    geo = geometry_of(config)
    G, d, L = geo.num_kv_heads, geo.head_dim, geo.num_layers
    src = 2 * G * d
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
        "per-head q/k norm": arch.qk_norm,
    }
    rows = [("source (GQA)" if G < geo.num_heads else "source (MHA)", f"K and V: 2 x {G} x {d}", src)]
    for n in range(G - 1, 0, -1):
        if G % n == 0 and not arch.gqa_refusal:
            rows.append((f"gqa --num-kv-heads {n}", f"2 x {n} x {d}", 2 * n * d))
    for frac in (0.5, 1 / 3, 0.25):
        v = int(round(frac * src))
        rows.append((f"mla --kv-budget {frac:.2g}", f"latent + RoPE key = {v}", v))
    if geo.num_heads % 2 == 0 or geo.num_heads % 3 == 0:
        hc = 2 if geo.num_heads % 2 == 0 else 3
        rows.append((f"gla --latent-heads {hc} --kv-budget 0.5", f"{hc} latent heads + RoPE key", int(round(src / 2))))
    if not arch.deepseek_refusal:
        rows.append(("mla --format deepseek --kv-lora-rank 4d", f"{4 * d} + {min(64, d)}", 4 * d + min(64, d)))
    targets = [
        {"target": t, "what": w, "values": v, "percent": 100 * v / src, "bytes_bf16_all_layers": 2 * v * L}
        for t, w, v in rows
    ]
    engines = [] if arch.deepseek_refusal or geo.rotary_dim < d else engine_rows(geo)
    return {"architecture": info, "targets": targets, "engines": engines}
