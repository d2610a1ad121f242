"""The calibration fast paths compute what the plain paths compute.

Statistics are taken inside the layer's own forward pass (a hook on its input norm), the last layer
is never run forward, and text is tokenized in batches: none of this may change a token id, nor a
statistic beyond float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import ARCH_CASES
from tiny_models import TINY_TEXT

from latentkv.calibration.data import TextSource, token_windows, tokenize_stream
from latentkv.calibration.runner import LayerStream
from latentkv.calibration.stats import StatsCache
from latentkv.convert import pipeline
from latentkv.convert.pipeline import CalibOptions, collect_stats
from latentkv.io.source import open_source


def _piece_by_piece(tokenizer, texts: list[str]) -> torch.Tensor:
    """The plain definition: each document in 2000-line pieces, one tokenizer call each, then EOS."""
    ids: list[int] = []
    for text in texts:
        lines = text.splitlines(keepends=True)
        for start in range(0, len(lines), 2000):
            ids.extend(tokenizer("".join(lines[start : start + 2000]), add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def test_batched_tokenization_gives_the_same_ids(tiny_model_dir):
    """Guards the batched tokenizer calls: ids, EOS after every document (empty ones too) and the
    max_tokens cut must equal tokenizing each piece on its own, whatever the batch size."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    text = TINY_TEXT.read_text()
    texts = [text[:300_000], "", "one line\n", "\n\n\n", text[300_000:420_000]]  # the first spans several pieces
    expected = _piece_by_piece(tokenizer, texts)
    for batch_chars in (1, 50_000, 1_000_000):
        assert torch.equal(tokenize_stream(tokenizer, texts, batch_chars=batch_chars), expected)
        for max_tokens in (7, 60_000, expected.numel() + 5):
            got = tokenize_stream(tokenizer, texts, max_tokens=max_tokens, batch_chars=batch_chars)
            assert torch.equal(got, expected[:max_tokens])


def _worst(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.double() - b.double()).abs()
    at = tuple(int(i) for i in torch.unravel_index(d.argmax(), d.shape))
    cos = torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0)
    return f"max abs {d.max():.3g}, max rel {d.max() / b.abs().max():.3g}, cosine {cos:.9f}, worst at {at}"


@pytest.mark.parametrize("arch", ARCH_CASES)
def test_statistics_equal_for_every_batch_size_and_path(tiny_model_dir, tmp_path, monkeypatch, arch):
    """Guards the one-pass statistics: the hook on the input norm must see exactly the attention
    input of a full-model forward; batches that do not divide the windows, the separate pass of
    sequential calibration and the last layer (never run forward) must give the same moments,
    distance profiles and samples, the samples being every stride-th token of the whole set."""
    monkeypatch.setattr(pipeline, "SAMPLE_TOKENS", 50)  # 192 tokens -> stride 3, across batch edges
    folder = tiny_model_dir(arch)
    source = open_source(str(folder))
    windows = token_windows(source.tokenizer(), TextSource(str(TINY_TEXT)), 6, 32, 0)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states
        inputs = [layer.input_layernorm(hidden[i]) for i, layer in enumerate(model.model.layers)]
    calib = CalibOptions(profile_samples=3)

    def run(name: str, batch_size: int, on_layer=None):
        stream = LayerStream(source.config, source.weights, batch_size=batch_size)
        forwards = []
        plain_run = stream.run
        monkeypatch.setattr(stream, "run", lambda *a, **k: forwards.append(1) or plain_run(*a, **k))
        stats = collect_stats(stream, windows, StatsCache(tmp_path / name, {"k": 1}), calib, on_layer=on_layer)
        assert len(forwards) == stream.num_layers - 1  # nothing reads the last layer's output
        return stats

    reference = run("whole", 6)
    odd, sequential = run("odd", 4), run("seq", 4, on_layer=lambda *args: None)
    for name, stats in (("whole", reference), ("odd", odd), ("sequential", sequential)):
        for i, (st, ref) in enumerate(zip(stats, reference)):
            x = inputs[i].reshape(-1, inputs[i].shape[-1])
            assert st.tokens == ref.tokens == len(x)
            picked = x[::3][:50]
            checks = ((st.samples, picked, 1e-6), (st.moment, ref.moment, 1e-7), (st.distance, ref.distance, 1e-7))
            for got, want, atol in checks:
                assert torch.allclose(got, want, rtol=1e-5, atol=atol), f"{name} layer {i}: {_worst(got, want)}"


def test_streamed_text_gives_the_windows_of_the_whole_text(tiny_model_dir):
    """Guards the streaming reader: on the shipped calibration books (read a line at a time, up to
    the token limit) the windows are exactly those of the plain definition over each whole book."""
    from latentkv.calibration.data import MIN_CHARS_READ, sample_windows
    from latentkv.data import CALIBRATION_TEXT, read_text

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    books = sorted(CALIBRATION_TEXT.glob("*.txt.gz"))
    texts = [read_text(b, errors="replace") for b in books]
    assert sum(map(len, texts)) < MIN_CHARS_READ, "the shipped text no longer fits the read limit whole"
    whole = _piece_by_piece(tokenizer, texts)
    streamed = token_windows(tokenizer, TextSource("latentkv:gutenberg"), 128, 512, 0)  # the default windows
    assert torch.equal(streamed, sample_windows(whole, 128, 512, 0))


def test_reading_stops_at_the_token_limit_and_cuts_long_lines(tiny_model_dir, tmp_path, monkeypatch):
    """Guards bounded memory: a file of one 3M-character line reaches the tokenizer in pieces of at
    most PIECE_CHARS, and reading stops once the limit of tokens is reached (the rest is never read)."""
    from latentkv.calibration import data

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    line = TINY_TEXT.read_text().replace("\n", " ")
    (tmp_path / "one-line.txt").write_text((line * 3)[:3_000_000])
    monkeypatch.setattr(data, "PIECE_CHARS", 100_000)
    seen = []

    def counted(source):
        for piece, end in data.read_pieces(source):
            seen.append(len(piece))
            yield piece, end

    tokens = data.tokenize_pieces(tokenizer, counted(TextSource(str(tmp_path / "one-line.txt"))),
                                  enough=(5_000, 150_000), batch_chars=100_000)
    assert max(seen) <= 100_000 and sum(seen) <= 300_000, "read past the limit"
    # where reading stops does not depend on the batch size
    assert torch.equal(tokens, data.tokenize_pieces(tokenizer, data.read_pieces(TextSource(str(tmp_path / "one-line.txt"))),
                                                    enough=(5_000, 150_000), batch_chars=1))
