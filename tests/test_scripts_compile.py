"""Every benchmark, example and script in the repository at least compiles on the Python CI runs.

The GPU benchmarks cannot run in CI; a syntax error in one of them would otherwise surface only on a GPU machine,
where device time is scarce.
"""

from __future__ import annotations

import py_compile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p for d in ("benchmarks", "examples", "scripts") for p in (ROOT / d).rglob("*.py"))


def test_there_are_files_to_check():
    assert any(p.parent.name == "benchmarks" for p in FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)
