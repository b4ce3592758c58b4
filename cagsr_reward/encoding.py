"""A prompt tokenized the way TRL tokenizes it, with its salient positions and message spans.

:func:`encode_prompt` is what the reward callables use: a string prompt goes through ``tokenizer(prompt)``; a list of
chat messages is rendered with the chat template (:mod:`cagsr_reward.spans` locates each message's text) and the
:class:`~cagsr_reward.salient.SalientSelector` runs on each message's own text, so template tokens are never
salient. numpy and the standard library only; the tokenizer is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import resolve_sink
from .salient import SalientSelector, token_positions_from_spans
from .spans import as_offsets, content_token_ranges, locate_message_texts, render_chat

__all__ = [
    "PromptEncoding",
    "completion_salient",
    "encode_prompt",
    "prior_prompt_ids",
    "salient_positions",
    "salient_positions_for_messages",
]


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "tokenizer must be a Hugging Face *fast* tokenizer (is_fast=True) because salient positions need "
            f"offset_mapping; got {type(tokenizer).__name__}"
        )


def _sink_count(sink: int | str, input_ids: Sequence[int], tokenizer: Any) -> int:
    """``sink`` as a count: ``"auto"`` = 1 when the first id is the tokenizer's BOS (config.resolve_sink)."""
    return resolve_sink(
        sink,
        first_token_id=input_ids[0] if len(input_ids) else None,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
    )


def salient_positions(
    text: str, tokenizer: Any, selector: SalientSelector, *, sink: int | str = 0, add_special_tokens: bool = True
) -> np.ndarray:
    """Salient token positions of ``text`` tokenized by ``tokenizer`` (as ``tokenizer(text)`` would).

    Args:
        text (`str`): the prompt text.
        tokenizer: a Hugging Face fast tokenizer (``is_fast``), used with ``return_offsets_mapping=True``.
        selector (`SalientSelector`): the salience rules.
        sink (`int | "auto"`, defaults to 0): leading positions never salient; ``"auto"`` = 1 if the first token is
            the tokenizer's BOS.
        add_special_tokens (`bool`, defaults to `True`): as in ``tokenizer(text, add_special_tokens=...)``; TRL
            tokenizes plain-text prompts with the default `True`.

    Returns:
        `np.ndarray`: sorted int64 token positions.

    Example:
        >>> positions = salient_positions("Ask Bob now", tokenizer, SalientSelector(), sink="auto")  # doctest: +SKIP
    """
    return encode_prompt(text, tokenizer, selector, sink=sink, add_special_tokens=add_special_tokens).salient


@dataclass(frozen=True)
class PromptEncoding:
    """A prompt tokenized together with its salient positions.

    Attributes:
        input_ids (`list[int]`): the prompt token ids, as TRL feeds them to the policy.
        salient (`np.ndarray`): sorted int64 salient positions into ``input_ids``.
        text (`str`): the string that was tokenized (the rendered chat template for message prompts).
        offsets (`np.ndarray`): ``(len(input_ids), 2)`` character offsets into ``text``.
        sink (`int`): the number of leading sink positions used.
        message_spans (`tuple`): for message prompts, ``(message_index, role, token_start, token_end)`` of each
            message's content tokens (half-open), in order; empty for string prompts.
    """

    input_ids: list[int]
    salient: np.ndarray
    text: str
    offsets: np.ndarray = field(repr=False)
    sink: int
    message_spans: tuple[tuple[int, str, int, int], ...] = ()

    def content_positions(self, roles: Iterable[str] | None = None) -> np.ndarray:
        """Positions of the content tokens of the messages whose role is in `roles` (``None``: every message), sorted
        int64: the history columns of ``CAGSRConfig(columns="content")``. Chat-template tokens and sinks are never
        content. A string prompt has no roles: every token with a non-empty character span past the sinks.

        Example:
            >>> enc = PromptEncoding([1, 2, 3, 4], np.zeros(0, np.int64), "", np.zeros((4, 2)), 0,
            ...                      ((0, "system", 0, 1), (1, "user", 2, 4)))
            >>> enc.content_positions(["user"]).tolist(), enc.content_positions().tolist()
            ([2, 3], [0, 2, 3])
        """
        if not self.message_spans:
            off = np.asarray(self.offsets)
            keep = np.flatnonzero(off[:, 1] > off[:, 0]) if off.size else np.arange(len(self.input_ids))
            return keep[keep >= self.sink].astype(np.int64)
        role_set = None if roles is None else set([roles] if isinstance(roles, str) else roles)
        parts = [
            np.arange(lo, hi, dtype=np.int64)
            for _, role, lo, hi in self.message_spans
            if role_set is None or role in role_set
        ]
        out = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        return out[out >= self.sink]

    def last_span(self, role: str = "user") -> tuple[int, int] | None:
        """Token span ``(start, end)`` of the last message with ``role``, or ``None`` if there is none.

        Example:
            >>> enc = PromptEncoding([1, 2, 3], np.zeros(0, np.int64), "", np.zeros((3, 2)), 0, ((0, "user", 1, 3),))
            >>> enc.last_span("user"), enc.last_span("system")
            ((1, 3), None)
        """
        for _, message_role, start, end in reversed(self.message_spans):
            if message_role == role:
                return (start, end)
        return None


def _encode_messages(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    selector: SalientSelector,
    *,
    sink: int | str,
    add_generation_prompt: bool,
    roles: Iterable[str] | None,
    chat_template: str | None,
    tools: list[Any] | None,
    template_kwargs: Mapping[str, Any],
) -> PromptEncoding:
    _require_fast(tokenizer)
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    if not all(isinstance(m, Mapping) for m in messages):
        raise ValueError("messages must be a list of dicts with 'role' and 'content'")
    role_set = None if roles is None else set([roles] if isinstance(roles, str) else roles)
    kwargs = dict(template_kwargs)
    kwargs.update(add_generation_prompt=add_generation_prompt, chat_template=chat_template, tools=tools)
    rendered = render_chat(tokenizer, list(messages), **kwargs)
    # Same ids as apply_chat_template(tokenize=True), which calls tokenizer(rendered, add_special_tokens=False).
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    offsets = as_offsets(enc["offset_mapping"])
    sink_n = _sink_count(sink, input_ids, tokenizer)
    spans: list[tuple[int, int]] = []
    located = locate_message_texts(tokenizer, messages, rendered, **kwargs)
    token_ranges = content_token_ranges(located, offsets)  # the content extent of cagsr_reward.spans
    for i, text, start in located:
        if role_set is not None and messages[i].get("role") not in role_set:
            continue
        spans += [(a + start, b + start) for a, b in selector.char_spans(text)]
    salient = token_positions_from_spans(spans, offsets, sink_n)
    message_spans = tuple(
        (i, str(messages[i].get("role")), lo, hi) for i, (lo, hi) in sorted(token_ranges.items())
    )
    return PromptEncoding(
        input_ids=input_ids, salient=salient, text=rendered, offsets=offsets, sink=sink_n, message_spans=message_spans
    )


def salient_positions_for_messages(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    selector: SalientSelector,
    *,
    sink: int | str = 0,
    add_generation_prompt: bool = True,
    roles: Iterable[str] | None = None,
    chat_template: str | None = None,
    tools: list[Any] | None = None,
    **template_kwargs: Any,
) -> np.ndarray:
    """Salient token positions of a chat history rendered with the tokenizer's chat template.

    The history is rendered with ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=...)`` and tokenized with ``add_special_tokens=False`` (the ids TRL feeds the policy).
    Each message's content is located in the rendered string and the selector runs on that content alone, so
    template tokens (role headers, separators) are never salient and sentence starts are judged per message.

    Args:
        messages (`list[dict]`): ``[{"role": ..., "content": str | list of {"type": "text", "text": ...}}]``.
        tokenizer: a Hugging Face fast tokenizer with a chat template.
        selector (`SalientSelector`): the salience rules.
        sink (`int | "auto"`, defaults to 0): leading positions never salient (``"auto"``: 1 if BOS first).
        add_generation_prompt (`bool`, defaults to `True`): as TRL renders prompts.
        roles (`Iterable[str]`, *optional*): only messages with these roles contribute (e.g. ``["user"]``);
            ``None`` = all messages.
        chat_template, tools, **template_kwargs: passed to ``apply_chat_template``.

    Returns:
        `np.ndarray`: sorted int64 token positions into the rendered prompt's ids.

    Raises:
        ValueError: if a message's content cannot be found in the rendered string.

    Example:
        >>> msgs = [{"role": "user", "content": "Where does Bob live?"}]
        >>> salient_positions_for_messages(msgs, tokenizer, SalientSelector(), sink="auto")  # doctest: +SKIP
    """
    return _encode_messages(
        messages,
        tokenizer,
        selector,
        sink=sink,
        add_generation_prompt=add_generation_prompt,
        roles=roles,
        chat_template=chat_template,
        tools=tools,
        template_kwargs=template_kwargs,
    ).salient


def encode_prompt(
    prompt: str | Sequence[Mapping[str, Any]],
    tokenizer: Any,
    selector: SalientSelector,
    *,
    sink: int | str = 0,
    add_special_tokens: bool = True,
    add_generation_prompt: bool = True,
    roles: Iterable[str] | None = None,
    chat_template: str | None = None,
    tools: list[Any] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> PromptEncoding:
    """Tokenize a TRL prompt the way TRL does and find its salient positions.

    A string prompt is tokenized as ``tokenizer(prompt)`` (``add_special_tokens``, default `True`, like TRL's
    ``processing_class(text=prompts)``); a list of messages goes through :func:`salient_positions_for_messages`
    (chat template with ``add_generation_prompt=True``, like ``GRPOTrainer._tokenize_prompts``).

    Args:
        prompt (`str | list[dict]`): the prompt.
        tokenizer: a Hugging Face fast tokenizer.
        selector (`SalientSelector`): the salience rules.
        sink (`int | "auto"`, defaults to 0): leading positions never salient.
        add_special_tokens (`bool`, defaults to `True`): string prompts only.
        add_generation_prompt, roles, chat_template, tools: message prompts only (see
            :func:`salient_positions_for_messages`).
        chat_template_kwargs (`dict`, *optional*): extra template variables (TRL's ``chat_template_kwargs``).

    Returns:
        `PromptEncoding`: ids, salient positions, the tokenized text, offsets and the sink count.

    Example:
        >>> enc = encode_prompt("Ask Bob now", tokenizer, SalientSelector(), sink="auto")  # doctest: +SKIP
        >>> enc.input_ids, enc.salient  # doctest: +SKIP
    """
    if not isinstance(selector, SalientSelector):
        raise TypeError(f"selector must be a SalientSelector, got {type(selector).__name__}")
    if isinstance(prompt, str):
        _require_fast(tokenizer)
        enc = tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        input_ids = list(enc["input_ids"])
        offsets = as_offsets(enc["offset_mapping"])
        sink_n = _sink_count(sink, input_ids, tokenizer)
        salient = token_positions_from_spans(selector.char_spans(prompt), offsets, sink_n)
        return PromptEncoding(input_ids=input_ids, salient=salient, text=prompt, offsets=offsets, sink=sink_n)
    return _encode_messages(
        prompt,
        tokenizer,
        selector,
        sink=sink,
        add_generation_prompt=add_generation_prompt,
        roles=roles,
        chat_template=chat_template,
        tools=tools,
        template_kwargs=chat_template_kwargs or {},
    )


def prior_prompt_ids(
    tokenizer: Any,
    prompt: str | Sequence[Mapping[str, Any]],
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    tools: list[Any] | None = None,
) -> list[int]:
    r"""The token ids of an *empty conversation* for `prompt`: the context of $\log p(y_s \mid \varnothing, y_{<s})$,
    the prior log-probabilities of the grounding term (`cagsr_reward.core.grounding`).

    For a chat prompt (a list of messages) it is what the chat template adds for the generation prompt: the ids of
    ``apply_chat_template(messages, add_generation_prompt=True)`` that follow those of
    ``add_generation_prompt=False`` (e.g. ``<|im_start|>assistant\n``), tokenized as :func:`encode_prompt` tokenizes
    chat prompts (the rendered string through ``tokenizer(..., add_special_tokens=False)``). For a string prompt it is
    ``[tokenizer.bos_token_id]``, or ``[tokenizer.eos_token_id]`` when the tokenizer has no BOS token.

    Args:
        tokenizer: the policy's tokenizer (with a chat template for chat prompts).
        prompt (`str | list[dict]`): the prompt, as given to :func:`encode_prompt`.
        chat_template_kwargs (`dict`, *optional*): extra template variables (as for :func:`encode_prompt`).
        tools (`list`, *optional*): as for :func:`encode_prompt`.

    Returns:
        `list[int]`: at least one token id.

    Raises:
        ValueError: when the result would be empty (a chat template that adds nothing for the generation prompt, a
            tokenizer without BOS and EOS tokens), or when the two renderings do not share their beginning.

    Example:
        >>> prior_prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        [1, 520, 9531, 198]
    """
    if isinstance(prompt, str):
        for name in ("bos_token_id", "eos_token_id"):
            token = getattr(tokenizer, name, None)
            if token is not None:
                return [int(token)]
        raise ValueError(
            "prompt: a string prompt's empty conversation is the tokenizer's BOS (else EOS) token, and this "
            f"tokenizer ({type(tokenizer).__name__}) has neither"
        )
    if not isinstance(prompt, Sequence) or not prompt or not all(isinstance(m, Mapping) for m in prompt):
        raise ValueError("prompt: expected a string or a non-empty list of {'role': ..., 'content': ...} dicts")
    kwargs = dict(chat_template_kwargs or {})
    kwargs.update(chat_template=None, tools=tools)
    with_header = render_chat(tokenizer, list(prompt), add_generation_prompt=True, **kwargs)
    without = render_chat(tokenizer, list(prompt), add_generation_prompt=False, **kwargs)
    full = list(tokenizer(with_header, add_special_tokens=False)["input_ids"])
    head = list(tokenizer(without, add_special_tokens=False)["input_ids"])
    if full[: len(head)] == head:
        out = full[len(head) :]
    elif with_header.startswith(without):  # the boundary merged two tokens: tokenize the added text alone
        out = list(tokenizer(with_header[len(without) :], add_special_tokens=False)["input_ids"])
    else:
        raise ValueError(
            "prompt: the chat template's rendering with add_generation_prompt=True does not start with the one "
            "without it, so the generation prompt (the empty conversation of the grounding term) cannot be cut out"
        )
    if not out:
        raise ValueError(
            "prompt: the chat template adds no tokens for the generation prompt (add_generation_prompt=True renders "
            "the same ids), so there is no empty-conversation context for the grounding term's prior"
        )
    return [int(t) for t in out]


def completion_salient(tokens: Sequence[str], selector: SalientSelector, *, offset: int = 0) -> np.ndarray:
    """Salient positions of generated text given its decoded tokens: the selector runs on their concatenation and
    each token whose characters overlap a salient span is salient; positions start at `offset` (the prompt length,
    so they index the full sequence, as `scoring.score_cot` expects for intermediate conclusions).

    Example:
        >>> completion_salient(["So", " x", " =", " 42", "."], SalientSelector(), offset=10).tolist()
        [13]
    """
    text = "".join(tokens)
    ends = np.cumsum([len(t) for t in tokens]) if len(tokens) else np.zeros(0, np.int64)
    offsets = np.stack([ends - np.array([len(t) for t in tokens]), ends], axis=1) if len(tokens) else np.zeros((0, 2))
    return token_positions_from_spans(selector.char_spans(text), offsets, 0) + int(offset)
