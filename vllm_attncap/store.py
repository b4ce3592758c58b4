"""The capture data plane: one memory-mapped file per captured request.

vLLM runs the model in a worker process that may differ from the caller's
process (EngineCore + workers), and nothing beyond token ids and logprobs
travels back in ``RequestOutput``. Captured rows therefore go into a file in a
shared-memory directory (``/dev/shm`` by default, i.e. RAM), written in place by
the worker while the request runs and read, then deleted, by the caller:

* ``<name>.f32``  — float32 array of the nominal shape (rows mode
  ``(L, H, T_max, P + T_max - 1)``; stats mode ``(2, L, H, T_max)``); a sparse
  file, so untouched rows cost no memory;
* ``<name>.json`` — metadata (shape, layers, heads, prompt length, spec, status,
  error message).

``<name>`` is ``<key>__<internal request id>``. The worker writes every row of a
step before that step's output leaves the worker, so when the caller holds a
finished ``RequestOutput`` with T tokens, rows ``0..T-1`` are in the file.

Limits: each buffer is bounded by the spec's ``max_bytes``; the worker closes a
request's mapping when vLLM reports it finished or aborted, and deletes files
nobody collected once they exceed ``VLLM_ATTNCAP_MAX_PENDING_BYTES`` (default
2 GiB), oldest first.

This module imports only numpy and the standard library.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("vllm_attncap")

__all__ = [
    "store_dir",
    "CaptureWriter",
    "CaptureRecord",
    "read_capture",
    "discard_capture",
    "write_error",
    "MAX_PENDING_BYTES",
]

MAX_PENDING_BYTES = int(os.environ.get("VLLM_ATTNCAP_MAX_PENDING_BYTES", str(2 * 1024**3)))
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


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


def _write_json(path: Path, meta: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, path)


def write_error(key: str, req_id: str, message: str) -> None:
    """Record that a request's capture was refused (the request itself still runs)."""
    _write_json(store_dir() / f"{_name(key, req_id)}.json", {"key": key, "req_id": req_id, "status": "error", "error": message})


class CaptureWriter:
    """Worker side: the buffer of one captured request.

    ``array`` is a writable float32 memory map of ``meta["shape"]``.
    """

    _open_bytes = 0

    def __init__(self, key: str, req_id: str, shape: tuple[int, ...], meta: dict[str, Any]):
        self.key, self.req_id = key, req_id
        self.dir = store_dir()
        self.name = _name(key, req_id)
        self.data_path = self.dir / f"{self.name}.f32"
        self.meta_path = self.dir / f"{self.name}.json"
        self.meta = dict(meta, key=key, req_id=req_id, shape=list(shape), status="open", created=time.time())
        self.nbytes = int(np.prod(shape)) * 4
        _enforce_pending_cap(self.nbytes)
        # np.memmap(w+) creates a sparse file: pages are only backed once written.
        self.array = np.memmap(self.data_path, dtype=np.float32, mode="w+", shape=tuple(shape))
        _write_json(self.meta_path, self.meta)
        self.rows_written = 0

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
            self.meta.update(status=status, rows_written=self.rows_written, closed=time.time())
            try:
                _write_json(self.meta_path, self.meta)
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
        meta = p.with_suffix(".json")
        try:
            status = json.loads(meta.read_text()).get("status")
        except (FileNotFoundError, ValueError):
            status = None
        if status == "open":
            continue
        try:
            size = p.stat().st_blocks * 512
            p.unlink()
            meta.unlink(missing_ok=True)
        except FileNotFoundError:
            continue
        logger.warning("vllm_attncap: deleted uncollected capture %s (pending captures exceeded %d bytes)", p.name, MAX_PENDING_BYTES)
        total -= size
        if total + incoming <= MAX_PENDING_BYTES:
            return


@dataclass
class CaptureRecord:
    """Caller side: what a request's capture file held."""

    key: str
    req_id: str
    meta: dict[str, Any]
    array: np.ndarray | None  # trimmed to the generated length, owned (not a memmap)

    @property
    def error(self) -> str | None:
        return self.meta.get("error")


def _child_index(req_id: str) -> int:
    m = re.match(r"^(\d+)_", req_id)
    return int(m.group(1)) if m else 0


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
    prefix = f"{_SAFE.sub('_', key)}__"
    deadline = time.monotonic() + wait_s
    metas: list[Path] = []
    while True:
        metas = sorted(d.glob(f"{prefix}*.json"))
        if len(metas) >= len(counts) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if not metas:
        raise LookupError(f"vllm_attncap: no capture found for key {key!r} in {d} (was the request sent with an attncap spec to an engine started with attention_backend='attncap'?)")
    metas.sort(key=lambda p: _child_index(json.loads(p.read_text()).get("req_id", "")))
    out = []
    for i, mp in enumerate(metas):
        meta = json.loads(mp.read_text())
        arr = None
        dp = mp.with_suffix(".f32")
        if meta.get("status") != "error" and dp.exists():
            shape = tuple(meta["shape"])
            mm = np.memmap(dp, dtype=np.float32, mode="r", shape=shape)
            t = counts[i] if i < len(counts) else counts[-1]
            if meta.get("mode") == "stats":
                arr = np.array(mm[..., :t])
            else:
                p = meta["prompt_len"]
                arr = np.array(mm[:, :, :t, : p + t - 1])
            del mm
        if delete:
            dp.unlink(missing_ok=True)
            mp.unlink(missing_ok=True)
        out.append(CaptureRecord(meta.get("key", key), meta.get("req_id", ""), meta, arr))
    return out


def discard_capture(key: str) -> int:
    """Delete every file stored under ``key``; returns how many were removed."""
    n = 0
    for p in store_dir().glob(f"{_SAFE.sub('_', key)}__*"):
        p.unlink(missing_ok=True)
        n += 1
    return n
