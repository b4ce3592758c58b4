"""attncap on CUDA: vLLM 0.25.1's FLASH_ATTN backend plus capture.

Same shape as :mod:`vllm_attncap.backends.cpu` (Backend / MetadataBuilder / Impl,
subclassing vLLM's own classes, which the runner requires — facts.md):

* :class:`AttnCapFlashBackend` declares FLASH_ATTN's capabilities, minus fp8 KV
  caches (capture reads keys as stored), and is named ``CUSTOM`` (vLLM looks
  backends up by enum member name; ``attncap`` is an alias of that member, see
  :mod:`vllm_attncap.plugin`). ``CudaPlatform.get_attn_backend_cls`` validates
  a selected backend with the class's own ``validate_configuration`` and
  returns its path, so nothing else is needed for selection.
* :class:`AttnCapFlashMetadataBuilder` builds FLASH_ATTN's metadata and, once
  per step, the capture plan (:mod:`vllm_attncap.plan`). It declares
  ``AttentionCGSupport.NEVER``: vLLM then downgrades ``FULL_AND_PIECEWISE`` to
  ``PIECEWISE``, so attention — and capture — runs eagerly between the graphed
  pieces on every step (docs/gpu.md, "CUDA graphs").
* :class:`AttnCapFlashImpl` runs FlashAttention first — generated tokens are
  exactly FLASH_ATTN's — then captures the planned rows of its layer.

Keys are read straight from the paged KV cache (plain layout on CUDA, no shadow
store), split exactly as ``FlashAttentionImpl`` does in vLLM 0.23-0.25:
``kv_cache.unbind(1)`` of ``[num_blocks, 2, block_size, H_kv, D]``.

Two ways to compute a layer's rows, chosen once per step:

* CUDA kernels (:mod:`vllm_attncap.compute.cuda`, when the extension is built,
  the head size is 64 or 128 and ``VLLM_ATTNCAP_KERNELS`` is not ``0``): the
  step's captured rows are grouped by spec (mode, reduction, layers, heads);
  per group and layer one ``paged_attention_probs`` launch, then ``head_mean`` /
  ``history_stats`` on the device, then an asynchronous copy to pinned host
  memory (:class:`~vllm_attncap.compute.pinned.AsyncCopier`: side stream, the
  compute stream never waits). The host copies pinned rows into each request's
  buffer (:mod:`vllm_attncap.store`) once per step, after the forward
  (:func:`flush_pending`, called by the runner hook): the host thread waits for
  that step's copies there, the GPU does not.
* torch (otherwise): keys gathered by block table, probabilities from
  :func:`vllm_attncap.compute.reference.attention_probs`, written by
  :func:`vllm_attncap.capture.write_probs` (synchronous copies).

Status: written against vLLM 0.25.1's source; not yet run on a GPU (docs/gpu.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from .. import runner_hooks
from ..capture import write_probs
from ..compute import cuda as attncap_cuda
from ..compute.pinned import AsyncCopier, PinnedBufferPool, PinnedPoolExhausted
from ..compute.reference import attention_probs
from ..plan import RowBatch, StepPlan, build_step_plan
from ..tracker import get_tracker
from .common import layer_index_of, model_shape_from_config

logger = logging.getLogger("vllm_attncap")

__all__ = [
    "AttnCapFlashBackend",
    "AttnCapFlashMetadataBuilder",
    "AttnCapFlashImpl",
    "flush_pending",
    "gather_paged_keys",
    "window_length",
]

#: Cap on pinned host memory for in-flight capture copies (bytes).
PINNED_BYTES = int(os.environ.get("VLLM_ATTNCAP_PINNED_BYTES", str(1024**3)))
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


# --------------------------------------------------------------------------- vLLM classes


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


class AttnCapFlashMetadataBuilder(FlashAttentionMetadataBuilder):
    """FLASH_ATTN metadata plus ``attncap_plan`` (a :class:`~vllm_attncap.plan.StepPlan` or None).

    ``NEVER`` full-graph support keeps attention (and capture) out of full CUDA
    graphs; see the module docstring and docs/gpu.md.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("attention_backend='attncap' does not support speculative decoding yet")
        tracker = get_tracker()
        if hasattr(tracker, "reset"):
            tracker.reset()  # a new engine in this process: earlier engines' captures are dead (as on CPU)
        tracker.set_model_shape(model_shape_from_config(vllm_config))
        runner_hooks.install()
        runner_hooks.on_step_end(flush_pending)
        # layer indices of this KV-cache group (several groups = several builders and plans per step)
        try:
            self._own_layers: frozenset[int] | None = frozenset(_layer_index_of_name(n) for n in layer_names)
        except (AssertionError, ValueError):  # a layer name without an index: capture every planned layer
            self._own_layers = None

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> FlashAttentionMetadata:
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if _SINK.pending:  # a step whose end hook did not run; normally empty
            _SINK.flush()
        plan = build_step_plan(runner_hooks.active_runner(), common_attn_metadata, get_tracker())
        if plan is not None:
            plan.__dict__["attncap_own_layers"] = self._own_layers
        md.attncap_plan = plan
        return md


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
        plan = getattr(attn_metadata, "attncap_plan", None) if attn_metadata is not None else None
        if plan is None or self.attn_type != AttentionType.DECODER:
            return output
        if self._layer_index is None:
            self._layer_index = layer_index_of(layer)
        if not plan.wants(self._layer_index):
            return output
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return output  # never inside a graph capture (plans only exist in real steps anyway)
        reason = _unsupported(self, attn_metadata)
        if reason is not None:
            _warn_once(reason, "vllm_attncap: capture skipped: %s", reason)
            return output
        key_cache = kv_cache.unbind(1)[0]  # vLLM 0.23-0.25 FlashAttention split
        window = window_length(self, attn_metadata)
        if _step_uses_kernels(plan, self, query, key_cache):
            _capture_kernels(self, self._layer_index, query, key_cache, attn_metadata.block_table, window, plan)
        else:
            _capture_torch(self, self._layer_index, query, key_cache, window, plan)
        return output

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


# --------------------------------------------------------------------------- torch path


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


def _capture_torch(impl, layer_index: int, query: torch.Tensor, key_cache: torch.Tensor, window: int,
                   plan: StepPlan) -> None:
    for b in plan.batches:
        if layer_index not in b.rc.layer_slot:
            continue
        dev = query.device
        c = b.rc.cache
        if c.get("flash_device") != dev:
            c["flash_device"] = dev
            c["flash_heads"] = torch.tensor(b.rc.resolved.heads, dtype=torch.long, device=dev)
        tok = b.scratch.get("flash_tok")
        if tok is None:
            tok = b.scratch["flash_tok"] = b.token_index.to(dev)
        k = gather_paged_keys(key_cache, b.block_table_row, b.ctx_len)
        probs = attention_probs(
            query[tok],
            k,
            b.q_pos,
            scale=impl.scale,
            softcap=float(impl.logits_soft_cap or 0.0),
            sliding_window=window,
            alibi_slopes=impl.alibi_slopes,
            sinks=impl.sinks,
            heads=c["flash_heads"],
        )
        write_probs(b, layer_index, probs)


# --------------------------------------------------------------------------- CUDA kernel path

_KERNELS_OK: bool | None = None


def _kernels_available() -> bool:
    global _KERNELS_OK
    if _KERNELS_OK is None:
        _KERNELS_OK = attncap_cuda.is_available()
        if not _KERNELS_OK:
            logger.info("vllm_attncap: CUDA capture kernels not built; capturing with the torch path")
    return _KERNELS_OK


def _step_uses_kernels(plan: StepPlan, impl, query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Decided once per step (layer-mean accumulators must stay on one path)."""
    use = plan.__dict__.get("attncap_kernels")
    if use is None:
        use = (
            os.environ.get("VLLM_ATTNCAP_KERNELS", "1") != "0"
            and query.is_cuda
            and query.dtype in _KERNEL_DTYPES
            and key_cache.dtype == query.dtype
            and impl.head_size in attncap_cuda.PROBS_HEAD_DIMS
            and _kernels_available()
        )
        plan.__dict__["attncap_kernels"] = use
    return use


@dataclass
class _Group:
    """Rows of one step whose requests share (mode, reduce, layers, heads)."""

    batches: list[RowBatch]
    spans: list[tuple[int, int]]  # rows of each batch inside the group
    mode: str
    reduce: str
    all_layers: tuple[int, ...]  # the requests' selected layers
    layers: tuple[int, ...]  # those of them this plan's KV-cache group runs, in increasing order
    n: int
    width: int
    q_index: torch.Tensor  # (n,) int32 token of each row in `query`
    bt_row: torch.Tensor  # (n,) int32 block-table row
    q_pos: torch.Tensor  # (n,) int32
    ctx_len: torch.Tensor  # (n,) int32
    hist: torch.Tensor  # (n,) int32 history_len per row
    sink: torch.Tensor  # (n,) int32
    sal_row: torch.Tensor  # (n,) int32 row of `salient` per row
    heads: torch.Tensor  # (h,) int32
    salient: torch.Tensor | None  # (M, W_s) uint8 or None
    stage: torch.Tensor | None = None  # (len(layers), *result) results of this step, copied once
    acc: torch.Tensor | None = None  # (n, width) layer-mean accumulator

    @property
    def first(self) -> int:
        return self.layers[0]

    @property
    def last(self) -> int:
        return self.layers[-1]


def _build_groups(plan: StepPlan, device: torch.device, own_layers: frozenset[int] | None = None) -> list[_Group]:
    """Group the step's captured rows by spec and upload their indices (one copy per group).

    ``own_layers``: the layer indices of the KV-cache group whose builder made ``plan``
    (None = all); a model with several KV-cache groups gets one plan per group.
    """
    by_key: dict[tuple, list[RowBatch]] = {}
    for b in plan.batches:
        r = b.rc.resolved
        by_key.setdefault((r.spec.mode, r.spec.reduce, r.layers, r.heads), []).append(b)
    groups = []
    for (mode, reduce, all_layers, heads), bs in by_key.items():
        layers = tuple(sorted(l for l in all_layers if own_layers is None or l in own_layers))
        if not layers:
            continue
        if reduce == "layer_head_mean" and len(layers) != len(all_layers):
            _warn_once("lhm-groups", "vllm_attncap: reduce='layer_head_mean' over layers of several KV-cache groups "
                       "is not supported on CUDA yet; the captured mean covers only some of the layers")
        spans, cols = [], []
        start = 0
        for m, b in enumerate(bs):
            nb = len(b.rows)
            spans.append((start, start + nb))
            start += nb
            cols.append(np.stack([
                b.token_index.numpy(),
                np.full(nb, b.batch_row),
                b.q_pos.numpy(),
                np.full(nb, b.ctx_len),
                np.full(nb, b.rc.resolved.history_len),
                np.full(nb, b.rc.spec.sink),
                np.full(nb, m),
            ]))
        n = start
        table = np.concatenate(cols, axis=1).astype(np.int32)  # (7, n)
        packed = np.concatenate([table.reshape(-1), np.asarray(heads, dtype=np.int32)])
        dev = torch.from_numpy(packed).to(device)  # one host-to-device copy per group and step
        q_index, bt_row, q_pos, ctx_len, hist, sink, sal_row = dev[: 7 * n].view(7, n).unbind(0)
        salient = None
        if mode == "stats" and any(b.rc.spec.salient for b in bs):
            ws = max(b.rc.resolved.history_len for b in bs)
            mask = np.zeros((len(bs), ws), dtype=np.uint8)
            for m, b in enumerate(bs):
                mask[m, [x for x in b.rc.spec.salient if x < ws]] = 1
            salient = torch.from_numpy(mask).to(device)
        groups.append(_Group(
            batches=bs, spans=spans, mode=mode, reduce=reduce, all_layers=all_layers, layers=layers, n=n,
            width=max(b.ctx_len for b in bs),
            q_index=q_index, bt_row=bt_row, q_pos=q_pos, ctx_len=ctx_len, hist=hist, sink=sink,
            sal_row=sal_row, heads=dev[7 * n:], salient=salient,
        ))
    return groups


def _result_shape(g: _Group) -> tuple[int, ...]:
    """Shape of one layer's result: rows ``(n, h, W)`` / ``(n, W)``, stats ``(2, n, h)`` / ``(2, n)``."""
    reduced = g.reduce != "none"
    per_row = (g.n,) if reduced else (g.n, g.heads.shape[0])
    return (2, *per_row) if g.mode == "stats" else (*per_row, g.width)


def _capture_kernels(impl, layer_index: int, query: torch.Tensor, key_cache: torch.Tensor,
                     block_table: torch.Tensor, window: int, plan: StepPlan) -> None:
    groups = plan.__dict__.get("attncap_groups")
    if groups is None:
        groups = plan.__dict__["attncap_groups"] = _build_groups(plan, query.device, plan.__dict__.get("attncap_own_layers"))
    dev = query.device
    for g in groups:
        if layer_index not in g.layers:
            continue
        kw = dict(
            scale=impl.scale, heads=g.heads, q_index=g.q_index, bt_row=g.bt_row,
            softcap=float(impl.logits_soft_cap or 0.0), sliding_window=window,
            alibi_slopes=impl.alibi_on(dev), sinks=impl.sinks_on(dev), width=g.width,
        )
        if g.reduce == "layer_head_mean":
            probs = attncap_cuda.paged_attention_probs(query, key_cache, block_table, g.q_pos, g.ctx_len, **kw)
            if g.acc is None:
                g.acc = torch.zeros((g.n, g.width), dtype=torch.float32, device=dev)
            # the first selected layer assigns, the others add (a recomputed row is rewritten)
            attncap_cuda.head_mean(probs, out=g.acc, weight=1.0 / len(g.all_layers), accumulate=layer_index != g.first)
            if layer_index != g.last:
                continue
            result = g.acc
            if g.mode == "stats":
                result = torch.empty((2, g.n), dtype=torch.float32, device=dev)
                attncap_cuda.history_stats(g.acc, g.hist, g.sink, g.salient,
                                           salient_row=g.sal_row if g.salient is not None else None,
                                           coverage=result[0], entropy=result[1])
            _SINK.submit(result, _scatter(g, (layer_index,)))
            continue
        if g.stage is None:  # zeros: a layer that never ran leaves zeros, not garbage
            g.stage = torch.zeros((len(g.layers), *_result_shape(g)), dtype=torch.float32, device=dev)
        out = g.stage[g.layers.index(layer_index)]
        if g.mode == "rows" and g.reduce == "none":
            attncap_cuda.paged_attention_probs(query, key_cache, block_table, g.q_pos, g.ctx_len, out=out, **kw)
        else:
            probs = attncap_cuda.paged_attention_probs(query, key_cache, block_table, g.q_pos, g.ctx_len, **kw)
            if g.mode == "rows":  # head_mean
                attncap_cuda.head_mean(probs, out=out)
            else:
                red = attncap_cuda.head_mean(probs) if g.reduce == "head_mean" else probs
                attncap_cuda.history_stats(red, g.hist, g.sink, g.salient,
                                           salient_row=g.sal_row if g.salient is not None else None,
                                           coverage=out[0], entropy=out[1])
        if layer_index == g.last:  # one copy per group and step
            _SINK.submit(g.stage, _scatter(g, g.layers))


def _scatter(g: _Group, layers: tuple[int, ...]) -> Callable[[torch.Tensor], None]:
    """Host-side write of a group's results into each request's buffer.

    The host tensor holds one result per entry of ``layers`` (leading dimension),
    or a single one (the layer mean, ``layers`` = its last layer).
    """

    def write(host: torch.Tensor) -> None:
        a_all = host.numpy()
        if g.reduce == "layer_head_mean":
            a_all = a_all[None]
        for li, layer_index in enumerate(layers):
            a = a_all[li]
            for b, (s, e) in zip(g.batches, g.spans):
                rc = b.rc
                arr = rc.writer.array
                if arr is None:  # finished/aborted meanwhile
                    continue
                slot = rc.layer_slot[layer_index]
                r0, r1 = b.rows[0], b.rows[-1] + 1
                if g.mode == "stats":
                    if a.ndim == 3:  # (2, n, h)
                        arr[0, slot, :, r0:r1] = a[0, s:e].T
                        arr[1, slot, :, r0:r1] = a[1, s:e].T
                    else:  # (2, n): reduced heads
                        arr[0, slot, 0, r0:r1] = a[0, s:e]
                        arr[1, slot, 0, r0:r1] = a[1, s:e]
                else:
                    c = b.ctx_len
                    if a.ndim == 3:  # (n, h, W)
                        arr[slot, :, r0:r1, :c] = a[s:e, :, :c].transpose(1, 0, 2)
                    else:  # (n, W)
                        arr[slot, 0, r0:r1, :c] = a[s:e, :c]
                if layer_index == rc.last_layer:
                    rc.writer.note_rows(r1)

    return write


class _HostSink:
    """Device results -> pinned host buffers (side-stream copies) -> request buffers at flush."""

    def __init__(self) -> None:
        self.copier: AsyncCopier | None = None
        self.pool: PinnedBufferPool | None = None
        self.pending: list[tuple[Any, torch.Tensor, Callable[[torch.Tensor], None]]] = []

    def submit(self, dev: torch.Tensor, write: Callable[[torch.Tensor], None]) -> None:
        if self.copier is None or self.copier.device != dev.device:
            self.flush()
            self.copier = AsyncCopier(dev.device)
            self.pool = PinnedBufferPool(PINNED_BYTES, pin=True)
        dev = dev.contiguous()
        try:
            host = self.pool.acquire(dev.shape, dev.dtype)
        except PinnedPoolExhausted:
            self.flush()  # waits for this step's copies so far, frees their blocks
            try:
                host = self.pool.acquire(dev.shape, dev.dtype)
            except PinnedPoolExhausted:
                _warn_once("pinned", "vllm_attncap: pinned pool (%d bytes) too small for one result; "
                           "copying synchronously (raise VLLM_ATTNCAP_PINNED_BYTES)", PINNED_BYTES)
                write(dev.cpu())
                return
        handle = self.copier.submit(dev, host)
        self.pending.append((handle, host, write))

    def flush(self) -> None:
        """Wait for the submitted copies (host side only) and write them into the request buffers."""
        pending, self.pending = self.pending, []
        for handle, host, write in pending:
            handle.wait()
            try:
                write(host)
            finally:
                self.pool.release(host)


_SINK = _HostSink()


def flush_pending() -> None:
    """Write every copied row into its request's buffer (called after each step's forward)."""
    if _SINK.pending:
        _SINK.flush()
