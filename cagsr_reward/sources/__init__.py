"""Attention sources: where the attention that produced a completion comes from when it was not captured.

A source is any object with ``attention(prompt_ids, completion_ids) -> np.ndarray`` returning the capture layout of
method.md, float32 ``(L, H, T, P+T-1)`` (see :class:`AttentionSource`). :class:`HFAttentionSource` recomputes it with a
Hugging Face model; attention captured by the vLLM plugin needs no source.

Importing this package does not import torch or transformers.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from .hf import REDUCE_MODES, HFAttentionSource

__all__ = ["AttentionSource", "HFAttentionSource", "REDUCE_MODES"]


@runtime_checkable
class AttentionSource(Protocol):
    """What the reward integrations need from an attention source.

    ``attention(prompt_ids, completion_ids)`` returns float32 ``(L, H, T, P+T-1)`` with ``P = len(prompt_ids)`` and
    ``T = len(completion_ids)``: row ``s`` is the attention of the query at position ``P-1+s`` over keys
    ``0..P-1+s``, zeros to the right (method.md, "Attention that produced a token").

    Optional attributes the integrations read when present: ``layer_ids`` (model layer id of each ``L`` entry, or
    ``None``), ``num_layers``, ``reduce`` (``"none"``, ``"head_mean"`` or ``"layer_head_mean"``),
    ``selected_layer_ids`` and ``tokenizer``.

    Example:
        >>> class Uniform:
        ...     def attention(self, prompt_ids, completion_ids):
        ...         P, T = len(prompt_ids), len(completion_ids)
        ...         a = np.zeros((1, 1, T, P + T - 1), np.float32)
        ...         for s in range(T):
        ...             a[0, 0, s, : P + s] = 1.0 / (P + s)
        ...         return a
        >>> isinstance(Uniform(), AttentionSource)
        True
    """

    def attention(self, prompt_ids: Any, completion_ids: Any) -> np.ndarray: ...
