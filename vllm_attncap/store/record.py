"""The record format: one file per captured request (layout, :class:`CaptureMeta`, :class:`CaptureRecord`).

A record file starts with a 48-byte prefix (magic, :data:`FORMAT_VERSION`, JSON length, data offset, then the
mutable status, rows written and close time at fixed offsets), the :class:`CaptureMeta` JSON, and, page-aligned,
the float32 array of :attr:`CaptureMeta.shape` (see :mod:`vllm_attncap.store.store`).

This module imports only numpy, the standard library and :mod:`vllm_attncap.spec`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..spec import capture_shape

#: Version of the record layout (the prefix and the JSON fields); a reader ignores records of another version.
FORMAT_VERSION = 2

STATUS_OPEN = "open"
STATUS_FINISHED = "finished"
STATUS_ABANDONED = "abandoned"
STATUS_ERROR = "error"
_STATUS_CODES = {STATUS_OPEN: 0, STATUS_FINISHED: 1, STATUS_ABANDONED: 2, STATUS_ERROR: 3}
_STATUS_NAMES = {v: k for k, v in _STATUS_CODES.items()}
#: Stats-mode layout ``(2, L, H, T)``: index of the per-row coverage and history entropy.
STATS_COVERAGE = 0
STATS_ENTROPY = 1

_MAGIC = b"ATTNCAP\0"
# magic, version, json_len, data_offset, status, 7 pad bytes, rows_written, closed
_PREFIX = struct.Struct("<8sIIQB7xQd")
_STATUS_OFFSET = 24
_TAIL = struct.Struct("<Qd")  # rows_written, closed at offset 32
_TAIL_OFFSET = 32
_PAGE = 4096
_SUFFIX = ".cap"


def _hash(text: str, person: bytes) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, person=person).hexdigest()


def key_hash(key: str) -> str:
    """The fixed-length name part of a key (32 hex digits)."""
    return _hash(key, b"attncap-key")


def _record_name(key: str, req_id: str) -> str:
    return f"{key_hash(key)}-{_hash(req_id, b'attncap-req')}{_SUFFIX}"


@dataclass
class CaptureMeta:
    """The record of one request's capture.

    Attributes:
        key: the caller's correlation key; req_id: vLLM's internal request id.
        status: ``"open"`` while the worker writes, then ``"finished"``, ``"abandoned"`` (engine gone) or
            ``"error"`` (capture refused; ``error`` says why, there is no data).
        mode, reduce, layers, heads, prompt_len, max_tokens, history_len, sink, salient, spec: the resolved spec.
        rows_written: rows ``0..rows_written-1`` hold data (set when the writer closes).
        created, closed: wall-clock times (seconds since the epoch).
        part: set on the part of one rank of a multi-rank engine (:mod:`vllm_attncap.parts`), else None.
        topk, prompt_start: mode ``"topk"``: keys per row, and the position of the first row's token (rows
            ``0..P-prompt_start-1`` are prompt tokens, then the reply's).
    """

    key: str
    req_id: str
    status: str = STATUS_OPEN
    error: str | None = None
    mode: str = "rows"
    reduce: str = "none"
    layers: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    prompt_len: int = 0
    max_tokens: int = 0
    history_len: int = 0
    sink: int = 0
    salient: list[int] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    rows_written: int = 0
    created: float = 0.0
    closed: float | None = None
    format_version: int = FORMAT_VERSION
    part: dict[str, Any] | None = None
    topk: int = 0
    prompt_start: int = 0

    # -- layout -------------------------------------------------------------------------------------------------
    @property
    def out_layers(self) -> int:
        return 1 if self.reduce == "layer_head_mean" else len(self.layers)

    @property
    def out_heads(self) -> int:
        return 1 if self.reduce in ("head_mean", "layer_head_mean") else len(self.heads)

    @property
    def prompt_rows(self) -> int:
        """Top-k mode: rows of prompt tokens before the reply's (``P - prompt_start``)."""
        return self.prompt_len - self.prompt_start if self.mode == "topk" and self.prompt_start else 0

    @property
    def shape(self) -> tuple[int, ...]:
        """The data's shape: rows ``(L, H, T_max, P+T_max-1)``, stats ``(2, L, H, T_max)``, top-k
        ``(2, L, H, P-prompt_start+T_max, k)`` (probabilities, then positions as float32); () for errors."""
        if self.status == STATUS_ERROR:
            return ()
        return capture_shape(self.mode, self.out_layers, self.out_heads, self.prompt_len, self.max_tokens,
                             topk=self.topk, prompt_rows=self.prompt_rows)

    @property
    def nbytes(self) -> int:
        """Nominal bytes of the data (float32)."""
        return 4 * math.prod(self.shape) if self.shape else 0

    @property
    def order(self) -> tuple[int, int, str]:
        """Sort key of the records under one key: (prompt index, completion index, request id).

        vLLM's internal ids are ``[<completion>_]<external id>-<random>``; a completions request's external id
        ends in ``-<prompt index>``.
        """
        rid = self.req_id
        m = re.match(r"^(\d+)_(.*)$", rid)
        child, rest = (int(m.group(1)), m.group(2)) if m else (0, rid)
        p = re.search(r"-(\d+)-[^-]+$", rest)
        return (int(p.group(1)) if p else 0, child, rid)

    def trim(self, array: np.ndarray, num_tokens: int) -> np.ndarray:
        """An owned copy of ``array`` (the file's) cut to ``num_tokens`` generated tokens."""
        t = max(0, min(int(num_tokens), self.max_tokens))
        if self.mode == "topk":
            return np.array(array[:, :, :, : self.prompt_rows + t])
        if self.mode == "stats":
            return np.array(array[..., :t])
        return np.array(array[:, :, :t, : self.prompt_len + t - 1])

    # -- (de)serialisation --------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CaptureMeta":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class CaptureRecord:
    """Caller side: what a request's capture held."""

    meta: CaptureMeta
    array: np.ndarray | None  # trimmed to the generated length, owned (not a memmap); None for errors

    @property
    def key(self) -> str:
        return self.meta.key

    @property
    def req_id(self) -> str:
        return self.meta.req_id

    @property
    def error(self) -> str | None:
        return self.meta.error

    @property
    def num_tokens(self) -> int:
        """Generated tokens in ``array``."""
        if self.array is None:
            return 0
        if self.meta.mode == "topk":
            return int(self.array.shape[3]) - self.meta.prompt_rows
        return int(self.array.shape[-1] if self.meta.mode == "stats" else self.array.shape[2])

    @property
    def topk_positions(self) -> np.ndarray:
        """Top-k mode: ``(L, H, R, k)`` int32 key positions (-1 pads rows with fewer than k keys)."""
        return self.array[1].astype(np.int32)

    @property
    def topk_probs(self) -> np.ndarray:
        """Top-k mode: ``(L, H, R, k)`` float32 probabilities of those keys (0 for padding)."""
        return np.ascontiguousarray(self.array[0])

    @property
    def coverage(self) -> np.ndarray:
        """Stats mode: ``(L, H, T)`` per-row coverage."""
        return self.array[STATS_COVERAGE]

    @property
    def entropy(self) -> np.ndarray:
        """Stats mode: ``(L, H, T)`` per-row history entropy."""
        return self.array[STATS_ENTROPY]
