"""Admission of capture requests in the API server: validation against the model, byte caps, key reservations.

Validation runs in the API-server process, before the engine sees the request, so a bad or over-cap spec is an
HTTP 400 naming the field and the engine keeps serving. Captures in flight are capped: admitted requests reserve
their buffer's bytes until the worker's records appear (every refused capture leaves an error record, so a
reservation always ends; at most ``RESERVATION_TTL_S`` in any case), and the records still being written count
with their nominal size (:func:`pending_capture_bytes`). A capture that could never fit under the in-flight cap is
a 400 naming the limit, not a 503.

Keys: a caller-chosen ``key`` addresses exactly the captures stored under it. The prompts of one completions
request (request ids ``<response id>-<i>``) share a caller-chosen key: they are admitted together and fetched
together (one record per prompt and sample). Any other request reusing a key whose captures are not fetched yet
is refused. Without a ``key`` the request id is the key, verbatim (at most :data:`MAX_DERIVED_KEY_CHARS`
characters; ``X-Request-Id`` sets its random part). Caller keys may not start with the server's request-id
prefixes (:data:`RESERVED_KEY_PREFIXES`), so the two kinds never collide.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

from .. import envs
from ..spec import SPEC_FIELDS, CaptureSpec, resolve_spec
from ..store import STATUS_OPEN, key_exists, list_captures  # TP/PP parts count as one record
from .xargs import SPEC_XARG, SpecError, spec_from_xargs

__all__ = [
    "PendingCapError", "RESERVATION_TTL_S", "MAX_DERIVED_KEY_CHARS", "RESERVED_KEY_PREFIXES", "admit_request",
    "pending_capture_bytes", "release", "reservations",
]

#: Admitted requests count against the pending cap until their records appear, at most this long.
RESERVATION_TTL_S = 600.0
#: Longest request id usable as a capture key (the server's ids plus ``X-Request-Id``).
MAX_DERIVED_KEY_CHARS = 1024
#: Prefixes of the server's request ids (completions, chat, responses); caller keys may not use them.
RESERVED_KEY_PREFIXES = ("cmpl-", "chatcmpl-", "resp_", "resp-")
_FIELD_RE = re.compile(r"field '(\w+)'")
_PROMPT_INDEX = re.compile(r"^(?P<group>.+)-(?P<index>\d+)$")


@dataclass
class _Reservation:
    nbytes: int  # nominal bytes of every record expected under the key
    expected: int  # records the worker will write under the key
    since: float


_reservations: dict[str, _Reservation] = {}
#: key -> (the request, without its prompt index, that owns a caller-chosen key; since)
_owners: dict[str, tuple[str, float]] = {}
_reservations_lock = threading.Lock()
_admission_lock = threading.Lock()


class PendingCapError(RuntimeError):
    """Captures in flight would exceed ``VLLM_ATTNCAP_MAX_PENDING_BYTES`` (retry later)."""


def reservations() -> dict[str, tuple[int, int]]:
    """Keys admitted whose records have not all appeared: ``{key: (bytes reserved, records expected)}``."""
    with _reservations_lock:
        return {k: (r.nbytes, r.expected) for k, r in _reservations.items()}


def pending_capture_bytes() -> int:
    """Bytes the server is committed to: records still being written (nominal size, since rows are filled as
    tokens come) plus admitted requests whose records the worker has not created yet. Finished, unfetched
    captures are not counted: the worker evicts those itself when the store grows past
    ``VLLM_ATTNCAP_MAX_PENDING_BYTES``."""
    seen: dict[str, tuple[int, int]] = {}
    total = 0
    for meta in list_captures():
        if meta.status == STATUS_OPEN:
            total += meta.nbytes
        count, nbytes = seen.get(meta.key, (0, 0))
        seen[meta.key] = (count + 1, nbytes + meta.nbytes)
    now = time.monotonic()
    with _reservations_lock:
        for key, r in list(_reservations.items()):
            count, nbytes = seen.get(key, (0, 0))
            if count >= r.expected or now - r.since > RESERVATION_TTL_S:
                del _reservations[key]
            else:
                total += max(0, r.nbytes - nbytes)
        for key, (_, since) in list(_owners.items()):
            if now - since > RESERVATION_TTL_S and key not in _reservations and key not in seen:
                del _owners[key]
    return total


def _group(request_id: str) -> str:
    m = _PROMPT_INDEX.match(request_id)
    return m.group("group") if m else request_id


def _derived_key(request_id: str) -> str:
    if len(request_id) > MAX_DERIVED_KEY_CHARS or not request_id.isprintable():
        raise SpecError(
            f"attncap spec field 'key': this request's id ({len(request_id)} characters, from X-Request-Id) cannot "
            f"name a capture: at most {MAX_DERIVED_KEY_CHARS} printable characters; send a shorter X-Request-Id "
            "or choose a key",
            "key",
        )
    return request_id


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
    ``"attncap"``: the spec as a dict with its ``key`` set (the request id
    verbatim, unless the request chose one).

    Args:
        extra_args: the request's ``SamplingParams.extra_args``.
        request_id: the server's id for this request (before vLLM appends its random suffix).
        prompt_len, max_tokens, n: the request's prompt length, token budget and sample count.
        num_layers, num_heads, max_model_len: the served model's.
        max_bytes: per-request cap (default ``VLLM_ATTNCAP_MAX_BYTES``); a spec may ask for less.
        max_pending_bytes: cap on captures in flight (default ``VLLM_ATTNCAP_MAX_PENDING_BYTES``).

    Raises:
        SpecError: the spec is malformed, out of range for the model or request, over
            the per-request cap or the in-flight cap as a whole, uses a reserved key, or reuses a key
            whose capture was not fetched yet.
        PendingCapError: admitting it now would put more than ``max_pending_bytes`` in flight.
    """
    spec_dict, rest = spec_from_xargs(extra_args)
    if spec_dict is None:
        return None
    cap = envs.VLLM_ATTNCAP_MAX_BYTES if max_bytes is None else int(max_bytes)
    pending_cap = envs.VLLM_ATTNCAP_MAX_PENDING_BYTES if max_pending_bytes is None else int(max_pending_bytes)
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
    if spec.key is not None and spec.key.startswith(RESERVED_KEY_PREFIXES):
        raise SpecError(
            f"attncap spec field 'key': {spec.key!r} starts with a prefix the server uses for request ids "
            f"{list(RESERVED_KEY_PREFIXES)}; choose another key", "key",
        )
    key = spec.key or _derived_key(request_id)
    group = _group(request_id) if spec.key else request_id
    samples = max(1, int(n))
    need = resolved.nbytes * samples
    if need > pending_cap:
        raise SpecError(
            f"attncap spec field 'max_bytes': this capture needs {need} bytes, more than the {pending_cap} bytes the "
            "server keeps in flight in all (VLLM_ATTNCAP_MAX_PENDING_BYTES), so it can never be admitted; ask for "
            "less (reduce, fewer layers/heads, mode='stats', fewer max_tokens)",
            "max_bytes",
        )
    with _admission_lock:  # check and reserve atomically: requests are admitted from a thread pool
        with _reservations_lock:
            mine = _reservations.get(key)
            owner = _owners.get(key)
            joins = spec.key is not None and owner is not None and owner[0] == group
            live = mine is not None and time.monotonic() - mine.since <= RESERVATION_TTL_S
        if not joins and (live or key_exists(key)):
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
            now = time.monotonic()
            r = _reservations.get(key) if joins else None
            if r is not None:
                r.nbytes += need
                r.expected += samples
                r.since = now
            else:
                # joining after the earlier prompts' records appeared: they count as seen
                before = len(list_captures(key)) if joins else 0
                prior = sum(m.nbytes for m in list_captures(key)) if joins else 0
                _reservations[key] = _Reservation(prior + need, before + samples, now)
            if spec.key is not None:
                _owners[key] = (group, now)
    return {**rest, SPEC_XARG: {**spec.to_dict(), "key": key}}


def release(key: str) -> None:
    """Drop ``key``'s reservation (its capture was fetched, deleted or refused)."""
    with _reservations_lock:
        _reservations.pop(key, None)
        _owners.pop(key, None)
