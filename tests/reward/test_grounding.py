"""The grounding term (mean per-token PMI of a reply with its history) against a plain reference, and its wiring
into `score_turn` / `score_cot` / `score_dialogue`: weights, components, errors for missing or mismatched inputs."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from cagsr_reward import CAGSRConfig, TurnInput, grounding, score_cot, score_dialogue, score_turn


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def _logprobs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Log-probabilities of n sampled tokens under random next-token distributions (vocabulary 50)."""
    logits = rng.normal(size=(n, 50))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return logp[np.arange(n), rng.integers(50, size=n)]


def _block(rng: np.random.Generator, T: int, P: int) -> np.ndarray:
    a = rng.random((T, P)) + 1e-3
    return a / a.sum(axis=1, keepdims=True) * rng.uniform(0.5, 1.0, size=(T, 1))


@pytest.mark.parametrize("case", range(5))
def test_grounding_equals_the_mean_log_ratio(case):
    rng = _rng(f"grounding:{case}")
    T = int(rng.integers(1, 40))
    lp, lp0 = _logprobs(rng, T), _logprobs(rng, T)
    reference = sum(a - b for a, b in zip(lp.tolist(), lp0.tolist())) / T
    assert grounding(lp, lp0) == pytest.approx(reference, abs=1e-12)


def test_grounding_rejects_bad_inputs():
    with pytest.raises(ValueError, match="prior_logprobs: length 1 != length of logprobs 2"):
        grounding([-1.0, -2.0], [-1.0])
    with pytest.raises(ValueError, match="logprobs: expected at least one"):
        grounding([], [])
    with pytest.raises(ValueError, match=r"logprobs: expected log-probabilities \(<= 0\)"):
        grounding([0.5], [-1.0])
    with pytest.raises(ValueError, match="prior_logprobs: non-finite"):
        grounding([-1.0], [float("nan")])


def test_score_turn_adds_eta_times_grounding():
    rng = _rng("turn")
    T, P = 7, 20
    block, ids, hist = _block(rng, T, P), rng.integers(100, size=T), rng.integers(100, size=P)
    lp, lp0 = _logprobs(rng, T), _logprobs(rng, T)
    base = score_turn(block, [2, 5, 9], CAGSRConfig.attention_only(), response_ids=ids, history_ids=hist, sink=0)
    for eta in (0.0, 0.5, 2.0):
        ts = score_turn(block, [2, 5, 9], CAGSRConfig(eta=eta), response_ids=ids, history_ids=hist, sink=0,
                        logprobs=lp, prior_logprobs=lp0)
        assert ts.grounding == pytest.approx(float(np.mean(lp - lp0)))
        assert ts.reward == pytest.approx(base.reward + eta * ts.grounding)
        assert ts.components()["grounding"] == pytest.approx(eta * ts.grounding)
        assert sum(ts.components().values()) == pytest.approx(ts.reward)


def test_score_turn_errors_name_the_missing_field():
    rng = _rng("errors")
    block = _block(rng, 3, 6)
    with pytest.raises(ValueError, match=r"logprobs, prior_logprobs: required when eta > 0 .*attention_only"):
        score_turn(block, [1], CAGSRConfig(eta=0.5), sink=0)
    with pytest.raises(ValueError, match="give both or neither"):
        score_turn(block, [1], CAGSRConfig(eta=0.5), sink=0, logprobs=[-1.0] * 3)
    with pytest.raises(ValueError, match="logprobs: length 2 != number of attention rows 3"):
        score_turn(block, [1], CAGSRConfig(eta=0.5), sink=0, logprobs=[-1.0] * 2, prior_logprobs=[-1.0] * 2)
    with pytest.raises(ValueError, match="eta: expected a finite float >= 0"):
        CAGSRConfig(eta=-1.0)
    assert CAGSRConfig.paper().eta == 0.0 and CAGSRConfig.attention_only().eta == 0.0


def test_score_cot_grounds_each_block_on_its_own_span():
    rng = _rng("cot")
    P, T = 6, 12
    att = np.zeros((T, P + T - 1))
    for s in range(T):
        att[s, : P + s] = rng.random(P + s) + 1e-3
        att[s] /= att[s].sum()
    ids, prompt = rng.integers(100, size=T), rng.integers(100, size=P)
    lp, lp0 = _logprobs(rng, T), _logprobs(rng, T)
    cfg = CAGSRConfig(eta=1.0, cot_block=5, mode="cot")
    cot = score_cot(att, P, [1, 3], ids, prompt, cfg, sink=0, logprobs=lp, prior_logprobs=lp0)
    for (s0, s1), block in zip(cot.spans, cot.blocks):
        assert block.grounding == pytest.approx(float(np.mean(lp[s0:s1] - lp0[s0:s1])))
    plain = score_cot(att, P, [1, 3], ids, prompt, cfg.replace(eta=0.0), sink=0)
    assert cot.total == pytest.approx(plain.total + float(np.dot(cot.weights, [b.grounding for b in cot.blocks])))
    with pytest.raises(ValueError, match=r"logprobs: expected one value per generated token \(12\)"):
        score_cot(att, P, [1], ids, prompt, cfg, sink=0, logprobs=lp[:-1], prior_logprobs=lp0[:-1])


def test_score_dialogue_passes_each_turns_logprobs():
    rng = _rng("dialogue")
    turns, expected = [], []
    for t in range(3):
        lp, lp0 = _logprobs(rng, 4), _logprobs(rng, 4)
        turns.append(TurnInput(_block(rng, 4, 10 + t), [1, 2], response_ids=rng.integers(50, size=4),
                               history_ids=rng.integers(50, size=10 + t), sink=0, logprobs=lp, prior_logprobs=lp0))
        expected.append(float(np.mean(lp - lp0)))
    d = score_dialogue(turns, CAGSRConfig(eta=0.5))
    assert [s.grounding for s in d.turns] == pytest.approx(expected)
