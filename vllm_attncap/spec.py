"""The per-request capture spec: what a request asks to capture, validated.

A request asks for capture with ``SamplingParams(extra_args={"attncap": {...}})``.
This module owns the spec's fields, their defaults and their validation; it
imports neither vLLM nor torch, so the frontend, the worker and the server all
validate with the same code.

Fields (all optional):

==============  ==========================================  =========================
field           allowed values                              default
==============  ==========================================  =========================
``layers``      ``"all"`` or a list of ints (negatives       ``"all"``
                count from the last layer)
``heads``       ``"all"`` or a list of query-head ints       ``"all"``
                (negatives allowed)
``reduce``      ``"none"`` | ``"head_mean"`` |                ``"none"``
                ``"layer_head_mean"``
``mode``        ``"rows"`` | ``"stats"``                     ``"rows"``
``history_len`` int >= 1: history columns for ``stats``       the prompt length
``sink``        int >= 0: leading positions dropped before    ``0``
                renormalising (``stats`` only)
``salient``     list of history positions (``stats``)         ``[]``
``n_max``       int >= 1: ``stats`` only; a history longer    none (no elision)
                than this is elided before the statistics
                (the reward's long-history rule, method.md)
``window``      int >= 0: with ``n_max``, the most recent      ``512``
                positions always kept
``topk``        int in 1..1024: per generated token, the k    none (full rows)
                keys of highest probability (positions and
                probabilities) instead of full rows;
                ``reduce`` "none" or "head_mean", mode "rows"
``prompt_start`` int in 1..P, with ``topk``: rows also for      P (the reply only)
                the prompt tokens at positions
                ``prompt_start..P-1`` (multi-turn: the ones
                an earlier turn did not return)
``max_bytes``   int >= 1: cap on this request's buffer        engine default (256 MiB)
``key``         str: correlation key chosen by the caller     the request id
                (1-1024 printable characters, not only dots)
==============  ==========================================  =========================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from cagsr_reward.config import ELISION_WINDOW

from . import envs

__all__ = [
    "CaptureSpec",
    "SPEC_FIELDS",
    "REDUCE_MODES",
    "CAPTURE_MODES",
    "ResolvedSpec",
    "resolve_spec",
    "capture_shape",
    "MAX_TOPK",
    "TOPK_REDUCE_MODES",
]

REDUCE_MODES = ("none", "head_mean", "layer_head_mean")
CAPTURE_MODES = ("rows", "stats")
SPEC_FIELDS = (
    "layers", "heads", "reduce", "mode", "history_len", "sink", "salient", "n_max", "window", "max_bytes", "key",
    "topk", "prompt_start",
)
#: Largest ``topk`` a request may ask for.
MAX_TOPK = 1024
#: The reductions a top-k capture supports (top-k of each head, or of the head mean).
TOPK_REDUCE_MODES = ("none", "head_mean")
#: Longest capture key (keys are hashed into file names, so any printable text up to this length works).
MAX_KEY_CHARS = 1024


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_index_list(name: str, value: Any) -> str | tuple[int, ...]:
    if isinstance(value, str):
        if value.lower() == "all":
            return "all"
        raise ValueError(f"attncap spec field '{name}': expected \"all\" or a list of ints, got {value!r}")
    if _is_int(value):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"attncap spec field '{name}': expected \"all\" or a non-empty list of ints, got {value!r}"
        )
    for v in value:
        if not _is_int(v):
            raise ValueError(f"attncap spec field '{name}': entries must be ints, got {v!r}")
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class CaptureSpec:
    """What one request asks to capture (see the module docstring for fields).

    Construction validates everything that can be checked without the model;
    :func:`resolve_spec` then checks indices and sizes against the model and
    the request.

    Example:
        >>> CaptureSpec(layers=[-1], reduce="head_mean").to_dict()["reduce"]
        'head_mean'
        >>> CaptureSpec(reduce="max")
        Traceback (most recent call last):
        ...
        ValueError: attncap spec field 'reduce': expected one of ('none', 'head_mean', 'layer_head_mean'), got 'max'
    """

    layers: str | tuple[int, ...] = "all"
    heads: str | tuple[int, ...] = "all"
    reduce: str = "none"
    mode: str = "rows"
    history_len: int | None = None
    sink: int = 0
    salient: tuple[int, ...] = field(default_factory=tuple)
    n_max: int | None = None
    window: int | None = None
    max_bytes: int | None = None
    key: str | None = None
    topk: int | None = None
    prompt_start: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _check_index_list("layers", self.layers))
        object.__setattr__(self, "heads", _check_index_list("heads", self.heads))
        if self.reduce not in REDUCE_MODES:
            raise ValueError(f"attncap spec field 'reduce': expected one of {REDUCE_MODES}, got {self.reduce!r}")
        if self.mode not in CAPTURE_MODES:
            raise ValueError(f"attncap spec field 'mode': expected one of {CAPTURE_MODES}, got {self.mode!r}")
        if self.history_len is not None and (not _is_int(self.history_len) or self.history_len < 1):
            raise ValueError(f"attncap spec field 'history_len': expected an int >= 1, got {self.history_len!r}")
        if not _is_int(self.sink) or self.sink < 0:
            raise ValueError(f"attncap spec field 'sink': expected an int >= 0, got {self.sink!r}")
        sal = self.salient
        if _is_int(sal):
            sal = (sal,)
        if not isinstance(sal, (list, tuple)) or not all(_is_int(s) and s >= 0 for s in sal):
            raise ValueError(f"attncap spec field 'salient': expected a list of ints >= 0, got {self.salient!r}")
        object.__setattr__(self, "salient", tuple(sorted(set(int(s) for s in sal))))
        if self.n_max is not None:
            if not _is_int(self.n_max) or self.n_max < 1:
                raise ValueError(f"attncap spec field 'n_max': expected an int >= 1, got {self.n_max!r}")
            if self.mode != "stats":
                raise ValueError("attncap spec field 'n_max': long-history elision applies to mode='stats' only")
        if self.window is not None and (not _is_int(self.window) or self.window < 0):
            raise ValueError(f"attncap spec field 'window': expected an int >= 0, got {self.window!r}")
        if self.max_bytes is not None and (not _is_int(self.max_bytes) or self.max_bytes < 1):
            raise ValueError(f"attncap spec field 'max_bytes': expected an int >= 1, got {self.max_bytes!r}")
        if self.key is not None and (
            not isinstance(self.key, str) or not 1 <= len(self.key) <= MAX_KEY_CHARS or not self.key.isprintable()
            or not self.key.strip(".")
        ):
            raise ValueError(
                f"attncap spec field 'key': expected 1-{MAX_KEY_CHARS} printable characters, not only dots, "
                f"got {self.key!r}"
            )

        if self.topk is not None:
            if not _is_int(self.topk) or not 1 <= self.topk <= MAX_TOPK:
                raise ValueError(f"attncap spec field 'topk': expected an int in 1..{MAX_TOPK}, got {self.topk!r}")
            if self.reduce not in TOPK_REDUCE_MODES:
                raise ValueError(f"attncap spec field 'reduce': with topk, expected one of {TOPK_REDUCE_MODES}, "
                                 f"got {self.reduce!r}")
            if self.mode != "rows":
                raise ValueError(f"attncap spec field 'mode': topk selects keys of each row; expected 'rows' with "
                                 f"topk, got {self.mode!r}")
        if self.prompt_start is not None:
            if not _is_int(self.prompt_start) or self.prompt_start < 1:
                raise ValueError(f"attncap spec field 'prompt_start': expected an int >= 1 (a prompt position), got "
                                 f"{self.prompt_start!r}")
            if self.topk is None:
                raise ValueError("attncap spec field 'prompt_start': applies to topk captures only (set topk)")

    @property
    def elision_window(self) -> int:
        """The recent positions kept by long-history elision (``window``, default 512)."""
        return ELISION_WINDOW if self.window is None else self.window

    @classmethod
    def from_any(cls, value: "CaptureSpec | Mapping[str, Any] | None") -> "CaptureSpec":
        """Build a spec from a spec, a dict (as in ``extra_args["attncap"]``) or ``None`` (all defaults)."""
        if value is None:
            return cls()
        if isinstance(value, CaptureSpec):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"attncap spec: expected a dict or CaptureSpec, got {type(value).__name__}")
        unknown = sorted(set(value) - set(SPEC_FIELDS))
        if unknown:
            raise ValueError(f"attncap spec: unknown field(s) {unknown}; allowed fields are {list(SPEC_FIELDS)}")
        kw = dict(value)
        for name in ("layers", "heads", "salient"):
            if isinstance(kw.get(name), list):
                kw[name] = tuple(kw[name])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """A msgpack/JSON-friendly dict (what travels in ``extra_args``)."""
        d = asdict(self)
        for name in ("layers", "heads", "salient"):
            if isinstance(d[name], tuple):
                d[name] = list(d[name])
        return {k: v for k, v in d.items() if v is not None}


def _resolve_indices(name: str, sel: str | tuple[int, ...], n: int) -> tuple[int, ...]:
    if sel == "all":
        return tuple(range(n))
    out = []
    for v in sel:
        if not -n <= v < n:
            raise ValueError(f"attncap spec field '{name}': index {v} out of range for {n} {name} (allowed {-n}..{n - 1})")
        out.append(v % n)
    if len(set(out)) != len(out):
        raise ValueError(f"attncap spec field '{name}': duplicate indices in {list(sel)}")
    return tuple(out)


@dataclass(frozen=True)
class ResolvedSpec:
    """A spec checked against a model and a request: absolute indices, output shape.

    ``shape`` is the nominal buffer shape: rows mode ``(L, H, T_max, P + T_max - 1)``
    (``L``/``H`` are 1 when reduced); stats mode ``(2, L, H, T_max)`` holding
    per-row coverage then per-row history entropy.
    """

    spec: CaptureSpec
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    prompt_len: int
    max_tokens: int
    history_len: int
    shape: tuple[int, ...]
    prompt_start: int = 0

    @property
    def capture_mode(self) -> str:
        """The buffer's layout: ``"rows"``, ``"stats"`` or ``"topk"``."""
        return "topk" if self.spec.topk is not None else self.spec.mode

    @property
    def row_origin(self) -> int:
        """Position of the query of row 0: ``P - 1`` (the reply's first token), or ``prompt_start - 1`` for a top-k
        capture with prompt rows."""
        return (self.prompt_start or self.prompt_len) - 1

    @property
    def nbytes(self) -> int:
        n = 4
        for d in self.shape:
            n *= d
        return n

    @property
    def out_layers(self) -> int:
        return 1 if self.spec.reduce == "layer_head_mean" else len(self.layers)

    @property
    def out_heads(self) -> int:
        return 1 if self.spec.reduce in ("head_mean", "layer_head_mean") else len(self.heads)


def capture_shape(mode: str, out_layers: int, out_heads: int, prompt_len: int, max_tokens: int, *,
                  topk: int = 0, prompt_rows: int = 0) -> tuple[int, ...]:
    """Shape of a request's float32 buffer: rows ``(L, H, T_max, P + T_max - 1)``, stats ``(2, L, H, T_max)``
    (coverage then history entropy per row), top-k ``(2, L, H, prompt_rows + T_max, k)`` (probabilities, then key
    positions stored as float32, exact below 2**24). The one definition of the layout; the store's record uses it too.

    Example:
        >>> capture_shape("rows", 1, 1, 10, 5), capture_shape("stats", 30, 9, 10, 5)
        ((1, 1, 5, 14), (2, 30, 9, 5))
        >>> capture_shape("topk", 2, 1, 10, 5, topk=8, prompt_rows=3)
        (2, 2, 1, 8, 8)
    """
    if mode == "topk":
        return (2, out_layers, out_heads, prompt_rows + max_tokens, topk)
    if mode == "stats":
        return (2, out_layers, out_heads, max_tokens)
    return (out_layers, out_heads, max_tokens, prompt_len + max_tokens - 1)


def resolve_spec(
    spec: "CaptureSpec | Mapping[str, Any] | None",
    *,
    num_layers: int,
    num_heads: int,
    prompt_len: int,
    max_tokens: int,
    default_max_bytes: int | None = None,
) -> ResolvedSpec:
    """Check a spec against the model (layer/head counts) and the request.

    Raises:
        ValueError: naming the field, when an index is out of range,
            ``prompt_start`` is past the prompt, the history is longer than the prompt, a salient position lies outside
            the history, or the buffer would exceed ``max_bytes``.

    Example:
        >>> r = resolve_spec({"layers": [-1], "reduce": "head_mean"}, num_layers=4,
        ...                  num_heads=8, prompt_len=10, max_tokens=5)
        >>> r.layers, r.shape
        ((3,), (1, 1, 5, 14))
    """
    spec = CaptureSpec.from_any(spec)
    if prompt_len < 1:
        raise ValueError(f"attncap: the prompt must have at least one token, got prompt_len={prompt_len}")
    if max_tokens < 1:
        raise ValueError(f"attncap: max_tokens must be >= 1, got {max_tokens}")
    layers = _resolve_indices("layers", spec.layers, num_layers)
    heads = _resolve_indices("heads", spec.heads, num_heads)
    history_len = spec.history_len if spec.history_len is not None else prompt_len
    if history_len > prompt_len:
        raise ValueError(
            f"attncap spec field 'history_len': {history_len} exceeds the prompt length {prompt_len}"
        )
    if spec.sink >= history_len:
        raise ValueError(f"attncap spec field 'sink': {spec.sink} leaves no history column (history_len={history_len})")
    if spec.salient and spec.salient[-1] >= history_len:
        raise ValueError(
            f"attncap spec field 'salient': position {spec.salient[-1]} is outside the history (0..{history_len - 1})"
        )
    prompt_start = 0
    if spec.topk is not None:
        prompt_start = prompt_len if spec.prompt_start is None else spec.prompt_start
        if prompt_start > prompt_len:
            raise ValueError(
                f"attncap spec field 'prompt_start': {prompt_start} is past the prompt (allowed 1..{prompt_len}, "
                f"the prompt length meaning the reply only)"
            )
    out_l = 1 if spec.reduce == "layer_head_mean" else len(layers)
    out_h = 1 if spec.reduce in ("head_mean", "layer_head_mean") else len(heads)
    mode = "topk" if spec.topk is not None else spec.mode
    shape = capture_shape(mode, out_l, out_h, prompt_len, max_tokens, topk=spec.topk or 0,
                          prompt_rows=prompt_len - prompt_start if prompt_start else 0)
    resolved = ResolvedSpec(spec, layers, heads, prompt_len, max_tokens, history_len, shape, prompt_start)
    cap = spec.max_bytes if spec.max_bytes is not None else (default_max_bytes or envs.VLLM_ATTNCAP_MAX_BYTES)
    if resolved.nbytes > cap:
        raise ValueError(
            f"attncap spec field 'max_bytes': this capture needs {resolved.nbytes} bytes "
            f"(shape {shape}, float32) but the cap is {cap}; capture fewer layers/heads, a smaller topk, "
            f"use reduce='head_mean'/'layer_head_mean' or mode='stats', lower max_tokens, or raise max_bytes"
        )
    return resolved
