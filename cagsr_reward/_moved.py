"""Deprecation shims for modules that moved in 0.2 (kept for one release).

Names that stayed in the reward SDK resolve with a ``DeprecationWarning`` naming the new path. Names that moved to
``vllm_attncap`` (they drive a vLLM engine, and the SDK never imports it) raise an ``ImportError`` naming the new path:
the SDK cannot forward them without importing the capture package.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["moved_module_getattr"]


def moved_module_getattr(
    old: str, stayed: Mapping[str, str], left: Mapping[str, str]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the old module ``old``.

    Args:
        old: the old module's name.
        stayed: attribute -> new SDK module that now holds it (forwarded with a warning).
        left: attribute -> new ``vllm_attncap`` module that now holds it (an ``ImportError`` naming it).
    """

    def __getattr__(name: str) -> Any:
        if name in stayed:
            new = stayed[name]
            warnings.warn(f"{old}.{name} moved to {new}.{name}; the old path goes away in the next release",
                          DeprecationWarning, stacklevel=2)
            return getattr(importlib.import_module(new), name)
        if name in left:
            raise ImportError(
                f"{old}.{name} moved to {left[name]}.{name} (it drives a vLLM engine, and the cagsr_reward SDK never "
                f"imports the capture package): use `from {left[name]} import {name}`"
            )
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__
