"""Final answers of a chain of thought: the one set of answer markers, and where the answer starts.

Used by the CoT reward (:func:`find_answer_span`: which generated tokens are the answer turn) and by the CHAMP
integration (:func:`cagsr_reward.integrations.cot.extract_answer` / ``reasoning_text``). numpy and ``re`` only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from .core import _is_int

__all__ = ["ANSWER_MARKERS", "BOXED_MARKER", "find_answer_span", "marker_pattern"]

#: Final-answer markers, matched case-insensitively (see :func:`marker_pattern`); the answer starts after the last
#: occurrence of any.
ANSWER_MARKERS: tuple[str, ...] = ("answer is", "answer:", "####", "\\boxed{")
#: The LaTeX marker among them, whose braces delimit the answer.
BOXED_MARKER = "\\boxed{"


def marker_pattern(markers: Sequence[str] = ANSWER_MARKERS) -> re.Pattern[str]:
    r"""A case-insensitive pattern matching any marker: a space in a marker matches any run of whitespace, a leading
    ``"the "`` / ``"the final "`` belongs to the match (so it is not part of the reasoning), and so do spaces and one
    colon after it (so they are not part of the answer).

    Example:
        >>> [m.group() for m in marker_pattern().finditer("So the final answer is: 4. Answer: 5")]
        ['the final answer is: ', 'Answer: ']
    """
    if isinstance(markers, str) or not markers or not all(isinstance(m, str) and m for m in markers):
        raise ValueError(f"markers: expected a non-empty sequence of non-empty strings, got {markers!r}")
    alternatives = "|".join(r"\s+".join(re.escape(part) for part in m.split()) for m in markers)
    return re.compile(rf"(?:the\s+(?:final\s+)?)?(?:{alternatives})(?:\s*:)?\s*", re.IGNORECASE)




_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def find_answer_span(
    tokens: Sequence[str] | None = None,
    *,
    text: str | None = None,
    offsets: Sequence[tuple[int, int]] | None = None,
    block: int = 5,
    markers: Sequence[str] = ANSWER_MARKERS,
    rule: str = "rest",
) -> tuple[int, int]:
    r"""
    Locate the final-answer tokens of a generated chain of thought: the tokens after the last occurrence of any
    marker (``"answer is"``, ``"Answer:"``, ``"####"``, ``"\boxed{"``; case-insensitive). A token that straddles
    the end of the marker belongs to the answer. With no marker, or nothing after it, the answer is the last block
    of `block` tokens (blocks start at multiples of `block`).

    Give either `tokens` (decoded token strings, concatenated to form the text) or `text` with `offsets`
    (per-token ``(start, end)`` character offsets into `text`, e.g. a tokenizer's offset mapping).

    Args:
        tokens (sequence of `str` or `None`, *optional*):
            Decoded generated tokens.
        text (`str` or `None`, *optional*):
            The generated text, used with `offsets`.
        offsets (sequence of `(int, int)` or `None`, *optional*):
            Character span of each generated token in `text`.
        block (`int`, *optional*, defaults to `5`):
            CoT block size $k$, for the fallback.
        markers (sequence of `str`, *optional*, defaults to `ANSWER_MARKERS`):
            Markers to look for.
        rule (`str`, *optional*, defaults to `"rest"`):
            `"rest"`: the tokens after the *last* marker, to the end. `"sentence"`: from the token after the *first*
            marker to the end of that sentence (the first ``.``, ``!`` or ``?`` followed by white space or the end of
            the text, or a line break), so an answer stated first and followed by more text is still only the
            answer sentence (``CAGSRConfig.cot_answer``).

    Returns:
        `(start, end)`: generated-token indices of the answer (``end`` = number of tokens under `"rest"`).

    Example:
    ```python
    >>> find_answer_span(["2", "+", "2", " =", " 4", ".", " The", " answer", " is", " 4", "."])
    (9, 11)
    >>> find_answer_span(["a", "b", "c", "d", "e", "f", "g"], block=5)  # no marker: last block
    (5, 7)

    ```
    """
    if not _is_int(block) or block < 1:
        raise ValueError(f"block: expected an int >= 1, got {block!r}")
    if tokens is not None:
        if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
            raise ValueError("tokens: expected a sequence of token strings")
        text = "".join(tokens)
        ends = np.cumsum([len(t) for t in tokens]) if len(tokens) else np.zeros(0, dtype=np.int64)
    elif text is not None and offsets is not None:
        if not isinstance(text, str):
            raise ValueError(f"text: expected a str, got {type(text).__name__}")
        try:
            ends = np.array([int(e) for _, e in offsets], dtype=np.int64)
        except (TypeError, ValueError):
            raise ValueError("offsets: expected a sequence of (start, end) character offsets") from None
        # special tokens often carry (0, 0): keep the ends monotone so they never look like the answer's start
        ends = np.maximum.accumulate(ends) if ends.size else ends
    else:
        raise ValueError("tokens: give the token strings, or text together with offsets")
    num = len(ends)
    if num == 0:
        raise ValueError("tokens: no generated tokens")
    if rule not in ("rest", "sentence"):
        raise ValueError(f"rule: expected 'rest' or 'sentence', got {rule!r}")
    if rule == "sentence":
        first = marker_pattern(markers).search(text)
        if first is not None:
            start = int(np.searchsorted(ends, first.end(), side="right"))
            if start < num:
                stop = _SENTENCE_END.search(text, first.end())
                end = num if stop is None else int(np.searchsorted(ends, stop.start(), side="right")) + 1
                return start, min(max(end, start + 1), num)
        return ((num - 1) // block) * block, num
    marker_end = max((m.end() for m in marker_pattern(markers).finditer(text)), default=-1)
    if marker_end >= 0:
        # first token ending after the marker: it holds (part of) the answer
        start = int(np.searchsorted(ends, marker_end, side="right"))
        if start < num:
            return start, num
    return ((num - 1) // block) * block, num
