"""Chat records: ``{"messages": [{"role", "content"}, ...]}`` rendered with the tokenizer's chat template.

Loss falls on the assistant turns only (their content and the end-of-turn marker the template
closes them with, so the model learns to stop); the system, user and tool turns and the
template's headers get label ``IGNORE``. Which characters of the rendered text belong to an
assistant turn is found in one of two ways:

* a template that marks them with ``{% generation %}`` says so itself: transformers'
  ``return_assistant_tokens_mask`` reads those marks (exact, and the only way for templates that
  rewrite earlier turns, such as ones dropping old reasoning);
* any other template is rendered prefix by prefix: turn ``i`` of the assistant spans from the end
  of ``messages[:i]`` rendered with the generation prompt (the assistant header) to the end of
  ``messages[:i + 1]``. Every prefix must be a prefix of the whole rendering, which holds for the
  common templates (Llama 2/3, Mistral, Gemma, ChatML/Qwen 2.5, Phi-3); one that breaks it is
  refused rather than guessed at.

The whole conversation is tokenized once, as inference would see it, and the spans map to tokens
through the fast tokenizer's character offsets (a token overlapping a span is in it), so the ids
are those of the plain rendering, not of pieces tokenized apart.

No default template: a site without one would train its model on turn markers its users never
send, so a tokenizer without ``chat_template`` is an error naming the data file (the worker adds
the file and line). This module knows no files: errors are ``ChatFormatError`` with the field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from jinja2.exceptions import TemplateError

IGNORE = -100  # as client.data: the label value the loss skips
ROLES = ("system", "user", "assistant", "tool")
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatFormatError(ValueError):
    """A chat record the worker cannot use; ``field`` names the part (``messages[2].role``), and the
    message starts with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_messages(messages: Any) -> None:
    """Raise ChatFormatError unless ``messages`` is a list of {role, content} turns with an assistant one.

    Roles are those of ``ROLES``; content is a string (multimodal content lists are not read).
    """
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages", 'messages must be a non-empty list of {"role", "content"} objects')
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise ChatFormatError(
                f"messages[{i}]", f"messages[{i}] must be an object with 'role' and 'content'"
            )
        role = turn.get("role")
        if role not in ROLES:
            raise ChatFormatError(
                f"messages[{i}].role", f"messages[{i}].role is {role!r}; must be one of {', '.join(ROLES)}"
            )
        if not isinstance(turn.get("content"), str):
            got = type(turn.get("content")).__name__ if "content" in turn else "missing"
            raise ChatFormatError(
                f"messages[{i}].content", f"messages[{i}].content must be a string (is {got})"
            )
    if not any(turn["role"] == "assistant" for turn in messages):
        raise ChatFormatError(
            "messages", "messages has no assistant turn: the loss falls on assistant turns only"
        )


def render(messages: Sequence[dict[str, Any]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and its labels (the id on assistant tokens, IGNORE elsewhere).

    Raises:
        ChatFormatError: No chat template, not a fast tokenizer, a template that refuses the
            conversation (its own message), or one whose prefixes are not prefixes of the whole.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatFormatError(
            "messages",
            "messages: chat records need the tokenizer's chat template and this model's tokenizer has none: "
            'add "chat_template" to its tokenizer_config.json (or a chat_template.jinja beside it), '
            "or write the data as 'text' or 'prompt'/'response' lines",
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ChatFormatError(
            "messages",
            "messages: chat records need a fast tokenizer (tokenizer.json): its offsets map turns to tokens",
        )
    turns = [{"role": t["role"], "content": t["content"]} for t in messages]
    if isinstance(template, str) and _GENERATION.search(template):
        out = _apply(tokenizer, turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
        return ids, [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    text, spans = _spans_by_prefix(tokenizer, turns)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [
        t if any(start < end_ and stop > start_ for start_, end_ in spans) else IGNORE
        for t, (start, stop) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels


def _spans_by_prefix(tokenizer: Any, turns: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of its assistant turns."""
    text = _apply(tokenizer, turns, tokenize=False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        end = _prefix(tokenizer, turns[: i + 1], text, generation_prompt=False, turn=i)
        if i:
            start = _prefix(tokenizer, turns[:i], text, generation_prompt=True, turn=i)
        else:
            # Nothing precedes it to render (templates refuse an empty conversation): from its content on.
            found = text.find(turn["content"], 0, end) if turn["content"] else -1
            start = found if found >= 0 else end
        if start < end:
            spans.append((start, end))
    return text, spans


def _prefix(
    tokenizer: Any, turns: list[dict[str, str]], whole: str, *, generation_prompt: bool, turn: int
) -> int:
    """How many characters of ``whole`` the rendering of ``turns`` is; refused unless it is a prefix."""
    part = _apply(tokenizer, turns, tokenize=False, add_generation_prompt=generation_prompt)
    if not whole.startswith(part):
        raise ChatFormatError(
            f"messages[{turn}]",
            f"messages[{turn}]: the chat template renders the turns before this one differently once more follow, so "
            "the assistant turns cannot be told apart: mark them with {% generation %} in the template",
        )
    return len(part)


def _apply(tokenizer: Any, turns: list[dict[str, str]], **options: Any) -> Any:
    try:
        return tokenizer.apply_chat_template(turns, **options)
    except (TemplateError, ValueError, TypeError) as exc:
        raise ChatFormatError(
            "messages", f"messages: the chat template refused the conversation: {exc}"
        ) from None
