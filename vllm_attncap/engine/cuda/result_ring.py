"""Results of the full-graph capture: device buffers -> a persistent pinned ring -> request buffers, never waiting.

After each step whose rows the fused kernel captured, :meth:`ResultRing.submit` takes a free slot of the ring and
asks the injected device layer to copy the rows' results into it on a side stream, ordered after the step (an
event on the compute stream). The next step's kernels must not overwrite the static outputs before that copy has
read them: the device layer makes the compute stream wait for the copy's event on the GPU (``gpu_wait``), so the
host never blocks for it. :meth:`drain` (called from the next ``build()``) writes every finished slot, oldest
first, into the requests' buffers and stops at the first unfinished one. The host blocks only when

- the ring is full (``submit`` waits for the oldest slot), or
- a request finishes while one of its slots is still in flight (``drain(block_for={req_id})``): its buffer is
  closed right after, so its rows must be written first, or
- a step's output is about to leave the worker (``drain_through(seq)``, from the runner hook on the step's
  output): the caller may read the buffers as soon as it sees the tokens, so that step's rows (and earlier ones)
  are written first. vLLM waits for the step's sampled tokens at that point anyway, and the copy is queued right
  behind the step's forward, so this wait is short; later steps' copies are not waited for.

The device layer (:class:`DeviceOps`) is injected: on CUDA, pinned host tensors, events and a side stream
(:class:`~vllm_attncap.engine.cuda.pinned.CudaRingOps`); in the tests, a fake whose copies complete when the
test says so.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from .graph_buffers import GraphRow

__all__ = ["DeviceOps", "ResultRing", "write_graph_rows"]


class DeviceOps(Protocol):
    def host_buffer(self, nbytes: int) -> torch.Tensor: ...

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        """Queue ``dst.copy_(src)`` for each pair after the compute stream's work; return a completion event."""

    def done(self, event: Any) -> bool: ...

    def wait(self, event: Any) -> None:
        """Block the host until ``event`` completed."""

    def gpu_wait(self, event: Any) -> None:
        """Make the compute stream wait for ``event`` (no host wait)."""


@dataclass
class _Slot:
    host: torch.Tensor  # uint8 bytes
    event: Any = None
    rows: list[GraphRow] = field(default_factory=list)
    views: dict[str, torch.Tensor] = field(default_factory=dict)
    req_ids: frozenset[str] = frozenset()
    seq: int = 0


class ResultRing:
    """A ring of ``n_slots`` pinned host slots of ``slot_bytes`` each (see the module docstring).

    Args:
        ops: the device layer.
        n_slots: slots in flight at most (>= 2).
        slot_bytes: bytes of one slot: the largest step result (``stats`` rows + head-mean rows of ``max_num_seqs``).
        write: ``write(rows, views)`` stores one slot's results into the request buffers (default
            :func:`write_graph_rows`).
    """

    def __init__(self, ops: DeviceOps, n_slots: int, slot_bytes: int,
                 write: Callable[[list[GraphRow], dict[str, torch.Tensor]], None] | None = None) -> None:
        if n_slots < 2:
            raise ValueError(f"ResultRing: n_slots must be >= 2, got {n_slots}")
        self.ops = ops
        self.slot_bytes = int(slot_bytes)
        self._free = [_Slot(ops.host_buffer(self.slot_bytes)) for _ in range(n_slots)]
        self._busy: deque[_Slot] = deque()
        self._write = write or write_graph_rows
        self.last_event: Any = None
        #: slots submitted so far (a slot's ``seq`` is its submission number, from 1)
        self.submitted = 0
        #: times the host had to wait (ring full, or a finishing request's slot in flight)
        self.blocking_waits = 0

    @property
    def in_flight(self) -> int:
        return len(self._busy)

    def pending_requests(self) -> set[str]:
        out: set[str] = set()
        for s in self._busy:
            out |= s.req_ids
        return out

    def submit(self, rows: list[GraphRow], sources: dict[str, torch.Tensor]) -> None:
        """Copy ``sources`` (name -> contiguous device tensor) into a ring slot; ``rows`` say whose they are."""
        if not rows:
            return
        if not self._free:
            self.drain()
        if not self._free:  # full: wait for the oldest (the only blocking path besides finishing requests)
            self.blocking_waits += 1
            self.ops.wait(self._busy[0].event)
            self.drain()
        slot = self._free.pop()
        views, pairs, off = {}, [], 0
        for name, src in sources.items():
            nbytes = src.numel() * src.element_size()
            if off + nbytes > self.slot_bytes:
                raise ValueError(f"ResultRing.submit: {off + nbytes} bytes exceed the slot size {self.slot_bytes}")
            dst = slot.host[off:off + nbytes].view(src.dtype).view(src.shape)  # contiguous even if src is not
            views[name] = dst
            pairs.append((src, dst))
            off += -(-nbytes // 16) * 16  # keep every view 16-byte aligned
        slot.event = self.ops.copy(pairs)
        slot.rows, slot.views = rows, views
        slot.req_ids = frozenset(r.rc.req_id for r in rows)
        self.submitted += 1
        slot.seq = self.submitted
        self._busy.append(slot)
        self.last_event = slot.event

    def before_next_step(self) -> None:
        """Order the next step's kernels after the last copy out of the static buffers (a GPU-side wait)."""
        if self.last_event is not None:
            self.ops.gpu_wait(self.last_event)
            self.last_event = None

    def drain_through(self, seq: int) -> int:
        """Write every slot submitted up to number ``seq``, waiting for them if needed (a step's output is about
        to leave the worker: its rows must be in the request buffers first). Later slots are not waited for."""
        last = None
        for s in self._busy:
            if s.seq <= seq:
                last = s
        if last is not None and not self.ops.done(last.event):
            self.blocking_waits += 1
            self.ops.wait(last.event)
        return self.drain()

    def drain(self, block_for: set[str] | frozenset[str] | None = None) -> int:
        """Write finished slots (oldest first); wait only for slots holding rows of ``block_for``. Returns slots written."""
        if block_for:
            last = -1
            for i, s in enumerate(self._busy):
                if s.req_ids & block_for:
                    last = i
            if last >= 0:
                ev = self._busy[last].event
                if not self.ops.done(ev):
                    self.blocking_waits += 1
                    self.ops.wait(ev)  # completes every earlier slot too (one copy stream, in order)
        written = 0
        while self._busy and self.ops.done(self._busy[0].event):
            slot = self._busy.popleft()
            try:
                self._write(slot.rows, slot.views)
            finally:
                slot.rows, slot.views, slot.event, slot.req_ids, slot.seq = [], {}, None, frozenset(), 0
                self._free.append(slot)
            written += 1
        return written


def write_graph_rows(rows: list[GraphRow], views: dict[str, torch.Tensor]) -> None:
    """Store one step's results (``views["stats"]`` ``(n, L, H, 2)``, ``views["rows"]`` ``(n, w)`` with ``w`` the
    widest captured row, row ``i`` of each = batch row ``i``) into the requests' capture buffers."""
    stats = views["stats"].numpy() if "stats" in views else None
    heads_cache: dict[int, np.ndarray] = {}
    for g in rows:
        rc = g.rc
        writer = rc.writer
        if writer.array is None:  # finished/aborted meanwhile
            continue
        r0, r1 = g.row, g.row + 1
        if g.kind == "stats":
            key = id(rc)
            heads = heads_cache.get(key)
            if heads is None:
                heads = heads_cache[key] = np.asarray(rc.resolved.heads)
            a = stats[g.batch_row]  # (L, H, 2)
            for layer in rc.resolved.layers:
                sel = a[layer, heads]  # (h, 2)
                writer.write_stats(rc.layer_slot[layer], r0, r1, sel[:, 0:1], sel[:, 1:2])
        else:
            row = views["rows"][g.batch_row].numpy()
            writer.write_rows(0, r0, r1, g.ctx_len, row[None, None, :g.ctx_len])
        writer.note_rows(r1)
