"""Batched capture of one step on CPU: one kernel call per layer for every captured row of the step.

The CPU backend (:mod:`.backend`) calls :func:`capture_layer` after the stock kernel, in place of the
per-request torch path (:func:`vllm_attncap.engine.capture.capture_layer`). At the step's first captured layer it
builds, once, the kernel's tables (:func:`.kernels.build_tables`: rows, positions, heads, output pointers into the
requests' mapped files, layer slots) into a :class:`CpuStep` (kept on the step's ``AttnCapCPUMetadata``); every layer then makes one
call of the C++ kernel (kernels/cpu_capture.cpp), which reads the shadow keys through the block table and writes
rows or statistics straight into the mapped files — no per-request torch ops, no intermediate copies.

Requests the kernel does not cover (long-history elision, ``n_max``; ranks' parts under TP/PP) keep the torch
path, in the same step.
Without the compiled kernel, or with ``VLLM_ATTNCAP_CPU_KERNEL=0``, every request takes the torch path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ... import envs
from .. import capture as torch_capture
from ..plan import RowBatch, StepPlan
from ..reference import gather_keys
from ..tracker import RequestCache
from . import kernels as cpu_kernels

__all__ = ["CpuRequestCache", "CpuStep", "capture_layer", "kernel_enabled", "prepare_step"]


_warned_unbuilt = False


def kernel_enabled() -> bool:
    """Whether the CPU kernel is built and not switched off (``VLLM_ATTNCAP_CPU_KERNEL=0``). A kernel that is asked
    for but not built is said once per process, on the ``vllm_attncap`` logger: capture then runs on the slower
    torch path (same results)."""
    global _warned_unbuilt
    if not envs.VLLM_ATTNCAP_CPU_KERNEL:
        return False
    if cpu_kernels.available():
        return True
    if not _warned_unbuilt:
        _warned_unbuilt = True
        logging.getLogger("vllm_attncap").warning(
            "vllm_attncap: the CPU capture kernel (vllm_attncap.engine.cpu._cpu_kernels) is not built: capturing on "
            "the torch path (same results, slower; docs/performance.md). Install with a C++ compiler, or run "
            "`python setup.py build_ext --inplace` in a source tree; VLLM_ATTNCAP_CPU_KERNEL=0 silences this.")
    return False


@dataclass
class CpuRequestCache(RequestCache):
    """The CPU room's per-request cache: the torch path's fields plus the kernel's step-invariant tables
    (installed by the CPU metadata builder with ``CaptureTracker.set_cache_type``)."""

    kernel: cpu_kernels.KernelCache = field(default_factory=cpu_kernels.KernelCache)


@dataclass
class CpuStep:
    """What a step's capture needs, prepared at its first captured layer."""

    tables: cpu_kernels.CaptureTables | None
    fallback: StepPlan | None  # requests left to the torch path
    done_at: dict[int, list[tuple[object, int]]] = field(default_factory=dict)  # last layer -> (writer, rows)


def _kernel_request(b: RowBatch) -> cpu_kernels.KernelRequest:
    rc = b.rc
    spec = rc.spec
    return cpu_kernels.KernelRequest(
        batch_row=b.batch_row,
        q_rows=b.token_index.tolist(),
        q_pos=b.q_pos.tolist(),
        rows=b.rows,
        ctx_len=b.ctx_len,
        heads=list(rc.resolved.heads),
        mode=rc.resolved.capture_mode,
        reduce=spec.reduce,
        out=rc.writer.array,
        layer_slot=rc.layer_slot,
        history_len=rc.resolved.history_len,
        sink=spec.sink,
        salient=spec.salient,
        first_layer=rc.first_layer,
        last_layer=rc.last_layer,
        cache=rc.cache.kernel if isinstance(rc.cache, CpuRequestCache) else None,
        topk=spec.topk or 0,
    )


def prepare_step(plan: StepPlan, key_dtype: torch.dtype) -> CpuStep:
    """The step's :class:`CpuStep` (made at its first captured layer): the kernel's tables for the requests it
    covers, the rest left to the torch path."""
    kernel, fallback = [], []
    use = kernel_enabled() and key_dtype in cpu_kernels.KEY_DTYPES and plan.block_table is not None
    for b in plan.batches:
        if b.rc.writer.array is None:
            continue  # closed buffer: nothing to write
        # sharded (TP/PP) requests capture their rank's part on the torch path (engine.parallel)
        if not use or b.batch_row < 0 or b.rc.sharded or torch_capture.elision_plan(b) is not None:
            fallback.append(b)
        else:
            kernel.append(b)
    step = CpuStep(tables=None, fallback=StepPlan(fallback, plan.layers) if fallback else None)
    if kernel:
        num_layers = max(plan.layers) + 1
        step.tables = cpu_kernels.build_tables([_kernel_request(b) for b in kernel], num_layers)
        for b in kernel:
            step.done_at.setdefault(b.rc.last_layer, []).append((b.rc.writer, b.rows[-1] + 1))
    return step


def capture_layer(
    impl,
    layer_index: int,
    query: torch.Tensor,
    key_slots: torch.Tensor,
    block_size: int,
    plan: StepPlan,
    step: CpuStep,
    *,
    sliding_window: int = -1,
) -> None:
    """Capture layer ``layer_index`` for every request of ``plan`` that selected it (CPU backend).

    Args:
        impl: the attention ``Impl`` (scale, soft-cap, ALiBi, sinks).
        query: ``(num_tokens, H, D)`` this step's queries.
        key_slots: ``(num_slots, H_kv, D)`` the shadow key store.
        block_size: KV-cache block size.
        plan: this step's plan.
        step: the step's :class:`CpuStep` (:func:`prepare_step`, once per step).
        sliding_window: the window the platform kernel used (-1 = none).
    """
    if step.tables is not None:
        cpu_kernels.capture_layer(
            step.tables, layer_index, query, key_slots, plan.block_table, block_size,
            scale=impl.scale, softcap=float(impl.logits_soft_cap or 0.0), sliding_window=sliding_window,
            alibi_slopes=impl.alibi_slopes, sinks=impl.sinks,
        )
        for writer, upto in step.done_at.get(layer_index, ()):
            writer.note_rows(upto)
    if step.fallback is not None:
        torch_capture.capture_layer(
            impl, layer_index, query,
            lambda b: gather_keys(key_slots, b.block_table_row, b.ctx_len, block_size), step.fallback,
            sliding_window=sliding_window,
        )
