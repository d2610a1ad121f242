"""`--to gqa`: fewer KV heads in the source's own architecture (convert.gqa, convert.gqa_method)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from latentkv.convert import gqa, rope
from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert
from latentkv.errors import LatentKVError
from tiny_models import TINY_TEXT

TOKENS = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))


def _convert(source: Path, out: Path, tmp_path: Path, cache: bool = True, **options) -> Path:
    folder = str(tmp_path / f"cache-{source.name}") if cache else None
    convert(ConvertOptions(
        source=str(source), output=str(out), method="gqa", method_options=options,
        calib=CalibOptions(data=str(TINY_TEXT), samples=8, seq_len=64, cache=folder),
    ))
    return out


def _logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def _disk_names(folder: Path) -> set[str]:
    names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            names.update(fh.keys())
    return names


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "mixtral", "llama-mha", "gemma", "phi3", "phi3-partial"])
@pytest.mark.parametrize("method", ["pca", "meanpool"])
def test_same_heads_reproduces_source(tiny_model_dir, tmp_path, arch, method):
    """Guards the whole rewrite (pair layout, conj(B) on the queries, W_O folding, bias columns,
    disk names, config): keeping every KV head must give back the source's logits."""
    src = tiny_model_dir(arch)
    heads = json.loads((src / "config.json").read_text())["num_key_value_heads"]
    out = _convert(src, tmp_path / "out", tmp_path, num_kv_heads=heads, method=method)
    assert _rel(_logits(src), _logits(out)) < 1e-5


def test_sequential_calibration_runs_converted_attention(tiny_model_dir, tmp_path, monkeypatch):
    """Guards sequential calibration: the converted attention module (the source's own class with
    the new head count) must run inside the calibration pass; at full heads it changes nothing, and
    with fewer heads the result is a valid model."""
    # Both passes use the default cache root (an explicit --calib-cache folder is shared by both
    # passes, which the pipeline refuses): keep it inside tmp_path.
    monkeypatch.setenv("LATENTKV_CACHE", str(tmp_path / "lkv"))
    src = tiny_model_dir("qwen2")
    out = _convert(src, tmp_path / "out", tmp_path, cache=False, num_kv_heads=2, sequential=True)
    assert _rel(_logits(src), _logits(out)) < 1e-5
    fewer = _convert(src, tmp_path / "fewer", tmp_path, cache=False, num_kv_heads=1, sequential=True)
    assert torch.isfinite(_logits(fewer)).all()


def _copied_heads_source(tiny_model_dir, folder: Path, pattern: list[int], arch: str = "llama-mha") -> Path:
    """A tiny model with KV head g a copy of head pattern[g] (key and value rows, in fused q/k/v too)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from latentkv.arch import geometry_of, get_arch

    src = tiny_model_dir(arch)
    shutil.copytree(src, folder)
    config = AutoConfig.from_pretrained(src)
    spec, geo = get_arch(config), geometry_of(config)
    state = load_file(str(folder / "model.safetensors"))
    for name, t in state.items():
        for which in "kv":
            rows_of = spec.qkv_rows(geo)[which] if spec.fused_qkv else slice(None)
            if name.endswith(f"{spec.fused_qkv or getattr(spec, which + '_proj')}.weight"):
                rows = t[rows_of].view(geo.num_kv_heads, geo.head_dim, -1)
                t[rows_of] = rows[pattern].reshape(-1, t.shape[1])
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("arch,pattern", [("llama-mha", [0, 0, 2, 2]), ("phi3-partial", [1, 1])])
@pytest.mark.parametrize("method", ["pca", "meanpool"])
def test_merging_copied_heads_is_exact_contiguous(tiny_model_dir, tmp_path, method, arch, pattern):
    """Guards the merge itself: KV heads that are exact copies within contiguous groups must merge
    with no error (both the PCA merge and mean-pooling; with partial rotary, the rotated dims by
    complex PCA and the never-rotated ones by their own PCA), and the output declares the new count."""
    src = _copied_heads_source(tiny_model_dir, tmp_path / "copies", pattern, arch)
    heads = len(set(pattern))
    out = _convert(src, tmp_path / "out", tmp_path, num_kv_heads=heads, method=method, grouping="contiguous")
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == heads
    assert _rel(_logits(src), _logits(out)) < 1e-5


def test_similarity_grouping_finds_copied_heads(tiny_model_dir, tmp_path):
    """Guards the grouping and the query-head permutation: copies interleaved across index order
    (heads 0=2, 1=3) must be found by the similarity grouping, and permuting query heads with their
    W_O columns must keep the model exact; contiguous grouping cannot be exact there."""
    src = _copied_heads_source(tiny_model_dir, tmp_path / "copies", [0, 1, 0, 1])
    out = _convert(src, tmp_path / "sim", tmp_path, num_kv_heads=2, grouping="similarity")
    assert _rel(_logits(src), _logits(out)) < 1e-5
    plain = _convert(src, tmp_path / "plain", tmp_path, num_kv_heads=2, grouping="contiguous")
    assert _rel(_logits(src), _logits(plain)) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "mixtral", "gemma", "phi3", "phi3-partial"])
def test_fewer_heads_output_is_plain_source_architecture(tiny_model_dir, tmp_path, arch):
    """Guards the output contract: same model_type and tensor names as the source on disk (mixtral's
    disk names differ from module names), only num_key_value_heads changed, sidecars byte for byte,
    card and recipe written, finite logits; and the PCA merge beats mean-pooling on the same model."""
    src = tiny_model_dir(arch)
    out = _convert(src, tmp_path / "pca", tmp_path, num_kv_heads=1)
    base = _convert(src, tmp_path / "mean", tmp_path, num_kv_heads=1, method="meanpool")
    src_cfg, out_cfg = (json.loads((f / "config.json").read_text()) for f in (src, out))
    assert out_cfg.pop("num_key_value_heads") == 1
    src_cfg.pop("num_key_value_heads")
    assert out_cfg == src_cfg
    assert _disk_names(out) == _disk_names(src)
    for name in ("tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert (out / "README.md").is_file() and (out / "latentkv_recipe.yaml").is_file()
    ref, got, mean = _logits(src), _logits(out), _logits(base)
    assert torch.isfinite(got).all()
    assert _rel(ref, got) < _rel(ref, mean)


def test_reload_without_latentkv(tiny_model_dir, tmp_path):
    """Guards "loads everywhere": a fresh process with only transformers (latentkv not importable,
    no remote code) loads the folder and gives the same logits as this process."""
    src = tiny_model_dir("qwen2")
    out = _convert(src, tmp_path / "out", tmp_path, num_kv_heads=1)
    expected = _logits(out)
    script = (
        "import sys, torch\n"
        "sys.modules['latentkv'] = None  # importing latentkv would now fail\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=False, dtype=torch.float32).eval()\n"
        "assert m.config.num_key_value_heads == 1, m.config\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"with torch.no_grad(): torch.save(m(ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    torch.save(TOKENS, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert _rel(expected, torch.load(tmp_path / "logits.pt", weights_only=True)) < 1e-6


def test_bad_head_counts_are_refused(tiny_model_dir, tmp_path):
    """Guards input checking: a head count that does not divide the source's KV heads, or is
    larger, or is missing, is refused with the valid choices and nothing is written."""
    src = tiny_model_dir("llama-mha")
    for n in (3, 8):
        with pytest.raises(LatentKVError, match="choose one of 1, 2, 4"):
            _convert(src, tmp_path / "out", tmp_path, num_kv_heads=n)
    with pytest.raises(LatentKVError, match="--num-kv-heads"):
        _convert(src, tmp_path / "out", tmp_path)
    with pytest.raises(LatentKVError, match="grouping"):
        _convert(src, tmp_path / "out", tmp_path, num_kv_heads=2, grouping="random")
    assert not (tmp_path / "out").exists()


def test_qk_norm_source_is_refused(tiny_model_dir, tmp_path):
    """Guards the QK-norm refusal: merging Qwen3's normalised key heads is no linear mix, so --to gqa
    (and its mean-pooling baseline) refuses before any work, naming the targets that work, and
    writes nothing."""
    for method in ("pca", "meanpool"):
        with pytest.raises(LatentKVError, match="RMS-normalises every key head.*--to mla or --to gla"):
            _convert(tiny_model_dir("qwen3"), tmp_path / "out", tmp_path, num_kv_heads=1, method=method)
    assert not (tmp_path / "out").exists()


def test_key_loss_matches_direct_score_error():
    """Guards the statistics shortcut and the grouping's key-loss formula: the basis built from the
    layer's precomputed pair covariances must equal rope.key_basis on the rows, and the predicted
    loss (which undoes basis_from_covariance's weight normalisation) must equal the query-weighted
    energy of the dropped pair components computed directly."""
    from latentkv.convert.mla import LayerInputs

    torch.manual_seed(0)
    G, n, d, D = 3, 2, 8, 12
    H, P = G * n, d // 2
    x = torch.cat([torch.randn(500, D, dtype=torch.float64), torch.ones(500, 1, dtype=torch.float64)], 1)
    inp = LayerInputs(
        q=torch.randn(H * d, D + 1, dtype=torch.float64), k=torch.randn(G * d, D + 1, dtype=torch.float64),
        v=torch.randn(G * d, D + 1, dtype=torch.float64), o=torch.randn(D, H * d, dtype=torch.float64), o_bias=None,
        moment=x.T @ x / 500, distance=None, inv_freq=torch.rand(P, dtype=torch.float64), num_heads=H,
        num_kv_heads=G, head_dim=d, scale=d**-0.5,
    )
    lm = gqa.layer_moments(inp, gqa.GQAConfig(num_kv_heads=1, key_weighting="query"))
    basis, loss = gqa.key_fit(lm, [0, 1, 2])
    group = torch.arange(G).repeat_interleave(n)
    ref = rope.key_basis(rope.complex_pairs(inp.k, G, d), rope.complex_pairs(inp.q, H, d), inp.moment, group)
    assert torch.allclose(basis.weighted_energy, ref.weighted_energy, rtol=1e-9, atol=1e-9)
    # Direct: sum_h E|zq_h|^2 sum_{m>0} |B[j, g(h), m]|^2 E|w_m|^2
    direct = sum(float((lm.q_energy[:, h, None] * basis.B[:, group[h], 1:].abs() ** 2 * basis.key_energy[:, 1:]).sum())
                 for h in range(H))
    assert abs(loss - direct) < 1e-6 * direct


def test_choose_groups_prefers_cheap_groups():
    """Guards the equal-size grouping search: with a cost that is zero only for the planted groups,
    greedy + swaps must find them (sizes 2 and 4 of 8 heads)."""
    for size, planted in ((2, [[0, 5], [1, 7], [2, 4], [3, 6]]), (4, [[0, 2, 5, 7], [1, 3, 4, 6]])):
        label = {h: i for i, g in enumerate(planted) for h in g}

        def cost(members):
            return float(len({label[h] for h in members}) - 1)

        assert gqa.choose_groups(8, size, cost) == sorted(planted)
