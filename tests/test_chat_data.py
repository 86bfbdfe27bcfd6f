"""Chat data: rendered with the tokenizer's chat template, loss on the assistant turns only; length-grouped batches."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from client.data import (
    IGNORE,
    DataFileError,
    Example,
    batches,
    padding_fraction,
    read_jsonl,
    tokenize,
)

# Zephyr-like: every turn ends with <eos> and a newline; the generation prompt is the assistant header.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# The same rendering, with the assistant turns marked for transformers' assistant mask.
MARKED = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course."},
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The demo's kind of tokenizer (byte-level BPE, trained here), with a chat template."""
    from transformers import PreTrainedTokenizerFast

    from client.demo_model import SPECIAL_TOKENS, train_tokenizer

    corpus = [m["content"] for m in CHAT] * 30 + ["system user assistant", "one two three four five six"] * 30
    wrapper: Any = PreTrainedTokenizerFast
    tok = wrapper(
        tokenizer_object=train_tokenizer(corpus),
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
    )
    tok.chat_template = TEMPLATE
    return tok


def _write(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _labelled_text(tokenizer: Any, example: Example) -> str:
    assert all(
        label in (token, IGNORE) for token, label in zip(example.input_ids, example.labels, strict=True)
    )
    return str(tokenizer.decode([label for label in example.labels if label != IGNORE]))


def test_only_the_assistant_turns_carry_labels_across_several_turns(tokenizer: Any, tmp_path: Path) -> None:
    records = read_jsonl(_write(tmp_path / "chat.jsonl", [{"messages": CHAT}]))
    (example,) = tokenize(records, tokenizer, 512)
    # The ids are the whole conversation rendered and tokenized once, as inference sees it.
    assert (
        list(example.input_ids)
        == tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )
    # Exactly the two answers, each with the end-of-turn marker the template closes it with; the
    # system and user turns and the <|assistant|> headers carry none.
    assert _labelled_text(tokenizer, example) == "Four.<eos>\nSix, of course.<eos>\n"
    labelled = [i for i, label in enumerate(example.labels) if label != IGNORE]
    runs = sum(1 for a, b in zip([-2, *labelled], labelled, strict=False) if b != a + 1)
    assert runs == 2  # two contiguous spans, one per assistant turn


def test_a_template_marking_generation_gives_the_same_tokens_and_labels(tokenizer: Any) -> None:
    records = [{"messages": CHAT}]
    plain = tokenize(records, tokenizer, 512)
    tokenizer.chat_template = MARKED
    try:
        marked = tokenize(records, tokenizer, 512)
    finally:
        tokenizer.chat_template = TEMPLATE
    assert marked == plain


def test_a_conversation_opening_with_the_assistant_and_one_cut_at_max_len(tokenizer: Any) -> None:
    opening = [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi."}]
    (example,) = tokenize([{"messages": opening}], tokenizer, 512)
    assert _labelled_text(tokenizer, example) == "Hello.<eos>\n"
    full, cut = (
        tokenize([{"messages": CHAT}], tokenizer, 512)[0],
        tokenize([{"messages": CHAT}], tokenizer, 12)[0],
    )
    assert (
        len(cut.input_ids) == 12 and cut.input_ids == full.input_ids[:12] and cut.labels == full.labels[:12]
    )


def test_text_and_prompt_response_lines_tokenize_as_before(tokenizer: Any, tmp_path: Path) -> None:
    lines = [{"text": "one two three"}, {"prompt": "What is two plus two?", "response": " Four."}]
    text, qa = tokenize(read_jsonl(_write(tmp_path / "d.jsonl", lines)), tokenizer, 512)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = tokenizer.encode("one two three", add_special_tokens=False)
    assert text == Example((bos, *body, eos), (bos, *body, eos))
    prompt = [bos, *tokenizer.encode("What is two plus two?", add_special_tokens=False)]
    response = [*tokenizer.encode(" Four.", add_special_tokens=False), eos]
    assert qa == Example(tuple(prompt + response), tuple([IGNORE] * len(prompt) + response))


@pytest.mark.parametrize(
    ("messages", "field", "words"),
    [
        ("hello", "messages", "non-empty list"),
        ([], "messages", "non-empty list"),
        ([{"role": "user", "content": "hi"}, "oops"], "messages[1]", "must be an object"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role", "'robot'"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}],
            "messages[1].content",
            "is int",
        ),
        ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "messages[1].content", "is missing"),
        (
            [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}],
            "messages",
            "no assistant turn",
        ),
    ],
)
def test_bad_chat_lines_name_the_file_the_line_and_the_field(
    tmp_path: Path, messages: Any, field: str, words: str
) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = _write(tmp_path / "chat.jsonl", [good, {"text": "plain"}, {"messages": messages}])
    with pytest.raises(DataFileError) as caught:
        read_jsonl(path)
    assert str(caught.value).startswith(f"{path}:3: {field}"), caught.value
    assert words in str(caught.value) and caught.value.field == field


def test_a_tokenizer_without_a_chat_template_is_refused_naming_the_line(
    tokenizer: Any, tmp_path: Path
) -> None:
    path = _write(tmp_path / "chat.jsonl", [{"text": "one two"}, {"messages": CHAT}])
    records = read_jsonl(path)
    tokenizer.chat_template = None
    try:
        with pytest.raises(DataFileError, match=rf"^{path}:2: .*has none: add \"chat_template\""):
            tokenize(records, tokenizer, 512)
    finally:
        tokenizer.chat_template = TEMPLATE


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer: Any, tmp_path: Path) -> None:
    # The last turn alone in brackets: a prefix renders its last turn differently than the whole does.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}{% endif %}"
        "{% endfor %}"
    )
    try:
        with pytest.raises(
            DataFileError,
            match=r":1: messages\[2\]: the chat template renders the turns before this one differently",
        ):
            tokenize(read_jsonl(_write(tmp_path / "c.jsonl", [{"messages": CHAT}])), tokenizer, 512)
    finally:
        tokenizer.chat_template = TEMPLATE


def _skewed(n: int, seed: int) -> list[Example]:
    """Mostly short examples and a few long ones (chat data's usual shape)."""
    rng = random.Random(seed)
    lengths = [rng.randint(100, 128) if rng.random() < 0.125 else rng.randint(8, 24) for _ in range(n)]
    return [Example(tuple(range(1, k + 1)), tuple(range(1, k + 1))) for k in lengths]


def test_length_grouped_batches_keep_every_example_once_a_pass_and_cut_the_padding() -> None:
    examples, size = _skewed(512, seed=3), 8
    passes = 3
    per_pass = len(examples) // size

    def drawn(by_length: bool) -> list[list[tuple[int, ...]]]:
        stream = batches(examples, size, 0, seed=11, by_length=by_length)
        return [
            [tuple(row[row > 0].tolist()) for row in next(stream).input_ids] for _ in range(passes * per_pass)
        ]

    grouped = drawn(True)
    for p in range(passes):
        seen = sorted(e for batch in grouped[p * per_pass : (p + 1) * per_pass] for e in batch)
        assert seen == sorted(e.input_ids for e in examples)  # 512 = 64 x 8: every example exactly once
    assert grouped == drawn(True)  # the same seed, the same batches
    assert grouped[:per_pass] != grouped[per_pass : 2 * per_pass]  # a new order each pass

    plain = padding_fraction(
        b for b, _ in zip(batches(examples, size, 0, seed=11), range(passes * per_pass), strict=False)
    )
    bucketed = padding_fraction(
        b
        for b, _ in zip(
            batches(examples, size, 0, seed=11, by_length=True), range(passes * per_pass), strict=False
        )
    )
    # Measured: 0.67 of the positions are padding in random batches, 0.03 when grouped (seed 3, 11).
    print(f"padding fraction: random batches {plain:.3f}, length-grouped {bucketed:.3f}")
    assert plain > 0.5 and bucketed < 0.1, (plain, bucketed)


def test_fewer_examples_than_a_batch_make_one_batch_of_all() -> None:
    examples = _skewed(5, seed=1)
    batch = next(batches(examples, 8, 0, seed=2, by_length=True))
    assert sorted(tuple(r[r > 0].tolist()) for r in batch.input_ids) == sorted(e.input_ids for e in examples)
