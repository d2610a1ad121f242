"""Every conversion target through the same checks, driven by tests/target_cases.py and the target
records (`convert.registry`); and a target added at test time by following docs/adding-a-target.md."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from target_cases import CASES, TargetCase, check_decode, check_exact, check_finetune_step, check_reload, convert_case

from latentkv.convert.method import Capabilities, ConversionMethod
from latentkv.convert.mla_method import MLAMethod
from latentkv.convert.registry import TargetRecord, get_method, get_target, register_target, targets, unregister_target

BY_NAME = {case.name: case for case in CASES}
EXACT = [case for case in CASES if case.exact is not None]
PAGED = [case for case in CASES if get_target(case.name).paged_decode]
TRAINABLE = [case for case in CASES if get_target(case.name).trainable]


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    """Factory: converted(case, "exact" | "compressed") -> (ConvertResult, folder), once per module."""
    root = tmp_path_factory.mktemp("targets")
    done: dict = {}

    def make(case: TargetCase, which: str):
        key = (case.name, case.arch, which)
        if key not in done:
            out = root / f"{case.name}-{which}"
            done[key] = (convert_case(tiny_model_dir(case.arch), out, case.name, getattr(case, which),
                                      root / f"cache-{case.name}-{which}"), out)
        return done[key]

    return make


def test_every_target_has_a_case_and_keeps_the_contract():
    """Guards the one method interface: each registered target has a row in target_cases.py, its
    method is a `ConversionMethod`, and what its capabilities declare its config holds (the pipeline
    reads `sequential`, `refit_output` and `refit_windows` only where they are declared)."""
    assert [r.name for r in targets()] == [case.name for case in CASES]
    for record in targets():
        method = get_method(record.name)
        assert isinstance(method, ConversionMethod), record.name
        caps = method.capabilities
        assert isinstance(caps, Capabilities)
        fields = {f.name for f in dataclasses.fields(method.config_cls)}
        assert caps.sequential_pass == ("sequential" in fields), record.name
        assert caps.output_refit <= ({"refit_output", "refit_windows"} <= fields), record.name
        assert caps.plan_in_pass <= callable(getattr(method, "plan_in_pass", None)), record.name
        assert "latentkv" in caps.formats and method.name == record.name


def test_records_are_import_light():
    """Guards `latentkv --help`: reading the records imports neither torch nor a method module."""
    code = ("import sys, latentkv.convert.registry as r; r.target_help(); r.trainable_modules(); "
            "assert not {'torch', 'latentkv.convert.mla_method'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("case", EXACT, ids=str)
def test_exact_at_full_rank(case, converted, tiny_model_dir):
    """Guards each target's exact start: at full rank its output computes the source's logits."""
    result, out = converted(case, "exact")
    check_exact(result, out, tiny_model_dir(case.arch))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_saved_output_reloads_with_equal_outputs(case, converted, tmp_path):
    """Guards each target's written folder: reloaded without latentkv it computes the same logits."""
    result, out = converted(case, "compressed")
    check_reload(result, out, tmp_path)


@pytest.mark.parametrize("case", PAGED, ids=str)
def test_paged_decode_check(case, converted):
    """Guards each target whose record says it decodes through the paged latent cache."""
    _, out = converted(case, "compressed")
    check_decode(out)


@pytest.mark.parametrize("case", TRAINABLE, ids=str)
def test_one_finetune_step_changes_only_trainable_weights(case, converted):
    """Guards finetune's reading of the records: one step trains exactly the record's linears."""
    _, out = converted(case, "compressed")
    check_finetune_step(out, get_target(case.name))


@pytest.mark.parametrize("name", ["gta", "gta-s"])
def test_inspect_rows_give_what_the_conversion_caches(name, converted, tiny_model_dir):
    """Guards `inspect`'s GTA-T and GTA-S rows: the values per token and layer they show are what a
    conversion with those settings writes."""
    from latentkv.eval.report import inspect_model

    case = BY_NAME[name]
    result, _ = converted(case, "compressed")
    report = inspect_model(str(tiny_model_dir(case.arch)))
    command = "gta" if name == "gta" else "gta-s --set map_heads=1 --kv-budget 0.5"
    row = next(t for t in report["targets"] if t["target"] == command)
    assert row["values"] * report["architecture"]["layers"] == result.kv_values_per_token


# --- The guide (docs/adding-a-target.md), followed at test time -----------------------------------

class MLAFullMethod(MLAMethod):
    """Step 2 of the guide: a method class. MLA whose default budget is the source's whole cache (the
    math module of step 1 is `convert.mla`, reused)."""

    name = "mla-full"

    def make_config(self, options: dict, fmt: str):
        return super().make_config({"kv_budget": 1.0, **options}, fmt)


MLA_FULL = TargetRecord(
    name="mla-full", method=f"{__name__}:MLAFullMethod", papers=("TransMLA (arXiv 2502.07864)",),
    help="MLA at the source's full width", attention="latent", trainable=get_target("mla").trainable,
    cli_options=("qk_rope_dim", "sequential"),
)
MLA_FULL_CASE = TargetCase("mla-full", exact=dict(), compressed=dict(kv_budget=0.5))


@pytest.fixture
def mla_full():
    register_target(MLA_FULL)  # step 3: one register_target call
    try:
        yield MLA_FULL_CASE  # step 4: its row of target_cases.py
    finally:
        unregister_target(MLA_FULL.name)


def test_a_target_added_by_the_guide(mla_full, tiny_model_dir, tmp_path):
    """Guards docs/adding-a-target.md: a target registered by its steps converts from the command
    line, and passes the generic checks (exact at full rank, reload, paged decode, finetune step)."""
    from typer.testing import CliRunner

    from latentkv.cli import app
    from tiny_models import TINY_TEXT

    source = tiny_model_dir(mla_full.arch)
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["convert", str(source), str(out), "--to", "mla-full", "--calib-data", str(TINY_TEXT),
                                   "--calib-samples", "8", "--calib-seq-len", "64",
                                   "--calib-cache", str(tmp_path / "cache-cli")])
    assert res.exit_code == 0, res.output
    exact = convert_case(source, tmp_path / "exact", "mla-full", mla_full.exact, tmp_path / "cache-exact")
    check_exact(exact, tmp_path / "exact", source)
    assert json.loads((out / "config.json").read_text())["method"] == "mla-full"
    assert _weights(out).keys() == _weights(tmp_path / "exact").keys()
    assert all(torch.equal(t, _weights(tmp_path / "exact")[k]) for k, t in _weights(out).items())
    compressed = convert_case(source, tmp_path / "small", "mla-full", mla_full.compressed, tmp_path / "cache-small")
    check_reload(compressed, tmp_path / "small", tmp_path)
    check_decode(tmp_path / "small")
    check_finetune_step(tmp_path / "small", get_target("mla-full"))


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
