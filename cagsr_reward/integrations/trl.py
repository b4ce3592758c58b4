"""The CAGSR reward as a TRL reward function (``GRPOTrainer`` / ``RLOOTrainer``, TRL 1.16 ``reward_funcs``).

TRL calls every reward function as ``f(prompts=..., completions=..., completion_ids=..., trainer_state=...,
log_extra=..., log_metric=..., **dataset_columns)`` and expects one float (or ``None``) per completion
(``trl/trainer/grpo_trainer.py::_calculate_rewards``). :func:`cagsr_reward_func` builds such a function.

Nothing here imports trl (nor torch/transformers) at import time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..attention import as_captured_attention
from ..config import CAGSRConfig, resolve_layers
from ..encoding import PromptEncoding, completion_salient, encode_prompt, prior_prompt_ids
from ..salient import SalientSelector
from ..scoring import score_cot, score_turn
from ..sources import capture_from_source

__all__ = ["CAGSRRewardFunction", "cagsr_reward_func", "ATTENTION_KWARG", "LOGPROBS_KWARG", "PRIOR_LOGPROBS_KWARG"]

#: Dataset/rollout column that carries captured attention (one entry per completion), e.g. from the vLLM plugin.
ATTENTION_KWARG = "attncap_attention"
#: Dataset/rollout column with each completion's token log-probabilities after its prompt, log p(y_s | x, y_<s),
#: under the scoring model (one 1-D sequence of T floats per completion): the grounding term's first input.
LOGPROBS_KWARG = "attncap_logprobs"
#: Dataset/rollout column with each completion's token log-probabilities after the empty conversation
#: (`cagsr_reward.encoding.prior_prompt_ids`), under the same scoring model: the grounding term's second input.
PRIOR_LOGPROBS_KWARG = "attncap_prior_logprobs"

_COMPONENTS = ("coverage", "focus", "repetition", "grounding", "reward")


def _prompt_key(prompt: Any) -> str:
    if isinstance(prompt, str):
        return "s:" + prompt
    return "m:" + json.dumps(prompt, sort_keys=True, default=str)


def _turn_index(prompt: Any) -> int:
    """Turns already answered in a chat prompt (= assistant messages in it); 0 for a string prompt."""
    if isinstance(prompt, str):
        return 0
    return sum(1 for m in prompt if isinstance(m, Mapping) and m.get("role") == "assistant")


class CAGSRRewardFunction:
    r"""A picklable TRL reward function computing the CAGSR turn reward of each completion.

    Built by :func:`cagsr_reward_func` (see there for the arguments and the formula). Call signature (TRL 1.16)::

        reward(prompts, completions, completion_ids, *, trainer_state=None, log_metric=None, log_extra=None,
               **kwargs) -> list[float | None]

    Attributes:
        __name__ (`str`): the name TRL logs under (``rewards/<name>/mean``).
        config (`CAGSRConfig`), source, likelihood, tokenizer, selector (`SalientSelector`): as given to the factory.
        last_scores (`list`): the :class:`~cagsr_reward.scoring.TurnScore` /
            :class:`~cagsr_reward.scoring.CoTScore` (or ``None``) of each completion of the latest call.
    """

    def __init__(
        self,
        config: CAGSRConfig,
        *,
        source: Any,
        tokenizer: Any,
        selector: SalientSelector,
        name: str,
        chat_template_kwargs: Mapping[str, Any] | None,
        tools: list[Any] | None,
        likelihood: Any = None,
    ):
        self.config = config
        self.source = source
        self.likelihood = likelihood
        self._tokenizer = tokenizer
        self.selector = selector
        self.__name__ = name
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.tools = tools
        self.last_scores: list[Any] = []

    @property
    def name(self) -> str:
        """Same as ``__name__``."""
        return self.__name__

    @property
    def tokenizer(self) -> Any:
        """The tokenizer given to the factory, else the source's."""
        if self._tokenizer is None:
            self._tokenizer = self.source.tokenizer
        return self._tokenizer

    def __repr__(self) -> str:
        return (
            f"CAGSRRewardFunction(name={self.__name__!r}, config={self.config!r}, source={self.source!r}, "
            f"likelihood={self.likelihood!r})"
        )

    @property
    def logprob_provider(self) -> Any:
        """What computes the grounding term's log-probabilities when the columns do not carry them: ``likelihood``,
        else ``source`` when it has ``logprobs``, else ``None``."""
        if self.likelihood is not None:
            return self.likelihood
        if self.source is not None and callable(getattr(self.source, "logprobs", None)):
            return self.source
        return None

    @property
    def needs_logprob_columns(self) -> bool:
        """True when ``config.eta > 0`` and nothing but the ``attncap_logprobs`` / ``attncap_prior_logprobs``
        columns can supply the log-probabilities (a trainer that can compute them adds them; see
        ``vllm_attncap.rl.trainers``)."""
        return self.config.eta > 0 and self.logprob_provider is None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["last_scores"] = []
        return state

    # -- pieces -------------------------------------------------------------------------------------------------

    def encode(self, prompt: Any) -> PromptEncoding:
        """Tokenize one TRL prompt as TRL does and find its salient positions (sink per ``config.sink``).

        Example:
            >>> reward.encode([{"role": "user", "content": "Where is Paris?"}]).salient  # doctest: +SKIP
        """
        return encode_prompt(
            prompt,
            self.tokenizer,
            self.selector,
            sink=self.config.sink,
            add_generation_prompt=True,
            roles=self.config.salient_roles,
            tools=self.tools,
            chat_template_kwargs=self.chat_template_kwargs,
        )

    def prior_prompt_ids(self, prompt: Any) -> list[int]:
        """The empty conversation of one TRL prompt (`cagsr_reward.encoding.prior_prompt_ids`, rendered like
        :meth:`encode`): the context of the grounding term's prior log-probabilities."""
        return prior_prompt_ids(self.tokenizer, prompt, chat_template_kwargs=self.chat_template_kwargs, tools=self.tools)

    def _missing_logprobs(self, what: str) -> ValueError:
        return ValueError(
            f"{what}: the grounding term (eta={self.config.eta}) needs each completion's token log-probabilities "
            "after its prompt and after an empty conversation. Pass likelihood= to cagsr_reward_func (e.g. "
            "likelihood=HFLikelihood(model) from cagsr_reward.sources, a frozen copy of the starting policy as the "
            f"scoring model), or a source with .logprobs (HFAttentionSource), or give the columns {LOGPROBS_KWARG} and "
            f"{PRIOR_LOGPROBS_KWARG} (one 1-D sequence per completion), or use CAGSRConfig.attention_only() (eta=0)"
        )

    def _logprobs(self, index: int, prompt: Any, enc: PromptEncoding, completion: list[int], columns: tuple,
                  priors: dict[str, list[int]]) -> tuple[Any, Any]:
        """``(logprobs, prior_logprobs)`` of one completion: from the columns, else the likelihood / the source,
        else ``(None, None)`` (then ``eta`` must be 0)."""
        T = len(completion)
        entries = [None if col is None else col[index] for col in columns]
        names = (f"{LOGPROBS_KWARG}[{index}]", f"{PRIOR_LOGPROBS_KWARG}[{index}]")
        if any(e is not None for e in entries):
            if any(e is None for e in entries):
                raise ValueError(f"{names[0]}, {names[1]}: give both columns' entries or neither")
            out = []
            for name, entry in zip(names, entries):
                v = np.asarray(entry, dtype=np.float64)
                if v.shape != (T,):
                    raise ValueError(f"{name}: expected a 1-D sequence of {T} log-probabilities (one per completion "
                                     f"token), got shape {v.shape}")
                out.append(v)
            return out[0], out[1]
        provider = self.logprob_provider
        if provider is None:
            if self.config.eta > 0:
                raise self._missing_logprobs(f"{names[0]}, {names[1]}")
            return None, None
        key = _prompt_key(prompt)
        if key not in priors:
            priors[key] = self.prior_prompt_ids(prompt)
        return provider.logprobs(enc.input_ids, completion), provider.logprobs(priors[key], completion)

    def _attention(self, index: int, prompt_len: int, completion: list[int], captured: Any, prompt_ids: list[int]):
        """The aggregated attention ``(T, P+T-1)`` of one completion, from its capture or from the source."""
        item = None if captured is None else captured[index]
        name = f"{ATTENTION_KWARG}[{index}]"
        if item is None:
            if self.source is None:
                raise ValueError(
                    f"{name} is missing and no source was given: pass "
                    "source=HFAttentionSource(...) to cagsr_reward_func or provide captured attention"
                )
            cap = capture_from_source(self.source, prompt_ids, completion)
        else:
            cap = as_captured_attention(item, prompt_len=prompt_len, name=name)
        T = len(completion)
        if cap.mode != "rows" or cap.num_tokens != T:
            raise ValueError(
                f"attention for completion {index}: expected rows of shape (L, H, {T}, {prompt_len + T - 1}) for "
                f"P={prompt_len}, T={T}, got {cap.mode} mode with {cap.num_tokens} rows"
            )
        num_layers = cap.num_layers if cap.num_layers is not None else (
            None if cap.layer_ids is not None or cap.reduce == "layer_head_mean" else cap.attention.shape[0]
        )
        return cap.aggregate(layers=resolve_layers(self.config.layers, num_layers), heads=self.config.heads)

    def _decoded_tokens(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    def score(self, enc: PromptEncoding, prompt: Any, completion: list[int], a2d: np.ndarray, *,
              logprobs: Any = None, prior_logprobs: Any = None) -> Any:
        """Score one completion from its aggregated attention ``(T, P+T-1)`` (and, for the grounding term, its
        tokens' log-probabilities after the prompt and after an empty conversation): a ``TurnScore`` or a
        ``CoTScore``."""
        cfg = self.config
        P = len(enc.input_ids)
        content = enc.content_positions(cfg.salient_roles) if cfg.columns == "content" else None
        if cfg.mode == "cot":
            tokens = self._decoded_tokens(completion)
            salient = enc.salient
            if cfg.columns == "content":
                # MTC §3: in CoT the salient tokens include "key facts or intermediate conclusions from earlier
                # reasoning steps": the content words and numbers of the generated text count for later blocks
                generated = completion_salient(tokens, self.selector, offset=P)
                # the last generated token is a key of no row (P + T - 1 columns)
                salient = np.concatenate([enc.salient, generated[generated < P + len(completion) - 1]])
            return score_cot(
                a2d,
                P,
                salient,
                completion,
                enc.input_ids,
                cfg,
                response_tokens=tokens,
                sink=enc.sink,
                content_columns=content,
                turn_index=_turn_index(prompt),
                logprobs=logprobs,
                prior_logprobs=prior_logprobs,
            )
        user_span = None
        if not cfg.history_coverage:
            user_span = enc.last_span("user") if enc.message_spans else (0, P)
            if user_span is None:
                raise ValueError("prompts: history_coverage=False needs a user message in each chat prompt")
        return score_turn(
            a2d[:, :P],
            enc.salient,
            cfg,
            turn_index=_turn_index(prompt),
            response_ids=completion,
            history_ids=enc.input_ids,
            sink=enc.sink,
            user_span=user_span,
            content_columns=content,
            logprobs=logprobs,
            prior_logprobs=prior_logprobs,
        )

    # -- TRL entry point ----------------------------------------------------------------------------------------

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]],
        *,
        trainer_state: Any = None,
        log_metric: Any = None,
        log_extra: Any = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """Reward of each completion; ``None`` (TRL: "not applicable") for an empty completion.

        Args:
            prompts (`list[str | list[dict]]`): one prompt per completion (TRL repeats each prompt
                ``num_generations`` times).
            completions (`list`): the decoded completions (unused: the ids are what the policy produced).
            completion_ids (`list[list[int]]`): the generated token ids.
            trainer_state: TRL's ``TrainerState`` (unused).
            log_metric (`callable`, *optional*): ``log_metric(name, value)``; receives the batch means
                ``<name>/coverage``, ``<name>/focus``, ``<name>/repetition``, ``<name>/grounding`` and
                ``<name>/reward`` (grounding NaN when no log-probabilities were available, which ``eta = 0`` allows).
            log_extra (`callable`, *optional*): ``log_extra(column, values)``; receives the same five names with one
                value per completion.
            **kwargs: other dataset columns; ``attncap_attention`` (one
                :class:`~cagsr_reward.attention.CapturedAttention` per completion; an ``(L, H, T, P+T-1)`` array or a
                0.1-style dict with ``"attention"``, ``"prompt_len"``, ``"layer_ids"``, ``"num_layers"``, ``"reduce"``
                is accepted too) is used instead of the source when present; ``attncap_logprobs`` and
                ``attncap_prior_logprobs`` (one 1-D sequence of T floats per completion, or ``None`` for a completion
                whose log-probabilities the likelihood should compute) are used instead of the likelihood.

        Returns:
            `list[float | None]`: one reward per completion.
        """
        n = len(completion_ids)
        if len(prompts) != n:
            raise ValueError(f"prompts: expected one prompt per completion ({n}), got {len(prompts)}")
        captured = kwargs.get(ATTENTION_KWARG)
        if captured is not None and len(captured) != n:
            raise ValueError(f"{ATTENTION_KWARG}: expected one entry per completion ({n}), got {len(captured)}")
        lp_columns = (kwargs.get(LOGPROBS_KWARG), kwargs.get(PRIOR_LOGPROBS_KWARG))
        for name, col in zip((LOGPROBS_KWARG, PRIOR_LOGPROBS_KWARG), lp_columns):
            if col is not None and len(col) != n:
                raise ValueError(f"{name}: expected one entry per completion ({n}), got {len(col)}")
        if self.needs_logprob_columns and any(col is None for col in lp_columns):
            raise self._missing_logprobs("likelihood")
        encodings: dict[str, PromptEncoding] = {}
        priors: dict[str, list[int]] = {}
        rewards: list[float | None] = []
        columns: dict[str, list[float | None]] = {c: [] for c in _COMPONENTS}
        scores: list[Any] = []
        for i in range(n):
            completion = [int(t) for t in completion_ids[i]]
            key = _prompt_key(prompts[i])
            if key not in encodings:
                encodings[key] = self.encode(prompts[i])
            enc = encodings[key]
            if not completion:
                scores.append(None)
                rewards.append(None)
                for c in _COMPONENTS:
                    columns[c].append(None)
                continue
            a2d = self._attention(i, len(enc.input_ids), completion, captured, enc.input_ids)
            lp, lp0 = self._logprobs(i, prompts[i], enc, completion, lp_columns, priors)
            result = self.score(enc, prompts[i], completion, a2d, logprobs=lp, prior_logprobs=lp0)
            scores.append(result)
            parts = _components(result)
            rewards.append(parts["reward"])
            for c in _COMPONENTS:
                columns[c].append(parts[c])
        self.last_scores = scores
        if log_metric is not None:
            for c in _COMPONENTS:
                values = [v for v in columns[c] if v is not None]
                # NaN when nothing was scored keeps the logged keys identical on every rank (TRL requirement).
                log_metric(f"{self.__name__}/{c}", float(np.mean(values)) if values else math.nan)
        if log_extra is not None:
            for c in _COMPONENTS:
                log_extra(f"{self.__name__}/{c}", columns[c])
        return rewards


def _mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _components(result: Any) -> dict[str, float]:
    """Coverage/focus/repetition/grounding/reward of a TurnScore, or of a CoTScore (its blocks' means; reward =
    total). Grounding is NaN when no log-probabilities were given."""
    def g(b: Any) -> float:
        return math.nan if b.grounding is None else float(b.grounding)

    if hasattr(result, "blocks"):
        blocks = result.blocks
        return {
            "coverage": float(np.mean([b.coverage for b in blocks])),
            "focus": float(np.mean([b.focus for b in blocks])),
            "repetition": float(np.mean([b.repetition for b in blocks])),
            # the blocks that have a grounding term (a CoT answer under cot_grounding="reasoning" has none)
            "grounding": _mean_or_nan([b.grounding for b in blocks if b.grounding is not None]),
            "reward": float(result.total),
        }
    return {
        "coverage": float(result.coverage),
        "focus": float(result.focus),
        "repetition": float(result.repetition),
        "grounding": g(result),
        "reward": float(result.reward),
    }


def cagsr_reward_func(
    config: CAGSRConfig | None = None,
    *,
    source: Any = None,
    likelihood: Any = None,
    tokenizer: Any = None,
    selector: SalientSelector | None = None,
    name: str = "cagsr",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    tools: list[Any] | None = None,
) -> CAGSRRewardFunction:
    r"""Build a TRL reward function that scores each completion with the CAGSR turn reward.

    For each completion :math:`y` of prompt :math:`x` (method.md "One turn's reward"):

    .. math::

        R = \alpha\,C + \beta\,F - \gamma\,\mathrm{rep} + \eta\,G

    where :math:`C` is the attention mass the generated tokens put on the prompt's salient positions, :math:`F` the
    negative mean (floored) attention entropy over the prompt, :math:`\mathrm{rep}` the n-gram repetition
    (against the prompt in ``"multi"``/``"cot"`` mode, within the completion in ``"single"`` mode) and :math:`G` the
    grounding, the completion's mean per-token log-probability ratio
    :math:`\frac1T \sum_s [\log p(y_s \mid x, y_{<s}) - \log p(y_s \mid \varnothing, y_{<s})]` under a scoring
    model (:math:`\varnothing`: the empty conversation, :func:`~cagsr_reward.encoding.prior_prompt_ids`).

    Per completion the function (1) tokenizes the prompt exactly as TRL does (``tokenizer(prompt)`` for strings;
    ``apply_chat_template(messages, add_generation_prompt=True)`` for chat prompts), (2) takes the attention from the
    ``attncap_attention`` column when present (captured by the vLLM plugin, or added by a ``rollout_func``), else
    recomputes it with ``source``, (3) averages ``config.layers`` / ``config.heads``, (4) finds the salient prompt
    positions with ``selector``, (5) takes the grounding's two log-probability vectors from the
    ``attncap_logprobs`` / ``attncap_prior_logprobs`` columns when present, else computes them with ``likelihood``
    (else with ``source`` when it has ``logprobs``), (6) calls :func:`~cagsr_reward.scoring.score_turn`
    (``mode="cot"``: :func:`~cagsr_reward.scoring.score_cot`, reward = its weighted total). In a chat prompt the turn
    index is the number of assistant messages already in it (so the entropy floor rises along a dialogue). With
    ``config.eta == 0`` (``CAGSRConfig.attention_only()``) no log-probabilities are needed; when some are available
    the grounding is still computed and logged (weight 0).

    Args:
        config (`CAGSRConfig`, *optional*): hyper-parameters; defaults to ``CAGSRConfig()``.
        source (*optional*): an attention source (``attention(prompt_ids, completion_ids)``, e.g.
            :class:`~cagsr_reward.sources.HFAttentionSource`) used when no captured attention is passed. A source with
            ``logprobs`` (``HFAttentionSource`` has it) also gives the grounding's log-probabilities when no
            ``likelihood`` is given.
        likelihood (*optional*): the scoring model of the grounding term: an object with
            ``logprobs(prompt_ids, completion_ids) -> (T,)`` (:class:`~cagsr_reward.sources.Likelihood`), e.g.
            ``HFLikelihood(model)`` (a frozen copy of the starting policy keeps the policy from moving its own
            yardstick). It must read the policy's token ids. Required when ``config.eta > 0`` unless the source has
            ``logprobs`` or the log-probability columns come with the batch.
        tokenizer (*optional*): a Hugging Face *fast* tokenizer (offsets are needed); defaults to
            ``source.tokenizer``. It must be the policy's tokenizer (the one TRL tokenizes prompts with).
        selector (`SalientSelector`, *optional*): the salience rules; defaults to ``SalientSelector.content()``
            (content words, numbers and named entities; docs/method.md). Pass an IDF fitted on your training prompts
            to drop the corpus' own frequent words too: ``SalientSelector.content(IDFModel.fit(dataset["prompt"]))``;
            ``SalientSelector(IDFModel.fit(...))`` is the 0.2 high-IDF-quantile rule.
        name (`str`, defaults to ``"cagsr"``): ``__name__`` of the function: TRL logs ``rewards/<name>/mean``; our
            metrics are ``<name>/coverage``, ``<name>/focus``, ``<name>/repetition``, ``<name>/grounding``,
            ``<name>/reward``.
        chat_template_kwargs (`dict`, *optional*): as ``GRPOConfig.chat_template_kwargs`` (pass the same).
        tools (`list`, *optional*): as ``GRPOTrainer(tools=...)`` (pass the same, so prompts render identically).

    Returns:
        `CAGSRRewardFunction`: a picklable callable with ``__name__ == name``.

    Raises:
        ValueError: if neither ``tokenizer`` nor a ``source`` with a ``tokenizer`` is given, or ``name`` is empty.
            At call time: if ``config.eta > 0`` and no log-probabilities can be had (no ``likelihood``, a source
            without ``logprobs`` or none, and the two columns absent); the message names ``likelihood`` and the
            alternatives.
        TypeError: if ``likelihood`` has no ``logprobs`` method.

    Example:
        >>> from cagsr_reward import CAGSRConfig
        >>> from cagsr_reward.salient import IDFModel, SalientSelector
        >>> from cagsr_reward.sources import HFAttentionSource
        >>> reward = cagsr_reward_func(  # doctest: +SKIP
        ...     CAGSRConfig(mode="single"),
        ...     source=HFAttentionSource("path/to/policy"),  # attention and log-probabilities of the policy
        ...     selector=SalientSelector(IDFModel.fit(train_prompts)),
        ... )
        >>> trainer = GRPOTrainer(model="path/to/policy", reward_funcs=[reward], ...)  # doctest: +SKIP
        >>> from cagsr_reward.sources import HFLikelihood
        >>> captured = cagsr_reward_func(  # doctest: +SKIP
        ...     tokenizer=tok, likelihood=HFLikelihood("path/to/policy")  # attention from attncap_attention
        ... )
    """
    if config is None:
        config = CAGSRConfig()
    if not isinstance(config, CAGSRConfig):
        raise TypeError(f"config: expected a CAGSRConfig or None, got {type(config).__name__}")
    if source is not None and not callable(getattr(source, "attention", None)):
        raise TypeError(f"source: expected an object with .attention(prompt_ids, completion_ids), got {source!r}")
    if likelihood is not None and not callable(getattr(likelihood, "logprobs", None)):
        raise TypeError(
            f"likelihood: expected an object with .logprobs(prompt_ids, completion_ids), e.g. "
            f"cagsr_reward.sources.HFLikelihood(model), got {likelihood!r}"
        )
    if tokenizer is None and (source is None or not hasattr(source, "tokenizer")):
        raise ValueError("tokenizer: required (the policy's fast tokenizer) unless source provides .tokenizer")
    if selector is None:
        selector = SalientSelector.content()
    if not isinstance(selector, SalientSelector):
        raise TypeError(f"selector: expected a SalientSelector or None, got {type(selector).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    return CAGSRRewardFunction(
        config,
        source=source,
        tokenizer=tokenizer,
        selector=selector,
        name=name,
        chat_template_kwargs=chat_template_kwargs,
        tools=tools,
        likelihood=likelihood,
    )
