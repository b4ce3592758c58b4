"""attncap on CUDA: vLLM 0.25.1's FLASH_ATTN backend plus capture.

Same shape as :mod:`vllm_attncap.engine.cpu.backend` (Backend / MetadataBuilder / Impl,
subclassing vLLM's own classes, which the runner requires: its builders check
``isinstance(layer.impl, FlashAttentionImpl)``):

* :class:`AttnCapFlashBackend` declares FLASH_ATTN's capabilities, minus fp8 KV
  caches (capture reads keys as stored), and is named ``CUSTOM`` (vLLM looks
  backends up by enum member name; ``attncap`` is an alias of that member, see
  :mod:`vllm_attncap.engine.plugin`). ``CudaPlatform.get_attn_backend_cls`` validates
  a selected backend with the class's own ``validate_configuration`` and
  returns its path, so nothing else is needed for selection.
* :class:`AttnCapFlashMetadataBuilder` builds FLASH_ATTN's metadata and, once
  per step, the capture plan (:mod:`vllm_attncap.engine.plan`), returned in an
  :class:`AttnCapFlashMetadata`. It declares ``UNIFORM_SINGLE_TOKEN_DECODE``
  CUDA-graph support, so vLLM keeps its default ``FULL_AND_PIECEWISE`` mode: pure
  decode steps replay full graphs that hold the fused decode-capture kernel over
  static buffers (:mod:`vllm_attncap.engine.cuda.graph_step`), and a step with a
  request the graph cannot capture is switched to PIECEWISE by the runner hook
  (:mod:`vllm_attncap.engine.cuda.graph_dispatch`); docs/gpu.md, "CUDA graphs".
* :class:`AttnCapFlashImpl` runs FlashAttention first — generated tokens are
  exactly FLASH_ATTN's — then captures the planned rows of its layer.

Keys are read straight from the paged KV cache (plain layout on CUDA, no shadow
store), split exactly as ``FlashAttentionImpl`` does in vLLM 0.23-0.25:
``kv_cache.unbind(1)[0]`` of ``[num_blocks, 2, block_size, H_kv, D]``.

Two ways to compute a layer's rows, chosen once per step: the CUDA kernels
(:mod:`vllm_attncap.engine.cuda.capture`), or the torch path shared with the CPU
backend (:func:`vllm_attncap.engine.capture.capture_layer` over
:func:`~vllm_attncap.engine.reference.gather_paged_keys`).

Status: written against vLLM 0.25.1's source; not yet run on a GPU (docs/gpu.md, "What awaits a GPU run").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from ... import envs
from .. import runner_hooks
from ..backend import extend_metadata, layer_index_of, model_shape_from_config
from ..capture import capture_layer
from ..plan import StepPlan, build_step_plan
from ..reference import gather_paged_keys
from ..tracker import get_tracker
from . import kernels as attncap_cuda
from . import capture as kernel_capture
from .capture import KernelStep, kernels_available, step_uses_kernels
from .graph_buffers import BufferLayout
from . import graph_dispatch
from .graph_dispatch import policy as graph_policy
from .graph_step import GraphCapture
from .pinned import HostSink

logger = logging.getLogger("vllm_attncap")

__all__ = [
    "AttnCapFlashBackend",
    "AttnCapFlashMetadata",
    "AttnCapFlashMetadataBuilder",
    "AttnCapFlashImpl",
    "flush_pending",
    "finish_requests",
    "output_mark",
    "window_length",
]

_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


class AttnCapFlashBackend(FlashAttentionBackend):
    """FLASH_ATTN with per-request attention capture (fp16/bf16 KV caches only)."""

    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["AttnCapFlashImpl"]:
        return AttnCapFlashImpl

    @staticmethod
    def get_builder_cls() -> type["AttnCapFlashMetadataBuilder"]:
        return AttnCapFlashMetadataBuilder

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        # fp8 caches would need dequantisation with layer._k_scale before capture (not implemented).
        return kv_cache_dtype is None or kv_cache_dtype in cls.supported_kv_cache_dtypes


@dataclass
class AttnCapFlashMetadata(FlashAttentionMetadata):
    """FLASH_ATTN's metadata plus this step's capture plan.

    Attributes:
        attncap_plan: which query rows of the step are captured by the eager paths (None: none).
        attncap_graph: set on uniform single-token decode steps when the in-graph path is on: every layer launches
            the fused decode kernel over its static buffers (rows whose flag is off exit at once).
        attncap_kernel_step: what the eager kernel path decides about the step at its first captured layer
            (:class:`~.capture.KernelStep`: whether the kernels capture it, its row groups).
    """

    attncap_plan: StepPlan | None = None
    attncap_graph: GraphCapture | None = None
    attncap_kernel_step: KernelStep = field(default_factory=KernelStep)


class AttnCapFlashMetadataBuilder(FlashAttentionMetadataBuilder):
    """FLASH_ATTN metadata plus the step's capture plan (:class:`AttnCapFlashMetadata`).

    ``UNIFORM_SINGLE_TOKEN_DECODE``: full graphs hold only pure decode steps, whose captures run inside them
    (see the module docstring and docs/gpu.md).
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("attention_backend='attncap' does not support speculative decoding yet")
        tracker = get_tracker()
        if hasattr(tracker, "reset"):
            tracker.reset()  # a new engine in this process: earlier engines' captures are dead (as on CPU)
        shape = model_shape_from_config(vllm_config)
        tracker.set_model_shape(shape)
        runner_hooks.install()
        runner_hooks.on_step_end(flush_pending)
        runner_hooks.on_finish(finish_requests)
        runner_hooks.on_output(output_mark)
        graph_dispatch.install(graph_policy)
        # layer indices of this KV-cache group (several groups = several builders and plans per step)
        try:
            self._own_layers: frozenset[int] | None = frozenset(_layer_index_of_name(n) for n in layer_names)
        except (AssertionError, ValueError):  # a layer name without an index: capture every planned layer
            self._own_layers = None
        self._graph = _make_graph_capture(vllm_config, shape, self._own_layers, device)
        graph_policy.num_layers = shape.num_layers
        graph_policy.graphs = True
        graph_policy.in_graph = self._graph is not None
        if self._graph is not None:
            graph_policy.kinds = self._graph.kinds

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> AttnCapFlashMetadata:
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if _SINK.pending:  # copies of earlier eager steps: write the finished ones, never wait
            _drain_sink()
        plan = build_step_plan(runner_hooks.active_runner(), common_attn_metadata, get_tracker())
        if plan is not None:
            plan.own_layers = self._own_layers
        graph = None
        if self._graph is not None and torch.cuda.is_current_stream_capturing():
            graph = self._graph  # a graph capture's own build: attach the buffers, touch nothing
        elif self._graph is not None:
            uniform = getattr(common_attn_metadata, "max_query_len", 0) == 1
            plan = self._graph.begin_step(plan, uniform)
            # eager / piecewise decode steps launch the fused kernel only when some row uses it; full-graph
            # replays run it whatever the metadata says
            graph = self._graph if uniform and self._graph.active else None
        return extend_metadata(AttnCapFlashMetadata, md, attncap_plan=plan, attncap_graph=graph,
                               attncap_kernel_step=KernelStep())

    def build_for_cudagraph_capture(self, common_attn_metadata) -> AttnCapFlashMetadata:
        """The metadata recorded into a full graph: the same static buffers, every row off (no active runner)."""
        md = super().build_for_cudagraph_capture(common_attn_metadata)  # calls build(): no active runner, no plan
        if self._graph is None:
            return md
        if isinstance(md, AttnCapFlashMetadata):  # our declared fields: set them in place
            md.attncap_plan, md.attncap_graph = None, self._graph
            return md
        return extend_metadata(AttnCapFlashMetadata, md, attncap_plan=None, attncap_graph=self._graph)


_GRAPH: GraphCapture | None = None


def _make_graph_capture(vllm_config, shape, own_layers, device) -> GraphCapture | None:
    """The process's in-graph capture state, or None when the fused kernel cannot serve this engine."""
    global _GRAPH
    reason = None
    dtype = getattr(vllm_config.model_config, "dtype", None)
    if not envs.VLLM_ATTNCAP_GRAPH:
        reason = "VLLM_ATTNCAP_GRAPH=0"
    elif not (torch.cuda.is_available() and kernels_available()):
        reason = "the CUDA capture kernels are not built"
    elif shape.head_size not in attncap_cuda.PROBS_HEAD_DIMS:
        reason = f"head size {shape.head_size} (compiled: {attncap_cuda.PROBS_HEAD_DIMS})"
    elif shape.num_heads // shape.num_kv_heads > 32:
        reason = "more than 32 query heads per KV head"
    elif shape.num_heads * (shape.head_size + 2) * 4 > 48 * 1024:
        reason = f"{shape.num_heads} query heads of size {shape.head_size} exceed the rows pass's shared memory"
    elif dtype not in (torch.float16, torch.bfloat16):
        reason = f"model dtype {dtype}"
    elif own_layers is not None and own_layers != frozenset(range(shape.num_layers)):
        reason = "several KV-cache groups"
    if reason is not None:
        logger.info("vllm_attncap: decode capture inside full CUDA graphs is off (%s); capturing steps run PIECEWISE",
                    reason)
        _GRAPH = None
        return None
    from .pinned import CudaRingOps, Uploader
    from .result_ring import ResultRing

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    max_rows = vllm_config.scheduler_config.max_num_seqs
    layout = BufferLayout(max_rows=max_rows, num_layers=shape.num_layers, num_heads=shape.num_heads,
                          num_kv_heads=shape.num_kv_heads, width=shape.max_model_len,
                          n_splits=envs.VLLM_ATTNCAP_SPLITS)
    kinds = ("stats", "rows") if envs.VLLM_ATTNCAP_GRAPH_ROWS else ("stats",)
    if _GRAPH is not None and _GRAPH.layout == layout and _GRAPH.buffers.stats.device == dev and _GRAPH.kinds == kinds:
        _GRAPH.reset()  # another builder of this engine, or a new engine in this process: same buffers
        return _GRAPH
    ring_slots = envs.VLLM_ATTNCAP_RING_SLOTS
    # one step's upload: the row table + the masks of at most max_rows requests seen for the first time
    upload_bytes = max_rows * (8 * 4 + shape.num_layers + shape.num_heads + layout.width + 48) + 64
    attncap_cuda.preload(dev)  # no kernel module may load lazily inside a graph capture
    _GRAPH = GraphCapture(
        layout,
        alloc=lambda shp, dt: torch.zeros(shp, dtype=dt, device=dev),
        uploader=Uploader(dev, upload_bytes),
        make_ring=lambda nbytes: ResultRing(CudaRingOps(dev), ring_slots, nbytes),
        kinds=kinds,
    )
    logger.info("vllm_attncap: decode capture inside full CUDA graphs is on (%.1f MiB of static buffers)",
                layout.nbytes() / 2**20)
    return _GRAPH


class AttnCapFlashImpl(FlashAttentionImpl):
    """FlashAttention's computation, then capture of this layer's planned rows."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._layer_index: int | None = None
        self._dev: dict[str, Any] = {}

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
        plan = attn_metadata.attncap_plan if isinstance(attn_metadata, AttnCapFlashMetadata) else None
        graph = attn_metadata.attncap_graph if isinstance(attn_metadata, AttnCapFlashMetadata) else None
        if (plan is None and graph is None) or self.attn_type != AttentionType.DECODER:
            return output
        if self._layer_index is None:
            self._layer_index = layer_index_of(layer)
        if graph is not None:
            self._graph_capture(graph, query, kv_cache, attn_metadata)
        if plan is None or not plan.wants(self._layer_index):
            return output
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return output  # never inside a graph capture (plans only exist in real steps anyway)
        reason = _unsupported(self, attn_metadata)
        if reason is not None:
            _warn_once(reason, "vllm_attncap: capture skipped: %s", reason)
            return output
        key_cache = kv_cache.unbind(1)[0]  # vLLM 0.23-0.25 FlashAttention split
        window = window_length(self, attn_metadata)
        step = attn_metadata.attncap_kernel_step
        if step_uses_kernels(plan, step, self, query, key_cache):
            kernel_capture.capture_layer(self, self._layer_index, query, key_cache, attn_metadata.block_table, window,
                                         plan, step, _SINK)
        else:
            capture_layer(self, self._layer_index, query,
                          lambda b: gather_paged_keys(key_cache, b.block_table_row, b.ctx_len), plan,
                          sliding_window=window)
        return output

    def _graph_capture(self, graph: GraphCapture, query, kv_cache, md) -> None:
        """Launch the fused decode kernel of this layer over the static buffers (recorded into a full graph)."""
        dc = self._dev.get("decode")
        if dc is None or dc[0] is not graph:
            if _unsupported(self, md) is not None:
                return
            dev = query.device
            dc = self._dev["decode"] = (graph, attncap_cuda.DecodeCapture(
                graph.buffers, layer=self._layer_index, scale=self.scale, softcap=float(self.logits_soft_cap or 0.0),
                window=window_length(self, md), alibi=self.alibi_on(dev), sinks=self.sinks_on(dev),
                rows="rows" in graph.kinds))
        dc[1].launch(query, kv_cache.unbind(1)[0], md.block_table, md.seq_lens, query.shape[0])

    # device copies of per-head parameters (kernels want float32 on the device)
    def alibi_on(self, device: torch.device) -> torch.Tensor | None:
        a = self.alibi_slopes
        if a is None:
            return None
        t = self._dev.get("alibi")
        if t is None or t.device != device:
            t = self._dev["alibi"] = a.to(device=device, dtype=torch.float32).contiguous()
        return t

    def sinks_on(self, device: torch.device) -> torch.Tensor | None:
        s = self.sinks
        if s is None:
            return None
        key = (s.data_ptr(), s._version, device)
        ent = self._dev.get("sinks")
        if ent is None or ent[0] != key:  # weights reloaded (e.g. an RL weight sync): refresh
            ent = self._dev["sinks"] = (key, s.detach().to(device=device, dtype=torch.float32).contiguous())
        return ent[1]


def _layer_index_of_name(name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(name)


def _unsupported(impl: AttnCapFlashImpl, md: Any) -> str | None:
    """Why this layer's capture would not match what FlashAttention computed, or None."""
    if getattr(md, "causal", True) is not True:
        return "non-causal or per-sequence causal attention"
    if getattr(md, "mm_prefix_range_tensor", None) is not None:
        return "bidirectional multimodal prefix ranges"
    if getattr(md, "rswa_prefix_lens", None) is not None:
        return "R-SWA attention"
    if getattr(impl, "dcp_world_size", 1) > 1:
        return "decode context parallelism"
    return None


def window_length(impl: FlashAttentionImpl, md: Any) -> int:
    """The sliding window FlashAttention used, as :func:`reference.attention_probs` takes it.

    FlashAttentionImpl (0.25.1) uses ``md.sliding_window`` when set, else its own
    ``(left, right)`` tuple; a causal window ``(w - 1, 0)`` attends to keys
    ``j >= pos - (w - 1)``, i.e. the reference's ``sliding_window = w``; ``-1`` = none.
    """
    window = getattr(md, "sliding_window", None)
    if window is None:
        window = impl.sliding_window
    if window is None:
        return -1
    left = int(window[0])
    return left + 1 if left >= 0 else -1


_SINK = HostSink()


def _drain_sink() -> None:
    drain = getattr(_SINK, "drain_ready", None)
    if drain is not None:
        drain()
    else:
        _SINK.flush()


def flush_pending() -> None:
    """After each step's forward: submit the step's in-graph results to the result ring and write the eager
    path's finished copies into their request buffers (neither waits for the device)."""
    if _GRAPH is not None:
        _GRAPH.end_step()
    if _SINK.pending:
        _drain_sink()


def output_mark():
    """When a step's output is produced: a callable that writes every result submitted so far (waiting for those
    only), run by the runner hook before that output leaves the worker."""
    g = _GRAPH.mark() if _GRAPH is not None else 0
    sink = getattr(_SINK, "submitted", None)
    graph = _GRAPH

    def flush() -> None:
        if graph is not None:
            graph.flush_through(g)
        if sink is not None:
            _SINK.flush_through(sink)
        elif _SINK.pending:
            _SINK.flush()

    return flush


def finish_requests(req_ids) -> None:
    """Before vLLM's finished requests are closed: write their in-flight results (waiting only for those)."""
    if _GRAPH is not None:
        _GRAPH.finish(req_ids)
    if _SINK.pending:
        _SINK.flush()
