"""Plain-torch reference of the fused decode-capture kernel (``kernels/decode_capture.cu``).

Same inputs and outputs as the kernel (the static buffers of :mod:`vllm_attncap.engine.cuda.graph_buffers`), computed
with the reference of every other capture path (:mod:`.reference`): keys gathered from the paged cache,
:func:`~.reference.attention_probs`, :func:`~.reference.history_stats`. Row ``b`` of the step is query token ``b``
at position ``seq_lens[b] - 1``; rows whose flag is off, or that do not capture ``layer``, are left untouched.

- stats rows (``FLAG_STATS``): ``stats[b, layer, h] = (coverage, entropy)`` for every query head ``h`` (the host
  keeps the selected ones);
- rows rows (``FLAG_ROWS``): ``rows[b, :pos + 1] = (first layer ? 0 : rows[b, :pos + 1]) + weight * mean over the
  selected heads of p[h, :pos + 1]``.
"""

from __future__ import annotations

import torch

from ..reference import attention_probs, gather_paged_keys, history_stats

__all__ = ["FLAG_STATS", "FLAG_ROWS", "ROW_FIELDS", "F_FLAGS", "F_SLOT", "F_HISTORY", "F_SINK", "F_FIRST_LAYER",
           "F_WEIGHT", "F_HEADS", "decode_capture_reference"]

#: Row-table layout (kernels/attncap_kernels.h, ``RowField``).
F_FLAGS, F_SLOT, F_HISTORY, F_SINK, F_FIRST_LAYER, F_WEIGHT, F_HEADS = range(7)
ROW_FIELDS = 8
FLAG_STATS, FLAG_ROWS = 1, 2


def decode_capture_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    row_table: torch.Tensor,
    layer_mask: torch.Tensor,
    head_mask: torch.Tensor,
    salient_mask: torch.Tensor | None,
    *,
    layer: int,
    n_rows: int,
    scale: float,
    softcap: float = 0.0,
    window: int = -1,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    stats: torch.Tensor,
    rows: torch.Tensor,
) -> None:
    """Fill ``stats`` / ``rows`` in place for layer ``layer`` as the kernel does (see the module docstring).

    Args:
        query: ``(>= n_rows, H, D)``; key_cache: ``(num_blocks, block_size, H_kv, D)``; block_table / seq_lens:
            the step's (``seq_lens`` on any device).
        row_table: ``(>= n_rows, ROW_FIELDS)`` int32; layer_mask ``(slots, L)``, head_mask ``(slots, H)``,
            salient_mask ``(slots, W_s)`` uint8 (or None).
        stats: ``(B, L, H, 2)`` float32; rows: ``(B, W)`` float32.
    """
    table = row_table.cpu()
    lens = seq_lens.cpu()
    num_heads = query.shape[1]
    for b in range(n_rows):
        flags, slot = int(table[b, F_FLAGS]), int(table[b, F_SLOT])
        if not flags or not bool(layer_mask[slot, layer]):
            continue
        pos = int(lens[b]) - 1
        k = gather_paged_keys(key_cache, block_table[b], pos + 1)
        probs = attention_probs(query[b:b + 1], k, torch.tensor([pos], device=query.device), scale=scale,
                                softcap=softcap, sliding_window=window, alibi_slopes=alibi_slopes, sinks=sinks)[0]
        if flags & FLAG_STATS:
            hist, sink = int(table[b, F_HISTORY]), int(table[b, F_SINK])
            sal = None
            if salient_mask is not None:
                sal = torch.nonzero(salient_mask[slot, :hist]).flatten()
            cov, ent = history_stats(probs, hist, sink, sal)
            stats[b, layer, :, 0] = cov.to(stats.device)
            stats[b, layer, :, 1] = ent.to(stats.device)
        else:
            sel = torch.nonzero(head_mask[slot, :num_heads]).flatten().to(probs.device)
            weight = float(table[b:b + 1, F_WEIGHT].view(torch.float32)[0])
            mean = probs[sel].mean(dim=0) * weight
            if layer == int(table[b, F_FIRST_LAYER]):
                rows[b, :pos + 1] = mean.to(rows.device)
            else:
                rows[b, :pos + 1] += mean.to(rows.device)
