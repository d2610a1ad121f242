"""Turn what the user typed (a folder, a .gguf file, a Hub id) into a local checkpoint folder.

Every source ends as a Hugging Face folder (config.json + safetensors + tokenizer) read lazily:
GGUF files are dequantized once through transformers and cached by content hash, Hub ids are
downloaded with only the files a conversion needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentkv.errors import LatentKVError, installed_exceptions
from latentkv.io.card import redact_secrets
from latentkv.io.lazy import LazyCheckpoint
from latentkv.io.writer import SIDECAR_FILES, OutputFolder

logger = logging.getLogger(__name__)

GGUF_SOURCE_FILE = "latentkv_gguf_source.json"

# What a conversion needs from a Hub repo; custom modeling code only with trust_remote_code.
_HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", *SIDECAR_FILES]
_HUB_BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def latentkv_cache_dir() -> Path:
    """`$LATENTKV_CACHE`, else `~/.cache/latentkv`: where GGUF dequantizations and assets are kept."""
    env = os.environ.get("LATENTKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "latentkv"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Source:
    """A source checkpoint, local and ready: its config, and weights read one tensor at a time."""

    spec: str  # what the user passed (folder, .gguf path or Hub id), kept for the model card
    folder: Path  # the local HF folder actually read
    config: Any  # transformers PretrainedConfig
    weights: LazyCheckpoint
    gguf_file: str | None = None  # set when the folder was dequantized from this GGUF file
    trust_remote_code: bool = False
    _tokenizer: Any = field(default=None, repr=False, compare=False)

    def tokenizer(self) -> Any:
        """The source's tokenizer (loaded once, from the folder)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    str(self.folder), trust_remote_code=self.trust_remote_code
                )
            except Exception as exc:  # transformers raises OSError/ValueError/... depending on what is missing
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise LatentKVError(
                    f"Could not load a tokenizer from {self.folder} ({first}). Copy the tokenizer files "
                    "(tokenizer.json, tokenizer_config.json, ...) of the original model into that folder."
                ) from exc
        return self._tokenizer


def _load_config(folder: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    from latentkv.modeling import read_config_json, register_latentkv

    raw = read_config_json(folder)  # valid JSON, an object: checked before transformers reads it
    # latentkv outputs load through this package's own modeling code: no remote code needed.
    register_latentkv()
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError, TypeError, AttributeError) as exc:
        # Remote code is suggested only where the checkpoint really ships some (an auto_map); for a
        # broken config it would only run a stranger's code to no purpose.
        needs_code = isinstance(raw.get("auto_map"), dict) and raw.get("model_type") != "latentkv"
        hint = (
            " This model ships its own modeling code (auto_map): pass --trust-remote-code only if you trust "
            "its author (it runs that code)."
            if needs_code and not trust_remote_code
            else " Check its model_type and fields, or re-download the checkpoint."
        )
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LatentKVError(f"Could not read the config in {folder}: {first}.{hint}") from exc


def _local_source(spec: str, folder: Path, trust_remote_code: bool, gguf_file: str | None = None) -> Source:
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        if ggufs:
            raise LatentKVError(
                f"Folder {folder} has no config.json but holds GGUF file(s) {', '.join(ggufs)}; "
                "pick one with --gguf-file NAME (gguf_file=...)."
            )
        raise LatentKVError(
            f"Folder {folder} has no config.json; pass the folder of a Hugging Face checkpoint "
            "(config.json + weights), a .gguf file, or a Hub id."
        )
    config = _load_config(folder, trust_remote_code)
    weights = LazyCheckpoint(folder)
    logger.info(
        "Source %s: %s, %d tensors (%.1f MB, %s)", spec, folder, len(weights), weights.total_bytes / 1e6, weights.format
    )
    return Source(spec, folder, config, weights, gguf_file=gguf_file, trust_remote_code=trust_remote_code)


def _is_complete_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    )


def gguf_to_folder(gguf_path: str | Path, dest: str | Path | None = None, *, trust_remote_code: bool = False) -> Path:
    """Dequantize a GGUF file to a float32 safetensors HF folder (once; reused when present).

    `dest` defaults to `<cache>/gguf/<first 16 hex of the file's sha256>/`. The folder is written
    through OutputFolder, so an interrupted run leaves no half cache behind.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise LatentKVError(f"GGUF file {gguf_path}: no such folder or file.")
    with gguf_path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise LatentKVError(f"{gguf_path} is not a GGUF file (bad magic bytes); re-download it.")
    digest = sha256_file(gguf_path)
    dest = Path(dest).expanduser() if dest is not None else latentkv_cache_dir() / "gguf" / digest[:16]
    if _is_complete_hf_folder(dest):
        logger.info("Reusing the dequantized %s cached in %s", gguf_path.name, dest)
        return dest

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    logger.info(
        "Dequantizing %s to float32 through transformers (once; cached in %s). The whole model is held in memory.",
        gguf_path.name,
        dest,
    )
    with OutputFolder(dest, overwrite=True) as out:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent),
                gguf_file=gguf_path.name,
                dtype=torch.float32,
                trust_remote_code=trust_remote_code,
            )
        except ImportError as exc:
            raise LatentKVError(f"Reading GGUF needs the gguf package: pip install 'gguf>=0.10' ({exc}).") from exc
        except LatentKVError:
            raise
        except Exception as exc:  # noqa: BLE001 - the GGUF reader fails with struct.error, IndexError, ... on a damaged file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise LatentKVError(
                f"transformers could not read {gguf_path.name} ({type(exc).__name__}: {first}). If the file is "
                "truncated or damaged, download it again; otherwise only architectures and quantization types that "
                "transformers' GGUF loader supports can be used: pass the original Hugging Face folder instead."
            ) from exc
        # The weights are now plain float32: drop the GGUF quantizer so save_pretrained writes a
        # normal checkpoint whose config does not claim to be quantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.save_pretrained(str(out.tmp))
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            tok.save_pretrained(str(out.tmp))
        except Exception as exc:  # non-essential: the weights are what conversion needs
            logger.warning(
                "Could not convert the tokenizer inside %s (%s); copy the original model's tokenizer files into %s",
                gguf_path.name,
                exc,
                dest,
            )
        if not (out.tmp / "generation_config.json").is_file():
            GenerationConfig.from_model_config(model.config).save_pretrained(str(out.tmp))
        (out.tmp / GGUF_SOURCE_FILE).write_text(
            json.dumps({"gguf_file": gguf_path.name, "sha256": digest, "dtype": "float32"}, indent=2) + "\n",
            encoding="utf-8",
        )
        del model
    logger.info("Wrote the dequantized checkpoint of %s to %s", gguf_path.name, dest)
    return dest


def _looks_like_path(spec: str) -> bool:
    """True if `spec` can only be a path (a Hub id is `name` or `owner/name` of [A-Za-z0-9._-])."""
    if spec.startswith((".", "/", "~", "\\")) or spec.lower().endswith(".gguf") or re.match(r"^[A-Za-z]:[\\/]", spec):
        return True
    if spec.count("/") > 1 or "\\" in spec:
        return True
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?", spec) is None


def _hub_error(spec: str, exc: BaseException, revision: str | None) -> LatentKVError:
    """Map huggingface_hub / network failures to a message that says what to do instead."""
    from huggingface_hub import errors as hf_errors

    reason = redact_secrets(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    alternatives = "pass a local folder (with config.json) or a .gguf path instead"
    if isinstance(exc, hf_errors.GatedRepoError):
        return LatentKVError(
            f"Hub repository {spec!r} is gated: accept its licence at https://huggingface.co/{spec} and log in "
            "(`hf auth login` or HF_TOKEN), or " + alternatives + "."
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return LatentKVError(f"Revision {revision!r} does not exist in Hub repository {spec!r}; check --revision.")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return LatentKVError(
            f"Hub repository {spec!r} was not found (no local folder or file of that name exists either). "
            "Check the spelling; if it is private, run `hf auth login` or set HF_TOKEN; or " + alternatives + "."
        )
    if isinstance(exc, hf_errors.EntryNotFoundError) and not isinstance(exc, hf_errors.LocalEntryNotFoundError):
        return LatentKVError(f"A file was not found in Hub repository {spec!r} ({reason}); check --gguf-file.")
    return LatentKVError(
        f"The Hugging Face Hub could not be reached for {spec!r} ({type(exc).__name__}: {reason}), and no "
        f"local folder or file of that name exists; {alternatives}."
    )


def _hub_exceptions() -> tuple[type[BaseException], ...]:
    """Exception types a Hub download can raise for network / offline / not-found reasons."""
    from huggingface_hub import errors as hf_errors

    types: list[type[BaseException]] = [
        hf_errors.HfHubHTTPError,
        hf_errors.OfflineModeIsEnabled,
        hf_errors.LocalEntryNotFoundError,
        hf_errors.EntryNotFoundError,
        ConnectionError,
        TimeoutError,
    ]
    types += installed_exceptions((("requests", "RequestException"), ("httpx", "TransportError"), ("httpx2", "TransportError")))
    return tuple(types)


def _download(repo_id: str, revision: str | None, cache_dir: str | Path | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except _hub_exceptions() as exc:
        raise _hub_error(repo_id, exc, revision) from exc
    return Path(path)


def _hub_source(
    spec: str, gguf_file: str | None, revision: str | None, cache_dir: str | Path | None, trust_remote_code: bool
) -> Source:
    if gguf_file is not None:
        # A GGUF repo: fetch just that file, then dequantize it like a local one.
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(spec, filename=gguf_file, revision=revision, cache_dir=cache_dir)
        except _hub_exceptions() as exc:
            raise _hub_error(spec, exc, revision) from exc
        folder = gguf_to_folder(path, trust_remote_code=trust_remote_code)
        return _local_source(spec, folder, trust_remote_code, gguf_file=gguf_file)

    patterns = _HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    logger.info("Downloading %s%s from the Hugging Face Hub (config, safetensors, tokenizer)", spec,
                f"@{revision}" if revision else "")
    folder = _download(spec, revision, cache_dir, patterns)
    if not (folder / "config.json").is_file():
        raise LatentKVError(
            f"Hub repository {spec!r} has no config.json; if it holds GGUF files, pick one with --gguf-file NAME."
        )
    if not any(folder.glob("*.safetensors")):
        # Older repos ship only PyTorch .bin files (read later with weights_only=True).
        logger.info("%s has no safetensors; downloading its PyTorch .bin weights", spec)
        folder = _download(spec, revision, cache_dir, patterns + _HUB_BIN_PATTERNS)
    return _local_source(spec, folder, trust_remote_code)


def open_source(
    spec: str | Path,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> Source:
    """Open a source checkpoint: a local HF folder, a .gguf file (or folder + gguf_file), or a Hub id.

    `cache_dir` is the Hugging Face download cache (Hub ids only); GGUF dequantizations are cached
    under `latentkv_cache_dir()`.
    """
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    if path.is_dir():
        if gguf_file is not None:
            gguf = path / gguf_file
            if not gguf.is_file():
                present = sorted(p.name for p in path.glob("*.gguf"))
                raise LatentKVError(
                    f"No GGUF file {gguf_file!r} in {path}; it holds: {', '.join(present) or 'no .gguf files'}."
                )
            return _local_source(spec_str, gguf_to_folder(gguf, trust_remote_code=trust_remote_code),
                                 trust_remote_code, gguf_file=gguf_file)
        return _local_source(spec_str, path, trust_remote_code)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LatentKVError(
                f"{path} is a file, not a checkpoint folder or a .gguf file; pass the folder that holds config.json."
            )
        if gguf_file is not None and gguf_file != path.name:
            raise LatentKVError(f"Both a .gguf path ({path.name}) and gguf_file={gguf_file!r} were given; pass one.")
        return _local_source(spec_str, gguf_to_folder(path, trust_remote_code=trust_remote_code),
                             trust_remote_code, gguf_file=path.name)
    if _looks_like_path(spec_str):
        raise LatentKVError(f"{spec_str}: no such folder or file. Check the path (or pass a Hub id like owner/name).")
    return _hub_source(spec_str, gguf_file, revision, cache_dir, trust_remote_code)


def check_same_tokenizer(student_tok, teacher_tok, teacher_name: str, role: str = "--teacher") -> None:
    """Distillation (and agreement) compares distributions token by token: the vocabularies must be identical."""
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        only_s = sorted(set(s) - set(t))[:3]
        only_t = sorted(set(t) - set(s))[:3]
        moved = sorted(k for k in set(s) & set(t) if s[k] != t[k])[:3]
        raise LatentKVError(
            f"The {role} model {teacher_name} has another tokenizer than the converted model ({len(t)} vs {len(s)} "
            f"tokens; only in the converted model: {only_s}, only in {teacher_name}: {only_t}, other ids: {moved}); "
            f"pass as {role} the model it was converted from"
        )
