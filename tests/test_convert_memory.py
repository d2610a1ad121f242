"""A conversion holds one decoder layer's weights at a time, not the model: checkpoint reads map
nothing, the writer and the layers built during a pass wait on disk, and the outputs are the same
bytes as when everything was held in memory."""

from __future__ import annotations

import gc
import math
import re
import warnings
from pathlib import Path

import pytest
import torch

from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert
from latentkv.io.lazy import LazyCheckpoint
from tiny_models import TINY_TEXT, build_tiny_model

LAYERS = 12
# Wide for its size: a layer (4 MB) is large next to the embeddings, the calibration windows and
# each layer's statistics, so holding a few layers more than one shows at once.
WIDE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64)
SAMPLES, SEQ_LEN = 4, 32


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage Python holds now, each storage counted once."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() wakes deprecated module attributes that warn
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wide") / "src"
    build_tiny_model("llama", folder, **WIDE)
    return folder


def _convert(src: Path, out: Path, cache: Path, **options):
    return convert(ConvertOptions(source=str(src), output=str(out), method="mla", method_options=options,
                                  calib=CalibOptions(data=str(TINY_TEXT), samples=SAMPLES, seq_len=SEQ_LEN,
                                                     cache=str(cache))))


def _layer_of(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("options", [dict(kv_budget=0.5), dict(kv_budget=0.5, refit_output=True)],
                         ids=["one-pass", "refit-pass"])
def test_conversion_holds_one_layer_of_weights_at_a_time(wide_model, tmp_path, monkeypatch, options):
    """Each time the conversion moves on to another layer's weights (calibration, planning, the refit
    pass, writing), the tensors Python holds are at most: two layers' weights (the one just read and
    the float64 copies or the new attention of the one before, which never exceed one layer), the
    embeddings and head, the calibration activations and every layer's statistics. The checkpoint
    is several times that: holding the layers (or the written tensors) until the end fails here."""
    weights = LazyCheckpoint(wide_model)
    size = {n: math.prod(weights.shape(n)) * weights.dtype(n).itemsize for n in weights.keys()}
    layer_bytes = max(sum(b for n, b in size.items() if _layer_of(n) == i) for i in range(LAYERS))
    global_bytes = sum(b for n, b in size.items() if _layer_of(n) is None)
    activations = SAMPLES * SEQ_LEN * WIDE["hidden_size"] * 4

    peak, last = 0, object()
    real_get = LazyCheckpoint.get

    def get(self, name, *args, **kwargs):
        nonlocal peak, last
        if _layer_of(name) != last:  # moving on: what is still held from before shows now
            peak, last = max(peak, live_tensor_bytes()), _layer_of(name)
        return real_get(self, name, *args, **kwargs)

    cache = tmp_path / "cache"
    before = live_tensor_bytes()
    monkeypatch.setattr(LazyCheckpoint, "get", get)
    _convert(wide_model, tmp_path / "out", cache, **options)
    stats_bytes = sum(p.stat().st_size for p in cache.rglob("layer_*.pt"))
    allowed = 2 * layer_bytes + global_bytes + activations + stats_bytes
    assert weights.total_bytes > allowed + 3 * layer_bytes, "the model must be several times the allowance"
    assert peak - before <= allowed, (f"held {(peak - before) / 1e6:.1f} MB of tensors; one layer is "
                                      f"{layer_bytes / 1e6:.1f} MB, the allowance {allowed / 1e6:.1f} MB")


def test_spilled_layers_give_the_same_output_bytes(wide_model, tmp_path, monkeypatch):
    """The layers a refit pass builds, kept on disk until writing, give the bytes they gave when
    held in memory; and the temporary folder is gone afterwards."""
    class HeldLayers(dict):  # the built layers in memory, as before they were spilled
        def __init__(self, beside):
            super().__init__()

        def close(self):
            self.clear()

    spilled = tmp_path / "spilled"
    _convert(wide_model, spilled, tmp_path / "cache-a", kv_budget=0.5, refit_output=True)
    monkeypatch.setattr("latentkv.io.writer.SpilledLayers", HeldLayers)
    held = tmp_path / "held"
    _convert(wide_model, held, tmp_path / "cache-b", kv_budget=0.5, refit_output=True)
    for name in ("model.safetensors", "config.json", "latentkv_layers.json"):
        assert (spilled / name).read_bytes() == (held / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name], "the spill folder was left behind"


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_checkpoint_reads_leave_no_mapping(tiny_model_dir, tmp_path):
    """Reading every tensor leaves no memory map of the shard: mapped pages would stay resident,
    and a pass over all layers would end up holding the whole checkpoint."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny_model_dir("llama"), folder)
    ck = LazyCheckpoint(folder)
    got = {name: ck.get(name) for name in ck.keys()}
    assert got and all(t.is_contiguous() for t in got.values())
    assert str((folder / "model.safetensors").resolve()) not in Path("/proc/self/maps").read_text()


def test_peak_memory_note_names_its_stage(tiny_model_dir, tmp_path, caplog, monkeypatch):
    """The conversion's note gives its peak resident memory and the stage it was reached in; with
    logging on, every stage's end (each layer of each pass) logs the memory then."""
    import logging

    from latentkv.calibration.runner import MemoryTrace, peak_memory_bytes

    if peak_memory_bytes() is None:
        pytest.skip("this OS reports no peak memory")
    with caplog.at_level(logging.INFO, logger="latentkv"):
        r = _convert(tiny_model_dir("llama"), tmp_path / "out", tmp_path / "cache", kv_budget=0.5)
    notes = [n for n in r.notes if n.startswith("peak memory")]
    assert len(notes) == 1 and re.fullmatch(r"peak memory \d+ MB for a checkpoint of [\d.]+ MB \(reached .+\)", notes[0])
    logged = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("memory after")]
    for stage in ("opening the source", "tokenizing the calibration text", "calibrating, layer 0", "planning the widths",
                  "writing, layer 0", "writing the embeddings, head and config"):
        assert any(m.startswith(f"memory after {stage}:") for m in logged), stage
    reached = re.search(r"\(reached (.+)\)", notes[0]).group(1)  # pytest may have peaked before it began
    assert reached == "before the first stage" or any(reached == f"while {m[len('memory after '):].split(':')[0]}"
                                                      for m in logged), reached

    readings = iter([100, 100, 250, 250, 250])  # the peak so far, as the OS would report it at each read
    monkeypatch.setattr("latentkv.calibration.runner.peak_memory_bytes", lambda: next(readings))
    trace = MemoryTrace()
    for stage in ("quiet", "growing", "after"):
        trace.mark(stage)
    assert (trace.peak, trace.peak_stage) == (250, "growing")  # a peak that rose within a stage is put down to it
