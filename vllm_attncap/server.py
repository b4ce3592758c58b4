"""Server mode: capture specs through vLLM's OpenAI-compatible API, captures back by id.

``vllm serve MODEL --attention-backend attncap`` works with the stock server. The
general plugin's ``register()`` runs in the API-server process too, and there
:func:`install_frontend_validation` adds two things:

1. **Request validation** (wraps ``InputProcessor.process_inputs``, which every
   completion/chat request passes through after tokenization). The spec travels
   in the request's ``vllm_xargs``, whose values may only be strings, numbers or
   lists of them (``vllm/entrypoints/openai/*/protocol.py``), so a nested dict is
   refused by the server's request model. Two flat forms are accepted and may be
   mixed (a field given twice is an error)::

       "vllm_xargs": {"attncap": "{\\"layers\\": [-1], \\"reduce\\": \\"head_mean\\"}"}
       "vllm_xargs": {"attncap_layers": [-1], "attncap_reduce": "head_mean"}

   The hook turns them into the dict ``extra_args["attncap"]`` the worker reads,
   checks the spec against the model, the prompt and ``max_tokens``
   (:func:`vllm_attncap.spec.resolve_spec`), and gives the request a correlation
   key. A bad spec raises :class:`vllm.exceptions.VLLMValidationError`, which the
   server answers with HTTP 400 naming the field (``error.param`` is
   ``vllm_xargs.attncap.<field>``); the engine never sees the request and keeps
   serving. Caps: a request's buffer may not exceed ``VLLM_ATTNCAP_MAX_BYTES``
   (``max_bytes`` may ask for less, never more), and captures in flight may not
   exceed ``VLLM_ATTNCAP_MAX_PENDING_BYTES`` in total (HTTP 503 then: retry later).

2. **Retrieval routes** (added to the FastAPI app by wrapping
   ``attach_endpoint_plugins``, which ``build_app`` calls once after the core
   routes; no ``VLLM_PLUGINS`` allow-listing is needed)::

       GET    /v1/attncap/{key}   the capture as JSON, deleted once read
       DELETE /v1/attncap/{key}   drop it unread

   The key is the spec's ``key`` when the request set one, else the server's
   request id: ``<response id>-<prompt index>`` for ``/v1/completions`` (the
   response id alone also works for a single prompt) and ``<response id>`` for
   ``/v1/chat/completions``. The response id is the ``id`` field of the
   completion response (``X-Request-Id`` header, when sent, replaces its random
   part).

Outside an API-server process (``LLM`` offline, EngineCore, workers) nothing is
patched and nothing changes. docs/server.md shows requests and responses.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import sys
import threading
import time
from http import HTTPStatus
from typing import Any, Mapping

import numpy as np

from .spec import DEFAULT_MAX_BYTES, SPEC_FIELDS, CaptureSpec, resolve_spec
from .store import MAX_PENDING_BYTES, read_capture, discard_capture, store_dir

logger = logging.getLogger("vllm_attncap")

__all__ = [
    "SPEC_XARG",
    "FLAT_PREFIX",
    "ROUTE",
    "install_frontend_validation",
    "spec_from_xargs",
    "admit_request",
    "pending_capture_bytes",
    "capture_payload",
]

#: ``vllm_xargs`` key holding the spec as a JSON object string.
SPEC_XARG = "attncap"
#: Prefix of the flat form: ``attncap_<field>`` for each spec field.
FLAT_PREFIX = "attncap_"
ROUTE = "/v1/attncap/{key}"
#: Admitted requests count against the pending cap until their files appear, at most this long.
RESERVATION_TTL_S = 600.0
_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_FIELD_RE = re.compile(r"field '(\w+)'")

# True once this process has built an OpenAI API app: validation runs only then, so the
# offline ``LLM`` keeps its own behaviour (generate_with_attentions validates by itself).
_SERVER_MODE = False
_INSTALLED = False
_reservations: dict[str, tuple[int, float]] = {}
_reservations_lock = threading.Lock()
_admission_lock = threading.Lock()


class SpecError(ValueError):
    """A capture spec the server refuses; ``field`` names the offending spec field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class PendingCapError(RuntimeError):
    """Captures in flight would exceed ``VLLM_ATTNCAP_MAX_PENDING_BYTES``."""


# --- the spec in vllm_xargs -----------------------------------------------------------------


def spec_from_xargs(extra_args: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Split a request's extra args into (capture spec dict or None, the other extra args).

    Accepts ``extra_args["attncap"]`` as a JSON object string or a dict (Python
    clients of ``AsyncLLM``), and flat ``attncap_<field>`` keys; both may be
    combined as long as no field is given twice.

    Raises:
        SpecError: the JSON does not parse or is not an object, a flat key names
            no spec field, or a field is given twice.

    Example:
        >>> spec_from_xargs({"attncap": '{"layers": [-1]}', "attncap_reduce": "head_mean", "x": 1})
        ({'layers': [-1], 'reduce': 'head_mean'}, {'x': 1})
        >>> spec_from_xargs({"x": 1})
        (None, {'x': 1})
    """
    if not extra_args:
        return None, dict(extra_args or {})
    rest: dict[str, Any] = {}
    spec: dict[str, Any] | None = None
    flat: dict[str, Any] = {}
    for name, value in extra_args.items():
        if name == SPEC_XARG:
            if isinstance(value, str):
                try:
                    value = json.loads(value) if value.strip() else {}
                except json.JSONDecodeError as e:
                    raise SpecError(f"attncap spec: vllm_xargs.attncap is not valid JSON ({e.msg} at character {e.pos})") from None
            if not isinstance(value, Mapping):
                raise SpecError(
                    f"attncap spec: vllm_xargs.attncap must be a JSON object (as a string), got {type(value).__name__}"
                )
            spec = dict(value)
        elif name.startswith(FLAT_PREFIX):
            field = name[len(FLAT_PREFIX):]
            if field not in SPEC_FIELDS:
                raise SpecError(
                    f"attncap spec: unknown field {field!r} (from vllm_xargs.{name}); allowed fields are {list(SPEC_FIELDS)}",
                    field,
                )
            flat[field] = value
        else:
            rest[name] = value
    if spec is None and not flat:
        return None, rest
    spec = spec or {}
    twice = sorted(set(spec) & set(flat))
    if twice:
        raise SpecError(f"attncap spec field '{twice[0]}': given both in vllm_xargs.attncap and as vllm_xargs.attncap_{twice[0]}", twice[0])
    spec.update(flat)
    return spec, rest


# --- admission ------------------------------------------------------------------------------


def _meta_nbytes(meta: Mapping[str, Any]) -> int:
    shape = meta.get("shape") or []
    return 4 * math.prod(int(d) for d in shape) if shape else 0


def _read_metas(prefix: str = "") -> list[dict[str, Any]]:
    metas = []
    for p in store_dir().glob(f"{prefix}*.json"):
        try:
            metas.append(json.loads(p.read_text()))
        except (OSError, ValueError):  # deleted or being replaced meanwhile
            continue
    return metas


def pending_capture_bytes() -> int:
    """Bytes the server is committed to: buffers of captures still being written (nominal
    size, since rows are filled as tokens come) plus requests admitted whose buffers the
    worker has not created yet. Finished, uncollected captures are not counted: the worker
    evicts those itself when the store grows past ``VLLM_ATTNCAP_MAX_PENDING_BYTES``."""
    open_keys, total = set(), 0
    for meta in _read_metas():
        if meta.get("status") == "open":
            total += _meta_nbytes(meta)
        open_keys.add(meta.get("key"))
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
    return any(store_dir().glob(f"{_UNSAFE.sub('_', key)}__*.json"))


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


def _release(key: str) -> None:
    with _reservations_lock:
        _reservations.pop(key, None)


def _as_http_error(e: Exception) -> Exception:
    """Map our errors to the exceptions vLLM's server turns into HTTP 400 / 503."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # older vLLM: plain ValueError -> 400
        return ValueError(str(e))
    if isinstance(e, PendingCapError):
        try:
            from vllm.exceptions import GracefulHTTPError

            return GracefulHTTPError(str(e), HTTPStatus.SERVICE_UNAVAILABLE)
        except ImportError:
            return ValueError(str(e))
    field = getattr(e, "field", None)
    param = f"vllm_xargs.attncap.{field}" if field else "vllm_xargs.attncap"
    return VLLMValidationError(str(e), parameter=param)


def _wrap_process_inputs(orig):
    import functools

    @functools.wraps(orig)
    def process_inputs(self, request_id, *args, **kwargs):
        out = orig(self, request_id, *args, **kwargs)
        if not _SERVER_MODE:
            return out
        request = out[-1] if isinstance(out, tuple) else out  # older vLLM returned (prompt_str, request)
        sp = getattr(request, "sampling_params", None)
        if sp is None or not sp.extra_args:
            return out
        mc, pc = self.vllm_config.model_config, self.vllm_config.parallel_config
        try:
            new_args = admit_request(
                sp.extra_args,
                request_id=str(request_id),
                prompt_len=len(request.prompt_token_ids or []),
                max_tokens=sp.max_tokens if sp.max_tokens is not None else mc.max_model_len,
                n=getattr(sp, "n", 1) or 1,
                num_layers=mc.get_num_layers(pc),
                num_heads=mc.get_num_attention_heads(pc),
                max_model_len=mc.max_model_len,
            )
        except (SpecError, PendingCapError) as e:
            raise _as_http_error(e) from None
        if new_args is not None:
            sp.extra_args = new_args  # a fresh dict: the caller's params stay untouched
        return out

    process_inputs.__attncap_wrapped__ = True
    return process_inputs


# --- retrieval ------------------------------------------------------------------------------


def _child_index(req_id: str) -> int:
    m = re.match(r"^(\d+)_", req_id)
    return int(m.group(1)) if m else 0


def capture_payload(record, *, encoding: str = "base64") -> dict[str, Any]:
    """JSON body of one capture record (see docs/server.md for the fields)."""
    meta = record.meta
    body: dict[str, Any] = {
        "object": "attncap.capture",
        "key": record.key,
        "engine_request_id": record.req_id,
        "mode": meta.get("mode"),
        "reduce": meta.get("reduce"),
        "layers": meta.get("layers"),
        "heads": meta.get("heads"),
        "prompt_len": meta.get("prompt_len"),
        "spec": meta.get("spec"),
    }
    arr = record.array
    body["num_tokens"] = int(arr.shape[-1] if meta.get("mode") == "stats" else arr.shape[2])
    if meta.get("mode") == "stats":
        body["history_len"] = meta.get("history_len")
        body["shape"] = list(arr.shape[1:])
        body["coverage"] = arr[0].tolist()
        body["entropy"] = arr[1].tolist()
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
    """The stored key for ``key``: itself, or ``key-<i>`` when a completion response id has
    exactly one prompt capture. Returns ``(key or None, the candidate keys found)``."""
    safe = _UNSAFE.sub("_", key)
    d = store_dir()
    if any(d.glob(f"{safe}__*.json")):
        return key, [key]
    indexed = {p.name.split("__", 1)[0] for p in d.glob(f"{safe}-*__*.json")}
    indexed = sorted(k for k in indexed if re.fullmatch(re.escape(safe) + r"-\d+", k))
    return (indexed[0] if len(indexed) == 1 else None), indexed


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

    @router.get(ROUTE)
    async def get_capture(
        key: str,
        num_tokens: int | None = Query(None, ge=1, description="trim to this many generated tokens"),
        wait: float = Query(10.0, ge=0.0, le=60.0, description="seconds to wait for the capture to be closed"),
        encoding: str = Query("base64", pattern="^(base64|list)$"),
    ):
        if not _KEY_RE.match(key):
            return _error(HTTPStatus.BAD_REQUEST, "key must be 1-128 characters from [A-Za-z0-9._-]", "key")
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
        prefix = f"{_UNSAFE.sub('_', stored)}__"
        # The worker closes a capture (recording how many rows it wrote) on the engine step
        # after the request finishes; wait for that unless the caller gave the token count.
        while True:
            metas = sorted(_read_metas(prefix), key=lambda m: _child_index(m.get("req_id", "")))
            if num_tokens is not None or all(m.get("status") != "open" for m in metas):
                break
            if time.monotonic() >= deadline:
                return _error(
                    HTTPStatus.CONFLICT,
                    f"the capture under {stored!r} is still being written; retry, or pass num_tokens "
                    "(usage.completion_tokens of the response)",
                    "key",
                )
            await asyncio.sleep(0.02)
        errors = [m.get("error") for m in metas if m.get("status") == "error"]
        if errors:
            discard_capture(stored)
            _release(stored)
            return _error(HTTPStatus.UNPROCESSABLE_ENTITY, f"capture refused by the engine: {errors[0]}", "key")
        counts = []
        for m in metas:
            t_max = int(m.get("max_tokens") or (m.get("shape") or [0])[-1] or 0)
            t = num_tokens if num_tokens is not None else int(m.get("rows_written", t_max))
            counts.append(max(0, min(t, t_max)))
        _release(stored)
        records = await asyncio.get_running_loop().run_in_executor(None, lambda: read_capture(stored, counts, wait_s=0.0))
        bodies = [capture_payload(r, encoding=encoding) for r in records]
        if len(bodies) == 1:
            return JSONResponse(bodies[0])
        return JSONResponse({"object": "list", "key": stored, "data": bodies})

    @router.delete(ROUTE)
    async def delete_capture(key: str):
        if not _KEY_RE.match(key):
            return _error(HTTPStatus.BAD_REQUEST, "key must be 1-128 characters from [A-Za-z0-9._-]", "key")
        stored = _resolve_key(key)[0] or key
        _release(stored)
        return JSONResponse({"object": "attncap.deleted", "key": stored, "deleted_files": discard_capture(stored)})

    return router


def _attach(app) -> None:
    global _SERVER_MODE
    app.include_router(build_router())
    _SERVER_MODE = True
    logger.info(
        "vllm_attncap: server mode on: capture specs via vllm_xargs, captures at GET %s "
        "(per-request cap %d bytes, in-flight cap %d bytes)", ROUTE, DEFAULT_MAX_BYTES, MAX_PENDING_BYTES,
    )


def _patch_app_builder() -> bool:
    mod = sys.modules.get("vllm.entrypoints.launchers.app")
    if mod is not None and hasattr(mod, "attach_endpoint_plugins"):
        # vLLM >= 0.28: build_app() calls this module global once, after the core routers.
        orig = mod.attach_endpoint_plugins
        if getattr(orig, "__attncap_wrapped__", False):
            return True

        def attach_endpoint_plugins(app, *args, **kwargs):
            result = orig(app, *args, **kwargs)
            _attach(app)
            return result

        attach_endpoint_plugins.__attncap_wrapped__ = True
        mod.attach_endpoint_plugins = attach_endpoint_plugins
        return True
    mod = sys.modules.get("vllm.entrypoints.openai.api_server")
    if mod is not None and hasattr(mod, "build_app"):
        # Older layout (untested here): build_app is a module global of api_server.
        orig_build = mod.build_app
        if getattr(orig_build, "__attncap_wrapped__", False):
            return True

        def build_app(*args, **kwargs):
            app = orig_build(*args, **kwargs)
            _attach(app)
            return app

        build_app.__attncap_wrapped__ = True
        mod.build_app = build_app
        return True
    return False


def _patch_input_processor() -> bool:
    try:
        from vllm.v1.engine.input_processor import InputProcessor as cls
    except ImportError:
        try:
            from vllm.v1.engine.processor import Processor as cls  # older vLLM
        except ImportError:
            return False
    if not getattr(cls.process_inputs, "__attncap_wrapped__", False):
        cls.process_inputs = _wrap_process_inputs(cls.process_inputs)
    return True


def install_frontend_validation() -> bool:
    """Install server mode in an OpenAI API-server process; a no-op anywhere else.

    Called from ``vllm_attncap.plugin.register()``, which vLLM runs in every process
    before the engine is built. The API-server process is recognised by its app
    module being imported already (``vllm serve`` imports it before parsing the
    engine arguments); EngineCore, workers and offline ``LLM`` processes are left
    alone. Idempotent.

    Returns:
        True when the hooks are in place in this process.
    """
    global _INSTALLED
    if _INSTALLED:
        return True
    if "vllm.entrypoints.launchers.app" not in sys.modules and "vllm.entrypoints.openai.api_server" not in sys.modules:
        return False
    if not _patch_input_processor():
        logger.warning("vllm_attncap: this vLLM has no InputProcessor to hook; server-side capture validation is off")
        return False
    if not _patch_app_builder():
        logger.warning("vllm_attncap: could not find vLLM's app builder; GET %s is not available", ROUTE)
        return False
    _INSTALLED = True
    return True
