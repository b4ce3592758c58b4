"""Where each chat message sits in the tokens of a rendered chat history: the one definition of message spans.

A history rendered with the model's chat template (``apply_chat_template(tokenize=False)``, tokenized with
``add_special_tokens=False``: the ids TRL and vLLM feed the model) is partitioned into one :class:`MessageSpan` per
message, plus one for the generation prompt. Each span has two extents:

- ``start .. end``: the whole message *inside the template* (role header, content, separators): consecutive spans
  partition the history; what heatmap bands and turn boundaries use. Found by rendering growing prefixes of the
  conversation and mapping their character lengths to tokens through the fast tokenizer's offsets (a token that
  straddles a boundary belongs to the earlier message).
- ``content_start .. content_end``: the tokens of the message's own text only; what "the current user turn" means for
  the reward (the no-history-coverage ablation) and where salient words are looked for. Found by locating each text
  piece in the rendered string (:func:`locate_message_texts`).

numpy and the standard library only; the tokenizer is passed in.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "GENERATION_PROMPT",
    "ChatSpans",
    "MessageSpan",
    "as_offsets",
    "chat_message_spans",
    "content_token_ranges",
    "dialogue_turns",
    "locate_message_texts",
    "message_texts",
    "render_chat",
]

#: Role of the span holding the template's assistant header after the last message.
GENERATION_PROMPT = "generation_prompt"


@dataclass(frozen=True)
class MessageSpan:
    """History positions ``start..end-1`` hold message ``message_index`` (its role, its dialogue turn).

    ``role`` is the message's role, or ``"generation_prompt"`` for the template's assistant header appended after the
    last message. ``content_start..content_end-1`` are the tokens of the message's own text (``None`` when it has
    none, e.g. the generation prompt).
    """

    start: int
    end: int
    role: str
    turn: int
    message_index: int
    content_start: int | None = None
    content_end: int | None = None

    @property
    def content(self) -> tuple[int, int] | None:
        """``(content_start, content_end)`` or None."""
        if self.content_start is None or self.content_end is None:
            return None
        return (self.content_start, self.content_end)

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start, "end": self.end, "role": self.role, "turn": self.turn,
            "message_index": self.message_index, "content_start": self.content_start, "content_end": self.content_end,
        }


@dataclass(frozen=True)
class ChatSpans:
    """A rendered chat history: its text, ids, per-token character offsets and message spans."""

    text: str
    input_ids: list[int]
    offsets: np.ndarray
    spans: list[MessageSpan]


def dialogue_turns(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Turn index per message: a turn starts at each user message (system = turn 0).

    Example:
        >>> dialogue_turns([{"role": "system"}, {"role": "user"}, {"role": "assistant"}, {"role": "user"}])
        [0, 0, 0, 1]
    """
    turns, t = [], -1
    for m in messages:
        if m.get("role") == "user":
            t += 1
        turns.append(max(t, 0))
    return turns


def message_texts(message: Mapping[str, Any]) -> list[str]:
    """The text pieces of a chat message: its string content, or the 'text' of each text content block."""
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, Sequence):
        return [
            block["text"]
            for block in content
            if isinstance(block, Mapping) and block.get("type") == "text" and isinstance(block.get("text"), str)
        ]
    raise TypeError(f"message content must be str or a list of content blocks, got {type(content).__name__}")



_SENTINEL = "\u27e6cagsr:{}\u27e7"


def render_chat(tokenizer: Any, messages: Any, **kwargs: Any) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)``, checked to be a string."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(rendered).__name__}, expected str")
    return rendered


def locate_message_texts(tokenizer: Any, messages: Sequence[Mapping[str, Any]], rendered: str, **kwargs: Any):
    """``(message_index, piece_text, start_in_rendered)`` for every text piece of every message, in order.

    Exact method first: render again with each piece replaced by a unique sentinel, locate the sentinels, and
    shift by the length differences; accepted only if every piece then sits verbatim at its computed place
    (templates that transform content, e.g. ``| trim``, fail this check). Fallback: search each piece (or its
    stripped form) left to right in ``rendered``.
    """
    pieces = [(i, text) for i, message in enumerate(messages) for text in message_texts(message) if text]
    if not pieces:
        return []
    try:
        counter = iter(range(len(pieces)))

        def substitute(message: Mapping[str, Any]) -> dict[str, Any]:
            content = message.get("content")
            if isinstance(content, str):
                return {**message, "content": _SENTINEL.format(next(counter)) if content else content}
            if isinstance(content, Sequence):
                blocks = []
                for block in content:
                    if isinstance(block, Mapping) and block.get("type") == "text" and block.get("text"):
                        block = {**block, "text": _SENTINEL.format(next(counter))}
                    blocks.append(block)
                return {**message, "content": blocks}
            return dict(message)

        marked = render_chat(tokenizer, [substitute(m) for m in messages], **kwargs)
        located, shift, cursor = [], 0, 0
        for k, (i, text) in enumerate(pieces):
            sentinel = _SENTINEL.format(k)
            at = marked.find(sentinel, cursor)
            if at < 0:
                raise LookupError
            cursor = at + len(sentinel)
            start = at + shift
            if rendered[start : start + len(text)] != text:
                raise LookupError
            located.append((i, text, start))
            shift += len(text) - len(sentinel)
        return located
    except Exception:  # noqa: BLE001 - any failure of the exact method falls back to searching
        pass

    located, cursor = [], 0
    for i, text in pieces:
        at = rendered.find(text, cursor)
        piece = text
        if at < 0:
            piece = text.strip()
            at = rendered.find(piece, cursor) if piece else -1
        if at < 0:
            raise ValueError(
                f"messages[{i}] content was not found in the rendered chat template, so its tokens cannot be "
                "located; the template changes message text in a way this function does not undo"
            )
        located.append((i, piece, at))
        cursor = at + len(piece)
    return located




def as_offsets(offsets: Any) -> np.ndarray:
    """A tokenizer's ``offset_mapping`` as an int64 ``(n_tokens, 2)`` array."""
    arr = np.asarray(offsets, dtype=np.int64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"offsets must have shape (n_tokens, 2), got {arr.shape}")
    return arr


def content_token_ranges(located: Sequence[tuple[int, str, int]], offsets: Any) -> dict[int, tuple[int, int]]:
    """Message index -> ``(first, last + 1)`` token covering its located text pieces (non-empty tokens only)."""
    arr = as_offsets(offsets)
    nonempty = arr[:, 1] > arr[:, 0]
    ranges: dict[int, tuple[int, int]] = {}
    for i, text, start in located:
        inside = np.flatnonzero(nonempty & (arr[:, 0] < start + len(text)) & (arr[:, 1] > start))
        if inside.size:
            lo, hi = ranges.get(i, (int(inside[0]), int(inside[-1]) + 1))
            ranges[i] = (min(lo, int(inside[0])), max(hi, int(inside[-1]) + 1))
    return ranges


def chat_message_spans(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **template_kwargs: Any
) -> ChatSpans:
    """Render ``messages`` with the chat template (plus the generation prompt), tokenize, and locate each message.

    Returns:
        :class:`ChatSpans`; its ``spans`` partition ``input_ids`` (see the module docstring for the two extents).

    Raises:
        ValueError: if a message's text cannot be found in the rendered string.
    """
    msgs = [dict(m) for m in messages]
    full = render_chat(tokenizer, msgs, add_generation_prompt=add_generation_prompt, **template_kwargs)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), as_offsets(enc["offset_mapping"])
    ends = []
    for k in range(1, len(msgs) + 1):
        prefix = render_chat(tokenizer, msgs[:k], add_generation_prompt=False, **template_kwargs)
        if not full.startswith(prefix):
            # Templates that rewrite earlier messages (rare): fall back to the common prefix.
            n = 0
            while n < min(len(prefix), len(full)) and prefix[n] == full[n]:
                n += 1
            prefix = full[:n]
        ends.append(len(prefix))
    content = content_token_ranges(
        locate_message_texts(tokenizer, msgs, full, add_generation_prompt=add_generation_prompt, **template_kwargs),
        offsets,
    )
    starts = [int(a) for a, _ in offsets]
    turns = dialogue_turns(msgs)
    spans, start = [], 0
    for k, end_char in enumerate(ends):
        end = max(bisect.bisect_left(starts, end_char), start)
        lo, hi = content.get(k, (None, None))
        spans.append(MessageSpan(start, end, str(msgs[k].get("role")), turns[k], k, lo, hi))
        start = end
    if start < len(ids):
        spans.append(MessageSpan(start, len(ids), GENERATION_PROMPT, turns[-1] if turns else 0, len(msgs)))
    return ChatSpans(full, ids, offsets, spans)
