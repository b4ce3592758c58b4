"""The fused decode-capture kernel against its torch reference, on fresh random inputs (GPU only).

- eager launches over both KV-cache layouts (0.25.1 and 0.31+): fp16/bf16, head dim 64/128, GQA groups 1/3/4, sliding window, soft-cap, ALiBi, sinks, stats and
  head-mean rows rows mixed with rows that are off, several layers accumulating, split counts 1 and 4;
- the launch recorded into a CUDA graph, replayed with new row tables, positions and block tables (the full-graph
  use), with the counters left at zero;
- the per-step cycle (:class:`~vllm_attncap.engine.cuda.graph_step.GraphCapture` with the CUDA uploader and ring)
  under ``torch.cuda.set_sync_debug_mode("error")``: no host synchronisation on the decode path.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from vllm_attncap.engine.cuda.decode_reference import (
    F_FIRST_LAYER,
    F_HEADS,
    F_HISTORY,
    F_SINK,
    F_SLOT,
    F_WEIGHT,
    FLAG_ROWS,
    FLAG_SALIENT,
    FLAG_STATS,
    decode_capture_reference,
)
from vllm_attncap.engine.cuda.graph_buffers import BufferLayout, DecodeBuffers
from vllm_attncap.engine.cuda.kv_layout import HEAD_MAJOR, KV_FIRST, key_cache_view
from float_tolerance import float_atol  # noqa: E402
from store_utils import private_store  # noqa: E402

pytestmark = pytest.mark.gpu
# float32 on both sides over up to W = 640 keys, two dependent stages (the softmax max/sum, then the reduction):
# float_atol gives 2.4e-5; the relative slack covers __expf's ~2 ulp and the entropy's ln S - V/S cancellation
ATOL, RTOL = float_atol(np.float32, 640, stages=2), 2e-3


def _case(seed, *, dtype, D, H, Hkv, L=3, B=7, bs=16, W=640, splits=4, max_len=600, layout=KV_FIRST):
    """``layout``: the FlashAttention KV cache of vLLM 0.25.1 (kv_first) or 0.31+ (head_major); the kernel reads
    the key view of either (strided, no copy)."""
    g = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda")
    lay = BufferLayout(max_rows=B, num_layers=L, num_heads=H, num_kv_heads=Hkv, width=W, n_splits=splits)
    bufs = DecodeBuffers(lay, lambda s, d: torch.zeros(s, dtype=d, device=dev))
    nblk = 400
    shape = (nblk, 2, bs, Hkv, D) if layout == KV_FIRST else (nblk, Hkv, bs, 2 * D)
    kv = torch.randn(shape, generator=g).to(dtype).to(dev)
    key_cache = key_cache_view(kv, Hkv, D, layout)
    mb = -(-W // bs)
    bt = torch.stack([torch.randperm(nblk, generator=g)[:mb] for _ in range(B)]).to(torch.int32).to(dev)
    seq = torch.randint(2, max_len, (B,), generator=g).to(torch.int32)
    q = torch.randn((B + 3, H, D), generator=g).to(dtype).to(dev)
    return lay, bufs, key_cache, bt, seq, q, g


def _random_rows(bufs, lay, seq, g, n_rows):
    """Row table + masks: a mix of stats, rows and off rows, each in its own slot."""
    H, L = lay.num_heads, lay.num_layers
    table = np.zeros((lay.max_rows, 8), dtype=np.int32)
    lm = np.zeros((lay.n_slots, L), dtype=np.uint8)
    hm = np.zeros((lay.n_slots, H), dtype=np.uint8)
    sm = np.zeros((lay.n_slots, lay.width), dtype=np.uint8)
    rng = np.random.default_rng(int(torch.randint(0, 1 << 30, (1,), generator=g)))
    for b in range(n_rows):
        kind = rng.choice(["stats", "rows", "off"], p=[0.45, 0.4, 0.15])
        if kind == "off":
            continue
        slot = (b * 3 + 1) % lay.n_slots
        table[b, F_SLOT] = slot
        layers = sorted(rng.choice(L, size=rng.integers(1, L + 1), replace=False).tolist())
        lm[slot, layers] = 1
        if kind == "stats":
            pos = int(seq[b]) - 1
            hist = int(rng.integers(1, pos + 2))
            sink = int(rng.integers(0, hist))
            # some requests have no salient position: coverage 0, also over an empty (windowed-out) block
            sal = rng.choice(hist, size=min(hist, 5), replace=False) if rng.random() < 0.7 else np.zeros(0, int)
            sm[slot, sal] = 1
            any_sal = bool(((sal >= sink) & (sal < hist)).any())
            table[b, 0] = FLAG_STATS | (FLAG_SALIENT if any_sal else 0)
            table[b, F_HISTORY] = hist
            table[b, F_SINK] = sink
        else:
            heads = sorted(rng.choice(H, size=rng.integers(1, H + 1), replace=False).tolist())
            hm[slot, heads] = 1
            table[b, 0] = FLAG_ROWS
            table[b, F_FIRST_LAYER] = layers[0]
            table[b, F_WEIGHT] = np.float32(1.0 / len(layers)).view(np.int32)
            table[b, F_HEADS] = len(heads)
    bufs.row_table.copy_(torch.from_numpy(table))
    bufs.layer_mask.copy_(torch.from_numpy(lm))
    bufs.head_mask.copy_(torch.from_numpy(hm))
    bufs.salient_mask.copy_(torch.from_numpy(sm))


def _reference(bufs, lay, q, key_cache, bt, seq, n_rows, layers, **kw):
    stats = bufs.stats.clone().cpu()
    rows = bufs.rows.clone().cpu()
    for layer in layers:
        decode_capture_reference(q.float().cpu(), key_cache.float().cpu(), bt.cpu(), seq, bufs.row_table.cpu(),
                                 bufs.layer_mask.cpu(), bufs.head_mask.cpu(), bufs.salient_mask.cpu(), layer=layer,
                                 n_rows=n_rows, stats=stats, rows=rows, **{k: (v.cpu() if torch.is_tensor(v) else v)
                                                                          for k, v in kw.items()})
    return stats, rows


def _compare(bufs, ref_stats, ref_rows, seq, n_rows, label):
    st, rw = bufs.stats.cpu(), bufs.rows.cpu()
    table = bufs.row_table.cpu()
    for b in range(n_rows):
        f = int(table[b, 0])
        if f & FLAG_STATS:
            torch.testing.assert_close(st[b], ref_stats[b], atol=ATOL, rtol=RTOL, equal_nan=True, msg=f"{label} row {b}")
        elif f & FLAG_ROWS:
            n = int(seq[b])
            torch.testing.assert_close(rw[b, :n], ref_rows[b, :n], atol=ATOL, rtol=RTOL, msg=f"{label} row {b}")
    assert int(bufs.counters.abs().sum()) == 0, "split counters must be left at zero"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,H,Hkv", [(64, 9, 3), (128, 8, 2), (64, 4, 4)])
@pytest.mark.parametrize("opts", [{}, {"window": 100, "softcap": 30.0, "alibi": True, "sinks": True}])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_kernel_matches_reference(kernels, dtype, D, H, Hkv, opts, splits):
    from vllm_attncap.engine.cuda.kernels import DecodeCapture

    seed = zlib.crc32(repr((str(dtype), D, H, splits, sorted(opts))).encode()) % 10_000  # the same in every process
    layout = HEAD_MAJOR if splits == 4 else KV_FIRST  # both layouts, without doubling the cases
    lay, bufs, key_cache, bt, seq, q, g = _case(seed, dtype=dtype, D=D, H=H, Hkv=Hkv, splits=splits, layout=layout)
    n_rows = lay.max_rows - 1  # the last row is beyond the launch: untouched
    _random_rows(bufs, lay, seq, g, n_rows)
    bufs.stats.fill_(-3.0)
    bufs.rows.uniform_()
    kw = dict(scale=D**-0.5, softcap=opts.get("softcap", 0.0), window=opts.get("window", -1))
    alibi = (torch.rand(H, generator=g) * 0.1).cuda() if opts.get("alibi") else None
    sinks = torch.randn(H, generator=g).cuda() if opts.get("sinks") else None
    ref_stats, ref_rows = _reference(bufs, lay, q, key_cache, bt, seq, n_rows, range(lay.num_layers),
                                     alibi_slopes=alibi, sinks=sinks, **kw)
    seq_dev = seq.cuda()
    for layer in range(lay.num_layers):
        dc = DecodeCapture(bufs, layer=layer, scale=kw["scale"], softcap=kw["softcap"], window=kw["window"],
                           alibi=alibi, sinks=sinks)
        dc.launch(q, key_cache, bt, seq_dev, n_rows)
    torch.cuda.synchronize()
    _compare(bufs, ref_stats, ref_rows, seq, n_rows, f"{dtype} D{D} H{H}/{Hkv} {opts} s{splits}")
    assert (bufs.stats[n_rows] == -3).all()  # beyond the launch: untouched


def test_decode_kernel_in_a_cuda_graph_replays_new_steps(kernels):
    """Record the launches of every layer once; replay with new contents of the same tensors."""
    from vllm_attncap.engine.cuda.kernels import DecodeCapture, preload

    lay, bufs, key_cache, bt, seq, q, g = _case(11, dtype=torch.bfloat16, D=64, H=9, Hkv=3, B=8)
    n_rows = lay.max_rows
    preload(q.device)
    seq_dev = seq.cuda()
    dcs = [DecodeCapture(bufs, layer=l, scale=0.125) for l in range(lay.num_layers)]
    for dc in dcs:  # warm-up, rows off
        dc.launch(q, key_cache, bt, seq_dev, n_rows)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for dc in dcs:
            dc.launch(q, key_cache, bt, seq_dev, n_rows)
    for step in range(3):
        new_seq = torch.randint(2, 600, (n_rows,), generator=g).to(torch.int32)
        seq_dev.copy_(new_seq)
        q.copy_(torch.randn(q.shape, generator=g).to(q.dtype))
        bt.copy_(torch.stack([torch.randperm(400, generator=g)[:bt.shape[1]] for _ in range(n_rows)]).to(torch.int32))
        _random_rows(bufs, lay, new_seq, g, n_rows)
        ref_stats, ref_rows = _reference(bufs, lay, q, key_cache, bt, new_seq, n_rows, range(lay.num_layers),
                                         scale=0.125)
        graph.replay()
        torch.cuda.synchronize()
        _compare(bufs, ref_stats, ref_rows, new_seq, n_rows, f"replay {step}")


def test_decode_cycle_never_syncs_the_host(kernels, tmp_path, monkeypatch):
    """begin_step (pinned upload), the kernels, end_step (side-stream copy into the ring) and the next step's drain
    under sync-debug 'error': any host synchronisation raises."""

    from vllm_attncap.engine.cuda.kernels import DecodeCapture, preload
    from vllm_attncap.engine.cuda.pinned import CudaRingOps, Uploader
    from vllm_attncap.engine.cuda.graph_step import GraphCapture
    from vllm_attncap.engine.plan import RowBatch, StepPlan
    from vllm_attncap.engine.cuda.result_ring import ResultRing
    from vllm_attncap.engine.tracker import CaptureTracker, ModelShape

    private_store(monkeypatch, tmp_path)
    dev = torch.device("cuda")
    lay = BufferLayout(max_rows=4, num_layers=2, num_heads=4, num_kv_heads=2, width=256)
    gc = GraphCapture(lay, lambda s, d: torch.zeros(s, dtype=d, device=dev), Uploader(dev, 1 << 16),
                      lambda n: ResultRing(CudaRingOps(dev), 8, n))
    tracker = CaptureTracker()
    tracker.set_model_shape(ModelShape(2, 4, 2, 64, 256))
    rc = tracker.lookup("a", {"mode": "stats", "salient": [1]}, 20, 16)
    rc2 = tracker.lookup("b", {"reduce": "layer_head_mean"}, 20, 16)
    kc = torch.randn((64, 16, 2, 64), device=dev, dtype=torch.bfloat16)
    bt = torch.arange(8, dtype=torch.int32, device=dev).repeat(4, 1)
    preload(dev)
    dcs = [DecodeCapture(gc.buffers, layer=l, scale=0.125) for l in range(2)]
    q = torch.randn((4, 4, 64), device=dev, dtype=torch.bfloat16)
    seq_dev = torch.zeros(4, dtype=torch.int32, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(6):
            rows = [RowBatch(rc=rc, token_index=None, q_pos=None, rows=[step + 1], ctx_len=21 + step,
                             block_table_row=None, batch_row=0),
                    RowBatch(rc=rc2, token_index=None, q_pos=None, rows=[step + 1], ctx_len=21 + step,
                             block_table_row=None, batch_row=2)]
            plan = StepPlan(rows, frozenset({0, 1}))
            assert gc.begin_step(plan, uniform_decode=True) is None
            seq_dev.fill_(21 + step)
            for dc in dcs:
                dc.launch(q, kc, bt, seq_dev, 4)
            gc.end_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert gc.ring.blocking_waits == 0 and gc.uploader.blocking_waits == 0  # the host never waited
    gc.flush()
    assert rc.writer.rows_written == 7 and rc2.writer.rows_written == 7  # rows 1..6 written: 0..6 hold data
    assert np.isfinite(np.asarray(rc.writer.array)[:, :, :, 1:7]).all()
    row = np.asarray(rc2.writer.array)[0, 0, 3, :24]
    assert abs(row.sum() - 1.0) < 1e-3  # a layer-mean probability row
    tracker.close_all()
