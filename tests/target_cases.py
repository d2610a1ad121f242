"""One row per conversion target (`--to`), and the generic checks every target gets (tests/test_targets.py).

A row names the target, the method options of a conversion at full rank that must reproduce the
source (None where the target has no exact setting: GTA-T's width is fixed below the source's) and
those of a compressed conversion. Which checks run for a target follows its `TargetRecord`: the
paged decode check where it decodes through the paged cache, the finetune step where it has
trainable attention linears. Adding a target adds a row here (docs/adding-a-target.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from tiny_models import TINY_TEXT

from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert
from latentkv.modeling import load_model


@dataclass(frozen=True)
class TargetCase:
    name: str
    exact: dict | None  # options converting at full rank: the source's logits (None: no such setting)
    compressed: dict  # options of a conversion that caches less than the source
    arch: str = "llama"  # the tiny model of tests/tiny_models.py it converts

    def __str__(self) -> str:
        return self.name


CASES = [
    TargetCase("mla", exact=dict(kv_budget=1.0), compressed=dict(kv_budget=0.5)),
    TargetCase("gla", exact=dict(kv_budget=1.0, latent_heads=2), compressed=dict(kv_budget=0.5, latent_heads=2)),
    TargetCase("gta", exact=None, compressed=dict()),
    TargetCase("gta-s", exact=dict(), compressed=dict(map_heads=1, kv_budget=0.5)),
    TargetCase("gqa", exact=dict(num_kv_heads=2), compressed=dict(num_kv_heads=1)),
]


def convert_case(source, out, target: str, options: dict, cache):
    """`latentkv convert` of one tiny model with the tiny calibration text."""
    return convert(ConvertOptions(source=str(source), output=str(out), method=target, method_options=dict(options),
                                  calib=CalibOptions(data=str(TINY_TEXT), samples=8, seq_len=64, cache=str(cache))))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def ids(length: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(seed))


def check_exact(result, out, source) -> None:
    """At full rank the output caches what the source caches and computes the source's logits."""
    assert result.kv_values_per_token == result.source_kv_values_per_token
    x = ids()
    ref = logits(transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval(), x)
    got = logits(load_model(out), x)
    assert torch.isfinite(got).all()
    assert rel(got, ref) < 1e-5


def check_reload(result, out, tmp_path) -> None:
    """The written folder, loaded in a fresh Python without latentkv, computes what latentkv's loader
    computes, its own cache holds what the conversion declared, and decodes incrementally exactly."""
    from test_convert import reload_in_fresh_process

    difference, fresh = reload_in_fresh_process(out, tmp_path)
    assert difference < 1e-6
    assert fresh["cache_values_per_token"] == result.kv_values_per_token < result.source_kv_values_per_token
    assert fresh["incremental_rel"] < 1e-5
    assert fresh["generate_same"]


def check_decode(out) -> None:
    """The paged latent cache (reference backend) gives the full forward's logits and greedy tokens."""
    from transformers import AutoTokenizer

    from latentkv.eval.decode_check import decode_check

    model, tok = load_model(out, dtype=torch.float32), AutoTokenizer.from_pretrained(out)
    report = decode_check(model, tok, "To be, or not to be, that is the question", num_tokens=24,
                          backend="reference", page_size=16, prefill_chunk=8, max_prompt_tokens=12)
    assert report["passed"], report


def check_finetune_step(out, record) -> None:
    """One optimizer step of `--mode attention` training: it runs, and changes the weights of the
    record's trainable attention linears (every one the model has) and nothing else."""
    from latentkv.finetune.targets import freeze_all_but, targets_for

    model = load_model(out, dtype=torch.float32)
    model.train()
    row = targets_for(model.config)
    trained = freeze_all_but(model, row, "attention")
    present = {name.rsplit(".", 1)[-1] for name in trained}
    layer_modules = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert present == set(record.trainable) & layer_modules, (present, record.trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = ids(32, seed=3)
    loss = model(x, labels=x).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    allowed = set(record.trainable) | set(row.extra)
    assert changed, "the step changed nothing"
    assert all(name.split(".")[-2] in allowed for name in changed), sorted(changed)
    assert {name.split(".")[-2] for name in changed} == present, (sorted(changed), present)
