"""Peak memory of a CPU conversion against the parts it has to hold, on a checkpoint many times one layer.

Builds a random-weight Llama-shaped float32 checkpoint (weights: memory, not quality) and a BPE
tokenizer trained on the calibration text, converts it with the real CLI in a child process (MLA
at 50%), and reports that process's peak resident memory next to the checkpoint's size and what
a streaming conversion holds: one decoder layer, the embeddings (and untied head), the
calibration activations, the statistics of every layer (memory-mapped from the cache), and the
interpreter with torch and transformers loaded (measured in a child of its own). Every part is
computed from the checkpoint's headers, the settings and the cache, none is typed in.

    python scripts/bench_convert_memory.py [--layers 20 --hidden 1024 ...] [--out benchmarks/convert_memory_cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_convert_gpu import train_tokenizer  # noqa: E402

from latentkv.data import DEFAULT_CALIBRATION, resolve_text  # noqa: E402

MB = 1e6
# The libraries as a conversion of this checkpoint loads them: transformers' Llama modeling code (which
# runs each layer, and pulls in transformers' model and generation stack, ~200 MB) and latentkv's own.
LIBRARIES = ("import torch, transformers; import transformers.models.llama.modeling_llama; "
             "import latentkv.cli, latentkv.convert.pipeline, latentkv.modeling.modeling_latentkv")
# The libraries, then the calibration text tokenized into windows as `convert` does it.
TOKENIZED = LIBRARIES + """
import sys
from latentkv.calibration.data import TextSource, token_windows
from latentkv.io.source import open_source
token_windows(open_source(sys.argv[1]).tokenizer(), TextSource(sys.argv[2], "train", "text"), int(sys.argv[3]),
              int(sys.argv[4]), 0)
"""


def build_checkpoint(folder: Path, calib: Path, args) -> None:
    """Random float32 weights under transformers' Llama names, written tensor by tensor."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from latentkv.io.writer import ShardedWriter

    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(folder, calib, vocab_size=args.vocab)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                         max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         dtype="float32")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    with ShardedWriter(folder, max_shard_size="500MB") as writer:
        for name, shape in shapes.items():
            is_norm = len(shape) == 1
            writer.add(name, torch.ones(shape) if is_norm else torch.randn(shape, generator=gen) * 0.02)
    config.save_pretrained(folder)


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, int, float]:
    """(exit code, peak resident bytes, wall seconds) of one child process; its output goes to `log`.
    Linux carries the peak of the process that forks into the child's, so this parent must stay
    small: it imports neither torch nor transformers before the measurements (the checkpoint is
    built by a child of its own)."""
    import subprocess

    t0 = time.perf_counter()
    with log.open("w") as fh:
        child = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux counts KiB
    return child.returncode, peak, time.perf_counter() - t0


def held_parts(src: Path, cache: Path, samples: int, seq_len: int) -> dict[str, int]:
    """Bytes of what a streaming conversion holds, from the checkpoint headers, the settings and the cache."""
    import math
    import re

    from latentkv.io.lazy import LazyCheckpoint

    weights = LazyCheckpoint(src)
    size = {n: math.prod(weights.shape(n)) * weights.dtype(n).itemsize for n in weights.keys()}
    layer_of = {n: (m.group(1) if (m := re.search(r"\.layers\.(\d+)\.", n)) else None) for n in size}
    per_layer: dict[str, int] = {}
    for n, b in size.items():
        if layer_of[n] is not None:
            per_layer[layer_of[n]] = per_layer.get(layer_of[n], 0) + b
    hidden = json.loads((src / "config.json").read_text())["hidden_size"]
    return {
        "checkpoint": weights.total_bytes,
        "one_layer": max(per_layer.values()),
        "embeddings_and_head": sum(b for n, b in size.items() if layer_of[n] is None),
        "calibration_activations": samples * seq_len * hidden * 4,  # the float32 hidden states of every window
        "statistics": sum(p.stat().st_size for p in cache.rglob("layer_*.pt")),
    }


def stage_memory(log: str) -> list[dict]:
    """The CLI's `memory after STAGE: N MB resident, peak so far P MB` lines (-v), stages in order,
    the layers of one pass folded into one row (the highest resident figure among them)."""
    import re

    rows: list[dict] = []
    for m in re.finditer(r"memory after (.+?): (\d+) MB resident, peak so far (\d+) MB", log):
        stage = re.sub(r", layer \d+$", ", every layer", m.group(1))
        resident, peak = int(m.group(2)) * 1_000_000, int(m.group(3)) * 1_000_000
        if rows and rows[-1]["stage"] == stage:
            rows[-1]["resident_after_max_bytes"] = max(rows[-1]["resident_after_max_bytes"], resident)
            rows[-1]["resident_after_last_bytes"] = resident
            rows[-1]["peak_so_far_bytes"] = peak
        else:
            rows.append({"stage": stage, "resident_after_max_bytes": resident, "resident_after_last_bytes": resident,
                         "peak_so_far_bytes": peak})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib", default=DEFAULT_CALIBRATION, help="calibration text (default: the shipped Gutenberg books)")
    p.add_argument("--work", default="runs/convert_memory", help="folder for the random checkpoint and the output")
    p.add_argument("--out", default="benchmarks/convert_memory_cpu", help="writes OUT.md and OUT.json")
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)  # the child that builds
    args = p.parse_args()
    work = Path(args.work)
    src = work / f"llama-random-{args.layers}x{args.hidden}"
    if args.build_only:
        build_checkpoint(src, Path(resolve_text(args.calib)), args)
        return
    if not (src / "config.json").exists():
        import subprocess

        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--build-only"], check=True)
        print(f"built {src} in {time.perf_counter() - t0:.0f} s", flush=True)
    cache = work / "calib"
    shutil.rmtree(cache, ignore_errors=True)  # statistics computed afresh: the calibration pass is measured
    rc, libraries, _ = run_measured([sys.executable, "-c", LIBRARIES], work / "libraries.log")
    rc2, tokenized, _ = run_measured([sys.executable, "-c", TOKENIZED, str(src), args.calib, str(args.samples),
                                      str(args.seq_len)], work / "tokenized.log")
    if rc or rc2:
        sys.exit(f"importing the libraries or tokenizing failed: see {work}/libraries.log, tokenized.log")
    cmd = [sys.executable, "-m", "latentkv.cli", "convert", str(src), str(work / "out"), "--to", "mla",
           "--kv-budget", "0.5", "--calib-data", args.calib, "--calib-samples", str(args.samples),
           "--calib-seq-len", str(args.seq_len), "--calib-cache", str(cache), "--overwrite", "-v"]
    # -v: the CLI logs its memory at the end of every stage; a wide console keeps each line whole.
    rc, peak, wall = run_measured(cmd, work / "convert.log", env={"COLUMNS": "400"})
    log = (work / "convert.log").read_text(errors="replace")
    if rc:
        sys.exit(f"the conversion failed (exit {rc}): see {work / 'convert.log'}")
    parts = held_parts(src, cache, args.samples, args.seq_len)
    bound = libraries + sum(v for k, v in parts.items() if k != "checkpoint")
    logged = [line.strip() for line in log.splitlines() if "peak memory" in line]
    result = {
        # The work folder is written as WORK: the record names no path of the machine it ran on.
        "command": " ".join(["python scripts/bench_convert_memory.py", *sys.argv[1:]]).replace(str(work), "WORK"),
        "convert_command": " ".join(["latentkv", *cmd[3:]]).replace(str(work), "WORK"),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, {_total_memory_gb():.0f} GB RAM, {platform.system()}",
        "versions": _versions(),
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab")},
        "calibration": f"{args.samples} x {args.seq_len} tokens",
        "convert_wall_s": round(wall, 1),
        "peak_rss_bytes": peak,
        "libraries_rss_bytes": libraries,
        "libraries_and_tokenized_text_rss_bytes": tokenized,
        **{f"{k}_bytes": v for k, v in parts.items()},
        "held_bound_bytes": bound,
        "convert_log_line": logged[-1] if logged else None,
        "stages": stage_memory(log),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(json.dumps(result, indent=1))


def _markdown(r: dict) -> str:
    rows = [
        ("checkpoint (float32 safetensors)", r["checkpoint_bytes"]),
        ("one decoder layer", r["one_layer_bytes"]),
        ("embeddings and LM head", r["embeddings_and_head_bytes"]),
        (f"calibration activations ({r['calibration']}, float32)", r["calibration_activations_bytes"]),
        ("statistics of every layer (cache files, memory-mapped)", r["statistics_bytes"]),
        ("interpreter + torch + transformers (its Llama modeling code) + latentkv imported (own child process)",
         r["libraries_rss_bytes"]),
        ("the same + the calibration text tokenized into windows (own child process)",
         r["libraries_and_tokenized_text_rss_bytes"]),
        ("sum of the four held parts + the libraries", r["held_bound_bytes"]),
        ("**peak resident memory of `latentkv convert`**", r["peak_rss_bytes"]),
    ]
    table = "\n".join(f"| {name} | {b / MB:,.1f} |" for name, b in rows)
    gap = r["peak_rss_bytes"] - r["held_bound_bytes"]
    stages = r.get("stages") or []
    reached = next((st["stage"] for st in stages if st["peak_so_far_bytes"] >= r["peak_rss_bytes"] - MB), None)
    stage_rows = "\n".join(
        f"| {st['stage']} | {st['resident_after_max_bytes'] / MB:,.0f} | {st['peak_so_far_bytes'] / MB:,.0f} |"
        for st in stages)
    stage_table = f"""
Memory at the end of each stage, from the CLI's own `-v` lines (`ru_maxrss` and `VmRSS` read in the
process at each stage's end; a pass over the layers is one row, with the highest figure among its layers):

| stage | resident after it (MB) | peak so far (MB) |
| --- | ---: | ---: |
{stage_rows}
""" if stages else ""
    verdict = (f"The peak is within the held parts and the libraries ({-gap / MB:,.0f} MB to spare)." if gap <= 0 else
               f"The peak exceeds the held parts and the libraries by {gap / MB:,.0f} MB"
               + (f"; it was reached while {reached}." if reached else "."))
    shape = ", ".join(f"{k} {v}" for k, v in r["shape"].items())
    return f"""# Peak memory of a CPU conversion ({r['machine']})

A random-weight Llama-shaped checkpoint ({shape}) converted to MLA at 50% of its KV cache, the
CLI in a child process; its peak resident set (`ru_maxrss` from `wait4`) against what a streaming
conversion holds. Every part is computed by the script from the checkpoint's headers, the
settings and the statistics cache.

| quantity | MB |
| --- | ---: |
{table}

The peak is {r['peak_rss_bytes'] / r['checkpoint_bytes']:.2f}x the checkpoint and
{r['peak_rss_bytes'] / r['held_bound_bytes']:.2f}x the sum of the held parts and the libraries;
the checkpoint is {r['checkpoint_bytes'] / r['one_layer_bytes']:.0f} layers' worth. {verdict} Conversion wall time
{r['convert_wall_s']} s. The CLI's own line: `{r['convert_log_line']}`.
{stage_table}
Command: `{r['command']}` (runs `{r['convert_command']}`).
Versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}.
"""


def _total_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return float("nan")


def _versions() -> dict:
    import torch
    import transformers

    import latentkv

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "latentkv": latentkv.__version__}


if __name__ == "__main__":
    main()
