"""No import circle in either package (function-level imports count), and the check finds a planted one."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (pip install -e '.[test]')")

REPO = Path(__file__).resolve().parents[2]

_FIND = textwrap.dedent("""
    import grimp
    g = grimp.build_graph("cagsr_reward", "vllm_attncap", cache_dir=None)
    for a in sorted(g.modules):
        for b in sorted(g.find_modules_directly_imported_by(a)):
            if b in g.modules and b != a and g.chain_exists(importer=b, imported=a):
                print(a, b)
""")


def _cycles(root: Path) -> list[str]:
    res = subprocess.run([sys.executable, "-c", _FIND], cwd=root, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.splitlines()


def test_no_import_cycles():
    assert _cycles(REPO) == []


def test_a_planted_cycle_is_found(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    for pkg in ("cagsr_reward", "vllm_attncap"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    salient = root / "cagsr_reward" / "salient.py"
    salient.write_text(salient.read_text() + "\n\ndef _leak():\n    from . import encoding  # noqa\n")
    assert "cagsr_reward.encoding cagsr_reward.salient" in _cycles(root)
