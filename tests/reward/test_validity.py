"""The validity protocol's statistics and probes (cagsr_reward.validity): each test fails on a wrong implementation."""

import numpy as np
import pytest

from cagsr_reward import validity as V


def _auroc_by_hand(pos, neg):
    total = 0.0
    for x, ys in zip(pos, neg):
        total += np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for y in ys])
    return total / len(pos)


def test_paired_auroc_known_values():
    # item 0 beats both negatives, item 1 ties one and loses one, item 2 beats one of two
    assert V.paired_auroc([3.0, 1.0, 2.0], [[1.0, 2.0], [1.0, 5.0], [5.0, 0.0]]) == pytest.approx((1 + 0.25 + 0.5) / 3)
    assert V.paired_auroc([1.0, 1.0], [0.0, 2.0]) == 0.5
    assert V.paired_auroc([2.0, 2.0], [2.0, 2.0]) == 0.5  # all ties: no signal
    assert V.paired_auroc([5.0], [[1.0, 1.0, 9.0, 5.0]]) == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    # pairing matters: a pooled AUROC of these would be 0.5, the paired one is 1
    assert V.paired_auroc([1.0, 10.0], [0.0, 9.0]) == 1.0


def test_paired_auroc_matches_reference_on_random_scores():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, k = int(rng.integers(1, 30)), int(rng.integers(1, 4))
        pos = rng.integers(0, 5, n).astype(float)  # small integers: many ties
        neg = rng.integers(0, 5, (n, k)).astype(float)
        assert V.paired_auroc(pos, neg) == pytest.approx(_auroc_by_hand(pos, neg))
    assert V.win_rate([1.0, 2.0, 3.0], [1.0, 1.0, 4.0]) == pytest.approx(1 / 3)


def test_paired_auroc_refuses_bad_shapes():
    with pytest.raises(ValueError, match="negative"):
        V.paired_auroc([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        V.paired_auroc([np.nan], [1.0])


def test_cluster_bootstrap_resamples_whole_clusters():
    # 2 dialogues, 40 items each; within a dialogue every item is the same. Resampling items would give a tight
    # interval around 0.5; resampling dialogues gives samples of only one dialogue (mean 0 or 1) a quarter of the
    # time each, so the 95% interval spans [0, 1].
    values = [1.0] * 40 + [0.0] * 40
    clusters = ["a"] * 40 + ["b"] * 40
    est, lo, hi = V.cluster_bootstrap(values, clusters, num_samples=400, seed=1)
    assert est == 0.5 and lo == 0.0 and hi == 1.0
    # every bootstrap mean is 0, 0.5 or 1: cluster-level draws only
    draws = []
    V.cluster_bootstrap(values, clusters, lambda v: draws.append(float(np.mean(v))) or 0.0, num_samples=200)
    assert set(draws) <= {0.0, 0.5, 1.0} and len(set(draws)) == 3
    # one item per cluster: the ordinary bootstrap, interval narrower than the clustered one
    _, lo1, hi1 = V.cluster_bootstrap(values, list(range(80)), num_samples=400, seed=1)
    assert 0.3 < lo1 < 0.5 < hi1 < 0.7


def test_cluster_bootstrap_is_deterministic_and_checks_lengths():
    a = V.cluster_bootstrap([1.0, 2.0, 3.0], ["x", "y", "z"], num_samples=50, seed=3)
    assert a == V.cluster_bootstrap([1.0, 2.0, 3.0], ["x", "y", "z"], num_samples=50, seed=3)
    with pytest.raises(ValueError, match="clusters"):
        V.cluster_bootstrap([1.0, 2.0], ["x"])


def test_paired_auroc_ci_uses_clusters():
    pos = [1.0] * 20 + [0.0] * 20
    neg = [0.5] * 40
    est, lo, hi = V.paired_auroc_ci(pos, neg, ["a"] * 20 + ["b"] * 20, num_samples=300)
    assert est == 0.5 and lo == 0.0 and hi == 1.0


def test_loop_probe():
    assert V.loop_probe([1, 2, 3, 4, 5, 6, 7], prefix=3) == [1, 2, 3, 1, 2, 3, 1]
    with pytest.raises(ValueError, match="longer reply"):
        V.loop_probe([1, 2, 3], prefix=3)


def test_pad_probe():
    assert V.pad_probe([1, 2], [7, 8, 9]) == [1, 2, 7, 8]
    assert V.pad_probe([1, 2], [7, 8, 9], offset=2, length=3) == [1, 2, 9, 7, 8]  # wraps around the pool


def test_shuffled_probe_keeps_the_tokens_and_changes_the_order():
    ids = list(range(10, 30))
    out = V.shuffled_probe(ids, seed=5)
    assert sorted(out) == ids and out != ids
    assert V.shuffled_probe(ids, seed=5) == out
    assert V.shuffled_probe([4, 4, 4]) == [4, 4, 4]


def test_answer_first_probe_moves_the_last_answer_statement():
    ids = [1, 8, 9, 2, 3, 8, 9]
    assert V.answer_first_probe(ids, [8, 9]) == [8, 9, 1, 8, 9, 2, 3]
    with pytest.raises(ValueError, match="does not occur"):
        V.answer_first_probe([1, 2, 3], [8])


def test_other_dialogue_index_never_pairs_an_item_with_its_dialogue_or_its_text():
    clusters = ["a", "a", "b", "c", "c", "d"]
    texts = ["x", "y", "x", "z", "w", "x"]
    for seed in range(20):
        perm = V.other_dialogue_index(clusters, texts, seed=seed)
        for i, j in enumerate(perm):
            assert clusters[j] != clusters[i] and texts[j] != texts[i]
    with pytest.raises(ValueError):
        V.other_dialogue_index(["a", "a"], ["x", "y"])


def test_calibrate_entropy_floor():
    # quantile 0 = the minimum per turn: 1.0 at turn 0, 1.5 at turn 1, 2.0 at turn 2 -> H0 = 1.0, kappa = 0.5
    h = [1.0, 3.0, 1.5, 4.0, 2.0, 2.2]
    t = [0, 0, 1, 1, 2, 2]
    h0, kappa = V.calibrate_entropy_floor(h, t, quantile=0.0)
    assert (h0, kappa) == pytest.approx((1.0, 0.5))
    # falling entropies: kappa clipped at 0, H0 the weighted mean of the per-turn quantiles
    h0, kappa = V.calibrate_entropy_floor([3.0, 2.0], [0, 1], quantile=0.5)
    assert kappa == 0.0 and h0 == pytest.approx(2.5)
