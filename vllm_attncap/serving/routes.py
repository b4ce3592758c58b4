"""The retrieval routes: ``GET /v1/attncap/{key}`` (the capture as JSON, deleted once read) and ``DELETE``.

The key is the spec's ``key`` when the request set one, else the server's request id: ``<response id>-<prompt
index>`` for ``/v1/completions`` (the response id alone also works for a single prompt) and ``<response id>`` for
``/v1/chat/completions``. Keys are matched exactly; a key with ``/`` (from ``X-Request-Id``) is addressed as is
(other reserved URL characters percent-encoded). Each capture is delivered once: of concurrent GETs (or a GET and
a DELETE) one gets it, the others a 404. Captures are read only through :mod:`vllm_attncap.store`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from http import HTTPStatus
from typing import Any

import numpy as np

from .. import envs
from .. import store as _store
from ..store import (STATUS_ERROR, STATUS_OPEN, CaptureClaimed, CaptureRecord, current_store, key_exists,
                     list_captures, read_capture)  # list and read: a TP/PP engine's per-rank parts combined
from .admission import MAX_DERIVED_KEY_CHARS, RESERVED_KEY_PREFIXES, pending_capture_bytes, release, reservations

__all__ = ["ROUTE", "STATUS_ROUTE", "build_router", "capture_payload", "start_expiry_timer", "status_payload"]

logger = logging.getLogger("vllm_attncap")

ROUTE = "/v1/attncap/{key:path}"
#: ``GET`` it for the store's and admission's state (records, bytes in flight, reservations).
STATUS_ROUTE = "/v1/attncap"
#: How many ``<response id>-<i>`` keys a bare response id is resolved against.
MAX_PROMPTS_RESOLVED = 1024


def capture_payload(record: CaptureRecord, *, encoding: str = "base64") -> dict[str, Any]:
    """JSON body of one capture record (see docs/server.md for the fields)."""
    meta = record.meta
    body: dict[str, Any] = {
        "object": "attncap.capture",
        "key": meta.key,
        "engine_request_id": meta.req_id,
        "prompt_index": meta.order[0],
        "mode": meta.mode,
        "reduce": meta.reduce,
        "layers": meta.layers,
        "heads": meta.heads,
        "prompt_len": meta.prompt_len,
        "spec": meta.spec,
        "num_tokens": record.num_tokens,
    }
    arr = record.array
    if meta.mode == "stats":
        body["history_len"] = meta.history_len
        body["shape"] = list(record.coverage.shape)
        body["coverage"] = record.coverage.tolist()
        body["entropy"] = record.entropy.tolist()
        return body
    body["shape"] = list(arr.shape)
    body["dtype"] = "float32"
    body["encoding"] = encoding
    if encoding == "list":
        body["data"] = arr.tolist()
    else:
        body["data"] = base64.b64encode(np.ascontiguousarray(arr, dtype="<f4").tobytes()).decode("ascii")
    return body


def _resolve_key(key: str) -> tuple[str | None, list[str]]:
    """The stored key for ``key``: itself, or ``key-<i>`` when ``key`` is a server response id (it starts with
    one of :data:`~.admission.RESERVED_KEY_PREFIXES`, which caller keys may not) and that response has exactly
    one prompt capture. A caller key is only ever matched exactly. Returns ``(key or None, the candidate keys
    found)``."""
    if key_exists(key):
        return key, [key]
    if not key.startswith(RESERVED_KEY_PREFIXES):
        return None, []
    indexed_keys = []
    for i in range(MAX_PROMPTS_RESOLVED):
        if not key_exists(f"{key}-{i}"):
            break
        indexed_keys.append(f"{key}-{i}")
    return (indexed_keys[0] if len(indexed_keys) == 1 else None), indexed_keys


def store_state() -> dict[str, Any]:
    """Whether this server can capture: its namespace exists and is usable (``capture_available``), where it
    is (``store_base``; ``store_base_note`` says why it is not the configured base), or why not (``reason``)."""
    try:
        store = current_store()
    except OSError as e:
        return {"capture_available": False, "reason": str(e) or type(e).__name__}
    state: dict[str, Any] = {"capture_available": True, "store_base": str(store.path.parent)}
    note = getattr(_store, "base_note", lambda: None)()
    if note:
        state["store_base_note"] = note
    return state


def status_payload() -> dict[str, Any]:
    """What ``GET /v1/attncap`` answers: whether capture is available, records stored, their backed bytes,
    bytes in flight, reservations."""
    state = store_state()
    if not state["capture_available"]:
        return {"object": "attncap.status", **state}
    store = current_store()
    metas = store.find()
    return {
        "object": "attncap.status",
        **state,
        "records": len(metas),
        "open_records": sum(m.status == STATUS_OPEN for m in metas),
        "stored_bytes": store.pending_bytes(),
        "pending_bytes": pending_capture_bytes(),
        "reservations": len(reservations()),
    }


_TIMER: threading.Thread | None = None


def start_expiry_timer(period_s: float | None = None) -> threading.Thread | None:
    """Expire unfetched captures (``VLLM_ATTNCAP_TTL_S``) on a timer in the API-server process, so that the TTL
    holds on an idle server too (reads and listings also skip and remove expired records). Idempotent; None when
    the TTL is off."""
    global _TIMER
    ttl = envs.VLLM_ATTNCAP_TTL_S
    if ttl <= 0:
        return None
    if _TIMER is not None and _TIMER.is_alive():
        return _TIMER
    period = period_s if period_s is not None else max(0.25, min(ttl / 4.0, 30.0))

    def run():
        while True:
            time.sleep(period)
            try:
                pending_capture_bytes()  # retire the reservations of records that appeared, before any expires
                current_store().expire()
            except Exception as e:  # noqa: BLE001 - the store may be gone at shutdown
                logger.debug("vllm_attncap: expiry pass failed: %s", e)

    _TIMER = threading.Thread(target=run, name="attncap-expiry", daemon=True)
    _TIMER.start()
    return _TIMER


def _bad_key(key: str) -> bool:
    return not 1 <= len(key) <= MAX_DERIVED_KEY_CHARS or not key.isprintable()


def _error(status: HTTPStatus, message: str, param: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        status_code=status.value,
        content={"error": {"message": message, "type": status.phrase.replace(" ", ""), "param": param, "code": status.value}},
    )


def build_router():
    """The FastAPI router with the retrieval routes."""
    from fastapi import APIRouter, Query
    from fastapi.responses import JSONResponse

    router = APIRouter()

    @router.get(STATUS_ROUTE)
    async def store_status():
        return JSONResponse(status_payload())

    @router.get(ROUTE)
    async def get_capture(
        key: str,
        num_tokens: int | None = Query(None, ge=1, description="trim to this many generated tokens"),
        wait: float = Query(10.0, ge=0.0, le=60.0, description="seconds to wait for the capture to be closed"),
        encoding: str = Query("base64", pattern="^(base64|list)$"),
    ):
        state = store_state()
        if not state["capture_available"]:
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, f"capture is unavailable on this server: {state['reason']}")
        if _bad_key(key):
            return _error(HTTPStatus.BAD_REQUEST, f"key must be 1-{MAX_DERIVED_KEY_CHARS} printable characters", "key")
        deadline = time.monotonic() + wait
        stored, candidates = _resolve_key(key)
        while stored is None and not candidates and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            stored, candidates = _resolve_key(key)
        if stored is None and candidates:
            return _error(
                HTTPStatus.CONFLICT,
                f"{key!r} names several captures (one per prompt): {candidates}; fetch each of them", "key",
            )
        if stored is None:
            return _error(HTTPStatus.NOT_FOUND, f"no capture under {key!r} (already fetched, never requested, or evicted)", "key")
        # The worker closes a capture (recording how many rows it wrote) on the engine step
        # after the request finishes; wait for that unless the caller gave the token count.
        while True:
            metas = list_captures(stored)
            if not metas:
                return _error(HTTPStatus.NOT_FOUND, f"no capture under {stored!r} (already fetched or deleted)", "key")
            if num_tokens is not None or all(m.status != STATUS_OPEN for m in metas):
                break
            if time.monotonic() >= deadline:
                return _error(
                    HTTPStatus.CONFLICT,
                    f"the capture under {stored!r} is still being written; retry, or pass num_tokens "
                    "(usage.completion_tokens of the response)",
                    "key",
                )
            await asyncio.sleep(0.02)
        counts = [max(0, min(num_tokens if num_tokens is not None else m.rows_written - m.prompt_rows, m.max_tokens))
                  for m in metas]  # top-k rows of prompt tokens come before the reply's
        try:
            records = await asyncio.get_running_loop().run_in_executor(
                None, lambda: read_capture(stored, counts, wait_s=0.0)
            )
        except CaptureClaimed:
            return _error(HTTPStatus.NOT_FOUND, f"the capture under {stored!r} is being fetched or deleted by another "
                          "request (each capture is delivered once)", "key")
        except LookupError:
            return _error(HTTPStatus.NOT_FOUND, f"no capture under {stored!r} (already fetched or deleted)", "key")
        release(stored)
        errors = [r.error for r in records if r.meta.status == STATUS_ERROR]
        if errors:
            return _error(HTTPStatus.UNPROCESSABLE_ENTITY, f"capture refused by the engine: {errors[0]}", "key")
        bodies = [capture_payload(r, encoding=encoding) for r in records]
        if len(bodies) == 1:
            return JSONResponse(bodies[0])
        return JSONResponse({"object": "list", "key": stored, "data": bodies})

    @router.delete(ROUTE)
    async def delete_capture(key: str):
        state = store_state()
        if not state["capture_available"]:
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, f"capture is unavailable on this server: {state['reason']}")
        if _bad_key(key):
            return _error(HTTPStatus.BAD_REQUEST, f"key must be 1-{MAX_DERIVED_KEY_CHARS} printable characters", "key")
        stored = _resolve_key(key)[0] or key
        try:
            removed = current_store().discard(stored)
        except CaptureClaimed:
            return _error(HTTPStatus.CONFLICT, f"the capture under {stored!r} is being fetched by another request",
                          "key")
        except LookupError:
            removed = 0
        release(stored)
        return JSONResponse({"object": "attncap.deleted", "key": stored, "deleted_files": removed})

    return router
