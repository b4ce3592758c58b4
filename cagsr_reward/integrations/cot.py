"""Chain-of-thought math with the CAGSR-vLLM-MTC reward (MTC §5.3) on the CHAMP problems.

- Data: ``champ-dataset`` 1.0.0 (270 competition-style problems in five categories, each with a reference answer and
  a step-by-step reference solution), read with ``champ_dataset.load("v0")``: :func:`load_champ`.
- Prompt: :func:`cot_messages` asks for brief step-by-step reasoning ending with ``The answer is <answer>.``, so
  the answer marker that :func:`cagsr_reward.scoring.find_answer_span` looks for is there.
- Reward: :func:`cot_reward_func` is the TRL reward function in ``mode="cot"``: the reasoning is cut into blocks of
  ``config.cot_block`` (= 5) tokens, each block a turn whose history is the prompt plus every earlier generated
  token, and the final answer span is the last turn, weighted ``config.final_answer_weight`` (> 1) unless the
  uniform-weights ablation is on; the reward is the weighted total :func:`cagsr_reward.scoring.score_cot`. Each
  block's grounding (``eta > 0``, the default) uses its span of the generated tokens' log-probabilities after the
  prompt and after the empty conversation: pass ``likelihood=`` (e.g. ``cagsr_reward.sources.HFLikelihood``), a
  ``source`` with ``logprobs``, or the ``attncap_logprobs`` columns, as for
  :func:`~cagsr_reward.integrations.trl.cagsr_reward_func`.
- Accuracy: :func:`extract_answer` takes the text after the last answer marker, :func:`answer_matches` compares it
  with the reference by exact match after normalisation (:func:`normalize_answer`; numbers compare numerically),
  accepting any of the reference's stated equivalent forms (``"C(10, 5), or equivalently 252"``).

numpy and the standard library only at import time.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..answers import ANSWER_MARKERS, BOXED_MARKER, marker_pattern
from ..config import CAGSRConfig
from ..salient import SalientSelector

__all__ = [
    "MathProblem",
    "COT_SYSTEM_PROMPT",
    "load_champ",
    "split_problems",
    "cot_messages",
    "cot_dataset_rows",
    "cot_reward_func",
    "extract_answer",
    "normalize_answer",
    "answer_matches",
    "accuracy",
    "reasoning_text",
]

COT_SYSTEM_PROMPT = (
    "You are a careful math tutor. Think step by step in a few short sentences, then finish with "
    "'The answer is <answer>.'"
)

# the reward's answer markers (cagsr_reward.answers): the text ones, and \boxed{...} whose braces hold the answer
_MARKERS = marker_pattern([m for m in ANSWER_MARKERS if m != BOXED_MARKER])
_BOXED = re.compile(re.escape(BOXED_MARKER))


@dataclass(frozen=True)
class MathProblem:
    """A CHAMP problem.

    Attributes:
        problem_id (`str`): e.g. ``"P_Combinatorics_1"``.
        question (`str`): the problem statement.
        answer (`str`): the reference answer (may state equivalent forms).
        steps (`tuple[str, ...]`): the reference solution, one step per item.
        category (`str`): one of the five CHAMP categories.
    """

    problem_id: str
    question: str
    answer: str
    steps: tuple[str, ...]
    category: str

    @property
    def solution(self) -> str:
        return " ".join(self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem_id": self.problem_id,
            "question": self.question,
            "answer": self.answer,
            "steps": list(self.steps),
            "category": self.category,
        }


def load_champ(version: str = "v0") -> list[MathProblem]:
    """All CHAMP problems (270 in ``v0``), in the dataset's order."""
    if importlib.util.find_spec("champ_dataset") is None:
        raise ImportError("the CoT task needs the 'champ-dataset' package: pip install 'vllm-attncap[data]'")
    import champ_dataset

    ds = champ_dataset.load(version)
    problems = []
    for p in ds.problems.values():
        steps = tuple(s.text for s in (p.solution.steps if p.solution and p.solution.steps else []))
        problems.append(MathProblem(p.identifier, p.text, p.answer, steps, p.category))
    return problems


def split_problems(
    problems: Sequence[MathProblem], held_out: int, *, seed: int = 0
) -> tuple[list[MathProblem], list[MathProblem]]:
    """Disjoint (train, held-out) lists; the held-out problems are drawn at random (seeded)."""
    import numpy as np

    if not 0 < held_out < len(problems):
        raise ValueError(f"held_out: expected 1..{len(problems) - 1}, got {held_out}")
    perm = np.random.default_rng(seed).permutation(len(problems))
    test = sorted(int(i) for i in perm[:held_out])
    train = sorted(int(i) for i in perm[held_out:])
    return [problems[i] for i in train], [problems[i] for i in test]


def cot_messages(problem: MathProblem | str, *, system: str | None = COT_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Chat messages for one problem (system prompt, then the question)."""
    question = problem.question if isinstance(problem, MathProblem) else str(problem)
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]


def cot_dataset_rows(problems: Sequence[MathProblem], **kwargs: Any) -> dict[str, list]:
    """Columns for ``datasets.Dataset.from_dict``: ``prompt`` (messages), ``answer``, ``solution``, ``problem_id``."""
    return {
        "prompt": [cot_messages(p, **kwargs) for p in problems],
        "answer": [p.answer for p in problems],
        "solution": [p.solution for p in problems],
        "problem_id": [p.problem_id for p in problems],
    }


def cot_reward_func(
    config: CAGSRConfig | None = None,
    *,
    tokenizer: Any,
    selector: SalientSelector | None = None,
    name: str = "cagsr_cot",
    **kwargs: Any,
):
    """The CAGSR CoT reward as a TRL reward function (``config.mode`` forced to ``"cot"``; see the module docstring).
    ``kwargs`` go to :func:`~cagsr_reward.integrations.trl.cagsr_reward_func`: ``source``, ``likelihood`` (the grounding
    term's scoring model, needed with the default ``eta > 0`` unless the source has ``logprobs`` or the batch carries
    the ``attncap_logprobs`` columns), ``chat_template_kwargs``, ``tools``.

    Example:
        >>> from cagsr_reward.sources import HFLikelihood
        >>> reward = cot_reward_func(tokenizer=tok, likelihood=HFLikelihood("path/to/policy"))  # doctest: +SKIP
    """
    from .trl import cagsr_reward_func

    config = (config or CAGSRConfig()).replace(mode="cot")
    return cagsr_reward_func(config, tokenizer=tokenizer, selector=selector, name=name, **kwargs)


def _boxed_content(text: str, start: int) -> str:
    depth, i = 1, start
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start : i - 1] if depth == 0 else text[start:]


def extract_answer(text: str) -> str | None:
    r"""The final answer stated in a generated solution, or ``None`` when it states none.

    The answer is the content of the last ``\boxed{...}`` if any, else the text after the last marker
    (``the answer is``, ``the final answer is``, ``answer:``, ``####``; case-insensitive) up to the end of that
    line or sentence, with surrounding ``$``, ``*`` and trailing punctuation removed.

    Example:
        >>> extract_answer("3 + 4 = 7. The answer is 7.")
        '7'
        >>> extract_answer("so x = \\boxed{\\frac{1}{2}}")
        '\\frac{1}{2}'
        >>> extract_answer("Answer: $2^{n-1}$") , extract_answer("no idea")
        ('2^{n-1}', None)
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected str, got {type(text).__name__}")
    boxed = list(_BOXED.finditer(text))
    if boxed:
        return _boxed_content(text, boxed[-1].end()).strip() or None
    hits = list(_MARKERS.finditer(text))
    if not hits:
        return None
    tail = text[hits[-1].end() :].strip()
    tail = tail.split("\n", 1)[0]
    # end of sentence: a period followed by a space/end that is not a decimal point
    m = re.search(r"(?<!\d)\.(?:\s|$)|(?<=\d)\.(?:\s|$)", tail)
    if m:
        tail = tail[: m.start()]
    tail = tail.strip().strip("*$ ").rstrip(".,;:!").strip()
    return tail or None


def normalize_answer(answer: str) -> str:
    r"""Canonical form for exact match: lower case, no spaces, no ``$``/``\(\)``/``\left``/``\right``, no trailing
    period, thousands separators removed from numbers, ``\dfrac``/``\tfrac`` -> ``\frac``.

    Example:
        >>> normalize_answer(" $1,000$. "), normalize_answer("2^(n - 1)")
        ('1000', '2^(n-1)')
    """
    s = answer.strip().lower()
    s = re.sub(r"\\(?:left|right)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\[()\[\]]", "", s)
    s = s.replace("$", "")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def _number(s: str) -> float | None:
    try:
        value = float(s)
    except ValueError:
        m = re.fullmatch(r"(-?\d+)/(\d+)", s) or re.fullmatch(r"\\frac\{(-?\d+)\}\{(\d+)\}", s)
        if not m or int(m.group(2)) == 0:
            return None
        value = int(m.group(1)) / int(m.group(2))
    return value if math.isfinite(value) else None


def _reference_forms(reference: str) -> list[str]:
    """The reference answer and each equivalent form it states (``"A, or equivalently B"``, ``"A or B"``)."""
    parts = re.split(r",?\s*(?:or equivalently|equivalently|i\.e\.,?|or)\s+", reference)
    return [p for p in [reference, *parts] if p.strip()]


def answer_matches(predicted: str | None, reference: str) -> bool:
    """Exact match after :func:`normalize_answer`, against the reference or any equivalent form it states;
    two numbers match when equal to 1e-6 relative tolerance.

    Example:
        >>> answer_matches("252", "C(10, 5), or equivalently 252"), answer_matches("0.5", "1/2")
        (True, True)
        >>> answer_matches("251", "252"), answer_matches(None, "252")
        (False, False)
    """
    if predicted is None:
        return False
    pred = normalize_answer(predicted)
    if not pred:
        return False
    pred_num = _number(pred)
    for form in _reference_forms(reference):
        ref = normalize_answer(form)
        if pred == ref:
            return True
        ref_num = _number(ref)
        if pred_num is not None and ref_num is not None and math.isclose(pred_num, ref_num, rel_tol=1e-6, abs_tol=1e-9):
            return True
    return False


def accuracy(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """Fraction of ``predictions`` (extracted answers) that :func:`answer_matches` their reference."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions: {len(predictions)} entries for {len(references)} references")
    if not references:
        raise ValueError("references: empty")
    return sum(answer_matches(p, r) for p, r in zip(predictions, references)) / len(references)


def reasoning_text(text: str) -> str:
    """The generated reasoning without the final answer statement (what step overlap compares)."""
    hits = list(_MARKERS.finditer(text)) or list(_BOXED.finditer(text))
    return text[: hits[-1].start()].strip() if hits else text.strip()
