"""Text metrics that attention cannot game: word overlap with a reference and embedding consistency.

- :func:`token_f1` and :func:`rouge_l`: overlap of lower-cased word tokens with a reference text (SQuAD-style bag of
  words F1; longest-common-subsequence F1).
- :func:`cosine_similarity` and :func:`consistency_scores`: how close a reply's sentence embedding is to its
  history's, with any ``texts -> (n, d)`` embedder (:class:`~cagsr_reward.integrations.embedding.SentenceEmbedder`
  runs the offline all-MiniLM-L6-v2).
- :func:`ngram_overlap` (the heuristic baseline reward against a gold reply), :func:`distinct_n`, :func:`word_count`.
- :func:`auroc`, :func:`paired_auroc`, :func:`bootstrap_ci`, :func:`bootstrap_auroc`: the statistics of ``docs/experiments.md``.

numpy and the standard library only.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "token_f1",
    "rouge_l",
    "cosine_similarity",
    "consistency_scores",
    "ngram_overlap",
    "distinct_n",
    "word_count",
    "auroc",
    "paired_auroc",
    "bootstrap_ci",
    "bootstrap_auroc",
]

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
        >>> consistency_scores(["ab"], ["ab"], fake).round(6).tolist()
        [1.0]
    """
    if len(responses) != len(histories):
        raise ValueError(f"responses: {len(responses)} entries for {len(histories)} histories")
    if not responses:
        return np.zeros(0)
    vectors = np.asarray(embed(list(responses) + list(histories)), dtype=np.float64)
    n = len(responses)
    return cosine_similarity(vectors[:n], vectors[n:])


# ----------------------------------------------------------------------------------------------------------------
# experiment statistics: n-gram overlap baseline, distinct-n, AUROC and bootstrap intervals
# ----------------------------------------------------------------------------------------------------------------
def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def ngram_overlap(prediction: str, reference: str, *, max_n: int = 2) -> float:
    """The heuristic baseline reward: mean over n = 1..``max_n`` of the n-gram F1 between a reply and the recorded
    gold reply (lower-cased word tokens, clipped multiset counts). 0 when either text has no n-gram of some order
    (that order then counts as 0); 1 for identical texts of at least ``max_n`` words.

    Example:
        >>> round(ngram_overlap("the cat sat", "the cat ran"), 4)  # unigram F1 2/3, bigram F1 1/2
        0.5833
        >>> ngram_overlap("", "the cat")
        0.0
    """
    if not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n: expected an int >= 1, got {max_n!r}")
    p, r = _words(prediction), _words(reference)
    scores = []
    for n in range(1, max_n + 1):
        pg, rg = Counter(_ngrams(p, n)), Counter(_ngrams(r, n))
        common = sum((pg & rg).values())
        if common == 0:
            scores.append(0.0)
            continue
        precision, recall = common / sum(pg.values()), common / sum(rg.values())
        scores.append(2 * precision * recall / (precision + recall))
    return float(np.mean(scores))


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n: distinct word n-grams over all n-grams of ``texts`` (pooled); 0 when there is none.

    Example:
        >>> distinct_n(["a b a b", "a b"], n=2)  # bigrams ab, ba, ab, ab: 2 distinct of 4
        0.5
    """
    grams = [g for t in texts for g in _ngrams(_words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def word_count(text: str) -> int:
    """Number of lower-cased ``\\w+`` tokens (the reply-length metric)."""
    return len(_words(text))


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties counting 1/2 (Mann-Whitney U / mn).

    Example:
        >>> auroc([3.0, 2.0], [1.0, 2.0])  # pairs: 3>1, 3>2, 2>1, 2=2 -> (3 + 0.5) / 4
        0.875
    """
    pos = np.asarray(positive, np.float64).ravel()
    neg = np.asarray(negative, np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"auroc: needs at least one positive and one negative, got {pos.size} and {neg.size}")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("auroc: scores must be finite")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def bootstrap_ci(
    values: Any,
    statistic: Callable[[np.ndarray], float] | None = None,
    *,
    num_samples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: the statistic and its percentile bootstrap interval, resampling the first axis.

    ``values`` is an array whose rows are the independent units (dialogues, problems); ``statistic`` maps a
    resampled array to a float (default: the mean of a 1-D array). Non-finite rows are dropped first.

    Example:
        >>> est, lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0])
        >>> est, lo <= est <= hi
        (2.5, True)
    """
    x = np.asarray(values, np.float64)
    if x.ndim == 1:
        x = x[np.isfinite(x)]
    else:
        x = x[np.isfinite(x.reshape(len(x), -1)).all(axis=1)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a float in (0, 1), got {level!r}")
    stat = statistic or (lambda a: float(np.mean(a)))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(int(num_samples), len(x)))
    boots = np.array([stat(x[i]) for i in idx], np.float64)
    boots = boots[np.isfinite(boots)]
    tail = (1 - level) / 2 * 100
    low, high = (np.percentile(boots, [tail, 100 - tail]) if boots.size else (np.nan, np.nan))
    return float(stat(x)), float(low), float(high)


def paired_auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """AUROC of the two-alternative choice: P(positive_i > negative_i) over pairs i, ties counting 1/2.

    The right statistic when each negative is built from the same item as its positive (the same prompt with a
    wrong continuation): prompt-to-prompt variation then cannot hide or fake a preference.

    Example:
        >>> paired_auroc([2.0, 1.0, 3.0], [1.0, 1.0, 4.0])  # win, tie, loss
        0.5
    """
    pos, neg = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    if pos.shape != neg.shape or pos.size == 0:
        raise ValueError(f"paired_auroc: expected two non-empty arrays of one length, got {pos.size} and {neg.size}")
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def bootstrap_auroc(
    positive: Sequence[float],
    negative: Sequence[float],
    *,
    paired: bool = True,
    num_samples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """:func:`paired_auroc` (default) or the pooled :func:`auroc`, with a percentile bootstrap interval; positives
    and negatives are paired by index (item i's real continuation and item i's negative), so items are resampled
    as pairs either way.

    Example:
        >>> bootstrap_auroc([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])[0]
        1.0
    """
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if pos.shape != neg.shape or pos.ndim != 1:
        raise ValueError(f"bootstrap_auroc: expected two 1-D arrays of one shape, got {pos.shape} and {neg.shape}")
    pairs = np.stack([pos, neg], axis=1)
    stat = paired_auroc if paired else auroc
    return bootstrap_ci(pairs, lambda a: stat(a[:, 0], a[:, 1]), num_samples=num_samples, level=level, seed=seed)
