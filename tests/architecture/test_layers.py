"""The layering of the two packages, checked by import-linter (contracts in pyproject.toml, drawn in
docs/architecture.md): the contracts hold, and they do fail when a forbidden import is added."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[test]')")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_contracts_hold():
    res = _lint(REPO)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "6 kept, 0 broken" in res.stdout


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "pyproject.toml", root)
    for pkg in ("cagsr_reward", "vllm_attncap"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return root


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # a function-level import counts as much as a top-level one
        ("cagsr_reward/core.py", "def _leak():\n    import vllm_attncap.api  # noqa\n",
         "The reward SDK never imports the capture plugin or vLLM"),
        ("cagsr_reward/scoring.py", "import torch  # noqa\n",
         "The reward math imports no framework"),
        ("vllm_attncap/engine/tracker.py", "def _leak():\n    from ..serving import admission  # noqa\n",
         "vllm_attncap layers"),
        ("vllm_attncap/store/store.py", "def _leak():\n    import torch  # noqa\n",
         "The capture spec and the store (with its per-rank parts) import neither vLLM nor torch"),
        ("vllm_attncap/store/parts.py", "def _leak():\n    import vllm  # noqa\n",
         "The capture spec and the store (with its per-rank parts) import neither vLLM nor torch"),
        ("vllm_attncap/engine/cpu/capture.py", "def _leak():\n    from ..cuda import kernels  # noqa\n",
         "The engine's platform rooms are independent"),
        ("vllm_attncap/engine/cuda/graph_step.py", "def _leak():\n    from ..cpu import backend  # noqa\n",
         "The engine's platform rooms are independent"),
        ("vllm_attncap/engine/runner_hooks.py", "def _leak():\n    from .cuda import graph_dispatch  # noqa\n",
         "The shared engine modules import neither platform room"),
        ("vllm_attncap/engine/capture.py", "def _leak():\n    from .cpu import kernels  # noqa\n",
         "The shared engine modules import neither platform room"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, contract):
    root = _copy(tmp_path)
    path = root / module
    path.write_text(path.read_text() + "\n\n" + line)
    res = _lint(root)
    assert res.returncode != 0, res.stdout[-3000:]
    broken = res.stdout[res.stdout.index("Broken contracts"):]
    assert contract in " ".join(broken.split())
