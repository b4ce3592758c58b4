"""vllm_attncap.envs is the one place the VLLM_ATTNCAP_* settings are defined and read; docs/settings.md shows its table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from vllm_attncap import envs

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vllm_attncap"
_NAME = re.compile(r"VLLM_ATTNCAP_[A-Z0-9_]+")


def _environ_reads(source: str) -> list[str]:
    """The VLLM_ATTNCAP_* variables that ``source`` reads or writes through ``os.environ`` / ``os.getenv`` (as a
    literal, or through a module constant holding the name)."""
    tree = ast.parse(source)
    consts = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for t in node.targets:
                if isinstance(t, ast.Name) and node.value.value.startswith(envs.PREFIX):
                    consts[t.id] = node.value.value

    def names_in(node) -> list[str]:
        out = []
        for n in ast.walk(node):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith(envs.PREFIX):
                out.append(n.value)
            elif isinstance(n, ast.Name) and n.id in consts:
                out.append(consts[n.id])
        return out

    found = []
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if f.attr == "getenv" or (isinstance(f.value, ast.Attribute) and f.value.attr == "environ"):
                target = node  # os.getenv(...), os.environ.get / pop / setdefault(...)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "environ":
            target = node.slice  # os.environ[...]
        elif isinstance(node, ast.Compare) and any(
            isinstance(c, ast.Attribute) and c.attr == "environ" for c in node.comparators
        ):
            target = node.left  # ... in os.environ
        if target is not None:
            found.extend(names_in(target))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "envs.py")


def test_no_other_module_reads_the_settings_from_os_environ():
    offenders = {str(p.relative_to(REPO)): names for p in _modules() if (names := _environ_reads(p.read_text()))}
    assert offenders == {}


@pytest.mark.parametrize("planted", [
    'import os\nx = os.environ.get("VLLM_ATTNCAP_TTL_S", "1")\n',
    'import os\nNAME = "VLLM_ATTNCAP_GRAPH"\nif os.environ.get(NAME) == "0":\n    pass\n',
    'import os\nos.environ["VLLM_ATTNCAP_NAMESPACE"] = "x"\n',
    'import os\nv = os.getenv("VLLM_ATTNCAP_KERNELS")\n',
    'import os\nok = "VLLM_ATTNCAP_STORE" in os.environ\n',
])
def test_the_check_catches_a_planted_read(planted):
    assert _environ_reads(planted), planted
    assert not _environ_reads('import os\nx = os.environ.get("HOME")\nfrom vllm_attncap import envs\n'
                              'y = envs.VLLM_ATTNCAP_TTL_S\n')


def test_every_setting_named_in_the_package_is_defined():
    named = set()
    for p in _modules():
        named |= set(_NAME.findall(p.read_text()))
    assert named - set(envs.SETTINGS) == set()


def test_docs_table_matches_envs():
    text = (REPO / "docs" / "settings.md").read_text()
    start = text.index("<!-- settings table: generated from vllm_attncap/envs.py -->\n")
    end = text.index("<!-- end of settings table -->")
    table = text[start:end].split("\n", 1)[1]
    assert table == envs.docs_table()
    rows = [line for line in table.splitlines()[2:]]
    assert [r.split("`")[1] for r in rows] == list(envs.SETTINGS)


def test_settings_are_read_lazily(monkeypatch):
    monkeypatch.delenv("VLLM_ATTNCAP_TTL_S", raising=False)
    assert envs.VLLM_ATTNCAP_TTL_S == 3600.0
    monkeypatch.setenv("VLLM_ATTNCAP_TTL_S", "12.5")
    assert envs.VLLM_ATTNCAP_TTL_S == 12.5 and envs.get("VLLM_ATTNCAP_TTL_S") == 12.5
    monkeypatch.setenv("VLLM_ATTNCAP_TTL_S", "")
    assert envs.VLLM_ATTNCAP_TTL_S == 3600.0  # empty counts as unset
    monkeypatch.setenv("VLLM_ATTNCAP_GRAPH", "0")
    assert envs.VLLM_ATTNCAP_GRAPH is False
    monkeypatch.setenv("VLLM_ATTNCAP_GRAPH", "1")
    assert envs.VLLM_ATTNCAP_GRAPH is True


def test_bad_values_and_names_are_refused(monkeypatch):
    monkeypatch.setenv("VLLM_ATTNCAP_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="VLLM_ATTNCAP_MAX_BYTES='lots' is not a valid int"):
        envs.get("VLLM_ATTNCAP_MAX_BYTES")
    with pytest.raises(KeyError, match="unknown setting"):
        envs.get("VLLM_ATTNCAP_NOPE")
    with pytest.raises(AttributeError):
        envs.VLLM_ATTNCAP_NOPE  # noqa: B018


def test_frozen_at_import_no_more(monkeypatch):
    """The caps that spec, store and pinned froze at import now follow the environment at use."""
    from vllm_attncap.spec import CaptureSpec, resolve_spec

    monkeypatch.setenv("VLLM_ATTNCAP_MAX_BYTES", "100")
    with pytest.raises(ValueError, match="the cap is 100"):
        resolve_spec(CaptureSpec(), num_layers=2, num_heads=2, prompt_len=8, max_tokens=8)
    monkeypatch.setenv("VLLM_ATTNCAP_MAX_BYTES", str(10**9))
    resolve_spec(CaptureSpec(), num_layers=2, num_heads=2, prompt_len=8, max_tokens=8)
