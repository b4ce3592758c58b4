"""docs/experiments.md's validity section is what `python -m experiments.validity --report-only` generates from the
committed JSONs, and those JSONs' summaries agree with their own per-item scores (fast: no model, no bootstrap)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments import validity as E  # noqa: E402

from cagsr_reward import validity as V  # noqa: E402

RESULTS = ROOT / "experiments" / "results" / "validity"


def _load(name):
    path = RESULTS / name
    if not path.exists():
        pytest.fail(f"{path} is not committed")
    return json.loads(path.read_text())


def test_doc_section_is_generated_from_the_committed_jsons():
    text = (ROOT / "docs" / "experiments.md").read_text()
    assert text.count(E.BEGIN) == 1 and text.count(E.END) == 1
    section = E.BEGIN + text.split(E.BEGIN, 1)[1].split(E.END, 1)[0] + E.END
    rendered = E.render(_load("selection.json"), _load("confirm.json"), _load("features.json"), _load("confirm2.json"),
                        _load("confirm3.json"), _load("confirm_tech.json"))
    assert section == rendered, (
        "docs/experiments.md is out of date: run python -m experiments.validity --report-only"
    )


@pytest.mark.parametrize("name", ["confirm.json", "confirm2.json", "confirm3.json", "confirm_tech.json"])
def test_confirm_summary_matches_its_per_item_scores(name):
    confirm = _load(name)
    items = confirm["items"]
    checked = 0
    for row in confirm["summary"]:
        # the items that have this comparison (the derived "truncated" probe skips replies too short to cut)
        its = [it for it in items if it["source"] == row["source"] and row["versus"] in confirm["scores"][it["item_id"]]]
        real = [confirm["scores"][it["item_id"]]["real"][row["score"]] for it in its]
        other = [confirm["scores"][it["item_id"]][row["versus"]][row["score"]] for it in its]
        # scores are stored rounded to 5 decimals, so near-ties may flip: allow one item's worth per stored tie
        ties = sum(1 for r, o in zip(real, other) if abs(r - o) < 2e-5)
        assert row["auroc"] == pytest.approx(V.paired_auroc(real, other), abs=(1.0 + ties) / len(its) + 1e-9)
        assert row["mean_diff"] == pytest.approx(float(np.mean(np.subtract(other, real))), abs=1e-4)
        assert row["n"] == len(its) and row["low"] <= row["auroc"] + 1e-9 and row["auroc"] <= row["high"] + 1e-9
        checked += 1
    assert checked > 0


def test_the_confirm_splits_share_no_dialogue_with_the_selection_split_or_each_other():
    splits = [_load(f"{name}.json") for name in ("confirm", "confirm2", "confirm3")]
    assert all(E.split_of(it["cluster"]) == "confirm" for s in splits for it in s["items"])
    clusters = [{it["cluster"] for it in s["items"]} for s in splits]
    for i in range(len(clusters)):
        for j in range(i + 1, len(clusters)):
            assert not clusters[i] & clusters[j]
    assert _load("selection.json")["split"] == "selection"
    assert [s["split"] for s in splits] == ["confirm", "confirm2", "confirm3"]


def test_the_shipped_defaults_are_the_ones_chosen_on_the_selection_split():
    from cagsr_reward.config import CAGSRConfig

    selection = _load("selection.json")
    assert CAGSRConfig.from_dict(selection["chosen"]) == CAGSRConfig()
    assert _load("confirm3.json")["config"] == selection["chosen"]
    # the earlier confirm splits were scored with the same attention terms: the first before the grounding term
    # existed, the second with the mean-PMI grounding
    grounding = {"eta": 0.0, "grounding_tokens": 0.0, "cot_grounding": "all"}
    attention = {**selection["chosen"], **grounding}
    assert {**_load("confirm.json")["config"], **grounding} == attention
    assert {**_load("confirm2.json")["config"], **grounding} == attention
    assert {k: _load("confirm2.json")["config"].get(k, v) for k, v in E.PREVIOUS_GROUNDING.items()} \
        == E.PREVIOUS_GROUNDING


def test_the_selection_grid_reproduces_its_own_choice():
    """The chosen settings are the argmax of the committed grid under the stated criteria (a stale or hand-edited
    selection.json fails here)."""
    selection = _load("selection.json")
    grid = {g["name"]: g for g in selection["grid"]}
    grounds = [grid["eta0.0"]] + [grid[E.grounding_name(eta, t0, cot)] for eta in E.ETAS[1:]
                                  for t0 in E.GROUNDING_TOKENS for cot in E.COT_GROUNDINGS]
    best = E.best_candidate(grounds)["config"]
    assert E.passes(E.best_candidate(grounds)), "no grounding candidate passes every bar"
    for key in ("eta", "grounding_tokens", "cot_grounding"):
        assert best[key] == selection["chosen"][key]
    bands = [grid[f"band{k}"] for k in E.BANDS]
    k_best = max(E.BANDS, key=lambda k: (grid[f"band{k}"]["mean_auroc"], -k))
    assert selection["chosen"]["layers"] == f"last:{k_best}" and len(bands) == len(E.BANDS)


def test_passes_applies_every_bar():
    good = {"loop_wins_min": 0.95, "pad_diff_max": 0.0, "trunc_wins_min": E.TRUNCATION_BAR, "answer_first_max": 0.0}
    assert E.passes(good)
    assert E.passes({"loop_wins_min": 1.0, "pad_diff_max": -1.0})  # a step without the truncation / CoT probes
    for key, bad in (("loop_wins_min", 0.94), ("pad_diff_max", 1e-6), ("trunc_wins_min", E.TRUNCATION_BAR - 0.01),
                     ("answer_first_max", 1e-6)):
        assert not E.passes({**good, key: bad}), key
    # the best passing candidate wins over a better one that fails a bar; among equals the first
    cands = [{**good, "mean_auroc": 0.9, "min_auroc": 0.5, "trunc_wins_min": 0.5},
             {**good, "mean_auroc": 0.8, "min_auroc": 0.5, "name": "a"},
             {**good, "mean_auroc": 0.8, "min_auroc": 0.5, "name": "b"}]
    assert E.best_candidate(cands)["name"] == "a"


def test_a_stale_cache_entry_is_refused(tmp_path):
    item = E.Item("x#1", "x", "chitchat", "selection", [], "", 1, continuations={"real": [1, 2], "other": [3]})
    path = E._cache_path(tmp_path, item)
    path.parent.mkdir(parents=True)
    np.savez(path, ids_real=np.array([1, 2]), ids_other=np.array([4]))
    assert not E._cache_matches(item, path)
    with pytest.raises(ValueError, match="cached for other continuations"):
        E.load_cached(item, tmp_path)
    np.savez(path, ids_real=np.array([1, 2]), ids_other=np.array([3]))
    assert E.load_cached(item, tmp_path)["ids_other"].tolist() == [3]


def test_attention_features_by_hand():
    """Each statistic of the feature probe on a hand-made attention array (two layer groups differ)."""
    att = np.zeros((30, 2, 5))
    att[:, :, :] = [0.4, 0.2, 0.2, 0.1, 0.1]  # history = positions 0..3, sink = position 0
    att[22:, 1, :] = [0.1, 0.6, 0.1, 0.1, 0.1]  # last 8 layers, second reply token: more on the salient position 1
    f = E.attention_features(att, 4, [1, 3, 9])  # 9 is outside the history: ignored
    assert f["early: coverage"] == pytest.approx(0.3)
    assert f["early: non-sink history mass"] == pytest.approx(0.5)
    assert f["early: coverage / non-sink history mass"] == pytest.approx(0.6)
    assert f["early: max on a salient token"] == pytest.approx(0.2)
    assert f["last 8: coverage"] == pytest.approx((0.3 + 0.7) / 2)
    assert f["last 8: max on a salient token"] == pytest.approx((0.2 + 0.6) / 2)
    assert f["all: coverage"] == pytest.approx((22 * 0.3 + 8 * 0.5) / 30)
    assert E.attention_features(att, 4, [])["all: coverage"] == 0.0


@pytest.mark.slow  # reads the corpora: ~20 s idle, ~45 s on a loaded machine
def test_the_fresh_confirm_splits_take_the_dialogues_after_the_earlier_ones():
    """confirm2 = the confirm-split dialogues after every item built for the first confirm split, confirm3 = those
    after confirm2's: built from the corpora here (quick sizes), disjoint, and the parent builder's next items in
    order."""
    tok = E._tokenizer()
    built = {name: E._build_items(name, "quick", tok) for name in ("confirm", "confirm2", "confirm3")}
    for name in ("confirm2", "confirm3"):
        assert built[name] and {it.split for it in built[name]} == {name}
        assert all(E.split_of(it.cluster) == "confirm" for it in built[name])
    clusters = [{it.cluster for it in items} for items in built.values()]
    assert not clusters[0] & clusters[1] and not clusters[0] & clusters[2] and not clusters[1] & clusters[2]
    for source in E.SOURCES:
        n1, n2, n3 = (E.SIZES["quick"][name][source] for name in ("confirm", "confirm2", "confirm3"))
        parent = [it.item_id for it in E._BUILDERS[source]("confirm", n1 + n2 + n3, tok)]
        assert [it.item_id for it in built["confirm2"] if it.source == source] == parent[n1:n1 + n2]
        assert [it.item_id for it in built["confirm3"] if it.source == source] == parent[n1 + n2:]


def test_the_tech_confirm_split_has_one_item_per_written_problem():
    """confirm_tech: every item is a different episode of the written pairs, asks a different problem at a turn with
    history, and its reference reply is that problem's fix."""
    from cagsr_reward.integrations.tech_corpus import EXTRA_PAIRS

    items = E._tech_extra_items(len(EXTRA_PAIRS))
    fixes = dict(EXTRA_PAIRS)
    assert len(items) == len(EXTRA_PAIRS) == len({it.cluster for it in items}) == len({it.real_text for it in items})
    for it in items:
        asked = it.messages[-1]["content"]
        assert it.turn_index >= 1 and it.messages[-1]["role"] == "user"
        assert it.real_text == fixes[next(p for p in fixes if p[1:] in asked)]
        assert it.cluster.startswith("tech_extra/") and it.split == "confirm_tech"
    assert [it.item_id for it in E._tech_extra_items(5)] == [it.item_id for it in items[:5]]
