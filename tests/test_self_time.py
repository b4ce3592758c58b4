"""The benchmark's exclusive-time accounting (``benchmarks/_self_time.py``) on a fake clock: attncap frames are
charged their own time only, never the stock calls below them, and attncap frames nested under stock ones count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _self_time import SelfTimer  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_self_time_excludes_stock_callees_and_counts_nested_ours():
    clock = Clock()
    timer = SelfTimer(clock)

    def stock_inner(x):
        clock.t += 5.0  # stock work: not attncap's
        return ours_deep(x) + 1

    def ours_deep_raw(x):
        clock.t += 0.25  # attncap code called from inside stock code
        return x

    ours_deep = timer.wrap(ours_deep_raw, ours=True)
    stock = timer.wrap(stock_inner, ours=False)

    def ours_outer_raw(x):
        clock.t += 1.0  # before the stock call
        y = stock(x)
        clock.t += 2.0  # after it
        return y

    ours_outer = timer.wrap(ours_outer_raw, ours=True)
    assert ours_outer(3) == 4
    assert timer.total == pytest.approx(1.0 + 2.0 + 0.25)
    assert timer.calls == 2
    assert not timer._children  # every frame closed


def test_self_time_closes_frames_on_exceptions_and_patches_once():
    clock = Clock()
    timer = SelfTimer(clock)

    class Owner:
        def f(self):
            clock.t += 1.0
            raise KeyError("x")

    timer.patch(Owner, "f", ours=True)
    timer.patch(Owner, "f", ours=True)  # idempotent: not timed twice
    with pytest.raises(KeyError):
        Owner().f()
    assert timer.total == pytest.approx(1.0) and timer.calls == 1 and not timer._children


def test_patch_closure_times_the_wrapped_original():
    clock = Clock()
    timer = SelfTimer(clock)

    def make(orig):
        def wrapper(*a):
            clock.t += 0.5
            return orig(*a)
        return wrapper

    def vllm_method(x):
        clock.t += 10.0
        return x * 2

    w = make(vllm_method)
    timer.patch_closure(w)
    timed = timer.wrap(w, ours=True)
    assert timed(2) == 4
    assert timer.total == pytest.approx(0.5)
