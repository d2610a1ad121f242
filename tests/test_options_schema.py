"""The options schema: flags generated from the option dataclasses keep every flag users' scripts
rely on, and every command that takes settings reads them from `--recipe` by one rule (the command
line wins over the recipe, the recipe over the default; unknown keys refused before any work)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from latentkv.cli import app

runner = CliRunner()

# Every command's parameters as the CLI had them before its flags were generated from the option
# dataclasses (tests/fixtures/README.md); --recipe was added to these commands afterwards.
FROZEN = Path(__file__).resolve().parent / "fixtures" / "cli_params.json"
GAINED_RECIPE = ("eval", "generate", "sample", "predictor train")


def command_params(command) -> list[dict]:
    """What `--help` shows of each parameter: its flags, default, help text and panel."""
    out = []
    for p in command.params:
        default = list(p.default) if isinstance(p.default, (list, tuple)) else p.default
        shown = getattr(p, "help", None)
        out.append({"name": p.name, "kind": p.param_type_name, "opts": list(p.opts),
                    "secondary_opts": list(p.secondary_opts), "default": default, "multiple": p.multiple,
                    "required": p.required, "help": shown and shown.replace("\\[", "["),  # rich markup escapes
                    "panel": getattr(p, "rich_help_panel", None)})
    return out


def all_commands(group, prefix="") -> dict:
    found = {}
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            found.update(all_commands(command, f"{prefix}{name} "))
        else:
            found[f"{prefix}{name}"] = command
    return found


def test_every_flag_keeps_its_name_default_and_help():
    """Guards users' scripts: every flag of every command keeps its names, default, type, help text and
    panel; the only change is the --recipe that the commands of GAINED_RECIPE took."""
    frozen = json.loads(FROZEN.read_text())
    commands = all_commands(typer.main.get_command(app))
    assert sorted(commands) == sorted(frozen)
    keys = ("kind", "opts", "secondary_opts", "default", "multiple", "required", "help", "panel")
    for name, command in commands.items():
        now = {p["name"]: p for p in command_params(command)}
        if name in GAINED_RECIPE:
            assert now.pop("recipe")["opts"] == ["--recipe"], name
        before = {p["name"]: {k: p[k] for k in keys} for p in frozen[name]}
        assert {n: {k: p[k] for k in keys} for n, p in now.items()} == before, name


def test_every_help_renders():
    """Guards `--help` of each command: its help texts are valid rich markup (a literal `[` escaped)."""
    for name in all_commands(typer.main.get_command(app)):
        res = runner.invoke(app, [*name.split(), "--help"])
        assert res.exit_code == 0 and "Usage" in res.output, (name, res.output)


def test_flags_are_the_option_fields():
    """Guards the one source: each flag of finetune and each --calib-* flag of convert has its field's
    default, help text and panel (`latentkv.schema.setting`), so a default lives in the dataclass only."""
    from latentkv.calibration.options import CalibOptions
    from latentkv.finetune.options import FinetuneOptions
    from latentkv.schema import CLI, cli_fields, parameter_names

    commands = all_commands(typer.main.get_command(app))
    for command, cls in (("finetune", FinetuneOptions), ("convert", CalibOptions)):
        params = {p.name: p for p in commands[command].params}
        names = parameter_names(cls)
        for f in cli_fields(cls):
            p = params[names[f.name]]
            assert p.help == f.metadata[CLI]["help"], f.name
            if f.default is not dataclasses.MISSING and not isinstance(f.default, tuple):
                assert p.default == f.default, f.name
    assert parameter_names(FinetuneOptions)["kl_text"] == "kl_data"
    calib = {p.name: p.default for p in commands["convert"].params}
    assert (calib["calib_samples"], calib["calib_seq_len"], calib["calib_seed"], calib["calib_data"]) == \
        (CalibOptions().samples, CalibOptions().seq_len, CalibOptions().seed, CalibOptions().data)


def test_option_modules_import_nothing_heavy():
    """Guards instant `--help`: the modules the CLI reads its flags from load no torch/transformers."""
    code = ("import sys, latentkv.schema, latentkv.finetune.options, latentkv.calibration.options, "
            "latentkv.eval.options, latentkv.runtime.options, latentkv.sparsity.options, latentkv.convert.options; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def recipe_file(tmp_path, settings: dict) -> str:
    path = tmp_path / f"recipe{len(list(tmp_path.glob('recipe*')))}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


@pytest.fixture
def calls(monkeypatch):
    """The work each command hands to the package, replaced by a recorder: (name, args, kwargs)."""
    from latentkv.eval import report
    from latentkv.finetune import teacher_text
    from latentkv.runtime import decode
    from latentkv.sparsity import train

    seen = []

    def recorder(name, result):
        def record(*args, **kwargs):
            seen.append((name, args, kwargs))
            return result
        return record

    monkeypatch.setattr(report, "evaluate", recorder("evaluate", {"perplexity": 1.0}))
    monkeypatch.setattr(decode, "generate_cli", recorder("generate", []))
    monkeypatch.setattr(teacher_text, "sample_teacher_text",
                        recorder("sample", SimpleNamespace(output="s.jsonl", tokens=1, documents=1, tokens_per_s=1.0)))
    monkeypatch.setattr(train, "train_predictor", recorder("train", {}))
    return seen


def run_ok(argv):
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    return res


def test_eval_recipe(tmp_path, calls):
    """Guards `eval --recipe`: the recipe's settings are used, a flag on the command line wins."""
    text = tmp_path / "t.txt"
    recipe = recipe_file(tmp_path, {"eval_window": 32, "eval_windows": 3, "eval_text": str(text), "dtype": "bfloat16"})
    run_ok(["eval", "m", "--json", "--recipe", recipe, "--eval-windows", "5"])
    kwargs = calls[-1][2]
    assert (kwargs["window"], kwargs["windows"], kwargs["eval_text"], kwargs["dtype"]) == (32, 5, str(text), "bfloat16")
    res = runner.invoke(app, ["eval", "m", "--recipe", recipe_file(tmp_path, {"eval_window": None, "source": None})])
    assert res.exit_code == 2 and "eval_window must be a value" in res.output, res.output  # only a flag without default may be none


def test_generate_recipe(tmp_path, calls):
    recipe = recipe_file(tmp_path, {"max_new_tokens": 7, "backend": "reference"})
    run_ok(["generate", "m", "--prompt", "hi", "--recipe", recipe, "--max-new-tokens", "9"])
    assert calls[-1][1] == ("m", ["hi"]) and (calls[-1][2]["max_new_tokens"], calls[-1][2]["backend"]) == (9, "reference")


def test_sample_recipe(tmp_path, calls):
    recipe = recipe_file(tmp_path, {"tokens": 1000, "temperature": 0.5, "seed": 4})
    run_ok(["sample", "m", str(tmp_path / "s.jsonl"), "--recipe", recipe, "--temperature", "0.7"])
    opts = calls[-1][1][0]
    assert (opts.tokens, opts.temperature, opts.seed, opts.batch_size) == (1000, 0.7, 4, 512)


def test_predictor_train_recipe(tmp_path, calls):
    recipe = recipe_file(tmp_path, {"windows": 4, "steps": 3, "exclude": ["a.txt"], "data": str(tmp_path)})
    run_ok(["predictor", "train", "m", "--out", str(tmp_path / "p"), "--recipe", recipe, "--steps", "5"])
    opts = calls[-1][1][0]
    assert (opts.windows, opts.steps, opts.exclude, opts.data, opts.seq_len) == (4, 5, ("a.txt",), str(tmp_path), 1024)


@pytest.mark.parametrize("argv", [
    ["eval", "/nonexistent/model"],
    ["generate", "/nonexistent/model", "--prompt", "hi"],
    ["sample", "/nonexistent/model", "/nonexistent/out.jsonl"],
    ["predictor", "train", "/nonexistent/model", "--out", "/nonexistent/p"],
], ids=["eval", "generate", "sample", "predictor-train"])
def test_recipe_refuses_unknown_keys_and_wrong_types_before_any_work(tmp_path, calls, argv):
    """Guards the recipe's one error path: an unknown key (the known ones listed) or a value of the
    wrong type is one line, before any work; settings of the command line only (--overwrite) are no keys."""
    res = runner.invoke(app, [*argv, "--recipe", recipe_file(tmp_path, {"windowz": 3})])
    assert res.exit_code == 2 and "Unknown recipe keys" in res.output and "windowz" in res.output, res.output
    assert "device" in res.output or "steps" in res.output, res.output  # the known keys are listed
    assert "Traceback" not in res.output
    res = runner.invoke(app, [*argv, "--recipe", recipe_file(tmp_path, {"overwrite": True})])
    assert res.exit_code == 2 and "Unknown recipe keys" in res.output, res.output
    setting = "steps" if "predictor" in argv else "device" if argv[0] != "eval" else "eval_window"
    res = runner.invoke(app, [*argv, "--recipe", recipe_file(tmp_path, {setting: [1]})])
    assert res.exit_code == 2 and f"{setting} must be" in res.output, res.output
    assert not calls


def option_classes():
    from latentkv.convert.options import ConvertFlags
    from latentkv.eval.options import EvalOptions
    from latentkv.finetune.options import SampleOptions
    from latentkv.runtime.options import GenerateOptions
    from latentkv.sparsity.options import TrainOptions

    return {"eval": EvalOptions, "generate": GenerateOptions, "sample": SampleOptions,
            "predictor train": TrainOptions, "convert": ConvertFlags}


@pytest.mark.parametrize("command", ["eval", "generate", "sample", "predictor train", "convert"])
def test_commands_take_their_option_fields(command):
    """Guards the one source for eval, generate, sample, predictor train and convert: each flag field of
    the command's dataclass is one of its parameters, with the field's help text, panel, default and
    spelling; the command's other parameters are the few written out in the CLI."""
    from latentkv.calibration.options import CalibOptions
    from latentkv.schema import CLI, cli_fields, parameter_names

    cls = option_classes()[command]
    params = {p.name: p for p in all_commands(typer.main.get_command(app))[command].params}
    names = parameter_names(cls)
    for f in cli_fields(cls):
        meta, p = f.metadata[CLI], params.pop(names[f.name])
        assert (p.help, getattr(p, "rich_help_panel", None)) == (meta["help"], meta["panel"]), f.name
        assert p.param_type_name == ("argument" if meta["argument"] else "option"), f.name
        if meta["opts"]:
            assert [*p.opts, *p.secondary_opts] == list(meta["opts"]), f.name
        if f.default is dataclasses.MISSING:
            assert p.required, f.name
        elif not isinstance(f.default, tuple):
            assert p.default == f.default, f.name
    rest = {"convert": {"source", "output", *parameter_names(CalibOptions).values()}}.get(command, {"recipe"})
    assert set(params) == rest


def test_moved_option_classes_are_the_same_from_their_old_modules():
    """Guards imports of the options from the modules that run them."""
    from latentkv.finetune import teacher_text
    from latentkv.sparsity import train

    assert teacher_text.SampleOptions is option_classes()["sample"]
    assert train.TrainOptions is option_classes()["predictor train"]


@pytest.fixture
def converts(monkeypatch):
    """`convert`'s work replaced by a recorder of the ConvertOptions it is given."""
    from latentkv.convert import pipeline

    seen = []

    def record(opts, progress_factory=None):
        seen.append(opts)
        return SimpleNamespace(output=opts.output, kv_values_per_token=1, source_kv_values_per_token=2, seconds=0.0,
                               notes=[])

    monkeypatch.setattr(pipeline, "convert", record)
    return seen


def test_convert_flags_recipe(tmp_path, converts):
    """Guards `convert --recipe` over ConvertFlags: a recipe's settings are used, a flag given on the
    command line wins, and an unset flag keeps its default."""
    recipe = recipe_file(tmp_path, {"to": "gqa", "num_kv_heads": 2, "max_shard_size": "1GB", "save_dtype": "bfloat16",
                                    "dtype": "bfloat16", "calib_samples": 4, "method_options": {"grouping": "mean"}})
    run_ok(["convert", "m", str(tmp_path / "o"), "--recipe", recipe, "--num-kv-heads", "1", "--dtype", "float16",
            "--set", "keep=1"])
    opts = converts[-1]
    assert (opts.method, opts.max_shard_size, opts.save_dtype, opts.dtype, opts.calib.samples) == \
        ("gqa", "1GB", "bfloat16", "float16", 4)
    assert opts.method_options == {"grouping": "mean", "keep": 1, "num_kv_heads": 1}
    assert (opts.format, opts.device, opts.engine, opts.cache_format, opts.overwrite) == \
        ("latentkv", "cpu", None, None, False)
    run_ok(["convert", "m", str(tmp_path / "o"), "--recipe", recipe, "--to", "mla", "--kv-budget", "0.25"])
    opts = converts[-1]
    assert (opts.method, opts.method_options["kv_budget"], opts.method_options["num_kv_heads"]) == ("mla", 0.25, 2)
    assert opts.method_options["qk_rope_dim"] == "auto"  # the flag's default, which MLA takes
