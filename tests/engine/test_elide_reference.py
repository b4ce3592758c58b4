"""The elided-column reference (vllm_attncap/engine/elide.py) against a plain
loop written straight from method.md "Long histories"."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_attncap.engine.elide import ELIDED, apply_elision, elide_history, plan_elision
from vllm_attncap.engine.reference import history_stats


def elide_loop(row, history_len, sink, salient, n_max, recent):
    """One row, by hand: (output row, output history length, salient output indices)."""
    if history_len <= n_max:
        return list(row), history_len, sorted(s for s in set(salient) if s >= sink)
    keep = set(range(sink))
    keep |= {s for s in salient if sink <= s < history_len}
    keep |= set(range(max(sink, history_len - recent), history_len))
    elided = [j for j in range(sink, history_len) if j not in keep]
    mass = 0.0
    for j in elided:
        mass += row[j]
    out, index_of, placed = [], {}, False
    for j in range(history_len):
        if j in keep:
            index_of[j] = len(out)
            out.append(row[j])
        elif not placed:  # the elided column sits where the first elided position was
            out.append(mass)
            placed = True
    new_hist = len(out)
    out.extend(row[history_len:])
    return out, new_hist, sorted(index_of[s] for s in set(salient) if s >= sink)


def random_rows(gen: torch.Generator, shape, width):
    """Probability-like rows with exact zeros right of a random causal limit."""
    logits = torch.randn(*shape, width, generator=gen) * 2
    rows = torch.softmax(logits, dim=-1)
    limit = torch.randint(1, width + 1, shape, generator=gen)
    rows = rows * (torch.arange(width) < limit[..., None])
    return rows


def check_against_loop(rows, history_len, sink, salient, n_max, recent):
    out, plan = elide_history(rows, history_len, sink=sink, salient=salient, n_max=n_max, window=recent)
    flat_in = rows.reshape(-1, rows.shape[-1])
    flat_out = out.reshape(-1, out.shape[-1])
    for r in range(flat_in.shape[0]):
        want, want_hist, want_sal = elide_loop(flat_in[r].tolist(), history_len, sink, salient, n_max, recent)
        assert plan.out_history_len == want_hist
        assert list(plan.salient) == want_sal
        assert flat_out.shape[-1] == len(want)
        torch.testing.assert_close(flat_out[r], torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=1e-7)
    return out, plan


@pytest.mark.parametrize("seed", range(12))
def test_random_plans_match_loop(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    history_len = rng.randint(1, 300)
    width = history_len + rng.randint(0, 40)
    n_max = rng.randint(1, 200)
    recent = rng.randint(0, 120)
    sink = rng.randint(0, min(4, history_len - 1))
    salient = rng.sample(range(history_len), k=rng.randint(0, min(25, history_len)))
    rows = random_rows(gen, (2, 3), width)
    check_against_loop(rows, history_len, sink, salient, n_max, recent)


@settings(max_examples=150, deadline=None)
@given(
    history_len=st.integers(1, 64),
    extra=st.integers(0, 8),
    n_max=st.integers(1, 70),
    recent=st.integers(0, 70),
    sink=st.integers(0, 4),
    salient=st.lists(st.integers(0, 63), max_size=12),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_plans_match_loop(history_len, extra, n_max, recent, sink, salient, seed):
    sink = min(sink, history_len - 1)
    salient = [s for s in salient if s < history_len]
    rows = random_rows(torch.Generator().manual_seed(seed), (3,), history_len + extra)
    check_against_loop(rows, history_len, sink, salient, n_max, recent)


def test_short_history_is_unchanged():
    gen = torch.Generator().manual_seed(0)
    rows = random_rows(gen, (4,), 50)
    for history_len, n_max in ((40, 40), (40, 1024), (1, 1)):
        out, plan = elide_history(rows, history_len, sink=1 if history_len > 1 else 0, salient=[0], n_max=n_max)
        assert plan.is_identity
        assert torch.equal(out, rows)
        assert plan.src_col.tolist() == list(range(50))


def test_sinks_stay_leading_and_salient_inside_elided_range_is_kept():
    history_len, width, sink = 2000, 2010, 2
    salient = [1, 5, 700, 1600]  # 1 is a sink (ignored), 5 and 700 lie in the elided range, 1600 in the recent window
    plan = plan_elision(history_len, width, sink=sink, salient=salient, n_max=1024, window=512)
    src = plan.src_col.tolist()
    assert src[:2] == [0, 1]  # sink columns first
    assert src[2] == ELIDED  # first elided position is 2
    assert src[3:5] == [5, 700]
    assert src[5:5 + 512] == list(range(1488, 2000))
    assert src[5 + 512:] == list(range(2000, 2010))
    assert plan.out_history_len == 2 + 1 + 2 + 512
    assert [src[i] for i in plan.salient] == [5, 700, 1600]
    assert int(plan.elided.sum()) == (1488 - 2) - 2
    assert not plan.elided[[0, 1, 5, 700] + list(range(1488, 2010))].any()


def test_mass_is_conserved_and_stats_count_elided_as_one_outcome():
    gen = torch.Generator().manual_seed(3)
    history_len, width = 1500, 1530
    rows = torch.softmax(torch.randn(5, width, generator=gen), dim=-1)
    salient = [10, 20, 1400]
    out, plan = elide_history(rows, history_len, sink=1, salient=salient)
    torch.testing.assert_close(out[:, :plan.out_history_len].sum(-1), rows[:, :history_len].sum(-1), rtol=1e-5, atol=1e-6)
    cov, ent = history_stats(out, plan.out_history_len, 1, torch.tensor(plan.salient))
    # by hand: renormalised block = kept columns plus one elided outcome
    for r in range(rows.shape[0]):
        row, hist, sal = elide_loop(rows[r].tolist(), history_len, 1, salient, 1024, 512)
        block = row[1:hist]
        total = sum(block)
        p = [x / total for x in block]
        want_ent = -sum(x * math.log(x) for x in p if x > 0)
        want_cov = sum(row[i] for i in sal) / total
        assert math.isclose(float(ent[r]), want_ent, rel_tol=1e-5)
        assert math.isclose(float(cov[r]), want_cov, rel_tol=1e-5)


def test_everything_salient_means_no_elided_column():
    plan = plan_elision(10, 10, sink=1, salient=range(1, 10), n_max=4, window=2)
    assert plan.is_identity and ELIDED not in plan.src_col.tolist()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(history_len=0), "history_len"),
        (dict(history_len=5, width=4), "width"),
        (dict(history_len=5, sink=5), "sink"),
        (dict(history_len=5, salient=[5]), "salient"),
        (dict(history_len=5, n_max=0), "n_max"),
        (dict(history_len=5, window=-1), "window"),
    ],
)
def test_plan_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_elision(**kwargs)


def test_apply_checks_width():
    plan = plan_elision(5, 6)
    with pytest.raises(ValueError, match="columns"):
        apply_elision(torch.zeros(2, 7), plan)


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_the_reward_sdk(seed):
    """Capture-side elision (torch) and reward-side elision (cagsr_reward, numpy) give the same block."""
    aggregate = pytest.importorskip("cagsr_reward.aggregate")
    if not hasattr(aggregate, "elide"):
        pytest.skip("cagsr_reward.aggregate.elide not available")
    rng = random.Random(100 + seed)
    history_len = rng.randint(1, 400)
    n_max, recent = rng.randint(1, 300), rng.randint(0, 200)
    sink = rng.randint(0, min(3, history_len - 1))
    salient = sorted(rng.sample(range(history_len), k=rng.randint(0, min(20, history_len))))
    rows = random_rows(torch.Generator().manual_seed(seed), (4,), history_len + 9).double()
    out, plan = elide_history(rows, history_len, sink=sink, salient=salient, n_max=n_max, window=recent)
    sdk = aggregate.elide(rows[:, :history_len].numpy(), salient, n_max=n_max, window=recent, sink=sink)
    assert plan.src_col[:plan.out_history_len].tolist() == sdk.columns.tolist()
    assert list(plan.salient) == sdk.salient.tolist()
    torch.testing.assert_close(out[:, :plan.out_history_len], torch.from_numpy(sdk.block).float(), rtol=1e-5, atol=1e-7)
