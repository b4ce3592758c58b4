"""attncap on CPU: vLLM's CPU_ATTN backend plus capture.

Backend / MetadataBuilder / Impl, as in vLLM's own backends:

* :class:`AttnCapCPUBackend` only declares capabilities (inherited from
  ``CPUAttentionBackend``) and points at the builder and impl. Its name is
  ``CUSTOM``: vLLM looks backends up by enum member name, and ``attncap`` is an
  alias of that member (see :mod:`vllm_attncap.engine.plugin`).
* :class:`AttnCapCPUMetadataBuilder` builds the stock metadata and, once per
  step, the capture plan (:mod:`vllm_attncap.engine.plan`).
* :class:`AttnCapCPUImpl` runs the stock kernel first — generated tokens are
  exactly CPU_ATTN's — then captures the planned rows of its layer, all rows of
  the step in one call of the CPU capture kernel (:mod:`vllm_attncap.engine.cpu.capture`).

Why a shadow key store: the CPU KV cache holds keys in an ISA-specific packed
layout (column-major blocks for ``vec``, VNNI tiles for ``amx``); reading it
back naively gives wrong keys. ``do_kv_cache_update`` therefore also
writes each token's key, unpacked, into a slot-indexed shadow tensor. Indexing
by KV-cache slot keeps prefix-cache hits and recomputed blocks correct. It
costs one extra key copy per token and memory equal to the key half of the KV
cache, only when this backend is selected. ``$VLLM_ATTNCAP_CPU_SHADOW_LAYERS``
(:func:`shadow_layers`) caps both to the layers listed there; requests for other
layers are refused, each with an error naming the field.

With prefix caching off no request reads another's KV blocks, so a step writes
shadow keys only for the layers its own capturing requests select
(:class:`StepKeys`): a step in which nobody captures copies nothing, and
last-layer capture copies one layer's keys, not every layer's. With prefix
caching on, every kept layer is written every step, since a later capturing
request may hit a block written now.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from ... import envs
from .. import runner_hooks
from ..backend import extend_metadata, layer_index_of, model_shape_from_config
from ..plan import StepPlan, build_step_plan
from ..tracker import get_tracker
from . import kernels as cpu_kernels
from . import capture as cpu_capture

logger = logging.getLogger("vllm_attncap")

__all__ = ["AttnCapCPUBackend", "AttnCapCPUMetadata", "AttnCapCPUMetadataBuilder", "AttnCapCPUImpl",
           "SHADOW_LAYERS_ENV", "STEP_KEYS", "StepKeys", "shadow_layers"]

#: Layers whose keys the CPU backend keeps for capture: ``all`` (default) or comma-separated indices (negative
#: counts from the end), e.g. ``-1`` for the last layer only.
SHADOW_LAYERS_ENV = "VLLM_ATTNCAP_CPU_SHADOW_LAYERS"


def shadow_layers(num_layers: int, value: str | None = None) -> frozenset[int] | None:
    """The layers ``$VLLM_ATTNCAP_CPU_SHADOW_LAYERS`` (or ``value``) keeps shadow keys for; None means all.

    Raises:
        ValueError: naming the setting and the allowed values, for anything but ``all`` or in-range indices.
    """
    raw = envs.get(SHADOW_LAYERS_ENV) if value is None else value
    text = raw.strip().lower()
    if text in ("", "all"):
        return None
    out = set()
    for part in text.split(","):
        try:
            i = int(part)
        except ValueError:
            i = None
        if i is None or not -num_layers <= i < num_layers:
            raise ValueError(f"{SHADOW_LAYERS_ENV}={raw!r}: allowed values are 'all' or comma-separated layer "
                             f"indices in [-{num_layers}, {num_layers - 1}]")
        out.add(i % num_layers)
    return frozenset(out)


class StepKeys:
    """Which layers write shadow keys in the step being run: set by the builder once per step, read by every
    layer's :meth:`AttnCapCPUImpl.do_kv_cache_update` (one per worker process, like the tracker).

    Attributes:
        layers: the layers the step's capturing requests select (empty: nobody captures); None means every kept
            layer (prefix caching on, or before the first step is built).
    """

    layers: frozenset[int] | None = None

    def writes(self, layer_index: int) -> bool:
        return self.layers is None or layer_index in self.layers


STEP_KEYS = StepKeys()


class AttnCapCPUBackend(CPUAttentionBackend):
    """CPU_ATTN with per-request attention capture."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["AttnCapCPUImpl"]:
        return AttnCapCPUImpl

    @staticmethod
    def get_builder_cls() -> type["AttnCapCPUMetadataBuilder"]:
        return AttnCapCPUMetadataBuilder


@dataclass
class AttnCapCPUMetadata(CPUAttentionMetadata):
    """CPU_ATTN's metadata plus this step's capture plan.

    Attributes:
        attncap_plan: which query rows of the step are captured, for which request (None: nobody captures).
        attncap_cpu_step: the CPU kernel path's tables for the step (:func:`~.capture.prepare_step`), made by the
            Impl at the step's first captured layer.
    """

    attncap_plan: StepPlan | None = None
    attncap_cpu_step: cpu_capture.CpuStep | None = None


class AttnCapCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """Stock CPU metadata plus the step's capture plan (:class:`AttnCapCPUMetadata`)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        tracker = get_tracker()
        tracker.reset()  # a new engine in this process: earlier engines' captures are dead
        shape = model_shape_from_config(vllm_config)
        tracker.set_model_shape(shape)
        tracker.set_cache_type(cpu_capture.CpuRequestCache)
        raw = envs.get(SHADOW_LAYERS_ENV)
        tracker.set_capturable_layers(shadow_layers(shape.num_layers, raw), f"{SHADOW_LAYERS_ENV}={raw}")
        runner_hooks.install()  # no CUDA graphs on CPU: no per-step graph decision is registered
        # With prefix caching a later request may read the blocks written now: every step keeps every kept layer.
        self._keys_every_step = bool(getattr(vllm_config.cache_config, "enable_prefix_caching", True))
        STEP_KEYS.layers = None

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> AttnCapCPUMetadata:
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        key_layers: set[int] | None = None if self._keys_every_step else set()
        plan = build_step_plan(runner_hooks.active_runner(), common_attn_metadata, get_tracker(), key_layers)
        STEP_KEYS.layers = None if key_layers is None else frozenset(key_layers)
        return extend_metadata(AttnCapCPUMetadata, md, attncap_plan=plan)


class AttnCapCPUImpl(CPUAttentionBackendImpl):
    """CPU_ATTN's computation, then capture of this layer's planned rows."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._key_slots: torch.Tensor | None = None
        self._layer_index: int | None = None
        self._keeps_keys: bool | None = None  # whether this layer keeps shadow keys (decided at its first write)

    def _shadow(self, kv_cache: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        n = num_blocks * block_size
        s = self._key_slots
        if s is None or s.shape[0] != n or s.dtype != key.dtype:
            s = torch.zeros((n, num_kv_heads, self.head_size), dtype=key.dtype, device=key.device)
            self._key_slots = s
        return s

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if kv_cache.numel() == 0:
            return
        if self._keeps_keys is None:
            if self._layer_index is None:
                self._layer_index = layer_index_of(layer)
            kept = get_tracker().capturable_layers
            self._keeps_keys = kept is None or self._layer_index in kept
        if self._keeps_keys and STEP_KEYS.writes(self._layer_index):
            cpu_kernels.write_shadow(self._shadow(kv_cache, key), key, slot_mapping)

    def forward(
        self,
        layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,
        output_scale=None,
        output_block_scale=None,
    ):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        plan = attn_metadata.attncap_plan if isinstance(attn_metadata, AttnCapCPUMetadata) else None
        if plan is not None and self._key_slots is not None:
            if self._layer_index is None:
                self._layer_index = layer_index_of(layer)
            if plan.wants(self._layer_index):
                step = attn_metadata.attncap_cpu_step
                if step is None:
                    step = attn_metadata.attncap_cpu_step = cpu_capture.prepare_step(plan, self._key_slots.dtype)
                cpu_capture.capture_layer(
                    self, self._layer_index, query, self._key_slots, kv_cache.shape[2], plan, step,
                    sliding_window=self.sliding_window if self.sliding_window is not None else -1,
                )
        return output
