"""Training text sampled from the teacher: distillation data when the pretraining corpus is not at hand.

Healing fits the student's next-token distribution to the teacher's on some text, and it learns
the teacher only where that text goes. A small local corpus (the 13 Gutenberg books: 1.6M tokens
of 19th-century prose) is 13 epochs of one style at 20M training tokens. Text sampled from the
teacher at temperature 1 is the teacher's own distribution: every sequence is new, and it visits
what the teacher knows in the proportions the teacher gives it, which is what the KL is taken
over. Each row starts from the document separator that training streams use (the tokenizer's
EOS), so rows are like fresh documents; a row runs on through any EOS it samples and is cut
there into documents.

Output: a JSONL file of {"text": document} rows, read by `--data` like any other. Rounds of
`batch_size` rows are seeded by (seed, round), so a stopped run continues where it was and the
same settings give the same file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from latentkv.calibration.runner import resolve_dtype
from latentkv.modeling import cached_forward, output_cache
from latentkv.errors import LatentKVError
from latentkv.finetune.options import SampleOptions  # re-exported: its flags are read without torch

log = logging.getLogger(__name__)


@dataclass
class SampleResult:
    output: Path
    tokens: int
    documents: int
    seconds: float
    tokens_per_s: float


def split_documents(row: list[int], separator: int | None) -> list[list[int]]:
    """A sampled row cut at the separator token into its documents (empty pieces dropped)."""
    docs, current = [], []
    for t in row:
        if separator is not None and t == separator:
            if current:
                docs.append(current)
            current = []
        else:
            current.append(t)
    if current:
        docs.append(current)
    return docs


def decode_attention_backends(device: torch.device):
    """SDPA backends for a decode loop: cuDNN's spends ~2 ms of host time per call (measured on an
    H100, torch 2.11), and a decode loop calls it once per layer per token with a new key length,
    which left the GPU idle most of the time; flash and memory-efficient kernels launch in microseconds."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def sample_next(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row drawn from softmax(logits / temperature): [rows, vocab] -> [rows, 1].

    argmax(p / E) with E ~ Exp(1) i.i.d. picks i with probability p_i (the exponential race), the
    same law as torch.multinomial without its host synchronisation and its ~10 ms per 1024 x 49k draw.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1, keepdim=True)


@torch.inference_mode()
def sample_round(model, start_token: int, rows: int, length: int, temperature: float, generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """`rows` sequences of `length` tokens sampled after `start_token` (KV cache, no stopping): [rows, length]."""
    ids = torch.full((rows, 1), start_token, dtype=torch.long, device=device)
    sampled = torch.empty(rows, length, dtype=torch.long, device=device)
    with decode_attention_backends(device):
        out = model(input_ids=ids, use_cache=True)
        for t in range(length):
            nxt = sample_next(out.logits[:, -1], temperature, generator)
            sampled[:, t] = nxt[:, 0]
            if t + 1 < length:
                out = cached_forward(model, nxt, output_cache(out))
    return sampled


def is_sampled_text(path: Path) -> bool:
    """True if `path` looks like what `sample_teacher_text` writes: JSON lines of exactly {"text": str}."""
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh):
                if n >= 3:
                    break
                row = json.loads(line)
                if not (isinstance(row, dict) and set(row) == {"text"} and isinstance(row["text"], str)):
                    return False
    except (OSError, ValueError):
        return False
    return True


def sample_teacher_text(opts: SampleOptions, progress=None) -> SampleResult:
    """Write opts.tokens sampled tokens as documents to opts.output (resumable; the file appears when done).

    progress(done_rounds, rounds) is called after each round.
    """
    from latentkv.io.source import open_source
    from latentkv.modeling import load_model

    from latentkv.io.writer import check_output_file

    out = Path(opts.output).expanduser()
    check_output_file(out, opts.overwrite, sources=(opts.teacher,), is_ours=is_sampled_text)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial, meta_path = out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")
    done, keep_bytes = 0, 0
    if partial.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == opts.resume_key():
            done, keep_bytes = int(meta["rounds"]), int(meta["bytes"])
            log.info("continuing %s after round %d of %d", partial, done, opts.rounds)
        else:
            log.info("a partial file from other settings is replaced: %s", partial)
    partial.touch()
    with open(partial, "r+b") as fh:  # only the rounds the meta file vouches for (a killed run leaves a torn tail)
        fh.truncate(keep_bytes)

    source = open_source(opts.teacher, gguf_file=opts.gguf_file, trust_remote_code=opts.trust_remote_code)
    tokenizer = source.tokenizer()
    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if start is None:
        raise LatentKVError(f"The tokenizer of {opts.teacher} has neither an EOS nor a BOS token to start rows from")
    device = torch.device(opts.device)
    if opts.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = resolve_dtype(opts.dtype)
    model = load_model(source.folder, dtype=dtype, device=str(device), trust_remote_code=opts.trust_remote_code).eval()

    if progress is not None:
        for r in range(done):  # rounds already in the partial file
            progress(r + 1, opts.rounds)
    t0, new_tokens = time.perf_counter(), 0
    for r in range(done, opts.rounds):
        rows = min(opts.batch_size, -(-(int(opts.tokens) - r * opts.batch_size * opts.seq_len) // opts.seq_len))
        gen = torch.Generator(device=device).manual_seed(opts.seed * 1_000_003 + r)
        sampled = sample_round(model, start, rows, opts.seq_len, opts.temperature, gen, device).tolist()
        lines = []
        for row in sampled:
            for doc in split_documents(row, start):
                lines.append(json.dumps({"text": tokenizer.decode(doc)}, ensure_ascii=False))
        with open(partial, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        new_tokens += rows * opts.seq_len
        meta_path.write_text(json.dumps({"key": opts.resume_key(), "rounds": r + 1, "bytes": partial.stat().st_size}))
        log.info("round %d/%d: %d rows x %d tokens, %.0f tokens/s", r + 1, opts.rounds, rows, opts.seq_len,
                 new_tokens / (time.perf_counter() - t0))
        if progress is not None:
            progress(r + 1, opts.rounds)
    os.replace(partial, out)
    meta_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    with open(out, encoding="utf-8") as fh:
        documents = sum(1 for _ in fh)
    total = -(-int(opts.tokens) // opts.seq_len) * opts.seq_len
    return SampleResult(output=out, tokens=total, documents=documents, seconds=seconds,
                        tokens_per_s=new_tokens / seconds if seconds > 0 else float("nan"))
