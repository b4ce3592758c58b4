"""cagsr_reward.aggregate: head/layer averaging, the history slice and the long-history rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reward_reference import ref_coverage, ref_elide, ref_entropy

from cagsr_reward.aggregate import ElidedBlock, aggregate, elide, history_block
from cagsr_reward.core import coverage, row_entropy

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _capture(rng, layers, heads, rows, prompt_len):
    """A causal capture (L, H, T, P+T-1): row s is a distribution over keys 0..P-1+s, zeros to the right."""
    cols = prompt_len + rows - 1
    cap = np.zeros((layers, heads, rows, cols), dtype=np.float32)
    for s in range(rows):
        width = prompt_len + s
        w = rng.random((layers, heads, width)) * (rng.random((layers, heads, width)) > 0.2)
        w[..., 0] += 1e-3
        cap[:, :, s, :width] = w / w.sum(axis=-1, keepdims=True)
    return cap


def ref_aggregate(cap, layer_idx, head_idx):
    """Mean over the chosen heads, then over the chosen layers, with plain loops."""
    _, _, rows, cols = cap.shape
    out = [[0.0] * cols for _ in range(rows)]
    for s in range(rows):
        for i in range(cols):
            per_layer = []
            for li in layer_idx:
                per_layer.append(sum(float(cap[li, h, s, i]) for h in head_idx) / len(head_idx))
            out[s][i] = sum(per_layer) / len(per_layer)
    return np.array(out)


# ---------------------------------------------------------------------------------------------------------------
# aggregate
# ---------------------------------------------------------------------------------------------------------------
def test_aggregate_hand():
    cap = np.zeros((2, 2, 1, 2), dtype=np.float32)
    cap[1, 0, 0] = [1.0, 0.0]
    cap[1, 1, 0] = [0.5, 0.5]
    cap[0, :, 0] = [0.0, 1.0]
    np.testing.assert_allclose(aggregate(cap), [[0.75, 0.25]])
    np.testing.assert_allclose(aggregate(cap, layers="all"), [[0.375, 0.625]])
    np.testing.assert_allclose(aggregate(cap, layers=[0, 1], heads=[0]), [[0.5, 0.5]])
    np.testing.assert_allclose(aggregate(cap, layers=[-1, 1]), [[0.75, 0.25]])  # same layer twice counts once
    np.testing.assert_allclose(aggregate(cap, heads=-1), [[0.5, 0.5]])
    # layer ids: this capture holds model layers 28 and 29 of a 30-layer model
    np.testing.assert_allclose(aggregate(cap, layers=[29], layer_ids=[28, 29]), [[0.75, 0.25]])
    np.testing.assert_allclose(aggregate(cap, layers=[-2], layer_ids=[28, 29], num_layers=30), [[0.0, 1.0]])
    np.testing.assert_allclose(aggregate(cap, layers=[-1], layer_ids=[28, 29], num_layers=30), [[0.75, 0.25]])


def test_aggregate_dtype_and_reduced_inputs():
    rng = np.random.default_rng(0)
    cap = _capture(rng, 3, 4, 5, 6)
    out = aggregate(cap)
    assert out.dtype == np.float32 and out.shape == (5, 10)
    assert aggregate(cap.astype(np.float64)).dtype == np.float64
    np.testing.assert_allclose(aggregate(cap.astype(np.float64)), out, rtol=1e-6)
    # device-reduced captures: L = 1 and/or H = 1
    head_mean = cap.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(aggregate(head_mean, layers="all"), cap.mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(aggregate(cap[-1:], layers=(-1,)), out, rtol=1e-6)
    # 2-D passes through unchanged
    two_d = out.astype(np.float64)
    np.testing.assert_array_equal(aggregate(two_d), two_d)
    np.testing.assert_array_equal(aggregate(two_d, layers=[7], heads=[9]), two_d)


@FAST
@given(
    st.integers(1, 4),
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(1, 7),
    st.integers(0, 2**31),
    st.data(),
)
def test_aggregate_matches_reference(layers, heads, rows, prompt_len, seed, data):
    rng = np.random.default_rng(seed)
    cap = _capture(rng, layers, heads, rows, prompt_len)
    layer_spec = data.draw(
        st.one_of(st.just("all"), st.lists(st.integers(-layers, layers - 1), min_size=1, max_size=4))
    )
    head_spec = data.draw(st.one_of(st.just("all"), st.lists(st.integers(-heads, heads - 1), min_size=1, max_size=5)))
    li = list(range(layers)) if layer_spec == "all" else sorted({v % layers for v in layer_spec})
    hi = list(range(heads)) if head_spec == "all" else sorted({v % heads for v in head_spec})
    got = aggregate(cap, layers=layer_spec, heads=head_spec)
    np.testing.assert_allclose(got, ref_aggregate(cap, li, hi), rtol=2e-6, atol=1e-7)
    # the causal layout survives averaging: zeros right of P-1+s, rows sum to 1
    for s in range(rows):
        assert np.all(got[s, prompt_len + s :] == 0.0)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


def _raises(arg, fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith(f"{arg}:"), str(info.value)
    return str(info.value)


def test_aggregate_errors():
    cap = np.full((2, 3, 1, 2), 0.5, dtype=np.float32)
    _raises("attention", aggregate, np.ones((3, 1, 2)))
    _raises("attention", aggregate, np.ones(4))
    _raises("attention", aggregate, np.ones((2, 3, 1, 2), dtype=np.int64))
    _raises("attention", aggregate, np.full((1, 1, 1, 2), np.nan, dtype=np.float32))
    _raises("attention", aggregate, np.array([[0.5, np.nan]]))
    _raises("layers", aggregate, cap, layers=[2])
    _raises("layers", aggregate, cap, layers=[-3])
    _raises("layers", aggregate, cap, layers=[])
    _raises("layers", aggregate, cap, layers="last")
    _raises("layers", aggregate, cap, layers=[0.5])
    _raises("heads", aggregate, cap, heads=[3])
    _raises("heads", aggregate, cap, heads="first")
    assert "not captured" in _raises("layers", aggregate, cap, layers=[5], layer_ids=[28, 29])
    _raises("num_layers", aggregate, cap, layers=[-1], layer_ids=[28, 29])
    _raises("num_layers", aggregate, cap, layers=[-1], layer_ids=[28, 29], num_layers=0)
    _raises("layer_ids", aggregate, cap, layer_ids=[29])
    _raises("layer_ids", aggregate, cap, layer_ids=[29, 29])
    _raises("layer_ids", aggregate, cap, layer_ids=[0.0, 1.0])


# ---------------------------------------------------------------------------------------------------------------
# history_block
# ---------------------------------------------------------------------------------------------------------------
def test_history_block():
    a = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    np.testing.assert_array_equal(history_block(a, 2), [[0.5, 0.5], [0.2, 0.3]])
    np.testing.assert_array_equal(history_block(a, 3), a)
    _raises("a", history_block, np.ones((1, 2, 3)), 1)
    _raises("prompt_len", history_block, a, 0)
    _raises("prompt_len", history_block, a, 4)
    _raises("prompt_len", history_block, a, 1.0)


def test_history_block_of_a_capture_matches_hf_layout():
    # rows of the history block are the prompt columns 0..P-1 of every generated token's row
    rng = np.random.default_rng(1)
    cap = _capture(rng, 1, 2, 4, 5)
    block = history_block(aggregate(cap), 5)
    assert block.shape == (4, 5)
    np.testing.assert_allclose(block, cap[0, :, :, :5].mean(axis=0), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# elide
# ---------------------------------------------------------------------------------------------------------------
def test_elide_hand():
    row = np.array([[0.1, 0.1, 0.2, 0.1, 0.2, 0.3]])
    e = elide(row, [2], n_max=4, window=2, sink=1)
    assert isinstance(e, ElidedBlock)
    assert e.columns.tolist() == [0, -1, 2, 4, 5]
    np.testing.assert_allclose(e.block, [[0.1, 0.2, 0.2, 0.2, 0.3]])
    assert e.salient.tolist() == [2] and e.elided_count == 2
    # entropy: the merged column is one outcome. Kept mass 0.9 over [0.2, 0.2, 0.2, 0.3] after dropping the sink.
    p = np.array([0.2, 0.2, 0.2, 0.3]) / 0.9
    assert row_entropy(e.block, sink=1)[0] == pytest.approx(-(p * np.log(p)).sum())


def test_elide_leaves_short_histories_alone():
    a = np.array([[0.2, 0.3, 0.5]])
    e = elide(a, [0, 2], n_max=3, window=1, sink=1)
    np.testing.assert_array_equal(e.block, a)
    assert e.columns.tolist() == [0, 1, 2] and e.elided_count == 0
    assert e.salient.tolist() == [2]  # sinks are never salient
    # longer than n_max but everything is kept (window covers it): nothing merged
    e = elide(np.array([[0.2, 0.3, 0.5]]), [], n_max=2, window=3)
    assert e.elided_count == 0 and e.columns.tolist() == [0, 1, 2]


def test_elide_merged_column_is_never_salient_and_is_placed_in_order():
    a = np.arange(1, 11, dtype=np.float64)[None, :]  # P = 10
    e = elide(a, [1, 7], n_max=5, window=2, sink=0)
    # kept: 1, 7 (salient), 8, 9 (window); merged: 0, 2..6 -> placed at position 0
    assert e.columns.tolist() == [-1, 1, 7, 8, 9]
    assert e.block[0].tolist() == [1 + 3 + 4 + 5 + 6 + 7, 2, 8, 9, 10]
    assert e.salient.tolist() == [1, 2]
    assert -1 not in e.columns[e.salient].tolist()


@st.composite
def long_blocks(draw):
    cols = draw(st.integers(2, 30))
    rows = draw(st.integers(1, 4))
    sink = draw(st.integers(0, min(2, cols - 1)))
    vals = draw(
        st.lists(st.one_of(st.just(0.0), st.floats(1e-4, 1.0)), min_size=rows * cols, max_size=rows * cols)
    )
    a = np.array(vals).reshape(rows, cols)
    a[:, -1] += 1e-3  # every row keeps mass in the window
    salient = draw(st.lists(st.integers(0, cols - 1), max_size=cols))
    n_max = draw(st.integers(1, cols + 2))
    window = draw(st.integers(1, max(n_max, 1)))
    return a, salient, n_max, window, sink


@settings(max_examples=200, deadline=None)
@given(long_blocks())
def test_elide_matches_reference_and_preserves_the_reward_inputs(case):
    a, salient, n_max, window, sink = case
    e = elide(a, salient, n_max=n_max, window=window, sink=sink)
    rows, sal, cols = ref_elide(a.tolist(), salient, n_max, window, sink)
    np.testing.assert_allclose(e.block, rows, rtol=1e-12, atol=1e-15)
    assert e.salient.tolist() == sal
    assert e.columns.tolist() == cols
    expected_count = a.shape[1] - (len(cols) - 1) if -1 in cols else 0
    assert e.elided_count == expected_count
    # row mass is preserved, so coverage is unchanged by construction
    np.testing.assert_allclose(e.block.sum(axis=1), a.sum(axis=1), rtol=1e-12)
    c = coverage(a, salient, sink=sink)
    assert coverage(e.block, e.salient, sink=sink) == pytest.approx(c, rel=1e-12, abs=1e-15)
    assert coverage(e.block, e.salient, sink=sink) == pytest.approx(ref_coverage(rows, sal, sink), rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(row_entropy(e.block, sink), ref_entropy(rows, sink), rtol=1e-10, atol=1e-12)
    # kept columns are copied verbatim; sinks stay first; the block never grows past n_max + salient + 1
    for j, c in enumerate(e.columns):
        if c >= 0:
            np.testing.assert_array_equal(e.block[:, j], a[:, c])
    assert e.columns[:sink].tolist() == list(range(sink))
    if a.shape[1] > n_max:
        assert e.block.shape[1] <= sink + len(set(salient)) + window + 1
    else:
        assert e.block.shape == a.shape
    # merging can only lower the entropy (fewer outcomes, same mass)
    assert np.all(row_entropy(e.block, sink) <= row_entropy(a, sink) + 1e-12)


def test_elide_entropy_is_lower_than_unelided_for_a_uniform_row():
    a = np.full((1, 2000), 1.0)
    e = elide(a, [], n_max=1024, window=512)
    assert e.block.shape == (1, 513) and e.elided_count == 1488
    p = np.array([1488.0] + [1.0] * 512) / 2000
    assert row_entropy(e.block)[0] == pytest.approx(-(p * np.log(p)).sum())
    assert row_entropy(e.block)[0] < math.log(2000)


def test_elide_errors():
    a = np.ones((1, 4))
    _raises("block", elide, np.ones(4), [])
    _raises("block", elide, np.array([[1.0, -1.0]]), [])
    _raises("salient", elide, a, [4])
    _raises("salient", elide, a, [-1])
    _raises("n_max", elide, a, [], n_max=0)
    _raises("window", elide, a, [], window=-1)
    _raises("sink", elide, a, [], sink=4)
