r"""Statistics and probes of the reward-validity protocol (numpy only).

A score (the CAGSR reward, or a baseline) is *valid* on an item when it ranks the item's real reply above a wrong
one. This module holds what that test needs and nothing model-specific:

- :func:`paired_auroc`: for items $i = 1..n$ with real score $x_i$ and negative scores $y_{i,1..k}$,
  $\mathrm{AUROC} = \frac1n \sum_i \frac1k \sum_j \big(\mathbb 1[x_i > y_{ij}] + \tfrac12 \mathbb 1[x_i = y_{ij}]\big)$:
  the probability that, for the same history, the real reply scores above a wrong one (0.5 = no signal).
- :func:`cluster_bootstrap`: a percentile interval that resamples *clusters* (dialogues), not items, because items
  of one dialogue share their history and are not independent.
- probe builders on token ids: :func:`loop_probe`, :func:`pad_probe`, :func:`shuffled_probe`,
  :func:`answer_first_probe`, and :func:`other_dialogue_index` (whose reply is item i's "another dialogue's reply").

Example:
    >>> paired_auroc([3.0, 1.0, 2.0], [[1.0, 2.0], [0.0, 1.0], [5.0, 0.0]])  # (1 + 0.75 + 0.5) / 3
    0.75
    >>> loop_probe([5, 6, 7, 8, 9, 10, 11, 12], prefix=3)
    [5, 6, 7, 5, 6, 7, 5, 6]
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "answer_first_probe",
    "calibrate_entropy_floor",
    "cluster_bootstrap",
    "loop_probe",
    "other_dialogue_index",
    "pad_probe",
    "paired_auroc",
    "paired_auroc_ci",
    "shuffled_probe",
    "win_rate",
]


def _ids(ids: Any, name: str) -> list[int]:
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of token ids, got {ids!r}")
    return [int(v) for v in arr]


def _pair(positive: Any, negative: Any) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    if pos.ndim != 1 or pos.size == 0:
        raise ValueError(f"positive: expected a non-empty 1-D array, got shape {pos.shape}")
    if neg.ndim == 1:
        neg = neg[:, None]
    if neg.ndim != 2 or neg.shape[0] != pos.size or neg.shape[1] == 0:
        raise ValueError(f"negative: expected shape ({pos.size},) or ({pos.size}, k), got {np.shape(negative)}")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("positive, negative: scores must be finite")
    return pos, neg


def _item_wins(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Per item: mean over its negatives of 1[x > y] + 1/2 1[x = y]."""
    return ((pos[:, None] > neg) + 0.5 * (pos[:, None] == neg)).mean(axis=1)


def paired_auroc(positive: Any, negative: Any) -> float:
    r"""Paired AUROC of real vs negative scores (see the module docstring); ties count 1/2.

    Args:
        positive (`array (n,)`): the real reply's score per item.
        negative (`array (n,)` or `(n, k)`): each item's negative score(s).

    Example:
        >>> paired_auroc([1.0, 2.0], [0.0, 2.0])
        0.75
    """
    pos, neg = _pair(positive, negative)
    return float(_item_wins(pos, neg).mean())


def win_rate(positive: Any, negative: Any) -> float:
    """Fraction of (item, negative) pairs where the real reply scores strictly higher (ties count 0).

    Example:
        >>> win_rate([1.0, 2.0], [0.0, 2.0])
        0.5
    """
    pos, neg = _pair(positive, negative)
    return float((pos[:, None] > neg).mean())


def _check_level(level: float, num_samples: int) -> None:
    if not isinstance(level, numbers.Real) or not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a float in (0, 1), got {level!r}")
    if not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")


def cluster_bootstrap(
    values: Any,
    clusters: Sequence[Any],
    statistic: Callable[[np.ndarray], float] = lambda v: float(np.mean(v)),
    *,
    num_samples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    r"""``(estimate, low, high)``: `statistic` of the items, and a percentile interval from resampling clusters.

    Each bootstrap sample draws as many clusters as there are, with replacement, and takes *all* items of every drawn
    cluster (a cluster drawn twice contributes its items twice); `statistic` is applied to the rows of `values` so
    gathered. With one item per cluster this is the ordinary bootstrap over items.

    Args:
        values (`array (n, ...)`): one row per item.
        clusters (sequence of hashables, length n): the cluster (dialogue) of each item.
        statistic (`callable`, defaults to the mean): maps an array of rows to a float.
        num_samples (`int`, defaults to 2000), level (`float`, defaults to 0.95), seed (`int`, defaults to 0).

    Example:
        >>> est, lo, hi = cluster_bootstrap([1.0, 1.0, 0.0, 0.0], ["a", "a", "b", "b"], num_samples=200)
        >>> est, lo, hi  # two clusters: a sample holds a, b or both
        (0.5, 0.0, 1.0)
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 0 or v.shape[0] == 0:
        raise ValueError("values: expected at least one item")
    if len(clusters) != v.shape[0]:
        raise ValueError(f"clusters: expected one cluster per item ({v.shape[0]}), got {len(clusters)}")
    _check_level(level, num_samples)
    labels: dict[Any, list[int]] = {}
    for i, c in enumerate(clusters):
        labels.setdefault(c, []).append(i)
    groups = [np.asarray(ix, dtype=np.int64) for ix in labels.values()]
    estimate = float(statistic(v))
    rng = np.random.default_rng(seed)
    stats = np.empty(num_samples)
    for b in range(num_samples):
        drawn = rng.integers(len(groups), size=len(groups))
        stats[b] = statistic(v[np.concatenate([groups[g] for g in drawn])])
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return estimate, float(low), float(high)


def paired_auroc_ci(
    positive: Any, negative: Any, clusters: Sequence[Any], *, num_samples: int = 2000, level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """:func:`paired_auroc` with a :func:`cluster_bootstrap` interval (items resampled with their dialogue).

    Example:
        >>> paired_auroc_ci([2.0, 3.0, 1.0], [1.0, 1.0, 2.0], ["a", "b", "c"], num_samples=100)[0]
        0.6666666666666666
    """
    pos, neg = _pair(positive, negative)
    wins = _item_wins(pos, neg)
    return cluster_bootstrap(wins, clusters, num_samples=num_samples, level=level, seed=seed)


def calibrate_entropy_floor(
    entropies: Any, turn_indices: Any, *, quantile: float = 0.1
) -> tuple[float, float]:
    r"""$(H_0, \kappa)$ of the floor $H_{\min}(t) = H_0 + \kappa t$ (MTC §5.2) from observed attention entropies.

    Per turn index $t$, the `quantile`-quantile $q_t$ of the entropies seen at that turn; then the least-squares line
    $q_t \approx H_0 + \kappa t$ over the observed turns, weighted by how many entropies each turn has, with
    $\kappa$ clipped at 0 (the papers' floor never falls) and $H_0$ refitted as the weighted mean of
    $q_t - \kappa t$. With one observed turn, $\kappa = 0$ and $H_0 = q_t - 0$. So the floor binds for about a
    `quantile` share of typical replies at every turn: it stops collapse without flattening every reply's focus.

    Args:
        entropies (`array (n,)`): mean row entropies (nats) of real replies, e.g. `TurnScore.mean_entropy`.
        turn_indices (`array (n,)` of int): the dialogue turn of each.
        quantile (`float`, defaults to 0.1).

    Returns:
        `(h0, kappa)`, both ``>= 0``.

    Example:
        >>> h0, kappa = calibrate_entropy_floor([1.0, 2.0, 3.0, 1.5, 2.5, 3.5], [0, 0, 0, 1, 1, 1], quantile=0.5)
        >>> round(h0, 3), round(kappa, 3)
        (2.0, 0.5)
    """
    h = np.asarray(entropies, dtype=np.float64)
    t = np.asarray(turn_indices)
    if h.ndim != 1 or h.size == 0 or t.shape != h.shape or not np.isfinite(h).all():
        raise ValueError("entropies, turn_indices: expected two 1-D arrays of one non-zero length, finite entropies")
    if not np.issubdtype(t.dtype, np.integer) or (t < 0).any():
        raise ValueError("turn_indices: expected ints >= 0")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile: expected a float in [0, 1], got {quantile!r}")
    turns = np.unique(t)
    q = np.array([np.quantile(h[t == u], quantile) for u in turns])
    w = np.array([np.count_nonzero(t == u) for u in turns], dtype=np.float64)
    kappa = 0.0
    if turns.size > 1:
        tm = np.average(turns, weights=w)
        qm = np.average(q, weights=w)
        kappa = max(float(np.sum(w * (turns - tm) * (q - qm)) / np.sum(w * (turns - tm) ** 2)), 0.0)
    h0 = max(float(np.average(q - kappa * turns, weights=w)), 0.0)
    return h0, kappa


# ----------------------------------------------------------------------------------------------------------------
# probes on token ids
# ----------------------------------------------------------------------------------------------------------------
def loop_probe(ids: Any, *, prefix: int = 6) -> list[int]:
    """The reply's first `prefix` tokens repeated until the reply's length: a degenerate loop of the same length.

    Example:
        >>> loop_probe([1, 2, 3, 4, 5], prefix=2)
        [1, 2, 1, 2, 1]
    """
    seq = _ids(ids, "ids")
    if not isinstance(prefix, numbers.Integral) or isinstance(prefix, bool) or prefix < 1:
        raise ValueError(f"prefix: expected an int >= 1, got {prefix!r}")
    if len(seq) <= prefix:
        raise ValueError(f"ids: a loop of the first {prefix} tokens needs a longer reply, got {len(seq)} token(s)")
    head = seq[:prefix]
    return [head[i % prefix] for i in range(len(seq))]


def pad_probe(ids: Any, pool: Any, *, offset: int = 0, length: int | None = None) -> list[int]:
    """The reply followed by `length` (default: the reply's length) tokens of unrelated text, read from `pool`
    starting at `offset` (wrapping around).

    Example:
        >>> pad_probe([1, 2, 3], [7, 8, 9, 10], offset=3)
        [1, 2, 3, 10, 7, 8]
    """
    seq = _ids(ids, "ids")
    text = _ids(pool, "pool")
    n = len(seq) if length is None else length
    if not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"length: expected an int >= 1, got {length!r}")
    return seq + [text[(offset + i) % len(text)] for i in range(int(n))]


def shuffled_probe(ids: Any, *, seed: int = 0) -> list[int]:
    """The reply's tokens in a random order (same multiset, no syntax); differs from the reply unless all its tokens
    are equal.

    Example:
        >>> sorted(shuffled_probe([4, 1, 3, 2], seed=1)) == [1, 2, 3, 4]
        True
    """
    seq = _ids(ids, "ids")
    if len(set(seq)) < 2:
        return list(seq)
    rng = np.random.default_rng(seed)
    while True:
        out = [seq[int(i)] for i in rng.permutation(len(seq))]
        if out != seq:
            return out


def answer_first_probe(ids: Any, answer_ids: Any) -> list[int]:
    """A chain of thought with its final answer statement moved to the front: the last occurrence of `answer_ids`
    in `ids` is cut out and put first (same tokens, same length).

    Example:
        >>> answer_first_probe([1, 2, 3, 8, 9], [8, 9])
        [8, 9, 1, 2, 3]
    """
    seq = _ids(ids, "ids")
    ans = _ids(answer_ids, "answer_ids")
    for start in range(len(seq) - len(ans), -1, -1):
        if seq[start : start + len(ans)] == ans:
            return ans + seq[:start] + seq[start + len(ans) :]
    raise ValueError("answer_ids: the answer statement does not occur in ids")


def other_dialogue_index(clusters: Sequence[Any], texts: Sequence[str], *, seed: int = 0) -> list[int]:
    """For each item i an index j whose reply serves as "another dialogue's reply": ``clusters[j] != clusters[i]``
    and ``texts[j] != texts[i]`` (so a corpus that repeats replies cannot hand an item its own reply). A random
    permutation satisfying both, drawn with `seed`.

    Example:
        >>> other_dialogue_index(["a", "b", "c"], ["x", "y", "z"], seed=0) != [0, 1, 2]
        True
    """
    n = len(clusters)
    if len(texts) != n or n < 2:
        raise ValueError(f"clusters, texts: expected two sequences of one length >= 2, got {n} and {len(texts)}")
    rng = np.random.default_rng(seed)
    for _ in range(2000):
        perm = [int(p) for p in rng.permutation(n)]
        if all(clusters[p] != clusters[i] and texts[p] != texts[i] for i, p in enumerate(perm)):
            return perm
    # Random permutations rarely satisfy the constraint when one reply text dominates: pick per item instead.
    out = []
    for i in range(n):
        ok = [j for j in range(n) if clusters[j] != clusters[i] and texts[j] != texts[i]]
        if not ok:
            raise ValueError(f"clusters, texts: item {i} has no item of another dialogue with a different reply")
        out.append(int(ok[int(rng.integers(len(ok)))]))
    return out
