"""The README's code snippet runs as it stands, and the README's commands exist."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _snippet() -> str:
    """The first Python block of the README: the one under "Use it"."""
    blocks = _python_blocks()
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def test_snippet_parses_and_explains_its_arguments():
    code = _snippet()
    ast.parse(code)
    assert "LLM(" in code and "score_turn(" in code
    assert "salient=[" not in code  # salient positions come from the prompt, not from unexplained numbers
    assert "salient_positions(" in code


def test_make_targets_named_in_the_readme_exist():
    text = README.read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^make ([\w-]+)", text, flags=re.M):
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"make {target}: no such target"
    assert "make test-fast" in text


@pytest.mark.engine
@pytest.mark.slow
def test_readme_snippet_runs(smollm2_path, tmp_path):
    """Runs the snippet in a fresh interpreter, as a user would save and run it (it starts one engine on the
    bundled model): it exits 0 and prints the turn's score, with coverage inside [0, 1] and salient positions
    found."""
    script = tmp_path / "readme_snippet.py"
    script.write_text(_snippet() + "\n    import json\n    print('SALIENT', json.dumps([int(i) for i in salient]))\n")
    env = dict(os.environ, VLLM_ATTNCAP_STORE=str(tmp_path / "store"), VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_ATTNCAP_NAMESPACE", None)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # as users run it
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"stdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    lines = res.stdout.strip().splitlines()
    salient = json.loads(next(line for line in lines if line.startswith("SALIENT "))[len("SALIENT "):])
    assert salient, "no prompt token matched the keywords"
    score_line = next(line for line in lines if line.startswith("{") and "'reward'" in line)
    score = ast.literal_eval(score_line)
    assert 0.0 < score["coverage"] <= 1.0 and 1 <= score["num_tokens"] <= 32
    # the README's formula: R = alpha * C + beta * F - gamma * rep + eta * G, G given (the default grounds the reply)
    from cagsr_reward.config import CAGSRConfig

    assert score["eta"] == CAGSRConfig().eta and score["grounding"] is not None
    expected = (score["alpha"] * score["coverage"] + score["beta"] * score["focus"] - score["gamma"] * score["repetition"]
                + score["eta"] * score["grounding"])
    assert score["reward"] == pytest.approx(expected, abs=1e-9)
