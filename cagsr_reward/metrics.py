"""Text metrics that attention cannot game: word overlap with a reference and embedding consistency.

- :func:`token_f1` and :func:`rouge_l`: overlap of lower-cased word tokens with a reference text (SQuAD-style bag of
  words F1; longest-common-subsequence F1).
- :func:`cosine_similarity` and :func:`consistency_scores`: how close a reply's sentence embedding is to its
  history's, with any ``texts -> (n, d)`` embedder (:class:`~cagsr_reward.integrations.embedding.SentenceEmbedder`
  runs the offline all-MiniLM-L6-v2).

numpy and the standard library only.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["token_f1", "rouge_l", "cosine_similarity", "consistency_scores"]

_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between two texts (lower-cased ``\\w+`` tokens, multiset overlap; SQuAD style).

    Example:
        >>> token_f1("the cat sat", "the cat ran")  # 2 common of 3 and 3
        0.6666666666666666
        >>> token_f1("", "x"), token_f1("", "")
        (0.0, 1.0)
    """
    p, r = _words(prediction), _words(reference)
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of word tokens, $F = 2PR/(P+R)$ with $P = LCS/|pred|$, $R = LCS/|ref|$.

    Example:
        >>> round(rouge_l("a b c d", "a c d e"), 4)  # LCS "a c d" = 3; P = R = 3/4
        0.75
    """
    p, r = _words(prediction), _words(reference)
    if not p and not r:
        return 1.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def cosine_similarity(a: Any, b: Any) -> np.ndarray:
    """Row-wise cosine similarity of two ``(n, d)`` arrays (a zero row gives 0).

    Example:
        >>> cosine_similarity([[1.0, 0.0], [1.0, 1.0]], [[2.0, 0.0], [-1.0, -1.0]]).round(6).tolist()
        [1.0, -1.0]
    """
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"cosine_similarity: shapes {a.shape} and {b.shape} differ")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = dots / (na * nb)
    return np.where((na > 0) & (nb > 0), out, 0.0)


def consistency_scores(
    responses: Sequence[str], histories: Sequence[str], embed: Callable[[Sequence[str]], Any]
) -> np.ndarray:
    """Cosine similarity between ``embed(response_i)`` and ``embed(history_i)`` for every turn ``i``.

    Args:
        responses: the generated replies.
        histories: the text each reply answers (same length).
        embed: texts -> ``(n, d)`` array, e.g. a :class:`SentenceEmbedder`.

    Example:
        >>> fake = lambda texts: [[len(t), 1.0] for t in texts]  # stand-in embedding for the arithmetic only
        >>> consistency_scores(["ab"], ["ab"], fake).tolist()
        [1.0]
    """
    if len(responses) != len(histories):
        raise ValueError(f"responses: {len(responses)} entries for {len(histories)} histories")
    if not responses:
        return np.zeros(0)
    vectors = np.asarray(embed(list(responses) + list(histories)), dtype=np.float64)
    n = len(responses)
    return cosine_similarity(vectors[:n], vectors[n:])


