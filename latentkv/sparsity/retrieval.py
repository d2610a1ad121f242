"""Passkey retrieval under sparse decode: does a policy still find one sentence in a long text?

A needle ("The pass key is 68231. Remember it. 68231 is the pass key.") is inserted at a relative
depth of a long book excerpt, after a short instruction and before a question that ends in the
answer's prefix ("What is the pass key? The pass key is"). The text before the question is
prefilled densely (the needle is in the cache, written exactly as in dense decoding); the question
is then fed one token per decode step under the policy (``question_in_prefill=True`` prefills it
too, so the first answer token comes from the dense prefill), and the answer is decoded greedily
under the policy. Score: exact match of the first run of digits in the answer with the key.

``numbers_case`` builds the second task, for models too small to follow the pass-key instruction at
long contexts: a run of random numbers in the haystack, and at the end the run's first number again;
the key is the number that followed it (measured with SmolLM2-135M-Instruct: docs/sparse-decode.md).

    case = needle_case(tokenizer, haystack_ids, context_tokens=4096, depth=0.5, key="68231")
    result = retrieve(model, tokenizer, case, SparseConfig("quest", budget=0.125))
    result["match"]   # True / False
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from latentkv.errors import LatentKVError
from latentkv.sparsity.policies import SparseConfig

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
CHAT_QUESTION = "\n\nWhat is the pass key?"
CHAT_ANSWER = "The pass key is"
NUMBERS = " The numbers are {numbers}. "
NUMBERS_QUESTION = "\n\nThe numbers are {first}"
TASKS = ("passkey", "numbers")


@dataclass(frozen=True)
class NeedleCase:
    """One retrieval prompt: ``ids`` = instruction + haystack with the needle + question; the needle
    starts at token ``needle_at`` and the question at ``question_at``; ``depth`` is the fraction of
    the haystack tokens before the needle."""

    ids: list[int]
    key: str
    depth: float
    needle_at: int
    question_at: int


def make_key(seed: int, digits: int = 5) -> str:
    """A random key of ``digits`` digits (no leading zero), the same for the same seed."""
    rng = random.Random(seed)
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_frame(tokenizer) -> tuple[str, str]:
    """(head, tail): the text a chat model's template puts before and after one user message, the
    tail ending in the assistant's turn (``add_generation_prompt``)."""
    mark = "\x00MESSAGE\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=True)
    if text.count(mark) != 1:
        raise LatentKVError("the tokenizer's chat template does not render the user message once; retrieve without chat.")
    head, tail = text.split(mark)
    return head, tail


def needle_case(tokenizer, haystack: list[int], *, context_tokens: int, depth: float, key: str,
                chat: bool = False) -> NeedleCase:
    """The prompt of ``context_tokens`` tokens: the instruction, the first tokens of ``haystack``
    (token ids) with the needle inserted after ``round(depth * fill)`` of them, then the question.
    ``chat``: instruction, haystack and "What is the pass key?" form one user message of the
    tokenizer's chat template, and the assistant's turn begins with "The pass key is" (the question
    part, from ``question_at``, is then the question, the end of the user turn and that prefix)."""
    if not key.isdigit():
        raise LatentKVError(f"the pass key must be digits; got {key!r}.")
    if chat:
        head, tail = chat_frame(tokenizer)
        intro, question = _encode(tokenizer, head + INTRO), _encode(tokenizer, CHAT_QUESTION + tail + CHAT_ANSWER)
    else:
        intro, question = _encode(tokenizer, INTRO), _encode(tokenizer, QUESTION)
    return _place(haystack, intro, _encode(tokenizer, NEEDLE.format(key=key)), question,
                  context_tokens=context_tokens, depth=depth, key=key)


def numbers_case(tokenizer, haystack: list[int], *, context_tokens: int, depth: float, seed: int,
                 count: int = 4, digits: int = 5) -> NeedleCase:
    """A recall prompt that needs no instruction following: ``count`` random numbers ("The numbers
    are 84712 93018 27465 10293.") inserted at ``depth`` of the haystack, and at the end "The numbers
    are 84712": the key is the second number, which only attention back to the needle can give (an
    induction copy, which small models do at long contexts where they fail the pass-key instruction)."""
    if count < 2:
        raise LatentKVError(f"a numbers needle needs at least 2 numbers; got {count}.")
    nums = [make_key(seed * 100 + i, digits) for i in range(count)]
    needle = _encode(tokenizer, NUMBERS.format(numbers=" ".join(nums)))
    question = _encode(tokenizer, NUMBERS_QUESTION.format(first=nums[0]))
    return _place(haystack, [], needle, question, context_tokens=context_tokens, depth=depth, key=nums[1])


def _place(haystack: list[int], intro: list[int], needle: list[int], question: list[int], *, context_tokens: int,
           depth: float, key: str) -> NeedleCase:
    """intro + haystack with the needle after ``round(depth * fill)`` of its tokens + question, in
    ``context_tokens`` tokens."""
    if not 0.0 <= depth <= 1.0:
        raise LatentKVError(f"needle depth must be in [0, 1]; got {depth}.")
    fill = context_tokens - len(intro) - len(needle) - len(question)
    if fill < 16:
        raise LatentKVError(f"a context of {context_tokens} tokens leaves no room for the haystack around the "
                            f"{len(intro) + len(needle) + len(question)} tokens of instruction, needle and question.")
    if len(haystack) < fill:
        raise LatentKVError(f"the haystack has {len(haystack)} tokens; a context of {context_tokens} needs {fill}.")
    cut = round(depth * fill)
    ids = list(intro) + list(haystack[:cut]) + list(needle) + list(haystack[cut:fill]) + list(question)
    return NeedleCase(ids=ids, key=key, depth=depth, needle_at=len(intro) + cut,
                      question_at=len(ids) - len(question))


def answer_number(text: str) -> str | None:
    """The first run of digits in ``text`` (None without one)."""
    m = re.search(r"\d+", text)
    return m.group() if m else None


def exact_match(text: str, key: str) -> bool:
    """Whether the first number in the answer is exactly the key (no extra or missing digits)."""
    return answer_number(text) == key


def retrieve(model, tokenizer, case: NeedleCase, config: SparseConfig, *, start=None, predictor=None,
             page_size: int = 16, new_tokens: int = 10, question_in_prefill: bool = False,
             offload: bool = False, backend: str = "reference", prefill_chunk: int = 128) -> dict:
    """Greedy answer to ``case`` under ``config``: {"answer", "match", "depth", "key", stats...}.
    ``start``: a ``retrieval_start`` of this case to share its prefill between policies."""
    from latentkv.sparsity.evaluate import greedy_after
    from latentkv.sparsity.evaluate import for_config

    if start is None:
        start = retrieval_start(model, case, page_size=page_size, predictor=predictor, new_tokens=new_tokens,
                                question_in_prefill=question_in_prefill, offload=offload, backend=backend,
                                prefill_chunk=prefill_chunk)
    prompt_len = len(case.ids) if question_in_prefill else case.question_at

    def stop(tokens: list[int]) -> bool:  # a number followed by something else, or an end token
        eos = getattr(tokenizer, "eos_token_id", None)
        return (eos is not None and tokens[-1] == eos) or bool(re.search(r"\d\D", tokenizer.decode(tokens)))

    out, stats = greedy_after(model, for_config(start, config, len(case.ids) + new_tokens), case.ids, prompt_len,
                              config, new_tokens=new_tokens, predictor=predictor, stop=stop)
    answer = tokenizer.decode(out, skip_special_tokens=True)
    return {"policy": config.policy, "budget": 1.0 if config.policy == "dense" else config.budget,
            "per_latent_head": config.per_latent_head, "depth": case.depth, "key": case.key,
            "context_tokens": len(case.ids), "answer": answer, "match": exact_match(answer, case.key),
            "question_in_prefill": question_in_prefill, **stats}


def retrieval_start(model, case: NeedleCase, *, page_size: int = 16, predictor=None, new_tokens: int = 10,
                    question_in_prefill: bool = False, offload: bool = False, backend: str = "reference",
                    prefill_chunk: int = 128):
    """The dense prefill of ``case`` (up to the question, or all of it), to share between policies."""
    from latentkv.sparsity.evaluate import long_prefill

    prompt_len = len(case.ids) if question_in_prefill else case.question_at
    return long_prefill(model, case.ids, prompt_len, page_size=page_size, predictor=predictor, offload=offload,
                        extra=new_tokens, backend=backend, prefill_chunk=prefill_chunk)
