"""Salient history positions: which prompt tokens a response should attend to (method.md, "Salient positions").

Three simple, documented sources of salience, all computed on the *text* and then mapped to token positions
through a Hugging Face fast tokenizer's ``offset_mapping``:

- **high-IDF words**: an :class:`IDFModel` fitted on a corpus the user passes (the training prompts by default);
  a word is salient when its smoothed IDF reaches a threshold (a quantile of the fitted vocabulary's IDF values,
  or an explicit ``min_idf``);
- **named entities** (:func:`named_entities`): capitalised words that do not start a sentence, and numbers;
- **user keywords**: case-insensitive whole-word matches.

A token is salient when its character span overlaps any salient character span. Tokens with an empty span (the
``(0, 0)`` offsets a tokenizer gives the special tokens it adds) and sink positions (the first ``sink`` tokens)
are never salient.

This module owns the rules (:func:`named_entities`, :class:`SalientSelector`); the IDF model is in
:mod:`cagsr_reward.idf`, the tokenizer side (a prompt's ids with its salient positions, chat templates) in
:mod:`cagsr_reward.encoding`, message token spans in :mod:`cagsr_reward.spans`. Only numpy and the standard library
are imported; tokenizers are passed in by the caller.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .idf import WORD_PATTERN, IDFModel
from .spans import as_offsets

__all__ = [
    "WORD_PATTERN",
    "IDFModel",
    "named_entities",
    "SalientSpan",
    "SalientSelector",
    "token_positions_from_spans",
]

# -- named entities -------------------------------------------------------------------------------------------------

# Numbers: thousands-separated (1,234,567.89) or plain (42, 3.14), not glued to letters/digits on either side.
_NUMBER = re.compile(r"(?<!\w)(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?!\w)")
# Words starting with a letter; internal hyphens/apostrophes keep "O'Neil" and "Jean-Luc" whole.
_WORD = re.compile(r"(?<!\w)[^\W\d_]\w*(?:['\u2019-]\w+)*")
# Characters that may sit between a sentence end and the next sentence's first word.
_SENTENCE_END = ".!?"
_OPENERS = "\"'\u201c\u2018([{"
_CLOSERS = "\"'\u201d\u2019)]}"


def _at_sentence_start(text: str, start: int) -> bool:
    """True when the word at ``start`` opens the text, a line, or a sentence.

    A sentence starts after ``.``, ``!`` or ``?`` (optionally followed by closing quotes/brackets) and at least one
    whitespace character; opening quotes/brackets right before the word are skipped.
    """
    i = start - 1
    while i >= 0 and text[i] in _OPENERS:
        i -= 1
    if i < 0:
        return True
    if not text[i].isspace():
        return False  # glued to punctuation such as "e.g.Bob" or "x/Bob": mid-sentence
    while i >= 0 and text[i].isspace():
        if text[i] in "\n\r":
            return True
        i -= 1
    if i < 0:
        return True
    while i >= 0 and text[i] in _CLOSERS:
        i -= 1
    return i >= 0 and text[i] in _SENTENCE_END


def named_entities(text: str) -> list[tuple[int, int]]:
    """Character spans of simple named entities in ``text``, sorted by start.

    The rules (deliberately simple regular expressions, method.md "Salient positions"):

    - **numbers**: integers and decimals, optionally with ``,`` thousands separators (``42``, ``3.14``,
      ``1,234,567.5``), not glued to a letter or digit (``3rd``, ``COVID19`` are not numbers; a trailing full stop
      is not part of the number);
    - **capitalised words not at sentence start**: a word (letters, digits, internal ``-`` or ``'``) whose first
      letter is upper case, unless it is the first word of the text, of a line, or after ``.``, ``!`` or ``?``
      (opening quotes/brackets in between are skipped). The pronoun ``I`` (and ``I'm``, ``I'll``...) is excluded.

    Args:
        text (`str`): the text.

    Returns:
        `list[tuple[int, int]]`: half-open ``(start, end)`` spans.

    Example:
        >>> text = "Alice met Bob in New York. It cost 1,250.50 dollars."
        >>> [text[a:b] for a, b in named_entities(text)]
        ['Bob', 'New', 'York', '1,250.50']
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    spans = [(m.start(), m.end()) for m in _NUMBER.finditer(text)]
    for m in _WORD.finditer(text):
        word = m.group(0)
        if not word[0].isupper():
            continue
        if word == "I" or re.fullmatch(r"I['\u2019]\w+", word):
            continue
        if _at_sentence_start(text, m.start()):
            continue
        spans.append((m.start(), m.end()))
    return sorted(spans)


# -- the selector ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SalientSpan:
    """One salient character span and why it is salient.

    Attributes:
        start (`int`): first character (inclusive).
        end (`int`): last character (exclusive).
        kind (`str`): ``"idf"``, ``"entity"`` or ``"keyword"``.
    """

    start: int
    end: int
    kind: str


def _merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted union of half-open spans (overlapping ones merged; touching ones kept apart)."""
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if b <= a:
            continue
        if merged and a < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _check_sink(sink: Any) -> int:
    if not isinstance(sink, (int, np.integer)) or isinstance(sink, bool) or sink < 0:
        raise ValueError(f"sink must be an int >= 0, got {sink!r}")
    return int(sink)


def token_positions_from_spans(spans: Sequence[tuple[int, int]], offsets: Any, sink: int) -> np.ndarray:
    """Token positions whose non-empty offset span overlaps any of ``spans`` and that are >= ``sink``."""
    sink = _check_sink(sink)
    arr = as_offsets(offsets)
    starts, ends = arr[:, 0], arr[:, 1]
    hit = np.zeros(arr.shape[0], dtype=bool)
    for a, b in spans:
        hit |= (starts < b) & (ends > a)
    hit &= ends > starts  # special tokens added by the tokenizer carry (0, 0): never salient
    hit[: min(sink, hit.size)] = False  # sinks are never salient (method.md)
    return np.flatnonzero(hit).astype(np.int64)


class SalientSelector:
    """Chooses salient character spans in a text and maps them to token positions.

    A character is salient when it belongs to (a) a word whose IDF under ``idf`` is at least the threshold,
    (b) a :func:`named_entities` span (when ``use_entities``), or (c) a whole-word, case-insensitive match of one of
    ``keywords``. The IDF threshold is ``min_idf`` when given, else ``idf.quantile(idf_quantile)``: the
    ``idf_quantile``-quantile of the fitted vocabulary's IDF values (0.8 keeps roughly the rarest fifth of the
    vocabulary; words never seen by the model have the largest IDF and always pass).

    Args:
        idf (`IDFModel`, *optional*): the IDF model; ``None`` disables the IDF rule.
        idf_quantile (`float`, defaults to 0.8): quantile in ``[0, 1]`` giving the threshold when ``min_idf`` is
            not set.
        use_entities (`bool`, defaults to `True`): apply the named-entity rule.
        keywords (`Iterable[str]`, defaults to ``()``): user keywords (each may contain spaces).
        min_idf (`float`, *optional*): explicit IDF threshold; needs ``idf``.

    Example:
        >>> sel = SalientSelector(IDFModel.fit(["the cat sat", "the dog sat", "the cat ran"]),
        ...                       idf_quantile=0.8, keywords=["sat"])
        >>> text = "the dog sat with Rex"
        >>> [text[a:b] for a, b in sel.char_spans(text)]
        ['dog', 'sat', 'with', 'Rex']
    """

    def __init__(
        self,
        idf: IDFModel | None = None,
        *,
        idf_quantile: float = 0.8,
        use_entities: bool = True,
        keywords: Iterable[str] = (),
        min_idf: float | None = None,
    ):
        if idf is not None and not isinstance(idf, IDFModel):
            raise TypeError(f"idf must be an IDFModel or None, got {type(idf).__name__}")
        if not isinstance(idf_quantile, (int, float)) or not 0.0 <= float(idf_quantile) <= 1.0:
            raise ValueError(f"idf_quantile must be a float in [0, 1], got {idf_quantile!r}")
        if min_idf is not None:
            if idf is None:
                raise ValueError("min_idf needs an idf model: pass idf=IDFModel.fit(corpus) or leave min_idf=None")
            if not isinstance(min_idf, (int, float)) or not math.isfinite(min_idf):
                raise ValueError(f"min_idf must be a finite float or None, got {min_idf!r}")
        if isinstance(keywords, str):
            raise TypeError("keywords must be an iterable of strings, not a single string (wrap it in a list)")
        kws = tuple(keywords)
        for kw in kws:
            if not isinstance(kw, str) or not kw.strip():
                raise ValueError(f"keywords must be non-empty strings, got {kw!r}")
        self.idf = idf
        self.idf_quantile = float(idf_quantile)
        self.use_entities = bool(use_entities)
        self.keywords = kws
        self.min_idf = None if min_idf is None else float(min_idf)
        self._threshold: float | None = None
        self._keyword_regex: re.Pattern[str] | None = None

    @property
    def idf_threshold(self) -> float | None:
        """The IDF a word needs to be salient (``None`` without an IDF model)."""
        if self.idf is None:
            return None
        if self._threshold is None:
            self._threshold = self.min_idf if self.min_idf is not None else self.idf.quantile(self.idf_quantile)
        return self._threshold

    def _keyword_pattern(self) -> re.Pattern[str] | None:
        if not self.keywords:
            return None
        if self._keyword_regex is None:
            # Longest first so "New York City" wins over "New York"; (?<!\w)/(?!\w) make matches whole-word.
            alternatives = sorted({kw.strip() for kw in self.keywords}, key=len, reverse=True)
            body = "|".join(re.escape(kw) for kw in alternatives)
            self._keyword_regex = re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)
        return self._keyword_regex

    def annotate(self, text: str) -> list[SalientSpan]:
        """Every salient span of ``text`` with its reason, unmerged, sorted by (start, end, kind).

        Example:
            >>> [(s.start, s.end, s.kind) for s in SalientSelector(keywords=["paris"]).annotate("in Paris")]
            [(3, 8, 'entity'), (3, 8, 'keyword')]
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        found: list[SalientSpan] = []
        threshold = self.idf_threshold
        if self.idf is not None and threshold is not None:
            found += [SalientSpan(a, b, "idf") for a, b, w in self.idf.words(text) if self.idf.idf(w) >= threshold]
        if self.use_entities:
            found += [SalientSpan(a, b, "entity") for a, b in named_entities(text)]
        pattern = self._keyword_pattern()
        if pattern is not None:
            found += [SalientSpan(m.start(), m.end(), "keyword") for m in pattern.finditer(text)]
        return sorted(found, key=lambda s: (s.start, s.end, s.kind))

    def char_spans(self, text: str) -> list[tuple[int, int]]:
        """Salient character spans of ``text``: the sorted union (overlaps merged) of :meth:`annotate`.

        Args:
            text (`str`): the text.

        Returns:
            `list[tuple[int, int]]`: half-open ``(start, end)`` spans.

        Example:
            >>> SalientSelector().char_spans("Ask Bob about 42 apples")
            [(4, 7), (14, 16)]
        """
        return _merge((s.start, s.end) for s in self.annotate(text))

    def token_positions(self, text: str, offsets: Any, *, sink: int = 0, offset_base: int = 0) -> np.ndarray:
        """Token positions whose characters overlap a salient span of ``text``.

        Args:
            text (`str`): the text whose spans are chosen.
            offsets (`array-like (n_tokens, 2)`): a fast tokenizer's ``offset_mapping`` for the string that was
                tokenized (half-open character spans; ``(0, 0)`` for added special tokens).
            sink (`int`, defaults to 0): the first ``sink`` positions are attention sinks and never salient.
            offset_base (`int`, defaults to 0): where ``text`` starts inside the tokenized string (e.g. a
                message's position inside a rendered chat template).

        Returns:
            `np.ndarray`: sorted int64 positions, each in ``[sink, n_tokens)``.

        Example:
            >>> # "<s>" (added, (0, 0)), "Ask", " Bob", " now"
            >>> SalientSelector().token_positions("Ask Bob now", [(0, 0), (0, 3), (3, 7), (7, 11)])
            array([2])
        """
        if not isinstance(offset_base, (int, np.integer)) or offset_base < 0:
            raise ValueError(f"offset_base must be an int >= 0, got {offset_base!r}")
        spans = [(a + offset_base, b + offset_base) for a, b in self.char_spans(text)]
        return token_positions_from_spans(spans, offsets, sink)

    def __repr__(self) -> str:
        return (
            f"SalientSelector(idf={self.idf!r}, idf_quantile={self.idf_quantile}, use_entities={self.use_entities}, "
            f"keywords={self.keywords!r}, min_idf={self.min_idf})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_keyword_regex"] = None  # compiled patterns pickle fine, but keep the state plain data
        return state


# -- tokenizer-facing helpers ---------------------------------------------------------------------------------------



