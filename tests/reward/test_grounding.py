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


def _chain(rng: np.random.Generator, P: int, T: int):
    """A random chain of thought: causal attention (T, P+T-1), reply and prompt ids, both log-probability vectors."""
    att = np.zeros((T, P + T - 1))
    for s in range(T):
        att[s, : P + s] = rng.random(P + s) + 1e-3
        att[s] /= att[s].sum()
    ids, prompt = rng.integers(100, size=T), rng.integers(100, size=P)
    return att, ids, prompt, _logprobs(rng, T), _logprobs(rng, T)


@pytest.mark.parametrize("case", range(5))
def test_grounding_equals_the_mean_log_ratio(case):
    rng = _rng(f"grounding:{case}")
    T = int(rng.integers(1, 40))
    lp, lp0 = _logprobs(rng, T), _logprobs(rng, T)
    reference = sum(a - b for a, b in zip(lp.tolist(), lp0.tolist())) / T
    assert grounding(lp, lp0) == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize("case", range(5))
def test_grounding_with_prior_tokens_equals_the_shrunk_sum(case):
    rng = _rng(f"grounding-t0:{case}")
    T, T0 = int(rng.integers(1, 40)), float(rng.choice([0.5, 4.0, 16.0, 64.0]))
    lp, lp0 = _logprobs(rng, T), _logprobs(rng, T)
    total = sum(a - b for a, b in zip(lp.tolist(), lp0.tolist()))
    assert grounding(lp, lp0, prior_tokens=T0) == pytest.approx(total / (T + T0), abs=1e-12)
    # a span of a longer reply: its mean times the reply's shrinkage T / (T + T0)
    total_len = T + int(rng.integers(0, 20))
    assert grounding(lp, lp0, prior_tokens=T0, reply_tokens=total_len) == pytest.approx(
        total / T * total_len / (total_len + T0), abs=1e-12)


def test_prior_tokens_rank_a_whole_grounded_reply_above_its_prefix():
    """The reason for T0: every token carries the same positive PMI, the first more; the mean prefers the prefix, a
    large enough T0 the whole reply."""
    pmi = np.array([2.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    lp0 = np.full(pmi.size, -5.0)
    whole, prefix = (lp0 + pmi, lp0), ((lp0 + pmi)[:2], lp0[:2])
    assert grounding(*whole) < grounding(*prefix)
    assert grounding(*whole, prior_tokens=16) > grounding(*prefix, prior_tokens=16)


def test_grounding_rejects_bad_inputs():
    with pytest.raises(ValueError, match="prior_logprobs: length 1 != length of logprobs 2"):
        grounding([-1.0, -2.0], [-1.0])
    with pytest.raises(ValueError, match="logprobs: expected at least one"):
        grounding([], [])
    with pytest.raises(ValueError, match=r"logprobs: expected log-probabilities \(<= 0\)"):
        grounding([0.5], [-1.0])
    with pytest.raises(ValueError, match="prior_logprobs: non-finite"):
        grounding([-1.0], [float("nan")])
    with pytest.raises(ValueError, match="prior_tokens: expected a finite float >= 0"):
        grounding([-1.0], [-1.0], prior_tokens=-1)
    with pytest.raises(ValueError, match="reply_tokens: expected an int >= the span's length 2"):
        grounding([-1.0, -1.0], [-1.0, -1.0], reply_tokens=1)
    with pytest.raises(ValueError, match="grounding_tokens: expected a finite float >= 0"):
        CAGSRConfig(grounding_tokens=float("inf"))
    with pytest.raises(ValueError, match=r"cot_grounding: expected one of \('all', 'reasoning'\)"):
        CAGSRConfig(cot_grounding="answer")


def test_score_turn_adds_eta_times_grounding():
    rng = _rng("turn")
    T, P = 7, 20
    block, ids, hist = _block(rng, T, P), rng.integers(100, size=T), rng.integers(100, size=P)
    lp, lp0 = _logprobs(rng, T), _logprobs(rng, T)
    base = score_turn(block, [2, 5, 9], CAGSRConfig.attention_only(), response_ids=ids, history_ids=hist, sink=0)
    for eta in (0.0, 0.5, 2.0):
        ts = score_turn(block, [2, 5, 9], CAGSRConfig(eta=eta, grounding_tokens=0.0), response_ids=ids, history_ids=hist, sink=0,
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
    att, ids, prompt, lp, lp0 = _chain(rng, P, T)
    cfg = CAGSRConfig(eta=1.0, cot_block=5, mode="cot", grounding_tokens=0.0, cot_grounding="all")
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
    d = score_dialogue(turns, CAGSRConfig(eta=0.5, grounding_tokens=0.0))
    assert [s.grounding for s in d.turns] == pytest.approx(expected)


@pytest.mark.parametrize("cot_grounding", ["all", "reasoning"])
def test_score_cot_shrinks_blocks_by_the_chain_and_can_skip_the_answer(cot_grounding):
    rng = _rng(f"cot-t0:{cot_grounding}")
    P, T, T0 = 6, 17, 8.0
    att, ids, prompt, lp, lp0 = _chain(rng, P, T)
    cfg = CAGSRConfig(eta=1.0, cot_block=5, mode="cot", grounding_tokens=T0, cot_grounding=cot_grounding)
    cot = score_cot(att, P, [1, 3], ids, prompt, cfg, sink=0, answer_span=(10, 13), logprobs=lp, prior_logprobs=lp0)
    answer = [i for i, sp in enumerate(cot.spans) if tuple(sp) == (10, 13)]
    assert len(answer) == 1
    expected_total = 0.0
    plain = score_cot(att, P, [1, 3], ids, prompt, cfg.replace(eta=0.0), sink=0, answer_span=(10, 13))
    for i, ((s0, s1), block) in enumerate(zip(cot.spans, cot.blocks)):
        if cot_grounding == "reasoning" and i == answer[0]:
            assert block.grounding is None
            continue
        g = float(np.mean(lp[s0:s1] - lp0[s0:s1])) * T / (T + T0)
        assert block.grounding == pytest.approx(g)
        expected_total += cot.weights[i] * g
    assert cot.total == pytest.approx(plain.total + expected_total)
    # the answer turn needs no log-probabilities of its own under "reasoning", but the others still do
    with pytest.raises(ValueError, match="logprobs, prior_logprobs: required when eta > 0"):
        score_cot(att, P, [1, 3], ids, prompt, cfg, sink=0, answer_span=(10, 13))
