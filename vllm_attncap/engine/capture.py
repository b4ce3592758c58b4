"""Capture of one attention layer for the rows of a step plan (torch path).

Called by a backend's ``Impl.forward`` after the platform kernel produced the
layer's output, so capture never changes what is generated. For each request
in the plan it computes the probabilities of the captured query rows
(:mod:`vllm_attncap.engine.reference`), applies the requested reduction and
writes rows or per-row statistics into the request's buffer.

Reductions (spec ``reduce``): ``none`` keeps (layers, heads); ``head_mean``
averages the selected heads; ``layer_head_mean`` also averages the selected
layers (each layer adds its head mean / L; the first selected layer assigns,
so a recomputed row after preemption is rewritten, not double counted).
Stats mode computes coverage / history entropy from the reduced rows, after the
long-history elision rule (:mod:`~vllm_attncap.engine.elide`) when the
spec sets ``n_max`` and the history is longer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .elide import ElisionPlan, apply_elision, plan_elision
from .reference import attention_probs, history_stats, topk_keys
from .plan import RowBatch, StepPlan

__all__ = ["capture_layer", "elision_plan", "write_probs"]


def _device_cache(b: RowBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    c = b.rc.cache
    if c.device != device:
        c.device = device
        c.heads = torch.tensor(b.rc.local_heads, dtype=torch.long, device=device)  # this rank's own indices
        sal = b.rc.spec.salient
        c.salient = torch.tensor(sal, dtype=torch.long, device=device) if sal else None
    return c.heads, c.salient


def elision_plan(b: RowBatch) -> ElisionPlan | None:
    """The request's long-history elision plan (spec ``n_max``), made once per request; None when not asked for
    or when the history fits (the identity plan)."""
    c = b.rc.cache
    if not c.elision_planned:
        spec, history_len = b.rc.spec, b.rc.resolved.history_len
        plan = None
        if spec.n_max is not None:
            plan = plan_elision(history_len, sink=spec.sink, salient=spec.salient, n_max=spec.n_max,
                                window=spec.elision_window)
            plan = None if plan.is_identity else plan
        c.elision, c.elision_planned = plan, True
    return c.elision


def _elided_salient(b: RowBatch, plan: ElisionPlan, device: torch.device) -> torch.Tensor | None:
    c = b.rc.cache
    t = c.elided_salient
    if t is None or t.device != device:
        t = c.elided_salient = torch.tensor(plan.salient, dtype=torch.long, device=device) if plan.salient else None
    return t


def write_probs(b: RowBatch, layer_index: int, probs: torch.Tensor, *, sliding_window: int = -1) -> None:
    """Reduce ``probs`` (n, h, C) of one layer and store them in the request's buffer."""
    rc = b.rc
    spec = rc.spec
    writer = rc.writer
    if writer.array is None:
        return
    slot = rc.layer_slot[layer_index]
    n_layers = len(rc.resolved.layers)
    r0, r1 = b.rows[0], b.rows[-1] + 1
    if spec.reduce != "none":
        probs = probs.mean(dim=1, keepdim=True)
        if rc.head_share != 1.0:  # tensor parallelism: this rank's part of the mean over all selected heads
            probs = probs * rc.head_share
    if spec.topk is not None:  # the top-k of each row (of each head, or of the head mean; the tracker refuses a
        # head mean whose heads span ranks, so head_share is 1 here)
        pos, val = topk_keys(probs, b.q_pos, spec.topk, sliding_window=sliding_window)
        writer.write_topk(slot, r0, r1, pos.permute(1, 0, 2).cpu().numpy(), val.permute(1, 0, 2).cpu().numpy())
        if layer_index == rc.last_layer:
            writer.note_rows(r1)
        return
    if spec.reduce == "layer_head_mean":
        contrib = probs / n_layers
        if spec.mode == "stats":
            hist = contrib[..., : rc.resolved.history_len]
            b.layer_sum = hist.clone() if b.layer_sum is None else b.layer_sum + hist
            if layer_index != rc.last_layer:
                return
            probs, b.layer_sum = b.layer_sum, None
        else:
            # the first selected layer assigns, the others add (a recomputed row is rewritten, not double counted)
            block = contrib.permute(1, 0, 2).cpu().numpy()  # (1, n, C)
            writer.write_rows(0, r0, r1, b.ctx_len, block, accumulate=layer_index != rc.first_layer)
            if layer_index == rc.last_layer:
                writer.note_rows(r1)
            return
    if spec.mode == "stats":
        _, salient = _device_cache(b, probs.device)
        history_len = rc.resolved.history_len
        plan = elision_plan(b)
        if plan is not None:  # method.md "Long histories": the same rule the reward SDK applies
            probs = apply_elision(probs[..., :history_len], plan)
            history_len = plan.out_history_len
            salient = _elided_salient(b, plan, probs.device)
        if rc.stats_on_host:  # a mean spanning ranks: partial rows now, statistics of their sum on the host
            writer.write_rows(slot, r0, r1, history_len, probs[..., :history_len].permute(1, 0, 2).cpu().numpy())
            if layer_index == rc.last_layer:
                writer.note_rows(r1)
            return
        cov, ent = history_stats(probs, history_len, spec.sink, salient)  # (n, h)
        writer.write_stats(slot, r0, r1, cov.T.cpu().numpy(), ent.T.cpu().numpy())
    else:
        writer.write_rows(slot, r0, r1, b.ctx_len, probs.permute(1, 0, 2).cpu().numpy())
    if layer_index == rc.last_layer:
        writer.note_rows(r1)


def capture_layer(
    impl,
    layer_index: int,
    query: torch.Tensor,
    keys_of: Callable[[RowBatch], torch.Tensor],
    plan: StepPlan,
    *,
    sliding_window: int = -1,
) -> None:
    """Capture layer ``layer_index`` for every request of ``plan`` that selected it.

    Args:
        impl: the attention ``Impl`` (gives scale, soft-cap, ALiBi, sinks).
        query: ``(num_tokens, H, D)`` this step's queries.
        keys_of: a request's keys of positions ``0..b.ctx_len-1``, ``(ctx_len, H_kv, D)``: the backend's way of
            reading its KV cache (CPU: the slot-indexed shadow store, :func:`~.reference.gather_keys`;
            CUDA: the paged cache, :func:`~.reference.gather_paged_keys`).
        plan: this step's :class:`StepPlan`.
        sliding_window: the window the platform kernel used (-1 = none).
    """
    for b in plan.batches:
        if layer_index not in b.rc.layer_slot:
            continue
        heads, _ = _device_cache(b, query.device)
        tok = b.device_token_index
        if tok is None or tok.device != query.device:
            tok = b.device_token_index = b.token_index.to(query.device)
        probs = attention_probs(
            query[tok],
            keys_of(b),
            b.q_pos,
            scale=impl.scale,
            softcap=float(impl.logits_soft_cap or 0.0),
            sliding_window=sliding_window,
            alibi_slopes=impl.alibi_slopes,
            sinks=impl.sinks,
            heads=heads,
        )
        write_probs(b, layer_index, probs, sliding_window=sliding_window)
