"""CoT task helpers: CHAMP loading, answer extraction, exact-match accuracy; the CoT reward function's settings."""

from __future__ import annotations

import pytest

from cagsr_reward.integrations.cot import (
    MathProblem,
    accuracy,
    answer_matches,
    cot_dataset_rows,
    cot_messages,
    cot_reward_func,
    extract_answer,
    load_champ,
    normalize_answer,
    reasoning_text,
    split_problems,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("We add 3 and 4. The answer is 7.", "7"),
        ("The answer is 3.5. Done", "3.5"),
        ("So the final answer is: **2^(n-1)**", "2^(n-1)"),
        ("the answer is 12\nbecause ...", "12"),
        ("Answer: 1,024", "1,024"),
        ("#### 42", "42"),
        ("thus \\boxed{\\frac{3}{4}} and the answer is 9", "\\frac{3}{4}"),
        ("I think it is 5", None),
        ("The answer is", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answer_matching():
    assert answer_matches("252", "C(10, 5), or equivalently 252")
    assert answer_matches("C(10,5)", "C(10, 5), or equivalently 252")
    assert answer_matches("1,024", "1024") and answer_matches("1/2", "0.5") and answer_matches("7.0", "7")
    assert answer_matches("2^(n - 1)", "2^(n-1)")
    assert not answer_matches("253", "C(10, 5), or equivalently 252")
    assert not answer_matches(None, "7") and not answer_matches("", "7")
    assert normalize_answer("$\\dfrac{1}{2}$.") == "\\frac{1}{2}"
    assert accuracy(["7", None, "3"], ["7", "8", "4"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        accuracy(["1"], ["1", "2"])


def test_champ_dataset_and_prompts():
    pytest.importorskip("champ_dataset")
    problems = load_champ()
    assert len(problems) == 270
    assert len({p.category for p in problems}) == 5
    assert all(p.question and p.answer and p.steps for p in problems)
    train, test = split_problems(problems, 20, seed=0)
    assert len(test) == 20 and len(train) == 250
    assert not {p.problem_id for p in train} & {p.problem_id for p in test}
    rows = cot_dataset_rows(test)
    assert rows["prompt"][0][-1] == {"role": "user", "content": test[0].question}
    assert "The answer is" in rows["prompt"][0][0]["content"]


def test_reasoning_text_drops_the_answer_statement():
    assert reasoning_text("3+4=7. The answer is 7.") == "3+4=7."
    assert reasoning_text("no marker here") == "no marker here"
    p = MathProblem("P_x", "q", "a", ("s1.", "s2."), "c")
    assert p.solution == "s1. s2." and cot_messages("q", system=None) == [{"role": "user", "content": "q"}]


def test_cot_reward_func_forces_cot_mode_and_passes_the_likelihood():
    from cagsr_reward import CAGSRConfig

    class Flat:  # a scoring model for the grounding term (only its presence matters here)
        def logprobs(self, prompt_ids, completion_ids):
            return [-1.0] * len(completion_ids)

    tokenizer, likelihood = object(), Flat()
    reward = cot_reward_func(tokenizer=tokenizer, likelihood=likelihood)
    assert reward.config == CAGSRConfig(mode="cot") and reward.config.eta == CAGSRConfig().eta > 0
    assert reward.likelihood is likelihood and not reward.needs_logprob_columns
    assert cot_reward_func(tokenizer=tokenizer).needs_logprob_columns  # eta > 0 and nothing to compute them with
    assert not cot_reward_func(CAGSRConfig.attention_only(), tokenizer=tokenizer).needs_logprob_columns
