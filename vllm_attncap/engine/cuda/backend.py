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
store), split as ``FlashAttentionImpl`` splits it in the running release: the layout
is probed once from the backend class and checked against the cache tensor
(:mod:`vllm_attncap.engine.cuda.kv_layout`: ``[num_blocks, 2, block_size, H_kv, D]``,
``unbind(1)``, up to 0.25.1; ``[num_blocks, H_kv, block_size, 2 * D]``,
``transpose(1, 2).split(D, -1)``, from 0.31).

Two ways to compute a layer's rows, chosen once per step: the CUDA kernels
(:mod:`vllm_attncap.engine.cuda.capture`), or the torch path shared with the CPU
backend (:func:`vllm_attncap.engine.capture.capture_layer` over
:func:`~vllm_attncap.engine.reference.gather_paged_keys`).

Status: written against vLLM 0.25.1's source and checked statically against 0.33 / 0.34
(``scripts/check_vllm_seams.py``); not yet run on a GPU (docs/gpu.md, "What awaits a GPU run").
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
from .kv_layout import key_cache_view, probe_layout
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

    A step where nobody captures gets vLLM's own :class:`FlashAttentionMetadata` (no copy), not this class.
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
        global _KV_LAYOUT
        _KV_LAYOUT = probe_layout(AttnCapFlashBackend)
        self._layer_names = list(layer_names)
        self._vllm_config = vllm_config
        self._graph = _make_graph_capture(vllm_config, shape, self._own_layers, device)
        graph_policy.num_layers = shape.num_layers
        graph_policy.graphs = True
        graph_policy.in_graph = self._graph is not None
        if self._graph is not None:
            graph_policy.kinds = self._graph.kinds
            graph_policy.step_in_graph = _step_in_graph

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
            if uniform and plan is not None and _unsupported_md(md) is not None:
                uniform = False  # the kernel must not run for this step: its rows stay with the eager paths
            plan = self._graph.begin_step(plan, uniform, replays=uniform and not graph_policy.force
                                          and self._graph.full_graphs)
            # eager / piecewise decode steps launch the fused kernel only when some row uses it; full-graph
            # replays run it whatever the metadata says
            graph = self._graph if uniform and self._graph.active else None
        if plan is None and graph is None:
            return md  # nobody captures in this step: vLLM's own metadata, no copy (forward checks its type)
        return extend_metadata(AttnCapFlashMetadata, md, attncap_plan=plan, attncap_graph=graph,
                               attncap_kernel_step=KernelStep())

    def build_for_cudagraph_capture(self, common_attn_metadata) -> AttnCapFlashMetadata:
        """The metadata recorded into a full graph: the same static buffers, every row off (no active runner)."""
        md = super().build_for_cudagraph_capture(common_attn_metadata)  # calls build(): no active runner, no plan
        if self._graph is None:
            return md
        self._prepare_records(md)  # outside the stream capture (V1 captures right after this call)
        if isinstance(md, AttnCapFlashMetadata):  # our declared fields: set them in place
            md.attncap_plan, md.attncap_graph = None, self._graph
            return md
        return extend_metadata(AttnCapFlashMetadata, md, attncap_plan=None, attncap_graph=self._graph)

    def _prepare_records(self, md) -> None:
        """Build every layer's fused-kernel launch record (and its float32 ALiBi / sink copies on the device) now,
        outside any stream capture: a pageable host-to-device copy is illegal inside one, and a conversion recorded
        into one graph would live in that graph's private memory while every other graph reads it."""
        ctx = getattr(getattr(self._vllm_config, "compilation_config", None), "static_forward_context", None) or {}
        for name in self._layer_names:
            layer = ctx.get(name)
            impl = getattr(layer, "impl", None)
            if isinstance(impl, AttnCapFlashImpl) and impl.attn_type == AttentionType.DECODER:
                impl.decode_record(self._graph, layer, md, self.device)


_GRAPH: GraphCapture | None = None


def _make_graph_capture(vllm_config, shape, own_layers, device) -> GraphCapture | None:
    """The process's in-graph capture state, or None when the fused kernel cannot serve this engine."""
    global _GRAPH

    reason = graph_refusal(vllm_config, shape, own_layers)
    if reason is None and not (torch.cuda.is_available() and kernels_available()):
        reason = "the CUDA capture kernels are not built"
    kinds = ("stats", "rows") if envs.VLLM_ATTNCAP_GRAPH_ROWS else ("stats",)
    max_rows = vllm_config.scheduler_config.max_num_seqs
    ring_slots = envs.VLLM_ATTNCAP_RING_SLOTS
    layout = None
    if reason is None:
        layout = BufferLayout(max_rows=max_rows, num_layers=shape.num_layers, num_heads=shape.num_heads,
                              num_kv_heads=shape.num_kv_heads, width=shape.max_model_len,
                              n_splits=envs.VLLM_ATTNCAP_SPLITS)
        kinds, reason = fit_graph_budget(layout, kinds, ring_slots, graph_budget_bytes())
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
    if _GRAPH is not None and _GRAPH.layout == layout and _GRAPH.buffers.stats.device == dev and _GRAPH.kinds == kinds:
        _GRAPH.reset()  # another builder of this engine, or a new engine in this process: same buffers
        _GRAPH.full_graphs = _runs_full_graphs(vllm_config)
        return _GRAPH
    # one step's upload: the row table + the masks of at most max_rows requests seen for the first time
    upload_bytes = max_rows * (8 * 4 + shape.num_layers + shape.num_heads + layout.width + 48) + 64
    attncap_cuda.preload(dev)  # no kernel module may load lazily inside a graph capture
    _GRAPH = GraphCapture(
        layout,
        alloc=lambda shp, dt: torch.zeros(shp, dtype=dt, device=dev),
        uploader=Uploader(dev, upload_bytes),
        make_ring=lambda nbytes: ResultRing(CudaRingOps(dev), ring_slots, nbytes),
        kinds=kinds,
        fail=lambda rid, msg: get_tracker().fail(rid, msg),
    )
    _GRAPH.full_graphs = _runs_full_graphs(vllm_config)
    logger.info("vllm_attncap: decode capture inside full CUDA graphs is on (kinds %s; %.1f MiB of static device "
                "buffers and at most %.1f MiB of pinned result ring, allocated after vLLM's memory profiling: "
                "VLLM_ATTNCAP_GRAPH_MAX_MIB caps them, docs/gpu.md)", kinds, layout.nbytes(kinds) / 2**20,
                ring_slots * _GRAPH.slot_bytes() / 2**20)
    return _GRAPH


#: Cap on the in-graph path's memory outside vLLM's profiling (``VLLM_ATTNCAP_GRAPH_MAX_MIB``, MiB): the static
#: device buffers plus the pinned result ring. Over it, the head-mean rows pass is dropped first (its buffers grow
#: with max_num_seqs x max_model_len), then the whole in-graph path (capturing steps run PIECEWISE).
GRAPH_MAX_MIB_ENV = "VLLM_ATTNCAP_GRAPH_MAX_MIB"
GRAPH_MAX_MIB_DEFAULT = 256


def graph_budget_bytes() -> int:
    mib = float(envs.VLLM_ATTNCAP_GRAPH_MAX_MIB)
    if mib < 0:
        raise ValueError(f"{GRAPH_MAX_MIB_ENV}={mib!r}: expected a number of MiB (>= 0)")
    return int(mib * 2**20)


def fit_graph_budget(layout: BufferLayout, kinds: tuple[str, ...], ring_slots: int,
                     budget: int) -> tuple[tuple[str, ...], str | None]:
    """The kinds the in-graph path can afford under ``budget`` bytes (device buffers + ``ring_slots`` pinned
    result slots), and None; or the kinds and why the path is off."""
    def cost(k: tuple[str, ...]) -> int:
        return layout.nbytes(k) + ring_slots * layout.result_bytes(k)

    if cost(kinds) <= budget:
        return kinds, None
    if "rows" in kinds and cost(("stats",)) <= budget:
        logger.warning("vllm_attncap: head-mean rows inside full graphs would take %.0f MiB (> %s=%.0f); only "
                       "statistics run in the graph, rows requests run PIECEWISE", cost(kinds) / 2**20,
                       GRAPH_MAX_MIB_ENV, budget / 2**20)
        return ("stats",), None
    return kinds, (f"its buffers would take {cost(kinds) / 2**20:.0f} MiB (> {GRAPH_MAX_MIB_ENV}="
                   f"{budget / 2**20:.0f}); lower max_num_seqs or max_model_len, or raise the cap")


def graph_refusal(vllm_config, shape, own_layers) -> str | None:
    """Why this engine's configuration keeps capture out of the full decode graphs (None: it can run there).

    The fused kernel sees one rank's heads and layers: under tensor parallelism a rank holds ``H / tp`` query and
    ``H_kv / tp`` KV heads while :class:`~vllm_attncap.engine.tracker.ModelShape` counts the whole model's query
    heads (specs are validated against those), so the graph path is off and capturing steps run PIECEWISE through
    the eager path, which handles sharded requests (docs/parallel.md). Pipeline parallelism gives a rank a subset
    of the layers: off as well.
    """
    pc = getattr(vllm_config, "parallel_config", None)
    tp = int(getattr(pc, "tensor_parallel_size", 1) or 1)
    pp = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
    dtype = getattr(vllm_config.model_config, "dtype", None)
    if not envs.VLLM_ATTNCAP_GRAPH:
        return "VLLM_ATTNCAP_GRAPH=0"
    if tp > 1:
        return f"tensor parallelism (tensor_parallel_size={tp})"
    if pp > 1:
        return f"pipeline parallelism (pipeline_parallel_size={pp})"
    if shape.head_size not in attncap_cuda.PROBS_HEAD_DIMS:
        return f"head size {shape.head_size} (compiled: {attncap_cuda.PROBS_HEAD_DIMS})"
    if shape.num_heads // shape.num_kv_heads > 32:
        return "more than 32 query heads per KV head"
    if shape.num_heads * (shape.head_size + 2) * 4 > 48 * 1024:
        return f"{shape.num_heads} query heads of size {shape.head_size} exceed the rows pass's shared memory"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"model dtype {dtype}"
    if own_layers is not None and own_layers != frozenset(range(shape.num_layers)):
        return "several KV-cache groups"
    return None


def _runs_full_graphs(vllm_config) -> bool:
    """Whether uniform decode steps replay full CUDA graphs in this engine (else every step runs attention
    eagerly or piecewise and rows without a request slot can go to the eager path)."""
    if getattr(vllm_config.model_config, "enforce_eager", False):
        return False
    mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
    has_full = getattr(mode, "has_full_cudagraphs", None)
    return bool(has_full()) if callable(has_full) else True


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
        if attn_metadata.__class__ is not AttnCapFlashMetadata:  # a step where nobody captures (build() said so)
            return output
        plan, graph = attn_metadata.attncap_plan, attn_metadata.attncap_graph
        if (plan is None and graph is None) or self.attn_type != AttentionType.DECODER:
            return output
        if self._layer_index is None:
            self._layer_index = layer_index_of(layer)
        if graph is not None and (graph_policy.record_kernels or not _capturing()):
            self._graph_capture(graph, query, kv_cache, attn_metadata)
        if plan is None or not plan.wants(self._layer_index):
            return output
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return output  # never inside a graph capture (plans only exist in real steps anyway)
        reason = _unsupported(self, attn_metadata)
        if reason is not None:
            _fail_plan(plan, self._layer_index, f"attncap: capture is not supported for this step: {reason}")
            return output
        key_cache = key_cache_view(kv_cache, self.num_kv_heads, self.head_size, _KV_LAYOUT)
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

    def decode_record(self, graph: GraphCapture, layer, md, device) -> Any:
        """This layer's fused-kernel launch record for ``graph`` (built once; the builder builds it outside any
        stream capture, :meth:`AttnCapFlashMetadataBuilder._prepare_records`)."""
        dc = self._dev.get("decode")
        if dc is not None and dc[0] is graph:
            return dc[1]
        if self._layer_index is None:
            self._layer_index = layer_index_of(layer)
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        rec = _DECODE_RECORD(
            graph.buffers, layer=self._layer_index, scale=self.scale, softcap=float(self.logits_soft_cap or 0.0),
            window=window_length(self, md), alibi=self.alibi_on(dev), sinks=self.sinks_on(dev),
            rows="rows" in graph.kinds)
        self._dev["decode"] = (graph, rec)
        return rec

    def _graph_capture(self, graph: GraphCapture, query, kv_cache, md) -> None:
        """Launch the fused decode kernel of this layer over the static buffers (recorded into a full graph)."""
        dc = self._dev.get("decode")
        if dc is None or dc[0] is not graph:
            if _capturing() and (self.alibi_slopes is not None or self.sinks is not None):
                raise RuntimeError("vllm_attncap: the fused decode-capture record of layer "
                                   f"{self._layer_index} was not prepared before the CUDA graph capture (its ALiBi / "
                                   "sink copies cannot be made inside one); build_for_cudagraph_capture prepares it")
            self.decode_record(graph, None, md, query.device)
            dc = self._dev["decode"]
        key_cache = key_cache_view(kv_cache, self.num_kv_heads, self.head_size, _KV_LAYOUT)
        dc[1].launch(query, key_cache, md.block_table, md.seq_lens, query.shape[0])

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


def _unsupported_md(md: Any) -> str | None:
    """Why a step's capture would not match what FlashAttention computed (from its metadata), or None."""
    if getattr(md, "causal", True) is not True:
        return "non-causal or per-sequence causal attention"
    # 0.25.1: mm_prefix_range_tensor; 0.31+: mm_prefix_query_range_tensor
    if getattr(md, "mm_prefix_range_tensor", None) is not None or \
            getattr(md, "mm_prefix_query_range_tensor", None) is not None:
        return "bidirectional multimodal prefix ranges"
    if getattr(md, "rswa_prefix_lens", None) is not None:
        return "R-SWA attention"
    return None


def _unsupported(impl: AttnCapFlashImpl, md: Any) -> str | None:
    """Why this layer's capture would not match what FlashAttention computed, or None."""
    reason = _unsupported_md(md)
    if reason is None and getattr(impl, "dcp_world_size", 1) > 1:
        reason = "decode context parallelism"
    return reason


def _fail_plan(plan: StepPlan, layer: int, message: str) -> None:
    """End the captures of every request with rows in ``plan`` (the whole step is unsupported, whatever the layer):
    rows that cannot be computed are an error the caller sees, not a silent gap."""
    tracker = get_tracker()
    for b in plan.batches:
        tracker.fail(b.rc.req_id, message)


def _step_in_graph() -> bool:
    """Whether the step being run has rows for the fused kernel (its full-graph replay needs the capturing set)."""
    return _GRAPH is not None and _GRAPH.active


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _decode_record(buffers, **kw):
    return attncap_cuda.DecodeCapture(buffers, **kw)


#: builds a layer's fused-kernel launch record (tests substitute a recorder)
_DECODE_RECORD = _decode_record
#: the FlashAttention KV-cache layout of the running vLLM (probed by the builder; None: read from each tensor)
_KV_LAYOUT: str | None = None


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
    graph = _GRAPH
    ring = graph.ring if graph is not None else None
    if (ring is None or not ring.in_flight) and not _SINK.pending:
        return None  # nothing in flight: nothing to wait for (the common no-capture step)
    g = graph.mark() if graph is not None else 0
    sink = getattr(_SINK, "submitted", None)

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
