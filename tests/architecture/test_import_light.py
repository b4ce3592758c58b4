"""The reward SDK imports with numpy alone: no torch, vllm or transformers at import time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORE_MODULES = ["cagsr_reward.config", "cagsr_reward.core", "cagsr_reward.aggregate", "cagsr_reward.scoring"]
# Every plain module directly under cagsr_reward/ is reward math and must stay numpy-only; the subpackages
# (`sources`, `integrations`) talk to engines and trainers and are allowed heavier imports.
NUMPY_ONLY_MODULES = ["cagsr_reward"] + sorted(
    {f"cagsr_reward.{p.stem}" for p in (REPO / "cagsr_reward").glob("*.py") if p.stem != "__init__"}
    | set(CORE_MODULES)
)


def _run(python: str, code: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    env.update(env_extra or {})
    return subprocess.run([python, "-c", code], cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)


def test_imports_with_heavy_packages_poisoned():
    # `sys.modules[name] = None` makes any `import name` raise ImportError, even if the package is installed.
    code = textwrap.dedent(
        f"""
        import importlib, sys
        for name in ("torch", "vllm", "transformers", "trl"):
            sys.modules[name] = None
        for module in {NUMPY_ONLY_MODULES!r}:
            importlib.import_module(module)
        import cagsr_reward
        assert cagsr_reward.__version__ == "0.2.0"
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "vllm", "transformers", "trl")
                       and sys.modules[m] is not None)
        assert not heavy, heavy
        # and the API works there
        import numpy as np
        cfg = cagsr_reward.CAGSRConfig()  # the default grounds the reply: both log-probability vectors given
        ts = cagsr_reward.score_turn(np.array([[0.5, 0.5]]), [0], cfg, sink=0, logprobs=[-1.0], prior_logprobs=[-2.0])
        print("ok", round(ts.coverage, 3), round(ts.grounding * (1 + cfg.grounding_tokens), 9))  # 1 nat over 1 + T0
        """
    )
    proc = _run(sys.executable, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok 0.5 1.0"  # a 1-token reply with 1 nat of PMI


@pytest.mark.slow
def test_imports_in_a_bare_venv_with_only_numpy(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--disable-pip-version-check", "-q", "numpy"],
        capture_output=True, text=True, timeout=300,
    )
    if install.returncode != 0:
        pytest.skip(f"pip could not install numpy here: {install.stderr.strip()[-300:]}")
    listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    names = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert not names & {"torch", "vllm", "transformers", "trl"}, names
    code = (
        "import cagsr_reward, numpy as np; "
        "ts = cagsr_reward.score_turn(np.array([[0.25, 0.75]]), [1], cagsr_reward.CAGSRConfig(), sink=0, "
        "logprobs=[-1.0], prior_logprobs=[-2.0]); "
        "print(cagsr_reward.__version__, ts.coverage)"
    )
    proc = _run(python, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0.2.0", "0.75"]
