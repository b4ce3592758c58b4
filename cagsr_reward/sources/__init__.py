"""Attention sources: where the attention that produced a completion comes from when it was not captured.

A source is any object with ``attention(prompt_ids, completion_ids) -> np.ndarray`` returning the capture layout of
method.md, float32 ``(L, H, T, P+T-1)`` (see :class:`AttentionSource`). :class:`HFAttentionSource` recomputes it with a
Hugging Face model; attention captured by the vLLM plugin needs no source.

A *likelihood* is any object with ``logprobs(prompt_ids, completion_ids) -> np.ndarray`` (see :class:`Likelihood`):
the per-token log-probabilities the grounding term needs. :class:`HFAttentionSource` is one (the same model that
gives the attention); :class:`HFLikelihood` is one without attention, for a caller whose attention is captured.

Importing this package does not import torch or transformers.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..attention import CapturedAttention
from .hf import REDUCE_MODES, HFAttentionSource, HFLikelihood

__all__ = [
    "AttentionSource", "HFAttentionSource", "HFLikelihood", "Likelihood", "REDUCE_MODES", "capture_from_source",
]


@runtime_checkable
class AttentionSource(Protocol):
    """What the reward integrations need from an attention source.

    ``attention(prompt_ids, completion_ids)`` returns float32 ``(L, H, T, P+T-1)`` with ``P = len(prompt_ids)`` and
    ``T = len(completion_ids)``: row ``s`` is the attention of the query at position ``P-1+s`` over keys
    ``0..P-1+s``, zeros to the right (method.md, "Attention that produced a token").

    A source may also have ``capture(prompt_ids, completion_ids) -> CapturedAttention`` (the value the reward SDK
    consumes, with the layer ids and reduction); otherwise :func:`capture_from_source` builds it from
    ``attention()`` and the optional attributes ``layer_ids`` (model layer id of each ``L`` entry, or ``None``),
    ``num_layers``, ``reduce`` (``"none"``, ``"head_mean"`` or ``"layer_head_mean"``) and ``selected_layer_ids``.
    ``tokenizer`` is read when present.

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


@runtime_checkable
class Likelihood(Protocol):
    """What the grounding term needs from a scoring model.

    ``logprobs(prompt_ids, completion_ids)`` returns float ``(T,)``: the teacher-forced $\\log p(y_s \\mid x,
    y_{<s})$ of each of the ``T = len(completion_ids)`` tokens after the ``prompt_ids`` context. The reward calls it
    twice per completion: after the chat prompt and after the empty conversation
    (`cagsr_reward.encoding.prior_prompt_ids`). The model must read the policy's token ids (same tokenizer).

    Example:
        >>> class Flat:
        ...     def logprobs(self, prompt_ids, completion_ids):
        ...         return np.full(len(completion_ids), -np.log(100.0))
        >>> isinstance(Flat(), Likelihood)
        True
    """

    def logprobs(self, prompt_ids: Any, completion_ids: Any) -> np.ndarray: ...


def capture_from_source(source: Any, prompt_ids: Any, completion_ids: Any) -> CapturedAttention:
    """The :class:`~cagsr_reward.attention.CapturedAttention` of ``completion_ids`` after ``prompt_ids`` from ``source``."""
    if hasattr(source, "capture"):
        return source.capture(prompt_ids, completion_ids)
    reduce = getattr(source, "reduce", "none") or "none"
    layer_ids = getattr(source, "selected_layer_ids", None) if reduce == "layer_head_mean" else getattr(source, "layer_ids", None)
    return CapturedAttention(
        len(prompt_ids),
        np.asarray(source.attention(prompt_ids, completion_ids)),
        reduce=reduce,
        layer_ids=layer_ids,
        num_layers=getattr(source, "num_layers", None),
        prompt_token_ids=[int(t) for t in prompt_ids],
        token_ids=[int(t) for t in completion_ids],
    )
