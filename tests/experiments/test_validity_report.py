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
    rendered = E.render(_load("selection.json"), _load("confirm.json"), _load("features.json"), _load("confirm2.json"))
    assert section == rendered, (
        "docs/experiments.md is out of date: run python -m experiments.validity --report-only"
    )


@pytest.mark.parametrize("name", ["confirm.json", "confirm2.json"])
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
    first, second = _load("confirm.json"), _load("confirm2.json")
    assert all(E.split_of(it["cluster"]) == "confirm" for it in first["items"] + second["items"])
    assert not {it["cluster"] for it in first["items"]} & {it["cluster"] for it in second["items"]}
    assert _load("selection.json")["split"] == "selection" and second["split"] == "confirm2"


def test_the_shipped_defaults_are_the_ones_chosen_on_the_selection_split():
    from cagsr_reward.config import CAGSRConfig

    selection = _load("selection.json")
    assert CAGSRConfig.from_dict(selection["chosen"]) == CAGSRConfig()
    assert _load("confirm2.json")["config"] == selection["chosen"]
    # the first confirm split was scored with the same attention terms, before the grounding term existed
    assert {**_load("confirm.json")["config"], "eta": 0.0} == {**selection["chosen"], "eta": 0.0}


def test_the_selection_grid_reproduces_its_own_choice():
    """The chosen settings are the argmax of the committed grid under the stated criteria (a stale or hand-edited
    selection.json fails here)."""
    selection = _load("selection.json")
    grid = {g["name"]: g for g in selection["grid"]}
    etas = [grid[f"eta{eta}"] for eta in E.ETAS]
    assert E.best_candidate(etas)["config"]["eta"] == selection["chosen"]["eta"]
    bands = [grid[f"band{k}"] for k in E.BANDS]
    k_best = max(E.BANDS, key=lambda k: (grid[f"band{k}"]["mean_auroc"], -k))
    assert selection["chosen"]["layers"] == f"last:{k_best}" and len(bands) == len(E.BANDS)


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
def test_the_second_confirm_split_takes_the_dialogues_after_the_first():
    """confirm2 = the confirm-split dialogues that come after every item built for the first confirm split: built
    from the corpora here (quick sizes), disjoint from it, and the parent builder's next items in order."""
    tok = E._tokenizer()
    first = E._build_items("confirm", "quick", tok)
    second = E._build_items("confirm2", "quick", tok)
    assert second and {it.split for it in second} == {"confirm2"}
    assert all(E.split_of(it.cluster) == "confirm" for it in second)
    assert not {it.cluster for it in first} & {it.cluster for it in second}
    for source in E.SOURCES:
        n1, n2 = E.SIZES["quick"]["confirm"][source], E.SIZES["quick"]["confirm2"][source]
        parent = [it.item_id for it in E._BUILDERS[source]("confirm", n1 + n2, tok)]
        assert [it.item_id for it in second if it.source == source] == parent[n1:]
