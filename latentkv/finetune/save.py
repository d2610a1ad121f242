"""Write what a healing run made: the merged model in the format it came in, or the adapter.

The trained tensors are put into a fresh CPU copy of the input model (the same way for one GPU,
data parallel or FSDP), so merging happens in float32 and the GPU copy is never touched.
The merged model is written tensor by tensor under the input checkpoint's own names and dtypes,
with its config.json, modeling code and tokenizer files copied unchanged: the output loads exactly
as the input did.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from latentkv.errors import LatentKVError

log = logging.getLogger(__name__)


def input_weight_dtypes(folder: Path) -> dict[str, torch.dtype]:
    """name -> dtype of every tensor of a safetensors checkpoint folder."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LatentKVError(f"{folder} holds no .safetensors weights; healing needs a latentkv/deepseek output folder")
    out: dict[str, torch.dtype] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                out[name] = fh.get_slice(name).get_dtype()
    return {k: _dtype(v) for k, v in out.items()}


def _dtype(name: str) -> torch.dtype:
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    return table.get(name, torch.float32)


def write_full_model(model: torch.nn.Module, src: Path, dst: Path, save_dtype: torch.dtype | None,
                     max_shard_size: str) -> int:
    """The model's weights under the input's tensor names (and dtypes, unless `save_dtype`)."""
    from latentkv.io.writer import ShardedWriter, copy_sidecars

    names = input_weight_dtypes(src)
    state = model.state_dict()
    missing = sorted(set(names) - set(state))
    if missing:
        raise LatentKVError(f"The healed model lacks tensors of {src} ({', '.join(missing[:3])}); this is a bug")
    with ShardedWriter(dst, max_shard_size=max_shard_size) as writer:
        for name, dtype in names.items():
            writer.add(name, state[name].to(save_dtype or dtype))
    shutil.copyfile(src / "config.json", dst / "config.json")
    for py in src.glob("*.py"):  # remote modeling code (auto_map), if any
        shutil.copyfile(py, dst / py.name)
    copy_sidecars(src, dst)
    return len(names)


def read_input_card(src: Path) -> tuple[str | None, dict]:
    """(base_model from the input's model card, the input's recipe) where present."""
    import yaml

    from latentkv.io.card import RECIPE_FILE

    base = None
    readme = src / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
        if text.startswith("---"):
            try:
                front = yaml.safe_load(text.split("---", 2)[1]) or {}
                base = front.get("base_model")
            except yaml.YAMLError:
                pass
    recipe = {}
    if (src / RECIPE_FILE).is_file():
        try:
            recipe = yaml.safe_load((src / RECIPE_FILE).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            log.warning("could not read %s; the new recipe holds only the healing settings", src / RECIPE_FILE)
    return base, recipe


def write_card(dst: Path, opts, result_rows: list[dict], adapter: bool, tokens: int, src: Path) -> None:
    """Model card and recipe; a failure here warns (the weights are the essential output)."""
    from latentkv.io.card import write_model_card, write_recipe

    try:
        base, recipe = read_input_card(src)
        recipe = {**recipe, "finetune": opts.recipe()}
        write_recipe(dst, recipe)
        mode = "LoRA adapter" if adapter else ("LoRA, merged" if opts.mode == "lora" else "attention weights")
        teacher = f"distilled from `{opts.teacher}` (KL, T={opts.temperature}, LM weight {opts.lm_weight}, hidden-state weight {opts.hidden_weight})" \
            if opts.teacher else "trained on the LM loss"
        write_model_card(
            dst,
            base_model=str(opts.model) if adapter else str(base or opts.model),
            base_model_relation="adapter" if adapter else "finetune",
            tags=["latentkv", "kv-cache-compression", "distillation", "lora" if opts.mode == "lora" else "finetune"],
            command=opts.command or "latentkv finetune",
            recipe=recipe,
            results=result_rows,
            papers=["X-EcoMLA: upcycling attention into MLA with distillation (2025)", "MHA2MLA (arXiv 2502.14837)"],
            title=f"{Path(str(opts.model)).name}, healed" + (" (LoRA adapter)" if adapter else ""),
            description=(
                f"The converted model `{opts.model}` healed by `latentkv finetune` ({mode}; targets: {opts.target}) on "
                f"{tokens:,} tokens of `{opts.data}`, {teacher}. "
                + ("Load it with `latentkv.finetune.load_adapter(base, path)` (it routes the latent expansion "
                   "through kv_b_proj so that adapter applies), or write a merged model with `--merge`."
                   if adapter else
                   "It loads exactly as the model it came from.")
            ),
        )
    except Exception as exc:  # noqa: BLE001 - the card is not essential
        log.warning("could not write the model card in %s (%s); the weights are complete", dst, exc)


def results_rows(before, after, teacher, protocol: str, evals: list[dict]) -> list[dict] | None:
    if before is None and after is None:
        return None
    rows = [{"": f"WikiText-2 perplexity ({protocol})", "teacher": teacher, "before healing": before,
             "after healing": after}]
    for e in evals:
        rows.append({"": f"after {e['tokens'] / 1e6:.3g}M tokens", "after healing": e["perplexity"]})
    return rows


def save_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
