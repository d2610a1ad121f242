"""Healing a converted model: LoRA or full attention fine-tuning, distilled from the source model.

`finetune(FinetuneOptions(...))` is the whole command; `latentkv.finetune.targets` holds the
per-format table of what is trained.
"""

from latentkv.finetune.options import FinetuneOptions, FinetuneResult
from latentkv.finetune.pipeline import finetune, load_adapter

__all__ = ["FinetuneOptions", "FinetuneResult", "finetune", "load_adapter"]
