"""vllm_attncap: per-request attention capture for vLLM.

Importing this package is cheap and never imports vLLM or torch; vLLM calls
:func:`register` through the ``vllm.general_plugins`` entry point, and the
helpers below import vLLM lazily.

Layers (docs/architecture.md): ``engine`` is the seam inside vLLM (registration,
runner hooks, plan, tracker, the torch capture path, and one room per platform:
``engine.cpu``, ``engine.cuda``); ``spec``, ``store`` and ``envs`` (the settings) are
what the seam and the callers share; ``api`` / ``dialogue`` / ``viz`` / ``serving`` /
``cli`` are the user surface; ``rl`` drives a capturing engine for training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .spec import CaptureSpec

__version__ = "0.2.0"

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
    """vLLM general-plugin entry point, run in every vLLM process.

    Registers the ``attncap`` attention backend (:func:`vllm_attncap.engine.plugin.register`) and, in a
    ``vllm serve`` API-server process only, the server's spec validation and capture routes
    (:func:`vllm_attncap.serving.install.install_frontend_validation`; a no-op elsewhere).
    """
    from .engine.plugin import register as register_backend
    from .serving.install import install_frontend_validation

    register_backend()
    _open_store()
    install_frontend_validation()


def _open_store() -> None:
    """Create (frontend) or attach to (engine processes) this engine's private capture namespace, before vLLM
    spawns its engine processes, which inherit its path (:mod:`vllm_attncap.store`)."""
    import logging

    from .store import current_store

    try:
        current_store()
    except OSError as e:  # an unsafe store refuses captures, not the engine
        logging.getLogger("vllm_attncap").warning("vllm_attncap: capture store unavailable: %s", e)


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
