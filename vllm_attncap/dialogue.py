"""Multi-turn capture on top of chat messages.

Each assistant turn is generated over the whole history (system, earlier user
and assistant turns, the new user turn) rendered with the model's chat template,
and captured. :class:`TurnCapture` says which history positions belong to which
message (``spans``), so rewards can tell the current user turn from older ones
and heatmaps can mark turn boundaries.

>>> conv = Dialogue(llm, spec={"layers": [-1], "reduce": "head_mean"})   # doctest: +SKIP
>>> turn = conv.say("My printer is offline.")                            # doctest: +SKIP
>>> turn.spans[-2]                                                       # doctest: +SKIP
MessageSpan(start=12, end=20, role='user', turn=0, message_index=1, content_start=15, content_end=19)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from cagsr_reward.spans import MessageSpan, chat_message_spans, dialogue_turns

from .api import CapturedOutput, generate_with_attentions

__all__ = ["Span", "TurnCapture", "Dialogue", "chat_with_attentions", "render_with_spans"]


#: A message's token span in the rendered history (:class:`cagsr_reward.spans.MessageSpan`).
Span = MessageSpan


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


def render_with_spans(tokenizer, messages: Sequence[Mapping[str, str]], **template_kwargs) -> tuple[list[int], list[Span]]:
    """Render ``messages`` with the chat template (plus the generation prompt), tokenize, and locate each message's
    token span (:func:`cagsr_reward.spans.chat_message_spans`: spans partition the history, template tokens around a
    message belong to it; each span also knows its content tokens)."""
    chat = chat_message_spans(tokenizer, messages, **template_kwargs)
    return chat.input_ids, chat.spans


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
        turn = max(dialogue_turns(c)) if c else 0
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
