"""Serve one model folder with vLLM's offline `LLM` and report what the check needs, as JSON.

Runs in the vLLM environment (scripts/check_vllm.sh makes it); imports nothing from latentkv.
Greedy decoding of the given token ids, EOS ignored (the same number of tokens as transformers'
reference), and the KV cache capacity vLLM allocated in the cache space it was given
(VLLM_CPU_KVCACHE_SPACE on CPU).

    python scripts/vllm_worker.py MODEL PROMPTS.json OUT.json [--max-tokens 48] [--rope-op vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("prompts", help="JSON list of token-id lists")
    parser.add_argument("out")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rope-op", choices=("torch", "vllm"), default="torch",
                        help="torch: switch off vLLM's own rotary op, which mishandles MLA's 3-D views on CPU")
    args = parser.parse_args()
    # The engine core in this process: its cache configuration is then readable here.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(open(args.prompts).read())
    custom_ops = ["all", "-rotary_embedding"] if args.rope_op == "torch" else ["all"]
    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0, enforce_eager=True,
              compilation_config={"custom_ops": custom_ops})
    load_s = time.perf_counter() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    t0 = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                           SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True))
    generate_s = time.perf_counter() - t0
    result = {
        "vllm_version": vllm.__version__,
        "kv_cache_tokens": cache.num_gpu_blocks * cache.block_size,
        "block_size": cache.block_size,
        "num_blocks": cache.num_gpu_blocks,
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "load_s": round(load_s, 1),
        "generate_s": round(generate_s, 1),
        "rope_op": args.rope_op,
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
