"""Long-context evaluation of sparse decode (latentkv.sparsity.retrieval, latentkv.sparsity.long_context):
the needle builder, exact-match scoring, the teacher-forced and retrieval plumbing on a tiny converted
model (paged and offloaded caches) and the CLI's refusals."""

from __future__ import annotations

import pytest
import tiny_models

from latentkv.errors import LatentKVError
from latentkv.sparsity import SparseConfig
from latentkv.sparsity.retrieval import (INTRO, NEEDLE, answer_number, exact_match, make_key, needle_case,
                                         numbers_case)


class CharTokenizer:
    """One token per character (ids = code points): token counts are exact and easy to check."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_depth_and_length(depth):
    """Guards the placement: the prompt has exactly the asked length, the needle sits after
    round(depth * fill) haystack tokens and the haystack around it is the original in order."""
    tok = CharTokenizer()
    hay = [ord("a") + i % 26 for i in range(3000)]
    case = needle_case(tok, hay, context_tokens=1000, depth=depth, key="68231")
    needle = [ord(c) for c in NEEDLE.format(key="68231")]
    assert len(case.ids) == 1000
    assert case.ids[case.needle_at : case.needle_at + len(needle)] == needle
    text = tok.decode(case.ids)
    assert text.endswith("The pass key is") and text.count("68231") == 2
    intro_len = len(tok(INTRO)["input_ids"])
    hay_len = case.question_at - intro_len - len(needle)
    assert case.needle_at - intro_len == round(depth * hay_len)
    assert case.ids[intro_len : case.needle_at] + case.ids[case.needle_at + len(needle) : case.question_at] == hay[:hay_len]
    assert case.depth == depth and case.key == "68231"


class ChatTokenizer(CharTokenizer):
    """CharTokenizer with a chat template of the SmolLM2 kind (a system turn, then the user's)."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "<s>system\nYou help.</s>\n" + "".join(f"<s>{m['role']}\n{m['content']}</s>\n" for m in messages)
        return text + ("<s>assistant\n" if add_generation_prompt else "")


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_chat_needle_case(depth):
    """Guards the chat form of the retrieval prompt: one user turn of the template holds the
    instruction, the haystack with the needle and the question; the assistant's turn starts with the
    answer's prefix; the length and the needle's place are exact, and the question part (fed under the
    policy) is the question, the end of the user turn and that prefix."""
    from latentkv.sparsity.retrieval import CHAT_ANSWER, CHAT_QUESTION, chat_frame

    tok = ChatTokenizer()
    hay = [ord("a") + i % 26 for i in range(3000)]
    case = needle_case(tok, hay, context_tokens=900, depth=depth, key="48213", chat=True)
    text = tok.decode(case.ids)
    head, tail = chat_frame(tok)
    assert len(case.ids) == 900 and text.startswith(head + INTRO) and text.count("48213") == 2
    assert tok.decode(case.ids[case.question_at :]) == CHAT_QUESTION + tail + CHAT_ANSWER
    assert text.endswith("<s>assistant\nThe pass key is")
    needle = [ord(c) for c in NEEDLE.format(key="48213")]
    assert case.ids[case.needle_at : case.needle_at + len(needle)] == needle
    fill = case.question_at - len(head + INTRO) - len(needle)
    assert case.needle_at - len(head + INTRO) == round(depth * fill)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_numbers_case(depth):
    """The numbers task: no instruction, the run of numbers at its depth, the prompt ending in the run's
    first number; the key is the second number, found in the prompt only inside the needle."""
    tok = CharTokenizer()
    hay = [ord("a") + i % 26 for i in range(3000)]
    case = numbers_case(tok, hay, context_tokens=800, depth=depth, seed=7)
    again = numbers_case(tok, hay, context_tokens=800, depth=depth, seed=7)
    other = numbers_case(tok, hay, context_tokens=800, depth=depth, seed=8)
    assert case.ids == again.ids and case.key != other.key  # the seed decides the numbers
    text = tok.decode(case.ids)
    needle = text[case.needle_at : text.index(". ", case.needle_at) + 2]
    nums = needle.split("are ")[1].rstrip(". ").split()
    assert len(case.ids) == 800 and len(nums) == 4 and all(len(n) == 5 for n in nums)
    assert case.key == nums[1] and text.endswith(f"The numbers are {nums[0]}")
    assert text.count(case.key) == 1 and case.needle_at == round(depth * (case.question_at - len(needle)))
    with pytest.raises(LatentKVError, match="at least 2"):
        numbers_case(tok, hay, context_tokens=800, depth=0.5, seed=1, count=1)


def test_needle_refuses_bad_input():
    tok = CharTokenizer()
    hay = list(range(97, 123)) * 100
    with pytest.raises(LatentKVError, match="depth"):
        needle_case(tok, hay, context_tokens=1000, depth=1.5, key="1")
    with pytest.raises(LatentKVError, match="digits"):
        needle_case(tok, hay, context_tokens=1000, depth=0.5, key="12a")
    with pytest.raises(LatentKVError, match="no room"):
        needle_case(tok, hay, context_tokens=100, depth=0.5, key="123")
    with pytest.raises(LatentKVError, match="haystack has"):
        needle_case(tok, hay[:200], context_tokens=1000, depth=0.5, key="123")


def test_exact_match_scoring():
    """Guards the score: the first number of the answer must equal the key, no digit more or less."""
    assert exact_match(" 68231. Remember", "68231")
    assert exact_match("68231", "68231")
    assert not exact_match(" 682311", "68231")
    assert not exact_match(" 6823.", "68231")
    assert not exact_match(" 12 68231", "68231")  # the first number counts
    assert not exact_match(" unknown", "68231")
    assert exact_match(" 48213.", "48213") and exact_match(" 48213<|im_end|>", "48213")  # a greedy answer's tail
    assert not exact_match(" 4821", "48213") and not exact_match("48213"[::-1], "48213")
    assert answer_number("key is 42, no 7") == "42" and answer_number("none") is None
    keys = {make_key(i) for i in range(20)}
    assert all(len(k) == 5 and k[0] != "0" for k in keys) and len(keys) > 15 and make_key(3) == make_key(3)


# ---------------------------------------------------------------------------------------------
# end to end on a tiny converted model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_mla_dir(tiny_model_dir, tmp_path_factory):
    from latentkv.convert.pipeline import CalibOptions, ConvertOptions, convert

    root = tmp_path_factory.mktemp("long_mla")
    convert(ConvertOptions(source=str(tiny_model_dir("llama")), output=str(root / "out"), method="mla",
                           method_options=dict(kv_budget=0.5),
                           calib=CalibOptions(data=str(tiny_models.TINY_TEXT), samples=8, seq_len=64,
                                              cache=str(root / "cache"))))
    return root / "out"


@pytest.fixture(scope="module")
def tiny_mla(tiny_mla_dir):
    from latentkv.modeling import load_model

    return load_model(tiny_mla_dir)


IDS = [(7 * i + 3) % 250 + 3 for i in range(90)]  # 74 prompt tokens + 16 decoded, pages of 8
CONFIGS = [SparseConfig("window", budget=0.25), SparseConfig("last-step", budget=0.25),
           SparseConfig("quest", budget=3), SparseConfig("oracle", budget=3)]


def test_long_text_compare_paged_and_offloaded(tiny_mla):
    """Guards the teacher-forced plumbing: the dense row agrees with itself, each policy reads the
    pages of its budget, and the offloaded run (pools sized per budget) gives the same comparison
    to the last float, with misses counted only for the policies that need the next query."""
    from latentkv.sparsity.long_context import long_text_compare

    paged = long_text_compare(tiny_mla, IDS, 74, CONFIGS, page_size=8)
    off = long_text_compare(tiny_mla, IDS, 74, CONFIGS, page_size=8, offload=True)
    assert [r["policy"] for r in paged] == ["dense", "window", "last-step", "quest", "oracle"]
    assert paged[0]["kl_to_dense"] == 0 and paged[0]["top1_agreement"] == 1
    assert paged[0]["blocks_attended_fraction"] == 1 and "offload" not in paged[0]
    for p, o in zip(paged, off):
        for key in ("top1_agreement", "kl_to_dense", "perplexity", "blocks_per_decision"):
            assert p[key] == o[key], (p["policy"], key)
    for r in paged[1:]:
        assert r["tokens"] == 16 and r["kl_to_dense"] >= 0 and r["blocks_attended_fraction"] < 1
        assert 2 <= r["blocks_per_decision"] <= 3.0 + 1e-9
    misses = {r["policy"]: r["offload"]["pages_missed"] for r in off[1:]}
    assert misses["window"] == 0 and misses["last-step"] == 0
    assert off[0]["offload"]["pages_missed"] == 0


def test_retrieve_on_tiny_model(tiny_mla):
    """Guards the retrieval plumbing: one prefill shared by the policies, a greedy answer that
    stops after a number, the same answer paged or offloaded, and the dense policy's answer equals
    greedy decoding of the whole prompt through the paged cache."""
    from latentkv.runtime.decode import generate_ids
    from latentkv.sparsity.retrieval import retrieval_start, retrieve

    tok = CharTokenizer()
    hay = [ord("a") + (5 * i) % 26 for i in range(2000)]
    tok_ids = lambda ids: [i % 250 + 3 for i in ids]  # noqa: E731 -- the tiny vocabulary

    class Tok(CharTokenizer):
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": tok_ids(super().__call__(text)["input_ids"])}

    tok = Tok()
    case = needle_case(tok, tok_ids(hay), context_tokens=300, depth=0.5, key="4242")
    start = retrieval_start(tiny_mla, case, page_size=8, new_tokens=6)
    rows = [retrieve(tiny_mla, tok, case, cfg, start=start, page_size=8, new_tokens=6)
            for cfg in [SparseConfig("dense"), *CONFIGS]]
    for r in rows:
        assert isinstance(r["match"], bool) and r["context_tokens"] == 300 and r["depth"] == 0.5
        assert r["decisions"] > 0
    assert rows[0]["budget"] == 1.0 and rows[1]["budget"] == 0.25
    dense_ids = generate_ids(tiny_mla, [case.ids], 6, backend="reference", page_size=8, cuda_graph=False)[0]
    assert rows[0]["answer"] == tok.decode(dense_ids)[: len(rows[0]["answer"])]
    off = retrieve(tiny_mla, tok, case, CONFIGS[2], page_size=8, new_tokens=6, offload=True)
    assert off["answer"] == rows[3]["answer"] and "offload" in off
    pre = retrieve(tiny_mla, tok, case, CONFIGS[0], page_size=8, new_tokens=6, question_in_prefill=True)
    assert pre["question_in_prefill"] and pre["answer"][:1] == rows[0]["answer"][:1]  # first token from the dense prefill


def test_cli_long_text(tiny_mla_dir, tmp_path):
    """Guards the CLI: `eval --sparse --long-text --retrieval --offload` runs end to end and bad
    options fail before any work with one line naming the option."""
    import json

    from typer.testing import CliRunner

    from latentkv.cli import app

    runner = CliRunner()
    base = ["eval", str(tiny_mla_dir), "--page-size", "8"]
    text = str(tiny_models.TINY_TEXT)
    res = runner.invoke(app, [*base, "--sparse", "quest", "--sparse-budget", "3", "--long-text", text,
                              "--context-tokens", "400", "--long-span", "8", "--retrieval", "--needle-depths", "0.5",
                              "--offload", "--json"])
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]
    report = json.loads(last[last.index("{") :])
    assert [r["policy"] for r in report["teacher_forced"]] == ["dense", "quest"]
    assert report["teacher_forced"][1]["tokens"] == 8 and "offload" in report["teacher_forced"][1]
    assert [(r["policy"], r["depth"]) for r in report["retrieval"]] == [("dense", 0.5), ("quest", 0.5)]
    bad = {
        "--long-text": [*base, "--long-text", text],  # no --sparse
        "--needle-depths": [*base, "--sparse", "window", "--long-text", text, "--retrieval", "--needle-depths", "0.5,2"],
        "not found": [*base, "--sparse", "window", "--long-text", str(tmp_path / "missing.txt")],
        "--long-span": [*base, "--sparse", "window", "--long-text", text, "--context-tokens", "128", "--long-span", "64"],
        "--context-tokens": [*base, "--sparse", "window", "--long-text", text, "--context-tokens", "10"],
        "pass --long-text": [*base, "--sparse", "window", "--retrieval"],
    }
    for needle, args in bad.items():
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and needle in res.output, (needle, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output


def test_bench_markdown(tmp_path):
    """Guards the benchmark's table writer on rows of the shape the runs produce (no model)."""
    bench = tiny_models.load_script("bench_long_context")
    tf = lambda p, b, kl, off: {"context": 0, "policy": p, "budget": b, "kl_to_dense": kl, "top1_agreement": 0.5,  # noqa: E731
                                "nll": 1.0, "blocks_per_decision": 4.0, "offload": off}
    off = {"misses_per_step": 0.5, "miss_fraction": 0.1}
    result = {"command": "cmd", "seconds": {"retrieval": 1, "teacher_forced": 2}, "text": "book", "text_tokens": 9000,
              "skip": 10, "context_tokens": 256, "span": 16, "contexts": 1, "depths": [0.1, 0.9], "page_size": 16,
              "offload": True,
              "retrieval": [{"context_tokens": 256, "depth": d, "policy": p, "budget": b, "answer": " 123.", "match": m}
                            for d in (0.1, 0.9) for p, b, m in (("dense", 1.0, True), ("window", 0.125, False))],
              "teacher_forced": [tf("dense", 1.0, 0.0, off), tf("quest", 0.125, 0.25, off), tf("window", 0.125, 0.5, off)]}
    bench.write_markdown(result, tmp_path / "t.md")
    text = (tmp_path / "t.md").read_text()
    assert "| 256 | 1 | dense | 1/1 | 1/1 | 2/2 |" in text  # matches / needles at each depth, then in all
    assert "| 256 | 0.125 | window | 0/1 | 0/1 | 0/2 |" in text
    assert text.index("| 0.125 | window |") < text.index("| 0.125 | quest |")
    assert "| 0.125 | quest | 4.0 | 0.2500 | 0.5000 | 2.718 | 0.50 | 0.100 |" in text
    per_head = {**tf("quest", 0.125, 0.125, off), "per_latent_head": True}  # a --per-head run's row, kept apart
    bench.write_markdown({**result, "teacher_forced": [*result["teacher_forced"], per_head]}, tmp_path / "h.md")
    heads = (tmp_path / "h.md").read_text()
    assert "| 0.125 | quest | 4.0 | 0.2500 |" in heads and "| 0.125 | quest (per head) | 4.0 | 0.1250 |" in heads
    assert heads.index("| 0.125 | quest |") < heads.index("| 0.125 | quest (per head) |")
    bench.write_markdown({**result, "task": "numbers"}, tmp_path / "n.md")
    numbers = (tmp_path / "n.md").read_text()
    assert "continuing a run of numbers" in numbers and "Passkey" not in numbers
    assert "| 256 | 1 | dense | 1/1 | 1/1 | 2/2 |" in numbers
