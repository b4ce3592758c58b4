"""The key cache inside vLLM's FlashAttention KV cache, read from the cache tensor itself.

vLLM changed the FlashAttention KV-cache layout between the releases attncap supports:

===========================  ==========================================  ==========================================
layout                       tensor the backend's ``forward`` receives   FlashAttentionImpl's split
===========================  ==========================================  ==========================================
``"kv_first"`` (<= 0.25.1)   ``(num_blocks, 2, block_size, H_kv, D)``    ``kv_cache.unbind(1)`` -> K, V
``"head_major"`` (0.31-0.34) ``(num_blocks, H_kv, block_size, 2 * D)``   ``kv_cache.transpose(1, 2).split(D, -1)``
===========================  ==========================================  ==========================================

(0.25.1 states its layout in ``FlashAttentionBackend.get_kv_cache_shape``; from 0.31 that method is gone and the
cache is the 4-D logical ``(B, H, N, C)`` of ``vllm.v1.kv_cache_interface.compute_layer_kv_cache_shape_bytes``.)
Either way the key cache attncap reads is a ``(num_blocks, block_size, H_kv, D)`` view with a contiguous last
dimension; the kernels and the torch path take its strides, so both layouts need no copy.

:func:`probe_layout` asks the backend class (``get_kv_cache_shape`` where it exists, with sizes that cannot be
confused) and :func:`key_cache_view` checks the tensor against the layout and returns the view. A tensor that fits
neither raises ``ValueError`` naming its shape: never keys read from the wrong place.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["KV_FIRST", "HEAD_MAJOR", "LAYOUTS", "probe_layout", "layout_of", "key_cache_view"]

KV_FIRST = "kv_first"
HEAD_MAJOR = "head_major"
LAYOUTS = (KV_FIRST, HEAD_MAJOR)

# probe sizes: pairwise different, so the position of each in the probed shape is unambiguous
_PB, _PN, _PH, _PD = 3, 16, 5, 8


def probe_layout(backend_cls: Any) -> str:
    """The layout a FlashAttention backend class allocates (see the module docstring).

    ``get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)`` where the class has it (<= 0.25.1);
    without it, the 4-D ``(B, H_kv, N, 2 * D)`` layout of the releases that removed it.

    Raises:
        ValueError: the class states a shape that is neither layout.
    """
    fn = getattr(backend_cls, "get_kv_cache_shape", None)
    if fn is None:
        return HEAD_MAJOR
    shape = tuple(int(x) for x in fn(_PB, _PN, _PH, _PD))
    if shape == (_PB, 2, _PN, _PH, _PD):
        return KV_FIRST
    if shape == (_PB, _PH, _PN, 2 * _PD):
        return HEAD_MAJOR
    raise ValueError(f"attncap: unknown FlashAttention KV-cache layout {shape} for (num_blocks={_PB}, "
                     f"block_size={_PN}, num_kv_heads={_PH}, head_size={_PD}); supported: "
                     f"{(_PB, 2, _PN, _PH, _PD)} ({KV_FIRST}) and {(_PB, _PH, _PN, 2 * _PD)} ({HEAD_MAJOR})")


def layout_of(kv_cache: torch.Tensor, num_kv_heads: int, head_size: int) -> str:
    """The layout of one layer's KV-cache tensor, from its shape alone.

    Raises:
        ValueError: the shape fits neither layout.
    """
    s = tuple(kv_cache.shape)
    if len(s) == 5 and s[1] == 2 and s[3] == num_kv_heads and s[4] == head_size:
        return KV_FIRST
    if len(s) == 4 and s[1] == num_kv_heads and s[3] == 2 * head_size:
        return HEAD_MAJOR
    raise ValueError(f"attncap: KV cache of shape {s} fits no known FlashAttention layout for {num_kv_heads} KV "
                     f"heads of size {head_size}: expected (num_blocks, 2, block_size, {num_kv_heads}, {head_size}) "
                     f"or (num_blocks, {num_kv_heads}, block_size, {2 * head_size})")


def key_cache_view(kv_cache: torch.Tensor, num_kv_heads: int, head_size: int, layout: str | None = None) -> torch.Tensor:
    """The keys of ``kv_cache`` as a ``(num_blocks, block_size, H_kv, D)`` view (no copy), split as vLLM's
    FlashAttentionImpl splits it.

    Args:
        layout: the probed layout (:func:`probe_layout`); the tensor must fit it. None: read from the shape.

    Raises:
        ValueError: the tensor does not fit ``layout`` (or no layout).
    """
    found = layout_of(kv_cache, num_kv_heads, head_size)
    if layout is not None and found != layout:
        raise ValueError(f"attncap: KV cache of shape {tuple(kv_cache.shape)} has the {found} layout, but the "
                         f"backend allocates {layout}")
    if found == KV_FIRST:
        return kv_cache.unbind(1)[0]
    return kv_cache.transpose(1, 2)[..., :head_size]
