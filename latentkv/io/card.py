"""The model card (README.md) and recipe file that make every output folder reproducible.

Kept free of torch imports: the versions are read from package metadata.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import logging
import math
import re
import shlex
from pathlib import Path, PurePath
from typing import Any, Sequence

import yaml

from latentkv.errors import LatentKVError

logger = logging.getLogger(__name__)

RECIPE_FILE = "latentkv_recipe.yaml"

# The values the Hub accepts for `base_model_relation` (a conversion of the attention is a
# "finetune": new weights derived from the base; "adapter" is for LoRA-only outputs).
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")

# Hub tokens ("hf_" + 30-ish letters) and the value after a --token flag: never written anywhere.
_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")
_TOKEN_FLAG_RE = re.compile(r"(--(?:hf-|hub-)?token(?:=|\s+))(\S+)", re.IGNORECASE)


def redact_secrets(text: str, *secrets: str | None) -> str:
    """Replace Hub tokens (and any given secret strings) in `text` by `***`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _TOKEN_FLAG_RE.sub(lambda m: m.group(1) + "***", text)
    return _TOKEN_RE.sub("***", text)


def _plain(value: Any) -> Any:
    """Turn a recipe value into something yaml.safe_dump writes readably (paths, dtypes, dataclasses)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return value.item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)  # torch.dtype and friends: "torch.bfloat16"


def _recipe_yaml(recipe: dict) -> str:
    return yaml.safe_dump(_plain(recipe), sort_keys=False, allow_unicode=True, default_flow_style=False)


def write_recipe(folder: str | Path, recipe: dict) -> Path:
    """Write `latentkv_recipe.yaml`, the settings that reproduce this output."""
    path = Path(folder) / RECIPE_FILE
    path.write_text(_recipe_yaml(recipe), encoding="utf-8")
    return path


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("latentkv", "torch", "transformers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            if pkg == "latentkv":  # running from a source checkout that is not pip-installed
                from latentkv import __version__

                out[pkg] = __version__
            else:
                out[pkg] = "not installed"
    return out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if value is None:
        return ""
    # Pipes and newlines would break the markdown table.
    return str(value).replace("|", "\\|").replace("\n", " ")


def results_table(results: Sequence[dict]) -> str:
    """A markdown table from row dicts; columns are the keys in order of first appearance."""
    columns: list[str] = []
    for row in results:
        columns.extend(k for k in row if k not in columns)
    if not columns:
        return ""
    lines = [
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in results]
    return "\n".join(lines)


def _paper_line(paper: str) -> str:
    # A bare arXiv id ("2502.07864") becomes a link; anything else is written as given.
    if re.fullmatch(r"\d{4}\.\d{4,5}(v\d+)?", paper.strip()):
        return f"- [arXiv {paper.strip()}](https://arxiv.org/abs/{paper.strip()})"
    return f"- {paper}"


def _fence(text: str, lang: str = "") -> str:
    # A longer fence than any backtick run inside, so the command cannot close the block early.
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def write_model_card(
    folder: str | Path,
    *,
    base_model: str,
    base_model_relation: str,
    tags: Sequence[str],
    command: str | Sequence[str],
    recipe: dict,
    results: list[dict] | None,
    papers: Sequence[str],
    title: str,
    description: str,
) -> Path:
    """Write README.md: Hub front matter, the exact command, the recipe, results, papers, versions."""
    if base_model_relation not in BASE_MODEL_RELATIONS:
        raise LatentKVError(
            f"base_model_relation {base_model_relation!r} is not one the Hub accepts; use one of "
            f"{', '.join(BASE_MODEL_RELATIONS)} (a converted model is a 'finetune')."
        )
    all_tags = list(dict.fromkeys(["latentkv", *tags]))  # latentkv first, no duplicates
    front = {
        "base_model": base_model,
        "base_model_relation": base_model_relation,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": all_tags,
    }
    cmd = command if isinstance(command, str) else shlex.join(list(command))
    cmd = redact_secrets(cmd)
    versions = _versions()

    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---",
        f"# {title}",
        description.strip(),
        "## How it was made",
        f"Converted from [{base_model}](https://huggingface.co/{base_model}) with latentkv:"
        if "/" in base_model and not Path(base_model).is_absolute()
        else f"Converted from `{base_model}` with latentkv:",
        _fence(cmd, "bash"),
        "## Recipe",
        f"The same settings are in `{RECIPE_FILE}`.",
        _fence(_recipe_yaml(recipe), "yaml"),
    ]
    if results:
        parts += ["## Results", results_table(results)]
    if papers:
        parts += ["## Papers", "\n".join(_paper_line(p) for p in papers)]
    parts += [
        "## Versions",
        "\n".join(f"- {pkg} {ver}" for pkg, ver in versions.items()),
    ]
    path = Path(folder) / "README.md"
    path.write_text("\n\n".join(p for p in parts if p) + "\n", encoding="utf-8")
    return path
