"""A site's local data: JSONL files tokenized for causal LM training.

Each line is ``{"text": ...}`` (loss on every token) or
``{"prompt": ..., "response": ...}`` (loss on the response tokens only).
A held-out part (or a separate file) gives the eval loss a worker reports.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from common.errors import InvalidArgument

T = TypeVar("T")
IGNORE = -100  # label value the loss skips (torch's cross-entropy ignore_index)


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


_SHAPE = "each line must be a JSON object with 'text', or with 'prompt' and 'response'"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; a line that is not a JSON object with text or prompt/response is an error.

    Raises:
        DataFileError: A line that is not JSON or not such an object (``FILE:LINE`` named, counting
            from 1 in the file), bytes that are not UTF-8, or a file without examples.
        OSError: The file cannot be opened (FileNotFoundError names it).
    """
    records = []
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
                "text" in record or ("prompt" in record and "response" in record)
            ):
                raise DataFileError(f"{where}: {_SHAPE}", field=where)
            records.append(record)
    if not records:
        raise DataFileError(f"{path} holds no examples; {_SHAPE}", field=str(path))
    return records


def tokenize(records: Sequence[dict[str, Any]], tokenizer: Any, max_len: int) -> list[Example]:
    """Token ids and labels; prompts are masked out of the loss; sequences cut at ``max_len``."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for record in records:
        if "text" in record:
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


def batches(examples: Sequence[Example], batch_size: int, pad_id: int, seed: int) -> Iterator[Batch]:
    """Shuffled batches forever (a new order each pass)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


def eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Every example once, in order."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_id)
