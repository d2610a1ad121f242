"""The command line as a user meets it: instant help, clear one-line errors, recipes, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from latentkv.cli import app
from tiny_models import TINY_TEXT

runner = CliRunner()


def test_help_is_instant_and_imports_nothing_heavy():
    """Guards start-up time: `--help` must not import torch/transformers (import-time work)."""
    code = "import sys, latentkv.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "latentkv.cli", "--help"], check=True, capture_output=True)
    assert time.perf_counter() - t0 < 10


def test_convert_eval_inspect_roundtrip(tiny_model_dir, tmp_path):
    """Guards the CLI wiring: convert with shared calibration flags, then eval --json and inspect read it back."""
    out = tmp_path / "out"
    res = runner.invoke(app, [
        "convert", str(tiny_model_dir("llama")), str(out), "--to", "mla", "--kv-budget", "0.5",
        "--calib-data", str(TINY_TEXT), "--calib-samples", "8", "--calib-seq-len", "64",
        "--calib-cache", str(tmp_path / "cache"), "--set", "rope_mix=real",
    ])
    assert res.exit_code == 0, res.output
    recipe = (out / "latentkv_recipe.yaml").read_text()
    assert "rope_mix: real" in recipe
    assert "latentkv convert" in (out / "README.md").read_text()
    res = runner.invoke(app, ["eval", str(out), "--json", "--eval-text", str(TINY_TEXT), "--eval-windows", "2", "--eval-window", "64"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["kv_values_per_token"] == 64 and report["perplexity"] > 1
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["architecture"]["model_type"] == "latentkv"


def test_eval_agreement_with_source(tiny_model_dir, tmp_path):
    """Guards `eval --source`: a model agrees with itself exactly (KL 0, top-1 1), a compressed conversion
    differs (KL > 0) on the very windows its perplexity is taken on, and a source with another
    vocabulary is refused (token ids would mean different things)."""
    import shutil

    from transformers import AutoTokenizer

    src = tiny_model_dir("llama")
    out = tmp_path / "mla"
    res = runner.invoke(app, ["convert", str(src), str(out), "--to", "mla", "--kv-budget", "0.5", "--calib-data",
                              str(TINY_TEXT), "--calib-samples", "8", "--calib-seq-len", "64",
                              "--calib-cache", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    window = ["--json", "--eval-text", str(TINY_TEXT), "--eval-windows", "3", "--eval-window", "64", "--batch-size", "2"]

    def agreement(model, source):
        res = runner.invoke(app, ["eval", str(model), "--source", str(source), *window])
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout.strip().splitlines()[-1])
        return report, report["agreement"]

    report, same = agreement(src, src)
    assert abs(same["kl_to_source"]) < 1e-6 and same["top1_agreement"] == 1.0 and same["tokens"] == 3 * 63
    assert same["perplexity"] == pytest.approx(report["perplexity"], rel=1e-6)
    report, converted = agreement(out, src)
    assert converted["kl_to_source"] > 1e-4 and converted["top1_agreement"] < 1.0
    res = runner.invoke(app, ["eval", str(out), *window])  # the plain perplexity path, no source
    assert res.exit_code == 0, res.output
    plain = json.loads(res.stdout.strip().splitlines()[-1])
    assert "agreement" not in plain
    assert converted["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-5) == report["perplexity"]
    assert converted["source_perplexity"] == pytest.approx(same["perplexity"], rel=1e-5)

    # samples written by `latentkv sample` evaluate as text; a JSON string may hold U+2028 (not a row break)
    rows = [{"text": line + "\u2028" + line} for line in TINY_TEXT.read_text().splitlines() if line.strip()][:400]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    res = runner.invoke(app, ["eval", str(out), "--source", str(src), *window[:2], str(samples), *window[3:]])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["agreement"]["kl_to_source"] > 0

    other = tmp_path / "other-source"
    shutil.copytree(src, other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["<only-in-the-source>"])
    tok.save_pretrained(str(other))
    res = runner.invoke(app, ["eval", str(out), "--source", str(other), *window])
    assert res.exit_code == 2 and "another tokenizer" in res.output and "Traceback" not in res.output


def test_recipe_file_and_unknown_keys(tiny_model_dir, tmp_path):
    """Guards --recipe: its settings are used, and an unknown key is refused with the known ones listed."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"to: mla\nkv_budget: 0.5\ncalib_data: {TINY_TEXT}\ncalib_samples: 8\ncalib_seq_len: 64\n")
    res = runner.invoke(app, ["convert", str(tiny_model_dir("qwen2")), str(tmp_path / "o"), "--recipe", str(recipe),
                              "--calib-cache", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("kv_budgit: 0.5\n")
    res = runner.invoke(app, ["convert", str(tiny_model_dir("qwen2")), str(tmp_path / "o2"), "--recipe", str(bad)])
    assert res.exit_code == 2 and "Unknown recipe keys" in res.output and "kv_budget" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("target", [
    ["--to", "mla", "--qk-rope-dim", "16", "--set", "refit_output=true"],
    ["--to", "gqa", "--num-kv-heads", "1"],
    ["--to", "gla", "--latent-heads", "2", "--cache-format", "fp8_e4m3/g8"],
    ["--to", "gta"],
    ["--to", "gta-s"],
    ["--to", "mla", "--format", "deepseek"],
], ids=["mla-refit", "gqa", "gla-fp8", "gta", "gta-s", "mla-deepseek"])
def test_written_recipe_replays_to_identical_weights(tiny_model_dir, tmp_path, target):
    """Guards "the same recipe in and out": converting again from the `latentkv_recipe.yaml` an output
    carries (and nothing else from the first command line) writes byte-identical weights and config."""
    src = str(tiny_model_dir("llama"))
    first, again = tmp_path / "first", tmp_path / "again"
    res = runner.invoke(app, ["convert", src, str(first), *target, "--calib-data", TINY_TEXT, "--calib-samples", "4",
                              "--calib-seq-len", "32", "--calib-seed", "3", "--calib-cache", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["convert", src, str(again), "--recipe", str(first / "latentkv_recipe.yaml"),
                              "--calib-cache", str(tmp_path / "c2")])  # a cold cache: the statistics are recomputed
    assert res.exit_code == 0, res.output
    written = sorted(p.name for p in first.glob("*.safetensors"))
    assert written and written == sorted(p.name for p in again.glob("*.safetensors"))
    for name in written + ["config.json"]:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name


def test_recipe_never_turns_on_remote_code(tiny_model_dir, tmp_path):
    """Guards the replay's one exception: running a checkpoint's own code is asked for on the command
    line, never taken from a recipe file."""
    from latentkv.convert.pipeline import recipe_settings

    settings = recipe_settings({"method": "gqa", "trust_remote_code": True, "calib": {"samples": 4, "cache": "/x"},
                                "resolved": {"num_kv_heads": 1, "grouping": None}, "method_options": {"grouping": "a"}})
    assert settings == {"to": "gqa", "calib_samples": 4, "method_options": {"num_kv_heads": 1, "grouping": "a"}}


@pytest.mark.parametrize("argv,message", [
    (["convert", "/nonexistent/model", "/tmp/x", "--kv-budget", "0.5"], "no such folder"),
    (["eval", "/nonexistent/model"], "no such folder"),
    (["push", "/nonexistent/folder", "user/repo"], ""),
])
def test_bad_input_gives_one_line_error(argv, message):
    """Guards error presentation: user mistakes exit 2 with a message, never a traceback."""
    res = runner.invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert message in res.output.lower()


def test_convert_defaults_to_mla_at_half_the_cache(tiny_model_dir, tmp_path):
    """Guards the default a user expects: `convert SOURCE OUTPUT` with no method option converts to
    MLA at 50% of the KV cache with the shipped calibration text (no sibling folder, no flags)."""
    out = tmp_path / "out"
    res = runner.invoke(app, ["convert", str(tiny_model_dir("llama")), str(out), "--calib-samples", "8",
                              "--calib-seq-len", "64", "--calib-cache", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "mla"
    source_values = 2 * 2 * 16  # tiny llama: 2 KV heads of 16, keys and values
    assert sum(l["kv_lora_rank"] + l["rope_dim"] for l in config["attention_layers"]) == 2 * source_values // 2
    assert "kv_budget: 0.5" in (out / "latentkv_recipe.yaml").read_text()


def test_version_flag():
    """Guards `latentkv --version` (the installed package's version, one line)."""
    from latentkv import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"latentkv {__version__}"


def test_no_deprecated_transformers_calls(tiny_model_dir, tmp_path):
    """Guards against calls transformers has deprecated (they break on a later release, as the
    `past_key_values` -> `cache` rename did): convert, eval with the real cache, the paged decode check
    and the source agreement pass log no deprecation through transformers' logger or warnings."""
    import logging
    import warnings

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()  # warnings an earlier test already triggered must show again
    handler = Collect(level=logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    src, out = tiny_model_dir("llama"), tmp_path / "out"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = runner.invoke(app, ["convert", str(src), str(out), "--calib-data", str(TINY_TEXT),
                                      "--calib-samples", "8", "--calib-seq-len", "64",
                                      "--calib-cache", str(tmp_path / "cache")])
            assert res.exit_code == 0, res.output
            res = runner.invoke(app, ["eval", str(out), "--json", "--eval-text", str(TINY_TEXT), "--eval-windows", "2",
                                      "--eval-window", "64", "--decode-check", "--decode-tokens", "8",
                                      "--source", str(src)])
            assert res.exit_code == 0, res.output
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    deprecated = [m for m in records if "deprecat" in m.lower()]
    deprecated += [str(w.message) for w in caught if "deprecat" in str(w.message).lower()
                   and "latentkv" in w.filename]
    assert not deprecated, deprecated


def test_finetune_recipe_replays_the_written_options(tiny_converted, tiny_model_dir, tmp_path, monkeypatch):
    """Guards `finetune --recipe`: a run writes its resolved options into its output's recipe, and a
    run from that file resolves to the same options; a hand-written recipe sets option fields that have
    no flag, a flag given on the command line wins, and unknown keys are refused naming the known ones."""
    import yaml

    from latentkv.finetune import pipeline
    from tiny_models import short_training_text

    model, teacher, data = tiny_converted("mla", kv_budget=0.5), tiny_model_dir("llama"), short_training_text(tmp_path)
    res = runner.invoke(app, ["finetune", str(model), str(tmp_path / "healed"), "--teacher", str(teacher), "--data",
                              str(data), "--tokens", "1024", "--seq-len", "64", "--batch-size", "8",
                              "--micro-batch-size", "4", "--lr", "3e-3", "--warmup", "0", "--eval-windows", "0",
                              "--checkpoint-every", "0", "--mode", "attention"])
    assert res.exit_code == 0, res.output
    written = yaml.safe_load((tmp_path / "healed" / "latentkv_recipe.yaml").read_text())["finetune"]
    seen = []

    def capture(opts):
        seen.append(opts)
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "finetune", capture)
    res = runner.invoke(app, ["finetune", str(model), str(tmp_path / "again"), "--recipe",
                              str(tmp_path / "healed" / "latentkv_recipe.yaml")])
    assert res.exit_code == 0, res.output
    assert json.loads(json.dumps(seen[-1].recipe())) == json.loads(json.dumps(written))
    hand = tmp_path / "hand.yaml"
    hand.write_text(yaml.safe_dump({"lora_alpha": 8, "lr": 1e-3, "tokens": 4096, "data": str(data)}))
    res = runner.invoke(app, ["finetune", str(model), str(tmp_path / "hand"), "--recipe", str(hand), "--lr", "2e-3"])
    assert res.exit_code == 0, res.output
    assert (seen[-1].lora_alpha, seen[-1].lr, seen[-1].tokens, seen[-1].data) == (8.0, 2e-3, 4096, str(data))
    hand.write_text(yaml.safe_dump({"learning_rate": 1e-3}))
    res = runner.invoke(app, ["finetune", str(model), str(tmp_path / "bad"), "--recipe", str(hand)])
    assert res.exit_code != 0 and "Unknown finetune recipe keys" in res.output and "lora_alpha" in res.output
