"""The contract between `convert.pipeline` and a conversion method (one per `--to` target).

A method is a class with the steps of `ConversionMethod` and a `capabilities` record saying which
optional passes it takes part in; the pipeline reads the record instead of probing for attributes.
Adding a target: docs/adding-a-target.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Capabilities:
    """What a method can do beyond the required steps.

    sequential_pass: `sequential_module` builds a converted layer during a pass through the converted
        layers, so the method's config has a `sequential` field (sequential calibration).
    output_refit: the config has `refit_output` (and `refit_windows`): that pass re-solves each
        layer's o_proj against the source attention (needs `sequential_pass`).
    plan_in_pass: the method has `plan_in_pass(stream, cfg, fmt)`, which returns a plan whose widths
        `sequential_module` fills layer by layer, or None when the widths need every layer's
        statistics first; sequential calibration then runs in one pass. The pipeline also takes
        the two-pass route where the attribute is None.
    formats: the `--format` values `make_config` accepts.
    """

    sequential_pass: bool = False
    output_refit: bool = False
    plan_in_pass: bool = False
    formats: tuple[str, ...] = ("latentkv",)


@runtime_checkable
class ConversionMethod(Protocol):
    """The steps `convert.pipeline.convert` runs, in this order:

    1. `make_config(options, fmt)`: the method's typed config from `--set` / flag options (unknown
       keys and impossible values refused with a `LatentKVError`). The config's fields and defaults
       are what a written recipe replays.
    2. `validate(config, arch, cfg, fmt)`: refuse what this source cannot be converted to, before any
       calibration; may resolve geometry-dependent fields of `cfg`.
    3. `plan(stream, stats, cfg, fmt)`: the per-layer widths / groupings from the calibration
       statistics (a plan object; `plan.key()` fingerprints it; a plan with a `built` dict keeps the
       layers a sequential pass builds, spilled to disk by the pipeline).
    4. `sequential_module(stream, i, stats, plan, cfg, source_attn, batches)`: layer i's converted
       attention module during a pass through the converted layers (only with
       `capabilities.sequential_pass`; others may raise `LatentKVError`).
    5. `write(stream, stats, plan, cfg, opts, source, folder, save_dtype, progress)`: the output
       folder's weights, config, recipe and card; returns a `ConvertResult`.
    """

    name: str
    capabilities: Capabilities

    def make_config(self, options: dict, fmt: str) -> Any: ...

    def validate(self, config, arch, cfg, fmt: str) -> None: ...

    def plan(self, stream, stats, cfg, fmt: str) -> Any: ...

    def sequential_module(self, stream, i: int, stats, plan, cfg, source_attn=None, batches=None): ...

    def write(self, stream, stats, plan, cfg, opts, source, folder, save_dtype, progress=None): ...
