"""A synthetic multi-turn task whose right reply needs a fact stated in an earlier turn (the papers' hypothesis).

The CAGSR papers claim that a reply which attends to the salient tokens of earlier turns is a better reply. This task
makes "better" checkable: in the first user turn the customer states a fact (an order number, their name, a date),
one unrelated exchange follows, and the last user turn asks for that fact back. The reference reply states the fact;
its metric is exact-match recall (:func:`recall_correct`). Every episode also carries a *wrong* reply, identical but
for a different fact of the same kind, so a reward can be asked whether it prefers the right fact (the validity
protocol, ``python -m experiments.validity``).

Everything is generated from word lists in this file, deterministically: episode ``i`` of seed ``s`` draws its
choices from ``numpy.random.default_rng(zlib.crc32(f"recall:{s}:{i}"))``. numpy and the standard library only.

Example:
    >>> ep = recall_episodes(1, seed=0)[0]
    >>> ep.messages[1]["content"] == ep.user_turns[0] and ep.fact in ep.user_turns[0]
    True
    >>> recall_correct(ep.reference_reply, ep.fact), recall_correct(ep.wrong_reply, ep.fact)
    (True, False)
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FACT_KINDS", "RECALL_SYSTEM_PROMPT", "RecallEpisode", "recall_correct", "recall_episodes", "recall_rate"]

RECALL_SYSTEM_PROMPT = "You are a helpful customer service assistant. Answer briefly and use what the customer told you."
FACT_KINDS = ("order number", "name", "date")

_FIRST = ("Maria", "James", "Aisha", "Tomas", "Elena", "Kenji", "Laura", "Omar", "Sofia", "Daniel", "Priya", "Lucas")
_LAST = ("Novak", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Costa", "Brennan", "Haddad", "Kowalski", "Reyes")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_ITEMS = ("a desk lamp", "a pair of headphones", "a coffee grinder", "a backpack", "a phone case", "a kettle")

# (opening with the fact, the question that asks for it back, reply templates stating it)
_SCRIPTS = {
    "order number": (
        ("Hi, I ordered {item} last week and it has not arrived. My order number is {fact}.",
         "Hello, my order number is {fact}. I bought {item} and I would like to change the delivery address."),
        ("Sorry, what was my order number again?", "Can you repeat my order number so I can write it down?"),
        ("Your order number is {fact}.", "It is {fact}.", "Sure, the order number you gave me is {fact}."),
    ),
    "name": (
        ("Hello, this is {fact}. I have a question about {item} I bought from you.",
         "Hi, my name is {fact} and I want to return {item}."),
        ("By the way, which name did I give you?", "Can you confirm the name you have for me?"),
        ("Your name is {fact}.", "You told me your name is {fact}.", "I have you down as {fact}."),
    ),
    "date": (
        ("Hi, I booked a repair for {item} on {fact}. Can I still change it?",
         "Hello, I need {item} delivered before {fact}. Is that possible?"),
        ("What date did I mention earlier?", "Remind me, which date did I give you?"),
        ("You mentioned {fact}.", "The date you gave me is {fact}.", "It was {fact}."),
    ),
}
_FILLER = (
    ("Do you ship to Canada?", "Yes, we ship to Canada; delivery takes five to seven working days."),
    ("Are your stores open on Sundays?", "Most of our stores are open on Sundays from ten to four."),
    ("Can I pay with a gift card?", "Yes, gift cards are accepted online and in our stores."),
    ("Is there a warranty on electronics?", "Electronics come with a two-year warranty."),
)
_ACK = "Thank you, I have noted that. How can I help you further?"


@dataclass(frozen=True)
class RecallEpisode:
    """One recall dialogue.

    Attributes:
        episode_id (`str`): ``"recall/<seed>/<index>"``.
        kind (`str`): one of `FACT_KINDS`.
        fact (`str`): the fact stated in the first user turn (``"48213"``, ``"Maria Novak"``, ``"March 14"``).
        wrong_fact (`str`): another fact of the same kind, never equal to `fact`.
        user_turns (`tuple[str, ...]`): the three user messages (fact, unrelated question, question for the fact).
        assistant_turns (`tuple[str, ...]`): the two earlier assistant replies.
        reference_reply (`str`): the right reply to the last user turn (states `fact`).
        wrong_reply (`str`): the same reply with `wrong_fact` in place of `fact`.
        system (`str`): the system prompt.
    """

    episode_id: str
    kind: str
    fact: str
    wrong_fact: str
    user_turns: tuple[str, ...]
    assistant_turns: tuple[str, ...]
    reference_reply: str
    wrong_reply: str
    system: str = RECALL_SYSTEM_PROMPT

    @property
    def messages(self) -> list[dict[str, str]]:
        """The history up to and including the last user turn (the prompt the policy answers)."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for k, user in enumerate(self.user_turns):
            msgs.append({"role": "user", "content": user})
            if k < len(self.assistant_turns):
                msgs.append({"role": "assistant", "content": self.assistant_turns[k]})
        return msgs

    def to_dict(self) -> dict[str, Any]:
        return {
            "episode_id": self.episode_id, "kind": self.kind, "fact": self.fact, "wrong_fact": self.wrong_fact,
            "user_turns": list(self.user_turns), "assistant_turns": list(self.assistant_turns),
            "reference_reply": self.reference_reply, "wrong_reply": self.wrong_reply, "system": self.system,
        }


def _draw_fact(kind: str, rng: np.random.Generator) -> str:
    if kind == "order number":
        return str(int(rng.integers(10000, 100000)))
    if kind == "name":
        return f"{_FIRST[int(rng.integers(len(_FIRST)))]} {_LAST[int(rng.integers(len(_LAST)))]}"
    return f"{_MONTHS[int(rng.integers(12))]} {int(rng.integers(1, 29))}"


def recall_episodes(n: int, *, seed: int = 0, kinds: Sequence[str] = FACT_KINDS) -> list[RecallEpisode]:
    """``n`` recall episodes, the fact kinds taken in turn from `kinds`; episode ``i`` depends only on ``(seed, i)``.

    Args:
        n (`int`): number of episodes, ``>= 0``.
        seed (`int`, defaults to 0): the generator's seed.
        kinds (sequence of `str`, defaults to `FACT_KINDS`): fact kinds to cycle through.

    Example:
        >>> [e.kind for e in recall_episodes(4, seed=1)]
        ['order number', 'name', 'date', 'order number']
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    bad = [k for k in kinds if k not in _SCRIPTS]
    if bad or not kinds:
        raise ValueError(f"kinds: expected a non-empty subset of {FACT_KINDS}, got {list(kinds)!r}")
    out = []
    for i in range(n):
        rng = np.random.default_rng(zlib.crc32(f"recall:{seed}:{i}".encode()))
        kind = kinds[i % len(kinds)]
        openings, questions, replies = _SCRIPTS[kind]
        fact = _draw_fact(kind, rng)
        wrong = fact
        while wrong == fact:
            wrong = _draw_fact(kind, rng)
        item = _ITEMS[int(rng.integers(len(_ITEMS)))]
        filler_q, filler_a = _FILLER[int(rng.integers(len(_FILLER)))]
        reply = replies[int(rng.integers(len(replies)))]
        out.append(
            RecallEpisode(
                episode_id=f"recall/{seed}/{i}",
                kind=kind,
                fact=fact,
                wrong_fact=wrong,
                user_turns=(
                    openings[int(rng.integers(len(openings)))].format(item=item, fact=fact),
                    filler_q,
                    questions[int(rng.integers(len(questions)))],
                ),
                assistant_turns=(_ACK, filler_a),
                reference_reply=reply.format(fact=fact),
                wrong_reply=reply.format(fact=wrong),
            )
        )
    return out


def _normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def recall_correct(reply: str, fact: str) -> bool:
    """Exact-match recall: the fact's words appear, in order and contiguous, among the reply's words
    (case-insensitive, punctuation ignored), so ``"48213"`` does not match ``"482139"``.

    Example:
        >>> recall_correct("Your order number is 48213.", "48213"), recall_correct("It is 482139.", "48213")
        (True, False)
        >>> recall_correct("I have you down as maria  novak!", "Maria Novak")
        True
    """
    if not isinstance(reply, str) or not isinstance(fact, str) or not _normalise(fact):
        raise ValueError("reply, fact: expected strings, fact with at least one word")
    return f" {_normalise(fact)} " in f" {_normalise(reply)} "


def recall_rate(replies: Sequence[str], episodes: Sequence[RecallEpisode]) -> float:
    """Fraction of `replies` that :func:`recall_correct` their episode's fact (one reply per episode)."""
    if len(replies) != len(episodes) or not episodes:
        raise ValueError(f"replies: expected one reply per episode ({len(episodes)}), got {len(replies)}")
    return sum(recall_correct(r, e.fact) for r, e in zip(replies, episodes)) / len(episodes)
