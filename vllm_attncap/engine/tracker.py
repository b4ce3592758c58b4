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

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..store.parts import make_part_meta, part_req_id
from ..spec import CaptureSpec, ResolvedSpec, resolve_spec
from ..store import CaptureMeta, CaptureWriter, write_error
from .parallel import RankFacts, rank_share

logger = logging.getLogger("vllm_attncap")

if TYPE_CHECKING:
    import torch

    from .elide import ElisionPlan

__all__ = ["ModelShape", "RequestCache", "RequestCapture", "CaptureTracker", "get_tracker"]


@dataclass(frozen=True)
class ModelShape:
    """What the worker knows about the model for validating specs: the whole model's layer and query-head counts
    (every rank validates against the same), and under TP/PP this worker's place (``ranks``)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    max_model_len: int
    ranks: RankFacts | None = None


@dataclass
class RequestCache:
    """What the capture paths keep for one request between steps; dropped (:meth:`clear`) when it finishes.

    The fields are the torch path's (:mod:`vllm_attncap.engine.capture`), which both rooms use. A room that keeps
    more subclasses this and installs the subclass with :meth:`CaptureTracker.set_cache_type` (the CPU room:
    ``engine.cpu.capture.CpuRequestCache``, the kernel's step-invariant tables).

    Attributes:
        device: the device of the tensors below (None: not made yet).
        heads: this rank's selected heads as indices of its own heads; salient: the spec's salient positions
            (None: none).
        elision: the long-history elision plan (None: not asked for, or the history fits); ``elision_planned``:
            whether it was made.
        elided_salient: the salient positions after elision, on ``elided_salient.device``.
    """

    device: torch.device | None = None
    heads: torch.Tensor | None = None
    salient: torch.Tensor | None = None
    elision: ElisionPlan | None = None
    elision_planned: bool = False
    elided_salient: torch.Tensor | None = None

    def clear(self) -> None:
        """Forget everything (drops views of the request's mapped array before it is unmapped)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)


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
    cache: RequestCache = field(default_factory=RequestCache)  # what the capture paths keep between steps
    # under TP/PP (engine.parallel): this rank's selected heads as indices of its own heads, its share of the
    # selected heads (weights its head mean), and whether statistics of a mean go to the host as partial rows
    local_heads: tuple[int, ...] = ()
    head_share: float = 1.0
    stats_on_host: bool = False
    sharded: bool = False
    #: rows some step has planned so far (0..rows_planned-1): a step that starts past them lost rows
    rows_planned: int = 0

    def __post_init__(self) -> None:
        if not self.sharded:
            self.local_heads = tuple(self.resolved.heads)

    @property
    def spec(self) -> CaptureSpec:
        return self.resolved.spec

    @property
    def row_origin(self) -> int:
        """Position of the query of output row 0 (:attr:`ResolvedSpec.row_origin`)."""
        return self.resolved.row_origin


class CaptureTracker:
    """Per-process registry of captured requests (see module docstring)."""

    def __init__(self) -> None:
        self.shape: ModelShape | None = None
        #: this worker's place in the TP x PP grid (None or a single rank: records without parts)
        self.ranks: RankFacts | None = None
        self.active: dict[str, RequestCapture] = {}
        self.refused: set[str] = set()
        #: rows captured again after preemption/recompute (diagnostics, tests)
        self.recomputed_rows = 0
        #: layers whose keys the backend keeps (None: all); a spec asking for another layer is refused
        self.capturable_layers: frozenset[int] | None = None
        #: how the capturable layers were set, for the refusal message
        self.capturable_setting: str = ""
        #: the per-request cache of the backend in use (:class:`RequestCache` or a room's subclass)
        self.cache_type: type[RequestCache] = RequestCache

    def set_cache_type(self, cache_type: type[RequestCache]) -> None:
        """The :class:`RequestCache` subclass of the backend in use (each new request's ``cache``)."""
        self.cache_type = cache_type

    def set_capturable_layers(self, layers: frozenset[int] | None, setting: str = "") -> None:
        self.capturable_layers = layers
        self.capturable_setting = setting

    def set_model_shape(self, shape: ModelShape) -> None:
        self.shape = shape
        self.ranks = shape.ranks if shape.ranks is not None and shape.ranks.count > 1 else None

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
            if self.capturable_layers is not None and not set(resolved.layers) <= self.capturable_layers:
                missing = sorted(set(resolved.layers) - self.capturable_layers)
                raise ValueError(
                    f"attncap: field 'layers': layer(s) {missing} cannot be captured by this engine: "
                    f"{self.capturable_setting} keeps the keys of layers {sorted(self.capturable_layers)} only "
                    f"(allowed values: a subset of those)"
                )
            meta = CaptureMeta(
                key,
                req_id,
                mode=resolved.capture_mode,
                reduce=resolved.spec.reduce,
                layers=list(resolved.layers),
                heads=list(resolved.heads),
                prompt_len=prompt_len,
                max_tokens=resolved.max_tokens,
                history_len=resolved.history_len,
                sink=resolved.spec.sink,
                salient=list(resolved.spec.salient),
                spec=resolved.spec.to_dict(),
                topk=resolved.spec.topk or 0,
                prompt_start=resolved.prompt_start,
            )
            share = None
            if self.ranks is not None:  # one part per rank (vllm_attncap.store.parts)
                share = rank_share(self.ranks, resolved)
                if resolved.capture_mode == "topk" and resolved.spec.reduce != "none" and \
                        0 < len(share.heads) < len(resolved.heads):
                    raise ValueError(
                        f"attncap spec field 'reduce': the top-k of a head mean needs every selected head on one "
                        f"rank; at tensor_parallel_size={self.ranks.tp_size} the selected heads span ranks (allowed: "
                        f"reduce='none', or heads of one rank's slice)"
                    )
                meta = make_part_meta(
                    meta, self.ranks.index, self.ranks.count, layers=list(share.layers),
                    layer_pos=list(share.layer_pos), heads=list(share.heads), head_pos=list(share.head_pos),
                    stats_history=_stats_history(resolved) if share.stats_on_host and not share.empty else None,
                )
            writer = CaptureWriter(meta)
        except (ValueError, OSError) as e:
            self.refused.add(req_id)
            logger.warning("vllm_attncap: capture refused for request %s: %s", req_id, e)
            try:
                rid = req_id if self.ranks is None else part_req_id(req_id, self.ranks.index, self.ranks.count)
                write_error(key, rid, str(e))  # every refusal leaves a record: the caller and admission see it
            except OSError as e2:
                logger.error("vllm_attncap: could not record the refusal of request %s: %s", req_id, e2)
            return None
        layers = resolved.layers if share is None else share.layers
        slot = {l: (0 if resolved.spec.reduce == "layer_head_mean" else i) for i, l in enumerate(layers)}
        if share is not None and share.empty:
            slot = {}
        first, last = (min(layers), max(layers)) if slot else (-1, -1)
        rc = RequestCapture(req_id, resolved, writer, slot, first, last, cache=self.cache_type())
        if share is not None:
            rc.sharded, rc.local_heads, rc.head_share = True, share.local_heads, share.head_share
            rc.stats_on_host = share.stats_on_host
        self.active[req_id] = rc
        return rc

    def finish(self, req_ids) -> None:
        """Close buffers of requests vLLM reports finished or aborted."""
        for rid in req_ids:
            rc = self.active.pop(rid, None)
            if rc is not None:
                rc.cache.clear()  # drops views of the mapped array (CPU kernel tables) before it is unmapped
                rc.writer.close()
            self.refused.discard(rid)

    def fail(self, req_id: str, message: str) -> None:
        """End a live request's capture with an error (the request itself keeps running): its buffer is closed and
        replaced by an error record naming ``message``, so the caller sees why instead of rows silently missing."""
        rc = self.active.pop(req_id, None)
        if rc is None:
            return
        self.refused.add(req_id)
        logger.error("vllm_attncap: capture of request %s failed: %s", req_id, message)
        rc.cache.clear()
        key, rid = rc.writer.meta.key, rc.writer.meta.req_id
        rc.writer.close(status="error")
        try:
            write_error(key, rid, message)
        except OSError as e:
            logger.error("vllm_attncap: could not record the failure of request %s: %s", req_id, e)

    def close_all(self) -> None:
        self.finish(list(self.active))


def _stats_history(resolved: ResolvedSpec) -> tuple[int, int, list[int]]:
    """(width, sink, salient) of the history a rank's partial rows cover: after long-history elision when the
    spec asks for it (the elision plan depends only on the spec and the prompt, so every rank makes the same)."""
    spec = resolved.spec
    if spec.n_max is not None:
        from .elide import plan_elision

        plan = plan_elision(resolved.history_len, sink=spec.sink, salient=spec.salient, n_max=spec.n_max,
                            window=spec.elision_window)
        if not plan.is_identity:
            return plan.out_history_len, spec.sink, list(plan.salient)
    return resolved.history_len, spec.sink, list(spec.salient)


_TRACKER: CaptureTracker | None = None


def get_tracker() -> CaptureTracker:
    global _TRACKER
    if _TRACKER is None:
        _TRACKER = CaptureTracker()
    return _TRACKER
