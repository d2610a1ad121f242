"""Healing curves: PPL and KL to the teacher against training tokens, one run per target, in windows.

    python scripts/bench_heal_curve.py [--targets mla:0.25,mla:0.5,gta,gla3:0.5] [--points 20e6,...,500e6]
        [--gpus N [--fsdp]] [--window-minutes 9] [--plot]

Per target: convert the source (once; `scripts/bench_heal.py`'s conversion, best one-shot settings
by default), then one `latentkv finetune --mode attention` run of max(--points) tokens (one cosine
schedule) that evaluates at 0 tokens and at every point: WikiText-2 perplexity by the project's
protocol (docs/evaluation.md; --eval-windows) and KL(teacher || student) on held-out text sampled
from the source with a seed the training text does not use. --gpus 1 runs one process; --gpus N
runs data parallel through `accelerate launch` (--fsdp: FULL_SHARD, for a model that does not fit
one GPU). The global batch and data order do not depend on N, so the curves of any N compare.

Windows: with --window-minutes M every command stops (the finetune with a checkpoint) before M
minutes have passed, and exits with code 75; rerunning the same command resumes where it stopped.
Points already in the JSONL are not recomputed. The command exits 0 once every target's curve is
complete. Each evaluation point is one line of OUT_DIR/NAME.jsonl (fields: docs/healing.md);
--plot draws NAME.png (PPL against tokens, log x, the published healing budgets marked) and NAME.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_heal import convert_source, launcher  # noqa: E402

from latentkv.data import DEFAULT_CALIBRATION  # noqa: E402
from latentkv.finetune.flops import FORMULA  # noqa: E402

log = logging.getLogger("bench_heal_curve")

WINDOW_EXIT = 75  # the window ended before the curves were complete: rerun the same command
STARTUP_S = 60.0  # least window left in which a finetune start (loading, compilation, a step) is worth launching
DEFAULT_POINTS = "20e6,50e6,100e6,250e6,500e6"
DEFAULT_TARGETS = "mla:0.25,mla:0.5,gta,gla3:0.5"
# Healing budgets published for converted models (training tokens; other models, so only the budgets are marked).
PUBLISHED = [
    ("CARE", 0, "0 tokens (one-shot)"), ("CARE", 1e9, "1B tokens"), ("CARE", 3e9, "3B tokens"),
    ("TransMLA", 6e9, "6B tokens"), ("X-EcoMLA", 3.6e9, "3.6B tokens, 7-8B models"),
    ("X-EcoMLA", 7e9, "7B tokens, 7-8B models"),
]
# Best one-shot start per target (docs/method.md): sequential calibration with the output refit.
BEST_ONESHOT = {"mla": {"sequential": True, "refit_output": True}, "gla": {"sequential": True, "refit_output": True},
                "gta": {"refit_output": True}}


class UsageError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"bench_heal_curve.py: error: {message}")


def parse_points(text: str) -> list[int]:
    try:
        points = [int(float(t)) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--points takes token counts separated by commas, e.g. {DEFAULT_POINTS}; got {text!r}")
    if not points or points[0] <= 0 or any(b <= a for a, b in zip(points, points[1:])):
        raise UsageError(f"--points must be positive and strictly increasing (e.g. {DEFAULT_POINTS}); got {text}")
    return points


def parse_target(spec: str) -> dict:
    """mla:0.25, gla3:0.5 (3 latent heads), gta -> the conversion settings."""
    name, _, budget = spec.partition(":")
    heads = None
    if name.startswith("gla"):
        heads = int(name[3:] or 3)
        name = "gla"
    if name not in ("mla", "gla", "gta") or (name == "gta") != (budget == ""):
        raise UsageError(f"--targets entry {spec!r}: use mla:BUDGET, glaH:BUDGET (H latent heads) or gta, "
                         f"e.g. {DEFAULT_TARGETS}")
    try:
        kv_budget = float(budget) if budget else None
    except ValueError:
        raise UsageError(f"--targets entry {spec!r}: the KV budget must be a number in (0, 1]")
    if kv_budget is not None and not 0 < kv_budget <= 1:
        raise UsageError(f"--targets entry {spec!r}: the KV budget must be in (0, 1]")
    return {"spec": spec, "to": name, "kv_budget": kv_budget, "latent_heads": heads,
            "folder": spec.replace(":", "-")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="model to convert and distil from (default: SmolLM2-135M-Instruct from its PyPI wheel)")
    p.add_argument("--targets", default=DEFAULT_TARGETS, help="conversions, comma-separated: mla:F, glaH:F, gta")
    p.add_argument("--points", default=DEFAULT_POINTS, help="training tokens at which the curve is measured (the "
                   "run's length is the last); 0 tokens (one-shot) is always measured too")
    p.add_argument("--gpus", type=int, default=1, help="processes: 1 = plain process, N > 1 = accelerate launch, data parallel")
    p.add_argument("--fsdp", action="store_true", help="shard the student over the GPUs (FSDP FULL_SHARD) instead of replicating it")
    p.add_argument("--layer-class", default="LlamaDecoderLayer", help="--fsdp: the decoder layer class wrapped")
    p.add_argument("--accelerate", action="store_true", help="launch through `accelerate launch` even with --gpus 1")
    p.add_argument("--window-minutes", type=float, help="stop every command before this many minutes (rerun to go on)")
    p.add_argument("--window-reserve-s", type=float, default=30.0,
                   help="seconds of each window kept for the last checkpoint and the exit")
    p.add_argument("--window-steps", type=int, help="at most this many optimizer steps per command (rerun to go on)")
    p.add_argument("--data", default="teacher", help="training text: `teacher` (sampled from the source, one file per "
                   "GPU) or a file, folder or datasets name")
    p.add_argument("--sample-tokens", type=float, default=100e6, help="--data teacher: tokens to sample in all")
    p.add_argument("--sample-batch", type=int, default=1024, help="--data teacher: rows sampled together")
    p.add_argument("--kl-data", help="held-out text for the KL to the teacher (default: sampled from the source, seed "
                   "1000000)")
    p.add_argument("--kl-windows", type=int, default=16, help="held-out windows for the KL")
    p.add_argument("--kl-window", type=int, default=512, help="tokens per held-out window")
    p.add_argument("--eval-windows", type=int, default=64, help="512-token WikiText-2 windows (the protocol: 64)")
    p.add_argument("--oneshot", default="best", choices=["best", "plain"],
                   help="best: sequential calibration + output refit (MLA, GLA), refit (GTA); plain: neither")
    p.add_argument("--calib-data", default=DEFAULT_CALIBRATION, help="calibration text of the conversion")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--target", default="attention", help="what is trained: attention or attention+mlp")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (one cosine schedule to the last point)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per optimizer step, all GPUs together")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (besides the window's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the layers (default: on a GPU)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--work", default="runs/heal_curve", help="folder for the converted models, texts and checkpoints")
    p.add_argument("--out-dir", default="runs/heal_curve", help="where NAME.jsonl (and with --plot NAME.png/.md) go")
    p.add_argument("--name", default="heal_curve")
    p.add_argument("--plot", action="store_true", help="draw NAME.png and write NAME.md from the JSONL")
    p.add_argument("--report-only", action="store_true", help="only --plot / the table from the JSONL; train nothing")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args) -> None:
    """Every option error before any work."""
    args.point_list = parse_points(args.points)
    args.target_list = [parse_target(t) for t in args.targets.split(",") if t.strip()]
    if not args.target_list:
        raise UsageError(f"--targets is empty; e.g. {DEFAULT_TARGETS}")
    if args.gpus < 1:
        raise UsageError(f"--gpus must be >= 1, got {args.gpus}")
    if args.fsdp and args.gpus < 2:
        raise UsageError("--fsdp shards the model over several GPUs: pass --gpus N with N >= 2")
    if args.batch_size % args.gpus or (args.batch_size // args.gpus) % min(args.micro_batch_size, args.batch_size // args.gpus):
        raise UsageError(f"--batch-size {args.batch_size} must split into --gpus {args.gpus} equal shares, each a "
                         f"multiple of --micro-batch-size {args.micro_batch_size}")
    if args.window_steps is not None and args.window_steps < 1:
        raise UsageError(f"--window-steps must be >= 1, got {args.window_steps}")
    if args.window_minutes is not None:
        least = (2 * STARTUP_S + args.window_reserve_s) / 60
        if args.window_reserve_s < 0 or args.window_minutes < least:
            raise UsageError(f"--window-minutes {args.window_minutes:g} is too short: a window must hold the start-up of "
                             f"this command and of a run ({2 * STARTUP_S:.0f} s) and --window-reserve-s "
                             f"({args.window_reserve_s:g} s); give at least {least:g} minutes")
    if args.kl_windows < 1 or args.kl_window < 2 or args.eval_windows < 1:
        raise UsageError("--kl-windows and --eval-windows must be >= 1 and --kl-window >= 2")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compile is None:
        args.compile = args.device.startswith("cuda")


# --- the JSONL ---------------------------------------------------------------------------------

def read_points(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_points(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


# --- one window ---------------------------------------------------------------------------------

class Window:
    def __init__(self, args):
        self.start = time.monotonic()
        self.end = self.start + 60 * args.window_minutes - args.window_reserve_s if args.window_minutes else None

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()


def run_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def sample(args, source: Path, out: Path, tokens: int, seed: int, gpu: int | None):
    cmd = [sys.executable, "-m", "latentkv.cli", "sample", str(source), str(out), "--tokens", str(tokens),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.sample_batch), "--seed", str(seed),
           "--device", "cuda" if args.device.startswith("cuda") else "cpu"]
    env = run_env()
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    log.info("$ %s", " ".join(cmd))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)


def texts(args, source: Path, work: Path, window: Window) -> tuple[str, str] | None:
    """(training text, held-out text), sampled from the source as needed: one process per GPU, each
    with its own seed; None when the window ended first (the sampling resumes on the next command)."""
    jobs = []
    data = args.data
    if args.data == "teacher":
        folder = work / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        n = args.gpus if args.device.startswith("cuda") else 1
        for i in range(n):
            part = folder / f"part-{i}.jsonl"
            if not part.exists():
                jobs.append(sample(args, source, part, int(args.sample_tokens) // n, seed=i,
                                   gpu=i if args.device.startswith("cuda") else None))
        data = str(folder)
    heldout = args.kl_data
    if heldout is None:
        heldout = str(work / f"heldout-{args.kl_windows}x{args.kl_window}.jsonl")
        if not Path(heldout).exists():
            # documents are cut at EOS and joined again: twice the windows' tokens is plenty
            jobs.append(sample(args, source, Path(heldout), 2 * args.kl_windows * args.kl_window, seed=10**6,
                               gpu=0 if args.device.startswith("cuda") else None))
    for job in jobs:
        try:
            code = job.wait(timeout=max(0.0, window.left()))
        except subprocess.TimeoutExpired:
            for j in jobs:
                j.terminate()
            for j in jobs:
                j.wait()
            return None
        if code != 0:
            raise SystemExit(f"`latentkv sample` failed with exit code {code}")
    return data, heldout


def converted(args, target: dict, source: Path, work: Path) -> tuple[Path, float]:
    """The target's converted model (made once) and its KV cache as a fraction of the source's."""
    folder = work / target["folder"]
    info = folder / "convert.json"
    if info.is_file():
        saved = json.loads(info.read_text())
        return Path(saved["model"]), saved["kv_fraction"]
    options = dict(BEST_ONESHOT[target["to"]]) if args.oneshot == "best" else {}
    ns = argparse.Namespace(to=target["to"], kv_budget=target["kv_budget"] or 0.0, latent_heads=target["latent_heads"],
                            method_options=json.dumps(options), calib_data=args.calib_data,
                            calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, device=args.device)
    folder.mkdir(parents=True, exist_ok=True)
    model, seconds, kv = convert_source(ns, source, folder)
    fraction = kv["kv_values_per_token"] / kv["source_kv_values_per_token"]
    info.write_text(json.dumps({"model": str(model), "kv_fraction": fraction, "convert_seconds": seconds,
                                "method_options": options, **kv}, indent=2) + "\n")
    return model, fraction


def finetune_command(args, model: Path, out: Path, source: Path, data: str, heldout: str, seconds: float) -> list[str]:
    cmd = [*launcher(args.gpus, accelerate=args.accelerate, fsdp=args.fsdp, layer_class=args.layer_class,
                     cpu=not args.device.startswith("cuda")),
           "finetune", str(model), str(out), "--teacher", str(source), "--data", data, "--mode", "attention",
           "--target", args.target, "--tokens", str(args.point_list[-1]), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size),
           "--lr", str(args.lr), "--eval-windows", str(args.eval_windows), "--kl-data", heldout,
           "--kl-windows", str(args.kl_windows), "--kl-window", str(args.kl_window),
           "--checkpoint-every", str(args.checkpoint_every), "--compile" if args.compile else "--no-compile"]
    for t in [0, *args.point_list]:
        cmd += ["--eval-at", str(t)]
    if seconds != float("inf"):
        cmd += ["--stop-after-seconds", f"{seconds:.0f}"]
    if args.window_steps is not None:
        cmd += ["--stop-after-steps", str(args.window_steps)]
    return cmd


def run_state(out: Path) -> tuple[dict, bool]:
    """What the finetune run has recorded: the final summary when it is done, else its newest checkpoint."""
    from latentkv.finetune.state import latest_checkpoint

    summary = out / "latentkv_finetune.json"
    if summary.is_file():
        return json.loads(summary.read_text()), True
    ckpt = latest_checkpoint(out.with_name(out.name + ".checkpoints"))
    if ckpt is None:
        return {}, False
    state = json.loads((ckpt / "state.json").read_text())
    return {"evals": state.get("evals", []), "teacher": state.get("teacher_perplexity")}, False


def heal_target(args, target: dict, source: Path, work: Path, jsonl: Path, window: Window,
                data: str, heldout: str) -> bool:
    """Advance one target's curve as far as the window allows; True when its curve is complete."""
    wanted = [0, *args.point_list]
    done = {r["tokens"] for r in read_points(jsonl) if r["target"] == target["spec"]}
    if all(t in done for t in wanted):
        log.info("%s: every point is in %s already", target["spec"], jsonl)
        return True
    model, fraction = converted(args, target, source, work)
    out = work / target["folder"] / f"healed-{tokens_label(args.point_list[-1])}"
    recorded, complete = run_state(out)
    wall_file = work / target["folder"] / "wall.json"
    wall = json.loads(wall_file.read_text())["seconds"] if wall_file.is_file() else 0.0
    if not complete:
        left = window.left()
        if left < STARTUP_S:
            return False
        cmd = finetune_command(args, model, out, source, data, heldout, left)
        log.info("$ %s", " ".join(cmd))
        t0 = time.monotonic()
        # the finetune stops by itself before `left`; the reserve covers its exit, the kill (of the
        # launcher and its processes) is a guard, and the next command resumes from the last checkpoint
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=run_env(), start_new_session=True)
        try:
            code = proc.wait(timeout=left + args.window_reserve_s if window.end is not None else None)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        wall += time.monotonic() - t0
        wall_file.write_text(json.dumps({"seconds": wall}) + "\n")
        if code not in (0, None):
            raise SystemExit(f"`latentkv finetune` failed with exit code {code} (its log: {out}.log)")
        recorded, complete = run_state(out)
    from latentkv.eval.perplexity import PerplexityProtocol

    protocol = PerplexityProtocol(windows=args.eval_windows).describe()
    rows = []
    for e in recorded.get("evals", []):
        if e["tokens"] in wanted and e["tokens"] not in done:
            rows.append({
                "target": target["spec"], "kv_fraction": fraction, "tokens": int(e["tokens"]),
                "ppl": e["perplexity"], "kl": e.get("kl"), "tokens_per_s": e.get("tokens_per_s"),
                "mfu": e.get("mfu"), "mfu_formula": FORMULA, "gpus": args.gpus,
                "launch": "fsdp" if args.fsdp else ("data parallel" if args.gpus > 1 else
                                                     "accelerate, one process" if args.accelerate else "one process"),
                "device": device_name(args.device), "train_s": e.get("train_seconds"), "wall_s": wall,
                "source_ppl": recorded.get("teacher"), "protocol": protocol,
                "heldout": Path(heldout).name, "lr": args.lr, "batch_tokens": args.batch_size * args.seq_len,
            })
            done.add(e["tokens"])
    append_points(jsonl, rows)
    for r in rows:
        log.info("%s at %s tokens: PPL %.4g, KL %.4g", r["target"], tokens_label(r["tokens"]), r["ppl"], r["kl"] or float("nan"))
    return complete and all(t in done for t in wanted)


def tokens_label(tokens: float) -> str:
    """500000000 -> 500M, 3.6e9 -> 3.6B, 512 -> 512."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if tokens >= scale:
            return f"{tokens / scale:g}{unit}"
    return f"{tokens:g}"


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


# --- report ----------------------------------------------------------------------------------------

def table(rows: list[dict], points: list[int]) -> str:
    targets = list(dict.fromkeys(r["target"] for r in rows))
    cols = [0, *points]
    head = "| target | KV | " + " | ".join("one-shot" if t == 0 else tokens_label(t) for t in cols) + " |"
    lines = ["WikiText-2 PPL (KL to the teacher on held-out samples) at each training-token count:", "",
             head, "|" + " --- |" * (len(cols) + 2)]
    for target in targets:
        mine = {r["tokens"]: r for r in rows if r["target"] == target}
        frac = next(iter(mine.values()))["kv_fraction"]
        cells = [f"{mine[t]['ppl']:.2f} ({mine[t]['kl']:.3f})" if t in mine and mine[t].get("kl") is not None
                 else (f"{mine[t]['ppl']:.2f}" if t in mine else "") for t in cols]
        lines.append(f"| {target} | {100 * frac:.0f}% | " + " | ".join(cells) + " |")
    src = next((r["source_ppl"] for r in rows if r.get("source_ppl")), None)
    if src:
        lines += ["", f"Source: {src:.2f}."]
    speed = [r for r in rows if r.get("tokens_per_s")]
    if speed:
        r = speed[-1]
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
        lines += [f"Throughput ({r['gpus']} x {r['device']}, {r['launch']}): {r['tokens_per_s']:,.0f} tokens/s{mfu} "
                  f"at the last point of {r['target']}; {FORMULA}."]
    lines += ["", "Published healing budgets (other models; marked on the plot): " +
              "; ".join(f"{name} {label}" for name, _, label in PUBLISHED) + "."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    floor = None
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = sorted((r for r in rows if r["target"] == target), key=lambda r: r["tokens"])
        trained = [r for r in mine if r["tokens"] > 0]
        line = ax.plot([r["tokens"] for r in trained], [r["ppl"] for r in trained], "o-",
                       label=f"{target} ({100 * mine[0]['kv_fraction']:.0f}% KV)")[0]
        start = [r for r in mine if r["tokens"] == 0]
        if start and trained:  # the one-shot start drawn at the left edge, dashed to the first point
            floor = min(floor or trained[0]["tokens"], trained[0]["tokens"] / 3)
            ax.plot([trained[0]["tokens"] / 3, trained[0]["tokens"]], [start[0]["ppl"], trained[0]["ppl"]], "--",
                    color=line.get_color())
            ax.plot([trained[0]["tokens"] / 3], [start[0]["ppl"]], "s", color=line.get_color())
    src = next((r["source_ppl"] for r in rows if r.get("source_ppl")), None)
    if src:
        ax.axhline(src, color="black", lw=0.8, ls=":", label=f"source ({src:.2f})")
    for name, tokens, label in PUBLISHED:
        if tokens > 0:
            ax.axvline(tokens, color="grey", lw=0.8, ls="-.")
            ax.annotate(f"{name}\n{label}", (tokens, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                        rotation=90, va="top", ha="right", color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (squares: one-shot, 0 tokens)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("Healing curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, jsonl: Path) -> None:
    rows = read_points(jsonl)
    if not rows:
        log.info("no points in %s yet", jsonl)
        return
    text = table(rows, args.point_list)
    print(text)
    if args.plot:
        png = jsonl.with_suffix(".png")
        plot(rows, png)
        jsonl.with_suffix(".md").write_text(f"# Healing curves\n\n![healing curves]({png.name})\n\n{text}")
        log.info("wrote %s and %s", png, jsonl.with_suffix(".md"))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out_dir, work = Path(args.out_dir), Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{args.name}.jsonl"
    if args.report_only:
        report(args, jsonl)
        return 0
    window = Window(args)
    work.mkdir(parents=True, exist_ok=True)
    if args.source:
        source = Path(args.source)
    else:
        from latentkv.io.assets import smollm2_folder

        source = smollm2_folder()
    complete = False
    made = texts(args, source, work, window)
    if made is not None:
        data, heldout = made
        complete = True
        for target in args.target_list:
            if not heal_target(args, target, source, work, jsonl, window, data, heldout):
                complete = False
                break
    report(args, jsonl)
    if not complete:
        print(json.dumps({"status": "window ended; rerun the same command to continue", "jsonl": str(jsonl)}))
        return WINDOW_EXIT
    print(json.dumps({"status": "complete", "jsonl": str(jsonl)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
