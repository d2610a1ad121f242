"""The conversion targets (`--to NAME`): one `TargetRecord` each, registered with one call.

A record is plain data (class paths as strings), so reading it imports nothing heavy: the CLI's
help, `inspect`, finetune and the decode loop read the records; the method class (a
`convert.method.ConversionMethod`) is imported only when a conversion runs (`get_method`).
Adding a target: docs/adding-a-target.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from latentkv.errors import LatentKVError

# Attention kinds of a converted layer: the latentkv modeling class each one is (the class
# `attention_class` of modeling_latentkv.py builds for its layer spec), whether the paged latent cache
# of `runtime.decode` runs it, and how it feeds that cache (`TargetRecord.decode_adapter`).
# "source": the output keeps the source's own attention.
ATTENTION_KINDS: dict[str, dict] = {
    # MLA / GLA: absorbed up-projections (kv_b_proj) over one cached row of [latent | RoPE key]
    "latent": {"layer_class": "LatentAttention", "paged_decode": True, "decode_adapter": "latent"},
    # GTA-T: the same row, each latent head a tied state that is key and value (identity up-projections)
    "tied": {"layer_class": "TiedLatentAttention", "paged_decode": True, "decode_adapter": "latent"},
    # GTA-S: cached [value latent | map keys], rotated by the decoder's shared RoPE, gated per-head decoder
    "grouped": {"layer_class": "GroupedLatentAttention", "paged_decode": True, "decode_adapter": "grouped"},
    "source": {"layer_class": None, "paged_decode": False, "decode_adapter": None},
}


@dataclass(frozen=True)
class InspectRow:
    """One row of `latentkv inspect`'s target table: the command, what it caches per token and layer,
    how many values that is, and whether sliding-window layers of a hybrid model stay at the source's
    width (their cache then holds at most the window)."""

    target: str
    what: str
    values: int
    keeps_sliding: bool = False


@dataclass(frozen=True)
class TargetRecord:
    """Everything the rest of latentkv needs to know about one `--to` target.

    name: the `--to` value.
    method: "module:Class" of its `convert.method.ConversionMethod` (imported by `get_method` only).
    papers: what the model card cites.
    help: the words after the name in `--to`'s help ("" for none).
    attention: the attention kind of its layers (a key of `ATTENTION_KINDS`): decides the modeling
        class, whether `runtime.decode`'s paged latent cache runs it and how (`decode_adapter`).
    trainable: the linears of its attention that `latentkv finetune` trains (module names inside a
        layer's attention; names a layer lacks are skipped). Empty for "source" targets, whose output
        is the source's own architecture.
    cli_options: the shared MLA-family flags the CLI passes to it ("qk_rope_dim", "sequential").
    inspect: "module:function" giving its `InspectRow`s for a source: f(geometry, arch, config) ->
        list[InspectRow] (None: no row).
    """

    name: str
    method: str
    papers: tuple[str, ...] = ()
    help: str = ""
    attention: str = "latent"
    trainable: tuple[str, ...] = ()
    cli_options: tuple[str, ...] = ()
    inspect: str | None = None

    def __post_init__(self):
        if self.attention not in ATTENTION_KINDS:
            raise LatentKVError(f"Target {self.name!r}: attention must be one of {', '.join(ATTENTION_KINDS)}, "
                                f"got {self.attention!r}")
        if ":" not in self.method:
            raise LatentKVError(f"Target {self.name!r}: method must be 'module:Class', got {self.method!r}")

    @property
    def layer_class(self) -> str | None:
        """The latentkv modeling class of its converted layers (None: the source's own attention)."""
        return ATTENTION_KINDS[self.attention]["layer_class"]

    @property
    def paged_decode(self) -> bool:
        """Whether `runtime.decode` (the paged latent cache, `latentkv generate`, decode checks) runs it."""
        return ATTENTION_KINDS[self.attention]["paged_decode"]

    @property
    def decode_adapter(self) -> str | None:
        """How the paged decode loop feeds its layers: "latent" (absorbed, each layer rotates itself) or
        "grouped" (the decoder's shared RoPE); None where it does not decode there."""
        return ATTENTION_KINDS[self.attention]["decode_adapter"] if self.paged_decode else None


TARGETS: dict[str, TargetRecord] = {}
# Views kept for callers that predate the records: name -> "module:Class", name -> papers.
METHODS: dict[str, str] = {}
PAPERS: dict[str, list[str]] = {}


def register_target(record: TargetRecord) -> None:
    """Make `--to record.name` known (replacing a record of the same name)."""
    TARGETS[record.name] = record
    METHODS[record.name] = record.method
    PAPERS[record.name] = list(record.papers)


def unregister_target(name: str) -> None:
    for table in (TARGETS, METHODS, PAPERS):
        table.pop(name, None)


def get_target(name: str) -> TargetRecord:
    record = TARGETS.get(name)
    if record is None:
        raise LatentKVError(f"Unknown conversion target {name!r}; known: {', '.join(sorted(TARGETS))}")
    return record


def targets() -> list[TargetRecord]:
    """Every registered target, in registration order."""
    return list(TARGETS.values())


def load(path: str):
    """The object of a "module:name" path."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def get_method(name: str):
    """A fresh instance of the target's method class."""
    target = METHODS.get(name)
    if target is None:
        raise LatentKVError(f"Unknown conversion target {name!r}; known: {', '.join(sorted(METHODS))}")
    return load(target)()


def target_help() -> str:
    """`--to`'s help: every target with its help words."""
    return "Target: " + ", ".join(f"{r.name} ({r.help})" if r.help else r.name for r in targets()) + "."


def latent_target_names() -> list[str]:
    """Targets whose output is a latentkv-format model (its own attention modules)."""
    return [r.name for r in targets() if r.attention != "source"]


def layer_classes(paged_only: bool = False) -> tuple[str, ...]:
    """The latentkv modeling classes converted layers are (those the paged decode runs, if `paged_only`)."""
    return tuple(dict.fromkeys(r.layer_class for r in targets()
                               if r.layer_class is not None and (r.paged_decode or not paged_only)))


def trainable_modules() -> tuple[str, ...]:
    """The attention linears finetune trains in a latentkv-format model: every latent target's, in order."""
    return tuple(dict.fromkeys(name for r in targets() if r.attention != "source" for name in r.trainable))


_HARDWARE_EFFICIENT = "Hardware-Efficient Attention for Fast Decoding, Zadouri, Strauss, Dao (arXiv 2505.21487)"
# LatentAttention / TiedLatentAttention (GTA-T: no kv_b_proj): k_proj, v_proj and the per-head query map exist
# in the qk_norm layers of a Qwen3 conversion only.
_LATENT_TRAINABLE = ("q_proj", "k_proj", "v_proj", "kv_a_proj", "kv_b_proj", "o_proj")
_MLA_FLAGS = ("qk_rope_dim", "sequential")

register_target(TargetRecord(
    name="mla", method="latentkv.convert.mla_method:MLAMethod",
    papers=("TransMLA (arXiv 2502.07864)", "MHA2MLA (arXiv 2502.14837)", "CARE (ICLR 2026)"),
    attention="latent", trainable=_LATENT_TRAINABLE, cli_options=_MLA_FLAGS,
    inspect="latentkv.convert.sizes:mla_rows"))
register_target(TargetRecord(
    name="gla", method="latentkv.convert.mla_method:GLAMethod", papers=(_HARDWARE_EFFICIENT,),
    help="grouped latent", attention="latent", trainable=_LATENT_TRAINABLE, cli_options=_MLA_FLAGS,
    inspect="latentkv.convert.sizes:gla_rows"))
register_target(TargetRecord(
    name="gta", method="latentkv.convert.mla_method:GTAMethod", papers=(_HARDWARE_EFFICIENT,),
    help="GTA-T: tied K/V state per KV head", attention="tied", trainable=_LATENT_TRAINABLE,
    cli_options=_MLA_FLAGS, inspect="latentkv.convert.sizes:gta_rows"))
register_target(TargetRecord(
    name="gta-s", method="latentkv.convert.gtas_method:GTASMethod",
    papers=("GTA: Grouped-head latenT Attention, Sun et al. 2025 (arXiv 2506.17286)",),
    help="GTA-S: shared-map key heads + gated value latent; --set map_heads=N", attention="grouped",
    # map keys k_proj, value latent c_proj, its gated decoder v_up_proj / g_proj
    trainable=("q_proj", "k_proj", "o_proj", "c_proj", "v_up_proj", "g_proj"),
    inspect="latentkv.convert.sizes:gtas_rows"))
register_target(TargetRecord(
    name="gqa", method="latentkv.convert.gqa_method:GQAMethod",
    papers=("Effectively Compress KV Heads for LLM, Yu et al. 2024 (arXiv 2406.07056)",),
    attention="source", inspect="latentkv.convert.sizes:gqa_rows"))
