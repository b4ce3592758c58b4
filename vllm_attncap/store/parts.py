"""One record written by several ranks: per-rank parts of a capture, and the reader that combines them.

Under tensor or pipeline parallelism every worker rank captures what it holds (its query heads, its layers; see
:mod:`vllm_attncap.engine.parallel`) into a *part*: a record of the store (:mod:`vllm_attncap.store`) under the
request's key whose request id is ``<request id>~part<i>of<n>``, and whose :class:`~vllm_attncap.store.CaptureMeta`
describes the part's own array (its layers and heads) and carries, in ``meta.part``, the whole request's record
(``final``) and where the part's layers and heads sit in it (``layer_pos``, ``head_pos``). A rank whose selection
holds nothing still writes an empty part: the reader counts parts to know that every rank is done.

:func:`read_capture` is the caller's reader for every engine (the raw one is
:func:`~vllm_attncap.store.store.read_records`): records without
parts (a single-rank engine) pass through unchanged; parts are waited for until all ``n`` of a request are there,
then combined into the record a single-rank engine writes, in the same layout:

* slices (``reduce="none"``, and top-k captures) are placed at their layer and head positions;
* partial means (``head_mean``, ``layer_head_mean``; each rank wrote its sum weighted by the global counts) are
  added;
* statistics of a mean that spans ranks come as partial rows over the (elided) history: they are added, then
  coverage and entropy are computed here (:func:`history_stats`, the numpy twin of
  ``engine.reference.history_stats``).

A request is complete only when every part is: if any part is an error (a rank refused or failed the capture) the
combined record is that error, and parts still missing after ``wait_s`` make it an error too; the reader never
returns a half-filled array. Reading deletes every part (the store's claim-on-read covers them all: they share
the key).

This module imports numpy, the standard library and its siblings in :mod:`vllm_attncap.store`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import numpy as np

from .record import STATUS_ABANDONED, STATUS_ERROR, STATUS_OPEN, CaptureMeta, CaptureRecord
from .store import list_records as _store_list
from .store import read_records as _store_read

__all__ = [
    "part_req_id", "split_part_id", "make_part_meta", "read_capture", "list_captures", "combine_parts", "history_stats",
]

_PART_RE = re.compile(r"^(?P<base>.*)~part(?P<i>\d+)of(?P<n>\d+)$")
_NO_TRIM = 1 << 40


def part_req_id(req_id: str, index: int, count: int) -> str:
    """The request id of rank ``index``'s part (of ``count``)."""
    return f"{req_id}~part{index}of{count}"


def split_part_id(req_id: str) -> tuple[str, int, int] | None:
    """``(request id, index, count)`` of a part's request id; None for a record that is not a part."""
    m = _PART_RE.match(req_id)
    return (m.group("base"), int(m.group("i")), int(m.group("n"))) if m else None


def make_part_meta(
    final: CaptureMeta,
    index: int,
    count: int,
    *,
    layers: list[int],
    layer_pos: list[int],
    heads: list[int],
    head_pos: list[int],
    stats_history: tuple[int, int, list[int]] | None = None,
) -> CaptureMeta:
    """The record of one rank's part of ``final`` (the whole request's record).

    Args:
        final: the record a single-rank engine would write (the resolved spec over the whole model).
        index, count: this part and the number of parts (TP x PP ranks).
        layers, heads: the selected layers and heads this rank captures (global ids, in selection order);
            ``layer_pos`` / ``head_pos``: their positions in ``final.layers`` / ``final.heads``.
        stats_history: for statistics of a mean that spans ranks, ``(width, sink, salient)`` of the (elided)
            history the rank writes partial rows over; the reader computes the statistics from their sum.
    """
    empty = not layers or not heads
    part = {
        "index": index,
        "count": count,
        "req_id": final.req_id,
        "final": dataclasses.asdict(final),
        "layer_pos": list(layer_pos),
        "head_pos": list(head_pos),
        "empty": empty,
        "stats": None,
    }
    meta = dataclasses.replace(final, req_id=part_req_id(final.req_id, index, count), layers=list(layers),
                               heads=list(heads), part=part)
    if empty:
        meta.layers, meta.heads, meta.reduce = [], [], "none"  # no data: a completion marker
    elif stats_history is not None:
        width, sink, salient = stats_history
        part["stats"] = {"width": int(width), "sink": int(sink), "salient": [int(s) for s in salient]}
        meta.mode, meta.prompt_len = "rows", int(width)  # rows (L, 1, T_max, width + T_max - 1); width used
    return meta


def history_stats(rows: np.ndarray, width: int, sink: int, salient) -> tuple[np.ndarray, np.ndarray]:
    """Per-row coverage and history entropy of ``rows`` ``(..., >= width)`` over history columns
    ``sink..width-1`` (renormalised per row); NaN for a row without history mass. The numpy twin of
    ``vllm_attncap.engine.reference.history_stats``."""
    block = rows[..., sink:width].astype(np.float64)
    mass = block.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = block / mass
        logp = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    ent = -(p * logp).sum(axis=-1)
    ok = mass[..., 0] > 0
    ent = np.where(ok, ent, math.nan)
    sal = [s - sink for s in salient if sink <= s < width]
    cov = p[..., sal].sum(axis=-1) if sal else np.zeros_like(ent)
    cov = np.where(ok, cov, math.nan) if sal else cov
    return cov.astype(np.float32), ent.astype(np.float32)


def _final_meta(part: dict[str, Any]) -> CaptureMeta:
    names = {f.name for f in dataclasses.fields(CaptureMeta)}
    return CaptureMeta(**{k: v for k, v in part["final"].items() if k in names})


def combine_parts(records: list[CaptureRecord], expected: int | None = None) -> CaptureRecord:
    """One request's record from its parts (all of one request id; see the module docstring).

    Args:
        records: the parts read from the store, untrimmed.
        expected: how many parts the request has (from their ids); fewer present makes an error record.
    """
    ids = [split_part_id(r.meta.req_id) for r in records]
    base = ids[0][0] if ids[0] else records[0].meta.req_id
    count = expected if expected is not None else (ids[0][2] if ids[0] else len(records))
    errors = [r for r in records if r.meta.status == STATUS_ERROR]
    good = [r for r in records if r.meta.status != STATUS_ERROR and r.meta.part is not None]
    key = records[0].meta.key
    if errors or len(good) < count:
        if errors:
            message = errors[0].meta.error
        else:
            have = sorted(i[1] for i in ids if i)
            message = (f"attncap: capture incomplete: {len(good)} of {count} rank parts were written "
                       f"(have {have}); a worker rank failed or stopped before writing its part")
        meta = _final_meta(good[0].meta.part) if good else CaptureMeta(key, base)
        meta.status, meta.error = STATUS_ERROR, message
        return CaptureRecord(meta, None)
    good.sort(key=lambda r: r.meta.part["index"])
    final = _final_meta(good[0].meta.part)
    statuses = {r.meta.status for r in good}
    final.status = (STATUS_ABANDONED if STATUS_ABANDONED in statuses else STATUS_OPEN if STATUS_OPEN in statuses
                    else good[0].meta.status)
    filled = [r for r in good if not r.meta.part["empty"]]
    final.rows_written = min((r.meta.rows_written for r in filled), default=0)
    closed = [r.meta.closed for r in good if r.meta.closed is not None]
    final.closed = max(closed) if closed and len(closed) == len(good) else None
    out = np.zeros(final.shape, np.float32)
    lhm = final.reduce == "layer_head_mean"
    stats_acc = None
    for r in filled:
        p = r.meta.part
        lp = [0] if lhm else p["layer_pos"]
        hp = p["head_pos"] if final.reduce == "none" else [0]
        arr = r.array
        if p["stats"] is not None:
            w = p["stats"]["width"]
            if stats_acc is None:
                stats_acc = np.zeros((final.out_layers, 1, final.max_tokens, w), np.float32)
                stats_info = p["stats"]
            stats_acc[np.ix_(lp, hp)] += arr[..., :w]
        elif final.mode == "topk":  # disjoint slices (a head mean's heads all live on one rank)
            out[(slice(None),) + np.ix_(lp, hp)] = arr
        elif final.mode == "stats":
            out[(slice(None),) + np.ix_(lp, hp)] += arr
        else:
            out[np.ix_(lp, hp)] += arr
    if stats_acc is not None:
        cov, ent = history_stats(stats_acc, stats_info["width"], stats_info["sink"], stats_info["salient"])
        out[0], out[1] = cov, ent
    return CaptureRecord(final, out)


def _order(meta: CaptureMeta):
    order = getattr(meta, "order", None)
    if order is not None and not callable(order):
        return order
    m = re.match(r"^(\d+)_", meta.req_id)
    return (int(m.group(1)) if m else 0, meta.req_id)


def _groups(metas) -> dict[str, list]:
    out: dict[str, list] = {}
    for m in metas:
        sp = split_part_id(m.req_id)
        out.setdefault(sp[0] if sp else m.req_id, []).append((sp, m))
    return out


def _complete(groups: dict[str, list], want: int) -> bool:
    if len(groups) < want:
        return False
    for items in groups.values():
        sp = items[0][0]
        if sp is None:
            continue
        if any(m.status == STATUS_ERROR for _, m in items):
            continue
        if len({s[1] for s, _ in items if s}) < sp[2]:
            return False
    return True


def list_captures(key: str | None = None) -> list[CaptureMeta]:
    """The store's :func:`~vllm_attncap.store.store.list_records` with the parts of each request folded into one record
    (no data): ``error`` if any part is an error, ``open`` while a part is open or missing, ``rows_written`` the
    fewest any rank wrote."""
    out = []
    for base, items in _groups(_store_list(key)).items():
        sp = items[0][0]
        if sp is None:
            out.extend(m for _, m in items)
            continue
        errors = [m for _, m in items if m.status == STATUS_ERROR]
        good = [m for _, m in items if m.status != STATUS_ERROR and m.part is not None]
        if errors:
            meta = _final_meta(good[0].part) if good else CaptureMeta(errors[0].key, base)
            meta.status, meta.error = STATUS_ERROR, errors[0].error
        else:
            meta = _final_meta(good[0].part)
            statuses = {m.status for m in good}
            meta.status = (STATUS_ABANDONED if STATUS_ABANDONED in statuses else STATUS_OPEN
                           if STATUS_OPEN in statuses or len({s[1] for s, _ in items}) < sp[2] else good[0].status)
            meta.rows_written = min((m.rows_written for m in good if not m.part["empty"]), default=0)
        out.append(meta)
    out.sort(key=_order)
    return out


def read_capture(key: str, num_tokens: list[int] | int, *, wait_s: float = 5.0, delete: bool = True) -> list[CaptureRecord]:
    """Read (and by default delete) the capture(s) under ``key``: the store's
    :func:`~vllm_attncap.store.store.read_records`, with the parts of a multi-rank engine combined.

    Args and returns as the store's: one record per completion, ordered like ``RequestOutput.outputs``, trimmed to
    ``num_tokens``. Parts are waited for (up to ``wait_s``) until every rank's part of each completion is there.
    """
    counts = [num_tokens] if isinstance(num_tokens, int) else list(num_tokens)
    deadline = time.monotonic() + wait_s
    while True:
        metas = _store_list(key)
        if metas and not any(split_part_id(m.req_id) for m in metas):  # a single-rank engine
            return _store_read(key, num_tokens, wait_s=max(0.0, deadline - time.monotonic()), delete=delete)
        groups = _groups(metas)
        if (metas and _complete(groups, len(counts))) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if not metas:
        return _store_read(key, num_tokens, wait_s=0.0, delete=delete)  # raises the store's LookupError
    records = _store_read(key, _NO_TRIM, wait_s=0.0, delete=delete)
    by_base: dict[str, list[CaptureRecord]] = {}
    for r in records:
        sp = split_part_id(r.meta.req_id)
        by_base.setdefault(sp[0] if sp else r.meta.req_id, []).append(r)
    combined = []
    for base, recs in by_base.items():
        sp = split_part_id(recs[0].meta.req_id)
        combined.append(combine_parts(recs, sp[2]) if sp else recs[0])
    combined.sort(key=lambda r: _order(r.meta))
    out = []
    for i, rec in enumerate(combined):
        n = counts[i] if i < len(counts) else counts[-1]
        if rec.array is not None:
            rec = CaptureRecord(rec.meta, rec.meta.trim(rec.array, n))
        out.append(rec)
    return out
