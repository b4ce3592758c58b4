"""Per-rank parts of a record (vllm_attncap.store.parts) combine into the single-rank record, on a TP=2 x PP=2 grid.

The workers are emulated: each rank's part is written through the store's CaptureWriter the way
engine/capture.py writes it (its heads' rows, its share of a head mean, partial rows for statistics of a mean that
spans ranks); the expected arrays are computed directly from the full per-head rows. The engine-level check of the
same path (TP=2 and PP=2 engines against TP=1) is tests/engine/test_parallel.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from vllm_attncap.store import parts
from vllm_attncap import store as S
from vllm_attncap.engine.parallel import RankFacts, rank_share
from vllm_attncap.spec import resolve_spec

L, H, P, T = 5, 8, 12, 4
SINK, SALIENT = 1, [0, 3, 7]




def _rows(rng) -> np.ndarray:
    """(L, H, T, P+T-1) causal distributions."""
    x = np.zeros((L, H, T, P + T - 1), np.float32)
    for s in range(T):
        w = rng.random((L, H, P + s)) ** 4
        x[:, :, s, : P + s] = w / w.sum(-1, keepdims=True)
    return x


def _grid() -> list[RankFacts]:
    out = []
    for pp in range(2):
        start, end = (0, 3) if pp == 0 else (3, 5)
        for tp in range(2):
            out.append(RankFacts(tp, 2, pp, 2, L, H, start, end))
    return out


def _final_meta(resolved, key: str, req_id: str) -> S.CaptureMeta:
    return S.CaptureMeta(key, req_id, mode=resolved.spec.mode, reduce=resolved.spec.reduce,
                         layers=list(resolved.layers), heads=list(resolved.heads), prompt_len=P,
                         max_tokens=resolved.max_tokens, history_len=resolved.history_len, sink=resolved.spec.sink,
                         salient=list(resolved.spec.salient), spec=resolved.spec.to_dict())


def _write_rank(facts: RankFacts, resolved, full: np.ndarray, key: str, req_id: str) -> None:
    """What a rank's capture writes (engine/capture.py's write_probs, in numpy)."""
    share = rank_share(facts, resolved)
    spec = resolved.spec
    w = resolved.history_len
    meta = parts.make_part_meta(
        _final_meta(resolved, key, req_id), facts.index, facts.count, layers=list(share.layers),
        layer_pos=list(share.layer_pos), heads=list(share.heads), head_pos=list(share.head_pos),
        stats_history=(w, spec.sink, list(spec.salient)) if share.stats_on_host and not share.empty else None,
    )
    writer = S.CaptureWriter(meta)
    if not share.empty:
        blocks = []
        for layer in share.layers:
            p = full[layer][list(share.heads)]  # (h, T, C)
            if spec.reduce != "none":
                p = p.mean(0, keepdims=True) * share.head_share
            blocks.append(p)
        if spec.reduce == "layer_head_mean":
            blocks = [sum(blocks) / len(resolved.layers)]
        for slot, p in enumerate(blocks):
            if spec.mode == "rows":
                writer.write_rows(slot, 0, T, P + T - 1, p)
            elif share.stats_on_host:
                writer.write_rows(slot, 0, T, w, p[..., :w])
            else:
                cov, ent = parts.history_stats(p, w, spec.sink, spec.salient)
                writer.write_stats(slot, 0, T, cov, ent)
        writer.note_rows(T)
    writer.close()


def _expected(resolved, full: np.ndarray) -> np.ndarray:
    x = full[list(resolved.layers)][:, list(resolved.heads)]
    if resolved.spec.reduce != "none":
        x = x.mean(1, keepdims=True)
    if resolved.spec.reduce == "layer_head_mean":
        x = x.mean(0, keepdims=True)
    if resolved.spec.mode == "stats":
        cov, ent = parts.history_stats(x, resolved.history_len, resolved.spec.sink, resolved.spec.salient)
        return np.stack([cov, ent])
    return x


SPECS = [
    {},
    {"layers": [4, 0, 2], "heads": [7, 0, 5]},
    {"heads": [1]},  # held by one TP rank: the others write empty parts
    {"reduce": "head_mean"},
    {"layers": [1, 3], "heads": [0, 6, 2], "reduce": "head_mean"},
    {"reduce": "layer_head_mean"},
    {"layers": [4], "reduce": "layer_head_mean"},
    {"mode": "stats", "sink": SINK, "salient": SALIENT},
    {"mode": "stats", "sink": SINK, "salient": SALIENT, "reduce": "head_mean", "heads": [0, 5, 6]},
    {"mode": "stats", "sink": SINK, "salient": SALIENT, "reduce": "layer_head_mean"},
]


@pytest.mark.parametrize("spec", SPECS, ids=[str(s) for s in SPECS])
def test_parts_combine_to_the_single_rank_record(ns, spec):
    rng = np.random.default_rng(len(str(spec)))
    full = _rows(rng)
    resolved = resolve_spec(spec, num_layers=L, num_heads=H, prompt_len=P, max_tokens=T)
    for facts in _grid()[::-1]:  # any order
        _write_rank(facts, resolved, full, "k", "0-abc")
    assert len(S.list_records("k")) == 4
    (rec,) = parts.read_capture("k", T - 1)
    assert rec.meta.req_id == "0-abc" and rec.meta.status == S.STATUS_FINISHED and rec.meta.rows_written == T
    assert rec.meta.layers == list(resolved.layers) and rec.meta.heads == list(resolved.heads)
    want = _expected(resolved, full)[..., : T - 1] if spec.get("mode") == "stats" else \
        _expected(resolved, full)[:, :, : T - 1, : P + T - 2]
    assert rec.array.shape == want.shape
    np.testing.assert_allclose(rec.array, want, atol=1e-6, rtol=0)
    assert S.list_records() == []  # every part was taken


def test_an_error_part_fails_the_whole_request(ns):
    full = _rows(np.random.default_rng(0))
    resolved = resolve_spec({"reduce": "head_mean"}, num_layers=L, num_heads=H, prompt_len=P, max_tokens=T)
    grid = _grid()
    for facts in grid[:3]:
        _write_rank(facts, resolved, full, "k", "0-abc")
    S.write_error("k", parts.part_req_id("0-abc", 3, 4), "attncap: rank 3 could not create its buffer")
    (meta,) = parts.list_captures("k")
    assert meta.status == S.STATUS_ERROR
    (rec,) = parts.read_capture("k", T)
    assert rec.array is None and "rank 3" in rec.error
    assert S.list_records() == []


def test_a_missing_part_is_an_error_never_a_half_filled_array(ns):
    full = _rows(np.random.default_rng(1))
    resolved = resolve_spec({}, num_layers=L, num_heads=H, prompt_len=P, max_tokens=T)
    for facts in _grid()[:3]:
        _write_rank(facts, resolved, full, "k", "0-abc")
    (meta,) = parts.list_captures("k")
    assert meta.status == S.STATUS_OPEN  # a part is still to come
    (rec,) = parts.read_capture("k", T, wait_s=0.2)
    assert rec.array is None and "3 of 4 rank parts" in rec.error


def test_records_without_parts_pass_through(ns):
    w = S.CaptureWriter(S.CaptureMeta("k", "0-abc", layers=[0], heads=[0], prompt_len=3, max_tokens=2))
    w.write_rows(0, 0, 2, 4, np.full((1, 2, 4), 0.25, np.float32))
    w.note_rows(2)
    w.close()
    (rec,) = parts.read_capture("k", 2)
    assert rec.array.shape == (1, 1, 2, 4) and rec.meta.part is None


def test_history_stats_matches_the_torch_reference():
    torch = pytest.importorskip("torch")
    from vllm_attncap.engine.reference import history_stats as torch_stats

    rows = _rows(np.random.default_rng(2))
    rows[0, 0, 1, :] = 0.0  # a row without history mass: NaN in both
    cov, ent = parts.history_stats(rows, P, SINK, SALIENT)
    tc, te = torch_stats(torch.from_numpy(rows), P, SINK, torch.tensor(SALIENT))
    np.testing.assert_allclose(cov, tc.numpy(), atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(ent, te.numpy(), atol=1e-5, equal_nan=True)
    assert np.isnan(ent[0, 0, 1]) and np.isnan(cov[0, 0, 1])
