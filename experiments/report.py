"""The training section of docs/experiments.md, generated from the committed unit JSONs (no model, numpy only).

    python -m experiments.training --report-only      # rewrites the section between the markers below

Statistics: per unit and checkpoint, each held-out dialogue's mean of a metric over its replies; an arm's value is
the mean over dialogues of the mean over its seeds; intervals are 95% percentile bootstrap intervals that resample
dialogues and, independently for each arm, its seeds (:func:`two_level_bootstrap`). A paired difference A - B uses
the same held-out dialogues on both sides.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .training import ARMS, RESULTS, SIZES, UNITS

__all__ = ["BEGIN", "END", "load_units", "render", "two_level_bootstrap", "update_doc"]

BEGIN = "<!-- BEGIN training (generated) -->"
END = "<!-- END training (generated) -->"

#: (key in a row, column title, digits)
METRICS = (("ngram_overlap", "n-gram overlap", 3), ("bleu", "BLEU", 2), ("embed_sim", "embed sim", 3),
           ("consistency", "consistency", 3), ("reward", "default reward", 3), ("reply_words", "reply words", 1),
           ("kl_to_start", "KL to start", 4), ("recall", "recall (hypothesis task)", 3))
#: the comparisons the report makes (A - B), the positive control first
PAIRS = (("length", "untrained"), ("default", "untrained"), ("default", "random"), ("default", "self_certainty"),
         ("default", "paper"), ("default", "single"), ("paper", "untrained"), ("single", "untrained"),
         ("random", "untrained"), ("self_certainty", "untrained"), ("ngram", "untrained"))
EVAL_KEYS = ("heldout_chitchat", "heldout_tech", "turns_per_episode", "eval_max_new_tokens", "recall_items")
MIN_SEEDS = 3
#: the positive control: its arm, its own held-out metric and the direction training on it must move that metric
#: (the length reward pulls replies towards 6 words from the untrained ~17: reply words must fall)
POSITIVE_CONTROL = ("length", "reply_words", -1)
#: seeds the positive control needs: one, since its effect is many times its interval (docs/experiments.md)
POSITIVE_CONTROL_SEEDS = 1


def load_units(folder: Path) -> dict[str, dict[str, Any]]:
    """Every ``<unit>.json`` under ``folder`` that belongs to the registry."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json")) if p.stem in UNITS}


def _current_budget(unit: Mapping[str, Any]) -> bool:
    """Whether the unit ran with the budget the grid now uses (units of an earlier budget are not compared), and, for
    the arms defined by ``CAGSRConfig()``'s defaults (``default``; ``random``, whose scale is the default reward's),
    with the defaults of this checkout."""
    want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in SIZES["full"].items()}
    got = unit.get("budget", {})
    keys = EVAL_KEYS if unit.get("arm") == "untrained" else tuple(want)
    if unit.get("size") != "full" or any(got.get(k) != want[k] for k in keys):
        return False
    if unit.get("arm") in ("default", "random"):
        return _json(unit["checkpoints"][-1].get("reward_config")) == _json(_default_config())
    return True


def _default_config() -> dict[str, Any]:
    from cagsr_reward.config import CAGSRConfig

    return json.loads(json.dumps(CAGSRConfig().to_dict()))


def _json(x: Any) -> str:
    return json.dumps(x, sort_keys=True)


def _same_reward_config(*sides: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every unit on these sides scored its held-out replies with the same CAGSR config."""
    return len({_json(c.get("reward_config")) for side in sides for u in side for c in u["checkpoints"]}) <= 1


def _scored_now(u: Mapping[str, Any]) -> bool:
    """Whether every checkpoint of the unit scored its held-out replies with the current default CAGSR config."""
    current = _json(_default_config())
    return all(_json(c.get("reward_config")) == current for c in u["checkpoints"])


def _reward_units(arm_units: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The units whose default-reward values are averaged for an arm: those scored with the current config when
    there are any (an arm's seeds may straddle a change of the default), else all of them (the cell is then marked
    †)."""
    return [u for u in arm_units if _scored_now(u)] or list(arm_units)


def _sides(key: str, ua: Sequence[Mapping[str, Any]], ub: Sequence[Mapping[str, Any]]):
    """The two sides of a difference on ``key``: all units, but for the default reward (``"reward"``) with configs
    that differ, each side's units scored with the current config; None when a side then has none (the configs
    differ)."""
    if key != "reward" or _same_reward_config(ua, ub):
        return list(ua), list(ub)
    ca, cb = [u for u in ua if _scored_now(u)], [u for u in ub if _scored_now(u)]
    return (ca, cb) if ca and cb else None


def _subset_note(sa: Sequence[Any], sb: Sequence[Any], ua: Sequence[Any], ub: Sequence[Any]) -> str:
    """" (k / m seeds)" when a default-reward difference uses fewer seeds than the arms have (see
    :func:`_sides`)."""
    return f" ({len(sa)} / {len(sb)} seeds)" if (len(sa), len(sb)) != (len(ua), len(ub)) else ""


def _rescored_note(units: Mapping[str, Mapping[str, Any]]) -> str:
    """The learning-curve caption's word on re-scored units: their checkpoints were evaluated again, their training
    history (the monitor columns) was not."""
    names = sorted(n for n, u in units.items() if u.get("rescored"))
    if not names:
        return ""
    return (" Re-scored units (" + ", ".join(f"`{n}`" for n in names) + ") keep the training history they logged, so "
            "their monitor columns are in the default reward of their training time.")


def dialogue_means(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, float]:
    """Per dialogue (``episode_id``), the mean of ``key`` over its replies (missing and non-finite values dropped)."""
    by: dict[str, list[float]] = {}
    for r in rows:
        v = r.get(key)
        if v is not None and np.isfinite(v):
            by.setdefault(r["episode_id"], []).append(float(v))
    return {g: float(np.mean(v)) for g, v in by.items()}


def two_level_bootstrap(a: Sequence[Mapping[str, float]], b: Sequence[Mapping[str, float]] | None = None, *,
                        num_samples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(estimate, low, high)`` of mean_d [mean_{s in A} a_s(d) - mean_{s in B} b_s(d)] (or of arm A alone when
    ``b`` is None), over the dialogues d present in every seed of both arms.

    ``a`` / ``b``: one ``{dialogue: value}`` per seed. Each bootstrap sample resamples the dialogues, and the seeds
    of each arm independently, with replacement. With one seed per arm it is the usual bootstrap over dialogues.

    Example:
        >>> two_level_bootstrap([{"x": 1.0, "y": 3.0}], [{"x": 0.0, "y": 1.0}])[0]   # mean of (1, 2)
        1.5
    """
    if not a:
        raise ValueError("two_level_bootstrap: arm A has no seeds")
    sides = [a] + ([b] if b else [])
    common = sorted(set.intersection(*(set(s) for side in sides for s in side)))
    if not common:
        return float("nan"), float("nan"), float("nan")
    mats = [np.array([[s[d] for d in common] for s in side], np.float64) for side in sides]  # (seeds, dialogues)

    def stat(m_idx: list[np.ndarray], d_idx: np.ndarray) -> float:
        vals = mats[0][m_idx[0]][:, d_idx].mean(axis=0)
        if len(mats) == 2:
            vals = vals - mats[1][m_idx[1]][:, d_idx].mean(axis=0)
        return float(vals.mean())

    est = stat([np.arange(len(m)) for m in mats], np.arange(len(common)))
    rng = np.random.default_rng(seed)
    boots = np.empty(num_samples)
    for i in range(num_samples):
        d_idx = rng.integers(0, len(common), len(common))
        boots[i] = stat([rng.integers(0, len(m), len(m)) for m in mats], d_idx)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return est, float(lo), float(hi)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}".replace("-", "−")


def _ci(t: tuple[float, float, float], digits: int = 3) -> str:
    return f"{_fmt(t[0], digits)} [{_fmt(t[1], digits)}, {_fmt(t[2], digits)}]"


def _reading(t: tuple[float, float, float]) -> str:
    est, lo, hi = t
    if not np.isfinite(est):
        return "–"
    if lo > 0:
        return "up"
    if hi < 0:
        return "down"
    return "no difference established"


def _by_arm(units: Mapping[str, Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    arms: dict[str, list] = {}
    for name, u in units.items():
        if _current_budget(u):
            arms.setdefault(u["arm"], []).append(u)
    for v in arms.values():
        v.sort(key=lambda u: u["seed"])
    return arms


def _final(u: Mapping[str, Any]) -> Mapping[str, Any]:
    return u["checkpoints"][-1]


def _seeds(arm_units: Sequence[Mapping[str, Any]], key: str, step: int | None = None) -> list[dict[str, float]]:
    """Per seed, ``{dialogue: value of key}`` at ``step`` (None: the last checkpoint). ``key`` ``"recall"`` reads the
    hypothesis task's episodes (``correct`` per episode) instead of the held-out dialogues."""
    out = []
    for u in arm_units:
        cps = [c for c in u["checkpoints"] if step is None or c["step"] == step]
        if cps:
            cp = cps[-1] if step is None else cps[0]
            if key == "recall":
                out.append(dialogue_means(cp.get("recall", {}).get("rows", []), "correct"))
            else:
                out.append(dialogue_means(cp["rows"], key))
    return out


def _pending_reason(arm: str) -> str:
    if arm == "paper":
        from cagsr_reward.config import CAGSRConfig

        if getattr(CAGSRConfig, "paper", None) is None:
            return "pending: needs `CAGSRConfig.paper()`, absent in this checkout"
    return "pending"


def _budget_probes(folder: Path, base: Sequence[Mapping[str, Any]]) -> list[str]:
    """The positive-control runs of earlier budgets (``budget-probes/*.json``): how the budget above was chosen."""
    probes = sorted(Path(folder, "budget-probes").glob("*.json"))
    if not probes:
        return []
    L = ["### How the budget was chosen (positive-control probes, seed 0)", "",
         "The budgets tried for the n-gram control (the positive control until none of these passed), in order, "
         "each a unit JSON in `experiments/results/training/budget-probes/`; the grid's budget is 32 steps of the "
         "third probe's. Only the n-gram arm was used to choose the budget, and only its own metric decided.", "",
         "| steps × completions (prompts × generations), learning rate | held-out n-gram overlap − untrained | "
         "KL to start | reply words | wall time |", "|---|---|---|---|---|"]
    for p in probes:
        u = json.loads(p.read_text())
        b = u.get("budget", {})
        t = two_level_bootstrap(_seeds([u], "ngram_overlap"), _seeds(base, "ngram_overlap")) if base else None
        kl = two_level_bootstrap(_seeds([u], "kl_to_start"))[0]
        words = two_level_bootstrap(_seeds([u], "reply_words"))[0]
        gens = b.get("num_generations", 1)
        L.append(f"| {b.get('steps')} × {b.get('batch_size')} ({b.get('batch_size', 0) // gens} × {gens}), "
                 f"{b.get('learning_rate', float('nan')):g} | "
                 f"{_ci(t) if t else 'no untrained unit'} | {_fmt(kl, 4)} | {_fmt(words, 1)} | "
                 f"{u.get('wall_seconds', 0):.0f} s |")
    return L + [""]


def render(folder: Path = RESULTS) -> str:
    """The generated section (markers included) from the unit JSONs under ``folder``."""
    units = load_units(folder)
    arms = _by_arm(units)
    s = SIZES["full"]
    L: list[str] = [BEGIN, "", "## Training: does a reward move held-out replies? (generated)", "",
                    "Generated by `python -m experiments.training --report-only` from the unit JSONs in "
                    "`experiments/results/training/` (one per unit: its budget, training history, every held-out "
                    "reply's metrics at each checkpoint, wall time, commit); do not edit by hand.", ""]
    L += ["**Budget of every trained unit:** GRPO (TRL 1.16, colocated capturing vLLM engine, float32, `top_p=1.0`, "
          f"β = 0) on SmolLM2-135M-Instruct, {s['steps']} steps of {s['batch_size']} completions "
          f"({s['batch_size'] // s['num_generations']} prompts × {s['num_generations']} generations, "
          f"gradients accumulated over micro-batches of {s['micro_batch']}, "
          f"≤ {s['max_new_tokens']} new tokens, temperature {s['temperature']}), learning rate {s['learning_rate']:g}; "
          f"held-out evaluation at steps {', '.join(str(c) for c in s['checkpoints'])} and {s['steps']}: "
          f"{s['heldout_chitchat']} chitchat + {s['heldout_tech']} tech_support dialogues, {s['turns_per_episode']} "
          f"replies each, greedy, ≤ {s['eval_max_new_tokens']} tokens. Seeds {', '.join(map(str, s['seeds']))} "
          "vary the trainer's and the engine's randomness; the training prompts and held-out items are the same in "
          "every unit (data seed 0). The untrained policy is evaluated greedily, so one unit serves every seed.", ""]

    # -- positive control and verdict -------------------------------------------------------------------------------
    L += ["### Verdict (generated from the intervals below)", ""]
    arm_pc, metric_pc, sign = POSITIVE_CONTROL
    pc, base = arms.get(arm_pc, []), arms.get("untrained", [])
    passed = False
    if pc and base:
        t = two_level_bootstrap(_seeds(pc, metric_pc), _seeds(base, metric_pc))
        moved = (t[1] > 0) if sign > 0 else (t[2] < 0)
        passed = moved and len(pc) >= POSITIVE_CONTROL_SEEDS
        verdict = ("**passes**" if passed else
                   f"its interval excludes 0 on {len(pc)} seed(s), but {POSITIVE_CONTROL_SEEDS} are needed" if moved
                   else "**does not pass**: its interval includes 0" if t[1] < 0 < t[2]
                   else "**fails**: its own metric moved the wrong way")
        L.append(f"- **Positive control** (the length reward, −|words − 6|, against the untrained policy, on its own "
                 f"metric: held-out reply words, which it must lower; {len(pc)} seed(s)): {_ci(t, 1)} words; "
                 f"{verdict}.")
    else:
        L.append(f"- **Positive control**: no result yet (unit `{arm_pc}_s0` pending).")
    weak = arms.get("ngram", [])
    if weak and base:
        t = two_level_bootstrap(_seeds(weak, "ngram_overlap"), _seeds(base, "ngram_overlap"))
        L.append(f"- **Weak positive control** (the n-gram reward, which sees one recorded reply, on held-out n-gram "
                 f"overlap with it; {len(weak)} seed(s)): {_ci(t)}; "
                 + ("its metric rose" if t[1] > 0 else "no change established" if t[1] <= 0 <= t[2] else
                    "its metric fell") + ".")
    for a, b in PAIRS[1:6]:
        ua, ub = arms.get(a, []), arms.get(b, [])
        if not ua or not ub:
            L.append(f"- {a} − {b}: pending ({len(ua)} / {len(ub)} unit(s) done).")
            continue
        found = []
        for k, title, d in METRICS:
            if k == "kl_to_start":
                continue
            if (sides := _sides(k, ua, ub)) is None:
                continue
            sa, sb = sides
            t = two_level_bootstrap(_seeds(sa, k), _seeds(sb, k))
            if _reading(t) in ("up", "down"):
                found.append(f"{title} {_reading(t)} {_ci(t, d)}{_subset_note(sa, sb, ua, ub)}")
        L.append(f"- {a} − {b} ({len(ua)} / {len(ub)} seed(s)): "
                 + ("; ".join(found) if found else "no difference established on any held-out metric") + ".")
    if not passed:
        L.append("- Until the positive control passes, a difference that is not established says nothing about a "
                 "reward: this budget may be too small for any reward to show a gain.")
    L.append("")
    L += _budget_probes(folder, base)

    # -- held-out metrics at the end ---------------------------------------------------------------------------------
    L += ["### Held-out replies at the end of training", "",
          "Mean over held-out dialogues (and over seeds), 95% interval over dialogues and seeds.", "",
          "| arm | seeds | " + " | ".join(t for _, t, _ in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    order = ["untrained"] + list(ARMS)
    for arm in order:
        au = arms.get(arm, [])
        if not au:
            continue
        cells = []
        for k, _, d in METRICS:
            if k != "reward":
                cells.append(_ci(two_level_bootstrap(_seeds(au, k)), d))
                continue
            ru = _reward_units(au)
            mark = (" †" if not _scored_now(ru[0]) else
                    f" ({len(ru)} of {len(au)} seeds)" if len(ru) < len(au) else "")
            cells.append(_ci(two_level_bootstrap(_seeds(ru, k)), d) + mark)
        L.append(f"| {arm} | {len(au)} | " + " | ".join(cells) + " |")
    L += ["", "† scored with an earlier default reward (its config is in the unit JSON), not comparable with the "
          "column's other values; `--rescore` evaluates a unit again from its saved policies. \"(k of n seeds)\": "
          "the arm's other seeds were scored with an earlier default, so the cell, and every default-reward "
          "difference and curve of the arm, averages only the k seeds scored with the current one.", ""]

    # -- paired differences --------------------------------------------------------------------------------------------
    L += ["### Paired differences, arm A − arm B (same held-out dialogues)", "",
          "| A − B | seeds A / B | " + " | ".join(t for _, t, _ in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    readings: list[str] = []
    for a, b in PAIRS:
        ua, ub = arms.get(a, []), arms.get(b, [])
        if not ua or not ub:
            L.append(f"| {a} − {b} | {len(ua)} / {len(ub)} | " + " | ".join("pending" for _ in METRICS) + " |")
            continue
        cells = []
        for k, title, d in METRICS:
            if (sides := _sides(k, ua, ub)) is None:
                cells.append("reward configs differ")
                continue
            sa, sb = sides
            t = two_level_bootstrap(_seeds(sa, k), _seeds(sb, k))
            note = _subset_note(sa, sb, ua, ub)
            cells.append(_ci(t, d) + note)
            if k in ("ngram_overlap", "bleu", "embed_sim", "consistency", "reward", "reply_words", "recall"):
                r = _reading(t)
                if r in ("up", "down"):
                    readings.append(f"{a} − {b}: {title} {r} ({_ci(t, d)}{note})")
        L.append(f"| {a} − {b} | {len(ua)} / {len(ub)} | " + " | ".join(cells) + " |")
    done = sum(bool(arms.get(a)) and bool(arms.get(b)) for a, b in PAIRS)
    L += ["", "Differences whose interval excludes 0: " + ("; ".join(readings) if readings else
          "none" if done else "none yet (no comparison has both arms)") + ".", ""]

    # -- learning curves -------------------------------------------------------------------------------------------
    L += ["### Learning curves", "",
          "Training reward = the batch mean of the arm's own reward at that step (TRL's log); the two monitor "
          "columns are the default CAGSR reward and the n-gram overlap of the same training batches (weight 0 in the "
          "loss); the held-out columns are at the checkpoint (means over seeds). For an arm whose seeds straddle a "
          "change of the default reward, the two default-reward columns average only the seeds scored with the "
          "current one." + _rescored_note(units), "",
          "| arm | step | seeds | training reward | monitor: default reward | monitor: n-gram | held-out n-gram | "
          "held-out default reward | reply words | KL to start | recall |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        au = arms.get(arm, [])
        if not au:
            continue
        steps = sorted({c["step"] for u in au for c in u["checkpoints"]})
        ru = _reward_units(au)
        for step in steps:

            def hmean(key: str, units: Sequence[Mapping[str, Any]] = au) -> float:
                v = [h[key] for u in units for h in u["history"] if h.get("step") == step and h.get(key) is not None]
                return float(np.mean(v)) if v else float("nan")

            ngram_key = "ngram" if arm == "ngram" else "monitor_ngram"  # the length arm has the monitor too
            held = {k: two_level_bootstrap(_seeds(au if k != "reward" else ru, k, step))[0]
                    for k in ("ngram_overlap", "reward", "reply_words", "kl_to_start", "recall")}
            n = sum(any(c["step"] == step for c in u["checkpoints"]) for u in au)
            L.append(f"| {arm} | {step} | {n} | {_fmt(hmean('reward'))} | {_fmt(hmean('monitor_default', ru))} | "
                     f"{_fmt(hmean(ngram_key))} | {_fmt(held['ngram_overlap'])} | {_fmt(held['reward'])} | "
                     f"{_fmt(held['reply_words'], 1)} | {_fmt(held['kl_to_start'], 4)} | {_fmt(held['recall'])} |")
    L.append("")
    if arms.get("untrained") and any(arms.get(a) for a in ARMS):
        L += [f"![held-out metrics against the training step]({PLOT})", "",
              "The plot: held-out consistency, default reward (arms scored with another reward config left out), "
              "recall on the hypothesis task, reply words and KL to the start, per arm at each checkpoint (means over "
              "seeds; step 0 is the untrained policy).", ""]
    L += ["Recall: exact-match recall of the stated fact on the hypothesis task (a reply that needs a fact from the "
          "first user turn; greedy, the same episodes for every arm and step), 95% interval over episodes and seeds.",
          ""]

    # -- units -----------------------------------------------------------------------------------------------------
    L += ["### Units and wall times", "",
          "Wall time of the unit in its own process (model and engine start, training, checkpoint evaluations; not "
          "the ~15 s interpreter start), on the shared 2-core machine, so noisy.", "",
          "| unit | status | finished (UTC) | train s | s / step | wall s |", "|---|---|---|---|---|---|"]
    for name, unit in UNITS.items():
        u = units.get(name)
        if u is None:
            L.append(f"| {name} | {_pending_reason(unit.arm)} | – | – | – | – |")
            continue
        status = "done" if _current_budget(u) else "done, earlier budget or reward defaults (not compared)"
        L.append(f"| {name} | {status} | {u.get('finished', '–')} | {_fmt(u.get('train_seconds'), 0)} | "
                 f"{_fmt(u.get('seconds_per_step'), 1)} | {_fmt(u.get('wall_seconds'), 0)} |")
    L += ["", "Commands:", "", "```bash",
          "python -m experiments.training                      # the grid in the order above; resumable (make experiments)",
          "python -m experiments.training --units ngram_s1,ngram_s2 --budget 60   # some units; none starts after 60 min",
          "python -m experiments.training --report-only        # this section from the JSONs",
          "python -m experiments.training --quick --out runs/training-quick      # the tiny form CI runs",
          "```", "",
          "Sections 2, 4 and 5 (importance-sampling ratio, CoT, PPO) come from the earlier grid "
          "(`vllm_attncap/rl/experiments.py`, removed; in the git history), whose unit JSONs were never committed; "
          "their units are not in this registry. "
          "PPO over turns (section 5's run predates this) now warm-starts its critic (its bias set to the first "
          "batch's mean return) and normalises advantages over each batch, so the first update's advantages are "
          "centred even when every reward is negative (docs/rl.md; tested by "
          "`tests/rl/test_ppo.py::test_first_update_advantages_are_centred_when_all_rewards_are_negative` and, end to "
          "end on a tiny model, `test_two_ppo_updates_with_captured_rewards`). It is left out of this grid on purpose: "
          "the grid asks once, with the trainer TRL users run (GRPO), whether a reward moves held-out replies more "
          "than a random reward does, and on 2 cores each unit already takes ~30 min; a PPO arm at a matched budget "
          "would add three such units per reward without changing that question.", "", END]
    return "\n".join(L)


PLOT = "img/training-curves.png"


#: the panels of :data:`PLOT`: (held-out metric, title)
CURVES = (("consistency", "held-out consistency"), ("reward", "held-out default reward\n(current config only)"),
          ("recall", "recall (hypothesis task)"), ("reply_words", "reply words"), ("kl_to_start", "KL to the start"))


def curve_series(folder: Path = RESULTS) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """``{metric: {arm: (steps, means)}}`` for :data:`CURVES`: per trained arm, the mean over its seeds at each
    checkpoint, step 0 being the untrained policy. An arm scored with an earlier default reward (marked † in the
    tables) has no ``reward`` series; one whose seeds straddle a change of the default averages the seeds scored
    with the current one. Empty when there is no untrained unit or no trained arm."""
    arms = _by_arm(load_units(folder))
    if not arms.get("untrained"):
        return {}
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {k: {} for k, _ in CURVES}
    for arm in (a for a in ARMS if arms.get(a)):
        steps = sorted({c["step"] for u in arms[arm] for c in u["checkpoints"]})
        now = [u for u in arms[arm] if _scored_now(u)]
        for k, _ in CURVES:
            if k == "reward" and not now:
                continue
            au = now if k == "reward" else arms[arm]
            ys = [two_level_bootstrap(_seeds(arms["untrained"], k))[0]]
            ys += [two_level_bootstrap(_seeds(au, k, st))[0] for st in steps]
            out[k][arm] = ([0, *steps], ys)
    return out if out["kl_to_start"] else {}


def plot_curves(path: Path, folder: Path = RESULTS) -> bool:
    """Draw :func:`curve_series` to ``path``, a panel per metric, a line per arm (with its number of seeds). False
    when there is nothing to draw or no matplotlib."""
    series = curve_series(folder)
    if not series:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the viz extra
        return False
    seeds = {arm: len(units) for arm, units in _by_arm(load_units(folder)).items()}
    colors = {arm: f"C{i}" for i, arm in enumerate(series["kl_to_start"])}  # every trained arm has a KL series
    fig, axes = plt.subplots(1, len(CURVES), figsize=(2.8 * len(CURVES), 3.0))
    for ax, (k, title) in zip(axes, CURVES):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("GRPO step", fontsize=8)
        for arm, (xs, ys) in series[k].items():
            ax.plot(xs, ys, marker="o", ms=3, color=colors[arm], label=f"{arm} ({seeds[arm]} seeds)")
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def update_doc(doc: Path, folder: Path = RESULTS) -> None:
    """Replace the section between :data:`BEGIN` and :data:`END` in ``doc`` with :func:`render` (and redraw
    :data:`PLOT` beside it)."""
    plot_curves(doc.parent / PLOT, folder)
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{doc}: the markers {BEGIN!r} / {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(head + render(folder) + tail)


def section(doc: Path) -> str:
    """The generated section as it stands in ``doc`` (markers included)."""
    text = doc.read_text()
    return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
