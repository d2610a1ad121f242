"""Teacher sampler speed (GPU, random weights of SmolLM2-135M's shape): `latentkv sample`'s loop against
the plain HF loop it replaced (torch.multinomial, torch's default SDPA backends), same model, same run.

python3 scripts/bench_sampler.py --rows 1024,2048 --length 512
"""

import argparse
import time

import torch

from latentkv.modeling import cached_forward, output_cache


def smollm2_shaped(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                      rope_theta=100000.0, max_position_embeddings=8192)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).eval()


@torch.inference_mode()
def plain_round(model, start_token, rows, length, temperature, generator, device):
    ids = torch.full((rows, 1), start_token, dtype=torch.long, device=device)
    out = model(input_ids=ids, use_cache=True)
    sampled = torch.empty(rows, length, dtype=torch.long, device=device)
    for t in range(length):
        nxt = torch.multinomial(torch.softmax(out.logits[:, -1].float() / temperature, -1), 1, generator=generator)
        sampled[:, t] = nxt[:, 0]
        if t + 1 < length:
            out = cached_forward(model, nxt, output_cache(out))
    return sampled


def tokens_per_s(fn, model, rows, length, gen, dev):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn(model, 2, rows, length, 1.0, gen, dev)
    torch.cuda.synchronize()
    return rows * length / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1024,2048")
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args()
    from latentkv.finetune.teacher_text import sample_round

    dev = torch.device("cuda")
    model = smollm2_shaped(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, SmolLM2-135M shape (bf16, random weights), rows of {args.length} tokens")
    print("| rows | plain HF loop (tok/s) | latentkv sample loop (tok/s) | speed-up |\n| --- | --- | --- | --- |")
    for rows in map(int, args.rows.split(",")):
        plain = tokens_per_s(plain_round, model, rows, args.length, gen, dev)
        ours = tokens_per_s(sample_round, model, rows, args.length, gen, dev)
        print(f"| {rows} | {plain:,.0f} | {ours:,.0f} | {ours / plain:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
