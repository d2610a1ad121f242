"""latentkv.io: lazy reading, crash-safe writing, sources (folder / GGUF / Hub id), cards."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from latentkv.errors import LatentKVError
from latentkv.io import (
    LazyCheckpoint,
    OutputFolder,
    ShardedWriter,
    copy_sidecars,
    open_source,
    parse_size,
    write_model_card,
    write_recipe,
)
from latentkv.io.writer import MARKER_FILE, SIDECAR_FILES


def _model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def _assert_same(lazy: LazyCheckpoint, reference: dict[str, torch.Tensor]) -> None:
    assert sorted(lazy.keys()) == sorted(reference)
    for name, ref in reference.items():
        got = lazy.get(name)
        assert got.dtype == ref.dtype and tuple(got.shape) == tuple(ref.shape), name
        assert torch.equal(got, ref), name
        assert lazy.shape(name) == tuple(ref.shape) and lazy.dtype(name) == ref.dtype


def _hidden_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial" in p.name or ".old-" in p.name]


# ---- LazyCheckpoint -----------------------------------------------------------------------


def test_lazy_single_safetensors_equals_state_dict(tiny_model_dir):
    """Guards against the lazy reader returning wrong, missing or re-typed tensors from a single file."""
    folder = tiny_model_dir("qwen2")
    sd = _model(folder).state_dict()
    lazy = LazyCheckpoint(folder)
    assert lazy.format == "safetensors" and len(lazy.files) == 1
    _assert_same(lazy, sd)
    assert lazy.total_bytes == sum(t.numel() * t.element_size() for t in sd.values())
    assert "model.layers.0.self_attn.q_proj.bias" in lazy and "nope" not in lazy
    # dtype / device conversion happens on the returned tensor only.
    assert lazy.get("model.norm.weight", dtype=torch.float64).dtype == torch.float64


def test_lazy_get_returns_independent_tensors(tiny_model_dir, tmp_path):
    """Guards against returned tensors aliasing the memory map, so an in-place edit by a conversion
    step would silently change what the next read of the same weight returns."""
    sd = _model(tiny_model_dir("qwen2")).state_dict()
    torch.save({k: v.clone() for k, v in sd.items()}, tmp_path / "pytorch_model.bin")
    for lazy in (LazyCheckpoint(tiny_model_dir("qwen2")), LazyCheckpoint(tmp_path)):
        name = "model.layers.0.self_attn.k_proj.weight"
        lazy.get(name).mul_(0.0)
        assert torch.equal(lazy.get(name), sd[name]), lazy.format


def test_lazy_sharded_safetensors_equals_state_dict(tiny_model_dir, tmp_path):
    """Guards against the index being ignored or a tensor read from the wrong shard."""
    model = _model(tiny_model_dir("qwen2"))
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    lazy = LazyCheckpoint(tmp_path)
    assert len(lazy.files) > 1
    sd = model.state_dict()
    _assert_same(lazy, sd)
    layer = lazy.get_many("model.layers.1.")
    assert layer and set(layer) == {k for k in sd if k.startswith("model.layers.1.")}


def test_bin_read_with_weights_only(tiny_model_dir, tmp_path):
    """Guards against .bin checkpoints being unreadable or loaded with full pickle."""
    sd = {k: v.clone() for k, v in _model(tiny_model_dir("qwen2")).state_dict().items()}
    single = tmp_path / "single"
    single.mkdir()
    torch.save(sd, single / "pytorch_model.bin")
    lazy = LazyCheckpoint(single)
    assert lazy.format == "bin"
    _assert_same(lazy, sd)

    # Sharded .bin with its index.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        torch.save({k: sd[k] for k in keys}, sharded / file)
        weight_map.update({k: file for k in keys})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_same(LazyCheckpoint(sharded), sd)


class _NotATensor:
    pass


def test_bin_with_pickled_object_is_refused(tmp_path):
    """Guards against arbitrary pickled code being executed when reading a .bin file."""
    torch.save({"w": torch.zeros(2), "evil": _NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(LatentKVError, match="weights_only=True"):
        LazyCheckpoint(tmp_path)


def test_missing_shard_is_named(tiny_model_dir, tmp_path):
    """Guards against an incomplete download failing late or with a bare FileNotFoundError."""
    _model(tiny_model_dir("qwen2")).save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / victim).unlink()
    with pytest.raises(LatentKVError, match=rf"{victim}.*missing.*re-download"):
        LazyCheckpoint(tmp_path)


@pytest.mark.parametrize("damage", ["garbage_header", "truncated", "tiny"])
def test_corrupt_shard_is_reported(tiny_model_dir, tmp_path, damage):
    """Guards against a damaged safetensors file crashing deep inside a conversion."""
    shutil.copy(tiny_model_dir("qwen2") / "model.safetensors", tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "garbage_header":
        data[8:40] = b"\xff" * 32
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = data[:5]
    path.write_bytes(bytes(data))
    with pytest.raises(LatentKVError, match="model.safetensors.*(corrupt|truncated)"):
        LazyCheckpoint(tmp_path)


def test_no_weights_lists_names_looked_for(tmp_path):
    """Guards against a vague error when a folder holds no weights at all."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LatentKVError, match=r"model\.safetensors.*pytorch_model\.bin"):
        LazyCheckpoint(tmp_path)


def test_unknown_tensor_suggests_close_names(tiny_model_dir):
    """Guards against a typo in a weight name giving a bare KeyError with no hint."""
    lazy = LazyCheckpoint(tiny_model_dir("qwen2"))
    with pytest.raises(LatentKVError, match="Did you mean 'model.layers.0.self_attn.q_proj.weight'"):
        lazy.get("model.layers.0.self_attn.q_proj.weigth")


# ---- writer -------------------------------------------------------------------------------


def test_parse_size():
    """Guards against --max-shard-size being misread (decimal vs binary units, bad input)."""
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(1234) == 1234
    for bad in ("5 parsecs", "", "-1GB", 0):
        with pytest.raises(LatentKVError):
            parse_size(bad)


def test_sharded_writer_round_trip(tiny_model_dir, tmp_path):
    """Guards against lost tensors, a wrong index, and tied / non-contiguous tensors breaking saving."""
    sd = dict(_model(tiny_model_dir("qwen2")).state_dict())
    emb = sd["model.embed_tokens.weight"]
    extra = {
        "tied.weight": emb,  # same storage as the embedding: safetensors refuses unless cloned
        "transposed.weight": sd["model.layers.0.mlp.up_proj.weight"].t(),  # non-contiguous
        "slice.weight": emb[3:7],  # a view into a larger storage
    }
    everything = {**sd, **extra}
    writer = ShardedWriter(tmp_path, max_shard_size="64KB")
    for name, t in everything.items():
        writer.add(name, t)
    index = writer.close()

    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    n = len(shards)
    assert n > 2, "a small max_shard_size must produce several shards"
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    on_disk = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert on_disk == index
    assert set(on_disk["weight_map"]) == set(everything)
    assert on_disk["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in everything.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp shard names left behind"
    for shard in shards:  # each shard within the limit unless it holds a single oversize tensor
        loaded = load_file(tmp_path / shard)
        size = sum(t.numel() * t.element_size() for t in loaded.values())
        assert size <= 64_000 or len(loaded) == 1
        from safetensors import safe_open

        with safe_open(str(tmp_path / shard), framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}
    lazy = LazyCheckpoint(tmp_path)
    _assert_same(lazy, {k: v.contiguous() for k, v in everything.items()})


def test_sharded_writer_bytes_equal_save_file(tmp_path):
    """Guards against the streaming writer's shards differing by one byte from what safetensors'
    own save_file writes for the same tensors (outputs must not change with the writer): mixed
    dtypes (laid out by dtype, then name), a scalar, an empty tensor, a header needing padding."""
    tensors = {
        "z.w": torch.randn(5, 3), "a.w": torch.randn(7).to(torch.bfloat16), "m.idx": torch.arange(3),
        "b.half": torch.randn(2, 2).half(), "flag": torch.tensor([True, False, True]), "s": torch.tensor(2.5),
        "d64": torch.randn(4, dtype=torch.float64), "e": torch.zeros(0), "i8": torch.arange(5, dtype=torch.int8),
    }
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    writer = ShardedWriter(tmp_path / "streamed")
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    streamed = (tmp_path / "streamed" / "model.safetensors").read_bytes()
    assert streamed == (tmp_path / "reference.safetensors").read_bytes()


def test_sharded_writer_holds_no_tensor(tmp_path):
    """Guards against the writer buffering a shard's tensors in memory: each tensor's bytes are on
    disk when add() returns, and the writer keeps no reference to it."""
    import weakref

    writer = ShardedWriter(tmp_path)
    t = torch.randn(1000)
    ref = weakref.ref(t)
    writer.add("t", t)
    del t
    assert ref() is None, "the writer kept the tensor alive"
    spilled = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(spilled) == 1 and spilled[0].stat().st_size == 4000
    writer.close()


def test_sharded_writer_single_shard_name(tmp_path):
    """Guards against a one-shard output getting a -00001-of-00001 name transformers does not expect."""
    writer = ShardedWriter(tmp_path)
    writer.add("a", torch.ones(3))
    index = writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert index["weight_map"] == {"a": "model.safetensors"}


def test_output_folder_refuses_non_empty_and_overwrite_replaces(tmp_path):
    """Guards against silently mixing a new output with an old one, against --overwrite losing files
    latentkv did not write, and against --overwrite not replacing latentkv's own output."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(LatentKVError, match="Output folder .*out is not empty; it was not written by latentkv"):
        OutputFolder(target)
    with pytest.raises(LatentKVError, match="not written by latentkv .*would lose old.txt"):
        OutputFolder(target, overwrite=True)
    (target / "old.txt").unlink()
    with OutputFolder(target) as out:  # an empty folder is fine without --overwrite
        (out.tmp / "old.txt").write_text("old")
    with pytest.raises(LatentKVError, match="Output folder .*out is not empty; pass --overwrite"):
        OutputFolder(target)
    with OutputFolder(target, overwrite=True) as out:
        assert out.tmp.parent == tmp_path and out.tmp.name.startswith(".out.partial-")
        (out.tmp / "new.txt").write_text("new")
        assert (target / "old.txt").is_file(), "the old output must survive until the new one is complete"
    assert sorted(p.name for p in target.iterdir()) == [MARKER_FILE, "new.txt"]
    assert _hidden_leftovers(tmp_path) == []


def test_output_folder_exception_leaves_nothing(tmp_path):
    """Guards against a crash mid-write leaving a half-written output or temp folder."""
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with OutputFolder(target) as out:
            writer = ShardedWriter(out.tmp, max_shard_size="1KB")
            for i in range(5):
                writer.add(f"t{i}", torch.randn(64))
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("step", ["add", "write"])  # spilling a tensor, laying out the shard
def test_disk_full_is_mapped(tmp_path, monkeypatch, step):
    """Guards against ENOSPC surfacing as a raw traceback and leaving a partial output."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(f"latentkv.io.writer._Shard.{step}", full)
    target = tmp_path / "out"
    with pytest.raises(LatentKVError, match="disk full while writing .*out; free space or choose another --output"):
        with OutputFolder(target) as out:
            writer = ShardedWriter(out.tmp)
            writer.add("w", torch.zeros(4))
            writer.close()
    assert not target.exists() and list(tmp_path.iterdir()) == []

    # Raised directly inside the block (e.g. by save_pretrained) it is mapped too.
    with pytest.raises(LatentKVError, match="disk full"):
        with OutputFolder(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_copy_sidecars_byte_for_byte(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Guards against tokenizer / generation files being re-serialised (changed) instead of copied."""
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir("qwen2"), src)
    (src / "tokenizer.model").write_bytes(bytes(range(256)) * 3)  # binary content
    (src / "chat_template.jinja").write_bytes(b"{% for m in messages %}\r\n{{ m }}\xc3\xa9{% endfor %}")
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = copy_sidecars(src, dst)
    expected = [n for n in SIDECAR_FILES if (src / n).is_file()]
    assert copied == expected and "generation_config.json" in copied and "tokenizer.json" in copied
    for name in copied:
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert not (dst / "model.safetensors").exists()

    # A failing copy warns and the others still happen.
    real_copy = shutil.copyfile

    def flaky(a, b, *args, **kwargs):
        if Path(a).name == "tokenizer.model":
            raise PermissionError(13, "Permission denied")
        return real_copy(a, b, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", flaky)
    dst2 = tmp_path / "dst2"
    dst2.mkdir()
    with caplog.at_level(logging.WARNING):
        copied2 = copy_sidecars(src, dst2)
    assert "tokenizer.model" not in copied2 and "tokenizer.json" in copied2
    assert "tokenizer.model" in caplog.text


# ---- sources ------------------------------------------------------------------------------


def test_open_source_local_folder(tiny_model_dir):
    """Guards against a plain local HF folder not opening (config, lazy weights, tokenizer)."""
    folder = tiny_model_dir("qwen2")
    src = open_source(str(folder))
    assert src.folder == folder and src.gguf_file is None
    assert src.config.model_type == "qwen2" and src.config.num_key_value_heads == 2
    assert "model.layers.0.self_attn.k_proj.weight" in src.weights
    assert src.tokenizer()("To be")["input_ids"]


def test_open_source_missing_config(tmp_path):
    """Guards against a folder without config.json failing with a transformers traceback."""
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LatentKVError, match="no config.json"):
        open_source(str(tmp_path))


def test_open_source_no_such_path(tmp_path):
    """Guards against a mistyped path being sent to the Hub as a repo id."""
    with pytest.raises(LatentKVError, match="no such folder or file"):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(LatentKVError, match="no such folder or file"):
        open_source("./models/missing.gguf")


def test_open_source_hub_offline(tmp_path, monkeypatch):
    """Guards against an unreachable Hub giving a raw huggingface_hub traceback instead of the fix."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LatentKVError) as info:
        open_source("some-org/some-model", cache_dir=tmp_path)
    msg = str(info.value)
    assert "Hub could not be reached for 'some-org/some-model'" in msg
    assert "local folder" in msg and ".gguf" in msg


# ---- GGUF ---------------------------------------------------------------------------------


def _write_tiny_gguf(folder: Path, path: Path) -> None:
    """Write the tiny llama in `folder` as an F32 GGUF the way llama.cpp's converter would."""
    import gguf
    import numpy as np
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(folder))
    sd = load_file(folder / "model.safetensors")

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:
        # llama.cpp reorders q/k rows from HF's half-split RoPE layout to interleaved pairs.
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {t["content"] for t in tok["added_tokens"]}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    top = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in sd.items():
        arr = t.numpy()
        if name in top:
            gname = top[name]
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{per_layer[rest.removesuffix('.weight')]}"
        if "q_proj" in name:
            arr = permute(arr, cfg.num_attention_heads)
        elif "k_proj" in name:
            arr = permute(arr, cfg.num_key_value_heads)
        w.add_tensor(f"{gname}.weight", np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_round_trip(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Guards against GGUF sources dequantizing to wrong weights (q/k permutation, names), a config
    still claiming to be quantized, a missing tokenizer, or the cache not being reused."""
    folder = tiny_model_dir("llama")
    gguf_path = tmp_path / "tiny-llama.F32.gguf"
    _write_tiny_gguf(folder, gguf_path)
    monkeypatch.setenv("LATENTKV_CACHE", str(tmp_path / "cache"))

    src = open_source(str(gguf_path))
    assert src.gguf_file == gguf_path.name
    assert src.folder.parent == tmp_path / "cache" / "gguf" and len(src.folder.name) == 16
    reference = load_file(folder / "model.safetensors")
    _assert_same(src.weights, reference)
    cfg = src.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "llama", 2, 4, 2,
    )
    assert getattr(cfg, "quantization_config", None) is None
    assert "quantization_config" not in json.loads((src.folder / "config.json").read_text())
    assert (src.folder / "generation_config.json").is_file()
    from transformers import AutoTokenizer

    text = "To be, or not to be: that is the question."
    assert src.tokenizer()(text)["input_ids"] == AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"]
    assert _hidden_leftovers(src.folder.parent) == []

    # Second open: reused, not rebuilt; also reachable as folder + gguf_file.
    with caplog.at_level(logging.INFO, logger="latentkv"):
        again = open_source(str(tmp_path), gguf_file=gguf_path.name)
    assert again.folder == src.folder and "Reusing" in caplog.text


@pytest.mark.real
def test_smollm2_folder_real(smollm2_dir):
    """Guards against the real SmolLM2 asset being built with the wrong shape or loading eagerly."""
    src = open_source(str(smollm2_dir))
    cfg = src.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.head_dim, cfg.vocab_size) == (576, 64, 49152)
    assert (smollm2_dir / "generation_config.json").is_file()
    assert (smollm2_dir / "tokenizer.json").is_file()
    assert src.weights.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)
    k = src.weights.get("model.layers.29.self_attn.k_proj.weight")
    assert k.dtype == torch.float32 and torch.isfinite(k).all()


# ---- card ---------------------------------------------------------------------------------


def test_model_card_and_recipe(tmp_path):
    """Guards against a card the Hub cannot parse, a missing command / recipe / table, or a leaked token."""
    recipe = {"method": "mla", "rank": 256, "source": Path("/models/x"), "dtype": torch.bfloat16, "layers": (0, 1)}
    results = [
        {"model": "source", "ppl": 29.53, "kv_bytes_per_token": 23040},
        {"model": "converted", "ppl": 30.1234567, "kv_bytes_per_token": 9216},
    ]
    token = "hf_abcdefghijklmnopqrstuvwxyz123456"
    card = write_model_card(
        tmp_path,
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        base_model_relation="finetune",
        tags=["mla", "kv-cache"],
        command=["latentkv", "convert", "x", "--method", "mla", "--token", token],
        recipe=recipe,
        results=results,
        papers=["2502.07864", "Zadouri et al. 2025"],
        title="SmolLM2 MLA",
        description="Converted.",
    )
    text = card.read_text()
    assert token not in text
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["base_model_relation"] == "finetune" and front["library_name"] == "transformers"
    assert front["tags"][0] == "latentkv" and "mla" in front["tags"]
    assert "```bash\nlatentkv convert x --method mla --token ***\n```" in text
    assert "| model | ppl | kv_bytes_per_token |" in text and "| converted | 30.12 | 9216 |" in text
    assert "https://arxiv.org/abs/2502.07864" in text and "torch " in text and "transformers " in text
    assert "rank: 256" in text

    path = write_recipe(tmp_path, recipe)
    assert path.name == "latentkv_recipe.yaml"
    assert yaml.safe_load(path.read_text()) == {
        "method": "mla", "rank": 256, "source": "/models/x", "dtype": "torch.bfloat16", "layers": [0, 1],
    }
    with pytest.raises(LatentKVError, match="finetune"):
        write_model_card(
            tmp_path, base_model="a/b", base_model_relation="converted", tags=[], command="x", recipe={},
            results=None, papers=[], title="t", description="d",
        )
