"""Time a GPU conversion of a Llama-3-8B-shaped checkpoint (random weights: timing, not quality).

Builds the checkpoint (bf16 safetensors, Llama-3 geometry and RoPE scaling) and a BPE tokenizer
trained on the calibration text (default: the Gutenberg books shipped with latentkv), then runs the
real CLI on one GPU and reports wall time and peak memory:

    python scripts/bench_convert_gpu.py [--calib TEXT] [--work runs/convert_gpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentkv.data import DEFAULT_CALIBRATION, logical_suffix, read_text, resolve_text  # noqa: E402


def build_checkpoint(folder: Path, calib: Path, layers: int) -> None:
    import torch
    from transformers import LlamaConfig

    from latentkv.io.writer import ShardedWriter

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    )
    config.save_pretrained(folder)
    gen = torch.Generator(device="cuda").manual_seed(0)
    writer = ShardedWriter(folder, max_shard_size="5GB")

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen, device="cuda") * std).to(torch.bfloat16)

    D, I, H, G, d = 4096, 14336, 32, 8, 128
    writer.add("model.embed_tokens.weight", rand(config.vocab_size, D))
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (H * d, D)), ("self_attn.k_proj", (G * d, D)),
                            ("self_attn.v_proj", (G * d, D)), ("self_attn.o_proj", (D, H * d)),
                            ("mlp.gate_proj", (I, D)), ("mlp.up_proj", (I, D)), ("mlp.down_proj", (D, I))):
            writer.add(p + name + ".weight", rand(*shape))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            writer.add(p + norm + ".weight", torch.ones(D, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(D, dtype=torch.bfloat16))
    writer.add("lm_head.weight", rand(config.vocab_size, D))
    writer.close()
    train_tokenizer(folder, calib)


def train_tokenizer(folder: Path, calib: Path, vocab_size: int = 8000) -> None:
    """A byte-level BPE tokenizer trained on the calibration text, saved into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    files = sorted(f for f in calib.iterdir() if logical_suffix(f) == ".txt") if calib.is_dir() else [calib]
    texts = (read_text(f, errors="replace") for f in files)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib", default=DEFAULT_CALIBRATION,
                   help="calibration text: a .txt file or a folder of them (default: the shipped Gutenberg books)")
    p.add_argument("--work", default="runs/convert_gpu", help="folder for the random checkpoint and the output")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--extra", nargs="*", default=["--kv-lora-rank", "512", "--qk-rope-dim", "64"])
    args = p.parse_args()
    work = Path(args.work)
    src = work / "llama3-8b-random"
    t0 = time.perf_counter()
    if not (src / "tokenizer.json").exists():
        build_checkpoint(src, Path(resolve_text(args.calib)), args.layers)
    print(f"built {src} in {time.perf_counter() - t0:.0f} s", flush=True)
    cmd = [sys.executable, "-m", "latentkv.cli", "convert", str(src), str(work / "out"), "--to", "mla", *args.extra,
           "--calib-data", args.calib, "--calib-samples", str(args.samples), "--calib-seq-len", str(args.seq_len),
           "--device", "cuda", "--dtype", "bfloat16", "--save-dtype", "bfloat16", "--overwrite",
           "--calib-cache", str(work / "calib"), "-v"]
    subprocess.run(["rm", "-rf", str(work / "calib")], check=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    import torch

    result = {"gpu": torch.cuda.get_device_name(), "layers": args.layers, "calib_tokens": f"{args.samples} x {args.seq_len}",
              "settings": args.extra, "convert_wall_s": round(wall, 1), "peak_rss_gb": round(rss, 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
