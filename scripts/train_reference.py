#!/usr/bin/env python
"""Train a small multi-head (MHA) Llama on Project Gutenberg: a real MHA source for `--to gqa`.

Most public checkpoints use GQA already; when no trained MHA model is at hand, this script makes
one: a byte-level BPE tokenizer (`tokenizers`, vocab 8192) trained on the Gutenberg books shipped
with latentkv (or --data), then a Llama with RoPE and as
many KV heads as query heads, trained from scratch in bf16 with AdamW and a cosine schedule. A
held-out slice of the books (every 50th 4096-token block) is never trained on; the weights with
the best held-out loss are kept. The output is a plain Hugging Face folder (safetensors,
tokenizer, generation_config.json) that `AutoModelForCausalLM.from_pretrained` loads, plus
`data_split/{train,heldout}.txt` (the text trained on and the held-out text) and
`training_report.json`.

Never train on WikiText (it is the evaluation text). Outputs are produced, never committed.

Examples:
  # about 23 M parameters, a few minutes on one H100
  python scripts/train_reference.py --out runs/mha-ref --device cuda
  # CPU smoke test (tiny settings, a minute)
  python scripts/train_reference.py --out runs/mha-smoke --device cpu --preset smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from latentkv.calibration.data import TextSource, load_texts, tokenize_stream  # noqa: E402
from latentkv.data import DEFAULT_CALIBRATION  # noqa: E402

log = logging.getLogger("train_reference")

PRESETS = {
    # ~23 M parameters: 6 layers, 8 heads of 64, hidden 512, MHA (8 KV heads), tied embeddings.
    "default": dict(vocab=8192, layers=6, hidden=512, heads=8, intermediate=1408, seq_len=512, batch=32,
                    lr=1.5e-3, epochs=10.0, time_budget=200.0, eval_every=100),
    # CPU smoke test: a tiny model on a slice of the text.
    "smoke": dict(vocab=512, layers=2, hidden=64, heads=4, intermediate=128, seq_len=128, batch=8,
                  lr=3e-3, epochs=1.0, time_budget=60.0, eval_every=10, max_steps=20, max_chars=400_000),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", default=DEFAULT_CALIBRATION,
                   help="training text: file or folder of .txt books (never WikiText; default: the shipped Gutenberg books)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (faster steps, slower start)")
    for name, typ in (("vocab", int), ("layers", int), ("hidden", int), ("heads", int), ("intermediate", int),
                      ("seq_len", int), ("batch", int), ("lr", float), ("epochs", float), ("time_budget", float),
                      ("eval_every", int), ("max_steps", int), ("max_chars", int)):
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def train_tokenizer(texts: list[str], vocab: int, out: Path):
    """Byte-level BPE on the training books; saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", model_max_length=1 << 20)
    fast.save_pretrained(out)
    return fast


def split_tokens(ids: torch.Tensor, block: int = 4096, every: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out set: every `every`-th block of `block` tokens; the rest, joined, is training text."""
    n = ids.numel() // block
    blocks = ids[: n * block].view(n, block)
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[min(every // 2, n - 1) :: every] = True  # at least one held-out block
    return torch.cat([blocks[~is_val].flatten(), ids[n * block :]]), blocks[is_val].flatten()


def write_split(tokenizer, train: torch.Tensor, val: torch.Tensor, folder: Path) -> None:
    """The training and held-out text as files, so later steps can calibrate on text the model was
    trained on and measure in-domain perplexity on text it never saw."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "heldout.txt").write_text(tokenizer.decode(val.tolist()), encoding="utf-8")
    (folder / "train.txt").write_text(tokenizer.decode(train.tolist()), encoding="utf-8")


def build_model(args, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=max(2048, args.seq_len),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def evaluate(model, val: torch.Tensor, seq_len: int, batch: int, device, dtype) -> float:
    model.eval()
    windows = val[: (val.numel() // seq_len) * seq_len].view(-1, seq_len)[:64]
    total, count = 0.0, 0
    for s in range(0, windows.shape[0], batch):
        x = windows[s : s + batch].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        count += x[:, 1:].numel()
    model.train()
    return total / count


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    log.info("compute dtype %s on %s (bf16 autocast on GPU, fp32 on CPU)", dtype, device)
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    texts = load_texts(TextSource(args.data))
    if args.max_chars:
        texts = [t[: args.max_chars // len(texts)] for t in texts]
    tokenizer = train_tokenizer(texts, args.vocab, args.out)
    ids = tokenize_stream(tokenizer, texts)
    train, val = split_tokens(ids, block=min(4096, 8 * args.seq_len))
    write_split(tokenizer, train, val, args.out / "data_split")
    log.info("tokenizer: vocab %d; %d training tokens, %d held-out (%.0f s)", len(tokenizer), train.numel(),
             val.numel(), time.perf_counter() - t_start)

    model = build_model(args, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d layers, hidden %d, %d heads (MHA), %.1f M parameters", args.layers, args.hidden, args.heads,
             n_params / 1e6)
    step_model = torch.compile(model) if args.compile else model
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    tokens_per_step = args.batch * args.seq_len
    total_steps = max(1, int(args.epochs * train.numel() / tokens_per_step))
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup = max(1, min(100, total_steps // 10))
    gen = torch.Generator().manual_seed(args.seed)
    best = (float("inf"), None, 0)
    history = []
    model.train()
    t_train = time.perf_counter()
    step = 0
    while step < total_steps:
        starts = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        x = torch.stack([train[s : s + args.seq_len] for s in starts.tolist()]).to(device, non_blocking=True)
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total_steps))
        for g in opt.param_groups:
            g["lr"] = max(lr, args.lr * 0.02)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = step_model(x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = time.perf_counter() - t_train
        last = step == total_steps or elapsed > args.time_budget
        if step % args.eval_every == 0 or last:
            val_loss = evaluate(model, val, args.seq_len, args.batch, device, dtype)
            history.append({"step": step, "train_loss": loss.item(), "val_loss": val_loss, "seconds": round(elapsed, 1)})
            log.info("step %d/%d: train %.3f, held-out %.3f (PPL %.1f), %.0f s", step, total_steps, loss.item(),
                     val_loss, math.exp(val_loss), elapsed)
            if val_loss < best[0]:
                best = (val_loss, copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()}), step)
        if last:
            if elapsed > args.time_budget and step < total_steps:
                log.info("time budget of %.0f s reached at step %d of %d", args.time_budget, step, total_steps)
            break

    model.load_state_dict(best[1])
    log.info("kept the weights of step %d (held-out loss %.3f, PPL %.1f)", best[2], best[0], math.exp(best[0]))
    save(model.cpu().float(), tokenizer, args, history, best, n_params, time.perf_counter() - t_start)


def save(model, tokenizer, args, history, best, n_params, seconds):
    from transformers import GenerationConfig

    model.config.dtype = "float32"
    model.save_pretrained(args.out)  # safetensors
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, max_new_tokens=64, do_sample=False).save_pretrained(args.out)
    report = {
        "parameters": n_params, "best_step": best[2], "held_out_loss": best[0], "held_out_ppl": math.exp(best[0]),
        "seconds": round(seconds, 1), "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "history": history,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=1))
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    log.info("sample: %r", tokenizer.decode(out[0]))
    log.info("saved %s (%.0f s in all)", args.out, seconds)


if __name__ == "__main__":
    main()
