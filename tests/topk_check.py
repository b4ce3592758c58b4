"""One check of a top-k capture against reference probability rows (kernel tests and engine tests share it).

The contract (docs/capture.md, "Top-k mode"): positions equal the reference's top-k, except that keys whose reference
probabilities differ by less than ``tie_tol`` may trade places; probabilities within ``prob_tol``; rows with fewer
keys padded with -1 / 0; equal probabilities listed lower position first.
"""

from __future__ import annotations

import numpy as np


def assert_topk_matches(positions, probs, ref_rows, q_pos, *, prob_tol=1e-5, tie_tol=1e-6, window=-1, what=""):
    """``positions`` int32 / ``probs`` float32 ``(..., R, k)`` against reference rows ``ref_rows`` ``(..., R, C)``
    (probabilities over key positions ``0..C-1``); ``q_pos`` ``(R,)`` the query position of each row."""
    positions, probs, ref_rows = np.asarray(positions), np.asarray(probs), np.asarray(ref_rows, np.float64)
    assert positions.dtype == np.int32 and probs.dtype == np.float32, (positions.dtype, probs.dtype)
    assert positions.shape == probs.shape and positions.shape[:-1] == ref_rows.shape[:-1], (
        positions.shape, probs.shape, ref_rows.shape)
    k = positions.shape[-1]
    lead = positions.shape[:-2]
    for idx in np.ndindex(*lead):
        for r, q in enumerate(q_pos):
            lo = max(0, q - window + 1) if window > 0 else 0
            row = ref_rows[idx + (r,)]
            keys = np.arange(lo, q + 1)
            # reference ranking: probability descending, position ascending
            order = keys[np.lexsort((keys, -row[keys]))]
            n = min(k, len(order))
            got_p, got_v = positions[idx + (r,)], probs[idx + (r,)]
            where = f"{what} {idx} row {r} (query {q})"
            assert (got_p[n:] == -1).all() and (got_v[n:] == 0).all(), f"{where}: padding {got_p} {got_v}"
            assert len(set(got_p[:n].tolist())) == n, f"{where}: repeated positions {got_p[:n]}"
            assert ((got_p[:n] >= lo) & (got_p[:n] <= q)).all(), f"{where}: a position outside the row {got_p[:n]}"
            want = row[order[:n]]
            np.testing.assert_allclose(got_v[:n], want, atol=prob_tol, rtol=0, err_msg=where)
            np.testing.assert_allclose(got_v[:n], row[got_p[:n]], atol=prob_tol, rtol=0, err_msg=where)
            for i in np.nonzero(got_p[:n] != order[:n])[0]:
                # a different key at rank i is allowed only between (near-)ties of the reference
                assert abs(row[got_p[i]] - want[i]) < tie_tol, (
                    f"{where}: rank {i} holds key {got_p[i]} (p={row[got_p[i]]:.8g}), the reference key "
                    f"{order[i]} (p={want[i]:.8g})")
            # the last kept key outranks every key left out (up to near-ties)
            if n < len(order):
                left_out = np.setdiff1d(keys, got_p[:n])
                assert row[left_out].max() <= row[got_p[:n]].min() + tie_tol, f"{where}: a better key left out"
            # exact ties: lower position first
            for i in range(n - 1):
                if got_v[i] == got_v[i + 1]:
                    assert got_p[i] < got_p[i + 1], f"{where}: equal probabilities out of position order {got_p}"
