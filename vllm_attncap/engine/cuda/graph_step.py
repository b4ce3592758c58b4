"""Capture inside full decode CUDA graphs: the per-step life of the static buffers.

One :class:`GraphCapture` per worker process (the CUDA builder creates it when the in-graph path is usable):

- ``begin_step(plan, uniform_decode)`` (from the builder's ``build()``): writes finished ring slots into the request
  buffers without waiting, orders this step's kernels after the last copy out of the static outputs (a GPU-side
  wait), takes the plan's rows that the fused kernel can capture (:func:`~.graph_buffers.graph_kind`), assigns
  their request slots, fills the row table and uploads it — with the masks of requests seen for the first time —
  in one pinned non-blocking copy. Steps where nobody captures upload nothing (once the table is off). Returns the
  plan of the remaining rows (captured eagerly by the old path).
- the fused kernel runs in every layer's ``forward`` of a uniform decode step (recorded into the full graph; in
  eager steps launched directly), reading the static buffers.
- ``end_step()`` (the runner's step end): submits this step's rows to the :class:`~.result_ring.ResultRing`
  (side-stream copy into a pinned slot).
- ``finish(req_ids)`` (before vLLM's finished requests are closed): waits only for ring slots holding those
  requests, writes them, frees their slots.
- ``mark()`` / ``flush_through(mark)`` (the runner hook on a step's output): the step's results are in the
  request buffers before its output leaves the worker.

Device specifics come in through ``alloc`` (device buffers), ``uploader`` and ``ring``; the tests drive the whole
cycle with CPU tensors and a fake ring device.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch

from .graph_buffers import BufferLayout, DecodeBuffers, GraphRow, SlotTable, fill_row_table, graph_kind
from ..plan import StepPlan

logger = logging.getLogger("vllm_attncap")

__all__ = ["GraphCapture"]


class GraphCapture:
    """See the module docstring.

    Args:
        layout: buffer sizes.
        alloc: ``alloc(shape, dtype)`` -> zeroed device tensor.
        uploader: ``upload(pairs)`` of ``(numpy array, device tensor)`` (:class:`~.pinned.Uploader`).
        make_ring: ``make_ring(slot_bytes)`` -> :class:`~.result_ring.ResultRing` (made at the first capturing step).
        kinds: what the graph captures (``"stats"``, ``"rows"``); without ``"rows"`` the head-mean rows pass is not
            launched and such requests are captured eagerly (their steps run PIECEWISE).
    """

    def __init__(self, layout: BufferLayout, alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor],
                 uploader: Any, make_ring: Callable[[int], Any], kinds: tuple[str, ...] = ("stats", "rows")) -> None:
        self.layout = layout
        self.kinds = tuple(kinds)
        self.buffers = DecodeBuffers(layout, alloc)
        self.slots = SlotTable(layout)
        self.uploader = uploader
        self._make_ring = make_ring
        self.ring: Any = None
        self._table = np.zeros((layout.max_rows, self.buffers.row_table.shape[1]), dtype=np.int32)
        self._table_on = False  # the device row table has a flag set
        self._step_rows: list[GraphRow] = []
        self._warned_slots = False
        #: steps whose rows the fused kernel captured (diagnostics, tests)
        self.graph_steps = 0

    @property
    def active(self) -> bool:
        """Whether the step being built has rows for the fused kernel (eager steps launch it only then)."""
        return bool(self._step_rows)

    def reset(self) -> None:
        """A new engine in this process: forget the previous engine's requests (their captures are closed by the
        tracker); the buffers, whose addresses graphs may hold, stay."""
        self.flush()
        self.slots = SlotTable(self.layout)
        self._step_rows = []
        self._table[:] = 0
        if self._table_on:
            self.uploader.upload([(self._table, self.buffers.row_table)])
            self._table_on = False

    # ------------------------------------------------------------------ per step
    def begin_step(self, plan: StepPlan | None, uniform_decode: bool) -> StepPlan | None:
        if self.ring is not None:
            self.ring.drain()
            self.ring.before_next_step()
        self._step_rows = []
        if not uniform_decode:
            return plan
        rest, rows, uploads = [], [], []
        if plan is not None:
            for b in plan.batches:
                kind = graph_kind(b.rc.spec, self.layout.num_layers)
                if kind not in self.kinds or len(b.rows) != 1:
                    rest.append(b)
                    continue
                slot, masks = self.slots.assign(b.rc)
                if slot is None:
                    if not self._warned_slots:
                        self._warned_slots = True
                        logger.warning("vllm_attncap: every in-graph capture slot is taken; rows of further "
                                       "requests are captured only in steps that run attention eagerly")
                    rest.append(b)
                    continue
                if masks is not None:
                    lm, hm, sm = masks
                    uploads += [(lm, self.buffers.layer_mask[slot]), (hm, self.buffers.head_mask[slot])]
                    if sm is not None:
                        uploads.append((sm, self.buffers.salient_mask[slot]))
                rows.append(GraphRow(b.batch_row, b.rc, kind, b.rows[0], b.ctx_len, slot))
        if rows or self._table_on:
            fill_row_table(self._table, rows)
            n = self.layout.max_rows
            uploads.append((self._table[:n], self.buffers.row_table[:n]))
            self.uploader.upload(uploads)
            self._table_on = bool(rows)
        self._step_rows = rows
        if plan is None:
            return None
        if not rest:
            return None
        plan.batches = rest
        return plan

    def end_step(self) -> None:
        rows, self._step_rows = self._step_rows, []
        if not rows:
            return
        if self.ring is None:
            self.ring = self._make_ring(self.slot_bytes())
        n = max(r.batch_row for r in rows) + 1
        sources = {}
        if any(r.kind == "stats" for r in rows):
            sources["stats"] = self.buffers.stats[:n]
        widths = [r.ctx_len for r in rows if r.kind == "rows"]
        if widths:  # only the columns some row uses (the buffer is max_model_len wide)
            sources["rows"] = self.buffers.rows[:n, :max(widths)]
        self.ring.submit(rows, sources)
        self.graph_steps += 1

    def slot_bytes(self) -> int:
        b = self.buffers
        return sum(-(-t.numel() * t.element_size() // 16) * 16 for t in (b.stats, b.rows))

    # ------------------------------------------------------------------ request ends
    def finish(self, req_ids) -> None:
        """Write every in-flight result of ``req_ids`` (waiting only for those), then free their slots."""
        ids = set(req_ids)
        if not ids:
            return
        if self.ring is not None:
            self.ring.drain(block_for=ids)
        for rid in ids:
            self.slots.release(rid)

    def mark(self) -> int:
        """The number of result-ring slots submitted so far (see :meth:`flush_through`)."""
        return self.ring.submitted if self.ring is not None else 0

    def flush_through(self, mark: int) -> None:
        """Write every result submitted up to ``mark`` (waiting for those only)."""
        if self.ring is not None and mark > 0:
            self.ring.drain_through(mark)

    def flush(self) -> None:
        """Write everything in flight (waits; engine shutdown and tests)."""
        if self.ring is not None:
            self.ring.drain(block_for=self.ring.pending_requests())
