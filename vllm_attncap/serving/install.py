"""Server mode's hooks into vLLM's OpenAI API server: request validation and the retrieval routes.

1. **Request validation** wraps ``InputProcessor.process_inputs``, which every completion/chat request passes
   through after tokenization, to run :func:`~vllm_attncap.serving.admission.admit_request`. A bad spec raises
   :class:`vllm.exceptions.VLLMValidationError`, which the server answers with HTTP 400 naming the field
   (``error.param`` is ``vllm_xargs.attncap.<field>``); the engine never sees the request and keeps serving.
2. **Retrieval routes** (:mod:`~vllm_attncap.serving.routes`) are added to the FastAPI app by wrapping
   ``attach_endpoint_plugins``, which ``build_app`` calls once after the core routes (no ``VLLM_PLUGINS``
   allow-listing is needed).

Outside an API-server process (``LLM`` offline, EngineCore, workers) nothing is patched and nothing changes.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from http import HTTPStatus

from ..engine.parallel import global_counts
from .. import envs
from .admission import PendingCapError, admit_request
from .inline import install as install_inline
from .inline import prepare_sampling_params
from .routes import ROUTE, build_router
from .xargs import SpecError, check_request_body

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


def _wrap_process_inputs(orig):
    @functools.wraps(orig)
    def process_inputs(self, request_id, *args, **kwargs):
        out = orig(self, request_id, *args, **kwargs)
        if not _SERVER_MODE:
            return out
        request = out[-1] if isinstance(out, tuple) else out  # older vLLM returned (prompt_str, request)
        sp = getattr(request, "sampling_params", None)
        if sp is None or not sp.extra_args:
            return out
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
            )
        except (SpecError, PendingCapError) as e:
            raise _as_http_error(e) from None
        if new_args is not None:
            sp.extra_args = new_args  # a fresh dict: the caller's params stay untouched
            prepare_sampling_params(sp, len(request.prompt_token_ids or []))  # top-k prompt rows: no cache reads
        return out

    process_inputs.__attncap_wrapped__ = True
    return process_inputs


#: Paths whose JSON bodies :class:`XargsGuard` checks.
GUARDED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")


class XargsGuard:
    """ASGI middleware: the raw-body checks of :func:`~vllm_attncap.serving.xargs.check_request_body` (duplicate
    ``attncap*`` keys, booleans in flat fields), which the server's request model would hide, as a 400 naming the
    field. Only POSTs to :data:`GUARDED_PATHS` whose body mentions ``attncap`` are parsed; the body is replayed
    unchanged to the app."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in GUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([], message, receive), send)
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        err = check_request_body(body) if b"attncap" in body else None
        if err is not None:
            field = getattr(err, "field", None)
            payload = json.dumps({"error": {
                "message": str(err), "type": "BadRequestError", "code": 400,
                "param": f"vllm_xargs.attncap.{field}" if field else "vllm_xargs.attncap",
            }}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        await self.app(scope, _replay([body], None, receive), send)


def _replay(bodies, first, receive):
    pending = [{"type": "http.request", "body": b, "more_body": False} for b in bodies]
    if first is not None:
        pending.append(first)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def _attach(app) -> None:
    global _SERVER_MODE
    app.include_router(build_router())
    try:
        app.add_middleware(XargsGuard)
    except RuntimeError as e:  # the app already started (not the case with vLLM's build_app)
        logger.warning("vllm_attncap: raw-body checks of vllm_xargs are off: %s", e)
    _SERVER_MODE = True
    install_inline()  # small captures ride in the responses (serving/inline.py)
    logger.info(
        "vllm_attncap: server mode on: capture specs via vllm_xargs, captures at GET %s "
        "(per-request cap %d bytes, in-flight cap %d bytes)", ROUTE, envs.VLLM_ATTNCAP_MAX_BYTES,
        envs.VLLM_ATTNCAP_MAX_PENDING_BYTES,
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
