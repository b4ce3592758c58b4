"""Plain-torch reference for capture: probabilities of captured query rows and
their on-device reductions.

This is the CPU path of the plugin and the reference that every CUDA kernel in
``kernels/`` is compared against (tests/test_reference.py, tests/gpu/). It
mirrors what the attention kernels compute for one request:

    p[h, j] = softmax_j( scale * q[h] . k[j, h // G] )   for key positions j <= pos

with G = H / H_kv query heads per KV head (GQA), optional tanh soft-capping,
ALiBi, sliding window and attention sinks (a per-head logit that only enters
the denominator). Everything is computed in float32.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "slots_for_positions",
    "gather_keys",
    "gather_paged_keys",
    "attention_probs",
    "reduce_heads",
    "history_stats",
    "topk_keys",
]


def slots_for_positions(block_table_row: torch.Tensor, num_positions: int, block_size: int) -> torch.Tensor:
    """Slot index of positions ``0..num_positions-1`` of one request.

    Slot of position p = ``block_table_row[p // block_size] * block_size + p % block_size``.
    """
    pos = torch.arange(num_positions, device=block_table_row.device)
    blocks = block_table_row[pos // block_size].to(torch.long)
    return blocks * block_size + pos % block_size


def gather_keys(
    key_slots: torch.Tensor, block_table_row: torch.Tensor, ctx_len: int, block_size: int
) -> torch.Tensor:
    """Keys of positions ``0..ctx_len-1`` from a slot-indexed key store.

    Args:
        key_slots: ``(num_slots, H_kv, D)`` keys indexed by KV-cache slot.
        block_table_row: this request's row of the block table.
        ctx_len: number of positions to gather.
        block_size: KV-cache block size.

    Returns:
        ``(ctx_len, H_kv, D)``.
    """
    return key_slots[slots_for_positions(block_table_row, ctx_len, block_size)]


def gather_paged_keys(key_cache: torch.Tensor, block_table_row: torch.Tensor, ctx_len: int) -> torch.Tensor:
    """Keys of positions ``0..ctx_len-1`` of one request from a paged key cache.

    Args:
        key_cache: ``(num_blocks, block_size, H_kv, D)`` (any strides), e.g.
            ``kv_cache.unbind(1)[0]`` for vLLM 0.23-0.25 FlashAttention.
        block_table_row: this request's block ids (int32/int64, on the cache's device).
        ctx_len: number of positions.

    Returns:
        ``(ctx_len, H_kv, D)``, a copy.
    """
    bs = key_cache.shape[1]
    nblk = -(-ctx_len // bs)
    blocks = block_table_row[:nblk].to(torch.long)
    k = key_cache[blocks]  # (nblk, bs, H_kv, D)
    return k.reshape(nblk * bs, key_cache.shape[2], key_cache.shape[3])[:ctx_len]


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    scale: float,
    softcap: float = 0.0,
    sliding_window: int = -1,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    heads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of query rows over a request's keys.

    Args:
        q: ``(n, H, D)`` queries of the captured rows.
        k: ``(C, H_kv, D)`` keys of positions ``0..C-1`` (``C > max(q_pos)``).
        q_pos: ``(n,)`` position of each query; keys ``j > q_pos`` get probability 0.
        scale: softmax scale (``1/sqrt(D)`` for most models).
        softcap: tanh soft-cap of the logits (0 = none).
        sliding_window: attend only to ``j > q_pos - sliding_window`` (-1 = all).
        alibi_slopes: ``(H,)`` ALiBi slopes (adds ``slope * (j - q_pos)``).
        sinks: ``(H,)`` sink logits that only enter the softmax denominator.
        heads: optional ``(h,)`` query-head indices to compute (default all).

    Returns:
        ``(n, h, C)`` float32 probabilities, zeros right of each row's causal limit.
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"attention_probs: q must be (n, H, D) and k (C, H_kv, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    n, num_heads, d = q.shape
    ctx, num_kv, dk = k.shape
    if dk != d or num_heads % num_kv:
        raise ValueError(f"attention_probs: incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    group = num_heads // num_kv
    head_idx = torch.arange(num_heads, device=q.device) if heads is None else heads.to(q.device, torch.long)
    qf = q[:, head_idx].float()  # (n, h, D)
    kf = k.float()[:, head_idx // group]  # (C, h, D)
    logits = torch.einsum("nhd,chd->nhc", qf, kf) * scale
    if softcap and softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    key_pos = torch.arange(ctx, device=q.device)
    rel = key_pos[None, :] - q_pos.to(q.device)[:, None]  # (n, C): j - pos
    if alibi_slopes is not None:
        logits = logits + alibi_slopes.to(q.device).float()[head_idx][None, :, None] * rel[:, None, :]
    mask = rel > 0
    if sliding_window is not None and sliding_window > 0:
        mask = mask | (rel <= -sliding_window)
    logits = logits.masked_fill(mask[:, None, :], -math.inf)
    if sinks is not None:
        s = sinks.to(q.device).float()[head_idx][None, :, None].expand(n, -1, 1)
        full = torch.cat([logits, s], dim=-1)
        return torch.softmax(full, dim=-1)[..., :ctx]
    return torch.softmax(logits, dim=-1)


def reduce_heads(probs: torch.Tensor, reduce: str) -> torch.Tensor:
    """Reduce ``(n, h, C)`` probabilities over heads: ``none`` keeps them, the
    ``*_mean`` modes average (layer averaging is done by the caller across layers)."""
    if reduce == "none":
        return probs
    return probs.mean(dim=1, keepdim=True)


def history_stats(
    probs: torch.Tensor, history_len: int, sink: int, salient: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row coverage and history entropy (method.md, "One turn's reward").

    The history block is columns ``sink..history_len-1``, renormalised per row;
    coverage is the renormalised mass on ``salient`` positions (those < sink are
    ignored) and entropy is ``-sum p ln p`` (``0 ln 0 = 0``). A row with no
    history mass gives NaN for both (the reward SDK rejects such rows).

    Args:
        probs: ``(..., C)`` probabilities with ``C >= history_len``.
        history_len: number of history columns.
        sink: leading columns dropped before renormalising.
        salient: ``(m,)`` salient positions or ``None``.

    Returns:
        ``(coverage, entropy)``, each of shape ``probs.shape[:-1]``.
    """
    block = probs[..., sink:history_len].float()
    mass = block.sum(dim=-1, keepdim=True)
    p = block / mass  # NaN where mass == 0, by design
    ent = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(dim=-1)
    ent = torch.where(mass.squeeze(-1) > 0, ent, torch.full_like(ent, math.nan))
    if salient is None or salient.numel() == 0:
        cov = torch.zeros_like(ent)
    else:
        sal = salient.to(probs.device, torch.long)
        sal = sal[(sal >= sink) & (sal < history_len)] - sink
        cov = p[..., sal].sum(dim=-1)
    return cov, ent


def topk_keys(
    probs: torch.Tensor, q_pos: torch.Tensor, k: int, *, sliding_window: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` keys of highest probability of each row: the top-k capture (docs/capture.md, "Top-k mode").

    A row's keys are the positions it attends to: ``0..q_pos`` (inside the sliding window when there is one). They
    are ranked by probability, highest first, ties to the lower position; a row with fewer than ``k`` keys is padded
    with position -1 and probability 0.

    Args:
        probs: ``(n, h, C)`` probability rows (:func:`attention_probs`, or their head mean with ``h = 1``).
        q_pos: ``(n,)`` position of each row's query (``C > max(q_pos)``).
        k: keys per row, ``>= 1``.
        sliding_window: the window the rows were computed with (-1 = none).

    Returns:
        ``(positions, probabilities)``: int32 and float32, each ``(n, h, k)``.

    Example:
        >>> p = torch.tensor([[[0.2, 0.5, 0.3, 0.0]], [[0.25, 0.25, 0.25, 0.25]]])
        >>> pos, val = topk_keys(p, torch.tensor([2, 3]), 2)
        >>> pos.tolist(), val.tolist()
        ([[[1, 2]], [[0, 1]]], [[[0.5, 0.30000001192092896]], [[0.25, 0.25]]])
        >>> topk_keys(p[:1], torch.tensor([0]), 2)[0].tolist()    # one key: padded
        [[[0, -1]]]
    """
    if probs.dim() != 3:
        raise ValueError(f"topk_keys: probs must be (n, h, C), got {tuple(probs.shape)}")
    if k < 1:
        raise ValueError(f"topk_keys: k must be >= 1, got {k}")
    n, h, ctx = probs.shape
    key_pos = torch.arange(ctx, device=probs.device)
    rel = key_pos[None, :] - q_pos.to(probs.device, torch.long)[:, None]
    valid = rel <= 0
    if sliding_window is not None and sliding_window > 0:
        valid = valid & (rel > -sliding_window)
    # probabilities are >= 0: -1 ranks every non-key (and the padding) below every key
    vals = probs.float().masked_fill(~valid[:, None, :], -1.0)
    if ctx < k:
        vals = torch.cat([vals, vals.new_full((n, h, k - ctx), -1.0)], dim=-1)
    # a stable descending sort keeps equal probabilities in position order: ties go to the lower position
    top, idx = torch.sort(vals, dim=-1, descending=True, stable=True)
    top, idx = top[..., :k], idx[..., :k]
    pad = top < 0
    return idx.to(torch.int32).masked_fill(pad, -1), top.masked_fill(pad, 0.0)
