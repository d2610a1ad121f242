"""Healing a converted model: LoRA or full attention fine-tuning, distilled from the source model.

`finetune(FinetuneOptions(...))` is the whole command; `latentkv.finetune.targets` holds the
per-format table of what is trained.
"""

from latentkv.finetune.options import FinetuneOptions, FinetuneResult

__all__ = ["FinetuneOptions", "FinetuneResult", "finetune", "load_adapter"]


def __getattr__(name: str):
    # The training code (torch) loads on first use, so the CLI can read `FinetuneOptions` for `--help`.
    if name in ("finetune", "load_adapter"):
        from latentkv.finetune import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
