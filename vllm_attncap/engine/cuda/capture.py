"""The CUDA kernel path of capture: one step's captured rows, grouped, launched per layer, copied to the host.

Used by :class:`~vllm_attncap.engine.cuda.backend.AttnCapFlashImpl` when the extension is built, the head size
is 64 or 128 and ``VLLM_ATTNCAP_KERNELS`` is not ``0``. The step's captured rows are grouped by spec (mode,
reduction, layers, heads); per group and layer one ``paged_attention_probs`` launch, then ``head_mean`` /
``history_stats`` on the device, then an asynchronous copy to pinned host memory
(:class:`~vllm_attncap.engine.cuda.pinned.HostSink`: side stream, the compute stream never waits). The host
writes pinned rows into each request's buffer (:class:`~vllm_attncap.store.CaptureWriter`) once per step, after the
forward (the runner hook's step end).

The math is :mod:`vllm_attncap.engine.reference`'s; tests/gpu compares the two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ... import envs
from ..plan import RowBatch, StepPlan
from . import kernels as attncap_cuda
from .pinned import HostSink

logger = logging.getLogger("vllm_attncap")

__all__ = ["KERNEL_DTYPES", "KernelStep", "capture_layer", "kernels_available", "step_uses_kernels"]

_WARNED_LHM_GROUPS = False


def _warn_lhm_groups() -> None:
    global _WARNED_LHM_GROUPS
    _WARNED_LHM_GROUPS = True
    logger.warning("vllm_attncap: reduce='layer_head_mean' over layers of several KV-cache groups is not supported "
                   "on CUDA yet; the captured mean covers only some of the layers")


#: Query/key dtypes the kernels take.
KERNEL_DTYPES = (torch.float16, torch.bfloat16)

_KERNELS_OK: bool | None = None


def kernels_available() -> bool:
    global _KERNELS_OK
    if _KERNELS_OK is None:
        _KERNELS_OK = attncap_cuda.is_available()
        if not _KERNELS_OK:
            logger.info("vllm_attncap: CUDA capture kernels not built; capturing with the torch path")
    return _KERNELS_OK


@dataclass
class KernelStep:
    """What the kernel path decides about one step, at its first captured layer (kept on the step's
    ``AttnCapFlashMetadata``).

    Attributes:
        use_kernels: whether the CUDA kernels capture this step (None: not decided yet).
        groups: the step's row groups (None: not built yet).
    """

    use_kernels: bool | None = None
    groups: list[_Group] | None = None


def step_uses_kernels(plan: StepPlan, step: KernelStep, impl, query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether this step captures with the kernels; decided once per step (layer-mean accumulators must stay on
    one path) and kept in ``step.use_kernels``."""
    use = step.use_kernels
    if use is None:
        use = (
            envs.VLLM_ATTNCAP_KERNELS
            # long-history elision (spec n_max) runs on the torch path; the elide_rows kernel is not wired in yet
            and not any(b.rc.spec.n_max is not None for b in plan.batches)
            # top-k: the torch path (reference.topk_keys after the probabilities)
            and not any(b.rc.spec.topk is not None for b in plan.batches)
            # under TP/PP a rank captures its share of heads and layers (engine.parallel): the torch path
            and not any(b.rc.sharded for b in plan.batches)
            and query.is_cuda
            and query.dtype in KERNEL_DTYPES
            and key_cache.dtype == query.dtype
            and impl.head_size in attncap_cuda.PROBS_HEAD_DIMS
            and kernels_available()
        )
        step.use_kernels = use
    return use


@dataclass
class _Group:
    """Rows of one step whose requests share (mode, reduce, layers, heads)."""

    batches: list[RowBatch]
    spans: list[tuple[int, int]]  # rows of each batch inside the group
    mode: str
    reduce: str
    all_layers: tuple[int, ...]  # the requests' selected layers
    layers: tuple[int, ...]  # those of them this plan's KV-cache group runs, in increasing order
    n: int
    width: int
    q_index: torch.Tensor  # (n,) int32 token of each row in `query`
    bt_row: torch.Tensor  # (n,) int32 block-table row
    q_pos: torch.Tensor  # (n,) int32
    ctx_len: torch.Tensor  # (n,) int32
    hist: torch.Tensor  # (n,) int32 history_len per row
    sink: torch.Tensor  # (n,) int32
    sal_row: torch.Tensor  # (n,) int32 row of `salient` per row
    heads: torch.Tensor  # (h,) int32
    salient: torch.Tensor | None  # (M, W_s) uint8 or None
    stage: torch.Tensor | None = None  # (len(layers), *result) results of this step, copied once
    acc: torch.Tensor | None = None  # (n, width) layer-mean accumulator

    @property
    def first(self) -> int:
        return self.layers[0]

    @property
    def last(self) -> int:
        return self.layers[-1]


def _upload(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """``a`` on ``device`` without blocking the host: a pinned staging copy (torch's caching host allocator keeps
    it until the copy is done) and a non-blocking transfer; a plain copy off CUDA."""
    t = torch.from_numpy(a)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _build_groups(plan: StepPlan, device: torch.device, own_layers: frozenset[int] | None = None) -> list[_Group]:
    """Group the step's captured rows by spec and upload their indices (one copy per group).

    ``own_layers``: the layer indices of the KV-cache group whose builder made ``plan``
    (None = all); a model with several KV-cache groups gets one plan per group.
    """
    by_key: dict[tuple, list[RowBatch]] = {}
    for b in plan.batches:
        r = b.rc.resolved
        by_key.setdefault((r.spec.mode, r.spec.reduce, r.layers, r.heads), []).append(b)
    groups = []
    for (mode, reduce, all_layers, heads), bs in by_key.items():
        layers = tuple(sorted(l for l in all_layers if own_layers is None or l in own_layers))
        if not layers:
            continue
        if reduce == "layer_head_mean" and len(layers) != len(all_layers) and not _WARNED_LHM_GROUPS:
            _warn_lhm_groups()
        spans, cols = [], []
        start = 0
        for m, b in enumerate(bs):
            nb = len(b.rows)
            spans.append((start, start + nb))
            start += nb
            cols.append(np.stack([
                b.token_index.numpy(),
                np.full(nb, b.batch_row),
                b.q_pos.numpy(),
                np.full(nb, b.ctx_len),
                np.full(nb, b.rc.resolved.history_len),
                np.full(nb, b.rc.spec.sink),
                np.full(nb, m),
            ]))
        n = start
        table = np.concatenate(cols, axis=1).astype(np.int32)  # (7, n)
        packed = np.concatenate([table.reshape(-1), np.asarray(heads, dtype=np.int32)])
        dev = _upload(packed, device)  # one host-to-device copy per group and step
        q_index, bt_row, q_pos, ctx_len, hist, sink, sal_row = dev[: 7 * n].view(7, n).unbind(0)
        salient = None
        if mode == "stats" and any(b.rc.spec.salient for b in bs):
            ws = max(b.rc.resolved.history_len for b in bs)
            mask = np.zeros((len(bs), ws), dtype=np.uint8)
            for m, b in enumerate(bs):
                mask[m, [x for x in b.rc.spec.salient if x < ws]] = 1
            salient = _upload(mask, device)
        groups.append(_Group(
            batches=bs, spans=spans, mode=mode, reduce=reduce, all_layers=all_layers, layers=layers, n=n,
            width=max(b.ctx_len for b in bs),
            q_index=q_index, bt_row=bt_row, q_pos=q_pos, ctx_len=ctx_len, hist=hist, sink=sink,
            sal_row=sal_row, heads=dev[7 * n:], salient=salient,
        ))
    return groups


def _result_shape(g: _Group) -> tuple[int, ...]:
    """Shape of one layer's result: rows ``(n, h, W)`` / ``(n, W)``, stats ``(2, n, h)`` / ``(2, n)``."""
    reduced = g.reduce != "none"
    per_row = (g.n,) if reduced else (g.n, g.heads.shape[0])
    return (2, *per_row) if g.mode == "stats" else (*per_row, g.width)


def capture_layer(impl, layer_index: int, query: torch.Tensor, key_cache: torch.Tensor,
                  block_table: torch.Tensor, window: int, plan: StepPlan, step: KernelStep, sink: HostSink) -> None:
    """Capture layer ``layer_index`` of every planned request with the CUDA kernels; results leave through ``sink``.

    Args:
        impl: the ``AttnCapFlashImpl`` (scale, soft-cap, ALiBi / sinks on the device).
        query: ``(num_tokens, H, D)``; key_cache: ``(num_blocks, block_size, H_kv, D)``; block_table: the step's.
        window: the sliding window FlashAttention used (-1 = none).
        plan: the step's plan; step: what the kernel path decided about it (the row groups are built on the first
            captured layer, kept in ``step.groups``).
        sink: where device results go (pinned copies, written into the request buffers at the step's end).
    """
    groups = step.groups
    if groups is None:
        groups = step.groups = _build_groups(plan, query.device, plan.own_layers)
    dev = query.device
    for g in groups:
        if layer_index not in g.layers:
            continue
        kw = dict(
            scale=impl.scale, heads=g.heads, q_index=g.q_index, bt_row=g.bt_row,
            softcap=float(impl.logits_soft_cap or 0.0), sliding_window=window,
            alibi_slopes=impl.alibi_on(dev), sinks=impl.sinks_on(dev), width=g.width,
        )
        if g.reduce == "layer_head_mean":
            probs = attncap_cuda.paged_attention_probs(query, key_cache, block_table, g.q_pos, g.ctx_len, **kw)
            if g.acc is None:
                g.acc = torch.zeros((g.n, g.width), dtype=torch.float32, device=dev)
            # the first selected layer assigns, the others add (a recomputed row is rewritten)
            attncap_cuda.head_mean(probs, out=g.acc, weight=1.0 / len(g.all_layers), accumulate=layer_index != g.first)
            if layer_index != g.last:
                continue
            result = g.acc
            if g.mode == "stats":
                result = torch.empty((2, g.n), dtype=torch.float32, device=dev)
                attncap_cuda.history_stats(g.acc, g.hist, g.sink, g.salient,
                                           salient_row=g.sal_row if g.salient is not None else None,
                                           coverage=result[0], entropy=result[1])
            sink.submit(result, _scatter(g, (layer_index,)))
            continue
        if g.stage is None:  # zeros: a layer that never ran leaves zeros, not garbage
            g.stage = torch.zeros((len(g.layers), *_result_shape(g)), dtype=torch.float32, device=dev)
        out = g.stage[g.layers.index(layer_index)]
        if g.mode == "rows" and g.reduce == "none":
            attncap_cuda.paged_attention_probs(query, key_cache, block_table, g.q_pos, g.ctx_len, out=out, **kw)
        else:
            probs = attncap_cuda.paged_attention_probs(query, key_cache, block_table, g.q_pos, g.ctx_len, **kw)
            if g.mode == "rows":  # head_mean
                attncap_cuda.head_mean(probs, out=out)
            else:
                red = attncap_cuda.head_mean(probs) if g.reduce == "head_mean" else probs
                attncap_cuda.history_stats(red, g.hist, g.sink, g.salient,
                                           salient_row=g.sal_row if g.salient is not None else None,
                                           coverage=out[0], entropy=out[1])
        if layer_index == g.last:  # one copy per group and step
            sink.submit(g.stage, _scatter(g, g.layers))


def _scatter(g: _Group, layers: tuple[int, ...]) -> Callable[[torch.Tensor], None]:
    """Host-side write of a group's results into each request's buffer.

    The host tensor holds one result per entry of ``layers`` (leading dimension),
    or a single one (the layer mean, ``layers`` = its last layer).
    """

    def write(host: torch.Tensor) -> None:
        a_all = host.numpy()
        if g.reduce == "layer_head_mean":
            a_all = a_all[None]
        for li, layer_index in enumerate(layers):
            a = a_all[li]
            for b, (s, e) in zip(g.batches, g.spans):
                rc = b.rc
                writer = rc.writer
                if writer.array is None:  # finished/aborted meanwhile
                    continue
                slot = rc.layer_slot[layer_index]
                r0, r1 = b.rows[0], b.rows[-1] + 1
                if g.mode == "stats":
                    if a.ndim == 3:  # (2, n, h)
                        writer.write_stats(slot, r0, r1, a[0, s:e].T, a[1, s:e].T)
                    else:  # (2, n): reduced heads
                        writer.write_stats(slot, r0, r1, a[0, s:e][None], a[1, s:e][None])
                else:
                    c = b.ctx_len
                    if a.ndim == 3:  # (n, h, W)
                        writer.write_rows(slot, r0, r1, c, a[s:e, :, :c].transpose(1, 0, 2))
                    else:  # (n, W)
                        writer.write_rows(slot, r0, r1, c, a[s:e, :c][None])
                if layer_index == rc.last_layer:
                    rc.writer.note_rows(r1)

    return write
