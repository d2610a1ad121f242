"""Random-weight source / converted model pairs of real geometries, for throughput benchmarks.

Speed does not depend on the weights' values, so `scripts/bench_heal.py --synthetic` and
`scripts/bench_generate.py` time real shapes without a checkpoint: a Llama of the geometry (the
source) and a latentkv MLA model of the same shape at 25% of its KV cache (the converted model).
"""

from __future__ import annotations

# (rope_dim, kv_lora_rank) per layer of SmolLM2-135M converted to MLA at 25% (the H100 run of bench_heal).
SMOLLM2_25 = [(36, 60), (24, 72), (24, 72), (24, 72), (24, 72), (24, 72), (12, 84), (12, 84), (12, 84), (36, 60),
              (24, 72), (24, 72), (24, 72), (36, 60), (12, 84), (24, 72), (24, 72), (24, 72), (12, 84), (24, 72),
              (12, 84), (12, 84), (24, 72), (12, 84), (12, 84), (24, 72), (24, 72), (36, 60), (12, 84), (24, 72)]  # fmt: skip

# name -> (LlamaConfig fields, per-layer (rope_dim, kv_lora_rank) of an MLA at 25% of the KV cache).
# llama-1b: Llama-3.2-1B's geometry (hidden 2048, 32 / 8 heads of 64, 16 layers, vocab 128256); its 25%
# MLA keeps 64 RoPE + 192 latent of the 1024 K/V values a token and layer.
GEOMETRIES = {
    "smollm2-135m": (dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3), SMOLLM2_25),
    "llama-1b": (dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8), [(64, 192)] * 16),
}  # fmt: skip


def source_config(geometry: str):
    """The source model's LlamaConfig (head dim 64, tied embeddings)."""
    from transformers import LlamaConfig

    shape, _ = GEOMETRIES[geometry]
    return LlamaConfig(**shape, head_dim=64, tie_word_embeddings=True, max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 100000.0})  # fmt: skip


def pair(geometry: str):
    """(source LlamaForCausalLM, latentkv MLA-25% LatentKVForCausalLM), random weights, on the CPU."""
    from transformers import LlamaForCausalLM

    from latentkv.modeling.modeling_latentkv import LatentKVConfig, LatentKVForCausalLM

    cfg = source_config(geometry)
    inv = [100000.0 ** (-2 * j / 64) for j in range(32)]
    specs = [dict(kv_lora_rank=r, rope_dim=d, rope_inv_freq=inv[: d // 2], qk_nope_head_dim=64, latent_heads=1)
             for d, r in GEOMETRIES[geometry][1]]
    source_fields = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "dtype", "torch_dtype")}
    student = LatentKVForCausalLM(LatentKVConfig(source_config=source_fields, attention_layers=specs,
                                                 softmax_scale=0.125, v_head_dim=64, o_bias=True))  # fmt: skip
    return LlamaForCausalLM(cfg), student
