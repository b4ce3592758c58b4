"""Capture of one attention layer for the rows of a step plan (torch path).

Called by a backend's ``Impl.forward`` after the platform kernel produced the
layer's output, so capture never changes what is generated. For each request
in the plan it computes the probabilities of the captured query rows
(:mod:`vllm_attncap.compute.reference`), applies the requested reduction and
writes rows or per-row statistics into the request's buffer.

Reductions (spec ``reduce``): ``none`` keeps (layers, heads); ``head_mean``
averages the selected heads; ``layer_head_mean`` also averages the selected
layers (each layer adds its head mean / L; the first selected layer assigns,
so a recomputed row after preemption is rewritten, not double counted).
Stats mode computes coverage / history entropy from the reduced rows.
"""

from __future__ import annotations

import torch

from .compute.reference import attention_probs, gather_keys, history_stats
from .plan import RowBatch, StepPlan

__all__ = ["capture_layer", "write_probs"]


def _device_cache(b: RowBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    c = b.rc.cache
    if c.get("device") != device:
        c["device"] = device
        c["heads"] = torch.tensor(b.rc.resolved.heads, dtype=torch.long, device=device)
        sal = b.rc.spec.salient
        c["salient"] = torch.tensor(sal, dtype=torch.long, device=device) if sal else None
    return c["heads"], c["salient"]


def write_probs(b: RowBatch, layer_index: int, probs: torch.Tensor) -> None:
    """Reduce ``probs`` (n, h, C) of one layer and store them in the request's buffer."""
    rc = b.rc
    spec = rc.spec
    arr = rc.writer.array
    if arr is None:
        return
    slot = rc.layer_slot[layer_index]
    n_layers = len(rc.resolved.layers)
    r0, r1 = b.rows[0], b.rows[-1] + 1
    if spec.reduce != "none":
        probs = probs.mean(dim=1, keepdim=True)
    if spec.reduce == "layer_head_mean":
        contrib = probs / n_layers
        if spec.mode == "stats":
            acc = b.scratch.get("acc")
            hist = contrib[..., : rc.resolved.history_len]
            b.scratch["acc"] = hist.clone() if acc is None else acc + hist
            if layer_index != rc.last_layer:
                return
            probs = b.scratch.pop("acc")
        else:
            block = contrib.permute(1, 0, 2).cpu().numpy()  # (1, n, C)
            if layer_index == rc.first_layer:
                arr[0, :, r0:r1, : b.ctx_len] = block
            else:
                arr[0, :, r0:r1, : b.ctx_len] += block
            if layer_index == rc.last_layer:
                rc.writer.note_rows(r1)
            return
    if spec.mode == "stats":
        _, salient = _device_cache(b, probs.device)
        cov, ent = history_stats(probs, rc.resolved.history_len, spec.sink, salient)  # (n, h)
        arr[0, slot, :, r0:r1] = cov.T.cpu().numpy()
        arr[1, slot, :, r0:r1] = ent.T.cpu().numpy()
    else:
        arr[slot, :, r0:r1, : b.ctx_len] = probs.permute(1, 0, 2).cpu().numpy()
    if layer_index == rc.last_layer:
        rc.writer.note_rows(r1)


def capture_layer(
    impl,
    layer_index: int,
    query: torch.Tensor,
    key_slots: torch.Tensor,
    block_size: int,
    plan: StepPlan,
) -> None:
    """Capture layer ``layer_index`` for every request of ``plan`` that selected it.

    Args:
        impl: the attention ``Impl`` (gives scale, soft-cap, window, ALiBi, sinks).
        query: ``(num_tokens, H, D)`` this step's queries.
        key_slots: ``(num_slots, H_kv, D)`` keys indexed by KV-cache slot.
        block_size: KV-cache block size.
        plan: this step's :class:`StepPlan`.
    """
    for b in plan.batches:
        if layer_index not in b.rc.layer_slot:
            continue
        heads, _ = _device_cache(b, query.device)
        q = query[b.token_index.to(query.device)]
        k = gather_keys(key_slots, b.block_table_row, b.ctx_len, block_size)
        probs = attention_probs(
            q,
            k,
            b.q_pos,
            scale=impl.scale,
            softcap=float(impl.logits_soft_cap or 0.0),
            sliding_window=impl.sliding_window if impl.sliding_window is not None else -1,
            alibi_slopes=impl.alibi_slopes,
            sinks=impl.sinks,
            heads=heads,
        )
        write_probs(b, layer_index, probs)
