"""Helpers shared by the attncap backends (model facts, layer identity)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from ..tracker import ModelShape

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
    """Layer/head counts used to validate capture specs in the worker.

    Raises:
        ValueError: for tensor parallelism > 1 (heads are sharded across ranks;
            not supported by capture yet).
    """
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    if pc.tensor_parallel_size > 1 or pc.pipeline_parallel_size > 1:
        raise ValueError(
            "attention_backend='attncap' supports tensor_parallel_size=1 and pipeline_parallel_size=1 only"
        )
    return ModelShape(
        num_layers=mc.get_num_layers(pc),
        num_heads=mc.get_num_attention_heads(pc),
        num_kv_heads=mc.get_num_kv_heads(pc),
        head_size=mc.get_head_size(),
        max_model_len=mc.max_model_len,
    )
