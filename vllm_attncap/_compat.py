"""Deprecated module paths of 0.1, kept for one release.

0.2 moved the engine seam under :mod:`vllm_attncap.engine` and the serving surface to :mod:`vllm_attncap.serving`.
Importing an old path (``vllm_attncap.compute.reference``, ``vllm_attncap.server``, ...) still works: it warns with a
``DeprecationWarning`` naming the new path and returns the new module itself (one module object, not a copy).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["MOVED", "install"]

#: old module path -> new module path (submodules follow their package).
MOVED = {
    "vllm_attncap.plugin": "vllm_attncap.engine.plugin",
    "vllm_attncap.runner_hooks": "vllm_attncap.engine.runner_hooks",
    "vllm_attncap.plan": "vllm_attncap.engine.plan",
    "vllm_attncap.tracker": "vllm_attncap.engine.tracker",
    "vllm_attncap.capture": "vllm_attncap.engine.capture",
    "vllm_attncap.backends": "vllm_attncap.engine.backends",
    "vllm_attncap.compute": "vllm_attncap.engine.compute",
    "vllm_attncap.server": "vllm_attncap.serving",
}


def _new_name(fullname: str) -> str | None:
    for old, new in MOVED.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old):]
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:  # the new module is already executed
        pass


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = _new_name(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
