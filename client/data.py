"""A site's local data: JSONL files tokenized for causal LM training.

Each line is ``{"text": ...}`` (loss on every token),
``{"prompt": ..., "response": ...}`` (loss on the response tokens only), or
``{"messages": [{"role": ..., "content": ...}, ...]}`` (rendered with the tokenizer's chat
template, loss on the assistant turns only: ``client.chat``).
A held-out part (or a separate file) gives the eval loss a worker reports.

``batches(..., by_length=True)`` draws each batch from examples of similar length (the worker's
way: ``training_batches``), so padding does not dominate when lengths are skewed;
``padding_fraction`` measures it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from client import chat
from common.errors import InvalidArgument

T = TypeVar("T")
IGNORE = chat.IGNORE  # label value the loss skips (torch's cross-entropy ignore_index)


@dataclass(frozen=True, slots=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE where no loss

    @property
    def tokens(self) -> int:
        """Tokens that carry loss (after the causal shift)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


class DataFileError(InvalidArgument, ValueError):
    """A data file the worker cannot use; the message names the file and the line.

    An InvalidArgument, so ``gdfed`` reports it as a usage error (exit 2), and a ValueError, as
    these errors always were.
    """


_SHAPE = "each line must be a JSON object with 'text', with 'prompt' and 'response', or with 'messages'"
# Batches sorted by length together (the "megabatch" of length-grouped sampling): wide enough to
# find similar lengths, narrow enough that a batch's company still changes from pass to pass.
LENGTH_WINDOW = 32


class Record(dict[str, Any]):
    """A JSONL record that remembers where it was read (``FILE:LINE``), for errors found later.

    A plain dict to everything else (equal to one, JSON-serializable), so a record from
    ``read_jsonl`` is used as any dict is.
    """

    __slots__ = ("where",)

    def __init__(self, values: dict[str, Any], where: str) -> None:
        super().__init__(values)
        self.where = where


def is_chat(record: dict[str, Any]) -> bool:
    """Whether a record is a chat (``messages``); ``text`` or ``prompt``/``response`` come first, as they always did."""
    return "messages" in record and "text" not in record and not ("prompt" in record and "response" in record)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; a line that is not a JSON object with text, prompt/response or
    messages is an error (chat messages are checked here: roles, string contents, an assistant turn).

    Raises:
        DataFileError: A line that is not JSON or not such an object (``FILE:LINE`` named, counting
            from 1 in the file, with the field for chat messages), bytes that are not UTF-8, or a
            file without examples.
        OSError: The file cannot be opened (FileNotFoundError names it).
    """
    records: list[dict[str, Any]] = []
    # Binary, decoded line by line: a decoding error then belongs to its line, not to a read-ahead.
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM is no error
            except UnicodeDecodeError:
                raise DataFileError(f"{where}: not UTF-8 text; save the file as UTF-8", field=where) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                # Each line is parsed alone: the decoder's "line 1" is this line.
                raise DataFileError(
                    f"{where}: not JSON ({exc.msg} at column {exc.colno}); {_SHAPE}", field=where
                ) from None
            if not isinstance(record, dict) or not (
                "text" in record or ("prompt" in record and "response" in record) or "messages" in record
            ):
                raise DataFileError(f"{where}: {_SHAPE}", field=where)
            if is_chat(record):
                try:
                    chat.check_messages(record["messages"])
                except chat.ChatFormatError as exc:
                    raise DataFileError(f"{where}: {exc}", field=exc.field) from None
            records.append(Record(record, where))
    if not records:
        raise DataFileError(f"{path} holds no examples; {_SHAPE}", field=str(path))
    return records


def tokenize(records: Sequence[dict[str, Any]], tokenizer: Any, max_len: int) -> list[Example]:
    """Token ids and labels; prompts (and every chat turn but the assistant's) are masked out of the
    loss; sequences cut at ``max_len``.

    Raises:
        DataFileError: A chat record the tokenizer cannot render (no chat template, a template that
            refuses it), naming the record's ``FILE:LINE`` (``Record.where``) and field.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for number, record in enumerate(records, 1):
        if is_chat(record):
            # The template writes its own <bos> and end-of-turn markers: nothing is added here.
            try:
                ids, labels = chat.render(record["messages"], tokenizer)
            except chat.ChatFormatError as exc:
                where = getattr(record, "where", f"record {number}")
                raise DataFileError(f"{where}: {exc}", field=exc.field) from None
        elif "text" in record:
            ids = bos + tokenizer.encode(record["text"], add_special_tokens=False) + eos
            labels = list(ids)
        else:
            prompt = bos + tokenizer.encode(record["prompt"], add_special_tokens=False)
            response = tokenizer.encode(record["response"], add_special_tokens=False) + eos
            ids = prompt + response
            labels = [IGNORE] * len(prompt) + response
        examples.append(Example(tuple(ids[:max_len]), tuple(labels[:max_len])))
    return examples


def split(items: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded train/eval split (at least one eval item when eval_fraction > 0)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(items) * eval_fraction)) if eval_fraction > 0 else 0
    held = set(order[:n_eval])
    return [e for i, e in enumerate(items) if i not in held], [e for i, e in enumerate(items) if i in held]


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return Batch(ids, mask, labels)


def batches(
    examples: Sequence[Example], batch_size: int, pad_id: int, seed: int, *, by_length: bool = False
) -> Iterator[Batch]:
    """Shuffled batches forever (a new order each pass); a pass's last partial batch is left out.

    ``by_length``: each batch is drawn from examples of similar length, so little of it is padding:
    the pass's shuffled order is cut into windows of ``LENGTH_WINDOW`` batches, each window sorted
    by length and cut into batches, and the batches shuffled. Still every example at most once a
    pass, the same ``seed`` the same batches. Not packing: several examples in one row would need an
    attention mask that keeps them apart, which the 2-D mask the models take cannot say.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        if by_length:
            for group in _length_groups(order, examples, batch_size, rng):
                yield collate([examples[i] for i in group], pad_id)
            continue
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


def training_batches(examples: Sequence[Example], batch_size: int, pad_id: int, seed: int) -> Iterator[Batch]:
    """A round's batches as every process of a site draws them (the worker and its other ranks
    alike): length-grouped, so padding does not dominate when lengths are skewed (chat data)."""
    return batches(examples, batch_size, pad_id, seed, by_length=True)


def _length_groups(
    order: list[int], examples: Sequence[Example], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """``order``'s full batches (or all of it, if under one batch), each of similar lengths, shuffled."""
    if len(order) < batch_size:
        return [list(order)]
    usable = order[: len(order) - len(order) % batch_size]
    groups: list[list[int]] = []
    width = batch_size * LENGTH_WINDOW
    for start in range(0, len(usable), width):
        window = sorted(usable[start : start + width], key=lambda i: len(examples[i].input_ids))
        groups += [window[k : k + batch_size] for k in range(0, len(window), batch_size)]
    rng.shuffle(groups)
    return groups


def padding_fraction(drawn: Iterable[Batch]) -> float:
    """The share of the batches' token positions that are padding (0 for none)."""
    real = total = 0
    for batch in drawn:
        real += int(batch.attention_mask.sum())
        total += batch.attention_mask.numel()
    return 1 - real / total if total else 0.0


def eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Every example once, in order."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_id)
