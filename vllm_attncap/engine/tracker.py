"""Worker-side bookkeeping of captured requests.

One :class:`CaptureTracker` per worker process maps vLLM's internal request
ids to a :class:`RequestCapture`: the request's resolved spec and its output
buffer. It is created lazily the first time a request with an ``attncap`` spec
is scheduled, and closed when vLLM reports the request finished or aborted.

A spec that fails validation here (a caller that bypassed the frontend checks)
never fails the engine: the request runs without capture and the error is
recorded for the caller (:func:`vllm_attncap.store.read_capture` returns it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..spec import CaptureSpec, ResolvedSpec, resolve_spec
from ..store import CaptureMeta, CaptureWriter, write_error

logger = logging.getLogger("vllm_attncap")

__all__ = ["ModelShape", "RequestCapture", "CaptureTracker", "get_tracker"]


@dataclass(frozen=True)
class ModelShape:
    """What the worker knows about the model for validating specs."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    max_model_len: int


@dataclass
class RequestCapture:
    """One captured request in the worker."""

    req_id: str
    resolved: ResolvedSpec
    writer: CaptureWriter
    # model layer index -> output layer slot (0 for layer_head_mean)
    layer_slot: dict[int, int] = field(default_factory=dict)
    first_layer: int = 0
    last_layer: int = 0
    cache: dict[str, Any] = field(default_factory=dict)  # per-device tensors (heads, salient)

    @property
    def spec(self) -> CaptureSpec:
        return self.resolved.spec


class CaptureTracker:
    """Per-process registry of captured requests (see module docstring)."""

    def __init__(self) -> None:
        self.shape: ModelShape | None = None
        self.active: dict[str, RequestCapture] = {}
        self.refused: set[str] = set()
        #: rows captured again after preemption/recompute (diagnostics, tests)
        self.recomputed_rows = 0

    def set_model_shape(self, shape: ModelShape) -> None:
        self.shape = shape

    def reset(self) -> None:
        """Forget every request: called when a new engine starts in this process.

        Captures of a previous engine in the same process (e.g. an in-process
        ``LLM`` that was deleted) can never be reported finished; their buffers
        are closed here instead of lingering.
        """
        for rc in self.active.values():
            rc.writer.close(status="abandoned")
        self.active.clear()
        self.refused.clear()

    def lookup(self, req_id: str, raw_spec: Any, prompt_len: int, max_tokens: int | None) -> RequestCapture | None:
        """The request's capture, creating it on first sight; None if refused."""
        rc = self.active.get(req_id)
        if rc is not None:
            return rc
        if req_id in self.refused:
            return None
        key = req_id
        if isinstance(raw_spec, dict) and isinstance(raw_spec.get("key"), str):
            key = raw_spec["key"]
        try:
            if self.shape is None:
                raise ValueError("attncap: the worker has no model shape (the attncap backend did not initialise)")
            limit = self.shape.max_model_len - prompt_len
            t_max = limit if max_tokens is None else min(int(max_tokens), limit)
            resolved = resolve_spec(
                raw_spec,
                num_layers=self.shape.num_layers,
                num_heads=self.shape.num_heads,
                prompt_len=prompt_len,
                max_tokens=max(1, t_max),
            )
            meta = CaptureMeta(
                key,
                req_id,
                mode=resolved.spec.mode,
                reduce=resolved.spec.reduce,
                layers=list(resolved.layers),
                heads=list(resolved.heads),
                prompt_len=prompt_len,
                max_tokens=resolved.max_tokens,
                history_len=resolved.history_len,
                sink=resolved.spec.sink,
                salient=list(resolved.spec.salient),
                spec=resolved.spec.to_dict(),
            )
            writer = CaptureWriter(meta)
        except (ValueError, OSError) as e:
            self.refused.add(req_id)
            logger.warning("vllm_attncap: capture refused for request %s: %s", req_id, e)
            try:
                write_error(key, req_id, str(e))  # every refusal leaves a record: the caller and admission see it
            except OSError as e2:
                logger.error("vllm_attncap: could not record the refusal of request %s: %s", req_id, e2)
            return None
        layers = resolved.layers
        slot = {l: (0 if resolved.spec.reduce == "layer_head_mean" else i) for i, l in enumerate(layers)}
        rc = RequestCapture(req_id, resolved, writer, slot, min(layers), max(layers))
        self.active[req_id] = rc
        return rc

    def finish(self, req_ids) -> None:
        """Close buffers of requests vLLM reports finished or aborted."""
        for rid in req_ids:
            rc = self.active.pop(rid, None)
            if rc is not None:
                rc.writer.close()
            self.refused.discard(rid)

    def close_all(self) -> None:
        self.finish(list(self.active))


_TRACKER: CaptureTracker | None = None


def get_tracker() -> CaptureTracker:
    global _TRACKER
    if _TRACKER is None:
        _TRACKER = CaptureTracker()
    return _TRACKER
