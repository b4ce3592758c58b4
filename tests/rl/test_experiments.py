"""The statistics of docs/experiments.md against brute force, the truncated-sampling warning and the examples'
sampling defaults (the training grid itself: tests/rl/test_training_grid.py)."""

from __future__ import annotations

import itertools
import types
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cagsr_reward.metrics import auroc, bootstrap_auroc, bootstrap_ci, distinct_n, ngram_overlap, word_count

SCORES = st.lists(st.integers(-3, 3).map(float), min_size=1, max_size=8)


@settings(max_examples=80, deadline=None)
@given(SCORES, SCORES)
def test_auroc_is_the_pairwise_win_rate(pos, neg):
    pairs = list(itertools.product(pos, neg))
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert auroc(pos, neg) == pytest.approx(brute)
    assert auroc(neg, pos) == pytest.approx(1 - brute)


def test_auroc_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="at least one"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        auroc([float("nan")], [1.0])


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small, large = rng.normal(size=20), rng.normal(size=2000)
    est, lo, hi = bootstrap_ci(small, seed=0)
    assert est == pytest.approx(small.mean()) and lo < est < hi
    _, lo2, hi2 = bootstrap_ci(large, seed=0)
    assert hi2 - lo2 < (hi - lo) / 4  # ~ 1/sqrt(n): 10x fewer items -> a ~3x wider interval, x4 is a safe margin
    assert lo2 < 0.0 < hi2  # the true mean 0 is inside
    assert np.isnan(bootstrap_ci([float("nan")])[0])
    a, lo3, hi3 = bootstrap_auroc([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 5.0, 0.0], seed=0)
    assert a == pytest.approx(auroc([1, 2, 3, 4], [0, 0, 5, 0])) and lo3 <= a <= hi3


def test_ngram_overlap_distinct_and_length_by_hand():
    # unigrams: 2 common of 3 and 3 -> F1 2/3; bigrams: "the cat" 1 of 2 and 2 -> 1/2
    assert ngram_overlap("The cat sat", "the cat ran") == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert ngram_overlap("a b c", "a b c") == 1.0
    assert ngram_overlap("x", "x") == pytest.approx(0.5)  # no bigram on either side: that order counts 0
    assert ngram_overlap("", "a b") == 0.0
    assert distinct_n(["a a a"], 1) == pytest.approx(1 / 3) and distinct_n([""], 2) == 0.0
    assert word_count("Hello, world! 42") == 3
    with pytest.raises(ValueError, match="max_n"):
        ngram_overlap("a", "a", max_n=0)


def test_truncated_sampling_with_is_correction_warns():
    from vllm_attncap.rl.trainers import _warn_truncated_sampling, truncated_sampling_settings

    on = dict(vllm_importance_sampling_correction=True, top_k=0, min_p=None, generation_kwargs=None)
    assert truncated_sampling_settings(types.SimpleNamespace(top_p=1.0, **on)) == []
    assert truncated_sampling_settings(types.SimpleNamespace(top_p=0.95, **{**on, "top_k": 20})) == ["top_p=0.95", "top_k=20"]
    assert truncated_sampling_settings(types.SimpleNamespace(top_p=1.0, **{**on, "generation_kwargs": {"min_p": 0.1}})) == ["min_p=0.1"]
    with pytest.warns(UserWarning, match="top_p=0.95 with vllm_importance_sampling_correction"):
        _warn_truncated_sampling(types.SimpleNamespace(top_p=0.95, **on))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_truncated_sampling(types.SimpleNamespace(top_p=1.0, **on))
        _warn_truncated_sampling(types.SimpleNamespace(top_p=0.9, **{**on, "vllm_importance_sampling_correction": False}))


def test_example_defaults_keep_the_full_distribution():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for name in ("dialogue_grpo", "cot_math"):
        spec = importlib.util.spec_from_file_location(name, root / "examples" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.parse_args([]).top_p == 1.0


def test_metrics_doctests():
    import doctest

    import cagsr_reward.metrics

    result = doctest.testmod(cagsr_reward.metrics)
    assert result.failed == 0 and result.attempted >= 14
