"""The capture data plane: one memory-mapped file per captured request, with a typed record.

vLLM runs the model in a worker process that may differ from the caller's
process (EngineCore + workers), and nothing beyond token ids and logprobs
travels back in ``RequestOutput``. Captured rows therefore go into a file in a
shared-memory directory (``/dev/shm`` by default, i.e. RAM), written in place by
the worker while the request runs and read, then deleted, by the caller:

* ``<name>.f32``  — float32 array of the nominal shape (:meth:`CaptureMeta.shape`:
  rows mode ``(L, H, T_max, P + T_max - 1)``; stats mode ``(2, L, H, T_max)``,
  coverage then entropy); a sparse file, so untouched rows cost no memory;
* ``<name>.json`` — the :class:`CaptureMeta` record (spec, layout, status, error).

``<name>`` is ``<key>__<internal request id>``. The worker writes every row of a
step before that step's output leaves the worker, so when the caller holds a
finished ``RequestOutput`` with T tokens, rows ``0..T-1`` are in the file.

Who uses what: the worker (``engine.tracker``) creates a :class:`CaptureWriter`
per request and writes through :meth:`CaptureWriter.write_rows` /
:meth:`CaptureWriter.write_stats`; callers (``api``, ``serving``) read with
:func:`read_capture`, list with :func:`list_captures` and delete with
:func:`discard_capture`. Nobody else opens the files or indexes the layout.

Limits: each buffer is bounded by the spec's ``max_bytes``; the worker closes a
request's mapping when vLLM reports it finished or aborted, and deletes files
nobody collected once they exceed ``VLLM_ATTNCAP_MAX_PENDING_BYTES`` (default
2 GiB), oldest first.

This module imports only numpy, the standard library and :mod:`vllm_attncap.spec`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .spec import capture_shape

logger = logging.getLogger("vllm_attncap")

__all__ = [
    "STATUS_OPEN",
    "STATUS_ERROR",
    "STATS_COVERAGE",
    "STATS_ENTROPY",
    "CaptureMeta",
    "CaptureWriter",
    "CaptureRecord",
    "store_dir",
    "read_capture",
    "list_captures",
    "key_exists",
    "discard_capture",
    "write_error",
    "MAX_PENDING_BYTES",
]

MAX_PENDING_BYTES = int(os.environ.get("VLLM_ATTNCAP_MAX_PENDING_BYTES", str(2 * 1024**3)))
STATUS_OPEN = "open"
STATUS_ERROR = "error"
#: Stats-mode layout ``(2, L, H, T)``: index of the per-row coverage and history entropy.
STATS_COVERAGE = 0
STATS_ENTROPY = 1
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class CaptureMeta:
    """The record of one request's capture (the ``.json`` beside the data file).

    Attributes:
        key: the caller's correlation key; req_id: vLLM's internal request id.
        status: ``"open"`` while the worker writes, then ``"finished"``, ``"abandoned"`` (engine gone) or
            ``"error"`` (capture refused; ``error`` says why, there is no data file).
        mode, reduce, layers, heads, prompt_len, max_tokens, history_len, sink, salient, spec: the resolved spec.
        rows_written: rows ``0..rows_written-1`` hold data (set when the writer closes).
        part: set on the part of one rank of a multi-rank engine (:mod:`vllm_attncap.parts`), else None.
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
    part: dict[str, Any] | None = None

    # -- layout -------------------------------------------------------------------------------------------------
    @property
    def out_layers(self) -> int:
        return 1 if self.reduce == "layer_head_mean" else len(self.layers)

    @property
    def out_heads(self) -> int:
        return 1 if self.reduce in ("head_mean", "layer_head_mean") else len(self.heads)

    @property
    def shape(self) -> tuple[int, ...]:
        """The data file's shape: rows ``(L, H, T_max, P+T_max-1)``, stats ``(2, L, H, T_max)``; () for errors."""
        if self.status == STATUS_ERROR:
            return ()
        return capture_shape(self.mode, self.out_layers, self.out_heads, self.prompt_len, self.max_tokens)

    @property
    def nbytes(self) -> int:
        """Nominal bytes of the data file (float32)."""
        return 4 * math.prod(self.shape) if self.shape else 0

    def trim(self, array: np.ndarray, num_tokens: int) -> np.ndarray:
        """An owned copy of ``array`` (the file's) cut to ``num_tokens`` generated tokens."""
        t = max(0, min(int(num_tokens), self.max_tokens))
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


def store_dir() -> Path:
    """Directory holding capture files (``$VLLM_ATTNCAP_DIR`` or ``/dev/shm/vllm-attncap-<uid>``)."""
    env = os.environ.get("VLLM_ATTNCAP_DIR")
    if env:
        d = Path(env)
    else:
        base = Path("/dev/shm") if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
        d = base / f"vllm-attncap-{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _name(key: str, req_id: str) -> str:
    return f"{_SAFE.sub('_', key)}__{_SAFE.sub('_', req_id)}"


def _prefix(key: str) -> str:
    return f"{_SAFE.sub('_', key)}__"


def _write_meta(path: Path, meta: CaptureMeta) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(meta.to_json())
    os.replace(tmp, path)


def _read_meta(path: Path) -> CaptureMeta | None:
    try:
        return CaptureMeta.from_json(path.read_text())
    except (OSError, ValueError, TypeError):  # deleted or being replaced meanwhile
        return None


def write_error(key: str, req_id: str, message: str) -> None:
    """Record that a request's capture was refused (the request itself still runs)."""
    _write_meta(store_dir() / f"{_name(key, req_id)}.json", CaptureMeta(key, req_id, status=STATUS_ERROR, error=message,
                                                                       created=time.time()))


class CaptureWriter:
    """Worker side: the buffer of one captured request.

    ``array`` is a writable float32 memory map of ``meta.shape`` (None once closed). Backends write through
    :meth:`write_rows` and :meth:`write_stats`, which own the layout.
    """

    def __init__(self, meta: CaptureMeta):
        self.meta = meta
        self.key, self.req_id = meta.key, meta.req_id
        self.dir = store_dir()
        self.name = _name(meta.key, meta.req_id)
        self.data_path = self.dir / f"{self.name}.f32"
        self.meta_path = self.dir / f"{self.name}.json"
        meta.status, meta.created = STATUS_OPEN, time.time()
        self.nbytes = meta.nbytes
        _enforce_pending_cap(self.nbytes)
        # np.memmap(w+) creates a sparse file: pages are only backed once written.
        self.array: np.memmap | None = np.memmap(self.data_path, dtype=np.float32, mode="w+", shape=meta.shape)
        _write_meta(self.meta_path, meta)
        self.rows_written = 0

    # -- layout-aware writes ------------------------------------------------------------------------------------
    def write_rows(self, slot: int, r0: int, r1: int, ctx_len: int, rows: np.ndarray, *, accumulate: bool = False) -> None:
        """Rows mode: ``rows`` ``(H_out, r1-r0, ctx_len)`` into layer slot ``slot``, generated rows ``r0..r1-1``.

        ``accumulate`` adds instead of assigning (the layer mean's later layers).
        """
        if self.array is None:
            return
        view = self.array[slot, :, r0:r1, :ctx_len]
        if accumulate:
            view += rows
        else:
            view[...] = rows

    def write_stats(self, slot: int, r0: int, r1: int, coverage: np.ndarray, entropy: np.ndarray) -> None:
        """Stats mode: per-row ``coverage`` / ``entropy`` ``(H_out, r1-r0)`` into layer slot ``slot``."""
        if self.array is None:
            return
        self.array[STATS_COVERAGE, slot, :, r0:r1] = coverage
        self.array[STATS_ENTROPY, slot, :, r0:r1] = entropy

    def note_rows(self, upto: int) -> None:
        self.rows_written = max(self.rows_written, upto)

    def close(self, status: str = "finished") -> None:
        """Flush and unmap; keep the files for the reader unless it already took them."""
        if self.array is None:
            return
        arr, self.array = self.array, None
        arr.flush()
        del arr
        if self.meta_path.exists():
            self.meta.status, self.meta.rows_written, self.meta.closed = status, self.rows_written, time.time()
            try:
                _write_meta(self.meta_path, self.meta)
            except FileNotFoundError:  # the reader collected it meanwhile
                pass


def _enforce_pending_cap(incoming: int) -> None:
    """Delete the oldest uncollected captures when the directory exceeds the cap."""
    d = store_dir()
    try:
        entries = [(p.stat().st_mtime, p) for p in d.glob("*.f32")]
    except FileNotFoundError:
        return
    total = 0
    for _, p in entries:
        try:
            total += p.stat().st_blocks * 512  # bytes actually backed (sparse files)
        except FileNotFoundError:
            pass
    if total + incoming <= MAX_PENDING_BYTES:
        return
    for _, p in sorted(entries):
        meta = _read_meta(p.with_suffix(".json"))
        if meta is not None and meta.status == STATUS_OPEN:
            continue
        try:
            size = p.stat().st_blocks * 512
            p.unlink()
            p.with_suffix(".json").unlink(missing_ok=True)
        except FileNotFoundError:
            continue
        logger.warning("vllm_attncap: deleted uncollected capture %s (pending captures exceeded %d bytes)", p.name, MAX_PENDING_BYTES)
        total -= size
        if total + incoming <= MAX_PENDING_BYTES:
            return


@dataclass
class CaptureRecord:
    """Caller side: what a request's capture file held."""

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
        return int(self.array.shape[-1] if self.meta.mode == "stats" else self.array.shape[2])

    @property
    def coverage(self) -> np.ndarray:
        """Stats mode: ``(L, H, T)`` per-row coverage."""
        return self.array[STATS_COVERAGE]

    @property
    def entropy(self) -> np.ndarray:
        """Stats mode: ``(L, H, T)`` per-row history entropy."""
        return self.array[STATS_ENTROPY]


def _child_index(req_id: str) -> int:
    m = re.match(r"^(\d+)_", req_id)
    return int(m.group(1)) if m else 0


def _meta_paths(key: str | None) -> list[Path]:
    pattern = f"{_prefix(key)}*.json" if key is not None else "*.json"
    return sorted(store_dir().glob(pattern))


def list_captures(key: str | None = None) -> list[CaptureMeta]:
    """The records stored under ``key`` (every record when ``None``), completions of ``n > 1`` in order."""
    metas = [m for m in (_read_meta(p) for p in _meta_paths(key)) if m is not None]
    return sorted(metas, key=lambda m: _child_index(m.req_id))


def key_exists(key: str) -> bool:
    """Whether anything is stored under ``key``."""
    return bool(_meta_paths(key))


def read_capture(key: str, num_tokens: list[int] | int, *, wait_s: float = 5.0, delete: bool = True) -> list[CaptureRecord]:
    """Read (and by default delete) the capture(s) stored under ``key``.

    Args:
        key: the correlation key of the request (``spec.key``).
        num_tokens: generated tokens per completion (one int per completion for
            ``n > 1``); the arrays are trimmed to these lengths.
        wait_s: how long to wait for the worker's files to appear.
        delete: remove the files after reading (frees the memory).

    Returns:
        One record per completion, ordered like ``RequestOutput.outputs``.
    """
    d = store_dir()
    counts = [num_tokens] if isinstance(num_tokens, int) else list(num_tokens)
    deadline = time.monotonic() + wait_s
    while True:
        paths = _meta_paths(key)
        if len(paths) >= len(counts) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if not paths:
        raise LookupError(f"vllm_attncap: no capture found for key {key!r} in {d} (was the request sent with an attncap spec to an engine started with attention_backend='attncap'?)")
    metas = [(p, m) for p, m in ((p, _read_meta(p)) for p in paths) if m is not None]
    metas.sort(key=lambda pm: _child_index(pm[1].req_id))
    out = []
    for i, (mp, meta) in enumerate(metas):
        arr = None
        dp = mp.with_suffix(".f32")
        if meta.status != STATUS_ERROR and dp.exists():
            mm = np.memmap(dp, dtype=np.float32, mode="r", shape=meta.shape)
            arr = meta.trim(mm, counts[i] if i < len(counts) else counts[-1])
            del mm
        if delete:
            dp.unlink(missing_ok=True)
            mp.unlink(missing_ok=True)
        out.append(CaptureRecord(meta, arr))
    return out


def discard_capture(key: str) -> int:
    """Delete every file stored under ``key``; returns how many were removed."""
    n = 0
    for p in store_dir().glob(f"{_prefix(key)}*"):
        p.unlink(missing_ok=True)
        n += 1
    return n
