"""Reward validity without training: does the CAGSR reward prefer the real next reply to a wrong one?

For every held-out item (a recorded dialogue history cut at a user turn, or a CHAMP problem) three continuations are
scored with teacher-forced attention (:class:`~cagsr_reward.sources.hf.HFAttentionSource`: the attention the model
puts on the history while reading the continuation, exactly the capture layout):

- ``real``: the recorded next reply (dialogues) / the reference solution ending with ``The answer is <answer>.``
  (CHAMP);
- ``other``: the same kind of text taken from another item (another dialogue / problem);
- ``shuffled``: the real continuation with its tokens in a random order (same tokens, no syntax).

All three are cut to the same token cap. For the total reward and for each component as it enters the reward
(coverage, focus, minus repetition), :func:`validity_table` reports the paired AUROC of real against each negative
(the probability that, for the same prompt, the real continuation scores above the wrong one, ties 1/2; 0.5 = no
signal) with a 95% bootstrap interval over items, and the pooled AUROC (all real vs all negative scores, across
prompts). The paired one is the test: an ``other`` negative is another item's real reply, so the pooled score
distributions contain the same texts and pooled AUROC is pulled towards 0.5 by construction.

numpy only at import time; torch and transformers load inside :class:`HFAttentionSource`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cagsr_reward.config import CAGSRConfig
from cagsr_reward.integrations.trl import _components, cagsr_reward_func
from cagsr_reward.metrics import bootstrap_auroc
from cagsr_reward.salient import SalientSelector

__all__ = ["NEGATIVES", "COMPONENTS", "continuation_sets", "score_continuations", "validity_table"]

NEGATIVES = ("other", "shuffled")
COMPONENTS = ("reward", "coverage", "focus", "neg_repetition")


def _derangement(n: int, rng: np.random.Generator, groups: Sequence[str]) -> list[int]:
    """A permutation with ``groups[perm[i]] != groups[i]`` for every i (another dialogue / problem)."""
    for _ in range(1000):
        perm = rng.permutation(n)
        if all(groups[int(p)] != groups[i] for i, p in enumerate(perm)):
            return [int(p) for p in perm]
    raise ValueError("continuation_sets: cannot pair every item with another group's text (too few groups)")


def continuation_sets(
    texts: Sequence[str], groups: Sequence[str], tokenizer: Any, *, max_tokens: int, seed: int = 0
) -> dict[str, list[list[int]]]:
    """Token ids of the ``real``, ``other`` and ``shuffled`` continuation of every item (each cut to ``max_tokens``).

    ``texts[i]`` is item i's real continuation, ``groups[i]`` its dialogue / problem (``other`` comes from another
    group).
    """
    rng = np.random.default_rng(seed)
    real = [tokenizer.encode(t, add_special_tokens=False)[:max_tokens] or [tokenizer.eos_token_id] for t in texts]
    perm = _derangement(len(texts), rng, groups)
    other = [real[p] for p in perm]
    shuffled = [[r[int(i)] for i in rng.permutation(len(r))] for r in real]
    return {"real": real, "other": other, "shuffled": shuffled}


def score_continuations(
    source: Any,
    prompts: Sequence[Any],
    continuations: Mapping[str, Sequence[Sequence[int]]],
    configs: Mapping[str, CAGSRConfig],
    *,
    tokenizer: Any,
    selector: SalientSelector,
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``scores[config][kind][component]``: one value per item, from one teacher-forced attention per
    (item, kind) shared by every config (the source's layers must cover every config's)."""
    rewards = {name: cagsr_reward_func(cfg, tokenizer=tokenizer, selector=selector) for name, cfg in configs.items()}
    out: dict[str, dict[str, dict[str, list[float]]]] = {
        name: {kind: {c: [] for c in COMPONENTS} for kind in continuations} for name in configs
    }
    encodings = {name: [r.encode(p) for p in prompts] for name, r in rewards.items()}
    first = next(iter(rewards))
    for kind, conts in continuations.items():
        for i, (prompt, completion) in enumerate(zip(prompts, conts)):
            cap = source.capture(list(encodings[first][i].input_ids), list(completion))
            for name, reward in rewards.items():
                cfg = configs[name]
                a2d = cap.aggregate(cfg.layers, cfg.heads)
                parts = _components(reward.score(encodings[name][i], prompt, list(completion), a2d))
                for c in ("reward", "coverage", "focus"):
                    out[name][kind][c].append(parts[c])
                out[name][kind]["neg_repetition"].append(-parts["repetition"])
    return out


def validity_table(
    scores: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]], *, seed: int = 0
) -> list[dict[str, Any]]:
    """One row per (config, component, negative): ``auroc`` (paired), ``low``, ``high`` (95% bootstrap over items),
    ``pooled_auroc`` with ``pooled_low`` / ``pooled_high``, ``win_rate`` (real strictly above its negative), and
    the mean of real and negative."""
    rows = []
    for name, kinds in scores.items():
        for neg in NEGATIVES:
            if neg not in kinds:
                continue
            for comp in COMPONENTS:
                pos, negv = np.asarray(kinds["real"][comp]), np.asarray(kinds[neg][comp])
                est, lo, hi = bootstrap_auroc(pos, negv, seed=seed)
                pooled, plo, phi = bootstrap_auroc(pos, negv, paired=False, seed=seed, num_samples=500)
                rows.append(
                    {
                        "config": name,
                        "component": comp,
                        "negative": neg,
                        "auroc": est,
                        "low": lo,
                        "high": hi,
                        "pooled_auroc": pooled,
                        "pooled_low": plo,
                        "pooled_high": phi,
                        "win_rate": float(np.mean(pos > negv)),
                        "mean_real": float(np.mean(pos)),
                        "mean_negative": float(np.mean(negv)),
                        "num_items": int(pos.size),
                    }
                )
    return rows
