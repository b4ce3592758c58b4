"""The static buffers of capture inside full decode CUDA graphs, and what fills them each step.

Owned by the CUDA metadata builder (:class:`~vllm_attncap.engine.cuda.backend.AttnCapFlashMetadataBuilder`), sized
once by ``max_num_seqs`` and the model, and read by the fused decode kernel of every layer (``kernels/decode_capture.cu``,
reference :mod:`~vllm_attncap.engine.cuda.decode_reference`). A captured graph holds their addresses; every step
only their contents change:

========================  ==========================  =====================================================
buffer                    shape, dtype                filled
========================  ==========================  =====================================================
``row_table``             ``(B, 8)`` int32            every decode step, one pinned non-blocking upload;
                                                      padded and non-capturing rows are 0 (off)
``layer_mask``            ``(slots, L)`` uint8        once per request (its slot), one upload
``head_mask``             ``(slots, H)`` uint8        idem
``salient_mask``          ``(slots, W)`` uint8        idem (stats requests with salient positions)
``stats``                 ``(B, L, H, 2)`` float32    by the kernel: coverage, entropy per (row, layer, head)
``rows``                  ``(B, W)`` float32          by the kernel: head-mean rows (one per row)
``partials``              ``(B, H, splits, 4)`` f32   kernel scratch
``counters``              ``(B, H_kv)`` int32         kernel scratch (left at zero)
========================  ==========================  =====================================================

``B`` = ``max_num_seqs``, ``slots`` = ``2 * max_num_seqs`` by default (a request keeps its slot while it lives,
preempted or not; when none is free its rows are captured by the eager path),
``W`` = ``max_model_len``. ``stats`` is row-major in the batch row so that the rows of a step are one contiguous
device-to-host copy.

Which requests run here (:func:`graph_kind`): ``mode="stats"`` with ``reduce="none"`` and no ``n_max`` (per-head
statistics), and ``mode="rows"`` with ``reduce="layer_head_mean"``, or ``"head_mean"`` over one layer (one head-mean
row per token). Everything else (full rows, head-mean rows of several layers, head-mean statistics, elision) needs
the per-step PIECEWISE switch (:mod:`~vllm_attncap.engine.cuda.graph_dispatch`).

Everything device-specific (allocation, uploads) is injected, so the layout, the per-step fill and the slot
bookkeeping run on CPU tensors in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ...spec import CaptureSpec
from .decode_reference import (
    F_FIRST_LAYER,
    F_FLAGS,
    F_HEADS,
    F_HISTORY,
    F_SINK,
    F_SLOT,
    F_WEIGHT,
    FLAG_ROWS,
    FLAG_SALIENT,
    FLAG_STATS,
    ROW_FIELDS,
)

__all__ = ["graph_kind", "BufferLayout", "DecodeBuffers", "SlotTable", "GraphRow", "fill_row_table"]


def graph_kind(spec: CaptureSpec, num_layers: int) -> str | None:
    """``"stats"`` / ``"rows"`` when a request's decode rows can be captured inside the full graph, else None."""
    if getattr(spec, "topk", None) is not None:  # top-k runs eagerly, on the torch path (reference.topk_keys)
        return None
    if spec.mode == "stats":
        return "stats" if spec.reduce == "none" and spec.n_max is None else None
    if spec.reduce == "layer_head_mean":
        return "rows"
    if spec.reduce == "head_mean":
        n = num_layers if spec.layers == "all" else len(spec.layers)
        return "rows" if n == 1 else None
    return None


@dataclass(frozen=True)
class BufferLayout:
    """Sizes of the static buffers (see the module docstring)."""

    max_rows: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    width: int  # max_model_len
    n_splits: int = 4
    slots: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_rows", "num_layers", "num_heads", "num_kv_heads", "width", "n_splits"):
            if getattr(self, name) < 1:
                raise ValueError(f"BufferLayout: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"BufferLayout: {self.num_heads} heads are not a multiple of {self.num_kv_heads} KV heads")

    @property
    def n_slots(self) -> int:
        return self.slots if self.slots is not None else 2 * self.max_rows

    def shapes(self, kinds: tuple[str, ...] = ("stats", "rows")) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Buffer shapes; without ``"rows"`` in ``kinds`` the head-mean rows buffer is one column wide (the rows
        pass is not launched) and the head mask one slot."""
        B, L, H = self.max_rows, self.num_layers, self.num_heads
        rows = "rows" in kinds
        return {
            "row_table": ((B, ROW_FIELDS), torch.int32),
            "layer_mask": ((self.n_slots, L), torch.uint8),
            "head_mask": ((self.n_slots if rows else 1, H), torch.uint8),
            "salient_mask": ((self.n_slots, self.width), torch.uint8),
            "stats": ((B, L, H, 2), torch.float32),
            "rows": ((B, self.width if rows else 1), torch.float32),
            "partials": ((B, H, self.n_splits, 4), torch.float32),
            "counters": ((B, self.num_kv_heads), torch.int32),
        }

    def nbytes(self, kinds: tuple[str, ...] = ("stats", "rows")) -> int:
        """Device bytes of the static buffers."""
        total = 0
        for shape, dtype in self.shapes(kinds).values():
            total += int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        return total

    def result_bytes(self, kinds: tuple[str, ...] = ("stats", "rows")) -> int:
        """Bytes of one result-ring slot (pinned host memory): the stats and rows buffers, 16-byte aligned."""
        shapes = self.shapes(kinds)
        return sum(-(-int(np.prod(shapes[n][0])) * 4 // 16) * 16 for n in ("stats", "rows"))


class DecodeBuffers:
    """The device tensors of a :class:`BufferLayout` (zero-initialised; addresses never change)."""

    def __init__(self, layout: BufferLayout, alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor],
                 kinds: tuple[str, ...] = ("stats", "rows")) -> None:
        self.layout = layout
        for name, (shape, dtype) in layout.shapes(kinds).items():
            setattr(self, name, alloc(shape, dtype))

    row_table: torch.Tensor
    layer_mask: torch.Tensor
    head_mask: torch.Tensor
    salient_mask: torch.Tensor
    stats: torch.Tensor
    rows: torch.Tensor
    partials: torch.Tensor
    counters: torch.Tensor


@dataclass
class GraphRow:
    """One batch row captured by the fused kernel in one step (host bookkeeping for the result ring)."""

    batch_row: int
    rc: Any  # RequestCapture
    kind: str  # "stats" | "rows"
    row: int  # row index s of the request's capture
    ctx_len: int  # keys 0..ctx_len-1 (= the query position + 1)
    slot: int


@dataclass
class SlotTable:
    """Request slots of the per-request masks: assigned on first sight, freed when the request is done.

    ``assign`` returns the slot and, the first time, the mask rows to upload (``(layer_row, head_row,
    salient_row)``), or ``(None, None)`` when every slot is taken; ``release`` frees a slot (called only once no
    result of the request is in flight).
    """

    layout: BufferLayout
    by_req: dict[str, int] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.free = list(range(self.layout.n_slots - 1, -1, -1))

    def assign(self, rc: Any) -> tuple[int | None, tuple[np.ndarray, np.ndarray, np.ndarray | None] | None]:
        slot = self.by_req.get(rc.req_id)
        if slot is not None:
            return slot, None
        if not self.free:  # more live (running + preempted) capturing requests than slots: the caller goes eager
            return None, None
        slot = self.free.pop()
        self.by_req[rc.req_id] = slot
        L, H, W = self.layout.num_layers, self.layout.num_heads, self.layout.width
        lm = np.zeros(L, dtype=np.uint8)
        lm[list(rc.resolved.layers)] = 1
        hm = np.zeros(H, dtype=np.uint8)
        hm[list(rc.resolved.heads)] = 1
        sm = None
        if rc.spec.mode == "stats":
            sm = np.zeros(W, dtype=np.uint8)
            sal = [s for s in rc.spec.salient if s < W]
            sm[sal] = 1
        return slot, (lm, hm, sm)

    def release(self, req_id: str) -> None:
        slot = self.by_req.pop(req_id, None)
        if slot is not None:
            self.free.append(slot)

    def __len__(self) -> int:
        return len(self.by_req)


def fill_row_table(table: np.ndarray, rows: list[GraphRow]) -> None:
    """Write this step's row table (``(B, ROW_FIELDS)`` int32, every other row off)."""
    table.fill(0)
    for g in rows:
        r = table[g.batch_row]
        rc = g.rc
        r[F_SLOT] = g.slot
        if g.kind == "stats":
            hist, sink = rc.resolved.history_len, rc.spec.sink
            any_salient = any(sink <= s < hist for s in rc.spec.salient)  # (hist <= W: all in the mask)
            r[F_FLAGS] = FLAG_STATS | (FLAG_SALIENT if any_salient else 0)
            r[F_HISTORY] = hist
            r[F_SINK] = sink
        else:
            r[F_FLAGS] = FLAG_ROWS
            r[F_FIRST_LAYER] = rc.first_layer
            weight = 1.0 / len(rc.resolved.layers) if rc.spec.reduce == "layer_head_mean" else 1.0
            r[F_WEIGHT] = np.float32(weight).view(np.int32)
            r[F_HEADS] = len(rc.resolved.heads)
