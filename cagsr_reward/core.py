r"""The functional core of the CAGSR reward: coverage, focus, repetition, entropy floor and returns (numpy only).

Every formula is the one in method.md ("One turn's reward", "Episodes"); each function's docstring states it.
Inputs are validated and every error is a `ValueError` whose message starts with the name of the bad argument.

Conventions shared by the attention functions:

* ``attn`` is one turn's *raw* history block, shape ``(T, P)``: row ``s`` is the attention of the query that
  produced generated token ``y_s`` over history positions ``0..P-1``, not yet renormalised (rows usually sum to
  less than 1 because part of the mass goes to earlier generated tokens).
* ``sink`` leading columns are dropped, then every row is renormalised over the remaining (kept) columns:
  $\tilde a_{s,i} = a_{s,i} / \sum_{j \ge \text{sink}} a_{s,j}$. A row with no kept mass is an error.
* ``salient`` holds original column indices (history positions). Duplicates count once (S is a set), positions
  below ``sink`` are ignored (sinks are never salient), negative positions or positions ``>= P`` raise.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = [
    "coverage",
    "entropy_floor",
    "focus",
    "grounding",
    "history_repetition",
    "renormalise",
    "repetition",
    "returns",
    "row_entropy",
]


# --------------------------------------------------------------------------------------------------------------
# validation (shared with aggregate.py and scoring.py)
# --------------------------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_sink(sink: Any, num_columns: int | None = None) -> int:
    if not _is_int(sink) or sink < 0:
        raise ValueError(f"sink: expected an int >= 0, got {sink!r}")
    sink = int(sink)
    if num_columns is not None and sink >= num_columns:
        raise ValueError(
            f"sink: {sink} sink column(s) leave no history column (the block has {num_columns} column(s))"
        )
    return sink


def _check_attn(attn: Any, name: str = "attn") -> np.ndarray:
    """2-D, non-empty, finite, non-negative array; float32 stays float32 (the capture dtype), else float64."""
    try:
        a = np.asarray(attn)
        if np.iscomplexobj(a):
            raise TypeError(f"complex dtype {a.dtype}")
        if a.dtype != np.float32:
            a = a.astype(np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a 2-D array of attention weights ({exc})") from None
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (T, P) array, got {a.ndim}-D with shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one row and one column, got shape {a.shape}")
    # Fast path, two passes: `a >= 0` fails on negatives and NaN; a finite float64 row sum rules out +inf.
    with np.errstate(over="ignore"):  # an overflowing row sum is reported below, not warned about
        sums_finite = np.isfinite(a.sum(axis=1, dtype=np.float64)).all()
    if not (a >= 0).all() or not sums_finite:
        bad = ~np.isfinite(a)
        if bad.any():
            s, i = np.argwhere(bad)[0]
            raise ValueError(f"{name}: non-finite value {a[s, i]} at row {s}, column {i}")
        if (a < 0).any():
            s, i = np.argwhere(a < 0)[0]
            raise ValueError(f"{name}: negative value {a[s, i]} at row {s}, column {i}")
        raise ValueError(f"{name}: row sums overflow float64")
    return a


def _kept_mass(a: np.ndarray, sink: int, name: str = "attn") -> np.ndarray:
    """Row sums over the kept columns, (T,); raises on a row with no kept mass."""
    z = a[:, sink:].sum(axis=1, dtype=np.float64)
    empty = np.flatnonzero(z <= 0.0)
    if empty.size:
        raise ValueError(
            f"{name}: row {empty[0]} has no history mass after dropping {sink} sink column(s)"
        )
    return z


def _check_positions(salient: Any, num_columns: int, name: str = "salient") -> np.ndarray:
    """Sorted unique int64 positions, each in [0, num_columns)."""
    if salient is None:
        return np.zeros(0, dtype=np.int64)
    s = np.asarray(salient)
    if s.size == 0:
        return np.zeros(0, dtype=np.int64)
    if s.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of positions, got shape {s.shape}")
    if s.dtype == bool or not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"{name}: expected integer positions, got dtype {s.dtype}")
    s = np.unique(s.astype(np.int64))
    if s[0] < 0 or s[-1] >= num_columns:
        bad = s[0] if s[0] < 0 else s[-1]
        raise ValueError(f"{name}: position {bad} out of range for a history of {num_columns} position(s)")
    return s


def _check_ids(ids: Any, name: str) -> np.ndarray:
    """1-D int64 token ids (an empty sequence is allowed)."""
    a = np.asarray(ids)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of token ids, got shape {a.shape}")
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}: expected integer token ids, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _check_n(n: Any) -> int:
    if not _is_int(n) or n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    return int(n)


def _check_floor(floor: Any) -> float | None:
    if floor is None:
        return None
    if isinstance(floor, bool) or not isinstance(floor, numbers.Real) or not math.isfinite(floor) or floor < 0:
        raise ValueError(f"floor: expected None or a finite float >= 0, got {floor!r}")
    return float(floor)


# --------------------------------------------------------------------------------------------------------------
# unchecked kernels (inputs already validated); score_turn calls these directly to validate once
# --------------------------------------------------------------------------------------------------------------
# Renormalised probabilities below this have p ln p replaced by p ln(_TINY): an absolute error under _TINY/e
# per entry (< 4e-31 nats), which keeps exact zeros at 0 (0 ln 0 = 0) without a mask and the log off its slow
# subnormal path.
_TINY = 1e-30


def _entropy_from(a: np.ndarray, z: np.ndarray, sink: int) -> np.ndarray:
    # h_s = -sum_i p_i ln p_i with p = a_{s,i} / Z_s over the kept columns (0 ln 0 = 0).
    kept = a[:, sink:] if sink else a
    if kept.dtype == np.float32 and z.min() >= _TINY:
        # float32 capture: divide and take the log in float32 (SIMD, ~1e-7 relative), accumulate in float64.
        p = kept / z.astype(np.float32)[:, None]
    else:
        p = kept.astype(np.float64, copy=False) / z[:, None]
    xlogx = np.log(np.maximum(p, p.dtype.type(_TINY)))
    xlogx *= p
    return np.maximum(-xlogx.sum(axis=1, dtype=np.float64), 0.0)  # -0.0 / -1e-17 on a one-hot row


def _coverage_from(a: np.ndarray, z: np.ndarray, positions: np.ndarray) -> float:
    # C = (1/T) sum_s sum_{i in S} a_{s,i} / Z_s
    if positions.size == 0:
        return 0.0
    return float(np.mean(a[:, positions].sum(axis=1, dtype=np.float64) / z))


def _drop_sinks(positions: np.ndarray, sink: int) -> np.ndarray:
    return positions[positions >= sink] if sink else positions


def _ngram_keys(n: int, *seqs: np.ndarray) -> list[np.ndarray]:
    """Exact int64 key of every n-gram of each sequence: equal keys <=> equal n-grams, across all `seqs`."""
    sizes = [max(s.size - n + 1, 0) for s in seqs]
    nonempty = [s for s in seqs if s.size]
    if not any(sizes):
        return [np.zeros(0, dtype=np.int64) for _ in seqs]
    lo = min(int(s.min()) for s in nonempty)
    hi = max(int(s.max()) for s in nonempty)
    bits = 62 // n
    if lo >= 0 and hi < (1 << bits):
        # Pack the n ids into one int64 (`bits` bits each): exact, no hashing. Holds for n = 3 and any vocabulary
        # below 2^20 ids, i.e. every real tokenizer.
        return [_pack(s, n, m, bits) for s, m in zip(seqs, sizes)]
    # Rank-compress the ids first (vocabulary of these sequences only), then pack if that fits.
    vocab, ranks = np.unique(np.concatenate(nonempty), return_inverse=True)
    bits = max(int(vocab.size - 1).bit_length(), 1)
    if bits * n <= 62:
        out, offset = [], 0
        for s, m in zip(seqs, sizes):
            out.append(_pack(ranks[offset : offset + s.size], n, m, bits))
            offset += s.size
        return out
    # Long n-grams over a large vocabulary: label the n-gram rows with np.unique (exact, slower).
    windows = [np.lib.stride_tricks.sliding_window_view(s, n) for s, m in zip(seqs, sizes) if m]
    _, labels = np.unique(np.concatenate(windows, axis=0), axis=0, return_inverse=True)
    labels = labels.reshape(-1).astype(np.int64)
    out, offset = [], 0
    for m in sizes:
        out.append(labels[offset : offset + m])
        offset += m
    return out


def _pack(ids: np.ndarray, n: int, m: int, bits: int) -> np.ndarray:
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    ids = ids.astype(np.int64, copy=False)
    key = ids[:m].copy()
    for j in range(1, n):
        key <<= bits
        key |= ids[j : j + m]
    return key


def _self_repetition(ids: np.ndarray, n: int) -> float:
    m = ids.size - n + 1
    if m <= 0:
        return 0.0
    (keys,) = _ngram_keys(n, ids)
    keys.sort()
    distinct = 1 + int(np.count_nonzero(keys[1:] != keys[:-1]))
    return (m - distinct) / m


def _repetition_after(ids: np.ndarray, before: np.ndarray, n: int) -> float:
    """Self repetition of `ids` continuing `before` (earlier tokens of the same reply, e.g. a chain of thought's
    earlier blocks): the share of the n-grams that end inside `ids` and repeat an n-gram that starts earlier in
    ``before + ids``. With empty `before` this is `_self_repetition`, ``(m - distinct) / m``."""
    if before.size == 0:
        return _self_repetition(ids, n)
    seq = np.concatenate([before, ids])
    total = seq.size - n + 1
    first = max(before.size - n + 1, 0)  # first n-gram that ends inside ids
    if total - first <= 0:
        return 0.0
    (keys,) = _ngram_keys(n, seq)
    _, first_at, inverse = np.unique(keys, return_index=True, return_inverse=True)
    repeat = first_at[inverse.reshape(-1)] < np.arange(total)
    return float(np.count_nonzero(repeat[first:])) / (total - first)


def _history_repetition(ids: np.ndarray, history: np.ndarray, n: int) -> float:
    m = ids.size - n + 1
    if m <= 0:
        return 0.0
    if history.size < n:
        return 0.0
    resp, hist = _ngram_keys(n, ids, history)
    hist.sort()
    at = np.minimum(np.searchsorted(hist, resp), hist.size - 1)
    return float(np.count_nonzero(hist[at] == resp)) / m


# --------------------------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------------------------
def renormalise(attn: Any, sink: int = 0) -> np.ndarray:
    r"""
    Drop the sink columns and renormalise each row of a raw history block over the remaining columns:

    $$
    \tilde a_{s,i} = \frac{a_{s,i}}{\sum_{j \ge \text{sink}} a_{s,j}} \quad (i \ge \text{sink}), \qquad
    \tilde a_{s,i} = 0 \quad (i < \text{sink}).
    $$

    The result keeps the shape ``(T, P)`` (sink columns are zero) so column ``i`` is still history position ``i``.

    Args:
        attn (`np.ndarray` of shape `(T, P)`):
            Raw history block: non-negative, finite; each row needs some mass outside the sink columns.
        sink (`int`, *optional*, defaults to `0`):
            Number of leading columns to drop.

    Returns:
        `np.ndarray` of shape `(T, P)`, float64: rows sum to 1 over columns ``sink..P-1``.

    Example:
    ```python
    >>> import numpy as np
    >>> renormalise(np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]), sink=1).round(4).tolist()
    [[0.0, 0.6, 0.4], [0.0, 0.6667, 0.3333]]

    ```
    """
    a = _check_attn(attn)
    sink = _check_sink(sink, a.shape[1])
    z = _kept_mass(a, sink)
    out = a / z[:, None]
    out[:, :sink] = 0.0
    return out


def row_entropy(attn: Any, sink: int = 0) -> np.ndarray:
    r"""
    Entropy (nats) of each renormalised row, with $0 \ln 0 = 0$:

    $$
    h_s = -\sum_{i \ge \text{sink}} \tilde a_{s,i} \ln \tilde a_{s,i}.
    $$

    Args:
        attn (`np.ndarray` of shape `(T, P)`):
            Raw history block (see `renormalise`).
        sink (`int`, *optional*, defaults to `0`):
            Number of leading columns to drop before renormalising.

    Returns:
        `np.ndarray` of shape `(T,)`, float64, each in $[0, \ln(P - \text{sink})]$.

    Example:
    ```python
    >>> import numpy as np
    >>> row_entropy(np.array([[0.25, 0.25, 0.0], [0.0, 0.0, 0.7]])).round(4).tolist()
    [0.6931, 0.0]

    ```
    """
    a = _check_attn(attn)
    sink = _check_sink(sink, a.shape[1])
    z = _kept_mass(a, sink)
    return _entropy_from(a, z, sink)


def coverage(attn: Any, salient: Any, *, sink: int = 0) -> float:
    r"""
    Coverage: the mean renormalised attention mass on the salient history positions $S$ (method.md):

    $$
    C = \frac{1}{T} \sum_{s=0}^{T-1} \sum_{i \in S} \tilde a_{s,i}.
    $$

    $S$ is a set (duplicates count once); positions below `sink` are ignored because sinks are never salient.

    Args:
        attn (`np.ndarray` of shape `(T, P)`):
            Raw history block (see `renormalise`).
        salient (sequence of `int`):
            Salient history positions (original column indices), each in ``[0, P)``. May be empty (then ``C = 0``).
        sink (`int`, *optional*, defaults to `0`):
            Number of leading columns to drop before renormalising.

    Returns:
        `float` in $[0, 1]$.

    Example:
    ```python
    >>> import numpy as np
    >>> attn = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    >>> round(coverage(attn, [1]), 4)  # (0.3 + 0.6) / 2
    0.45
    >>> round(coverage(attn, [0, 1], sink=1), 4)  # position 0 is a sink; (0.3/0.5 + 0.6/0.9) / 2
    0.6333

    ```
    """
    a = _check_attn(attn)
    sink = _check_sink(sink, a.shape[1])
    positions = _drop_sinks(_check_positions(salient, a.shape[1]), sink)
    z = _kept_mass(a, sink)
    return _coverage_from(a, z, positions)


def focus(attn: Any, *, floor: float | None = None, sink: int = 0) -> float:
    r"""
    Focus: the negative mean row entropy, each entropy clamped from below by the floor when one is given
    (MTC §5.2, method.md):

    $$
    F = -\frac{1}{T} \sum_{s=0}^{T-1} \tilde h_s, \qquad \tilde h_s = \max(h_s, H_{\min}) \text{ (or } h_s
    \text{ with no floor)}.
    $$

    Args:
        attn (`np.ndarray` of shape `(T, P)`):
            Raw history block (see `renormalise`).
        floor (`float` or `None`, *optional*, defaults to `None`):
            Entropy floor $H_{\min}$ in nats (see `entropy_floor`); `None` disables clamping.
        sink (`int`, *optional*, defaults to `0`):
            Number of leading columns to drop before renormalising.

    Returns:
        `float` in $[-\ln(P - \text{sink}), 0]$ (or $\le -H_{\min}$ with a floor).

    Example:
    ```python
    >>> import numpy as np
    >>> attn = np.array([[0.25, 0.25, 0.0], [0.0, 0.0, 0.7]])  # entropies ln 2 and 0
    >>> round(focus(attn), 4)  # -(0.6931 + 0) / 2
    -0.3466
    >>> round(focus(attn, floor=0.5), 4)  # -(0.6931 + 0.5) / 2
    -0.5966

    ```
    """
    floor = _check_floor(floor)
    a = _check_attn(attn)
    sink = _check_sink(sink, a.shape[1])
    z = _kept_mass(a, sink)
    h = _entropy_from(a, z, sink)
    if floor is not None:
        h = np.maximum(h, floor)
    return -float(np.mean(h))


def repetition(response_ids: Any, n: int = 3) -> float:
    r"""
    Self repetition (CAGSR): the fraction of the response's n-grams that repeat an earlier one,

    $$
    \mathrm{rep}(y) = \frac{m - \#\{\text{distinct } n\text{-grams of } y\}}{m}, \qquad m = T - n + 1,
    $$

    and ``0`` when $m \le 0$.

    Args:
        response_ids (sequence of `int`):
            Generated token ids, 1-D.
        n (`int`, *optional*, defaults to `3`):
            n-gram size, ``>= 1``.

    Returns:
        `float` in $[0, 1)$.

    Example:
    ```python
    >>> repetition([5, 6, 5, 6, 5, 6], n=2)  # 5 bigrams, 2 distinct
    0.6
    >>> repetition([1, 2], n=3)
    0.0

    ```
    """
    n = _check_n(n)
    ids = _check_ids(response_ids, "response_ids")
    return float(_self_repetition(ids, n))


def history_repetition(response_ids: Any, history_ids: Any, n: int = 3) -> float:
    r"""
    History repetition (MTC §3): the fraction of the response's n-grams, counted with multiplicity, that occur
    anywhere in the history,

    $$
    \mathrm{rep}_h(y, H) = \frac{\#\{k < m : (y_k, \dots, y_{k+n-1}) \in \text{ngrams}_n(H)\}}{m},
    \qquad m = T - n + 1,
    $$

    and ``0`` when $m \le 0$.

    Args:
        response_ids (sequence of `int`):
            Generated token ids, 1-D.
        history_ids (sequence of `int`):
            Token ids of the whole history (prompt / earlier turns), 1-D.
        n (`int`, *optional*, defaults to `3`):
            n-gram size, ``>= 1``.

    Returns:
        `float` in $[0, 1]$.

    Example:
    ```python
    >>> history_repetition([1, 2, 3, 9, 1, 2, 3], [0, 1, 2, 3], n=3)  # (1,2,3) twice out of 5 trigrams
    0.4

    ```
    """
    n = _check_n(n)
    ids = _check_ids(response_ids, "response_ids")
    history = _check_ids(history_ids, "history_ids")
    return float(_history_repetition(ids, history, n))


def grounding(logprobs: Any, prior_logprobs: Any, *, prior_tokens: float = 0.0, reply_tokens: int | None = None) -> float:
    r"""
    Grounding of a reply in its history: its pointwise mutual information with the history under the scoring
    model, per token, with $T_0$ pseudo-tokens of zero information added to the mean (docs/method.md §2),

    $$
    G = \frac{1}{T + T_0} \sum_{s=1}^{T} \left[\log p(y_s \mid h, y_{<s}) - \log p(y_s \mid \varnothing,
    y_{<s})\right],
    $$

    where $h$ is the history (the chat prompt) and $\varnothing$ an empty conversation (only the assistant header of
    the chat template). $G > 0$: the history makes the reply more likely than it is on its own; a reply that would
    fit any conversation scores near 0, one that fits another conversation below 0. With $T_0 = 0$, $G$ is the mean
    per-token PMI, which is largest at a reply's first tokens (where the history says the most), so a reply cut short
    scores higher than the whole; $T_0 > 0$ shrinks a short reply's mean towards 0, and as $T_0$ grows $G$ tends to
    the whole reply's PMI over $T_0$.

    Args:
        logprobs (sequence of `float`):
            $\log p(y_s \mid h, y_{<s})$, one per token of the span scored, finite, ``<= 0`` up to rounding.
        prior_logprobs (sequence of `float`):
            $\log p(y_s \mid \varnothing, y_{<s})$, same length.
        prior_tokens (`float`, defaults to `0.0`): $T_0 \geq 0$.
        reply_tokens (`int`, *optional*): $T$, when the span is part of a longer reply (a chain of thought's block):
            $G$ is then the span's mean PMI times $T / (T + T_0)$, so that the blocks of one reply share its
            shrinkage. Defaults to the span's length.

    Returns:
        `float`: $G$, in nats per token.

    Example:
    ```python
    >>> grounding([-1.0, -0.5], [-3.0, -0.5])  # the history makes the first token e^2 times more likely
    1.0
    >>> grounding([-1.0, -0.5], [-3.0, -0.5], prior_tokens=2.0)  # 2 nats over 2 + 2 tokens
    0.5

    ```
    """
    lp = _check_vector(logprobs, "logprobs")
    lp0 = _check_vector(prior_logprobs, "prior_logprobs")
    if lp.size == 0:
        raise ValueError("logprobs: expected at least one reply token")
    if lp0.shape != lp.shape:
        raise ValueError(f"prior_logprobs: length {lp0.size} != length of logprobs {lp.size}")
    for name, v in (("logprobs", lp), ("prior_logprobs", lp0)):
        if (v > 1e-3).any():
            raise ValueError(f"{name}: expected log-probabilities (<= 0), got {float(v.max())}")
    if not _is_real(prior_tokens) or not math.isfinite(prior_tokens) or prior_tokens < 0:
        raise ValueError(f"prior_tokens: expected a finite float >= 0, got {prior_tokens!r}")
    total = lp.size if reply_tokens is None else reply_tokens
    if not _is_int(total) or total < lp.size:
        raise ValueError(f"reply_tokens: expected an int >= the span's length {lp.size}, got {reply_tokens!r}")
    return float(np.mean(lp - lp0) * (total / (total + float(prior_tokens))))


def entropy_floor(turn_index: int, h0: float, kappa: float) -> float:
    r"""
    Turn-indexed entropy floor (MTC §5.2): $H_{\min}(t) = H_0 + \kappa\, t$, with $t = 0$ for the first turn.

    Args:
        turn_index (`int`):
            Turn index $t \ge 0$.
        h0 (`float`):
            Floor at turn 0, nats, finite and ``>= 0``.
        kappa (`float`):
            Increase per turn, nats, finite and ``>= 0``.

    Returns:
        `float`: the floor in nats.

    Example:
    ```python
    >>> entropy_floor(2, h0=0.5, kappa=0.25)
    1.0

    ```
    """
    if not _is_int(turn_index) or turn_index < 0:
        raise ValueError(f"turn_index: expected an int >= 0, got {turn_index!r}")
    for name, value in (("h0", h0), ("kappa", kappa)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: expected a finite float >= 0, got {value!r}")
    return float(h0) + float(kappa) * int(turn_index)


def returns(turn_rewards: Any, weights: Any = None, discount: float = 1.0) -> np.ndarray:
    r"""
    Weighted, discounted return-to-go of every turn (MTC §4, method.md "Episodes"):

    $$
    G_t = \sum_{k \ge t} \delta^{\,k-t}\, w_k R_k,
    $$

    so $G_0$ with $\delta = 1$ is the cumulative reward $R = \sum_t w_t R_t$.

    Args:
        turn_rewards (sequence of `float`):
            Per-turn rewards $R_t$, 1-D, finite.
        weights (sequence of `float` or `None`, *optional*, defaults to `None`):
            Turn weights $w_t \ge 0$, same length as `turn_rewards`; `None` means all ones.
        discount (`float`, *optional*, defaults to `1.0`):
            $\delta \in [0, 1]$.

    Returns:
        `np.ndarray` of shape `(num_turns,)`, float64.

    Example:
    ```python
    >>> returns([1.0, 2.0, 3.0]).tolist()
    [6.0, 5.0, 3.0]
    >>> returns([1.0, 2.0, 3.0], weights=[1, 1, 2], discount=0.5).tolist()  # 1 + 0.5*2 + 0.25*6
    [3.5, 5.0, 6.0]

    ```
    """
    r = _check_vector(turn_rewards, "turn_rewards")
    if weights is None:
        w = np.ones_like(r)
    else:
        w = _check_vector(weights, "weights")
        if w.shape != r.shape:
            raise ValueError(f"weights: length {w.size} != number of turn rewards {r.size}")
        if (w < 0).any():
            raise ValueError(f"weights: expected weights >= 0, got {w[w < 0][0]}")
    if isinstance(discount, bool) or not isinstance(discount, numbers.Real) or not (0.0 <= discount <= 1.0):
        raise ValueError(f"discount: expected a float in [0, 1], got {discount!r}")
    weighted = w * r
    out = np.empty_like(weighted)
    acc = 0.0
    for t in range(weighted.size - 1, -1, -1):  # a handful of turns: a plain loop is the clearest form
        acc = weighted[t] + float(discount) * acc
        out[t] = acc
    return out


def _check_vector(values: Any, name: str) -> np.ndarray:
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers ({exc})") from None
    if v.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name}: non-finite value at index {int(np.flatnonzero(~np.isfinite(v))[0])}")
    return v

