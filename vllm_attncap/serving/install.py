"""Server mode's hooks into vLLM's OpenAI API server: request validation and the retrieval routes.

1. **Request validation** wraps ``InputProcessor.process_inputs``, which every completion/chat request passes
   through after tokenization, to run :func:`~vllm_attncap.serving.admission.admit_request`. A bad spec raises
   :class:`vllm.exceptions.VLLMValidationError`, which the server answers with HTTP 400 naming the field
   (``error.param`` is ``vllm_xargs.attncap.<field>``); the engine never sees the request and keeps serving.
2. **Retrieval routes** (:mod:`~vllm_attncap.serving.routes`) are added to the FastAPI app by wrapping
   ``attach_endpoint_plugins``, which ``build_app`` calls once after the core routes (no ``VLLM_PLUGINS``
   allow-listing is needed).
3. **The guard** (:class:`CaptureGuard`), an ASGI middleware in front of every route the app mounts: the API key
   for anything that creates, reads or deletes a capture, the spec checked as parsed, stream errors as HTTP
   statuses (see its docstring and docs/server.md, "Guarantees, route by route").

Outside an API-server process (``LLM`` offline, EngineCore, workers) nothing is patched and nothing changes.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import logging
import os
import secrets
import sys
from http import HTTPStatus

from ..engine.parallel import global_counts
from .. import envs
from .admission import PendingCapError, admit_request
from .inline import install as install_inline
from .inline import prepare_sampling_params
from .routes import ROUTE, STATUS_ROUTE, build_router, start_expiry_timer
from .xargs import SpecError, check_request_body, is_capture_name

logger = logging.getLogger("vllm_attncap")

__all__ = ["install_frontend_validation"]

# True once this process has built an OpenAI API app: validation runs only then, so the
# offline ``LLM`` keeps its own behaviour (generate_with_attentions validates by itself).
_SERVER_MODE = False
_INSTALLED = False


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


class Caller:
    """The HTTP request a generation belongs to, as the guard saw it: whether it carried the server's API key
    (True when the server has none). Compared by identity: each HTTP request gets its own."""

    __slots__ = ("authenticated", "error")

    def __init__(self, authenticated: bool):
        self.authenticated = authenticated
        #: (HTTP status, message, param) of the capture error admission raised for this request, if any
        self.error: tuple[int, str, str | None] | None = None


#: Set by :class:`CaptureGuard` for every HTTP request; read where the request's prompts are admitted.
_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("attncap_caller", default=None)
_MISSING = object()
#: SHA-256 digests of the server's API keys (``--api-key`` / ``VLLM_API_KEY``), set when the app is built.
_API_TOKENS: list[bytes] = []


def _unauthorized_error() -> Exception:
    message = ("attncap: this server has an API key; a request that asks for a capture must carry it "
               "(Authorization: Bearer <key>), whatever its route")
    try:
        from vllm.exceptions import GracefulHTTPError

        return GracefulHTTPError(message, HTTPStatus.UNAUTHORIZED)
    except ImportError:  # pragma: no cover - older vLLM
        return PermissionError(message)


def _internal_error(e: Exception) -> Exception:
    """An unexpected failure while admitting a capture: a 503 (store unusable) or 500, never an empty message."""
    status = HTTPStatus.SERVICE_UNAVAILABLE if isinstance(e, OSError) else HTTPStatus.INTERNAL_SERVER_ERROR
    what = "the capture store is unavailable" if isinstance(e, OSError) else "capture admission failed"
    message = f"attncap: {what}: {type(e).__name__}: {e}" if str(e) else f"attncap: {what}: {type(e).__name__}"
    try:
        from vllm.exceptions import GracefulHTTPError

        return GracefulHTTPError(message, status)
    except ImportError:  # pragma: no cover - older vLLM
        return RuntimeError(message)


def _noted(caller: Caller | None, error: Exception, param: str | None) -> Exception:
    """Record a capture error on the request's :class:`Caller` (the stream gate answers with it) and return it."""
    if caller is not None:
        status = getattr(error, "http_status", None)
        caller.error = (int(status) if status is not None else 400, str(error), param)
    return error


def _wrap_process_inputs(orig):
    @functools.wraps(orig)
    def process_inputs(self, request_id, *args, **kwargs):
        caller = kwargs.pop("_attncap_caller", _MISSING)  # from process_inputs_async (an executor thread)
        if caller is _MISSING:
            caller = _CALLER.get()
        out = orig(self, request_id, *args, **kwargs)
        if not _SERVER_MODE:
            return out
        request = out[-1] if isinstance(out, tuple) else out  # older vLLM returned (prompt_str, request)
        sp = getattr(request, "sampling_params", None)
        if sp is None or not sp.extra_args:
            return out
        if _API_TOKENS and any(is_capture_name(k) for k in sp.extra_args) and not (
                caller is not None and caller.authenticated):
            # the guard refuses such bodies first; this holds for any route, however the spec got here
            raise _noted(caller, _unauthorized_error(), "Authorization")
        mc = self.vllm_config.model_config
        try:
            new_args = admit_request(
                sp.extra_args,
                request_id=str(request_id),
                prompt_len=len(request.prompt_token_ids or []),
                max_tokens=sp.max_tokens if sp.max_tokens is not None else mc.max_model_len,
                n=getattr(sp, "n", 1) or 1,
                num_layers=global_counts(self.vllm_config)[0],  # the whole model, whatever its TP/PP
                num_heads=global_counts(self.vllm_config)[1],
                max_model_len=mc.max_model_len,
                caller=caller,
            )
        except (SpecError, PendingCapError) as e:
            field = getattr(e, "field", None)
            raise _noted(caller, _as_http_error(e), None if isinstance(e, PendingCapError) else
                         (f"vllm_xargs.attncap.{field}" if field else "vllm_xargs.attncap")) from None
        except Exception as e:  # noqa: BLE001 - never a 500 with an empty message
            logger.exception("vllm_attncap: admitting a capture failed")
            raise _noted(caller, _internal_error(e), None) from None
        if new_args is not None:
            sp.extra_args = new_args  # a fresh dict: the caller's params stay untouched
            prepare_sampling_params(sp, len(request.prompt_token_ids or []))  # top-k prompt rows: no cache reads
        return out

    process_inputs.__attncap_wrapped__ = True
    return process_inputs


def _wrap_init(orig_init):
    """After ``InputProcessor.__init__``: make ``process_inputs_async`` (which runs ``process_inputs`` in an
    executor thread, where context variables do not follow) hand the calling request's :class:`Caller` over."""

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        inner = getattr(self, "process_inputs_async", None)
        if inner is None or not getattr(type(self).process_inputs, "__attncap_wrapped__", False):
            return

        def process_inputs_async(*a, **kw):
            kw["_attncap_caller"] = _CALLER.get()
            return inner(*a, **kw)

        self.process_inputs_async = process_inputs_async

    __init__.__attncap_wrapped__ = True
    return __init__


def _verify_api_key(headers) -> bool:
    """vLLM's own check (``AuthenticationMiddleware``): ``Authorization: Bearer <one of the keys>``."""
    value = headers.get("authorization")
    if not value:
        return False
    scheme, _, param = value.partition(" ")
    if scheme.lower() != "bearer":
        return False
    digest = hashlib.sha256(param.encode("utf-8")).digest()
    match = False
    for token in _API_TOKENS:
        match |= secrets.compare_digest(digest, token)
    return match


def _server_api_tokens(app) -> list[bytes]:
    """The API keys vLLM's server enforces: ``--api-key`` (one or several), else ``VLLM_API_KEY``."""
    args = getattr(getattr(app, "state", None), "args", None)
    keys = getattr(args, "api_key", None)
    if isinstance(keys, str):
        keys = [keys]
    try:
        from vllm import envs

        env_key = envs.VLLM_API_KEY
    except (ImportError, AttributeError):  # pragma: no cover - older vLLM
        env_key = os.environ.get("VLLM_API_KEY")
    return [hashlib.sha256(k.encode("utf-8")).digest() for k in (keys or [env_key]) if k]


def _json_error(status: int, message: str, param: str | None, err_type: str) -> tuple[dict, bytes]:
    payload = json.dumps({"error": {"message": message, "type": err_type, "param": param, "code": status}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]}
    return start, payload


async def _respond(send, status: int, message: str, param: str | None, err_type: str) -> None:
    start, payload = _json_error(status, message, param, err_type)
    await send(start)
    await send({"type": "http.response.body", "body": payload})


#: Most bytes of an event stream held back while waiting for its first event.
_MAX_HELD = 1 << 20
#: Events that streams send before generating (the Responses API); held with the first event that follows.
_PRELUDE_EVENTS = ("response.created", "response.in_progress")


def _first_event_verdict(buf: bytes, final: bool, refused: bool = False):
    """Look at the held start of an event stream: ``("error", status, body)`` when its first event is a capture
    error (or any error, when admission refused the capture: ``refused``), ``"pass"`` when it is anything else,
    ``None`` to keep holding."""
    events = buf.replace(b"\r\n", b"\n").split(b"\n\n")
    complete = events if final else events[:-1]
    for event in complete:
        data = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data.strip():
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            return "pass"
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict) and (refused or "attncap" in str(err.get("message", ""))):
            code = err.get("code")
            status = code if isinstance(code, int) and 400 <= code < 600 else 400
            return ("error", status, data)
        if isinstance(obj, dict) and obj.get("type") in _PRELUDE_EVENTS:
            continue
        return "pass"
    return "pass" if final or len(buf) > _MAX_HELD else None


def _stream_gate(send, caller: Caller):
    """Wrap ``send`` for a capture request: an event stream whose first event is an error, when admission refused
    the request's capture (recorded on ``caller``; raised once the prompt is tokenized, e.g. a layer out of range)
    or the event names a capture error, is answered as that error's HTTP status instead, before any of the stream
    is sent. The body is then vLLM's error format built from the admission's own error, whatever the route's
    stream made of it."""
    state = {"mode": "undecided", "start": None, "buf": b""}

    async def gated(message):
        mode = state["mode"]
        if mode == "pass":
            await send(message)
            return
        if mode == "drop":
            return
        if message["type"] == "http.response.start":
            ctype = dict((k.lower(), v) for k, v in message.get("headers", [])).get(b"content-type", b"")
            if message.get("status") == 200 and ctype.startswith(b"text/event-stream"):
                state["start"] = message
                return
            state["mode"] = "pass"
            await send(message)
            return
        if message["type"] == "http.response.body" and state["start"] is not None:
            state["buf"] += message.get("body", b"")
            more = message.get("more_body", False)
            verdict = _first_event_verdict(state["buf"], final=not more, refused=caller.error is not None)
            if verdict is None:
                return
            if verdict == "pass":
                state["mode"] = "pass"
                await send(state["start"])
                await send({"type": "http.response.body", "body": state["buf"], "more_body": more})
                return
            _, status, data = verdict
            if caller.error is not None:
                status, message, param = caller.error
                data = json.dumps({"error": {"message": message, "type": HTTPStatus(status).phrase.replace(" ", ""),
                                             "param": param, "code": status}}).encode()
            state["mode"] = "drop"
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})
            return
        await send(message)

    return gated


def _needs_parse(body: bytes) -> bool:
    """Whether a body may name a spec field: a UTF-8 body without the bytes ``attncap`` and without ``\\u``
    escapes cannot; any other encoding (UTF-16, UTF-32, a BOM) is parsed."""
    if not body:
        return False
    if b"attncap" in body or b"\\u" in body:
        return True
    try:
        return json.detect_encoding(body) != "utf-8"
    except Exception:  # noqa: BLE001
        return True


class CaptureGuard:
    """ASGI middleware in front of every route of the server (whatever vLLM mounts, now or later).

    For every HTTP request it records a :class:`Caller` (did the request carry the API key, when the server has
    one) in a context variable, which the admission of the request's prompts reads. Then:

    * ``/v1/attncap`` and everything under it (read, delete, status) needs the API key when the server has one,
      and a key that is not printable is a 400 naming it;
    * a body that asks for a capture (a spec name as an object key anywhere in the parsed JSON, any route, any
      encoding ``json.loads`` accepts) needs the API key, and is checked as parsed
      (:func:`~vllm_attncap.serving.xargs.check_request_body`: duplicates, names, types, booleans, huge integers)
      before the route's request model sees it, a 400 naming the field when it fails;
    * the response of such a request, when it is an event stream, is held until its first event: a capture error
      there (found once the prompt is tokenized) becomes that HTTP status instead of a 200 stream.

    The body is replayed unchanged to the app."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers

        caller = Caller(not _API_TOKENS or _verify_api_key(Headers(scope=scope)))
        token = _CALLER.set(caller)
        try:
            await self._guard(scope, receive, send, caller)
        finally:
            _CALLER.reset(token)

    async def _guard(self, scope, receive, send, caller: Caller):
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        paths = {path, path.removeprefix(root) if root else path}
        if scope["type"] == "http" and any(p == STATUS_ROUTE or p.startswith(STATUS_ROUTE + "/") for p in paths):
            if not caller.authenticated:
                await _respond(send, 401, "attncap: the capture routes need the API key "
                               "(Authorization: Bearer <key>)", "Authorization", "Unauthorized")
                return
            key = min(paths, key=len)[len(STATUS_ROUTE) + 1:]
            if key and not key.isprintable():
                await _respond(send, 400, f"attncap: key {key!r} has control characters; a key is 1-1024 "
                               "printable characters", "key", "BadRequestError")
                return
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay(chunks, message, receive), send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        check = check_request_body(body) if _needs_parse(body) else None
        if check is not None and check.asks_capture:
            if not caller.authenticated:
                await _respond(send, 401, "attncap: this server has an API key; a request that asks for a capture "
                               "must carry it (Authorization: Bearer <key>), whatever its route", "Authorization",
                               "Unauthorized")
                return
            if check.error is not None:
                field = check.error.field
                await _respond(send, 400, str(check.error) or "attncap spec: refused",
                               f"vllm_xargs.attncap.{field}" if field else "vllm_xargs.attncap", "BadRequestError")
                return
            send = _stream_gate(send, caller)
        await self.app(scope, _replay([body], None, receive), send)


def _replay(bodies, first, receive):
    pending = [{"type": "http.request", "body": b"".join(bodies), "more_body": False}] if bodies else []
    if first is not None:
        pending.append(first)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def _attach(app) -> None:
    global _SERVER_MODE, _API_TOKENS
    _API_TOKENS = _server_api_tokens(app)
    app.include_router(build_router())
    app.add_middleware(CaptureGuard)  # vLLM's build_app attaches plugins before it adds any middleware
    _SERVER_MODE = True
    start_expiry_timer()
    install_inline()  # small captures ride in the responses (serving/inline.py)
    logger.info(
        "vllm_attncap: server mode on: capture specs via vllm_xargs, captures at GET %s "
        "(per-request cap %d bytes, in-flight cap %d bytes; capture requests %s the API key)", ROUTE,
        envs.VLLM_ATTNCAP_MAX_BYTES, envs.VLLM_ATTNCAP_MAX_PENDING_BYTES,
        "need" if _API_TOKENS else "need no (none is set)",
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
    if not getattr(cls.__init__, "__attncap_wrapped__", False):
        cls.__init__ = _wrap_init(cls.__init__)
    return True


def install_frontend_validation() -> bool:
    """Install server mode in an OpenAI API-server process; a no-op anywhere else.

    Called from ``vllm_attncap.engine.plugin.register()``, which vLLM runs in every process
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
