"""The fine-tuning hooks of the modeling file's attention classes (`route_projections_through_modules`,
`use_rope_frequency_buffer`) on a tiny converted model of each latent kind: they keep the logits, a
LoRA adapter on the up-projections applies once routed, and a modeling file without them is refused
only where they are needed."""

from __future__ import annotations

import pytest
import torch
from target_cases import CASES

from latentkv.convert.registry import get_target, targets
from latentkv.errors import LatentKVError
from latentkv.finetune import targets as tg
from latentkv.finetune.speed import use_frequency_buffers
from latentkv.modeling import load_model

# every target whose output has latentkv attention layers (MLA, GLA, GTA-T, GTA-S), as test_targets
# converts it compressed
LATENT = {case.name: case.compressed for case in CASES if get_target(case.name).attention != "source"}
# the layers whose routed path calls kv_b_proj / v_up_proj on every head where the direct path is an
# einsum over the weight: the same dot products, which a matmul of another shape may sum in another order
REORDERED_SUMS = {"gla", "gta-s"}
# the up-projection each kind reads as a weight (GTA-T has none: its state is key and value itself)
UP_PROJECTION = {"mla": "kv_b_proj", "gla": "kv_b_proj", "gta-s": "v_up_proj"}


def _model(tiny_converted, kind: str):
    return load_model(tiny_converted(kind, **LATENT[kind]), dtype=torch.float32)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))


def test_every_latent_kind_is_covered():
    assert set(LATENT) == {"mla", "gla", "gta", "gta-s"}
    assert set(UP_PROJECTION) | {"gta"} == set(LATENT)


@pytest.mark.parametrize("kind", sorted(LATENT))
def test_hooks_keep_the_logits(kind, tiny_converted):
    """Guards the hooks' promise, the same numbers: the RoPE frequencies read from a buffer give the
    very same logits (same values, same arithmetic), and so does routing the up-projections through
    their modules, bit for bit where it is the same computation (MLA: already a module call; GTA-T:
    nothing to route). GLA and GTA-S compute each expanded value as the same dot product over the
    latent, but through a matmul of another shape, whose summation order may differ: float32 rounding,
    so 1e-6 (relative and absolute, logits of order 1) there. Also: each layer is the class the
    registry names for its target, and the buffer is not written with the weights."""
    model = _model(tiny_converted, kind)
    attns = [layer.self_attn for layer in model.model.layers]
    assert {type(a).__name__ for a in attns} == {get_target(kind).layer_class}
    ids, keys = _ids(), set(model.state_dict())
    before = _logits(model, ids)

    own_rope = kind != "gta-s"  # GTA-S rotates with the decoder's shared rotary embedding
    assert use_frequency_buffers(model) == (len(attns) if own_rope else 0)
    assert all((a.rope_freq is not None) == own_rope for a in attns if hasattr(a, "rope_freq"))
    assert torch.equal(_logits(model, ids), before)
    assert set(model.state_dict()) == keys

    assert tg.route_projections_through_modules(model) == len(attns)
    after = _logits(model, ids)
    if kind in REORDERED_SUMS:
        torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(after, before)


@pytest.mark.parametrize("kind", sorted(UP_PROJECTION))
def test_lora_on_the_up_projection_applies_once_routed(kind, tiny_converted):
    """Guards LoRA healing of kv_b_proj / v_up_proj: after the routing hook an adapter with nonzero B
    changes the logits, by exactly what merging it into the weight does (float32 rounding of W + BA)."""
    from peft import LoraConfig, get_peft_model

    model = _model(tiny_converted, kind)
    ids, proj = _ids(), UP_PROJECTION[kind]
    base = _logits(model, ids)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0, target_modules=[proj]))
    torch.manual_seed(0)
    adapted = {name for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert len(adapted) == len(model.model.layers)
    for name, m in peft_model.named_modules():
        if name in adapted:
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.5)
    assert tg.route_projections_through_modules(peft_model, adapted) == len(adapted)
    adapted_logits = _logits(peft_model, ids)
    assert not torch.allclose(adapted_logits, base, atol=1e-3)

    merged = _model(tiny_converted, kind)  # the plain inference path, with W + BA as the weight
    merged.load_state_dict(peft_model.merge_and_unload().state_dict())
    torch.testing.assert_close(_logits(merged, ids), adapted_logits, rtol=1e-5, atol=1e-5)


class HooklessLatentAttention(torch.nn.Module):
    """An attention as a modeling file written before the hooks has it: with several latent heads
    (GLA) its forward reads kv_b_proj's weight, and it keeps its RoPE frequencies as a Python list."""

    def __init__(self, latent_heads: int = 2):
        super().__init__()
        self.latent_heads = latent_heads
        self.q_proj = torch.nn.Linear(4, 4)
        self.kv_b_proj = torch.nn.Linear(2, 4, bias=False)
        self.rope_inv_freq = [1.0, 0.1]

    def expand_latent(self, c: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bsr,or->bso", c, self.kv_b_proj.weight)


def test_a_modeling_file_without_the_hooks_is_refused_where_they_are_needed():
    """Guards against a silent no-op: LoRA on a projection such an attention reads as a weight, and
    --compile's frequency buffers, are refused with the fix; LoRA elsewhere goes on."""
    model = torch.nn.Module()
    model.self_attn = HooklessLatentAttention()
    with pytest.raises(LatentKVError, match="latentkv convert"):
        tg.route_projections_through_modules(model, {"self_attn.kv_b_proj"})
    with pytest.raises(LatentKVError, match="kv_b_proj"):
        tg.route_projections_through_modules(model)
    assert tg.route_projections_through_modules(model, {"self_attn.q_proj"}) == 0
    with pytest.raises(LatentKVError, match="without --compile"):
        use_frequency_buffers(model)
    # one latent head: such a forward already called kv_b_proj as a module, so LoRA on it goes on
    model.self_attn = HooklessLatentAttention(latent_heads=1)
    assert tg.route_projections_through_modules(model, {"self_attn.kv_b_proj"}) == 0


def test_the_layer_spec_picks_the_class_the_registry_names():
    """Guards the one source of truth: every latent target's registry `layer_class` is a class of the
    modeling file with the routing hook (and the frequency hook where it has RoPE of its own), and a
    layer spec builds that class (`attention_class`): GTA-S by `kind`, GTA-T by `tied`."""
    from latentkv.modeling import modeling_latentkv as ml

    for record in targets():
        if record.layer_class is not None:
            assert callable(getattr(getattr(ml, record.layer_class), "route_projections_through_modules"))
    assert ml.attention_class({"kind": "gta-s"}) is ml.GroupedLatentAttention
    assert ml.attention_class({"tied": True}) is ml.TiedLatentAttention
    assert ml.attention_class({"latent_heads": 2}) is ml.LatentAttention
    assert issubclass(ml.TiedLatentAttention, ml.LatentAttention)
    assert hasattr(ml.LatentAttention, "use_rope_frequency_buffer")
    assert {get_target(n).layer_class for n in ("mla", "gla")} == {"LatentAttention"}
    assert get_target("gta").layer_class == "TiedLatentAttention"
    assert get_target("gta-s").layer_class == "GroupedLatentAttention"
