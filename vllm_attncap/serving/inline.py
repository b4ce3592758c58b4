"""Captures delivered inline: a small capture rides in the response, per choice, as base64 ``.npy`` arrays.

A non-streaming response of ``/v1/completions``, ``/v1/chat/completions`` or the token-in/token-out endpoint
``/inference/v1/generate`` (vLLM's ``ServingTokens``, served with ``--enable-scale-out``) gets, on each choice whose
request asked for a capture, a field ``attncap``:

* when the capture's arrays hold at most ``VLLM_ATTNCAP_INLINE_MAX_BYTES`` bytes (:func:`inline_max_bytes`; default
  1 MiB; 0 turns inline delivery off, so that every capture stays under its key), the capture itself: its record
  (``key``, ``mode``, ``reduce``, ``layers``, ``heads``, ``prompt_len``, ``num_tokens``, ``prompt_start`` for top-k) and ``arrays``, each
  ``{"shape": [...], "dtype": "int32" | "float32", "npy": <base64 of the .npy file>}``: ``attention`` (rows mode),
  ``coverage`` and ``entropy`` (stats mode), ``topk_positions`` and ``topk_probs`` (top-k mode). The capture is
  then deleted from the store, as a ``GET /v1/attncap/{key}`` would;
* otherwise a handle, ``{"key": ..., "inline": false, "nbytes": ..., "reason": ...}``: the capture stays under its
  key for ``GET /v1/attncap/{key}`` as before.

``np.load(io.BytesIO(base64.b64decode(arr["npy"])))`` decodes an array (:func:`decode_array`); the arrays are those
``generate_with_attentions`` returns for the same request. Streaming responses are left as they are (fetch by key).

Also here: :func:`prepare_sampling_params`, which the request validation calls after admitting a spec, so that a
top-k request with ``prompt_start`` before the end of its prompt skips reading the prefix cache (the rows of prompt
tokens need their queries computed).

This module only wraps the three handlers' methods (:func:`install`) and reads captures through
:mod:`vllm_attncap.store` (its TP/PP-combining readers); it adds no route.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import io
import logging
import math
import time
from typing import Any

import numpy as np

from .. import envs
from ..spec import CaptureSpec
from ..store import (STATUS_ERROR, STATUS_OPEN, CaptureClaimed, CaptureMeta, CaptureRecord, list_captures,
                     read_capture)

logger = logging.getLogger("vllm_attncap")

__all__ = ["FIELD", "inline_max_bytes", "install", "inline_field", "decode_array", "encode_array",
           "prepare_sampling_params", "trimmed_nbytes"]

#: The per-choice response field.
FIELD = "attncap"


def inline_max_bytes() -> int:
    """Largest capture (bytes of its arrays) returned inline (``VLLM_ATTNCAP_INLINE_MAX_BYTES``, vllm_attncap.envs);
    larger ones stay under their key."""
    return int(envs.VLLM_ATTNCAP_INLINE_MAX_BYTES)

#: How long a response waits for the worker to close a capture whose token count it does not know.
CLOSE_WAIT_S = 3.0


def encode_array(arr: np.ndarray) -> dict[str, Any]:
    """``{"shape", "dtype", "npy"}``: the array as a base64 ``.npy`` file (little-endian)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")), allow_pickle=False)
    return {"shape": list(arr.shape), "dtype": str(arr.dtype), "npy": base64.b64encode(buf.getvalue()).decode("ascii")}


def decode_array(field: dict[str, Any]) -> np.ndarray:
    """The array of one :func:`encode_array` entry."""
    return np.load(io.BytesIO(base64.b64decode(field["npy"])), allow_pickle=False)


def trimmed_nbytes(meta: CaptureMeta, num_tokens: int) -> int:
    """Bytes of a record's arrays once cut to ``num_tokens`` generated tokens."""
    if meta.status == STATUS_ERROR:
        return 0
    t = max(0, min(int(num_tokens), meta.max_tokens))
    return 4 * math.prod(dataclasses.replace(meta, max_tokens=t).shape)


def _arrays(rec: CaptureRecord) -> dict[str, Any]:
    mode = rec.meta.mode
    if mode == "topk":
        return {"topk_positions": encode_array(rec.topk_positions), "topk_probs": encode_array(rec.topk_probs)}
    if mode == "stats":
        return {"coverage": encode_array(np.ascontiguousarray(rec.coverage)),
                "entropy": encode_array(np.ascontiguousarray(rec.entropy))}
    return {"attention": encode_array(rec.array)}


def inline_field(rec: CaptureRecord) -> dict[str, Any]:
    """The ``attncap`` field of one choice from its record (see the module docstring)."""
    meta = rec.meta
    if meta.status == STATUS_ERROR:
        return {"key": meta.key, "error": meta.error}
    body: dict[str, Any] = {
        "key": meta.key, "mode": meta.mode, "reduce": meta.reduce, "layers": list(meta.layers),
        "heads": list(meta.heads), "prompt_len": meta.prompt_len, "num_tokens": rec.num_tokens,
    }
    if meta.mode == "topk":
        body["topk"], body["prompt_start"] = meta.topk, meta.prompt_start
    if meta.mode == "stats":
        body["history_len"] = meta.history_len
    body["arrays"] = _arrays(rec)
    return body


def _handle(key: str, nbytes: int | None, reason: str) -> dict[str, Any]:
    return {"key": key, "inline": False, "nbytes": nbytes, "reason": reason}


def _spec_key(extra: Any) -> tuple[bool, str | None]:
    """(asks for a capture, the key it chose) from a request's extra args / vllm_xargs."""
    from .xargs import SpecError, spec_from_xargs

    try:
        spec, _ = spec_from_xargs(extra)
    except SpecError:
        return False, None
    if spec is None:
        return False, None
    key = spec.get("key")
    return True, key if isinstance(key, str) else None


def _deliver(key: str, counts: list[int | None], limit: int) -> list[dict[str, Any]]:
    """The fields of the records under ``key`` (one per completion, in order), inline when they fit."""
    if limit <= 0:  # off: a handle at once (no waiting), the capture stays for GET
        return [_handle(key, None, "inline delivery is off (VLLM_ATTNCAP_INLINE_MAX_BYTES=0): fetch it by key")] \
            * len(counts)
    deadline = time.monotonic() + CLOSE_WAIT_S
    while True:
        metas = list_captures(key)
        unknown = any(c is None for c in counts)
        if metas and (not unknown or all(m.status != STATUS_OPEN for m in metas)):
            break
        if time.monotonic() > deadline:
            return [_handle(key, None, "the capture is not closed yet: fetch it by key")] * len(counts)
        time.sleep(0.02)
    if len(metas) < len(counts):
        counts = counts[: len(metas)] or counts
    tokens = []
    for i, m in enumerate(metas):
        c = counts[i] if i < len(counts) else counts[-1]
        tokens.append(c if c is not None else max(0, m.rows_written - m.prompt_rows))
    total = sum(trimmed_nbytes(m, t) for m, t in zip(metas, tokens))
    if total > limit:
        return [_handle(key, total, f"{total} bytes > the inline limit of {limit} (VLLM_ATTNCAP_INLINE_MAX_BYTES): "
                        "fetch it by key")] * len(metas)
    try:
        records = read_capture(key, tokens, wait_s=0.0)
    except (CaptureClaimed, LookupError) as e:
        return [_handle(key, total, f"not readable inline ({e})")] * len(metas)
    try:
        from .admission import release

        release(key)
    except ImportError:  # pragma: no cover
        pass
    return [inline_field(r) for r in records]


async def _fields(key: str, counts: list[int | None]) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, _deliver, key, counts, inline_max_bytes())
    except Exception as e:  # never fail the response because of its capture
        logger.warning("vllm_attncap: inline delivery of %r failed: %s", key, e)
        return [_handle(key, None, f"inline delivery failed: {e}")] * len(counts)


def _set(choice: Any, value: dict[str, Any]) -> None:
    try:
        setattr(choice, FIELD, value)
    except (AttributeError, ValueError, TypeError):  # a model that forbids extra fields
        logger.warning("vllm_attncap: cannot add the %r field to %s", FIELD, type(choice).__name__)


# -- the three handlers ---------------------------------------------------------------------------------------------
async def _completion_fields(request: Any, response: Any) -> None:
    asks, key = _spec_key(getattr(request, "vllm_xargs", None))
    if not asks or not getattr(response, "choices", None):
        return
    n = int(getattr(request, "n", 1) or 1)
    choices = sorted(response.choices, key=lambda c: c.index)
    n_prompts = max(1, len(choices) // n)
    usage = getattr(response, "usage", None)
    single = len(choices) == 1 and usage is not None
    if key is not None:  # one caller key holds every prompt's records, in prompt order
        fields = await _fields(key, [usage.completion_tokens if single else None] * len(choices))
        for c, f in zip(choices, fields):
            _set(c, f)
        return
    for p in range(n_prompts):
        group = choices[p * n:(p + 1) * n]
        count = usage.completion_tokens if single else None
        fields = await _fields(f"{response.id}-{p}", [count] * len(group))
        for c, f in zip(group, fields):
            _set(c, f)


async def _chat_fields(request: Any, response: Any) -> None:
    asks, key = _spec_key(getattr(request, "vllm_xargs", None))
    if not asks or not getattr(response, "choices", None):
        return
    choices = sorted(response.choices, key=lambda c: c.index)
    usage = getattr(response, "usage", None)
    count = usage.completion_tokens if len(choices) == 1 and usage is not None else None
    fields = await _fields(key or response.id, [count] * len(choices))
    for c, f in zip(choices, fields):
        _set(c, f)


_TOKEN_MODELS: dict[str, Any] = {}


def _token_models():
    """Subclasses of the token endpoint's response models that carry the field (its models forbid extras; a
    subclass instance still passes the router's ``isinstance`` check and serialises the field)."""
    if not _TOKEN_MODELS:
        from pydantic import ConfigDict
        from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateResponse, GenerateResponseChoice

        class AttncapGenerateChoice(GenerateResponseChoice):
            model_config = ConfigDict(extra="allow")
            attncap: dict[str, Any] | None = None

        class AttncapGenerateResponse(GenerateResponse):
            choices: list[AttncapGenerateChoice]

        _TOKEN_MODELS.update(choice=AttncapGenerateChoice, response=AttncapGenerateResponse, base=GenerateResponse)
    return _TOKEN_MODELS


async def _token_response(request: Any, response: Any) -> Any:
    sp = getattr(request, "sampling_params", None)
    asks, key = _spec_key(getattr(sp, "extra_args", None))
    if not asks or not getattr(response, "choices", None):
        return response
    models = _token_models()
    if not isinstance(response, models["base"]):
        return response
    choices = sorted(response.choices, key=lambda c: c.index)
    counts = [len(c.token_ids) if c.token_ids is not None else None for c in choices]
    fields = await _fields(key or response.request_id, counts)
    data = response.model_dump()
    by_index = {c.index: f for c, f in zip(choices, fields)}
    for c in data["choices"]:
        c[FIELD] = by_index.get(c["index"])
    return models["response"].model_validate(data)


def _wrap(orig, add):
    @functools.wraps(orig)
    async def wrapped(self, request, *args, **kwargs):
        response = await orig(self, request, *args, **kwargs)
        if response is None or not hasattr(response, "choices"):
            return response  # errors and streams pass through
        try:
            out = await add(request, response)
        except Exception as e:  # never fail a response because of its capture
            logger.warning("vllm_attncap: inline capture delivery failed: %s", e)
            return response
        return response if out is None else out

    wrapped.__attncap_inline__ = True
    return wrapped


def install() -> list[str]:
    """Wrap the completions, chat and token-endpoint handlers (those this vLLM has); returns their names."""
    done = []
    targets = [
        ("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion", "create_completion",
         _completion_fields),
        ("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat", "create_chat_completion",
         _chat_fields),
        ("vllm.entrypoints.scale_out.token_in_token_out.serving", "ServingTokens", "serve_tokens", _token_response),
    ]
    import importlib

    for module, cls_name, method, add in targets:
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError):
            continue
        orig = getattr(cls, method, None)
        if orig is None or getattr(orig, "__attncap_inline__", False):
            continue
        setattr(cls, method, _wrap(orig, add))
        done.append(f"{cls_name}.{method}")
    return done


def prepare_sampling_params(sp: Any, prompt_len: int) -> None:
    """After admission: a top-k request whose ``prompt_start`` lies before the end of its prompt skips reading the
    prefix cache (its prompt rows need their queries computed; docs/capture.md, "Top-k mode")."""
    raw = (getattr(sp, "extra_args", None) or {}).get("attncap")
    if not isinstance(raw, dict) or raw.get("topk") is None or raw.get("prompt_start") is None:
        return
    try:
        spec = CaptureSpec.from_any(raw)
    except ValueError:
        return
    if spec.prompt_start is not None and spec.prompt_start < prompt_len:
        sp.skip_reading_prefix_cache = True
