"""Every test that starts a vLLM engine carries the ``engine`` marker (wired into pytest by tests/conftest.py).

The fast tier (``make test-fast``: ``-m "not engine and not slow"``) relies on that rule, so it is enforced, not
hoped for:

* tests that use one of the engine fixtures (``ENGINE_FIXTURES``) are marked ``engine`` at collection; the others
  that start an engine carry the marker themselves (``pytestmark`` or a decorator);
* while a test without the marker is set up or runs, starting an engine in this process (vLLM's ``LLMEngine`` or
  ``AsyncLLM``, which every ``LLM(...)``, TRL colocated engine and in-process server goes through) or a subprocess
  that starts one (``vllm serve``, ``python -m vllm.entrypoints...``, a Python script or ``-c`` program that calls
  ``LLM(``) fails that test, naming the marker. (``attncap demo|capture`` in a subprocess is not recognised by its
  command line, which also serves the tests of its usage errors; its engine tests use the ``tiny`` fixture or carry
  the marker themselves.)
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import subprocess
import sys
from pathlib import Path

import pytest

# fixtures that start an engine (in this process, in a subprocess or behind a server): a test using one is marked
ENGINE_FIXTURES = frozenset({
    "make_llm", "llm", "stock_llm", "server", "scale_out_server", "tiny", "eager_engine", "tiny_gpu_model",
})

forbidden: str | None = None  # node id of the running test when it may not start an engine


def _refuse(what: str) -> None:
    if forbidden is not None:
        pytest.fail(f"{forbidden} starts a vLLM engine ({what}) but does not carry the `engine` marker: add "
                    "@pytest.mark.engine (the fast tier, `-m 'not engine and not slow'`, must never start one)",
                    pytrace=False)


# --- in this process: vLLM's engine classes, guarded when their modules are imported ----------------------------

_ENGINE_CLASSES = {"vllm.v1.engine.llm_engine": "LLMEngine", "vllm.v1.engine.async_llm": "AsyncLLM"}


def _guard_class(module) -> None:
    cls = getattr(module, _ENGINE_CLASSES[module.__name__], None)
    if cls is None or getattr(cls.__init__, "__engine_guard__", False):
        return
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        _refuse(f"{cls.__module__}.{cls.__name__}")
        original(self, *args, **kwargs)

    __init__.__engine_guard__ = True
    cls.__init__ = __init__


class _GuardOnImport(importlib.abc.MetaPathFinder):
    """Wraps the loader of vLLM's engine modules so that their engine class is guarded as soon as it exists."""

    def find_spec(self, name, path, target=None):
        if name not in _ENGINE_CLASSES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _guard_class(module)

        spec.loader.exec_module = exec_module
        return spec


# --- in a subprocess: the command lines that start an engine --------------------------------------------------

def _engine_command(args) -> str | None:
    """What in this command line starts a vLLM engine, or None."""
    if isinstance(args, (str, bytes, Path)):
        args = [args]
    args = [str(a) for a in args]
    for i, arg in enumerate(args):
        nxt = args[i + 1] if i + 1 < len(args) else ""
        name = Path(arg).name
        if name == "vllm" and nxt == "serve":
            return "vllm serve"
        if arg.startswith("vllm.entrypoints"):
            return arg
        if arg == "-c" and "LLM(" in nxt:
            return "python -c ... LLM("
        if arg.endswith(".py") and i > 0 and Path(arg).is_file():
            try:
                if "LLM(" in Path(arg).read_text():
                    return name
            except OSError:
                pass
    return None


_popen_init = subprocess.Popen.__init__


def _guarded_popen_init(self, args, *rest, **kwargs):
    if forbidden is not None:
        what = _engine_command(args)
        if what is not None:
            _refuse(what)
    _popen_init(self, args, *rest, **kwargs)


def install() -> None:
    """Guard the engine classes (now, or when their modules are imported) and subprocess.Popen."""
    for name in _ENGINE_CLASSES:
        if name in sys.modules:
            _guard_class(sys.modules[name])
    if not any(isinstance(f, _GuardOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _GuardOnImport())
    subprocess.Popen.__init__ = _guarded_popen_init


def mark(items) -> None:
    """Add the ``engine`` marker to the tests that use an engine fixture. (Not by directory: tests/ mirrors the
    packages, and tests/engine/ also holds the kernel and reference tests that start no engine.)"""
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)


def set_test(item) -> None:
    """``item`` is about to be set up or run: it may start an engine only with the marker (None: between tests)."""
    global forbidden
    forbidden = None if item is None or item.get_closest_marker("engine") else item.nodeid
