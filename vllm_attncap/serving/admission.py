"""Admission of capture requests in the API server: validation against the model, byte caps, key reservations.

Validation runs in the API-server process, before the engine sees the request, so a bad or over-cap spec is an
HTTP 400 naming the field and the engine keeps serving. Captures in flight are capped: admitted requests reserve
their buffer's bytes until the worker's record appears (at most ``RESERVATION_TTL_S``), and the records still being
written count with their nominal size (:func:`pending_capture_bytes`).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Mapping

from ..spec import DEFAULT_MAX_BYTES, SPEC_FIELDS, CaptureSpec, resolve_spec
from ..store import MAX_PENDING_BYTES, STATUS_OPEN, key_exists, list_captures
from .xargs import SPEC_XARG, SpecError, spec_from_xargs

__all__ = ["PendingCapError", "RESERVATION_TTL_S", "admit_request", "pending_capture_bytes", "release"]

#: Admitted requests count against the pending cap until their files appear, at most this long.
RESERVATION_TTL_S = 600.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_FIELD_RE = re.compile(r"field '(\w+)'")

_reservations: dict[str, tuple[int, float]] = {}
_reservations_lock = threading.Lock()
_admission_lock = threading.Lock()


class PendingCapError(RuntimeError):
    """Captures in flight would exceed ``VLLM_ATTNCAP_MAX_PENDING_BYTES``."""


def pending_capture_bytes() -> int:
    """Bytes the server is committed to: buffers of captures still being written (nominal
    size, since rows are filled as tokens come) plus requests admitted whose buffers the
    worker has not created yet. Finished, uncollected captures are not counted: the worker
    evicts those itself when the store grows past ``VLLM_ATTNCAP_MAX_PENDING_BYTES``."""
    open_keys, total = set(), 0
    for meta in list_captures():
        if meta.status == STATUS_OPEN:
            total += meta.nbytes
        open_keys.add(meta.key)
    now = time.monotonic()
    with _reservations_lock:
        for key, (nbytes, since) in list(_reservations.items()):
            if key in open_keys or now - since > RESERVATION_TTL_S:
                del _reservations[key]
            else:
                total += nbytes
    return total


def _key_in_use(key: str) -> bool:
    with _reservations_lock:
        if key in _reservations and time.monotonic() - _reservations[key][1] <= RESERVATION_TTL_S:
            return True
    return key_exists(key)


def admit_request(
    extra_args: Mapping[str, Any] | None,
    *,
    request_id: str,
    prompt_len: int,
    max_tokens: int,
    n: int,
    num_layers: int,
    num_heads: int,
    max_model_len: int,
    max_bytes: int | None = None,
    max_pending_bytes: int | None = None,
) -> dict[str, Any] | None:
    """Validate a request's capture spec and return its normalised extra args.

    Returns ``None`` when the request asks for no capture (its extra args are left
    as they are). Otherwise the returned dict holds the other extra args plus
    ``"attncap"``: the spec as a dict with its ``key`` set (the request id, made
    file-name safe, unless the request chose one).

    Args:
        extra_args: the request's ``SamplingParams.extra_args``.
        request_id: the server's id for this request (before vLLM appends its random suffix).
        prompt_len, max_tokens, n: the request's prompt length, token budget and sample count.
        num_layers, num_heads, max_model_len: the served model's.
        max_bytes: per-request cap (default ``VLLM_ATTNCAP_MAX_BYTES``); a spec may ask for less.
        max_pending_bytes: cap on captures in flight (default ``VLLM_ATTNCAP_MAX_PENDING_BYTES``).

    Raises:
        SpecError: the spec is malformed, out of range for the model or request, over
            the per-request cap, or reuses a key whose capture was not fetched yet.
        PendingCapError: admitting it would put more than ``max_pending_bytes`` in flight.
    """
    spec_dict, rest = spec_from_xargs(extra_args)
    if spec_dict is None:
        return None
    cap = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
    pending_cap = MAX_PENDING_BYTES if max_pending_bytes is None else int(max_pending_bytes)
    unknown = sorted(set(spec_dict) - set(SPEC_FIELDS))
    if unknown:
        raise SpecError(
            f"attncap spec: unknown field {unknown[0]!r}; allowed fields are {list(SPEC_FIELDS)}", unknown[0]
        )
    try:
        spec = CaptureSpec.from_any(spec_dict)
        if spec.max_bytes is not None and spec.max_bytes > cap:
            raise ValueError(
                f"attncap spec field 'max_bytes': {spec.max_bytes} exceeds this server's cap of {cap} bytes "
                "per request (VLLM_ATTNCAP_MAX_BYTES); ask for less"
            )
        t_max = max(1, min(int(max_tokens), max_model_len - prompt_len))
        resolved = resolve_spec(
            spec, num_layers=num_layers, num_heads=num_heads, prompt_len=prompt_len,
            max_tokens=t_max, default_max_bytes=cap,
        )
    except ValueError as e:
        m = _FIELD_RE.search(str(e))
        raise SpecError(str(e), m.group(1) if m else None) from None
    key = spec.key or _UNSAFE.sub("_", request_id)[:128]
    need = resolved.nbytes * max(1, int(n))
    with _admission_lock:  # check and reserve atomically: requests are admitted from a thread pool
        if _key_in_use(key):
            raise SpecError(
                f"attncap spec field 'key': a capture under key {key!r} is pending; fetch it "
                f"(GET /v1/attncap/{key}) or delete it, or choose another key",
                "key",
            )
        pending = pending_capture_bytes()
        if pending + need > pending_cap:
            raise PendingCapError(
                f"attncap: this capture needs {need} bytes but {pending} of the server's "
                f"{pending_cap} bytes (VLLM_ATTNCAP_MAX_PENDING_BYTES) are held by captures in flight; "
                "retry later, fetch finished captures, or ask for less (reduce, fewer layers/heads, mode='stats')"
            )
        with _reservations_lock:
            _reservations[key] = (need, time.monotonic())
    return {**rest, SPEC_XARG: {**spec.to_dict(), "key": key}}


def release(key: str) -> None:
    """Drop ``key``'s reservation (its capture was fetched, deleted or refused)."""
    with _reservations_lock:
        _reservations.pop(key, None)
