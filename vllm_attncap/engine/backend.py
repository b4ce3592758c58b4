"""Helpers shared by the attncap backends (model facts, layer identity)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from .parallel import check_supported, global_counts, rank_facts
from .tracker import ModelShape

__all__ = ["extend_metadata", "layer_index_of", "model_shape_from_config"]

_M = TypeVar("_M")


def extend_metadata(cls: type[_M], base: Any, **extra: Any) -> _M:
    """An instance of ``cls`` (a dataclass subclass of ``type(base)``'s class) with ``base``'s fields plus ``extra``.

    How a backend adds its fields to vLLM's metadata: by a declared subclass, never by attributes stuck onto vLLM's
    object.
    """
    init = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    md = cls(**init, **extra)
    for f in dataclasses.fields(base):
        if not f.init:
            object.__setattr__(md, f.name, getattr(base, f.name))
    return md


def layer_index_of(layer) -> int:
    """Model layer index of an attention layer (``model.layers.7.self_attn.attn`` -> 7)."""
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer.layer_name)


def model_shape_from_config(vllm_config) -> ModelShape:
    """The whole model's layer/head counts, used to validate capture specs in the worker (every rank validates
    against the same counts, so a spec is accepted or refused on all ranks alike), and this worker's place in the
    TP x PP grid (:func:`~vllm_attncap.engine.parallel.rank_facts`).

    Raises:
        ValueError: for a setting capture does not support (:func:`~vllm_attncap.engine.parallel.check_supported`:
            data parallelism, decode context parallelism, speculative decoding, MLA), naming it.
    """
    check_supported(vllm_config)
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    num_layers, num_heads = global_counts(vllm_config)
    return ModelShape(
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=mc.get_num_kv_heads(pc),
        head_size=mc.get_head_size(),
        max_model_len=mc.max_model_len,
        ranks=rank_facts(vllm_config),
    )
