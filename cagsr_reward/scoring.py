"""Scoring API: one turn (`score_turn`), a dialogue (`score_dialogue`) and a chain of thought (`score_cot`).

The turn reward is $R_t = \\alpha C_t + \\beta F_t - \\gamma\\,\\mathrm{rep}_t$ (method.md "One turn's reward"); the
episode quantities are $R = \\sum_t w_t R_t$ and $G_t = \\sum_{k \\ge t} \\delta^{k-t} w_k R_k$ (method.md "Episodes").
numpy only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .aggregate import _elide_checked
from .answers import ANSWER_MARKERS, find_answer_span
from .attention import CapturedAttention
from .config import CAGSRConfig, resolve_layers, resolve_sink
from .core import (
    _check_attn,
    _check_ids,
    _check_positions,
    _check_sink,
    _coverage_from,
    _drop_sinks,
    _entropy_from,
    _history_repetition,
    _is_int,
    _kept_mass,
    _repetition_after,
    _self_repetition,
    entropy_floor,
    grounding,
    returns,
)

__all__ = [
    "ANSWER_MARKERS",
    "CoTScore",
    "DialogueScore",
    "TurnInput",
    "TurnScore",
    "find_answer_span",
    "score_cot",
    "score_dialogue",
    "score_turn",
]


@dataclasses.dataclass(frozen=True)
class TurnScore:
    """The reward of one turn and its parts.

    Attributes:
        reward (`float`): $R_t = \\alpha C + \\beta F - \\gamma\\,\\mathrm{rep} + \\eta G$.
        coverage (`float`): $C$, in [0, 1].
        focus (`float`): $F$, the negative mean (floored) entropy, <= 0.
        repetition (`float`): the repetition penalty used (history repetition in multi/cot mode, self repetition in
            single mode; 0 when no response ids were given).
        turn_index (`int`): $t$.
        floor (`float` or `None`): the entropy floor applied, `None` when clamping is off.
        num_tokens (`int`): $T$, generated tokens (attention rows) of the turn.
        mean_entropy (`float`): mean unclamped row entropy $\\bar h$ (nats), for logging.
        elided_count (`int`): history columns merged by the long-history rule (0 = none).
        sink (`int`): sink columns dropped.
        alpha, beta, gamma (`float`): the weights used, so that `components()` sums to `reward`.
        self_repetition (`float`): repeated n-grams of the turn itself (n = `ngram`), 0 when not used.
        copy_repetition (`float`): the turn's n-grams found in the history (n = `copy_ngram`, or `ngram` under
            ``repetition="paper"``), 0 when not used. `repetition` is their sum.
        grounding (`float` or `None`): $G$, the turn's PMI with its history summed over its $T$ tokens and divided
            by $T + T_0$ (``grounding_tokens``; `core.grounding`);
            `None` when no log-probabilities were given (then ``eta`` is 0).
        eta (`float`): the grounding weight used.
    """

    reward: float
    coverage: float
    focus: float
    repetition: float
    turn_index: int
    floor: float | None
    num_tokens: int
    mean_entropy: float = 0.0
    elided_count: int = 0
    sink: int = 0
    alpha: float = 1.0
    beta: float = 0.1
    gamma: float = 0.5
    self_repetition: float = 0.0
    copy_repetition: float = 0.0
    grounding: float | None = None
    eta: float = 0.0

    def components(self) -> dict[str, float]:
        """Weighted contributions ``{"coverage": αC, "focus": βF, "repetition": -γ·rep, "grounding": ηG}``; they sum
        to `reward` (``grounding`` is 0 when no log-probabilities were given)."""
        return {
            "coverage": self.alpha * self.coverage,
            "focus": self.beta * self.focus,
            "repetition": -self.gamma * self.repetition,
            "grounding": self.eta * (self.grounding or 0.0),
        }

    def as_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (for logging)."""
        return dataclasses.asdict(self)


def _captured_num_layers(cap: CapturedAttention) -> int | None:
    """The model's layer count as far as a capture tells it (for ``layers="last:K"``)."""
    if cap.num_layers is not None:
        return cap.num_layers
    if cap.layer_ids is None and cap.reduce != "layer_head_mean":
        return int(np.asarray(cap.attention).shape[0])
    return None


def _resolve_turn_sink(config: CAGSRConfig, sink: Any, history_ids: Any, bos_token_id: Any) -> int:
    if sink is not None:
        return _check_sink(sink)
    first = None
    if config.sink == "auto" and history_ids is not None and bos_token_id is not None:
        h = np.asarray(history_ids)
        if h.ndim == 1 and h.size:
            first = int(h[0])
    return resolve_sink(config.sink, first_token_id=first, bos_token_id=bos_token_id)


def _logprob_pair(logprobs: Any, prior_logprobs: Any) -> tuple[Any, Any] | None:
    """``(logprobs, prior_logprobs)`` when both are given, ``None`` when neither is; one alone is an error."""
    if logprobs is None and prior_logprobs is None:
        return None
    if logprobs is None or prior_logprobs is None:
        raise ValueError("logprobs, prior_logprobs: give both or neither")
    return logprobs, prior_logprobs


def _check_span(span: Any, limit: int, name: str) -> tuple[int, int]:
    if (
        not isinstance(span, (tuple, list))
        or len(span) != 2
        or not all(_is_int(v) for v in span)
        or not 0 <= span[0] <= span[1] <= limit
    ):
        raise ValueError(f"{name}: expected (start, end) with 0 <= start <= end <= {limit}, got {span!r}")
    return int(span[0]), int(span[1])


def score_turn(
    block: Any,
    salient: Any,
    config: CAGSRConfig,
    *,
    turn_index: int = 0,
    response_ids: Any = None,
    history_ids: Any = None,
    sink: int | None = None,
    user_span: tuple[int, int] | None = None,
    bos_token_id: int | None = None,
    content_columns: Any = None,
    pooled_focus: bool = False,
    generated_before: Any = None,
    logprobs: Any = None,
    prior_logprobs: Any = None,
    reply_tokens: int | None = None,
    grounded: bool = True,
) -> TurnScore:
    r"""
    Score one turn from its raw history block (method.md "One turn's reward"):

    $$
    R_t = \alpha\, C_t + \beta\, F_t - \gamma\, \mathrm{rep}_t + \eta\, G_t,
    $$

    with $C_t$ = `core.coverage`, $F_t$ = `core.focus` (floor $H_0 + \kappa t$ when `config.entropy_floor`),
    $\mathrm{rep}_t$ = `core.history_repetition` in ``"multi"``/``"cot"`` mode and `core.repetition` in ``"single"``
    mode, $G_t$ = `core.grounding` of `logprobs` and `prior_logprobs` (required when ``config.eta > 0``). When the
    history is longer than `config.n_max` the block first goes through `aggregate.elide`.

    Args:
        block (`np.ndarray` of shape `(T, P)`, or `CapturedAttention`):
            Raw history block of the turn (see `aggregate.history_block`), or the turn's capture, whose history
            block under `config.layers` / `config.heads` is taken (`CapturedAttention.history_block`); its token ids
            then stand in for `response_ids` / `history_ids` when those are `None`.
        salient (sequence of `int`):
            Salient history positions (original indices in ``[0, P)``).
        config (`CAGSRConfig`):
            Hyper-parameters.
        turn_index (`int`, *optional*, defaults to `0`):
            $t$, which sets the entropy floor.
        response_ids (sequence of `int` or `None`, *optional*, defaults to `None`):
            The turn's generated ids, one per attention row (length must be $T$). `None` gives ``rep = 0``.
        history_ids (sequence of `int` or `None`, *optional*, defaults to `None`):
            The history's token ids, needed for the history repetition (multi/cot mode) and by ``sink="auto"``.
        sink (`int` or `None`, *optional*, defaults to `None`):
            Sink columns to drop; `None` uses `config.sink` (``"auto"``: 1 when ``history_ids[0] ==
            bos_token_id``, else 0 — also 0 when either is unknown).
        user_span (`(int, int)` or `None`, *optional*, defaults to `None`):
            ``(start, end)`` history positions of the current user turn. Used only when
            ``config.history_coverage`` is False: coverage then counts salient positions in ``[start, end)`` only.
            Required in that case except in single mode (where the whole prompt is the current turn).
        bos_token_id (`int` or `None`, *optional*, defaults to `None`):
            The tokenizer's BOS id, for ``sink="auto"``.
        content_columns (sequence of `int` or `None`, *optional*, defaults to `None`):
            With ``config.columns == "content"``: the history positions that form the attention distribution (the
            content tokens of the conversation, `PromptEncoding.content_positions`); every other column (sinks,
            chat-template tokens, the system prompt) is dropped and each row renormalised over these, so coverage and
            focus never see them. Salient positions outside them are ignored. `None` (or ``columns="all"``): every
            column but the sinks.
        pooled_focus (`bool`, *optional*, defaults to `False`):
            Focus from the entropy of the rows' summed (renormalised) attention instead of the mean row entropy: a
            CoT block's focus (MTC §5.3: "we sum the attention weights produced over the preceding block").
        generated_before (sequence of `int` or `None`, *optional*, defaults to `None`):
            Tokens generated before this turn in the same reply (a CoT block's earlier blocks). Under
            ``repetition="self_and_copy"`` the self repetition then counts n-grams that repeat anything generated so
            far (a loop across blocks costs), and the copy term looks only at the part of `history_ids` before
            them (the prompt).
        logprobs (sequence of `float` or `None`, *optional*, defaults to `None`):
            $\log p(y_s \mid \text{history}, y_{<s})$ of the turn's T tokens under the scoring model. Required, with
            `prior_logprobs`, when ``config.eta > 0``; with ``eta == 0`` the grounding is still computed (and
            logged) when both are given.
        prior_logprobs (sequence of `float` or `None`, *optional*, defaults to `None`):
            $\log p(y_s \mid \varnothing, y_{<s})$ of the same tokens after an empty conversation.
        reply_tokens (`int` or `None`, *optional*, defaults to `None`):
            Length of the whole reply this turn is part of (a CoT block's chain): the grounding's shrinkage
            $T / (T + T_0)$ uses it (`core.grounding`). `None`: the turn is the whole reply.
        grounded (`bool`, *optional*, defaults to `True`):
            `False`: no grounding term for this turn (a CoT answer span under ``cot_grounding="reasoning"``);
            log-probabilities are then neither needed nor used.

    Returns:
        `TurnScore`.

    Example:
    ```python
    >>> import numpy as np
    >>> from cagsr_reward.config import CAGSRConfig
    >>> block = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    >>> cfg = CAGSRConfig.paper(ngram=1, h0=0.0, kappa=0.0)  # history repetition, unigrams, no grounding
    >>> ts = score_turn(block, [1], cfg, sink=0, response_ids=[4, 5], history_ids=[4, 5, 6])
    >>> round(ts.coverage, 4), round(ts.focus, 4), ts.repetition  # entropies 1.0297 and 0.8979
    (0.45, -0.9638, 1.0)
    >>> round(ts.reward, 4)  # 0.45 + 0.1 * (-0.9638) - 0.5 * 1.0
    -0.1464
    >>> {k: round(v, 4) for k, v in ts.components().items()}
    {'coverage': 0.45, 'focus': -0.0964, 'repetition': -0.5, 'grounding': 0.0}

    ```
    """
    if not isinstance(config, CAGSRConfig):
        raise ValueError(f"config: expected a CAGSRConfig, got {type(config).__name__}")
    if not _is_int(turn_index) or turn_index < 0:
        raise ValueError(f"turn_index: expected an int >= 0, got {turn_index!r}")
    if isinstance(block, CapturedAttention):
        response_ids = block.token_ids if response_ids is None else response_ids
        history_ids = block.prompt_token_ids if history_ids is None else history_ids
        block = block.history_block(resolve_layers(config.layers, _captured_num_layers(block)), config.heads)
    sink_n = _resolve_turn_sink(config, sink, history_ids, bos_token_id)
    a = _check_attn(block, "block")
    num_rows, num_cols = a.shape
    sink_n = _check_sink(sink_n, num_cols)
    positions = _drop_sinks(_check_positions(salient, num_cols), sink_n)
    if not config.history_coverage:
        if user_span is None:
            if config.mode != "single":
                raise ValueError(
                    "user_span: required when history_coverage=False in "
                    f"{config.mode!r} mode (coverage is restricted to the current user turn)"
                )
        else:
            start, end = _check_span(user_span, num_cols, "user_span")
            positions = positions[(positions >= start) & (positions < end)]
    if content_columns is not None and config.columns == "content":
        cols = _drop_sinks(_check_positions(content_columns, num_cols, "content_columns"), sink_n)
        if cols.size == 0:
            raise ValueError("content_columns: no content column left in the history")
        # sinks and template tokens leave the distribution; rows are renormalised over the content columns below
        a = a[:, cols]
        positions = np.searchsorted(cols, positions[np.isin(positions, cols)]).astype(np.int64)
        sink_n = 0
    elided_count = 0
    if a.shape[1] > config.n_max:  # MTC §5.1
        eb = _elide_checked(a, positions, config.n_max, config.window, sink_n)
        a, positions, elided_count = eb.block, eb.salient, eb.elided_count

    z = _kept_mass(a, sink_n, "block")
    cov = _coverage_from(a, z, positions)
    h = _entropy_from(a, z, sink_n)
    floor = entropy_floor(turn_index, config.h0, config.kappa) if config.entropy_floor else None
    if pooled_focus:
        # entropy of the block's summed attention: the mean of the renormalised rows is one distribution
        pooled = (a[:, sink_n:] / z[:, None]).mean(axis=0, dtype=np.float64)[None, :]
        h_focus = _entropy_from(pooled, np.ones(1), 0)
    else:
        h_focus = h
    foc = -float(np.mean(np.maximum(h_focus, floor) if floor is not None else h_focus))

    rep = self_rep = copy_rep = 0.0
    if response_ids is not None:
        ids = _check_ids(response_ids, "response_ids")
        if ids.size != num_rows:
            raise ValueError(
                f"response_ids: length {ids.size} != number of attention rows {num_rows} (one row per generated token)"
            )
        if config.mode == "single":
            rep = self_rep = _self_repetition(ids, config.ngram)
        else:
            if history_ids is None:
                raise ValueError(f"history_ids: required for the history repetition in {config.mode!r} mode")
            hist = _check_ids(history_ids, "history_ids")
            if config.repetition == "paper":
                rep = copy_rep = _history_repetition(ids, hist, config.ngram)
            else:
                # a loop always costs; copying a span of the history costs; reusing a word (shorter span) does not
                before = np.zeros(0, np.int64) if generated_before is None else _check_ids(
                    generated_before, "generated_before"
                )
                if before.size > hist.size:
                    raise ValueError("generated_before: longer than history_ids, whose tail it must be")
                self_rep = _repetition_after(ids, before, config.ngram)
                copy_rep = _history_repetition(ids, hist[: hist.size - before.size], config.copy_ngram)
                rep = self_rep + copy_rep
    ground = None
    pair = _logprob_pair(logprobs, prior_logprobs) if grounded else None
    if pair is not None:
        n = np.asarray(pair[0]).size
        if n != num_rows:
            raise ValueError(f"logprobs: length {n} != number of attention rows {num_rows}")
        ground = grounding(*pair, prior_tokens=config.grounding_tokens, reply_tokens=reply_tokens)
    elif config.eta > 0 and grounded:
        raise ValueError(
            f"logprobs, prior_logprobs: required when eta > 0 (eta={config.eta}): the grounding term needs log p(reply | "
            "history) and log p(reply | empty conversation) per token; pass both, or use "
            "CAGSRConfig.attention_only() (eta=0)"
        )
    reward = config.alpha * cov + config.beta * foc - config.gamma * rep + config.eta * (ground or 0.0)
    return TurnScore(
        reward=float(reward),
        coverage=float(cov),
        focus=foc,
        repetition=float(rep),
        turn_index=int(turn_index),
        floor=floor,
        num_tokens=int(num_rows),
        mean_entropy=float(np.mean(h)),
        elided_count=elided_count,
        sink=sink_n,
        alpha=config.alpha,
        beta=config.beta,
        gamma=config.gamma,
        self_repetition=float(self_rep),
        copy_repetition=float(copy_rep),
        grounding=ground,
        eta=config.eta,
    )


# --------------------------------------------------------------------------------------------------------------
# dialogues
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TurnInput:
    """What `score_dialogue` needs for one turn.

    Attributes:
        block (`np.ndarray` of shape `(T, P)`, or `CapturedAttention`): raw history block of the turn, or its
            capture (see `score_turn`).
        salient (sequence of `int`): salient history positions.
        response_ids (sequence of `int` or `None`): the turn's generated ids (length T).
        history_ids (sequence of `int` or `None`): the history's ids (length P).
        user_span (`(int, int)` or `None`): positions of the current user turn in the history (for the
            "no history coverage" ablation).
        sink (`int` or `None`): sink columns; `None` = `config.sink`.
        content_columns (sequence of `int` or `None`): the history's content positions (see `score_turn`).
        logprobs, prior_logprobs (sequence of `float` or `None`): the turn's token log-probabilities after its
            history and after an empty conversation (see `score_turn`; required when ``eta > 0``).
    """

    block: Any
    salient: Any
    response_ids: Any = None
    history_ids: Any = None
    user_span: tuple[int, int] | None = None
    sink: int | None = None
    content_columns: Any = None
    logprobs: Any = None
    prior_logprobs: Any = None


@dataclasses.dataclass(frozen=True)
class DialogueScore:
    """Scores of a dialogue.

    Attributes:
        turns (`tuple[TurnScore, ...]`): per-turn scores.
        rewards (`np.ndarray`): $R_t$.
        weights (`np.ndarray`): $w_t$.
        returns (`np.ndarray`): $G_t = \\sum_{k \\ge t} \\delta^{k-t} w_k R_k$.
        total (`float`): $R = \\sum_t w_t R_t$.
    """

    turns: tuple[TurnScore, ...]
    rewards: np.ndarray
    weights: np.ndarray
    returns: np.ndarray
    total: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "turns": [t.as_dict() for t in self.turns],
            "rewards": self.rewards.tolist(),
            "weights": self.weights.tolist(),
            "returns": self.returns.tolist(),
            "total": self.total,
        }


def score_dialogue(
    turns: Sequence[TurnInput], config: CAGSRConfig, *, bos_token_id: int | None = None
) -> DialogueScore:
    r"""
    Score every turn of a dialogue (turn $t$ = position in `turns`, which sets its entropy floor) and build the
    episode quantities (method.md "Episodes"): $R = \sum_t w_t R_t$, $G_t = \sum_{k \ge t} \delta^{k-t} w_k R_k$,
    with $w_t = 1$ for every dialogue turn (MTC §6; the uniform-weights ablation changes nothing for dialogues).

    Args:
        turns (sequence of `TurnInput`):
            The turns in order, at least one.
        config (`CAGSRConfig`):
            Hyper-parameters.
        bos_token_id (`int` or `None`, *optional*, defaults to `None`):
            For ``sink="auto"``.

    Returns:
        `DialogueScore`.

    Example:
    ```python
    >>> import numpy as np
    >>> from cagsr_reward.config import CAGSRConfig
    >>> cfg = CAGSRConfig(beta=0.0, gamma=0.0, eta=0.0)  # coverage only, to keep the numbers simple
    >>> t0 = TurnInput(np.array([[0.5, 0.5]]), [0])
    >>> t1 = TurnInput(np.array([[0.2, 0.2, 0.6]]), [2])
    >>> score = score_dialogue([t0, t1], cfg)
    >>> score.rewards.tolist(), score.returns.tolist(), score.total
    ([0.5, 0.6], [1.1, 0.6], 1.1)

    ```
    """
    if not isinstance(config, CAGSRConfig):
        raise ValueError(f"config: expected a CAGSRConfig, got {type(config).__name__}")
    if isinstance(turns, TurnInput) or not isinstance(turns, Sequence) or len(turns) == 0:
        raise ValueError("turns: expected a non-empty sequence of TurnInput")
    scores = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, TurnInput):
            raise ValueError(f"turns: item {t} is a {type(turn).__name__}, expected TurnInput")
        scores.append(
            score_turn(
                turn.block,
                turn.salient,
                config,
                turn_index=t,
                response_ids=turn.response_ids,
                history_ids=turn.history_ids,
                sink=turn.sink,
                user_span=turn.user_span,
                bos_token_id=bos_token_id,
                content_columns=turn.content_columns,
                logprobs=turn.logprobs,
                prior_logprobs=turn.prior_logprobs,
            )
        )
    rewards = np.array([s.reward for s in scores], dtype=np.float64)
    weights = np.ones_like(rewards)
    g = returns(rewards, weights, config.discount)
    return DialogueScore(tuple(scores), rewards, weights, g, float(np.dot(weights, rewards)))


# --------------------------------------------------------------------------------------------------------------
# chain of thought (MTC §5.3)
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CoTScore:
    """Scores of one chain of thought, each block of `cot_block` tokens (and the answer) being a turn.

    Attributes:
        blocks (`tuple[TurnScore, ...]`): per-turn scores; the last one is the final answer.
        spans (`tuple[tuple[int, int], ...]`): generated-token ``[start, end)`` of each turn.
        answer_span (`(int, int)`): generated-token span of the final answer (one of `spans`; the last one unless
            tokens follow the answer sentence under ``cot_answer="sentence"``).
        rewards, weights, returns (`np.ndarray`): $R_b$, $w_b$ (normalised to sum 1 under ``cot_episode="mean"``),
            $G_b$.
        total (`float`): $\\sum_b w_b R_b$ (a weighted mean under ``cot_episode="mean"``).
    """

    blocks: tuple[TurnScore, ...]
    spans: tuple[tuple[int, int], ...]
    answer_span: tuple[int, int]
    rewards: np.ndarray
    weights: np.ndarray
    returns: np.ndarray
    total: float

    def components(self) -> list[dict[str, float]]:
        """Per-turn weighted contributions (see `TurnScore.components`)."""
        return [b.components() for b in self.blocks]

    def as_dict(self) -> dict[str, Any]:
        return {
            "blocks": [b.as_dict() for b in self.blocks],
            "spans": [list(s) for s in self.spans],
            "answer_span": list(self.answer_span),
            "rewards": self.rewards.tolist(),
            "weights": self.weights.tolist(),
            "returns": self.returns.tolist(),
            "total": self.total,
        }


def score_cot(
    attention_2d: Any,
    prompt_len: int | None,
    salient: Any,
    response_ids: Any,
    prompt_ids: Any,
    config: CAGSRConfig,
    *,
    answer_span: tuple[int, int] | None = None,
    response_tokens: Sequence[str] | None = None,
    sink: int | None = None,
    bos_token_id: int | None = None,
    content_columns: Any = None,
    turn_index: int = 0,
    logprobs: Any = None,
    prior_logprobs: Any = None,
) -> CoTScore:
    r"""
    Score a chain of thought as an artificial dialogue (MTC §5.3, method.md "Episodes"). The generated tokens
    before the answer are cut into blocks of $k$ = `config.cot_block` tokens; each block, and then the answer span,
    is a turn $b$ whose history is the prompt plus every generated token before it (columns
    ``0 .. P + start_b - 1`` of `attention_2d`) and whose rows are the turn's rows. Attention a row pays to earlier
    tokens of its own block is outside that history and renormalised away. Turn weights are 1, and
    `config.final_answer_weight` for the answer turn unless `config.uniform_turn_weights`. Generated tokens after
    ``answer_span[1]`` are not scored. The repetition term is the history repetition of the turn's tokens against
    the prompt plus earlier generated tokens (for any `config.mode`).

    Args:
        attention_2d (`np.ndarray` of shape `(T, P+T-1)`, or `CapturedAttention`):
            Aggregated attention of the whole generation (see `aggregate.aggregate`), or the generation's capture
            (aggregated under `config.layers` / `config.heads`; its prompt length and token ids stand in for
            `prompt_len` / `response_ids` / `prompt_ids` when those are `None`).
        prompt_len (`int`):
            $P$.
        salient (sequence of `int`):
            Salient positions of the full sequence (prompt positions, and generated positions ``P + j`` for
            intermediate conclusions); a turn counts those inside its history. Each must be ``< P + T - 1``.
        response_ids (sequence of `int`):
            The $T$ generated ids.
        prompt_ids (sequence of `int`):
            The $P$ prompt ids.
        config (`CAGSRConfig`):
            Hyper-parameters (`cot_block`, `final_answer_weight`, `uniform_turn_weights`, ...).
        answer_span (`(int, int)` or `None`, *optional*, defaults to `None`):
            Generated-token span of the final answer; `None` = detect with `find_answer_span` from
            `response_tokens`, or the last block when those are not given.
        response_tokens (sequence of `str` or `None`, *optional*, defaults to `None`):
            Decoded generated tokens, for answer detection.
        sink (`int` or `None`, *optional*, defaults to `None`):
            Sink columns; `None` = `config.sink` resolved against ``prompt_ids[0]``.
        bos_token_id (`int` or `None`, *optional*, defaults to `None`):
            For ``sink="auto"``.
        content_columns (sequence of `int` or `None`, *optional*, defaults to `None`):
            Content positions of the prompt (see `score_turn`); with ``config.columns == "content"`` every generated
            position is content too (the reasoning is the history of later blocks).
        turn_index (`int`, *optional*, defaults to `0`):
            The dialogue turn of this chain of thought: the entropy floor's index under ``config.cot_floor="turn"``
            (``"block"`` indexes it by block, as the 0.2 reading did).
        logprobs, prior_logprobs (sequence of `float` or `None`, *optional*, defaults to `None`):
            Log-probabilities of the T generated tokens after the prompt and after an empty conversation (see
            `score_turn`); each turn's grounding uses its span of them, shrunk by the whole chain's length
            (``grounding_tokens``); under ``cot_grounding="reasoning"`` the answer turn has none. Required when
            ``config.eta > 0``.

    Config fields used: `cot_block`, `final_answer_weight`, `uniform_turn_weights`, `cot_answer` (``"sentence"``:
    the answer is the first marker's sentence and any tokens after it are scored as further blocks; ``"rest"``:
    everything after the last marker, nothing after it), `cot_episode` (``"mean"``: `total` is the weighted mean
    $\sum_b w_b R_b / \sum_b w_b$ and `returns` use the normalised weights; ``"sum"``: the weighted sum),
    `cot_floor`, `block_focus` (``"summed"``: each turn's focus is minus the entropy of its summed attention).

    Returns:
        `CoTScore`.

    Example:
    ```python
    >>> import numpy as np
    >>> from cagsr_reward.config import CAGSRConfig
    >>> P, T = 2, 4
    >>> att = np.zeros((T, P + T - 1))
    >>> for s in range(T):
    ...     att[s, : P + s] = 1.0 / (P + s)  # uniform over everything visible
    >>> cfg = CAGSRConfig.paper(cot_block=2, beta=0.0, gamma=0.0, final_answer_weight=3.0)
    >>> cot = score_cot(att, P, [0], [7, 8, 9, 10], [1, 2], cfg, sink=0)
    >>> cot.spans, cot.weights.tolist(), cot.rewards.round(4).tolist(), round(cot.total, 4)
    (((0, 2), (2, 4)), [1.0, 3.0], [0.5, 0.25], 1.25)

    ```
    """
    if not isinstance(config, CAGSRConfig):
        raise ValueError(f"config: expected a CAGSRConfig, got {type(config).__name__}")
    if isinstance(attention_2d, CapturedAttention):
        cap = attention_2d
        prompt_len = cap.prompt_len if prompt_len is None else prompt_len
        response_ids = cap.token_ids if response_ids is None else response_ids
        prompt_ids = cap.prompt_token_ids if prompt_ids is None else prompt_ids
        attention_2d = cap.aggregate(resolve_layers(config.layers, _captured_num_layers(cap)), config.heads)
    a = _check_attn(attention_2d, "attention_2d")
    num_rows, num_cols = a.shape
    if not _is_int(prompt_len) or prompt_len < 1 or prompt_len + num_rows - 1 != num_cols:
        raise ValueError(
            f"prompt_len: expected P with P + T - 1 == {num_cols} columns for T = {num_rows} rows, got {prompt_len!r}"
        )
    prompt_len = int(prompt_len)
    ids = _check_ids(response_ids, "response_ids")
    if ids.size != num_rows:
        raise ValueError(f"response_ids: length {ids.size} != number of attention rows {num_rows}")
    prompt = _check_ids(prompt_ids, "prompt_ids")
    if prompt.size != prompt_len:
        raise ValueError(f"prompt_ids: length {prompt.size} != prompt_len {prompt_len}")
    positions = _check_positions(salient, num_cols)
    sink_n = _resolve_turn_sink(config, sink, prompt, bos_token_id)

    if answer_span is None:
        if response_tokens is not None:
            if len(response_tokens) != num_rows:
                raise ValueError(
                    f"response_tokens: length {len(response_tokens)} != number of generated tokens {num_rows}"
                )
            rule = "sentence" if config.cot_answer == "sentence" else "rest"
            answer_span = find_answer_span(list(response_tokens), block=config.cot_block, rule=rule)
        else:
            answer_span = (((num_rows - 1) // config.cot_block) * config.cot_block, num_rows)
    start, end = _check_span(answer_span, num_rows, "answer_span")
    if start == end:
        raise ValueError(f"answer_span: empty span {answer_span!r}")
    if not _is_int(turn_index) or turn_index < 0:
        raise ValueError(f"turn_index: expected an int >= 0, got {turn_index!r}")
    lp = lp0 = None
    pair = _logprob_pair(logprobs, prior_logprobs)
    if pair is not None:
        lp, lp0 = (np.asarray(v, dtype=np.float64) for v in pair)
        for name, v in (("logprobs", lp), ("prior_logprobs", lp0)):
            if v.shape != (num_rows,):
                raise ValueError(f"{name}: expected one value per generated token ({num_rows}), got shape {v.shape}")

    k = config.cot_block
    spans = [(b, min(b + k, start)) for b in range(0, start, k)] + [(start, end)]
    answer_at = len(spans) - 1
    if config.cot_answer == "sentence":
        spans += [(b, min(b + k, num_rows)) for b in range(end, num_rows, k)]
    content = None
    if content_columns is not None and config.columns == "content":
        prompt_content = _check_positions(content_columns, prompt_len, "content_columns")
        content = np.concatenate([prompt_content, np.arange(prompt_len, num_cols, dtype=np.int64)])
    turn_cfg = config if config.mode == "cot" else config.replace(mode="cot")
    full_ids = np.concatenate([prompt, ids])
    user_span = (0, prompt_len)  # the CoT's "current user turn" is the prompt (no-history-coverage ablation)
    scores = []
    for b, (s0, s1) in enumerate(spans):
        hist = prompt_len + s0
        scores.append(
            score_turn(
                a[s0:s1, :hist],
                positions[positions < hist],
                turn_cfg,
                turn_index=b if config.cot_floor == "block" else int(turn_index),
                response_ids=ids[s0:s1],
                history_ids=full_ids[:hist],
                sink=sink_n,
                user_span=user_span,
                content_columns=None if content is None else content[content < hist],
                pooled_focus=config.block_focus == "summed",
                generated_before=ids[:s0],
                logprobs=None if lp is None else lp[s0:s1],
                prior_logprobs=None if lp0 is None else lp0[s0:s1],
                reply_tokens=num_rows,
                grounded=not (b == answer_at and config.cot_grounding == "reasoning"),
            )
        )
    rewards = np.array([s.reward for s in scores], dtype=np.float64)
    weights = np.ones_like(rewards)
    if not config.uniform_turn_weights:
        weights[answer_at] = config.final_answer_weight
    if config.cot_episode == "mean":
        weights = weights / weights.sum()  # a longer chain of thought does not earn more (or less) by its length
    g = returns(rewards, weights, config.discount)
    return CoTScore(tuple(scores), tuple(spans), (start, end), rewards, weights, g, float(np.dot(weights, rewards)))

