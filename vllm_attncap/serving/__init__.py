"""Server mode: capture specs through vLLM's OpenAI-compatible API, captures back by id.

``vllm serve MODEL --attention-backend attncap`` works with the stock server. The
general plugin's ``register()`` runs in the API-server process too, and there
:func:`~vllm_attncap.serving.install.install_frontend_validation` adds two things:

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
   exceed ``VLLM_ATTNCAP_MAX_PENDING_BYTES`` in total (HTTP 503 then: retry later;
   a capture bigger than that cap as a whole is a 400). An ASGI middleware in
   front of every route (:class:`~vllm_attncap.serving.install.CaptureGuard`)
   requires the API key, when the server has one, for anything that creates,
   reads or deletes a capture, checks the spec as the parsed body holds it
   (duplicates, escapes, encodings, booleans, huge integers), and turns a capture
   error at the start of an event stream into that HTTP status.

2. **Retrieval routes** (added to the FastAPI app by wrapping
   ``attach_endpoint_plugins``, which ``build_app`` calls once after the core
   routes; no ``VLLM_PLUGINS`` allow-listing is needed)::

       GET    /v1/attncap/{key}   the capture as JSON, deleted once read (delivered once)
       DELETE /v1/attncap/{key}   drop it unread
       GET    /v1/attncap         store and admission state

   The key is the spec's ``key`` when the request set one, else the server's
   request id: ``<response id>-<prompt index>`` for ``/v1/completions`` (the
   response id alone also works for a single prompt) and ``<response id>`` for
   ``/v1/chat/completions``, verbatim. The response id is the ``id`` field of the
   completion response (``X-Request-Id`` header, when sent, replaces its random
   part). Keys are matched exactly; captures live in the server's private
   namespace of the store (:mod:`vllm_attncap.store`).

Outside an API-server process (``LLM`` offline, EngineCore, workers) nothing is
patched and nothing changes. docs/server.md shows requests and responses.

Modules: :mod:`~.xargs` (the spec in ``vllm_xargs``), :mod:`~.admission`
(validation, caps, reservations), :mod:`~.routes` (retrieval), :mod:`~.install`
(the hooks into vLLM's server).
"""

from __future__ import annotations

from .admission import PendingCapError, admit_request, pending_capture_bytes
from .install import install_frontend_validation
from .routes import ROUTE, STATUS_ROUTE, build_router, capture_payload
from .xargs import FLAT_PREFIX, SPEC_XARG, SpecError, spec_from_xargs

__all__ = [
    "SPEC_XARG",
    "FLAT_PREFIX",
    "ROUTE",
    "STATUS_ROUTE",
    "PendingCapError",
    "SpecError",
    "admit_request",
    "build_router",
    "capture_payload",
    "install_frontend_validation",
    "pending_capture_bytes",
    "spec_from_xargs",
]
