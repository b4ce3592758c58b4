"""Straightforward reference implementations of method.md, in plain Python loops over lists of floats.

They share no code with `cagsr_reward`: every formula is re-derived from method.md so that a test comparing the
two catches a mistake in either. Imported by the tests of this directory (pytest puts it on sys.path).
"""

from __future__ import annotations

import math


def ref_renormalise(rows, sink):
    out = []
    for row in rows:
        z = sum(float(v) for v in row[sink:])
        out.append([0.0] * sink + [float(v) / z for v in row[sink:]])
    return out


def ref_entropy(rows, sink):
    hs = []
    for row in ref_renormalise(rows, sink):
        h = 0.0
        for p in row[sink:]:
            if p > 0.0:
                h -= p * math.log(p)
        hs.append(h)
    return hs


def ref_coverage(rows, salient, sink):
    salient_set = {int(i) for i in salient if int(i) >= sink}
    total = 0.0
    for row in ref_renormalise(rows, sink):
        total += sum(row[i] for i in salient_set)
    return total / len(rows)


def ref_focus(rows, sink, floor=None):
    hs = ref_entropy(rows, sink)
    if floor is not None:
        hs = [max(h, floor) for h in hs]
    return -sum(hs) / len(hs)


def ref_ngrams(ids, n):
    ids = [int(v) for v in ids]
    return [tuple(ids[k : k + n]) for k in range(len(ids) - n + 1)]


def ref_repetition(ids, n):
    grams = ref_ngrams(ids, n)
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def ref_history_repetition(ids, history, n):
    grams = ref_ngrams(ids, n)
    if not grams:
        return 0.0
    hist = set(ref_ngrams(history, n))
    return sum(1 for g in grams if g in hist) / len(grams)


def ref_returns(rewards, weights=None, discount=1.0):
    if weights is None:
        weights = [1.0] * len(rewards)
    out = []
    for t in range(len(rewards)):
        g = 0.0
        for k in range(t, len(rewards)):
            g += discount ** (k - t) * weights[k] * rewards[k]
        out.append(g)
    return out


def ref_elide(rows, salient, n_max, window, sink):
    """Returns (rows', salient', columns) following method.md "Long histories"."""
    num = len(rows[0])
    salient = sorted({int(i) for i in salient if int(i) >= sink})
    if num <= n_max:
        return [list(map(float, r)) for r in rows], salient, list(range(num))
    kept = set(range(sink)) | set(salient) | set(range(max(num - window, 0), num))
    elided = [i for i in range(num) if i not in kept]
    if not elided:
        return [list(map(float, r)) for r in rows], salient, list(range(num))
    columns = sorted(kept | {elided[0]})
    new_rows = []
    for row in rows:
        new_row = []
        for c in columns:
            if c == elided[0]:
                new_row.append(sum(float(row[i]) for i in elided))
            else:
                new_row.append(float(row[c]))
        new_rows.append(new_row)
    new_salient = [columns.index(i) for i in salient]
    return new_rows, new_salient, [(-1 if c == elided[0] else c) for c in columns]


def ref_turn_reward(rows, salient, *, alpha, beta, gamma, sink, floor, n_max, window, rep, user_span=None):
    """R = alpha C + beta F - gamma rep on the (possibly elided) block; `rep` is given precomputed."""
    salient = [i for i in salient if i >= sink]
    if user_span is not None:
        salient = [i for i in salient if user_span[0] <= i < user_span[1]]
    rows2, sal2, _ = ref_elide(rows, salient, n_max, window, sink)
    c = ref_coverage(rows2, sal2, sink)
    f = ref_focus(rows2, sink, floor)
    return alpha * c + beta * f - gamma * rep, c, f
