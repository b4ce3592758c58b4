"""Thin Python API of the CPU capture kernel (``kernels/cpu_capture.cpp``, module ``_cpu_kernels``).

The kernel captures one layer for every captured row of a step in one call, reading keys straight from the
slot-indexed shadow key store through the block table (each key once per KV head), and writes probability
rows or statistics straight into the requests' output arrays (the mapped capture files). Its plain-torch
reference is :mod:`.reference` (``gather_keys`` + ``attention_probs`` + ``history_stats``); the comparison
test is ``tests/engine/cpu/test_cpu_kernels.py``.

:class:`CaptureTables` holds the int64 tables the kernel reads; build them ONCE per step
(:func:`build_tables`) and call :func:`capture_layer` once per layer. When the extension is missing
(:func:`available` is False) the caller uses the torch path (:func:`vllm_attncap.engine.capture.capture_layer`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

try:  # built by setup.py beside the CUDA extension; absent in a source tree that was never built
    from . import _cpu_kernels as _ext
except ImportError:  # pragma: no cover - depends on the build
    _ext = None

__all__ = ["KINDS", "KernelCache", "KernelRequest", "CaptureTables", "available", "build_tables", "capture_layer", "kind_of",
           "write_shadow", "write_shadow_reference"]

#: (mode, reduce) -> the kernel's request kind.
KINDS = {
    ("rows", "none"): 0, ("rows", "head_mean"): 1, ("rows", "layer_head_mean"): 2,
    ("stats", "none"): 3, ("stats", "head_mean"): 4, ("stats", "layer_head_mean"): 5,
    ("topk", "none"): 6, ("topk", "head_mean"): 7,
}
#: Per-request int64 fields, in the order kernels/cpu_capture.cpp reads them (enum ReqField).
REQ_FIELDS = (
    "batch_row", "ctx_len", "heads_off", "heads_cnt", "kind", "out_ptr", "s_slot", "s_head", "s_row", "s_stat",
    "hist_len", "sink", "sal_off", "sal_cnt", "scratch_ptr", "row0", "first_layer", "last_layer", "n_layers",
    "topk",
)
ROW_FIELDS = ("req", "pos", "row", "qrow")
KEY_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def available() -> bool:
    """Whether the compiled CPU kernel is importable."""
    return _ext is not None


def kind_of(mode: str, reduce: str) -> int:
    return KINDS[(mode, reduce)]


@dataclass
class KernelCache:
    """What :func:`build_tables` keeps for one request between steps: its step-invariant table part."""

    static: _Static | None = None


@dataclass
class KernelRequest:
    """One request's captured rows in a step, as the kernel needs them.

    Attributes:
        batch_row: the request's row of the block table.
        q_rows: ``(n,)`` rows of the step's query tensor; ``q_pos`` their positions; ``rows`` their output rows
            (consecutive).
        ctx_len: output columns written per row (``max(q_pos) + 1``).
        heads: selected query heads (output head ``i`` is ``heads[i]``).
        mode, reduce: the spec's (mode ``"topk"`` for a top-k capture).
        out: the request's float32 output array (rows ``(L, H, T_max, W)``, stats ``(2, L, H, T_max)``, top-k
            ``(2, L, H, rows, k)``: probabilities, then positions), last axis contiguous; written in place.
        layer_slot: model layer -> output layer slot.
        history_len, sink, salient: stats parameters (as in :func:`.reference.history_stats`).
        first_layer, last_layer: the first / last selected layer (layer means assign at the first, stats of
            ``layer_head_mean`` are taken at the last).
        cache: a :class:`KernelCache` that lives as long as the request; :func:`build_tables` keeps the request's
            step-invariant table part there. None: rebuilt every call.
    """

    batch_row: int
    q_rows: Sequence[int]
    q_pos: Sequence[int]
    rows: Sequence[int]
    ctx_len: int
    heads: Sequence[int]
    mode: str
    reduce: str
    out: np.ndarray
    layer_slot: Mapping[int, int]
    history_len: int = 0
    sink: int = 0
    salient: Sequence[int] = ()
    first_layer: int = 0
    last_layer: int = 0
    cache: KernelCache | None = None  # the request's own: keeps the step-invariant tables between steps
    topk: int = 0


@dataclass
class CaptureTables:
    """The kernel's tables for one step (see kernels/cpu_capture.cpp); keeps every referenced buffer alive."""

    reqs: torch.Tensor  # (N, len(REQ_FIELDS)) int64
    rows: torch.Tensor  # (R, 4) int64
    layer_slot: torch.Tensor  # (N, num_layers) int64, -1 = not captured
    heads: torch.Tensor  # int64, concatenated
    salient: torch.Tensor  # int64, concatenated
    q_index: torch.Tensor  # (R,) int64 rows of the step's query tensor, in the order of ``rows``
    keep_alive: list  # output arrays and scratch rows referenced by pointer
    num_layers: int
    max_batch_row: int = 0
    max_ctx_len: int = 0
    max_head: int = 0


def _strides(a: np.ndarray) -> tuple[int, ...]:
    if a.dtype != np.float32:
        raise ValueError(f"cpu capture: output arrays must be float32, got {a.dtype}")
    if a.strides[-1] != 4 or any(s % 4 for s in a.strides):
        raise ValueError("cpu capture: output array's last axis must be contiguous")
    if not a.flags.writeable:
        raise ValueError("cpu capture: output array is read-only")
    return tuple(s // 4 for s in a.strides)


#: Fields of a request's table row that change from step to step (the rest is fixed for the request's life).
_STEP_FIELDS = ("batch_row", "ctx_len", "heads_off", "sal_off", "row0", "scratch_ptr")
_F = {name: i for i, name in enumerate(REQ_FIELDS)}


@dataclass
class _Static:
    """The step-invariant part of one request's tables, cached on the request (``KernelRequest.cache``)."""

    out: np.ndarray  # the output array it was built for (rebuilt when the request's array changes)
    row: np.ndarray  # (len(REQ_FIELDS),) int64, the step fields left 0
    layer_slot: np.ndarray  # (num_layers,) int64
    heads: np.ndarray  # int64
    salient: np.ndarray  # int64
    n_rows_out: int  # rows of the output array (T_max)
    width: int  # row width (rows mode), else 0
    scratch_cols: int  # > 0: stats of layer_head_mean need a scratch row per captured row


def _static_of(kr: KernelRequest, num_layers: int) -> _Static:
    want = 5 if kr.mode == "topk" else 4
    if kr.out.ndim != want:
        raise ValueError(f"cpu capture: output array of a {kr.mode} capture must be {want}-d, got {kr.out.shape}")
    if kr.mode == "topk" and not 1 <= kr.topk == kr.out.shape[4]:
        raise ValueError(f"cpu capture: topk {kr.topk} does not match the output array {kr.out.shape}")
    st = _strides(kr.out)
    row = np.zeros(len(REQ_FIELDS), dtype=np.int64)
    row[_F["heads_cnt"]] = len(kr.heads)
    row[_F["kind"]] = kind_of(kr.mode, kr.reduce)
    row[_F["out_ptr"]] = kr.out.ctypes.data
    if kr.mode == "rows":  # (L, H, T, W)
        row[_F["s_slot"]], row[_F["s_head"]], row[_F["s_row"]] = st[0], st[1], st[2]
    elif kr.mode == "topk":  # (2, L, H, T, k)
        row[_F["s_stat"]], row[_F["s_slot"]], row[_F["s_head"]], row[_F["s_row"]] = st[0], st[1], st[2], st[3]
        row[_F["topk"]] = kr.topk
    else:  # (2, L, H, T)
        row[_F["s_stat"]], row[_F["s_slot"]], row[_F["s_head"]] = st[0], st[1], st[2]
    row[_F["hist_len"]], row[_F["sink"]] = kr.history_len, kr.sink
    row[_F["sal_cnt"]] = len(kr.salient)
    row[_F["first_layer"]], row[_F["last_layer"]] = kr.first_layer, kr.last_layer
    row[_F["n_layers"]] = max(1, len(kr.layer_slot))
    layer_slot = np.full(max(1, num_layers), -1, dtype=np.int64)
    for layer, slot in kr.layer_slot.items():
        if not 0 <= layer < layer_slot.shape[0]:
            raise ValueError(f"cpu capture: layer {layer} out of range 0..{layer_slot.shape[0] - 1}")
        layer_slot[layer] = slot
    lhm_stats = kr.mode == "stats" and kr.reduce == "layer_head_mean"
    return _Static(
        out=kr.out, row=row, layer_slot=layer_slot,
        heads=np.asarray(kr.heads, dtype=np.int64).reshape(-1), salient=np.asarray(kr.salient, dtype=np.int64).reshape(-1),
        n_rows_out=kr.out.shape[2 if kr.mode == "rows" else 3],  # top-k: (2, L, H, rows, k)
        width=kr.out.shape[3] if kr.mode == "rows" else 0,
        scratch_cols=max(1, kr.history_len) if lhm_stats else 0,
    )


def build_tables(requests: Sequence[KernelRequest], num_layers: int) -> CaptureTables:
    """The kernel's tables for a step's requests (once per step; every layer's call reuses them).

    What does not change over a request's life (kind, output pointer and strides, heads, layer slots, stats
    parameters) is validated and laid out once and kept in ``KernelRequest.cache`` when one is given; a step
    only fills in its own fields (batch row, context length, first row) and row table.
    """
    n = len(requests)
    reqs = np.empty((n, len(REQ_FIELDS)), dtype=np.int64)
    layer_slot = np.empty((n, max(1, num_layers)), dtype=np.int64)
    statics: list[_Static] = []
    keep: list = []
    heads_off = sal_off = 0
    n_rows = sum(len(kr.rows) for kr in requests)
    rows = np.empty((n_rows, len(ROW_FIELDS)), dtype=np.int64)
    q_index = np.empty(n_rows, dtype=np.int64)
    r0 = 0
    for i, kr in enumerate(requests):
        st = kr.cache.static if kr.cache is not None else None
        if st is None or st.out is not kr.out or st.layer_slot.shape[0] != layer_slot.shape[1]:
            st = _static_of(kr, num_layers)
            if kr.cache is not None:
                kr.cache.static = st
        statics.append(st)
        k = len(kr.rows)
        if k == 0:
            raise ValueError("cpu capture: a request without rows")
        if st.width and kr.ctx_len > st.width:
            raise ValueError(f"cpu capture: ctx_len {kr.ctx_len} exceeds the row width {st.width}")
        if max(kr.rows) >= st.n_rows_out or min(kr.rows) < 0:
            raise ValueError("cpu capture: output row out of range")
        row = reqs[i]
        row[:] = st.row
        row[_F["batch_row"]], row[_F["ctx_len"]], row[_F["row0"]] = kr.batch_row, kr.ctx_len, kr.rows[0]
        row[_F["heads_off"]], row[_F["sal_off"]] = heads_off, sal_off
        heads_off += st.heads.shape[0]
        sal_off += st.salient.shape[0]
        if st.scratch_cols:
            scratch = np.zeros((k, st.scratch_cols), dtype=np.float32)
            keep.append(scratch)
            row[_F["scratch_ptr"]] = scratch.ctypes.data
        layer_slot[i] = st.layer_slot
        rows[r0:r0 + k, 0] = i
        rows[r0:r0 + k, 1] = kr.q_pos
        rows[r0:r0 + k, 2] = kr.rows
        rows[r0:r0 + k, 3] = np.arange(r0, r0 + k)
        q_index[r0:r0 + k] = kr.q_rows
        r0 += k
        keep.append(kr.out)
    heads = np.concatenate([st.heads for st in statics]) if heads_off else np.zeros(1, np.int64)
    salient = np.concatenate([st.salient for st in statics]) if sal_off else np.zeros(1, np.int64)
    return CaptureTables(
        reqs=torch.from_numpy(reqs),
        rows=torch.from_numpy(rows),
        layer_slot=torch.from_numpy(layer_slot),
        heads=torch.from_numpy(heads),
        salient=torch.from_numpy(salient),
        q_index=torch.from_numpy(q_index),
        keep_alive=keep,
        num_layers=num_layers,
        max_batch_row=max((kr.batch_row for kr in requests), default=0),
        max_ctx_len=max((kr.ctx_len for kr in requests), default=0),
        max_head=int(heads.max()) if heads_off else 0,
    )


def _opt_ptr(t: torch.Tensor | None, num_heads: int, name: str) -> tuple[int, torch.Tensor | None]:
    if t is None:
        return 0, None
    t = t.detach().to("cpu", torch.float32).contiguous().reshape(-1)
    if t.numel() != num_heads:
        raise ValueError(f"cpu capture: {name} must have one value per query head ({num_heads}), got {t.numel()}")
    return t.data_ptr(), t


def capture_layer(
    tables: CaptureTables,
    layer: int,
    query: torch.Tensor,
    key_slots: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    *,
    scale: float,
    softcap: float = 0.0,
    sliding_window: int = -1,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    """Capture ``layer`` for every row of ``tables`` whose request selected it (writes the output arrays).

    Args:
        query: ``(num_tokens, H, D)`` (or ``(num_tokens, H*D)``) this step's queries.
        key_slots: ``(num_slots, H_kv, D)`` fp32 or bf16 shadow key store, contiguous.
        block_table: ``(num_reqs, max_blocks)`` int32/int64 block table (rows indexed by ``batch_row``).
        block_size: KV-cache block size.
    """
    if _ext is None:
        raise RuntimeError("the CPU capture kernel (vllm_attncap.engine.cpu._cpu_kernels) is not built")
    if not 0 <= layer < tables.num_layers:
        raise ValueError(f"cpu capture: layer {layer} out of range 0..{tables.num_layers - 1}")
    if key_slots.dim() != 3 or key_slots.dtype not in KEY_DTYPES or not key_slots.is_contiguous():
        raise ValueError(f"cpu capture: key_slots must be a contiguous (slots, H_kv, D) fp32/bf16 tensor, got "
                         f"{tuple(key_slots.shape)} {key_slots.dtype}")
    num_slots, num_kv, d = key_slots.shape
    q = query.detach()
    if q.dim() == 2:
        q = q.reshape(q.shape[0], -1, d)
    num_heads = q.shape[1]
    if q.shape[2] != d or num_heads % num_kv:
        raise ValueError(f"cpu capture: query {tuple(q.shape)} does not fit keys {tuple(key_slots.shape)}")
    if tables.rows.shape[0] == 0:
        return
    if tables.max_head >= num_heads:
        raise ValueError(f"cpu capture: a selected head is >= the {num_heads} query heads")
    qf = q.index_select(0, tables.q_index).to(torch.float32).contiguous()
    bt = block_table if block_table.dtype == torch.int32 else block_table.to(torch.int32)
    if bt.dim() != 2 or bt.stride(1) != 1:
        bt = bt.reshape(bt.shape[0], -1).contiguous()
    if tables.max_batch_row >= bt.shape[0] or tables.max_ctx_len > bt.shape[1] * block_size:
        raise ValueError(f"cpu capture: block table {tuple(bt.shape)} (block size {block_size}) does not cover "
                         f"batch row {tables.max_batch_row} / {tables.max_ctx_len} positions")
    alibi_ptr, alibi = _opt_ptr(alibi_slopes, num_heads, "alibi_slopes")
    sinks_ptr, sk = _opt_ptr(sinks, num_heads, "sinks")
    _ext.capture_layer(
        qf.data_ptr(), key_slots.data_ptr(), KEY_DTYPES[key_slots.dtype], num_slots, num_heads, num_kv, d,
        bt.data_ptr(), bt.stride(0), int(block_size), tables.reqs.data_ptr(), tables.rows.data_ptr(),
        tables.rows.shape[0], tables.layer_slot.data_ptr(), tables.layer_slot.shape[1], int(layer),
        tables.heads.data_ptr(), tables.salient.data_ptr(), float(scale), float(softcap or 0.0),
        int(sliding_window if sliding_window is not None else -1), alibi_ptr, sinks_ptr,
    )
    del qf, alibi, sk


def write_shadow_reference(shadow: torch.Tensor, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Plain-torch shadow-key write: ``shadow[slot] = key[t]`` for every token whose slot is valid (>= 0)."""
    n = min(key.shape[0], slot_mapping.shape[0])
    slots = slot_mapping[:n].to(torch.long)
    valid = slots >= 0
    if bool(valid.all()):
        shadow[slots] = key[:n].to(shadow.dtype)
    else:
        shadow[slots[valid]] = key[:n][valid].to(shadow.dtype)


def write_shadow(shadow: torch.Tensor, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """:func:`write_shadow_reference` in one compiled call (kernels/cpu_capture.cpp ``write_shadow``).

    ``shadow`` is ``(num_slots, H_kv, D)`` contiguous; ``key`` is ``(num_tokens, H_kv, D)`` of the same dtype whose
    rows may be strided (a view into the fused QKV projection) but each row contiguous; ``slot_mapping`` int32/int64.
    Falls back to the torch reference for anything else, or when the kernel is not built.
    """
    n = min(key.shape[0], slot_mapping.shape[0])
    if n == 0:
        return
    sm = slot_mapping
    row = shadow.shape[1] * shadow.shape[2]
    if (_ext is None or shadow.device.type != "cpu" or key.device.type != "cpu" or sm.device.type != "cpu"
            or key.dtype != shadow.dtype or not shadow.is_contiguous() or key.dim() != 3
            or tuple(key.shape[1:]) != tuple(shadow.shape[1:]) or key.stride(2) != 1 or key.stride(1) != key.shape[2]
            or sm.dtype not in (torch.int32, torch.int64) or sm.dim() != 1 or sm.stride(0) != 1):
        write_shadow_reference(shadow, key, slot_mapping)
        return
    item = key.element_size()
    _ext.write_shadow(shadow.data_ptr(), shadow.shape[0], key.data_ptr(), key.stride(0) * item, row * item,
                      sm.data_ptr(), int(sm.dtype == torch.int32), n)
