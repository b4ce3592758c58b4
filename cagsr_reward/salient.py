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

Only numpy and the standard library are imported here; tokenizers are passed in by the caller.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import resolve_sink

__all__ = [
    "WORD_PATTERN",
    "IDFModel",
    "named_entities",
    "SalientSpan",
    "SalientSelector",
    "PromptEncoding",
    "salient_positions",
    "salient_positions_for_messages",
    "encode_prompt",
]

#: Default word rule for IDF: maximal runs of Unicode word characters, compared lower-cased.
WORD_PATTERN = r"\w+"

_JSON_FORMAT = "cagsr_reward.IDFModel/1"


def _document_text(doc: Any) -> str:
    """Text of one corpus document: a string, or the joined text contents of a list of chat messages."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, Sequence) and all(isinstance(m, Mapping) for m in doc):
        return "\n".join(text for message in doc for text in _message_texts(message))
    raise TypeError(
        f"corpus documents must be str or a list of chat messages (dicts with 'content'), got {type(doc).__name__}"
    )


def _message_texts(message: Mapping[str, Any]) -> list[str]:
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


class IDFModel:
    r"""Smoothed inverse document frequency of words, fitted on a corpus.

    .. math::

        \mathrm{idf}(w) = \ln\frac{1 + N}{1 + \mathrm{df}(w)} + 1

    where :math:`N` is the number of documents and :math:`\mathrm{df}(w)` the number of documents containing the
    word at least once (the "smooth" IDF of scikit-learn). Words are the matches of a regular expression
    (default :data:`WORD_PATTERN`, ``\w+``), matched case-insensitively and lower-cased. A word never seen has
    ``df = 0`` and so the largest IDF, ``ln(1 + N) + 1``.

    Args:
        df (`Mapping[str, int]`): document frequency of each (lower-cased) word; every value in ``[1, n_docs]``.
        n_docs (`int`): number of documents :math:`N` (>= 1).
        pattern (`str`, defaults to ``r"\w+"``): the word regular expression used by :meth:`fit` and
            :meth:`words`.

    Example:
        >>> model = IDFModel.fit(["the cat sat", "the dog sat", "the cat ran"])
        >>> round(model.idf("the"), 6), round(model.idf("Cat"), 6), round(model.idf("dog"), 6)
        (1.0, 1.287682, 1.693147)
        >>> round(model.idf("unseen"), 6)
        2.386294
        >>> model.top(2)
        [('dog', 1.6931471805599454), ('ran', 1.6931471805599454)]
    """

    def __init__(self, df: Mapping[str, int], n_docs: int, *, pattern: str = WORD_PATTERN):
        if not isinstance(n_docs, int) or isinstance(n_docs, bool) or n_docs < 1:
            raise ValueError(f"n_docs must be an int >= 1, got {n_docs!r}")
        try:
            self._regex = re.compile(pattern, re.IGNORECASE)
        except (re.error, TypeError) as exc:
            raise ValueError(f"pattern must be a valid regular expression string, got {pattern!r}: {exc}") from exc
        clean: dict[str, int] = {}
        for word, count in df.items():
            if not isinstance(word, str) or not word:
                raise ValueError(f"df keys must be non-empty strings, got {word!r}")
            if not isinstance(count, (int, np.integer)) or not 1 <= int(count) <= n_docs:
                raise ValueError(f"df[{word!r}] must be an int in [1, n_docs={n_docs}], got {count!r}")
            clean[word.lower()] = int(count)
        self._df = clean
        self._n_docs = n_docs
        self._pattern = pattern

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, corpus: Iterable[Any], *, tokenize: str | None = None) -> IDFModel:
        r"""Count document frequencies over ``corpus``.

        Args:
            corpus (`Iterable[str | list[dict]]`): the documents; a document is a string or a list of chat messages
                (their text contents are joined with newlines), so a TRL dataset's ``prompt`` column works as is.
            tokenize (`str`, *optional*): the word regular expression; defaults to :data:`WORD_PATTERN`
                (``\w+``). It is a pattern rather than a function so that the same rule finds word *spans* in
                :class:`SalientSelector` and the model stays JSON-serialisable.

        Returns:
            `IDFModel`: the fitted model.

        Raises:
            ValueError: if ``corpus`` has no documents.

        Example:
            >>> IDFModel.fit(["a b", "b c"]).df("b")
            2
        """
        pattern = WORD_PATTERN if tokenize is None else tokenize
        if not isinstance(pattern, str):
            raise TypeError(f"tokenize must be a regular expression string or None, got {type(tokenize).__name__}")
        regex = re.compile(pattern, re.IGNORECASE)
        counts: Counter[str] = Counter()
        n_docs = 0
        for doc in corpus:
            n_docs += 1
            counts.update({m.group(0).lower() for m in regex.finditer(_document_text(doc))})
        if n_docs == 0:
            raise ValueError("corpus must contain at least one document, got an empty iterable")
        return cls(dict(counts), n_docs, pattern=pattern)

    # -- queries ------------------------------------------------------------------------------------------------

    @property
    def n_docs(self) -> int:
        """Number of documents the model was fitted on."""
        return self._n_docs

    @property
    def pattern(self) -> str:
        """The word regular expression."""
        return self._pattern

    def __len__(self) -> int:
        return len(self._df)

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and word.lower() in self._df

    def df(self, word: str) -> int:
        """Document frequency of ``word`` (case-insensitive); 0 when unseen.

        Example:
            >>> IDFModel.fit(["Paris is big", "paris"]).df("PARIS")
            2
        """
        return self._df.get(word.lower(), 0)

    def idf(self, word: str) -> float:
        r"""Smoothed IDF :math:`\ln((1+N)/(1+\mathrm{df}(w))) + 1` of ``word`` (case-insensitive).

        Example:
            >>> round(IDFModel.fit(["a", "b"]).idf("a"), 6)  # ln(3/2) + 1
            1.405465
        """
        return math.log((1 + self._n_docs) / (1 + self._df.get(word.lower(), 0))) + 1.0

    def vocabulary_idf(self) -> np.ndarray:
        """IDF of every fitted word, float64, in sorted word order (empty when nothing was fitted).

        Example:
            >>> IDFModel.fit(["a b", "a"]).vocabulary_idf().round(4).tolist()  # words "a", "b"
            [1.0, 1.4055]
        """
        words = sorted(self._df)
        return np.array([self.idf(w) for w in words], dtype=np.float64)

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (numpy's linear interpolation) of the fitted vocabulary's IDF values.

        With an empty vocabulary the only IDF is the unseen-word value, which is returned.

        Example:
            >>> m = IDFModel.fit(["the cat sat", "the dog sat", "the cat ran"])
            >>> round(m.quantile(0.5), 6)  # idfs sorted: 1, 1.2877, 1.2877, 1.6931, 1.6931
            1.287682
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        values = self.vocabulary_idf()
        if values.size == 0:
            return self.idf("")
        return float(np.quantile(values, q))

    def top(self, k: int | None = 10) -> list[tuple[str, float]]:
        """The ``k`` fitted words with the highest IDF (ties broken alphabetically), as ``(word, idf)``.

        Args:
            k (`int | None`, defaults to 10): how many; ``None`` returns the whole vocabulary.

        Example:
            >>> IDFModel.fit(["a b", "a c"]).top(1)
            [('b', 1.4054651081081644)]
        """
        if k is not None and (not isinstance(k, int) or k < 0):
            raise ValueError(f"k must be a non-negative int or None, got {k!r}")
        ranked = sorted(self._df, key=lambda w: (self._df[w], w))
        if k is not None:
            ranked = ranked[:k]
        return [(w, self.idf(w)) for w in ranked]

    def words(self, text: str) -> list[tuple[int, int, str]]:
        """The words of ``text`` under this model's pattern, as ``(start, end, lower-cased word)``.

        Example:
            >>> IDFModel.fit(["x"]).words("Hi, Bob")
            [(0, 2, 'hi'), (4, 7, 'bob')]
        """
        return [(m.start(), m.end(), m.group(0).lower()) for m in self._regex.finditer(text) if m.end() > m.start()]

    # -- persistence --------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"format", "n_docs", "pattern", "df"}``.

        Example:
            >>> d = IDFModel.fit(["a b", "a"]).to_dict(); d["n_docs"], d["df"]
            (2, {'a': 2, 'b': 1})
            >>> IDFModel.from_dict(d).df("b")
            1
        """
        df = dict(sorted(self._df.items()))  # deterministic output whatever the hash seed
        return {"format": _JSON_FORMAT, "n_docs": self._n_docs, "pattern": self._pattern, "df": df}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IDFModel:
        """Inverse of :meth:`to_dict`."""
        if data.get("format") != _JSON_FORMAT:
            raise ValueError(f"data['format'] must be {_JSON_FORMAT!r}, got {data.get('format')!r}")
        return cls(data["df"], int(data["n_docs"]), pattern=data["pattern"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model as JSON to ``path``.

        Example:
            >>> import tempfile, os
            >>> p = os.path.join(tempfile.mkdtemp(), "idf.json")
            >>> m = IDFModel.fit(["a b", "b"]); m.save(p); IDFModel.load(p) == m
            True
        """
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, ensure_ascii=False, sort_keys=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> IDFModel:
        """Read a model written by :meth:`save`."""
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def __getstate__(self) -> dict[str, Any]:
        return self.to_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["df"], state["n_docs"], pattern=state["pattern"])  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IDFModel):
            return NotImplemented
        return (self._n_docs, self._pattern, self._df) == (other._n_docs, other._pattern, other._df)

    def __repr__(self) -> str:
        return f"IDFModel(n_docs={self._n_docs}, vocabulary={len(self._df)}, pattern={self._pattern!r})"


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


def _offsets_array(offsets: Any) -> np.ndarray:
    arr = np.asarray(offsets, dtype=np.int64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"offsets must have shape (n_tokens, 2), got {arr.shape}")
    return arr


def _check_sink(sink: Any) -> int:
    if not isinstance(sink, (int, np.integer)) or isinstance(sink, bool) or sink < 0:
        raise ValueError(f"sink must be an int >= 0, got {sink!r}")
    return int(sink)


def _positions_from_spans(spans: Sequence[tuple[int, int]], offsets: Any, sink: int) -> np.ndarray:
    """Token positions whose non-empty offset span overlaps any of ``spans`` and that are >= ``sink``."""
    sink = _check_sink(sink)
    arr = _offsets_array(offsets)
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
        return _positions_from_spans(spans, offsets, sink)

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


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "tokenizer must be a Hugging Face *fast* tokenizer (is_fast=True) because salient positions need "
            f"offset_mapping; got {type(tokenizer).__name__}"
        )


def _sink_count(sink: int | str, input_ids: Sequence[int], tokenizer: Any) -> int:
    """``sink`` as a count: ``"auto"`` = 1 when the first id is the tokenizer's BOS (config.resolve_sink)."""
    return resolve_sink(
        sink,
        first_token_id=input_ids[0] if len(input_ids) else None,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
    )


def salient_positions(
    text: str, tokenizer: Any, selector: SalientSelector, *, sink: int | str = 0, add_special_tokens: bool = True
) -> np.ndarray:
    """Salient token positions of ``text`` tokenized by ``tokenizer`` (as ``tokenizer(text)`` would).

    Args:
        text (`str`): the prompt text.
        tokenizer: a Hugging Face fast tokenizer (``is_fast``), used with ``return_offsets_mapping=True``.
        selector (`SalientSelector`): the salience rules.
        sink (`int | "auto"`, defaults to 0): leading positions never salient; ``"auto"`` = 1 if the first token is
            the tokenizer's BOS.
        add_special_tokens (`bool`, defaults to `True`): as in ``tokenizer(text, add_special_tokens=...)``; TRL
            tokenizes plain-text prompts with the default `True`.

    Returns:
        `np.ndarray`: sorted int64 token positions.

    Example:
        >>> positions = salient_positions("Ask Bob now", tokenizer, SalientSelector(), sink="auto")  # doctest: +SKIP
    """
    return encode_prompt(text, tokenizer, selector, sink=sink, add_special_tokens=add_special_tokens).salient


@dataclass(frozen=True)
class PromptEncoding:
    """A prompt tokenized together with its salient positions.

    Attributes:
        input_ids (`list[int]`): the prompt token ids, as TRL feeds them to the policy.
        salient (`np.ndarray`): sorted int64 salient positions into ``input_ids``.
        text (`str`): the string that was tokenized (the rendered chat template for message prompts).
        offsets (`np.ndarray`): ``(len(input_ids), 2)`` character offsets into ``text``.
        sink (`int`): the number of leading sink positions used.
        message_spans (`tuple`): for message prompts, ``(message_index, role, token_start, token_end)`` of each
            message's content tokens (half-open), in order; empty for string prompts.
    """

    input_ids: list[int]
    salient: np.ndarray
    text: str
    offsets: np.ndarray = field(repr=False)
    sink: int
    message_spans: tuple[tuple[int, str, int, int], ...] = ()

    def last_span(self, role: str = "user") -> tuple[int, int] | None:
        """Token span ``(start, end)`` of the last message with ``role``, or ``None`` if there is none.

        Example:
            >>> enc = PromptEncoding([1, 2, 3], np.zeros(0, np.int64), "", np.zeros((3, 2)), 0, ((0, "user", 1, 3),))
            >>> enc.last_span("user"), enc.last_span("system")
            ((1, 3), None)
        """
        for _, message_role, start, end in reversed(self.message_spans):
            if message_role == role:
                return (start, end)
        return None


_SENTINEL = "\u27e6cagsr:{}\u27e7"


def _render(tokenizer: Any, messages: Any, **kwargs: Any) -> str:
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(rendered).__name__}, expected str")
    return rendered


def _message_spans(tokenizer: Any, messages: Sequence[Mapping[str, Any]], rendered: str, **kwargs: Any):
    """Yield ``(message_index, piece_text, start_in_rendered)`` for every text piece of every message.

    Exact method first: render again with each piece replaced by a unique sentinel, locate the sentinels, and
    shift by the length differences; accepted only if every piece then sits verbatim at its computed place
    (templates that transform content, e.g. ``| trim``, fail this check). Fallback: search each piece (or its
    stripped form) left to right in ``rendered``.
    """
    pieces = [(i, text) for i, message in enumerate(messages) for text in _message_texts(message) if text]
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

        marked = _render(tokenizer, [substitute(m) for m in messages], **kwargs)
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


def _encode_messages(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    selector: SalientSelector,
    *,
    sink: int | str,
    add_generation_prompt: bool,
    roles: Iterable[str] | None,
    chat_template: str | None,
    tools: list[Any] | None,
    template_kwargs: Mapping[str, Any],
) -> PromptEncoding:
    _require_fast(tokenizer)
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    if not all(isinstance(m, Mapping) for m in messages):
        raise ValueError("messages must be a list of dicts with 'role' and 'content'")
    role_set = None if roles is None else set([roles] if isinstance(roles, str) else roles)
    kwargs = dict(template_kwargs)
    kwargs.update(add_generation_prompt=add_generation_prompt, chat_template=chat_template, tools=tools)
    rendered = _render(tokenizer, list(messages), **kwargs)
    # Same ids as apply_chat_template(tokenize=True), which calls tokenizer(rendered, add_special_tokens=False).
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    offsets = _offsets_array(enc["offset_mapping"])
    sink_n = _sink_count(sink, input_ids, tokenizer)
    spans: list[tuple[int, int]] = []
    token_ranges: dict[int, list[int]] = {}
    nonempty = offsets[:, 1] > offsets[:, 0]
    for i, text, start in _message_spans(tokenizer, messages, rendered, **kwargs):
        inside = np.flatnonzero(nonempty & (offsets[:, 0] < start + len(text)) & (offsets[:, 1] > start))
        if inside.size:
            lo, hi = token_ranges.get(i, [int(inside[0]), int(inside[-1]) + 1])
            token_ranges[i] = [min(lo, int(inside[0])), max(hi, int(inside[-1]) + 1)]
        if role_set is not None and messages[i].get("role") not in role_set:
            continue
        spans += [(a + start, b + start) for a, b in selector.char_spans(text)]
    salient = _positions_from_spans(spans, offsets, sink_n)
    message_spans = tuple(
        (i, str(messages[i].get("role")), lo, hi) for i, (lo, hi) in sorted(token_ranges.items())
    )
    return PromptEncoding(
        input_ids=input_ids, salient=salient, text=rendered, offsets=offsets, sink=sink_n, message_spans=message_spans
    )


def salient_positions_for_messages(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    selector: SalientSelector,
    *,
    sink: int | str = 0,
    add_generation_prompt: bool = True,
    roles: Iterable[str] | None = None,
    chat_template: str | None = None,
    tools: list[Any] | None = None,
    **template_kwargs: Any,
) -> np.ndarray:
    """Salient token positions of a chat history rendered with the tokenizer's chat template.

    The history is rendered with ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=...)`` and tokenized with ``add_special_tokens=False`` (the ids TRL feeds the policy).
    Each message's content is located in the rendered string and the selector runs on that content alone, so
    template tokens (role headers, separators) are never salient and sentence starts are judged per message.

    Args:
        messages (`list[dict]`): ``[{"role": ..., "content": str | list of {"type": "text", "text": ...}}]``.
        tokenizer: a Hugging Face fast tokenizer with a chat template.
        selector (`SalientSelector`): the salience rules.
        sink (`int | "auto"`, defaults to 0): leading positions never salient (``"auto"``: 1 if BOS first).
        add_generation_prompt (`bool`, defaults to `True`): as TRL renders prompts.
        roles (`Iterable[str]`, *optional*): only messages with these roles contribute (e.g. ``["user"]``);
            ``None`` = all messages.
        chat_template, tools, **template_kwargs: passed to ``apply_chat_template``.

    Returns:
        `np.ndarray`: sorted int64 token positions into the rendered prompt's ids.

    Raises:
        ValueError: if a message's content cannot be found in the rendered string.

    Example:
        >>> msgs = [{"role": "user", "content": "Where does Bob live?"}]
        >>> salient_positions_for_messages(msgs, tokenizer, SalientSelector(), sink="auto")  # doctest: +SKIP
    """
    return _encode_messages(
        messages,
        tokenizer,
        selector,
        sink=sink,
        add_generation_prompt=add_generation_prompt,
        roles=roles,
        chat_template=chat_template,
        tools=tools,
        template_kwargs=template_kwargs,
    ).salient


def encode_prompt(
    prompt: str | Sequence[Mapping[str, Any]],
    tokenizer: Any,
    selector: SalientSelector,
    *,
    sink: int | str = 0,
    add_special_tokens: bool = True,
    add_generation_prompt: bool = True,
    roles: Iterable[str] | None = None,
    chat_template: str | None = None,
    tools: list[Any] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> PromptEncoding:
    """Tokenize a TRL prompt the way TRL does and find its salient positions.

    A string prompt is tokenized as ``tokenizer(prompt)`` (``add_special_tokens``, default `True`, like TRL's
    ``processing_class(text=prompts)``); a list of messages goes through :func:`salient_positions_for_messages`
    (chat template with ``add_generation_prompt=True``, like ``GRPOTrainer._tokenize_prompts``).

    Args:
        prompt (`str | list[dict]`): the prompt.
        tokenizer: a Hugging Face fast tokenizer.
        selector (`SalientSelector`): the salience rules.
        sink (`int | "auto"`, defaults to 0): leading positions never salient.
        add_special_tokens (`bool`, defaults to `True`): string prompts only.
        add_generation_prompt, roles, chat_template, tools: message prompts only (see
            :func:`salient_positions_for_messages`).
        chat_template_kwargs (`dict`, *optional*): extra template variables (TRL's ``chat_template_kwargs``).

    Returns:
        `PromptEncoding`: ids, salient positions, the tokenized text, offsets and the sink count.

    Example:
        >>> enc = encode_prompt("Ask Bob now", tokenizer, SalientSelector(), sink="auto")  # doctest: +SKIP
        >>> enc.input_ids, enc.salient  # doctest: +SKIP
    """
    if not isinstance(selector, SalientSelector):
        raise TypeError(f"selector must be a SalientSelector, got {type(selector).__name__}")
    if isinstance(prompt, str):
        _require_fast(tokenizer)
        enc = tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        input_ids = list(enc["input_ids"])
        offsets = _offsets_array(enc["offset_mapping"])
        sink_n = _sink_count(sink, input_ids, tokenizer)
        salient = _positions_from_spans(selector.char_spans(prompt), offsets, sink_n)
        return PromptEncoding(input_ids=input_ids, salient=salient, text=prompt, offsets=offsets, sink=sink_n)
    return _encode_messages(
        prompt,
        tokenizer,
        selector,
        sink=sink,
        add_generation_prompt=add_generation_prompt,
        roles=roles,
        chat_template=chat_template,
        tools=tools,
        template_kwargs=chat_template_kwargs or {},
    )
