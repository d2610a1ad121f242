"""Bad inputs and faults, as a user meets them on the command line: each case asserts the exit code
(2: one clear line naming the fix, no traceback), the message, and that nothing was lost (every file
that was there is unchanged) or left behind (no half-written output, no cache temporary).

The table `CASES` holds the cases that need only a setup and one command; the faults that need a
first run (a damaged cache, a kill -9, a full disk, reuse of statistics) follow it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import TINY_TEXT, build_tiny_model
from typer.testing import CliRunner

from latentkv.cli import app
from latentkv.io.writer import MARKER_FILE

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


# --- helpers ----------------------------------------------------------------------------------

@pytest.fixture
def work(tmp_path, tiny_model_dir, monkeypatch):
    """A private copy of the tiny llama (`src`), a short text, and a cache folder of its own."""
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir("llama"), src)
    text = tmp_path / "text.txt"
    text.write_text(TINY_TEXT.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    monkeypatch.setenv("LATENTKV_CACHE", str(tmp_path / "cache"))
    return tmp_path


def calib(work: Path) -> list[str]:
    return ["--to", "mla", "--kv-budget", "0.5", "--calib-data", str(work / "text.txt"), "--calib-samples", "4",
            "--calib-seq-len", "32"]


def convert_args(work: Path, out: Path | str, *extra: str, source: Path | str | None = None) -> list[str]:
    return ["convert", str(source or work / "src"), str(out), *calib(work), *extra]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (the cache folder and a cache's last-use record aside) -> its content hash."""
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith("cache/") and p.name != "about.json":
            files[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def leftovers(root: Path) -> list[str]:
    """Temporaries anywhere under root: partial outputs, swapped-aside folders, cache .tmp files."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if ".partial-" in p.name or ".old-" in p.name or p.name.endswith(".tmp"))


def one_line(output: str) -> str:
    return " ".join(output.split())  # rich wraps long lines


def assert_refused(res, pattern: str) -> None:
    import re

    text = one_line(res.output)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    assert re.search(pattern, text), text


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_weights(folder: Path, fn) -> None:
    path = folder / "model.safetensors"
    weights = load_file(str(path))
    fn(weights)
    save_file(weights, str(path), metadata={"format": "pt"})


def write(path: Path, text: str) -> None:
    path.write_text(text)


def write_jsonl(work: Path, raw: bytes) -> list[str]:
    path = work / "bad.jsonl"
    path.write_bytes(raw)
    return ["--calib-data", str(path)]


# --- the table --------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]  # prepares the fault in `work`, returns the command line
    message: str  # a regex the one-line error must match
    skip: str = ""


def _foreign_output(work: Path) -> Path:
    out = work / "out"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("years of work")
    (out / "sub" / "data.csv").write_text("1,2,3")
    return out


def _sharded_with(work: Path, shard_name: str) -> list[str]:
    src = work / "src"
    weights = load_file(str(src / "model.safetensors"))
    index = {"metadata": {}, "weight_map": {name: "model-00001-of-00001.safetensors" for name in weights}}
    index["weight_map"]["model.norm.weight"] = shard_name
    save_file(weights, str(src / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    (src / "model.safetensors").unlink()
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (work / "secret.safetensors").write_bytes((src / "model-00001-of-00001.safetensors").read_bytes())
    return convert_args(work, work / "out")


def _nan_weight(work: Path) -> list[str]:
    edit_weights(work / "src", lambda w: w["model.layers.1.self_attn.k_proj.weight"].__setitem__((0, 0), float("nan")))
    return convert_args(work, work / "out")


def _missing_tensor(work: Path) -> list[str]:
    edit_weights(work / "src", lambda w: w.pop("model.layers.1.mlp.down_proj.weight"))
    return convert_args(work, work / "out")


def _recipe(work: Path, text: str) -> list[str]:
    (work / "r.yaml").write_text(text)
    return ["convert", str(work / "src"), str(work / "out"), "--recipe", str(work / "r.yaml")]


def _truncated_gguf(work: Path) -> list[str]:
    (work / "m.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\x05\x00")  # cut inside its header
    return convert_args(work, work / "out", source=work / "m.gguf")


CASES = [
    Case("overwrite a folder latentkv did not write",
         lambda w: convert_args(w, _foreign_output(w), "--overwrite"),
         r"not written by latentkv .*would lose sub/, sub/data.csv, thesis.txt \(2 file\(s\)"),
    Case("non-empty foreign folder without --overwrite",
         lambda w: convert_args(w, _foreign_output(w)),
         r"out is not empty; it was not written by latentkv, so --overwrite will not replace it"),
    Case("output is the source", lambda w: convert_args(w, w / "src", "--overwrite"), r"is the input .*itself"),
    Case("output above the source", lambda w: convert_args(w, w, "--overwrite"),
         r"holds the input .*would delete the input"),
    Case("output is a file", lambda w: write(w / "f", "x") or convert_args(w, w / "f"), r"is a file"),
    Case("--device cuda without CUDA", lambda w: convert_args(w, w / "out", "--device", "cuda"),
         r"no CUDA GPU is usable here.*use --device cpu",
         skip="a CUDA GPU is present" if torch.cuda.is_available() else ""),
    Case("eval --device cuda without CUDA", lambda w: ["eval", str(w / "src"), "--device", "cuda"],
         r"no CUDA GPU is usable here", skip="a CUDA GPU is present" if torch.cuda.is_available() else ""),
    Case("generate --device cuda without CUDA",
         lambda w: ["generate", str(w / "src"), "--prompt", "hi", "--device", "cuda"],
         r"no CUDA GPU is usable here", skip="a CUDA GPU is present" if torch.cuda.is_available() else ""),
    Case("sample --device cuda without CUDA",
         lambda w: ["sample", str(w / "src"), str(w / "s.jsonl"), "--device", "cuda", "--tokens", "64"],
         r"no CUDA GPU is usable here", skip="a CUDA GPU is present" if torch.cuda.is_available() else ""),
    Case("--device nonsense", lambda w: convert_args(w, w / "out", "--device", "tpu9"), r"use cpu, cuda or cuda:N"),
    Case("--save-dtype nonsense", lambda w: convert_args(w, w / "out", "--save-dtype", "nonsense"),
         r"Unknown dtype 'nonsense'; use one of"),
    Case("--max-shard-size 0", lambda w: convert_args(w, w / "out", "--max-shard-size", "0"), r"must be positive"),
    Case("--calib-seq-len beyond max_position_embeddings",
         lambda w: convert_args(w, w / "out") + ["--calib-seq-len", "1024"],
         r"--calib-seq-len 1024 is beyond the model's max_position_embeddings \(512\)"),
    Case("--set shrink=banana", lambda w: convert_args(w, w / "out", "--set", "shrink=banana"),
         r"shrink must be true or false, got 'banana'"),
    Case("--set refit_windows=abc", lambda w: convert_args(w, w / "out", "--set", "refit_windows=abc"),
         r"refit_windows must be a whole number \(or none\), got 'abc'"),
    Case("--set qk_rope_dim=abc", lambda w: convert_args(w, w / "out", "--set", "qk_rope_dim=abc"),
         r"qk-rope-dim must be an even number"),
    Case("recipe value of the wrong type", lambda w: _recipe(w, "kv_budget: 0.5\ncalib_samples: many\n"),
         r"calib_samples must be a whole number, got 'many'"),
    Case("recipe that is a list", lambda w: _recipe(w, "- to: mla\n"), r"must be a YAML mapping"),
    Case("NaN weights", _nan_weight, r"model.layers.1.self_attn.k_proj.weight in .* holds NaN or Inf"),
    Case("tensor shape disagrees with config.json",
         lambda w: edit_config(w / "src", intermediate_size=128) or convert_args(w, w / "out"),
         r"Layer 0's mlp.\w+_proj.weight .* has shape .* but config.json implies"),
    Case("num_key_value_heads does not divide the heads",
         lambda w: edit_config(w / "src", num_key_value_heads=3) or convert_args(w, w / "out"),
         r"num_key_value_heads 3; the KV heads must be .* divides the heads"),
    Case("a tensor config.json implies is missing", _missing_tensor,
         r"lacks layer 1's mlp.down_proj.weight that config.json implies"),
    Case("config.json is a JSON list",
         lambda w: write(w / "src" / "config.json", "[1, 2]") or convert_args(w, w / "out"),
         r"config.json holds a JSON list, not an object"),
    Case("config.json is not JSON",
         lambda w: write(w / "src" / "config.json", "{oops") or convert_args(w, w / "out"),
         r"config.json is not valid JSON"),
    Case("config.json with an unknown model_type (no remote-code hint)",
         lambda w: edit_config(w / "src", model_type="nonexistent-arch") or convert_args(w, w / "out"),
         r"Could not read the config .*Check its model_type"),
    Case("non-UTF-8 .jsonl", lambda w: convert_args(w, w / "out") + write_jsonl(w, b'{"text": "caf\xe9 au lait"}\n'),
         r"bad.jsonl is not UTF-8 text"),
    Case(".jsonl row that is a string", lambda w: convert_args(w, w / "out") + write_jsonl(w, b'"just text"\n'),
         r"bad.jsonl:1 is a JSON str, not an object"),
    Case(".jsonl row that is a number", lambda w: convert_args(w, w / "out") + write_jsonl(w, b'{"text": "a"}\n7\n'),
         r"bad.jsonl:2 is a JSON int, not an object"),
    Case('.jsonl row {"text": null}', lambda w: convert_args(w, w / "out") + write_jsonl(w, b'{"text": null}\n'),
         r"bad.jsonl:1: field 'text' is null, not text"),
    Case("GGUF cut inside its header", _truncated_gguf, r"could not read m.gguf .*download it again"),
    Case("index naming a shard outside the folder", lambda w: _sharded_with(w, "../secret.safetensors"),
         r"names shard '../secret.safetensors', which is not a file inside"),
    Case("index naming an absolute path", lambda w: _sharded_with(w, "/etc/passwd"),
         r"names shard '/etc/passwd', which is not a file inside"),
    Case("push to an invalid repo id", lambda w: ["push", str(w / "src"), "not a/valid repo"],
         r"is not a valid Hub repo id"),
    Case("sample --overwrite of a file latentkv did not write",
         lambda w: write(w / "notes.jsonl", "my notes\n") or
         ["sample", str(w / "src"), str(w / "notes.jsonl"), "--overwrite", "--tokens", "64"],
         r"notes.jsonl was not written by latentkv; --overwrite would lose it"),
    Case("predictor train --overwrite of a foreign folder",
         lambda w: ["predictor", "train", str(w / "src"), "--out", str(_foreign_output(w)), "--overwrite"],
         r"not written by latentkv .*would lose"),
    Case("finetune into its own model folder",
         lambda w: ["finetune", str(w / "src"), str(w / "src"), "--overwrite", "--tokens", "64", "--seq-len", "16",
                    "--batch-size", "4"],
         r"is the input .*itself"),
    Case("finetune --seq-len beyond max_position_embeddings",
         lambda w: ["finetune", str(w / "src"), str(w / "healed"), "--tokens", "64", "--seq-len", "1024",
                    "--batch-size", "4"],
         r"--seq-len 1024 is beyond the model's max_position_embeddings \(512\); use --seq-len 512 or less"),
    Case("finetune --eval-window beyond max_position_embeddings",
         lambda w: ["finetune", str(w / "src"), str(w / "healed"), "--tokens", "64", "--seq-len", "16",
                    "--batch-size", "4", "--eval-window", "600"],
         r"--eval-window 600 is beyond the model's max_position_embeddings \(512\); use --eval-window 512 or less"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_and_nothing_is_lost(case: Case, work):
    if case.skip:
        pytest.skip(case.skip)
    argv = case.setup(work)
    before = snapshot(work)
    res = runner.invoke(app, argv)
    assert_refused(res, case.message)
    assert snapshot(work) == before, "a refused command changed or deleted files"
    assert leftovers(work) == []


# --- faults that need a first run -------------------------------------------------------------

def test_overwrite_replaces_only_latentkv_output_and_cleans_leftovers(work):
    """--overwrite replaces latentkv's own output; a file added to it afterwards blocks that; the
    temporary folder a killed run left beside the output is removed by the next run."""
    out = work / "out"
    res = runner.invoke(app, convert_args(work, out))
    assert res.exit_code == 0, res.output
    assert (out / MARKER_FILE).is_file()
    dead = work / ".out.partial-999999999-abc123"  # a pid no process has
    (dead / "sub").mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(b"half")
    res = runner.invoke(app, convert_args(work, out, "--overwrite"))
    assert res.exit_code == 0, res.output
    assert not dead.exists() and leftovers(work) == []
    (out / "thesis.txt").write_text("mine")
    before = snapshot(work)
    assert_refused(runner.invoke(app, convert_args(work, out, "--overwrite")),
                   r"holds files latentkv did not write; --overwrite would lose thesis.txt")
    assert snapshot(work) == before


@pytest.mark.parametrize("to", ["mla", "gqa"])  # a latentkv config; a plain config (marked by the recipe)
def test_overwrite_replaces_an_output_of_a_version_without_marker(work, to):
    """An output written before outputs carried a marker (every file one latentkv writes, sharded
    weights included, and latentkv's own marks) is replaced by --overwrite and gets a marker."""
    out = work / "out"
    method = ["--to", "mla", "--kv-budget", "0.5"] if to == "mla" else ["--to", "gqa", "--num-kv-heads", "1"]
    args = ["convert", str(work / "src"), str(out), *method, *calib(work)[4:]]  # calib's text and windows
    res = runner.invoke(app, args + ["--max-shard-size", "100KB"])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors.index.json").is_file(), "the case must cover sharded weights"
    (out / MARKER_FILE).unlink()
    assert_refused(runner.invoke(app, args), r"is not empty; pass --overwrite to replace it")
    res = runner.invoke(app, args + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert (out / MARKER_FILE).is_file() and leftovers(work) == []


def test_overwrite_refuses_what_only_looks_like_an_old_output(work):
    """Without a marker, --overwrite still refuses a folder holding one file latentkv never writes
    (naming it), and a model folder of latentkv's file names that bears none of its marks."""
    out = work / "out"
    res = runner.invoke(app, convert_args(work, out))
    assert res.exit_code == 0, res.output
    (out / MARKER_FILE).unlink()
    (out / "notes.txt").write_text("mine")
    before = snapshot(work)
    assert_refused(runner.invoke(app, convert_args(work, out, "--overwrite")),
                   r"holds files latentkv did not write; --overwrite would lose notes.txt \(1 file\(s\)")
    assert snapshot(work) == before
    someone = work / "someone"  # a Hugging Face model folder (llama config, weights, tokenizer, card)
    shutil.copytree(work / "src", someone)
    (someone / "README.md").write_text("my model")
    before = snapshot(work)
    assert_refused(runner.invoke(app, convert_args(work, someone, "--overwrite")),
                   r"was not written by latentkv \(no \.latentkv-output\.json\); --overwrite would lose")
    assert snapshot(work) == before


def test_output_inside_the_source_is_allowed_and_leaves_it_intact(work):
    """A new folder inside the source folder deletes nothing of it (and is not read as weights)."""
    before = snapshot(work / "src")
    res = runner.invoke(app, convert_args(work, work / "src" / "mla"))
    assert res.exit_code == 0, res.output
    after = {k: v for k, v in snapshot(work / "src").items() if not k.startswith("mla/")}
    assert after == before


def test_same_shape_other_weights_never_reuse_statistics(work):
    """A fine-tune of the same shape in another folder (same config, same file sizes) gets its own
    statistics from the default shared cache; a byte-identical copy reuses them and says so."""
    other = work / "other"
    build_tiny_model("llama", other, seed=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copyfile(work / "src" / name, other / name)
    assert (other / "model.safetensors").stat().st_size == (work / "src" / "model.safetensors").stat().st_size
    res = runner.invoke(app, convert_args(work, work / "a"))
    assert res.exit_code == 0, res.output
    assert "reused" not in res.output
    res = runner.invoke(app, convert_args(work, work / "b", source=other))
    assert res.exit_code == 0, res.output
    assert "reused" not in res.output, "another model's statistics were reused"
    calibration = sorted((work / "cache" / "calibration").iterdir())
    assert len(calibration) == 2
    a, b = (load_file(str(work / x / "model.safetensors")) for x in "ab")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    copy = work / "copy"
    shutil.copytree(work / "src", copy)
    res = runner.invoke(app, convert_args(work, work / "c", source=copy))
    assert res.exit_code == 0, res.output
    assert "calibration statistics of 2 layer(s) reused from" in one_line(res.output)
    assert len(list((work / "cache" / "calibration").iterdir())) == 2
    assert not any(p.name == "hidden.pt" for p in (work / "cache").rglob("*"))

    res = runner.invoke(app, ["cache", "list", "--json"])
    assert res.exit_code == 0, res.output
    listing = json.loads(res.stdout)
    entries = [e for e in listing["entries"] if e["kind"] == "calibration"]
    assert len(entries) == 2 and all(e["bytes"] > 0 and e["state"] == "done" for e in entries)
    # each says the source that last used it
    assert sorted(e["about"].split(" on ")[0] for e in entries) == sorted([str(work / "copy"), str(other)])
    res = runner.invoke(app, ["cache", "prune"])  # nothing is 30 days old
    assert res.exit_code == 0 and len(list((work / "cache" / "calibration").iterdir())) == 2
    res = runner.invoke(app, ["cache", "prune", "--all"])
    assert res.exit_code == 0 and "deleted 2 folder(s)" in res.output
    assert list((work / "cache" / "calibration").iterdir()) == []


def test_damaged_cache_file_names_the_folder_to_delete(work):
    cache = work / "stats"
    res = runner.invoke(app, convert_args(work, work / "a", "--calib-cache", str(cache)))
    assert res.exit_code == 0, res.output
    (cache / "layer_0001.pt").write_bytes(b"PK\x03\x04 not a torch file")
    before = snapshot(work)
    res = runner.invoke(app, convert_args(work, work / "b", "--calib-cache", str(cache)))
    assert_refused(res, rf"layer_0001.pt is damaged .*delete the folder {cache}")
    assert snapshot(work) == before and not (work / "b").exists()


def test_full_disk_while_writing_the_cache(work, monkeypatch):
    """torch.save through a file object sees ENOSPC; the error names the fix and no .tmp remains."""
    real_save = torch.save
    calls = []

    def full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second layer's statistics
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    cache = work / "stats"
    res = runner.invoke(app, convert_args(work, work / "out", "--calib-cache", str(cache)))
    assert_refused(res, rf"disk full while writing the calibration cache {cache}; free space, or pass --calib-cache")
    assert not (work / "out").exists() and leftovers(work) == []


def test_full_disk_while_writing_the_output(work, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("latentkv.io.writer._Shard.write", full)  # laying out a shard's file
    res = runner.invoke(app, convert_args(work, work / "out"))
    assert_refused(res, r"disk full while writing .*out; free space or choose another --output")
    assert not (work / "out").exists() and leftovers(work) == []


def test_folder_without_its_modeling_file_is_neither_evaluated_nor_pushed(work):
    out = work / "out"
    res = runner.invoke(app, convert_args(work, out))
    assert res.exit_code == 0, res.output
    (out / "modeling_latentkv.py").unlink()
    for argv in (["push", str(out), "user/model-mla"], ["eval", str(out), "--eval-text", str(work / "text.txt")]):
        assert_refused(runner.invoke(app, argv), r"lacks modeling_latentkv.py, the modeling code its config.json names")


def test_eval_runs_the_modeling_code_that_ships(work):
    """Guards `eval` against judging code other than what a user runs: a folder whose modeling file
    differs from this version's is refused without --trust-remote-code, and with it the shipped
    file's code is what computes the result (here an edit that scales every logit)."""
    out = work / "out"
    res = runner.invoke(app, convert_args(work, out))
    assert res.exit_code == 0, res.output
    argv = ["eval", str(out), "--json", "--eval-text", str(work / "text.txt"), "--eval-windows", "2",
            "--eval-window", "32"]
    plain = runner.invoke(app, argv)
    assert plain.exit_code == 0, plain.output
    shipped = out / "modeling_latentkv.py"
    code = shipped.read_text()
    marker = "        logits = self.get_output_embeddings()(hidden)\n"
    assert marker in code
    shipped.write_text(code.replace(marker, marker + "        logits = logits * 0.5\n"))
    assert_refused(runner.invoke(app, argv), r"is not the modeling code of this latentkv version.*--trust-remote-code")
    edited = runner.invoke(app, argv + ["--trust-remote-code"])
    assert edited.exit_code == 0, edited.output
    ppl = [json.loads(r.stdout.strip().splitlines()[-1])["perplexity"] for r in (plain, edited)]
    assert ppl[0] != ppl[1]


def test_tokenizer_auto_map_to_uncopied_code_is_dropped(work):
    path = work / "src" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    path.write_text(json.dumps(config))
    res = runner.invoke(app, convert_args(work, work / "out"))
    assert res.exit_code == 0, res.output
    copied = json.loads((work / "out" / "tokenizer_config.json").read_text())
    assert "auto_map" not in copied and copied["eos_token"] == config["eos_token"]
    assert sorted(p.name for p in (work / "out").glob("*.py")) == ["modeling_latentkv.py"]  # no tokenizer code


_KILL_AT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import {module} as m
real = m.{cls}.{method}
count = [0]
def killer(self, *args, **kwargs):
    count[0] += 1
    if count[0] == {after}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)
m.{cls}.{method} = killer
{extra}
from latentkv.cli import app
app({argv!r})
"""


def _killed_run(work: Path, argv: list[str], module: str, cls: str, method: str, after: int, extra: str = "") -> None:
    code = _KILL_AT.format(repo=str(REPO), module=module, cls=cls, method=method, after=after, argv=argv, extra=extra)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_kill_9_during_calibration_and_during_writing(work):
    """kill -9 after one layer's statistics (the resume point forced to disk) and again in the middle
    of writing the shards: the rerun resumes, removes what the killed runs left, writes the same
    model as an uninterrupted run, and keeps no resume point once done."""
    cache = work / "stats"
    argv = convert_args(work, work / "out", "--calib-cache", str(cache), "--max-shard-size", "20KB")
    force_hidden = ("import latentkv.calibration.stats as s\n"
                    "plain = s.StatsCache.maybe_save_hidden\n"
                    "s.StatsCache.maybe_save_hidden = lambda self, i, h, **k: plain(self, i, h, force=True)")
    _killed_run(work, argv, "latentkv.calibration.stats", "StatsCache", "save_layer", after=2, extra=force_hidden)
    assert (cache / "layer_0000.pt").is_file() and (cache / "hidden.pt").is_file() and not (work / "out").exists()
    _killed_run(work, argv, "latentkv.io.writer", "ShardedWriter", "_flush", after=3)
    assert not (work / "out").exists()
    assert any(".out.partial-" in p.name for p in work.iterdir()), "the kill should leave a partial folder"
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    assert leftovers(work) == [] and not (cache / "hidden.pt").exists()
    fresh = runner.invoke(app, convert_args(work, work / "fresh", "--calib-cache", str(work / "stats2"),
                                            "--max-shard-size", "20KB"))
    assert fresh.exit_code == 0, fresh.output
    for shard in sorted((work / "fresh").glob("*.safetensors")):
        assert (work / "out" / shard.name).read_bytes() == shard.read_bytes(), shard.name
