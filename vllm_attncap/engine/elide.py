"""The elided-column rule for long histories (method.md "Long histories", MTC §5.1),
in plain torch: the reference for the CUDA kernel ``elide_rows``.

When a history of ``P`` columns exceeds ``N_max`` (default 1024), a row keeps

- the sink columns ``0..sink-1``,
- the salient positions (history positions ``>= sink``),
- the most recent ``W`` positions ``max(sink, P-W)..P-1`` (default ``W = 512``),

and every other history column ``j`` in ``sink..P-1`` is *elided*: its mass is
summed into a single elided column

.. math:: e = \\sum_{j \\in E} a_j, \\qquad E = \\{sink..P-1\\} \\setminus (S \\cup R),

which counts as one outcome for the entropy and never as salient. Columns at
and after ``P`` (the generated tokens) are kept unchanged.

Layout of an elided row (our choice; method.md leaves it open): the kept
history columns in position order, with the elided column placed where the
first elided position was, then the columns after the history. Sink columns
therefore stay the leading columns, so ``reference.history_stats(out,
plan.out_history_len, sink, plan.salient)`` gives coverage and entropy under
the rule. A plan is data-independent (it depends only on ``P``, the width,
``sink`` and the salient set), so one plan serves every row and layer of a
request and its tables can live on the device for the whole request.

Example (``P = 6``, ``N_max = 4``, ``W = 2``, ``sink = 1``, salient ``{2}``;
positions 1 and 3 are elided):

    >>> import torch
    >>> plan = plan_elision(6, 7, sink=1, salient=[2], n_max=4, window=2)
    >>> plan.src_col.tolist(), plan.out_history_len, plan.salient
    ([0, -1, 2, 4, 5, 6], 5, (2,))
    >>> row = torch.tensor([[0.1, 0.2, 0.3, 0.1, 0.1, 0.1, 0.1]])
    >>> [round(x, 6) for x in apply_elision(row, plan)[0].tolist()]
    [0.1, 0.3, 0.3, 0.1, 0.1, 0.1]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from cagsr_reward.config import ELISION_N_MAX, ELISION_WINDOW  # the defaults: elide past N_max, keep the last W

__all__ = ["ELIDED", "ElisionPlan", "plan_elision", "apply_elision", "elide_history"]

#: ``src_col`` value of the elided column.
ELIDED = -1


@dataclass(frozen=True)
class ElisionPlan:
    """Which input column each output column takes (see the module docstring).

    Attributes:
        history_len: ``P``, history columns of the input rows.
        width: input row width (``>= P``).
        sink: leading sink columns (kept, never salient).
        src_col: ``(out_width,)`` int64: source column of each output column,
            :data:`ELIDED` for the elided column.
        elided: ``(width,)`` bool: input columns merged into the elided column.
        out_history_len: history columns of the output rows.
        salient: salient positions (``>= sink``) in output coordinates, sorted.
    """

    history_len: int
    width: int
    sink: int
    src_col: torch.Tensor
    elided: torch.Tensor
    out_history_len: int
    salient: tuple[int, ...]

    @property
    def out_width(self) -> int:
        return int(self.src_col.numel())

    @property
    def is_identity(self) -> bool:
        """True when nothing is elided (history within ``N_max`` or fully kept)."""
        return self.out_width == self.width and not bool(self.elided.any())


def plan_elision(
    history_len: int,
    width: int | None = None,
    *,
    sink: int = 0,
    salient: Iterable[int] = (),
    n_max: int = ELISION_N_MAX,
    window: int = ELISION_WINDOW,
) -> ElisionPlan:
    """Plan the elided-column rule for rows of ``width`` columns whose first
    ``history_len`` columns are the history.

    Args:
        history_len: ``P >= 1``.
        width: row width, ``>= P`` (default ``P``).
        sink: sink columns, ``0 <= sink < P``.
        salient: salient history positions (``0 <= s < P``); those ``< sink`` are
            ignored (sinks never count as salient).
        n_max: elide only when ``P > n_max`` (``>= 1``).
        window: most recent positions always kept (``>= 0``).

    Returns:
        An :class:`ElisionPlan`; the identity plan when ``P <= n_max``.

    Raises:
        ValueError: naming the argument that is out of range.
    """
    width = history_len if width is None else width
    if history_len < 1:
        raise ValueError(f"plan_elision: history_len must be >= 1, got {history_len}")
    if width < history_len:
        raise ValueError(f"plan_elision: width {width} is smaller than history_len {history_len}")
    if not 0 <= sink < history_len:
        raise ValueError(f"plan_elision: sink must be in 0..{history_len - 1}, got {sink}")
    if n_max < 1:
        raise ValueError(f"plan_elision: n_max must be >= 1, got {n_max}")
    if window < 0:
        raise ValueError(f"plan_elision: window must be >= 0, got {window}")
    sal = sorted(set(int(s) for s in salient))
    if sal and (sal[0] < 0 or sal[-1] >= history_len):
        raise ValueError(f"plan_elision: salient positions must lie in 0..{history_len - 1}, got {sal}")
    sal = [s for s in sal if s >= sink]

    kept = torch.ones(history_len, dtype=torch.bool)
    if history_len > n_max:
        kept[sink:max(sink, history_len - window)] = False
        if sal:
            kept[torch.tensor(sal, dtype=torch.long)] = True
    elided = torch.zeros(width, dtype=torch.bool)
    elided[:history_len] = ~kept

    kept_pos = torch.nonzero(kept).flatten()
    if bool(elided.any()):
        first = int(torch.nonzero(elided).flatten()[0])
        at = int((kept_pos < first).sum())  # kept columns before the first elided position
        hist_cols = torch.cat([kept_pos[:at], torch.tensor([ELIDED]), kept_pos[at:]])
    else:
        hist_cols = kept_pos
    src_col = torch.cat([hist_cols, torch.arange(history_len, width)]).to(torch.long)
    new_index = {int(c): i for i, c in enumerate(hist_cols.tolist()) if c != ELIDED}
    return ElisionPlan(
        history_len=history_len,
        width=width,
        sink=sink,
        src_col=src_col,
        elided=elided,
        out_history_len=int(hist_cols.numel()),
        salient=tuple(new_index[s] for s in sal),
    )


def apply_elision(probs: torch.Tensor, plan: ElisionPlan) -> torch.Tensor:
    """Apply a plan to rows ``probs (..., plan.width)``; returns ``(..., plan.out_width)`` float32."""
    if probs.shape[-1] != plan.width:
        raise ValueError(f"apply_elision: rows have {probs.shape[-1]} columns, the plan expects {plan.width}")
    p = probs.float()
    src = plan.src_col.to(p.device)
    out = p[..., src.clamp(min=0)]
    is_elided = src == ELIDED
    if bool(is_elided.any()):
        mass = (p * plan.elided.to(p.device, p.dtype)).sum(dim=-1, keepdim=True)
        out = torch.where(is_elided, mass, out)
    return out


def elide_history(
    probs: torch.Tensor,
    history_len: int,
    *,
    sink: int = 0,
    salient: Iterable[int] = (),
    n_max: int = ELISION_N_MAX,
    window: int = ELISION_WINDOW,
) -> tuple[torch.Tensor, ElisionPlan]:
    """Plan and apply the rule to rows ``probs (..., C)``; returns ``(rows, plan)``.

    Feed ``rows, plan.out_history_len, sink, plan.salient`` to
    :func:`vllm_attncap.engine.reference.history_stats` for the reward inputs.
    """
    plan = plan_elision(history_len, probs.shape[-1], sink=sink, salient=salient, n_max=n_max, window=window)
    return apply_elision(probs, plan), plan
