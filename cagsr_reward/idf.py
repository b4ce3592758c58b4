"""Smoothed inverse document frequency of words (method.md "Salient positions": high-IDF words are salient).

The corpus is whatever the user passes (the training prompts by default): strings, or chat histories whose message
texts are joined. numpy and the standard library only.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .spans import message_texts

__all__ = ["WORD_PATTERN", "IDFModel"]

#: Default word rule for IDF: maximal runs of Unicode word characters, compared lower-cased.
WORD_PATTERN = r"\w+"

_JSON_FORMAT = "cagsr_reward.IDFModel/1"


def _document_text(doc: Any) -> str:
    """Text of one corpus document: a string, or the joined text contents of a list of chat messages."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, Sequence) and all(isinstance(m, Mapping) for m in doc):
        return "\n".join(text for message in doc for text in message_texts(message))
    raise TypeError(
        f"corpus documents must be str or a list of chat messages (dicts with 'content'), got {type(doc).__name__}"
    )



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
