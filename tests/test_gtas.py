"""GTA-S (`--to gta-s`): exact start, cache geometry, map sharing by similarity, reload, healing, refusals.

One table of conversion cases feeds the generic tests; tiny random models from tests/tiny_models.py.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import transformers
from test_convert import _logits, _rel, reload_in_fresh_process
from tiny_models import TINY_TEXT, damaged_copy, heal_adapter_and_merged

from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert
from latentkv.errors import LatentKVError
from latentkv.modeling import load_model

G, H, D_HEAD, LAYERS = 2, 4, 16, 2  # tiny_models geometry (llama-mha: G = H = 4)

# name -> (architecture, options, map heads, value latent width) of one layer
CASES = {
    "llama-full": ("llama", {}, 2, 32),
    "mistral-full": ("mistral", {}, 2, 32),
    "qwen2-full": ("qwen2", {}, 2, 32),  # q/k/v biases
    "mixtral-full": ("mixtral", {}, 2, 32),
    "mha-full": ("llama-mha", {}, 4, 64),
    "llama3-scaled-full": ("llama3-scaled", {}, 2, 32),  # Llama-3 RoPE scaling through the source's rotary
    "gemma-full": ("gemma", {}, 2, 32),
    "llama-shared": ("llama", {"map_heads": 1, "kv_lora_rank": 20}, 1, 20),
    "qwen2-budget": ("qwen2", {"map_heads": 1, "kv_budget": 0.5}, 1, 16),  # 0.5 x 64 = 32 = 16 + 16
    "mha-shared": ("llama-mha", {"map_heads": 2, "kv_lora_rank": 40}, 2, 40),
}
FULL = [name for name in CASES if name.endswith("-full")]


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    """Factory: converted("llama-shared") -> (ConvertResult, folder), converted once per module."""
    root = tmp_path_factory.mktemp("gtas")
    done: dict = {}

    def make(name: str, source=None, **extra):
        key = (name, str(source), tuple(sorted(extra.items())))
        if key not in done:
            arch, options, _, _ = CASES[name]
            out = root / f"{name}-{len(done)}"
            result = convert(ConvertOptions(
                source=str(source or tiny_model_dir(arch)), output=str(out), method="gta-s",
                method_options={**options, **extra},
                calib=CalibOptions(data=str(TINY_TEXT), samples=8, seq_len=64, cache=str(root / f"cache-{out.name}")),
            ))  # fmt: skip
            done[key] = (result, out)
        return done[key]

    return make


def _source_logits(folder, ids):
    return _logits(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), ids)


@pytest.mark.parametrize("case", FULL)
def test_full_rank_reproduces_source(case, converted, tiny_model_dir):
    """Guards the exact start of docs/method.md (GTA-S) (every map kept, latent = all values, gate 1/2
    with W_O doubled): the logits equal the source's, so the key merge basis, RoPE through the
    source's rotary embedding, biases (qwen2), the centred latent's output bias and the gated
    decoder are all exact; and the cache is the source's size."""
    arch = CASES[case][0]
    result, out = converted(case)
    assert result.kv_values_per_token == result.source_kv_values_per_token
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    got = _logits(load_model(out), ids)
    assert torch.isfinite(got).all()
    assert _rel(got, _source_logits(tiny_model_dir(arch), ids)) < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_cache_geometry_and_kv_accounting(case, converted):
    """Guards the cache promise: K map heads x head dim + the value latent per token and layer, in
    the config, in the HF cache at generation, and in `latentkv eval`'s KV bytes (which refuses a
    config that disagrees with the cache); modules have the declared shapes; the gate starts at 0
    (sigmoid 1/2); a compressed setting is smaller than the source by exactly what it drops."""
    from latentkv.modeling import cached_forward, new_dynamic_cache

    from latentkv.eval.report import evaluate

    arch, _, k, r = CASES[case]
    result, out = converted(case)
    heads, kv_heads = (4, 4) if arch == "llama-mha" else (H, G)
    per_layer = k * D_HEAD + r
    assert result.kv_values_per_token == LAYERS * per_layer
    assert result.source_kv_values_per_token == LAYERS * 2 * kv_heads * D_HEAD
    model = load_model(out)
    attn = model.model.layers[0].self_attn
    assert type(attn).__name__ == "GroupedLatentAttention"
    assert attn.k_proj.weight.shape == (k * D_HEAD, 64) and attn.c_proj.weight.shape == (r, 64)
    assert attn.v_up_proj.weight.shape == (heads * D_HEAD, r) and attn.g_proj.weight.shape == (heads * D_HEAD, 64)
    assert float(attn.g_proj.weight.detach().abs().max()) == 0 == float(attn.g_proj.bias.detach().abs().max())
    cache = new_dynamic_cache(model.config)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached_forward(model, ids, cache)
    stored = sum(t.shape[1] * t.shape[-1] for layer in cache.layers for t in (layer.keys, layer.values))
    assert stored == result.kv_values_per_token
    report = evaluate(str(out), eval_text=str(TINY_TEXT), window=32, windows=2, batch_size=2)
    assert report["kv_values_per_token"] == result.kv_values_per_token
    assert report["kv_bytes_per_token_per_layer"] == 4 * per_layer  # float32
    rows = json.loads((out / "latentkv_layers.json").read_text())
    assert [row["map_heads"] for row in rows] == [k] * LAYERS
    assert all(sorted(sum(row["map_groups"], [])) == list(range(kv_heads)) for row in rows)


def test_shared_maps_shrink_the_cache_and_stay_close(converted, tiny_model_dir):
    """Guards map sharing as configured: one map head instead of two saves exactly one head dim per
    layer and token with the value latent kept whole, and the result stays near the source (a
    finite, bounded error) while the unshared start is exact."""
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    ref = _source_logits(tiny_model_dir("llama"), ids)
    full, full_out = converted("llama-full")
    shared, shared_out = converted("llama-shared", kv_lora_rank=32)
    assert full.kv_values_per_token - shared.kv_values_per_token == LAYERS * D_HEAD
    err = _rel(_logits(load_model(shared_out), ids), ref)
    assert _rel(_logits(load_model(full_out), ids), ref) < 1e-5 < err < 1.0


def test_maps_are_shared_by_similarity_not_index(converted, tiny_model_dir, tmp_path):
    """Guards the grouping: in a 4-KV-head source whose heads 0 and 2 (and 1 and 3) have identical
    keys, two map heads must merge {0, 2} and {1, 3} (found from the statistics; index order would
    merge 0 with 1), which loses nothing, so with the full value latent the logits stay exact;
    contiguous grouping on the same source is not exact."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "twins"
    shutil.copytree(tiny_model_dir("llama-mha"), src)
    weights = load_file(str(src / "model.safetensors"))
    for name, w in weights.items():
        if "k_proj" in name:
            heads = w.view(4, D_HEAD, -1) if w.dim() == 2 else w.view(4, D_HEAD)
            heads[2], heads[3] = heads[0].clone(), heads[1].clone()
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(4))
    ref = _source_logits(src, ids)
    result, out = converted("mha-shared", source=src, kv_lora_rank=64)
    assert [row["map_groups"] for row in result.layers] == [[[0, 2], [1, 3]]] * LAYERS
    assert _rel(_logits(load_model(out), ids), ref) < 1e-5
    _, plain = converted("mha-shared", source=src, kv_lora_rank=64, grouping="contiguous")
    assert _rel(_logits(load_model(plain), ids), ref) > 1e-3


@pytest.mark.parametrize("case", ["qwen2-budget", "mha-shared"])
def test_reload_in_fresh_process_without_latentkv(case, converted, tmp_path):
    """Guards the self-contained export of GTA-S: a fresh Python with latentkv blocked loads the folder
    with trust_remote_code, computes the same logits as the in-memory model, and its HF cache holds
    the map keys and value latent the config declares; decoding with that cache equals the full
    forward and greedy generate() gives the same tokens with the cache as without."""
    result, out = converted(case)
    rel, fresh = reload_in_fresh_process(out, tmp_path)
    assert rel < 1e-6
    assert fresh["cache_values_per_token"] == result.kv_values_per_token < result.source_kv_values_per_token
    assert fresh["incremental_rel"] < 1e-5
    assert fresh["generate_same"]


def test_incremental_decode_equals_full_forward(converted):
    """Guards the cached path: logits of tokens fed one at a time through the HF cache (map keys
    rotated at their positions, latent appended) equal those of one full forward."""
    from latentkv.modeling import cached_forward, new_dynamic_cache

    _, out = converted("llama-shared")
    model = load_model(out)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    full = _logits(model, ids)
    cache = new_dynamic_cache(model.config)
    with torch.no_grad():
        first = cached_forward(model, ids[:, :5], cache).logits
        steps = [cached_forward(model, ids[:, t:t + 1], cache).logits for t in range(5, 12)]
    stepwise = torch.cat([first, *steps], dim=1).double()
    assert _rel(stepwise, full) < 1e-5


def test_lora_reaches_the_gated_decoder():
    """Guards the LoRA routing of GTA-S's per-head up-projection: through the module (where a LoRA
    wrapper applies) it equals the direct per-head einsum on random inputs."""
    from latentkv.finetune import targets as tg
    from latentkv.modeling.modeling_latentkv import GroupedLatentAttention, LatentKVConfig

    config = LatentKVConfig(
        source_config={"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 16,
                       "num_hidden_layers": 1},
        attention_layers=[{"kind": "gta-s", "map_heads": 2, "rope_dim": 16, "kv_lora_rank": 12}],
        softmax_scale=0.35, v_head_dim=8,
    )
    attn = GroupedLatentAttention(config, 0)
    out = torch.randn(2, 5, 4, 12, generator=torch.Generator().manual_seed(6))
    direct = attn.decode_values(out)
    attn.route_projections_through_modules()
    assert torch.allclose(attn.decode_values(out), direct, atol=1e-6, rtol=1e-6)
    row = tg.FORMAT_TARGETS["latentkv"]
    assert {"k_proj", "c_proj", "v_up_proj", "g_proj", "q_proj", "o_proj"} <= set(row.attention)


def test_gtas_heals(converted, tiny_model_dir, tmp_path):
    """Guards `latentkv finetune` on GTA-S (it needs healing): LoRA lands on the map keys, the
    latent, the up-projection and the gate, distillation lowers the loss, and the merged model equals
    the adapter (so the adapter on v_up_proj is applied, not bypassed by the einsum)."""
    from safetensors.torch import load_file

    _, converted_out = converted("llama-shared")
    out = damaged_copy(converted_out, tmp_path / "damaged", "c_proj.weight")  # noise on the latent
    adapter, _, kl, rel = heal_adapter_and_merged(out, tiny_model_dir("llama"), tmp_path)
    assert sum(kl[-2:]) / 2 < 0.8 * kl[0], kl
    trained = {k for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()
               if "lora_B" in k and v.abs().max() > 0}
    for module in ("k_proj", "c_proj", "v_up_proj", "g_proj"):
        assert any(f"self_attn.{module}." in k for k in trained), module
    assert rel < 1e-5


REFUSALS = [
    ("llama", {"map_heads": 3}, "must divide the source's 2 KV heads"),
    ("llama", {"map_heads": 4}, "must divide the source's 2 KV heads"),
    ("llama", {"kv_lora_rank": 33}, "wider than possible"),
    ("llama", {"map_heads": 2, "kv_budget": 0.4}, "already fill"),
    ("llama", {"kv_lora_rank": 8, "kv_budget": 0.5}, "at most one of"),
    ("llama", {"kv_budget": 1.5}, "must be in (0, 1]"),
    ("llama", {"map_heads": 0}, "whole number >= 1"),
    ("llama", {"grouping": "random"}, "grouping must be one of"),
    ("llama", {"latent_heads": 2}, "Unknown gta-s settings"),
    ("llama", {"sequential": True}, "Unknown gta-s settings"),
]


@pytest.mark.parametrize("arch,options,message", REFUSALS)
def test_impossible_options_are_refused(arch, options, message, tiny_model_dir, tmp_path):
    """Guards user mistakes: each impossible setting raises LatentKVError naming the fix before any
    work, and nothing is written where the output was asked for."""
    out = tmp_path / "out"
    with pytest.raises(LatentKVError, match=re.escape(message)):
        convert(ConvertOptions(source=str(tiny_model_dir(arch)), output=str(out), method="gta-s",
                               method_options=options,
                               calib=CalibOptions(data=str(TINY_TEXT), samples=2, seq_len=32, cache=str(tmp_path / "c"))))
    assert not out.exists()


def test_deepseek_format_refuses_gtas(tmp_path, tiny_model_dir):
    """Guards the unsupported route: the DeepSeek format says to use the latentkv format rather than
    failing obscurely (its MLA layout has no map keys or gated decoder)."""
    with pytest.raises(LatentKVError, match="latentkv format only"):
        convert(ConvertOptions(source=str(tiny_model_dir("llama")), output=str(tmp_path / "x"), method="gta-s",
                               format="deepseek"))
