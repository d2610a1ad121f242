#!/usr/bin/env python
"""End-to-end greedy decoding speed: the source model through transformers' generate against the
converted model through latentkv's paged latent cache and decode kernels (eager and CUDA graph).

Random weights of a real geometry (``latentkv.modeling.synthetic``: the source Llama and its MLA at
25% of the KV cache) -- speed does not depend on the values. Every row decodes ``--batch`` prompts of
``--prompt`` tokens; the decode time per step is (time for N new tokens - time for 2) / (N - 2), so
prefill (and the graph capture, which both runs include) is left out; each row is run ``--repeat`` times and the median kept. bf16 on one GPU.

    python scripts/bench_generate.py                                   # SmolLM2-135M shape, batch 64
    python scripts/bench_generate.py --geometry llama-1b --batch 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", default="smollm2-135m", choices=["smollm2-135m", "llama-1b"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=129, help="N: tokens generated in the timed run")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--static-source", action="store_true",
                   help="also time the source with transformers' static cache (which compiles its decoding step)")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: profile the graphed latentkv run (host vs GPU time, top ops)")
    return p.parse_args(argv)


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def per_step_ms(run, new_tokens: int, repeat: int) -> float:
    """Median over ``repeat`` of (t(N) - t(2)) / (N - 2), in ms; one warm-up of each first."""
    run(2), run(new_tokens)
    steps = [(timed(lambda: run(new_tokens)) - timed(lambda: run(2))) / (new_tokens - 2) for _ in range(repeat)]
    return statistics.median(steps) * 1e3


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_generate times decoding on a CUDA GPU.")
    from latentkv.runtime.decode import generate_ids
    from latentkv.modeling import synthetic

    dev = torch.device("cuda")
    torch.manual_seed(0)
    source, student = synthetic.pair(args.geometry)
    source = source.to(dev, torch.bfloat16).eval()
    student = student.to(dev, torch.bfloat16).eval()
    vocab = source.config.vocab_size
    prompts = torch.randint(100, vocab, (args.batch, args.prompt), device=dev)

    def hf(n):
        with torch.no_grad():
            source.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            attention_mask=torch.ones_like(prompts), pad_token_id=0)  # fmt: skip

    def hf_static(n):
        with torch.no_grad():
            source.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static",
                            attention_mask=torch.ones_like(prompts), pad_token_id=0)  # fmt: skip

    def latentkv(n, graph):
        generate_ids(student, prompts.tolist(), n, backend="triton", page_size=args.page_size,
                     prefill_chunk=args.prompt, cuda_graph=graph)  # fmt: skip

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        latentkv(8, True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            latentkv(args.new_tokens, True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
        return {}
    layers = source.config.num_hidden_layers
    src_bytes = layers * 2 * source.config.num_key_value_heads * 64 * 2
    mla_bytes = sum(a["kv_lora_rank"] + a["rope_dim"] for a in student.config.attention_layers) * 2
    rows = {
        "source, transformers generate (DynamicCache, SDPA)": per_step_ms(hf, args.new_tokens, args.repeat),
        "MLA 25%, latentkv paged cache, eager": per_step_ms(lambda n: latentkv(n, False), args.new_tokens, args.repeat),
        "MLA 25%, latentkv paged cache, CUDA graph": per_step_ms(lambda n: latentkv(n, True), args.new_tokens,
                                                                args.repeat),
    }  # fmt: skip
    if args.static_source:
        rows["source, transformers generate (static cache, compiled by transformers)"] = per_step_ms(
            hf_static, args.new_tokens, args.repeat)
    base = rows["source, transformers generate (DynamicCache, SDPA)"]
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "geometry": args.geometry,
        "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new_tokens,
        "kv_bytes_per_token": {"source": src_bytes, "mla25": mla_bytes},
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "rows": [{"row": k, "ms_per_step": v, "tokens_per_s": args.batch / v * 1e3, "speedup_vs_source": base / v}
                 for k, v in rows.items()],
    }  # fmt: skip
    print(f"{result['device']}; {args.geometry}, batch {args.batch}, prompt {args.prompt}, KV bytes/token "
          f"source {src_bytes} / MLA {mla_bytes}")  # fmt: skip
    print("| row | ms / decode step | tokens/s | vs source |")
    print("|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['row']} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:,.0f} | {r['speedup_vs_source']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
