"""A Qwen2-architecture copy of SmolLM2-135M-Instruct with random q/k/v biases, for measuring the
DeepSeek export of biased sources where no Qwen2 checkpoint can be downloaded.

Qwen2's layers are Llama's with q/k/v biases, so SmolLM2's weights load unchanged. The biases
are shaped like Qwen2's: key biases large (tens of units) in a few channels of each head, value
biases small, query biases of order 0.1. The large key biases sit in the slowest RoPE pairs, where
they turn little over a context: random biases elsewhere leave no working model to measure.

    python scripts/biased_source.py OUT [--seed 0] [--biases q,k,v]
    python scripts/bench_quality.py --source OUT --budgets --samples 32 --windows 8 \\
        --rows "mla:0.5" "mla:0.5:format=deepseek"
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

KEY_BIAS_CHANNELS = 4  # per KV head, the channels with large key biases
KEY_BIAS_SCALE = 20.0
QUERY_BIAS_STD, KEY_BIAS_STD, VALUE_BIAS_STD = 0.1, 0.5, 0.05


BIASES = ("q", "k", "v")


def write_biased_qwen2(source: Path, out: Path, seed: int = 0, biases: tuple[str, ...] = BIASES) -> None:
    """`biases`: which of the query, key and value biases to set (the rest stay zero, for ablations);
    the random draws are the same whichever are kept, so a kept bias is the same in every variant."""
    import transformers

    llama = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    c = llama.config
    config = transformers.Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings,
        hidden_act=c.hidden_act, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=getattr(c, "pad_token_id", None), use_sliding_window=False)
    model = transformers.Qwen2ForCausalLM(config)
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(".bias") for k in missing), (missing, unexpected)
    g = torch.Generator().manual_seed(seed)
    head_dim = c.hidden_size // c.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            q = QUERY_BIAS_STD * torch.randn(attn.q_proj.bias.shape, generator=g)
            v = VALUE_BIAS_STD * torch.randn(attn.v_proj.bias.shape, generator=g)
            k = KEY_BIAS_STD * torch.randn(c.num_key_value_heads, head_dim, generator=g)
            for h in range(c.num_key_value_heads):
                # half-split RoPE layout: pair j is dims j and j + head_dim / 2, the last pairs turn slowest
                slow = torch.arange(head_dim // 2 - KEY_BIAS_CHANNELS // 2, head_dim // 2)
                channels = torch.cat([slow, slow + head_dim // 2])
                signs = torch.randint(0, 2, (KEY_BIAS_CHANNELS,), generator=g) * 2 - 1
                k[h, channels] = KEY_BIAS_SCALE * signs * (1 + torch.rand(KEY_BIAS_CHANNELS, generator=g))
            for name, proj, bias in (("q", attn.q_proj, q), ("k", attn.k_proj, k.flatten()), ("v", attn.v_proj, v)):
                proj.bias.copy_(bias if name in biases else torch.zeros_like(bias))
    model.save_pretrained(out)
    for name in os.listdir(source):  # tokenizer and generation config
        if name.startswith(("tokenizer", "special_tokens", "generation_config", "vocab", "merges")):
            (out / name).write_bytes((source / name).read_bytes())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--source", type=Path, default=None, help="SmolLM2 folder (default: latentkv's cached copy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--biases", default="q,k,v",
                   help="which biases to set, comma-separated from q, k, v (default all; the others are zero)")
    args = p.parse_args()
    biases = tuple(b for b in args.biases.split(",") if b)
    if not biases or set(biases) - set(BIASES):
        p.error(f"--biases takes a comma-separated subset of {','.join(BIASES)}, got {args.biases!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from latentkv.io.assets import smollm2_folder

    write_biased_qwen2(args.source or smollm2_folder(), args.out, args.seed, biases)


if __name__ == "__main__":
    main()
