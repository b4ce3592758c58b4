"""cagsr_reward.scoring: score_turn, score_dialogue, score_cot and find_answer_span."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reward_reference import (
    ref_coverage,
    ref_entropy,
    ref_history_repetition,
    ref_repetition,
    ref_returns,
    ref_turn_reward,
)

from cagsr_reward.config import CAGSRConfig
from cagsr_reward.scoring import (
    CoTScore,
    DialogueScore,
    TurnInput,
    TurnScore,
    find_answer_span,
    score_cot,
    score_dialogue,
    score_turn,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HAND = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
H0 = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))  # 1.0297
H1 = -(0.1 * math.log(0.1) + 0.6 * math.log(0.6) + 0.3 * math.log(0.3))  # 0.8979



def _v02(**changes):
    """The 0.2 reading of the papers, which reward_reference.py implements: `CAGSRConfig.paper()` with the mean row
    entropy as a CoT block's focus. The new defaults (issue 25) are tested in test_scoring_defaults.py."""
    return CAGSRConfig.paper(**{"block_focus": "rows", **changes})

def _raises(arg, fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith(f"{arg}:"), str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# score_turn: hand-worked
# ---------------------------------------------------------------------------------------------------------------
def test_score_turn_hand():
    cfg = _v02(alpha=1.0, beta=0.1, gamma=0.5, ngram=1, h0=0.0, kappa=0.0)
    ts = score_turn(HAND, [1], cfg, sink=0, response_ids=[4, 5], history_ids=[4, 5, 6])
    assert isinstance(ts, TurnScore)
    assert ts.coverage == pytest.approx(0.45)
    assert ts.focus == pytest.approx(-(H0 + H1) / 2)
    assert ts.mean_entropy == pytest.approx((H0 + H1) / 2)
    assert ts.repetition == 1.0
    assert ts.reward == pytest.approx(0.45 - 0.1 * (H0 + H1) / 2 - 0.5)
    assert ts.num_tokens == 2 and ts.turn_index == 0 and ts.floor == 0.0 and ts.sink == 0
    assert sum(ts.components().values()) == pytest.approx(ts.reward)
    d = ts.as_dict()
    assert d["reward"] == ts.reward and d["coverage"] == ts.coverage and set(ts.components()) == {
        "coverage", "focus", "repetition", "grounding"}
    assert ts.grounding is None and ts.components()["grounding"] == 0.0  # no log-probabilities given


def test_score_turn_floor_grows_with_the_turn_index():
    cfg = _v02(alpha=0.0, beta=1.0, gamma=0.0, h0=0.5, kappa=0.25)
    # entropies 1.0297 and 0.8979: turn 0 (floor 0.5) clamps neither, turn 1 (0.75) neither,
    # turn 2 (floor 1.0) clamps row 1, turn 3 (1.25) clamps both
    rewards = [score_turn(HAND, [], cfg, turn_index=t, sink=0).reward for t in range(4)]
    assert rewards[0] == pytest.approx(-(H0 + H1) / 2)
    assert rewards[1] == pytest.approx(-(H0 + H1) / 2)
    assert rewards[2] == pytest.approx(-(H0 + 1.0) / 2)
    assert rewards[3] == pytest.approx(-1.25)
    assert score_turn(HAND, [], cfg, turn_index=3, sink=0).floor == 1.25
    # ablation: no floor at all
    no_floor = cfg.replace(entropy_floor=False)
    ts = score_turn(HAND, [], no_floor, turn_index=3, sink=0)
    assert ts.floor is None and ts.reward == pytest.approx(-(H0 + H1) / 2)


def test_score_turn_repetition_by_mode():
    block = np.full((6, 4), 0.25)
    response = [1, 2, 3, 1, 2, 3]
    history = [9, 1, 2, 3]
    multi = score_turn(block, [], _v02(), response_ids=response, history_ids=history, sink=0)
    single = score_turn(block, [], _v02(mode="single"), response_ids=response, sink=0)
    assert multi.repetition == pytest.approx(2 / 4)  # (1,2,3) twice among 4 trigrams
    assert single.repetition == pytest.approx(1 / 4)  # one repeated trigram
    assert score_turn(block, [], _v02(), sink=0).repetition == 0.0  # no ids: no penalty
    cot = score_turn(block, [], _v02(mode="cot"), response_ids=response, history_ids=history, sink=0)
    assert cot.repetition == multi.repetition


def test_score_turn_sink_resolution():
    block = np.array([[0.9, 0.05, 0.05]])
    cfg = _v02(alpha=0.0, beta=1.0, gamma=0.0, entropy_floor=False)
    with_bos = score_turn(block, [], cfg, history_ids=[1, 5, 6], bos_token_id=1)
    assert with_bos.sink == 1 and with_bos.focus == pytest.approx(-math.log(2))
    other_first = score_turn(block, [], cfg, history_ids=[7, 5, 6], bos_token_id=1)
    assert other_first.sink == 0
    assert score_turn(block, [], cfg).sink == 0  # BOS unknown: nothing dropped
    assert score_turn(block, [], cfg.replace(sink=1)).sink == 1
    assert score_turn(block, [], cfg.replace(sink=1), sink=0).sink == 0  # the argument wins
    # coverage on a sink position is ignored
    assert score_turn(block, [0, 1], _v02(), sink=1).coverage == pytest.approx(0.5)


def test_score_turn_history_coverage_ablation():
    block = np.array([[0.1, 0.2, 0.3, 0.4]])
    full = _v02(beta=0.0, gamma=0.0)
    ablated = full.replace(history_coverage=False)
    assert score_turn(block, [0, 3], full, sink=0).coverage == pytest.approx(0.5)
    # current user turn = positions 2..3: only salient position 3 counts, still renormalised over all history
    assert score_turn(block, [0, 3], ablated, sink=0, user_span=(2, 4)).coverage == pytest.approx(0.4)
    assert score_turn(block, [0, 3], full, sink=0, user_span=(2, 4)).coverage == pytest.approx(0.5)  # span unused
    assert score_turn(block, [0, 3], ablated, sink=0, user_span=(1, 3)).coverage == 0.0  # end is exclusive
    assert score_turn(block, [0, 3], ablated, sink=0, user_span=(0, 3)).coverage == pytest.approx(0.1)
    # single mode: the prompt is the current turn
    single = ablated.replace(mode="single")
    assert score_turn(block, [0, 3], single, sink=0).coverage == pytest.approx(0.5)
    _raises("user_span", score_turn, block, [0, 3], ablated, sink=0)
    _raises("user_span", score_turn, block, [0, 3], ablated, sink=0, user_span=(3, 2))
    _raises("user_span", score_turn, block, [0, 3], ablated, sink=0, user_span=(0, 5))
    _raises("user_span", score_turn, block, [0, 3], ablated, sink=0, user_span=(0,))


def test_score_turn_elides_long_histories():
    rng = np.random.default_rng(3)
    block = rng.random((4, 40))
    cfg = _v02(n_max=16, window=8, alpha=1.0, beta=1.0, gamma=0.0, entropy_floor=False)
    salient = [2, 5, 39]
    ts = score_turn(block, salient, cfg, sink=1)
    assert ts.elided_count == 40 - 1 - 3 - 8 + 1  # 29 merged (39 is in the window)
    reward, c, f = ref_turn_reward(block.tolist(), salient, alpha=1.0, beta=1.0, gamma=0.0, sink=1, floor=None,
                                   n_max=16, window=8, rep=0.0)
    assert ts.coverage == pytest.approx(c) and ts.focus == pytest.approx(f) and ts.reward == pytest.approx(reward)
    full = score_turn(block, salient, cfg.replace(n_max=40, window=8), sink=1)
    assert full.elided_count == 0
    assert full.coverage == pytest.approx(ts.coverage)  # elision keeps coverage
    assert full.focus < ts.focus  # and concentrates the entropy


def test_score_turn_accepts_float32_captures():
    rng = np.random.default_rng(4)
    block = rng.dirichlet(np.full(50, 0.3), size=8).astype(np.float32)
    cfg = _v02()
    a = score_turn(block, [1, 2, 3], cfg, sink=0)
    b = score_turn(block.astype(np.float64), [1, 2, 3], cfg, sink=0)
    assert a.reward == pytest.approx(b.reward, abs=1e-6)
    assert a.focus == pytest.approx(b.focus, abs=1e-6)


@st.composite
def turn_cases(draw):
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 24))
    sink = draw(st.integers(0, min(2, cols - 1)))
    vals = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-5, 1.0)), min_size=rows * cols, max_size=rows * cols))
    a = np.array(vals).reshape(rows, cols)
    a[:, -1] += 1e-4  # mass in the window, so elision can never empty a row
    salient = draw(st.lists(st.integers(0, cols - 1), max_size=cols))
    response = draw(st.lists(st.integers(0, 4), min_size=rows, max_size=rows))
    history = draw(st.lists(st.integers(0, 4), min_size=cols, max_size=cols))
    cfg = _v02(
        alpha=draw(st.floats(0, 2)),
        beta=draw(st.floats(0, 2)),
        gamma=draw(st.floats(0, 2)),
        ngram=draw(st.integers(1, 3)),
        h0=draw(st.floats(0, 2)),
        kappa=draw(st.floats(0, 1)),
        mode=draw(st.sampled_from(["single", "multi", "cot"])),
        n_max=(n_max := draw(st.integers(1, 30))),
        window=draw(st.integers(1, n_max)),
        entropy_floor=draw(st.booleans()),
        history_coverage=draw(st.booleans()),
    )
    start = draw(st.integers(0, cols))
    user_span = (start, draw(st.integers(start, cols)))
    return a, sink, salient, response, history, cfg, draw(st.integers(0, 6)), user_span


@FAST
@given(turn_cases())
def test_score_turn_matches_reference(case):
    a, sink, salient, response, history, cfg, t, user_span = case
    ts = score_turn(a, salient, cfg, turn_index=t, response_ids=response, history_ids=history, sink=sink,
                    user_span=user_span)
    floor = cfg.h0 + cfg.kappa * t if cfg.entropy_floor else None
    if cfg.mode == "single":
        rep = ref_repetition(response, cfg.ngram)
    else:
        rep = ref_history_repetition(response, history, cfg.ngram)
    reward, c, f = ref_turn_reward(a.tolist(), salient, alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma, sink=sink,
                                   floor=floor, n_max=cfg.n_max, window=cfg.window, rep=rep,
                                   user_span=None if cfg.history_coverage else user_span)
    assert ts.coverage == pytest.approx(c, rel=1e-10, abs=1e-12)
    assert ts.focus == pytest.approx(f, rel=1e-10, abs=1e-12)
    assert ts.repetition == pytest.approx(rep, abs=1e-15)
    assert ts.reward == pytest.approx(reward, rel=1e-10, abs=1e-12)
    assert ts.floor == (pytest.approx(floor) if floor is not None else None)
    assert sum(ts.components().values()) == pytest.approx(ts.reward, rel=1e-12, abs=1e-12)


def test_score_turn_errors():
    cfg = _v02()
    _raises("config", score_turn, HAND, [1], {"alpha": 1.0})
    _raises("block", score_turn, np.ones(3), [1], cfg)
    _raises("block", score_turn, np.array([[0.5, np.nan]]), [1], cfg)
    assert "row 0 has no history mass after dropping 1 sink" in _raises(
        "block", score_turn, np.array([[1.0, 0.0]]), [1], cfg, sink=1)
    _raises("salient", score_turn, HAND, [3], cfg)
    _raises("sink", score_turn, HAND, [1], cfg, sink=3)
    _raises("sink", score_turn, HAND, [1], cfg, sink=-1)
    _raises("turn_index", score_turn, HAND, [1], cfg, turn_index=-1)
    assert "length 3 != number of attention rows 2" in _raises(
        "response_ids", score_turn, HAND, [1], cfg, response_ids=[1, 2, 3], history_ids=[1, 2, 3])
    _raises("response_ids", score_turn, HAND, [1], cfg, response_ids=[0.5, 1.0], history_ids=[1, 2, 3])
    _raises("history_ids", score_turn, HAND, [1], cfg, response_ids=[1, 2])
    _raises("history_ids", score_turn, HAND, [1], cfg, response_ids=[1, 2], history_ids=[[1, 2, 3]])


# ---------------------------------------------------------------------------------------------------------------
# score_dialogue
# ---------------------------------------------------------------------------------------------------------------
def test_score_dialogue_hand():
    cfg = _v02(beta=0.0, gamma=0.0)
    t0 = TurnInput(np.array([[0.5, 0.5]]), [0])
    t1 = TurnInput(np.array([[0.2, 0.2, 0.6]]), [2])
    score = score_dialogue([t0, t1], cfg)
    assert isinstance(score, DialogueScore)
    np.testing.assert_allclose(score.rewards, [0.5, 0.6])
    np.testing.assert_allclose(score.weights, [1.0, 1.0])
    np.testing.assert_allclose(score.returns, [1.1, 0.6])
    assert score.total == pytest.approx(1.1)
    assert [t.turn_index for t in score.turns] == [0, 1]
    discounted = score_dialogue([t0, t1], cfg.replace(discount=0.5))
    np.testing.assert_allclose(discounted.returns, [0.5 + 0.3, 0.6])
    assert discounted.total == pytest.approx(1.1)  # R = sum_t w_t R_t is undiscounted
    assert score.as_dict()["total"] == score.total


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2**31), st.floats(0, 1), st.booleans())
def test_score_dialogue_matches_per_turn_scores(num_turns, seed, discount, uniform):
    rng = np.random.default_rng(seed)
    cfg = _v02(discount=discount, uniform_turn_weights=uniform, ngram=2)
    turns, history = [], list(rng.integers(0, 5, size=4))
    for _ in range(num_turns):
        rows = int(rng.integers(1, 5))
        block = rng.random((rows, len(history))) + 1e-3
        response = list(rng.integers(0, 5, size=rows))
        turns.append(TurnInput(block, [0, len(history) - 1], response, list(history), user_span=(0, len(history))))
        history = history + response + list(rng.integers(0, 5, size=2))
    score = score_dialogue(turns, cfg)
    expected = [
        score_turn(t.block, t.salient, cfg, turn_index=i, response_ids=t.response_ids, history_ids=t.history_ids,
                   sink=0).reward
        for i, t in enumerate(turns)
    ]
    np.testing.assert_allclose(score.rewards, expected, rtol=1e-12)
    np.testing.assert_allclose(score.weights, 1.0)  # dialogue turns: w_t = 1 (MTC §6)
    np.testing.assert_allclose(score.returns, ref_returns(expected, None, discount), rtol=1e-10, atol=1e-12)
    assert score.total == pytest.approx(sum(expected), rel=1e-10, abs=1e-12)


def test_score_dialogue_ablation_uses_each_turns_user_span():
    cfg = _v02(beta=0.0, gamma=0.0, history_coverage=False)
    t0 = TurnInput(np.array([[0.5, 0.5]]), [0, 1], user_span=(1, 2))
    score = score_dialogue([t0], cfg)
    assert score.rewards.tolist() == [0.5]
    _raises("user_span", score_dialogue, [TurnInput(np.array([[0.5, 0.5]]), [0])], cfg)


def test_score_dialogue_errors():
    cfg = _v02()
    t = TurnInput(np.array([[0.5, 0.5]]), [0])
    _raises("turns", score_dialogue, [], cfg)
    _raises("turns", score_dialogue, t, cfg)
    _raises("turns", score_dialogue, [t, (np.ones((1, 2)), [0])], cfg)
    _raises("config", score_dialogue, [t], None)


# ---------------------------------------------------------------------------------------------------------------
# chain of thought
# ---------------------------------------------------------------------------------------------------------------
def _uniform_causal(prompt_len, rows):
    att = np.zeros((rows, prompt_len + rows - 1))
    for s in range(rows):
        att[s, : prompt_len + s] = 1.0 / (prompt_len + s)
    return att


def test_score_cot_hand():
    att = _uniform_causal(2, 4)
    cfg = _v02(cot_block=2, beta=0.0, gamma=0.0, final_answer_weight=3.0)
    cot = score_cot(att, 2, [0], [7, 8, 9, 10], [1, 2], cfg, sink=0)
    assert isinstance(cot, CoTScore)
    assert cot.spans == ((0, 2), (2, 4)) and cot.answer_span == (2, 4)
    np.testing.assert_allclose(cot.weights, [1.0, 3.0])
    # block 0: history = 2 prompt columns, each row uniform over them -> 0.5; block 1: 4 columns -> 0.25
    np.testing.assert_allclose(cot.rewards, [0.5, 0.25])
    assert cot.total == pytest.approx(0.5 + 3 * 0.25)
    np.testing.assert_allclose(cot.returns, [1.25, 0.75])
    uniform = score_cot(att, 2, [0], [7, 8, 9, 10], [1, 2], cfg.replace(uniform_turn_weights=True), sink=0)
    np.testing.assert_allclose(uniform.weights, [1.0, 1.0])
    assert uniform.total == pytest.approx(0.75)
    assert len(cot.components()) == 2 and cot.as_dict()["spans"] == [[0, 2], [2, 4]]


def test_score_cot_blocks_answer_and_salient_generated_positions():
    prompt_len, rows = 3, 12
    att = _uniform_causal(prompt_len, rows)
    cfg = _v02(cot_block=5, beta=0.0, gamma=0.0)
    # salient: prompt position 1 and generated token y_2 (position P + 2 = 5)
    cot = score_cot(att, prompt_len, [1, 5], list(range(rows)), [0, 1, 2], cfg, answer_span=(10, 12), sink=0)
    assert cot.spans == ((0, 5), (5, 10), (10, 12))
    # block 0: history = 3 columns, salient {1} -> 1/3 per row
    # block 1: history = 8 columns, salient {1, 5} -> 2/8 per row; answer: history = 13 columns -> 2/13
    np.testing.assert_allclose(cot.rewards, [1 / 3, 2 / 8, 2 / 13])
    np.testing.assert_allclose(cot.weights, [1.0, 1.0, 2.0])
    # generated tokens after the answer span are not scored
    short = score_cot(att, prompt_len, [1], list(range(rows)), [0, 1, 2], cfg, answer_span=(5, 8), sink=0)
    assert short.spans == ((0, 5), (5, 8))
    assert sum(b.num_tokens for b in short.blocks) == 8


def test_score_cot_detects_the_answer_from_tokens():
    tokens = ["2", "+", "2", " is", " 4", ".", " The", " answer", " is", " 4", "."]
    att = _uniform_causal(2, len(tokens))
    cfg = _v02(cot_block=5)
    cot = score_cot(att, 2, [0], list(range(len(tokens))), [1, 2], cfg, response_tokens=tokens, sink=0)
    assert cot.answer_span == (9, 11)
    assert cot.spans == ((0, 5), (5, 9), (9, 11))
    fallback = score_cot(att, 2, [0], list(range(len(tokens))), [1, 2], cfg, sink=0)
    assert fallback.answer_span == (10, 11) and fallback.spans[-1] == (10, 11)


@st.composite
def cot_cases(draw):
    prompt_len = draw(st.integers(1, 6))
    rows = draw(st.integers(1, 14))
    cols = prompt_len + rows - 1
    a = np.zeros((rows, cols))
    for s in range(rows):
        vals = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-4, 1.0)), min_size=prompt_len + s,
                             max_size=prompt_len + s))
        a[s, : prompt_len + s] = vals
        a[s, prompt_len - 1] += 1e-3  # some mass on the prompt (every block's history contains it)
    block = draw(st.integers(1, 5))
    start = draw(st.integers(0, rows - 1))
    end = draw(st.integers(start + 1, rows))
    salient = draw(st.lists(st.integers(0, cols - 1), max_size=6))
    ids = draw(st.lists(st.integers(0, 3), min_size=rows, max_size=rows))
    prompt = draw(st.lists(st.integers(0, 3), min_size=prompt_len, max_size=prompt_len))
    cfg = _v02(cot_block=block, ngram=2, h0=draw(st.floats(0, 1)), kappa=draw(st.floats(0, 0.5)),
                      uniform_turn_weights=draw(st.booleans()), discount=draw(st.floats(0, 1)))
    return a, prompt_len, salient, ids, prompt, cfg, (start, end)


@settings(max_examples=60, deadline=None)
@given(cot_cases())
def test_score_cot_matches_reference(case):
    a, prompt_len, salient, ids, prompt, cfg, span = case
    cot = score_cot(a, prompt_len, salient, ids, prompt, cfg, answer_span=span, sink=0)
    k = cfg.cot_block
    spans = [(b, min(b + k, span[0])) for b in range(0, span[0], k)] + [span]
    assert list(cot.spans) == spans
    rewards = []
    for b, (s0, s1) in enumerate(spans):
        hist = prompt_len + s0
        rows = [list(a[s, :hist]) for s in range(s0, s1)]
        sal = [i for i in salient if i < hist]
        floor = cfg.h0 + cfg.kappa * b
        hs = [max(h, floor) for h in ref_entropy(rows, 0)]
        rep = ref_history_repetition(ids[s0:s1], prompt + ids[:s0], cfg.ngram)
        rewards.append(cfg.alpha * ref_coverage(rows, sal, 0) - cfg.beta * sum(hs) / len(hs) - cfg.gamma * rep)
    weights = [1.0] * len(spans)
    if not cfg.uniform_turn_weights:
        weights[-1] = cfg.final_answer_weight
    np.testing.assert_allclose(cot.rewards, rewards, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cot.weights, weights)
    np.testing.assert_allclose(cot.returns, ref_returns(rewards, weights, cfg.discount), rtol=1e-10, atol=1e-12)
    assert cot.total == pytest.approx(sum(w * r for w, r in zip(weights, rewards)), rel=1e-10, abs=1e-12)


def test_score_cot_errors():
    att = _uniform_causal(2, 4)
    cfg = _v02(cot_block=2)
    ok = dict(salient=[0], response_ids=[1, 2, 3, 4], prompt_ids=[1, 2], config=cfg)

    def call(att=att, prompt_len=2, **kw):
        args = {**ok, **kw}
        return score_cot(att, prompt_len, args.pop("salient"), args.pop("response_ids"), args.pop("prompt_ids"),
                         args.pop("config"), sink=0, **args)

    call()
    _raises("attention_2d", call, att=np.ones(5))
    _raises("prompt_len", call, prompt_len=3)
    _raises("prompt_len", call, prompt_len=0)
    _raises("response_ids", call, response_ids=[1, 2, 3])
    _raises("prompt_ids", call, prompt_ids=[1])
    _raises("salient", call, salient=[5])
    _raises("config", call, config=None)
    _raises("answer_span", call, answer_span=(2, 2))
    _raises("answer_span", call, answer_span=(3, 5))
    _raises("answer_span", call, answer_span=(-1, 2))
    _raises("response_tokens", call, response_tokens=["a", "b"])
    # a block whose history rows carry no mass is reported, not turned into NaN
    bad = att.copy()
    bad[3, :4] = 0.0  # row 3 looks only at y_2 (column P + 2), which is inside its own turn
    bad[3, 4] = 1.0
    assert "row 1 has no history mass" in _raises("block", call, att=bad, answer_span=(2, 4))


# ---------------------------------------------------------------------------------------------------------------
# find_answer_span
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tokens", "span"),
    [
        (["2", "+", "2", " =", " 4", ".", " The", " answer", " is", " 4", "."], (9, 11)),
        (["x", "Answer", ":", " 42"], (3, 4)),
        (["so", " ####", " 7", "2"], (2, 4)),
        (["\\boxed", "{", "3", "}"], (2, 4)),
        (["the ans", "wer is", " 5"], (2, 3)),
        (["answer is", " 1", " answer is", " 2"], (3, 4)),  # the last marker wins
        (["ANSWER:", "9"], (1, 2)),  # case-insensitive
        (["the answer is", "5!"], (1, 2)),
        (["#", "###4"], (1, 2)),  # the marker straddles tokens; the token holding its end starts the answer
        (["a", "b", "c", "d", "e", "f", "g"], (5, 7)),  # no marker: last block
        (["a", "b", "answer is"], (0, 3)),  # marker with nothing after: last block
        (["a"], (0, 1)),
    ],
)
def test_find_answer_span(tokens, span):
    assert find_answer_span(tokens, block=5) == span


def test_find_answer_span_with_offsets_and_errors():
    text = "x = 3. Answer: 3"
    offsets = [(0, 1), (1, 3), (3, 5), (5, 6), (6, 13), (13, 14), (14, 16)]
    assert find_answer_span(text=text, offsets=offsets) == (6, 7)
    assert find_answer_span(text=text, offsets=offsets + [(0, 0)]) == (6, 8)  # a trailing special token
    _raises("offsets", find_answer_span, text=text, offsets=[(0, "x")])
    assert find_answer_span(["a"] * 12, block=5) == (10, 12)
    assert find_answer_span(["a"] * 10, block=5) == (5, 10)
    _raises("block", find_answer_span, ["a"], block=0)
    _raises("tokens", find_answer_span)
    _raises("tokens", find_answer_span, [])
    _raises("tokens", find_answer_span, "answer is 4")
    _raises("tokens", find_answer_span, [1, 2])
    _raises("text", find_answer_span, text=b"x", offsets=[(0, 1)])
