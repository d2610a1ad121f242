"""Healing benchmark (GPU): SmolLM2-135M -> MLA at 25% of its KV cache, then healed by distillation.

    python scripts/bench_heal.py [--source FOLDER] [--corpora DIR] [--out-dir DIR] [--deadline S]

1. the source's WikiText-2 perplexity (ASSETS.md protocol: 64 x 512-token windows, float32);
2. `latentkv convert` to MLA at kv_budget 0.25, calibrated on Gutenberg (128 x 256 tokens): one-shot figure;
3. per mode (`attention`: the converted attention's full weights; `lora`: peft adapters), one healing
   run on Gutenberg with perplexity measured at 5M / 20M / 50M tokens of the same run, and its
   steady-state tokens/s and MFU (formula printed with the table).
A short probe run (its checkpoint is then resumed) measures the step time first; token targets that
would not finish before `--deadline` seconds are dropped, largest first, and the table says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latentkv.finetune import FinetuneOptions, finetune  # noqa: E402
from latentkv.finetune.flops import FORMULA  # noqa: E402

log = logging.getLogger("bench_heal")
SOURCE_PPL_REFERENCE = 29.53  # ASSETS.md, same protocol
OVERHEAD_S = 45.0  # per (re)started run: loading, tokenising, compiling, evaluating before/after, saving


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="SmolLM2-135M folder (default: latentkv.io.assets.smollm2_folder())")
    p.add_argument("--corpora", default=str(ROOT.parent / "shared" / "corpora"))
    p.add_argument("--work", default="/tmp/bench_heal")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    p.add_argument("--name", default="heal_h100")
    p.add_argument("--modes", default="attention,lora")
    p.add_argument("--tokens", default="50e6,20e6", help="planned tokens per mode, in --modes order")
    p.add_argument("--eval-at", default="5e6,20e6,50e6")
    p.add_argument("--to", default="mla", choices=["mla", "gla", "gta", "gta-s"],
                   help="conversion target (gta-s: widths through --method-options, e.g. {\"map_heads\": 1, \"kv_lora_rank\": 160})")
    p.add_argument("--kv-budget", type=float, default=0.25, help="mla/gla (gta has a fixed width)")
    p.add_argument("--latent-heads", type=int, default=3, help="gla")
    p.add_argument("--method-options", default="{}", help='more conversion settings as JSON, e.g. {"refit_output": true}')
    p.add_argument("--data", default="gutenberg", choices=["gutenberg", "teacher"],
                   help="training text: the Gutenberg books, or text sampled from the source (`latentkv sample`)")
    p.add_argument("--sample-tokens", type=float, default=10e6, help="--data teacher: tokens to sample")
    p.add_argument("--sample-file", help="--data teacher: JSONL to reuse or write (default WORK/teacher-<N>M.jsonl)")
    p.add_argument("--sample-batch", type=int, default=1024, help="--data teacher: rows sampled together")
    p.add_argument("--target", default="attention", help="what is trained: attention or attention+mlp")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--lr-attention", type=float, default=3e-4)
    p.add_argument("--lr-lora", type=float, default=1e-4)
    p.add_argument("--mlp-lr-scale", type=float, default=1.0, help="MLP lr as a fraction of the lr (finetune --mlp-lr-scale)")
    p.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the hidden-state match (finetune --hidden-weight)")
    p.add_argument("--transfer-tokens", type=float, default=0, help="tokens of attention transfer first (finetune --transfer-tokens)")
    p.add_argument("--transfer-lr", type=float, help="its peak lr (finetune --transfer-lr; default the mode's lr)")
    p.add_argument("--anneal-rank", type=int, help="latent width kept (finetune --anneal-rank; convert wider)")
    p.add_argument("--anneal-tokens", type=float, help="tokens over which the extra latent dims fade (finetune --anneal-tokens)")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--probe-steps", type=int, default=12)
    p.add_argument("--deadline", type=float, default=1e9, help="seconds from start for everything")
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


def source_perplexity(folder: Path, eval_text: Path, device: str) -> float:
    from transformers import AutoTokenizer

    from latentkv.eval.perplexity import PerplexityProtocol, eval_windows, perplexity
    from latentkv.modeling import load_model

    windows = eval_windows(AutoTokenizer.from_pretrained(str(folder)), PerplexityProtocol(text=str(eval_text)))
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
        calib=CalibOptions(data=str(Path(args.corpora) / "gutenberg"), samples=args.calib_samples,
                           seq_len=args.calib_seq_len, cache=str(work / "calib")),
        device=args.device,
    ))
    return out, time.perf_counter() - t0, {"kv_values_per_token": r.kv_values_per_token,
                                           "source_kv_values_per_token": r.source_kv_values_per_token}


def plan_tokens(candidates: list[int], tps: float, seconds_left: float, done: int, overhead: float) -> int | None:
    """The largest token target whose remaining steps (10% margin) fit in the time left."""
    for t in sorted(candidates, reverse=True):
        if 1.1 * (t - done) / tps + overhead <= seconds_left:
            return t
    return None


def training_text(args, source: Path, work: Path) -> tuple[str, dict]:
    """The --data choice as a path, and what making it cost (sampling from the source)."""
    if args.data == "gutenberg":
        return str(Path(args.corpora) / "gutenberg"), {}
    from latentkv.finetune.teacher_text import SampleOptions, sample_teacher_text

    path = Path(args.sample_file or work / f"teacher-{args.sample_tokens / 1e6:g}M.jsonl")
    if path.exists():
        return str(path), {"sample_file": str(path), "sampled_now": False}
    r = sample_teacher_text(SampleOptions(teacher=str(source), output=str(path), tokens=int(args.sample_tokens),
                                          seq_len=args.seq_len, batch_size=args.sample_batch, device=args.device))
    return str(path), {"sample_file": str(path), "sampled_now": True, "sample_tokens": r.tokens,
                       "sample_documents": r.documents, "sample_seconds": r.seconds, "sample_tokens_per_s": r.tokens_per_s}


def heal(args, mode: str, planned: int, model: Path, source: Path, work: Path, deadline: float,
         reserve_s: float, data: str) -> dict:
    """Probe, decide the token target that fits, then run it (resuming the probe where possible)."""
    # an evaluation where attention transfer hands over to the KL phase shows what each phase gave
    step_tokens = args.batch_size * args.seq_len
    handover = {round(args.transfer_tokens / step_tokens) * step_tokens} if args.transfer_tokens else set()
    eval_at = sorted({t for t in _floats(args.eval_at) if t <= planned} | handover)
    lr = args.lr_attention if mode == "attention" else args.lr_lora
    base = FinetuneOptions(
        model=str(model), output=str(work / f"{mode}-{planned // 10**6}M"), data=data,
        teacher=str(source), mode=mode, target=args.target, lora_rank=args.lora_rank, tokens=planned, seq_len=args.seq_len,
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=lr, compile=args.compile,
        hidden_weight=args.hidden_weight, mlp_lr_scale=args.mlp_lr_scale, transfer_tokens=int(args.transfer_tokens),
        transfer_lr=args.transfer_lr, anneal_rank=args.anneal_rank,
        anneal_tokens=int(args.anneal_tokens) if args.anneal_tokens else None, eval_text=str(Path(args.corpora) / "wikitext-2-raw" / "wiki.test.raw"), eval_at=tuple(eval_at),
        log_every=args.probe_steps // 3, checkpoint_every=0, overwrite=True,
        command=f"scripts/bench_heal.py --to {args.to} --modes {mode} --target {args.target} --data {args.data}",
    )
    t0 = time.perf_counter()
    probe = finetune(dataclasses.replace(base, stop_after_steps=args.probe_steps))
    probe_s = time.perf_counter() - t0
    tps = probe.tokens_per_s
    left = deadline - time.perf_counter() - reserve_s
    # A restart costs what the probe spent beyond its steps (loading, compiling, evaluating), plus saving.
    overhead = max(OVERHEAD_S, probe_s - probe.tokens / tps + 10)
    target = plan_tokens(eval_at or [planned], tps, left, probe.tokens, overhead)
    log.info("%s probe: %d steps in %.0f s (with start-up and compilation), %.0f tokens/s steady, MFU %s; "
             "%.0f s left for this mode -> %s tokens", mode, probe.steps, probe_s, tps,
             f"{100 * probe.mfu:.1f}%" if probe.mfu else "n/a", left, target)
    row = {"mode": mode, "lr": lr, "probe_seconds": probe_s, "probe_tokens_per_s": tps, "planned_tokens": planned,
           "probe_mfu": probe.mfu}
    if target is None:
        row["note"] = "no token target fitted in the time left"
        return row
    opts = dataclasses.replace(base, log_every=25)
    if target != planned:  # another schedule: a fresh run (the probe's checkpoint does not apply)
        opts = dataclasses.replace(opts, tokens=target, eval_at=tuple(t for t in eval_at if t <= target),
                                   output=str(work / f"{mode}-{target // 10**6}M"),
                                   transfer_tokens=int(opts.transfer_tokens * target / planned),  # the same share
                                   anneal_tokens=int(opts.anneal_tokens * target / planned) if opts.anneal_tokens else None)
        row["note"] = f"planned {planned / 1e6:.0f}M tokens did not fit the time left; ran {target / 1e6:.0f}M"
    t0 = time.perf_counter()
    r = finetune(opts)
    row.update(
        seconds=time.perf_counter() - t0, tokens=r.tokens, steps=r.steps, tokens_per_s=r.tokens_per_s,
        flops_per_token=r.flops_per_token, mfu=r.mfu, trainable_params=r.trainable_params,
        before=r.before, after=r.after, evals=r.evals, resumed_from=r.resumed_from,
        teacher_perplexity=r.teacher_perplexity, lora_rank=args.lora_rank if mode == "lora" else None,
    )
    return row


def _describe_data(result: dict) -> str:
    info = result.get("data_info") or {}
    if not info:
        return f"{result.get('data', 'Gutenberg')} (the 13 Gutenberg books, 1.57M tokens)"
    text = f"{info['sample_file']}: sampled from the source at temperature 1 (`latentkv sample`)"
    if info.get("sampled_now"):
        text += (f", {info['sample_tokens'] / 1e6:.1f}M tokens in {info['sample_documents']:,} documents, "
                 f"{info['sample_seconds']:.0f} s ({info['sample_tokens_per_s']:,.0f} tokens/s)")
    return text


def report(result: dict) -> str:
    lines = [
        f"# Healing SmolLM2-135M-Instruct after {result['to'].upper()} conversion at "
        f"{100 * result['kv_values_per_token'] / result['source_kv_values_per_token']:.0f}% of the KV cache",
        "",
        f"Device: {result['device']}. Perplexity: {result['protocol']}.",
        f"Source (fp32): **{result['source_ppl']:.2f}** (ASSETS.md: {SOURCE_PPL_REFERENCE}); one-shot conversion: "
        f"**{result['oneshot_ppl']:.2f}** (conversion {result['convert_seconds']:.0f} s).",
        f"Training text: {_describe_data(result)}.",
        "",
        "| mode | trained params | lr | tokens | WikiText-2 PPL | vs source | tokens/s | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| source | | | | {result['source_ppl']:.2f} | | | |",
        f"| one-shot (0 tokens) | | | 0 | {result['oneshot_ppl']:.2f} | "
        f"{100 * (result['oneshot_ppl'] / result['source_ppl'] - 1):+.1f}% | | |",
    ]
    for row in result["runs"]:
        if "evals" not in row:
            lines.append(f"| {row['mode']} | | | | | | {row.get('probe_tokens_per_s', 0):.0f} (probe) | | ")
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") else "n/a"
        for e in row["evals"]:
            lines.append(
                f"| {row['mode']} | {row['trainable_params'] / 1e6:.1f}M | {row['lr']:g} | {e['tokens'] / 1e6:.1f}M | "
                f"{e['perplexity']:.2f} | {100 * (e['perplexity'] / result['source_ppl'] - 1):+.1f}% | "
                f"{row['tokens_per_s']:,.0f} | {mfu} |"
            )
    lines += ["", f"MFU: {FORMULA}; peak 989 TFLOP/s (H100 SXM dense bf16). tokens/s: steady state "
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
    deadline = t_start + args.deadline
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.source:
        source = Path(args.source)
    else:
        from latentkv.io.assets import smollm2_folder

        source = smollm2_folder()
    eval_text = Path(args.corpora) / "wikitext-2-raw" / "wiki.test.raw"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    src_ppl = source_perplexity(source, eval_text, args.device)
    log.info("source perplexity %.3f", src_ppl)
    model, convert_s, kv = convert_source(args, source, work)
    oneshot = source_perplexity(model, eval_text, args.device)
    log.info("one-shot perplexity %.3f (conversion %.0f s)", oneshot, convert_s)
    from latentkv.eval.perplexity import PerplexityProtocol

    data, data_info = training_text(args, source, work)
    log.info("training text: %s %s", data, data_info)
    result = {
        "data": data, "data_info": data_info,
        "device": device, "to": args.to, "kv_budget": args.kv_budget, "protocol": PerplexityProtocol(text=str(eval_text)).describe(),
        "source_ppl": src_ppl, "oneshot_ppl": oneshot, "convert_seconds": convert_s, **kv, "runs": [],
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out_dir", "name")},
        "mfu_formula": FORMULA,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = args.modes.split(",")
    planned = _floats(args.tokens)
    for i, mode in enumerate(modes):
        # Keep time for a short run (the smallest evaluation point) of every later mode.
        later = len(modes) - i - 1
        reserve = later * (OVERHEAD_S * 2 + min(_floats(args.eval_at)) / 3e5)
        try:
            row = heal(args, mode, planned[i], model, source, work, deadline, reserve, data)
        except Exception as exc:  # one mode failing should not lose the other's figures
            log.exception("%s failed", mode)
            row = {"mode": mode, "note": f"failed: {type(exc).__name__}: {exc}"}
        result["runs"].append(row)
        (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / f"{args.name}.md").write_text(report(result))
    print(report(result))
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
