"""CAGSRConfig: defaults, validation (the message names the field), dict round trips, replace; resolve_sink."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cagsr_reward.config import DEFAULT_LAYERS, MODES, CAGSRConfig, resolve_sink


def test_defaults():
    # issue 25 changed the defaults (docs/method.md, "Defaults"); the 0.2 values live on as CAGSRConfig.paper()
    paper = CAGSRConfig.paper()
    assert (paper.alpha, paper.beta, paper.gamma) == (1.0, 0.1, 0.5)
    assert (paper.h0, paper.kappa) == (0.5, 0.25)
    assert paper.layers == (-1,) and paper.salient_roles is None and paper.columns == "all"
    assert (paper.repetition, paper.cot_episode, paper.cot_answer, paper.cot_floor) == ("paper", "sum", "rest", "block")
    cfg = CAGSRConfig()
    assert cfg.layers == DEFAULT_LAYERS and cfg.salient_roles == ("user", "assistant") and cfg.columns == "content"
    assert (cfg.repetition, cfg.cot_episode, cfg.cot_answer, cfg.cot_floor) == ("self_and_copy", "mean", "sentence", "turn")
    assert cfg.block_focus == paper.block_focus == "summed"
    # the grounding weight, chosen on the selection split; the papers' preset and attention_only() leave it out
    assert (cfg.eta, paper.eta, CAGSRConfig.attention_only().eta) == (4.0, 0.0, 0.0)
    assert (cfg.grounding_tokens, cfg.cot_grounding) == (128.0, "all")
    assert CAGSRConfig.attention_only(mode="single") == cfg.replace(eta=0.0, mode="single")
    assert cfg.ngram == 3
    assert cfg.heads == "all"
    assert cfg.sink == "auto"
    assert cfg.mode == "multi"
    assert cfg.cot_block == 5
    assert cfg.final_answer_weight == 2.0
    assert (cfg.n_max, cfg.window) == (1024, 512)
    assert cfg.discount == 1.0
    assert cfg.history_coverage is True
    assert cfg.entropy_floor is True
    assert cfg.uniform_turn_weights is False
    assert MODES == ("single", "multi", "cot")


def test_normalisation():
    cfg = CAGSRConfig(layers=[-2, -1], heads=[0, 3], alpha=2, sink=1, discount=1)
    assert cfg.layers == (-2, -1) and cfg.heads == (0, 3)
    assert isinstance(cfg.alpha, float) and cfg.alpha == 2.0
    assert cfg.sink == 1 and isinstance(cfg.discount, float)
    assert CAGSRConfig(layers="all").layers == "all"
    assert CAGSRConfig(layers=5).layers == (5,)
    hash(cfg)  # frozen and hashable (tuples, not lists)


def test_frozen():
    cfg = CAGSRConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.alpha = 2.0  # type: ignore[misc]


BAD_VALUES = [
    ("alpha", -0.1), ("alpha", float("nan")), ("alpha", float("inf")), ("alpha", "1"), ("alpha", True),
    ("beta", -1.0), ("gamma", float("nan")), ("h0", -0.5), ("kappa", -0.01), ("kappa", None),
    ("ngram", 0), ("ngram", 2.0), ("ngram", True),
    ("cot_block", 0), ("n_max", 0), ("window", 0), ("window", 2048),
    ("final_answer_weight", 1.0), ("final_answer_weight", 0.5), ("final_answer_weight", float("inf")),
    ("discount", 1.5), ("discount", -0.1), ("discount", float("nan")),
    ("layers", []), ("layers", "last"), ("layers", [1.5]), ("layers", [True]), ("layers", None),
    ("heads", ()), ("heads", "some"), ("heads", ["0"]),
    ("sink", -1), ("sink", "bos"), ("sink", 1.0), ("sink", True),
    ("mode", "dialogue"), ("mode", None),
    ("history_coverage", 1), ("entropy_floor", "yes"), ("uniform_turn_weights", 0),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError) as info:
        CAGSRConfig(**{field: value})
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_mode_message_lists_allowed_values():
    with pytest.raises(ValueError, match=r"mode: expected one of \('single', 'multi', 'cot'\)"):
        CAGSRConfig(mode="chat")


def test_dict_round_trip_is_json_friendly():
    cfg = CAGSRConfig(layers=[-3, -1], heads=[1], sink=2, mode="cot", uniform_turn_weights=True)
    data = cfg.to_dict()
    assert data["layers"] == [-3, -1] and data["heads"] == [1]
    assert CAGSRConfig.from_dict(json.loads(json.dumps(data))) == cfg
    assert CAGSRConfig.from_dict({}) == CAGSRConfig()
    assert set(data) == {f.name for f in dataclasses.fields(CAGSRConfig)}


def test_from_dict_errors():
    with pytest.raises(ValueError, match=r"^data: unknown CAGSRConfig field\(s\) \['alfa'\]"):
        CAGSRConfig.from_dict({"alfa": 1.0})
    with pytest.raises(ValueError, match=r"^data:"):
        CAGSRConfig.from_dict([("alpha", 1.0)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^alpha:"):
        CAGSRConfig.from_dict({"alpha": -1})


def test_replace():
    cfg = CAGSRConfig()
    new = cfg.replace(mode="single", entropy_floor=False)
    assert new.mode == "single" and new.entropy_floor is False and cfg.mode == "multi"
    with pytest.raises(ValueError, match=r"^mode:"):
        cfg.replace(mode="x")
    with pytest.raises(ValueError, match=r"^changes: unknown"):
        cfg.replace(gama=1.0)


def test_resolve_sink():
    assert resolve_sink("auto", first_token_id=1, bos_token_id=1) == 1
    assert resolve_sink("auto", first_token_id=2, bos_token_id=1) == 0
    assert resolve_sink("auto", first_token_id=1, bos_token_id=None) == 0
    assert resolve_sink("auto") == 0
    assert resolve_sink(0) == 0 and resolve_sink(3) == 3
    for bad in (-1, "x", 1.5, True):
        with pytest.raises(ValueError, match=r"^sink:"):
            resolve_sink(bad)
