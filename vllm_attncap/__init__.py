"""vllm_attncap: per-request attention capture for vLLM.

Importing this package is cheap and never imports vLLM or torch; vLLM calls
:func:`register` through the ``vllm.general_plugins`` entry point, and the
helpers below import vLLM lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .spec import CaptureSpec

__version__ = "0.1.0"

__all__ = [
    "register",
    "CaptureSpec",
    "CapturedOutput",
    "generate_with_attentions",
    "collect",
    "chat_with_attentions",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from .api import CapturedOutput, collect, generate_with_attentions
    from .dialogue import chat_with_attentions


def register() -> None:
    """vLLM general-plugin entry point: registers the ``attncap`` attention backend."""
    from .plugin import register as _register

    _register()


_LAZY = {
    "CapturedOutput": "api",
    "generate_with_attentions": "api",
    "collect": "api",
    "chat_with_attentions": "dialogue",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'vllm_attncap' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{mod}", __name__), name)
