"""The healing-curve benchmark (scripts/bench_heal_curve.py) and the finetune pieces it rests on:
a time-based stop that resumes exactly, KL to the teacher on held-out text, option errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
from tiny_models import TINY_TEXT, damaged_copy, load_script, short_training_text

from latentkv.errors import LatentKVError
from latentkv.finetune import FinetuneOptions, finetune

# fp32 on the CPU, the same data order, and checkpoints that hold the fp32 weights, optimizer
# moments, schedule and random state exactly: a resumed run repeats the uninterrupted one's
# arithmetic. What is left is summation order inside kernels, ~1e-7 relative per operation.
RTOL = 1e-5


def _curve_module():
    return load_script("bench_heal_curve")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve-text")
    heldout = root / "heldout.txt"
    heldout.write_text(TINY_TEXT.read_text(encoding="utf-8")[20000:30000], encoding="utf-8")  # not in train.txt
    return {"train": short_training_text(root), "heldout": heldout, "root": root}


@pytest.mark.parametrize("argv, message", [
    (["--points", "50e6,20e6"], "strictly increasing"),
    (["--points", "20e6,20e6"], "strictly increasing"),
    (["--points", "0,20e6"], "positive"),
    (["--points", "20M"], "token counts"),
    (["--window-minutes", "0.5"], "too short"),
    (["--window-minutes", "2", "--window-reserve-s", "90"], "too short"),
    (["--targets", "mla"], "mla:BUDGET"),
    (["--targets", "gta:0.5"], "mla:BUDGET"),
    (["--targets", "mla:1.5"], r"\(0, 1\]"),
    (["--gpus", "1", "--fsdp"], "--gpus N with N >= 2"),
    (["--gpus", "3"], "--batch-size 64 must split"),
    (["--window-steps", "0"], "--window-steps must be >= 1"),
])
def test_bad_options_fail_before_any_work(argv, message):
    """Guards against a long run started with options that cannot give a curve: each is refused
    at parse time with a message naming the option to fix."""
    curve = _curve_module()
    with pytest.raises(SystemExit, match=message):
        curve.parse_args([*argv, "--device", "cpu"])


def test_targets_and_labels():
    curve = _curve_module()
    specs = [curve.parse_target(t) for t in curve.DEFAULT_TARGETS.split(",")]
    assert [(s["to"], s["kv_budget"], s["latent_heads"]) for s in specs] == [
        ("mla", 0.25, None), ("mla", 0.5, None), ("gta", None, None), ("gla", 0.5, 3)]
    assert len({s["folder"] for s in specs}) == 4  # each target heals in its own folder
    assert curve.parse_points(curve.DEFAULT_POINTS) == [20 * 10**6, 50 * 10**6, 100 * 10**6, 250 * 10**6, 500 * 10**6]
    assert [curve.tokens_label(t) for t in (512, 20e6, 3.6e9)] == ["512", "20M", "3.6B"]


def test_time_window_stops_with_a_checkpoint_and_resumes_exactly(tiny_model_dir, texts, tmp_path):
    """Guards --stop-after-seconds: a process always makes one step, then stops with a checkpoint
    when the next would pass the limit; rerunning continues, and the evaluation records (PPL, KL to
    the teacher on held-out text) equal those of an uninterrupted run."""
    from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert

    source = tiny_model_dir("llama")
    convert(ConvertOptions(source=str(source), output=str(tmp_path / "mla"), method_options=dict(kv_budget=0.5),
                           calib=CalibOptions(data=str(TINY_TEXT), samples=8, seq_len=64, cache=str(tmp_path / "c"))))
    model = damaged_copy(tmp_path / "mla", tmp_path / "damaged", "kv_b_proj")  # far from the teacher: KL to heal

    def opts(out, **kw):
        base = dict(model=str(model), output=str(tmp_path / out), data=str(texts["train"]), teacher=str(source),
                    mode="attention", tokens=4 * 64 * 3, seq_len=64, batch_size=4, lr=1e-3, warmup=0.0,
                    eval_windows=1, eval_window=128, eval_text=str(texts["heldout"]), kl_text=str(texts["heldout"]),
                    kl_windows=2, kl_window=64, eval_at=(0, 256, 768), checkpoint_every=0)
        return FinetuneOptions(**{**base, **kw})

    straight = finetune(opts("straight"))
    steps = []
    while True:  # a limit already passed at the first step: one step per process
        r = finetune(opts("windowed", stop_after_seconds=1e-3))
        steps.append(r.steps)
        if r.output is not None:
            break
    assert steps == [1, 2, 3]
    assert [e["tokens"] for e in r.evals] == [e["tokens"] for e in straight.evals] == [0, 256, 768]
    for a, b in zip(straight.evals, r.evals):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=RTOL)
        assert a["kl"] == pytest.approx(b["kl"], rel=RTOL, abs=1e-7)
        assert a["kl"] >= 0 and (a["tokens_per_s"] is None) == (a["tokens"] == 0)
    assert straight.evals[-1]["kl"] < straight.evals[0]["kl"]  # healing brings the student toward the teacher
    with pytest.raises(LatentKVError, match="held-out"):
        opts("refused", kl_text=str(texts["train"]))


@pytest.mark.slow
def test_curve_in_windows_equals_one_run_and_skips_done_points(tiny_model_dir, texts, tmp_path, monkeypatch):
    """Guards the benchmark's resumption: a curve of two points run in windows (the first stopping
    between the points, with a checkpoint) writes the same JSON lines as one uninterrupted run, every
    field present and typed; rerunning a complete curve recomputes nothing."""
    curve = _curve_module()
    source = tiny_model_dir("llama")
    common = ["--source", str(source), "--targets", "mla:0.5", "--points", "256,512", "--data", str(texts["train"]),
              "--kl-data", str(texts["heldout"]), "--kl-windows", "2", "--kl-window", "64", "--eval-windows", "2",
              "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "2", "--calib-data", str(TINY_TEXT),
              "--calib-samples", "4", "--calib-seq-len", "64", "--device", "cpu", "--no-compile"]
    runs = {}
    for name, extra in (("straight", []), ("windowed", ["--window-steps", "3"])):
        args = [*common, *extra, "--work", str(tmp_path / name), "--out-dir", str(tmp_path / name)]
        codes = [curve.main(args)]
        while codes[-1] == curve.WINDOW_EXIT and len(codes) < 4:
            codes.append(curve.main(args))
        runs[name] = (codes, curve.read_points(tmp_path / name / "heal_curve.jsonl"), args)
    assert runs["straight"][0] == [0]
    assert runs["windowed"][0] == [curve.WINDOW_EXIT, 0]  # 4 steps: 3 in the first window, 1 in the second
    a, b = runs["straight"][1], runs["windowed"][1]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b] == [0, 256, 512]
    for x, y in zip(a, b):
        assert x["ppl"] == pytest.approx(y["ppl"], rel=RTOL)
        assert x["kl"] == pytest.approx(y["kl"], rel=RTOL, abs=1e-7)
    types = {"target": str, "kv_fraction": float, "tokens": int, "ppl": float, "kl": float, "mfu_formula": str,
             "gpus": int, "launch": str, "device": str, "train_s": float, "wall_s": float, "source_ppl": float,
             "protocol": str, "heldout": str, "lr": float, "batch_tokens": int}
    for row in b:
        for key, kind in types.items():
            assert isinstance(row[key], kind), (key, row[key])
        assert row["ppl"] > 1 and row["kl"] >= 0 and row["gpus"] == 1 and row["kv_fraction"] == 0.5
        assert row["mfu"] is None  # no peak rate on a CPU
        assert (row["tokens_per_s"] is None) if row["tokens"] == 0 else row["tokens_per_s"] > 0
        assert "tokens/s" in row["mfu_formula"] and "512-token windows" in row["protocol"]
    assert b[2]["wall_s"] > b[1]["wall_s"] and b[2]["train_s"] > b[1]["train_s"]  # 256 came in the first window

    def no_subprocess(*_, **__):
        raise AssertionError("a complete curve started a process")

    monkeypatch.setattr(curve.subprocess, "Popen", no_subprocess)
    path = tmp_path / "windowed" / "heal_curve.jsonl"
    before = path.read_text()
    plot = importlib.util.find_spec("matplotlib") is not None  # the plot needs the `bench` extra
    assert curve.main([*runs["windowed"][2], *(["--plot"] if plot else [])]) == 0
    assert path.read_text() == before
    if plot:
        assert (tmp_path / "windowed" / "heal_curve.png").stat().st_size > 0
        assert "| mla:0.5 | 50% |" in (tmp_path / "windowed" / "heal_curve.md").read_text()
