"""Advantages from CAGSR returns: per turn (PPO over dialogue turns) and per chain-of-thought block (GRPO style).

Pure numpy: the trainers that apply them (``vllm_attncap.rl``) and any other trainer can share the same math.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["block_advantages", "turn_advantages"]


def turn_advantages(returns: Sequence[float], values: Sequence[float], *, normalize: bool = False) -> np.ndarray:
    """$A_t = G_t - V(H_t)$ per turn; with ``normalize``, standardised over the batch (std + 1e-8).

    Example:
        >>> turn_advantages([1.0, 0.5], [0.25, 0.5]).tolist()
        [0.75, 0.0]
    """
    g, v = np.asarray(returns, np.float64), np.asarray(values, np.float64)
    if g.shape != v.shape:
        raise ValueError(f"returns/values: shapes {g.shape} and {v.shape} differ")
    adv = g - v
    if normalize and adv.size > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return adv



def block_advantages(
    block_returns: list[np.ndarray], block_spans: list[list[tuple[int, int]]], group_size: int, width: int
) -> np.ndarray:
    r"""Per-token advantages from per-block returns-to-go, GRPO style (one group = ``group_size`` completions).

    A chain of thought is cut into turns (blocks of ``cot_block`` tokens, then the answer; method.md "Episodes").
    Every token of block $b$ of completion $i$ gets

    $$A_{i,s} = \frac{G_{i,b} - \frac{1}{|g|}\sum_{j \in g} G_{j,\min(b, B_j - 1)}}{\operatorname{std}_{j \in g} G_{j,0} + 10^{-4}},$$

    the block's return-to-go minus the group's mean return-to-go at the same block index (the last block of a
    shorter completion stands in), scaled by the group's spread of total returns $G_{j,0}$ as GRPO scales rewards.
    Tokens outside every span (padding) get 0.

    Args:
        block_returns: per completion, ``G`` (``(B_i,)``).
        block_spans: per completion, the ``(start, end)`` token span of each block (same length as its ``G``).
        group_size: completions per prompt (``num_generations``); ``len(block_returns)`` must be a multiple.
        width: columns of the output (the padded completion length).

    Returns:
        `np.ndarray` ``(len(block_returns), width)`` float32.

    Example:
        >>> import numpy as np
        >>> A = block_advantages([np.array([3.0, 1.0]), np.array([1.0])], [[(0, 2), (2, 3)], [(0, 2)]], 2, 3)
        >>> A.astype(float).round(3).tolist()  # std of totals (3, 1) is sqrt(2); block 1: 1 - mean(1, 1) = 0
        [[0.707, 0.707, 0.0], [-0.707, -0.707, 0.0]]
    """
    n = len(block_returns)
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size: {n} completions are not a multiple of {group_size}")
    out = np.zeros((n, width), dtype=np.float32)
    for g0 in range(0, n, group_size):
        group = [np.asarray(block_returns[j], dtype=np.float64) for j in range(g0, g0 + group_size)]
        if any(g.size == 0 for g in group):
            raise ValueError("block_returns: every completion needs at least one block")
        totals = np.array([g[0] for g in group])
        scale = (totals.std(ddof=1) if group_size > 1 else 0.0) + 1e-4
        for k, j in enumerate(range(g0, g0 + group_size)):
            spans = block_spans[j]
            if len(spans) != group[k].size:
                raise ValueError(f"block_spans[{j}]: {len(spans)} spans for {group[k].size} returns")
            for b, (s0, s1) in enumerate(spans):
                baseline = np.mean([g[min(b, g.size - 1)] for g in group])
                out[j, s0 : min(s1, width)] = (group[k][b] - baseline) / scale
    return out

