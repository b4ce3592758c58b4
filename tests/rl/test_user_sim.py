"""The user simulator: real dialogues from the installed data packages, 3-5 user turns per episode."""

from __future__ import annotations

import json
from collections import Counter

import pytest

pytest.importorskip("chitchat_dataset")
pytest.importorskip("chatterbot_corpus")

from cagsr_reward.integrations.user_sim import (  # noqa: E402
    Episode,
    UserSimulator,
    _read_tech_support_pairs,
    load_chitchat,
    load_tech_support,
)


def test_chitchat_episodes_are_the_openers_turns(tmp_path):
    # a two-person conversation in the package's format: the opener's turns become the user turns
    conv = {
        "c1": {
            "messages": [
                [{"text": "Hi", "sender": "A"}, {"text": "there", "sender": "A"}],
                [{"text": "hello", "sender": "B"}],
                [{"text": "How was   your day?", "sender": "A"}],
                [{"text": "good", "sender": "B"}],
                [{"text": "Nice.", "sender": "A"}],
                [{"text": "bye", "sender": "B"}],
                [{"text": "Bye!", "sender": "A"}],
            ]
        },
        "c2": {"messages": [[{"text": "one", "sender": "A"}], [{"text": "two", "sender": "B"}]]},
    }
    path = tmp_path / "d.json"
    path.write_text(json.dumps(conv))
    eps = load_chitchat(path=str(path), min_turns=3, max_turns=3)
    assert len(eps) == 1  # c2 has a single opener turn
    assert eps[0].user_turns == ("Hi there", "How was your day?", "Nice.")
    assert eps[0].reference_replies == ("hello", "good", "bye")


def test_real_sources_give_3_to_5_turns_and_are_reproducible():
    a = UserSimulator.from_sources(seed=3, limit_per_source=200)
    b = UserSimulator.from_sources(seed=3, limit_per_source=200)
    assert [e.to_dict() for e in a.episodes] == [e.to_dict() for e in b.episodes]
    counts = Counter(e.num_turns for e in a.episodes)
    assert set(counts) <= {3, 4, 5} and len(counts) >= 2
    assert {e.source for e in a.episodes} == {"chitchat", "tech_support"}
    assert all(all(t.strip() for t in e.user_turns) for e in a.episodes)
    assert a.episodes[0].source == "chitchat" and a.episodes[1].source == "tech_support"  # interleaved


def test_tech_support_episodes_use_corpus_text():
    import os

    import chatterbot_corpus.corpus as corpus

    pairs = _read_tech_support_pairs(os.path.join(corpus.DATA_DIRECTORY, "english", "tech_support.yml"))
    problems = {p for p, _ in pairs}
    eps = load_tech_support(seed=0)
    assert len(eps) == len(pairs) * (len(pairs) - 1)
    for e in eps:
        assert e.user_turns[0] in problems
        assert 3 <= e.num_turns <= 5
        # every reference reply is the corpus fix of the problem its turn states (issue 25: the old second turn,
        # "I already tried <fix>", had that same fix as its reference), and no problem comes twice
        answered = []
        for user, reply in zip(e.user_turns, e.reference_replies):
            problem = next(p for p, f in pairs if p[1:] in user)
            assert reply == dict(pairs)[problem]
            answered.append(problem)
        assert len(set(answered)) == e.num_turns == len(e.reference_replies)


def test_tech_support_from_given_pairs():
    """The 48 written pairs build episodes exactly as the corpus does: each reply is the fix of the problem its turn
    states; ids carry the prefix; pairs and path are exclusive; fewer than two pairs is an error."""
    from cagsr_reward.integrations.tech_corpus import EXTRA_PAIRS

    eps = load_tech_support(seed=3, pairs=EXTRA_PAIRS, id_prefix="tech_extra", num_episodes=50)
    fixes = dict(EXTRA_PAIRS)
    assert len(eps) == 50 and all(e.episode_id.startswith("tech_extra/") for e in eps)
    for e in eps:
        for user, reply in zip(e.user_turns, e.reference_replies):
            problem = next(p for p in fixes if p[1:] in user)
            assert reply == fixes[problem]
    assert [e.user_turns for e in eps] == [e.user_turns for e in load_tech_support(
        seed=3, pairs=EXTRA_PAIRS, id_prefix="tech_extra", num_episodes=50)]
    with pytest.raises(ValueError, match="path or pairs"):
        load_tech_support(pairs=EXTRA_PAIRS, path="x.yml")
    with pytest.raises(ValueError, match="two distinct"):
        load_tech_support(pairs=[("a", "b"), ("a", "b")])


def test_next_turn_split_and_prefix():
    eps = [Episode(f"x/{i}", "chitchat", ("a", "b", "c"), ("ra", "rb"), "sys") for i in range(10)]
    sim = UserSimulator(eps, seed=0)
    history = UserSimulator.opening(eps[0])
    assert history == [{"role": "system", "content": "sys"}, {"role": "user", "content": "a"}]
    history.append({"role": "assistant", "content": "whatever"})
    assert UserSimulator.next_user_turn(eps[0], history) == "b"
    history += [{"role": "user", "content": "b"}, {"role": "assistant", "content": "."}, {"role": "user", "content": "c"}]
    assert UserSimulator.next_user_turn(eps[0], history + [{"role": "assistant", "content": "."}]) is None
    prefix = UserSimulator.reference_prefix(eps[0], 2, system=False)
    assert [m["content"] for m in prefix] == ["a", "ra", "b", "rb", "c"]
    train, test = sim.split(3)
    assert len(test.episodes) == 3 and len(train.episodes) == 7
    assert not {e.episode_id for e in train.episodes} & {e.episode_id for e in test.episodes}
    assert len(sim.sample(4)) == 4 and len({e.episode_id for e in sim.sample(10)}) == 10
    with pytest.raises(ValueError, match="turn"):
        UserSimulator.reference_prefix(eps[0], 3)
    with pytest.raises(ValueError, match="unknown source"):
        UserSimulator.from_sources(["reddit"])
