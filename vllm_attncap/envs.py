"""Every ``VLLM_ATTNCAP_*`` setting of vllm_attncap: name, type, default and meaning, in one table.

Settings are read lazily, at each access, through one accessor (as vLLM's own ``vllm/envs.py``):
``envs.VLLM_ATTNCAP_TTL_S`` (or ``envs.get("VLLM_ATTNCAP_TTL_S")``) parses the environment variable when it is read,
so nothing is frozen at import. No other module of vllm_attncap reads or writes these variables in ``os.environ``
(``tests/test_envs.py`` checks it); the store exports its namespace for the processes it starts with :func:`export`.
The table in ``docs/settings.md`` is checked against :data:`SETTINGS` by the same test.

This module imports only the standard library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Setting", "SETTINGS", "get", "is_set", "export", "unset", "docs_table", "PREFIX"]

PREFIX = "VLLM_ATTNCAP_"


@dataclass(frozen=True)
class Setting:
    """One environment variable.

    Attributes:
        name: the variable (``VLLM_ATTNCAP_...``).
        type: how its text is read: ``"int"``, ``"float"``, ``"bool"`` (``0`` is off, anything else on), ``"str"``
            or ``"path"`` (a string, ``~`` expanded where it is used).
        default: the value when the variable is unset or empty (None: no value).
        meaning: what it controls (the docs' table says the same).
    """

    name: str
    type: str
    default: Any
    meaning: str

    def parse(self, text: str) -> Any:
        try:
            return _PARSERS[self.type](text)
        except ValueError:
            raise ValueError(f"vllm_attncap: {self.name}={text!r} is not a valid {self.type}") from None


def _bool(text: str) -> bool:
    return text != "0"


_PARSERS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "bool": _bool, "str": str, "path": str}

_TABLE = [
    # the capture spec (spec.py)
    Setting("VLLM_ATTNCAP_MAX_BYTES", "int", 256 * 1024**2,
            "engine-wide cap on one request's capture buffer (bytes); a spec's max_bytes may ask for less, never more"),
    # the store (store/)
    Setting("VLLM_ATTNCAP_STORE", "path", None,
            "base directory of the capture store (default /dev/shm/vllm-attncap-<uid>, else the temp directory)"),
    Setting("VLLM_ATTNCAP_NAMESPACE", "path", None,
            "the engine's namespace directory; set by the process that creates it, inherited by its engine processes"),
    Setting("VLLM_ATTNCAP_NAMESPACE_TOKEN", "str", None,
            "join token of the namespace, exported with it: lets workers that are not the owner's descendants join"),
    Setting("VLLM_ATTNCAP_TTL_S", "float", 3600.0,
            "seconds after which a finished capture nobody fetched is removed (0: never)"),
    Setting("VLLM_ATTNCAP_MAX_PENDING_BYTES", "int", 2 * 1024**3,
            "cap on the bytes of captures held in the store; the server refuses new captures past it (HTTP 503) "
            "and the writer evicts the oldest finished ones"),
    # the server (serving/)
    Setting("VLLM_ATTNCAP_INLINE_MAX_BYTES", "int", 1024**2,
            "server: a capture whose arrays hold at most this many bytes rides in the response's per-choice attncap "
            "field (base64 .npy) and is deleted from the store; larger ones stay under their key for "
            "GET /v1/attncap/{key} (0: never inline, every capture stays under its key)"),
    # the bundled model (default_model.py)
    Setting("VLLM_ATTNCAP_CACHE", "path", None,
            "where the bundled SmolLM2 model is converted to and cached (default ~/.cache/vllm-attncap)"),
    # the CPU room (engine/cpu/)
    Setting("VLLM_ATTNCAP_CPU_KERNEL", "bool", True,
            "0: the CPU backend captures on the torch path even when the C++ kernel is built"),
    Setting("VLLM_ATTNCAP_CPU_SHADOW_LAYERS", "str", "all",
            "CPU backend: the layers that keep shadow keys ('all' or comma-separated layer indices); requests for "
            "other layers are refused"),
    # the CUDA room (engine/cuda/)
    Setting("VLLM_ATTNCAP_KERNELS", "bool", True,
            "0: the CUDA backend's eager paths use torch even when the kernels are built (read once per step)"),
    Setting("VLLM_ATTNCAP_GRAPH", "bool", True,
            "0: no capture inside full CUDA graphs; capturing steps run PIECEWISE (read at engine start)"),
    Setting("VLLM_ATTNCAP_GRAPH_ROWS", "bool", True,
            "0: full graphs capture statistics only; head-mean rows requests run their steps PIECEWISE"),
    Setting("VLLM_ATTNCAP_SPLITS", "int", 4, "key splits per row of the fused decode-capture kernel (1-64)"),
    Setting("VLLM_ATTNCAP_RING_SLOTS", "int", 4, "slots of the pinned result ring of in-graph capture"),
    Setting("VLLM_ATTNCAP_PINNED_BYTES", "int", 1024**3,
            "cap on pinned host memory for the CUDA eager paths' in-flight copies (bytes)"),
    Setting("VLLM_ATTNCAP_GRAPH_MAX_MIB", "float", 256.0,
            "cap (MiB) on the in-graph path's memory allocated after vLLM's profiling: static device buffers plus "
            "the pinned result ring; over it the head-mean rows pass, then the whole in-graph path, is off"),
    Setting("VLLM_ATTNCAP_PLAIN_GRAPHS", "bool", True,
            "0: one set of full decode graphs holding the capture kernels, instead of a plain set (replayed when "
            "no row captures) and a capturing set (Model Runner V2)"),
]

#: name -> :class:`Setting`, every ``VLLM_ATTNCAP_*`` variable vllm_attncap reads.
SETTINGS: dict[str, Setting] = {s.name: s for s in _TABLE}


def _setting(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise KeyError(f"vllm_attncap: unknown setting {name!r} (known: {', '.join(SETTINGS)})") from None


def get(name: str) -> Any:
    """The current value of setting ``name``: its variable parsed, or its default when unset or empty."""
    s = _setting(name)
    text = os.environ.get(name)
    if text is None or text == "":
        return s.default
    return s.parse(text)


def is_set(name: str) -> bool:
    """Whether the variable of setting ``name`` is set to a non-empty value."""
    _setting(name)
    return bool(os.environ.get(name))


def export(name: str, value: str) -> None:
    """Set the variable of setting ``name`` in this process (inherited by the processes it starts)."""
    _setting(name)
    os.environ[name] = value


def unset(name: str) -> None:
    """Remove the variable of setting ``name`` from this process's environment."""
    _setting(name)
    os.environ.pop(name, None)


def _show(value: Any, type_: str) -> str:
    if value is None:
        return "unset"
    if type_ == "bool":
        return "1" if value else "0"
    return str(value)


def docs_table() -> str:
    """The settings table of ``docs/settings.md`` (Markdown), made from :data:`SETTINGS`."""
    lines = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS.values():
        lines.append(f"| `{s.name}` | {s.type} | `{_show(s.default, s.type)}` | {s.meaning} |")
    return "\n".join(lines) + "\n"


def __getattr__(name: str) -> Any:
    if name in SETTINGS:
        return get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(SETTINGS))
