"""Multi-turn capture on top of chat messages.

Each assistant turn is generated over the whole history (system, earlier user
and assistant turns, the new user turn) rendered with the model's chat template,
and captured. :class:`TurnCapture` says which history positions belong to which
message (``spans``), so rewards can tell the current user turn from older ones
and heatmaps can mark turn boundaries.

>>> conv = Dialogue(llm, spec={"layers": [-1], "reduce": "head_mean"})   # doctest: +SKIP
>>> turn = conv.say("My printer is offline.")                            # doctest: +SKIP
>>> turn.spans[-2]                                                       # doctest: +SKIP
Span(start=12, end=20, role='user', turn=0, message_index=1)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .api import CapturedOutput, generate_with_attentions

__all__ = ["Span", "TurnCapture", "Dialogue", "chat_with_attentions", "render_with_spans"]


@dataclass(frozen=True)
class Span:
    """History positions ``start..end-1`` hold message ``message_index`` (role, dialogue turn).

    ``role`` is the message role, or ``"generation_prompt"`` for the template's
    assistant header appended after the last message.
    """

    start: int
    end: int
    role: str
    turn: int
    message_index: int

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "role": self.role, "turn": self.turn, "message_index": self.message_index}


@dataclass
class TurnCapture:
    """One generated assistant turn with its capture and history layout."""

    turn: int
    messages: list[dict[str, str]]  # the history the turn was generated from
    prompt_token_ids: list[int]
    spans: list[Span]
    captured: CapturedOutput

    @property
    def text(self) -> str:
        return self.captured.text

    @property
    def user_span(self) -> Span | None:
        """The span of the latest user message (the current user turn)."""
        for s in reversed(self.spans):
            if s.role == "user":
                return s
        return None


def _dialogue_turns(messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Turn index per message: a turn starts at each user message (system = turn 0)."""
    turns, t = [], -1
    for m in messages:
        if m["role"] == "user":
            t += 1
        turns.append(max(t, 0))
    return turns


def render_with_spans(tokenizer, messages: Sequence[Mapping[str, str]], **template_kwargs) -> tuple[list[int], list[Span]]:
    """Render ``messages`` with the chat template (plus the generation prompt),
    tokenize, and locate each message's token span.

    Spans come from rendering growing prefixes of the conversation and mapping
    their character lengths to tokens through the fast tokenizer's offsets, so
    template tokens around a message belong to that message.
    """
    msgs = [dict(m) for m in messages]
    full = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **template_kwargs)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    ends = []
    for k in range(1, len(msgs) + 1):
        prefix = tokenizer.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=False, **template_kwargs)
        if not full.startswith(prefix):
            # Templates that rewrite earlier messages (rare): fall back to the common prefix.
            n = 0
            while n < min(len(prefix), len(full)) and prefix[n] == full[n]:
                n += 1
            prefix = full[:n]
        ends.append(len(prefix))
    # A message owns the tokens that start before its end (a token straddling
    # the boundary belongs to the earlier message).
    starts = [a for a, _ in offsets]
    turns = _dialogue_turns(msgs)
    spans, start = [], 0
    for k, end_char in enumerate(ends):
        end = max(bisect.bisect_left(starts, end_char), start)
        spans.append(Span(start, end, msgs[k]["role"], turns[k], k))
        start = end
    if start < len(ids):
        spans.append(Span(start, len(ids), "generation_prompt", turns[-1] if turns else 0, len(msgs)))
    return ids, spans


def chat_with_attentions(
    llm,
    conversations: Sequence[Sequence[Mapping[str, str]]] | Sequence[Mapping[str, str]],
    sampling_params: Any = None,
    spec: Any = None,
    *,
    use_tqdm: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[TurnCapture]:
    """Generate the next assistant turn of one or many conversations, with capture.

    Args:
        llm: a ``vllm.LLM`` created with ``attention_backend="attncap"``.
        conversations: one conversation (a list of ``{"role", "content"}``) or a list of them.
        sampling_params, spec: as in :func:`~vllm_attncap.api.generate_with_attentions`.

    Returns:
        One :class:`TurnCapture` per conversation; its prompt is the rendered history.
    """
    convs = [conversations] if conversations and isinstance(conversations[0], Mapping) else list(conversations)
    tok = llm.get_tokenizer()
    rendered = [render_with_spans(tok, c, **(chat_template_kwargs or {})) for c in convs]
    outs = generate_with_attentions(
        llm, [{"prompt_token_ids": ids} for ids, _ in rendered], sampling_params, spec, use_tqdm=use_tqdm
    )
    res = []
    for c, (ids, spans), out in zip(convs, rendered, outs):
        turn = max(_dialogue_turns(c)) if c else 0
        res.append(TurnCapture(turn, [dict(m) for m in c], ids, spans, out))
    return res


@dataclass
class Dialogue:
    """A conversation that keeps its history and captures every assistant turn.

    Example:
        >>> d = Dialogue(llm, system="You are a helpful support agent.")     # doctest: +SKIP
        >>> t0 = d.say("My printer is offline.")                              # doctest: +SKIP
        >>> t1 = d.say("I restarted it, still offline.")                      # doctest: +SKIP
        >>> len(d.turns), t1.user_span.turn                                   # doctest: +SKIP
        (2, 1)
    """

    llm: Any
    sampling_params: Any = None
    spec: Any = None
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    turns: list[TurnCapture] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.system and not self.messages:
            self.messages.append({"role": "system", "content": self.system})

    def say(self, user_text: str) -> TurnCapture:
        """Add a user message, generate and capture the assistant's reply, keep both."""
        self.messages.append({"role": "user", "content": user_text})
        turn = chat_with_attentions(self.llm, self.messages, self.sampling_params, self.spec)[0]
        if turn.captured.output is None:
            self.messages.pop()
            raise turn.captured.error  # type: ignore[misc]
        self.messages.append({"role": "assistant", "content": turn.text})
        self.turns.append(turn)
        return turn
