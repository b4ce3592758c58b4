"""CUDA kernels and the pinned copier against the torch reference.

Each kernel is compared with its plain-torch reference (reference.py, elide.py)
on freshly drawn shapes: paged key caches with shuffled blocks, block sizes 16
and 32, GQA 9/3 and 32/8, bf16 and fp16, head dims 64 and 128, the vLLM
0.23-0.25 and 0.26+ key-cache layouts, head subsets in any order, soft-cap,
sliding windows, ALiBi, sinks and contexts up to 32k.

Tolerances (stated once, used everywhere):
- probabilities: ``atol=1e-5, rtol=1e-3``. Both sides read the same fp16/bf16
  inputs and compute in float32; they differ only in summation order (logit
  error ~1e-6 absolute), so a wrong mask, block or head shows up as O(1e-2)
  or more.
- head mean / elision: ``atol=1e-7, rtol=1e-5`` (float32 sums of <= 32 terms,
  or of one row).
- coverage / entropy: ``atol=1e-5, rtol=1e-4`` (sums over up to a few thousand
  columns in another order), NaN where the reference gives NaN.

The pool's bookkeeping tests run everywhere (unpinned memory); everything else
needs CUDA (``gpu`` marker, skipped without it).
"""

from __future__ import annotations

import math
import os
import time
import zlib
from dataclasses import dataclass

import pytest
import torch

from vllm_attncap.engine.cuda import kernels as attncap_cuda
from vllm_attncap.engine.elide import apply_elision, plan_elision
from vllm_attncap.engine.cuda.pinned import AsyncCopier, CopyHandle, PinnedBufferPool, PinnedPoolExhausted
from vllm_attncap.engine.reference import attention_probs, gather_keys, history_stats, reduce_heads

HAS_CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (torch.cuda.is_available() is False)")]
DEVICE = torch.device("cuda") if HAS_CUDA else torch.device("cpu")

PROB_TOL = dict(atol=1e-5, rtol=1e-3)
SUM_TOL = dict(atol=1e-7, rtol=1e-5)
STAT_TOL = dict(atol=1e-5, rtol=1e-4)


def _apply(marks):
    def wrap(fn):
        for m in marks:
            fn = m(fn)
        return fn

    return wrap


# --------------------------------------------------------------------------- paged cases


@dataclass
class PagedCase:
    query: torch.Tensor  # (num_tokens, H, D)
    key_cache: torch.Tensor  # (num_blocks, block_size, H_kv, D) view, possibly strided
    key_slots: torch.Tensor  # (num_blocks * block_size, H_kv, D) contiguous copy for the reference
    block_table: torch.Tensor  # (R, max_blocks) int32, unused entries poisoned
    q_index: torch.Tensor
    bt_row: torch.Tensor
    q_pos: torch.Tensor
    ctx_len: torch.Tensor
    block_size: int

    @property
    def n(self) -> int:
        return int(self.q_pos.shape[0])


def make_case(seed, *, num_heads, num_kv_heads, head_dim, block_size, dtype, ctx_lens, rows_per_req=3,
              layout="v025", q_scale=2.0) -> PagedCase:
    """Requests with contexts ``ctx_lens`` in a shuffled paged cache; rows at each request's last
    position plus ``rows_per_req - 1`` random earlier positions (chunked-prefill rows)."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(blocks_per_req) + 7
    if layout == "v025":  # [num_blocks, 2, block_size, H_kv, D], key = unbind(1)[0]
        kv = torch.randn(num_blocks, 2, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
        key_cache = kv.to(DEVICE).unbind(1)[0]
    elif layout == "v026":  # [num_blocks, H_kv, block_size, 2*D], key = transpose(1, 2).split(D)[0]
        kv = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_dim, generator=g).to(dtype)
        key_cache = kv.to(DEVICE).transpose(1, 2).split(head_dim, dim=-1)[0]
    else:
        raise ValueError(layout)
    assert key_cache.shape == (num_blocks, block_size, num_kv_heads, head_dim)
    perm = torch.randperm(num_blocks, generator=g)
    poison = num_blocks + 10**6  # a read of an unused entry would fault, not pass silently
    table = torch.full((len(ctx_lens), max(blocks_per_req) + 2), poison, dtype=torch.int32)
    at = 0
    for i, nb in enumerate(blocks_per_req):
        table[i, :nb] = perm[at:at + nb].to(torch.int32)
        at += nb
    pos, ctx, bt_row = [], [], []
    for i, c in enumerate(ctx_lens):
        extra = torch.randint(0, c, (rows_per_req - 1,), generator=g).tolist() if c > 1 else []
        for p in [c - 1, *extra]:
            pos.append(p)
            ctx.append(c)
            bt_row.append(i)
    n = len(pos)
    num_tokens = n + 3
    query = (torch.randn(num_tokens, num_heads, head_dim, generator=g) * q_scale).to(dtype)
    order = torch.randperm(n, generator=g)  # rows of different requests interleaved
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return PagedCase(
        query=query.to(DEVICE),
        key_cache=key_cache,
        key_slots=key_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim),
        block_table=table.to(DEVICE),
        q_index=torch.randperm(num_tokens, generator=g)[:n].to(**i32),
        bt_row=torch.tensor(bt_row, **i32)[order],
        q_pos=torch.tensor(pos, **i32)[order],
        ctx_len=torch.tensor(ctx, **i32)[order],
        block_size=block_size,
    )


def reference_probs(case: PagedCase, width: int, heads, **kw) -> torch.Tensor:
    """(n, h, width) from reference.gather_keys + reference.attention_probs, row by row."""
    heads_t = torch.as_tensor(heads, device=DEVICE) if heads is not None else None
    h = case.query.shape[1] if heads is None else len(heads)
    out = torch.zeros(case.n, h, width, dtype=torch.float32, device=DEVICE)
    for r in range(case.n):
        c = int(case.ctx_len[r])
        k = gather_keys(case.key_slots, case.block_table[int(case.bt_row[r])], c, case.block_size)
        q = case.query[int(case.q_index[r])][None]
        p = attention_probs(q, k, case.q_pos[r:r + 1].long(), heads=heads_t, **kw)
        out[r, :, :c] = p[0]
    return out


def kernel_probs(case: PagedCase, width: int, heads, **kw) -> torch.Tensor:
    heads_t = None if heads is None else torch.tensor(heads, dtype=torch.int32, device=DEVICE)
    return attncap_cuda.paged_attention_probs(
        case.query, case.key_cache, case.block_table, case.q_pos, case.ctx_len,
        heads=heads_t, q_index=case.q_index, bt_row=case.bt_row, width=width, **kw,
    )


def case_seed(*parts) -> int:
    """Reproducible per-case seed; set ATTNCAP_TEST_SEED to draw a fresh set of shapes."""
    return zlib.crc32(repr(parts).encode()) ^ int(os.environ.get("ATTNCAP_TEST_SEED", "0"))


def draw_options(seed: int, num_heads: int, max_ctx: int) -> tuple[list[int] | None, dict]:
    """Random head subset (shuffled) and random extras for one case."""
    g = torch.Generator().manual_seed(10_000 + seed)
    coin = lambda: bool(torch.rand((), generator=g) < 0.5)  # noqa: E731
    heads = None
    if coin():
        k = int(torch.randint(1, num_heads + 1, (), generator=g))
        heads = torch.randperm(num_heads, generator=g)[:k].tolist()
    kw: dict = {}
    if coin():
        kw["softcap"] = float(torch.empty(()).uniform_(2.0, 30.0, generator=g))
    if coin():
        kw["sliding_window"] = int(torch.randint(1, max_ctx + 1, (), generator=g))
    if coin():
        kw["sinks"] = (torch.randn(num_heads, generator=g) * 2).to(DEVICE)
    if coin():
        kw["alibi_slopes"] = torch.tensor([2.0 ** (-8.0 * (i + 1) / num_heads) for i in range(num_heads)], device=DEVICE)
    return heads, kw


def assert_probs_close(got: torch.Tensor, want: torch.Tensor, with_sinks: bool) -> None:
    torch.testing.assert_close(got, want, **PROB_TOL)
    if not with_sinks:  # rows sum to one (sinks take a share of the mass)
        torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- probabilities


@_apply(gpu)
@pytest.mark.parametrize("layout", ["v025", "v026"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads_shape", [(9, 3), (32, 8)], ids=["gqa9-3", "gqa32-8"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_probs_match_reference_random(kernels, dtype, head_dim, heads_shape, block_size, layout):
    num_heads, num_kv_heads = heads_shape
    seed = case_seed(dtype, head_dim, heads_shape, block_size, layout)
    g = torch.Generator().manual_seed(seed)
    # odd lengths across block boundaries; one above a chunk (1024) so both launches run
    ctx_lens = [int(x) for x in torch.randint(1, 700, (3,), generator=g)] + [block_size, block_size + 1,
                                                                           int(torch.randint(1025, 2600, (), generator=g))]
    case = make_case(seed, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     block_size=block_size, dtype=dtype, ctx_lens=ctx_lens, layout=layout)
    width = max(ctx_lens) + 5
    heads, kw = draw_options(seed, num_heads, max(ctx_lens))
    scale = head_dim ** -0.5
    got = kernel_probs(case, width, heads, scale=scale, **kw)
    want = reference_probs(case, width, heads, scale=scale, **kw)
    assert_probs_close(got, want, "sinks" in kw)


@_apply(gpu)
@pytest.mark.parametrize("feature", ["plain", "softcap", "window", "sinks", "alibi", "all"])
def test_probs_each_feature(kernels, feature):
    num_heads, num_kv_heads, head_dim = 32, 8, 128
    case = make_case(7, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=16,
                     dtype=torch.bfloat16, ctx_lens=[1, 17, 300, 1500], rows_per_req=4)
    kw: dict = {}
    if feature in ("softcap", "all"):
        kw["softcap"] = 3.0
    if feature in ("window", "all"):
        kw["sliding_window"] = 100
    if feature in ("sinks", "all"):
        kw["sinks"] = torch.linspace(-3, 6, num_heads, device=DEVICE)
    if feature in ("alibi", "all"):
        kw["alibi_slopes"] = torch.tensor([2.0 ** (-0.5 * (i + 1)) for i in range(num_heads)], device=DEVICE)
    for chunk_len in (1024, 64, 100):  # one launch; many chunks; chunks not aligned to blocks
        got = kernel_probs(case, 1600, [3, 0, 31, 8], scale=head_dim ** -0.5, chunk_len=chunk_len, **kw)
        want = reference_probs(case, 1600, [3, 0, 31, 8], scale=head_dim ** -0.5, **kw)
        assert_probs_close(got, want, "sinks" in kw)


@_apply(gpu)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_probs_long_contexts(kernels, dtype):
    ctx_lens = [8191, 16384 + 17, 32768 + 5]
    case = make_case(11, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=dtype,
                     ctx_lens=ctx_lens, rows_per_req=2)
    heads = [0, 5, 9, 31]
    sinks = torch.randn(32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for kw in ({}, {"sinks": sinks, "softcap": 30.0}):
        got = kernel_probs(case, max(ctx_lens), heads, scale=128 ** -0.5, **kw)
        want = reference_probs(case, max(ctx_lens), heads, scale=128 ** -0.5, **kw)
        assert_probs_close(got, want, "sinks" in kw)


@_apply(gpu)
def test_probs_into_capture_buffer_slice(kernels):
    """Rows land in a (H, T, W) capture buffer slice; nothing outside it is touched."""
    case = make_case(3, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16, dtype=torch.bfloat16,
                     ctx_lens=[530], rows_per_req=4)
    heads_n, t_max, width = 9, 10, 600
    buf = torch.full((heads_n, t_max, width), float("nan"), device=DEVICE)
    view = buf.permute(1, 0, 2)[2:2 + case.n]  # (n, H, W) with strides (W, T*W, 1)
    attncap_cuda.paged_attention_probs(case.query, case.key_cache, case.block_table, case.q_pos, case.ctx_len,
                                       q_index=case.q_index, bt_row=case.bt_row, scale=0.125, out=view)
    want = reference_probs(case, width, None, scale=0.125)
    torch.testing.assert_close(view, want, **PROB_TOL)
    untouched = torch.ones(t_max, dtype=torch.bool)
    untouched[2:2 + case.n] = False
    assert torch.isnan(buf[:, untouched]).all()


@_apply(gpu)
def test_probs_defaults_and_validation(kernels):
    case = make_case(5, num_heads=9, num_kv_heads=3, head_dim=64, block_size=32, dtype=torch.float16,
                     ctx_lens=[40, 70], rows_per_req=1)
    # rows in token order with block-table row r: the defaults for q_index / bt_row
    q = case.query[case.q_index.long()]
    table = case.block_table[case.bt_row.long()]
    got = attncap_cuda.paged_attention_probs(q, case.key_cache, table, case.q_pos, case.ctx_len, scale=0.125,
                                             width=80, validate=True)
    torch.testing.assert_close(got, reference_probs(case, 80, None, scale=0.125), **PROB_TOL)
    with pytest.raises(ValueError, match="q_pos"):
        attncap_cuda.paged_attention_probs(q, case.key_cache, table, case.q_pos, case.ctx_len, scale=0.125,
                                           width=50, validate=True)
    with pytest.raises(ValueError, match="head dim"):
        attncap_cuda.paged_attention_probs(torch.zeros(2, 4, 96, dtype=torch.float16, device=DEVICE),
                                           torch.zeros(1, 16, 2, 96, dtype=torch.float16, device=DEVICE),
                                           table, case.q_pos, case.ctx_len, scale=0.1, width=80)
    with pytest.raises(ValueError, match="key_cache"):
        attncap_cuda.paged_attention_probs(q, case.key_cache.float(), table, case.q_pos, case.ctx_len,
                                           scale=0.1, width=80)


@_apply(gpu)
def test_probs_cuda_graph_replay(kernels):
    """Captured once, replayed with new positions/contexts in the same tensors."""
    case = make_case(9, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16, dtype=torch.bfloat16,
                     ctx_lens=[900, 1500], rows_per_req=2)
    width = 2100  # two chunks: both launches are in the graph
    heads = torch.arange(9, dtype=torch.int32, device=DEVICE)
    pos, ctx = case.q_pos.clone(), case.ctx_len.clone()
    out = torch.empty(case.n, 9, width, device=DEVICE)

    def step():
        attncap_cuda.paged_attention_probs(case.query, case.key_cache, case.block_table, pos, ctx, heads=heads,
                                           q_index=case.q_index, bt_row=case.bt_row, scale=0.125, out=out)

    step()  # eager warm-up: loads the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # grow every request by a decode step or two and capture their new last rows
    grown = torch.where(case.ctx_len == 900, 902, 1501).to(torch.int32)
    ctx.copy_(grown)
    pos.copy_(grown - 1)
    out.fill_(float("nan"))
    # the cache already holds keys for the grown positions (they were random from the start,
    # and blocks cover them: 902 <= 57*16, 1501 <= 94*16)
    graph.replay()
    torch.cuda.synchronize()
    moved = PagedCase(case.query, case.key_cache, case.key_slots, case.block_table, case.q_index, case.bt_row,
                      pos.clone(), ctx.clone(), case.block_size)
    torch.testing.assert_close(out, reference_probs(moved, width, None, scale=0.125), **PROB_TOL)


# --------------------------------------------------------------------------- reductions


def random_rows(seed: int, n: int, h: int, width: int, *, zero_right: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.softmax(torch.randn(n, h, width, generator=g) * 3, dim=-1)
    if zero_right:
        limit = torch.randint(1, width + 1, (n, 1, 1), generator=g)
        rows = rows * (torch.arange(width) < limit)
    return rows.to(DEVICE)


@_apply(gpu)
@pytest.mark.parametrize("n, h, width", [(1, 9, 576), (16, 32, 2112), (5, 1, 33)])
def test_head_mean_and_layer_mean(kernels, n, h, width):
    rows = random_rows(n * h + width, n, h, width)
    torch.testing.assert_close(attncap_cuda.head_mean(rows), reduce_heads(rows, "head_mean")[:, 0], **SUM_TOL)
    # strided input: every other head of a larger buffer
    big = random_rows(1, n, 2 * h, width)
    torch.testing.assert_close(attncap_cuda.head_mean(big[:, ::2]), big[:, ::2].mean(dim=1), **SUM_TOL)
    # layer_head_mean: accumulate 1/L of each layer's head mean
    layers = [random_rows(100 + i, n, h, width) for i in range(4)]
    acc = torch.zeros(n, width, device=DEVICE)
    for probs in layers:
        attncap_cuda.head_mean(probs, acc, weight=1 / len(layers), accumulate=True)
    want = torch.stack([reduce_heads(p, "head_mean")[:, 0] for p in layers]).mean(0)
    torch.testing.assert_close(acc, want, **SUM_TOL)


@_apply(gpu)
def test_history_stats_match_reference(kernels):
    n, h, width = 7, 4, 700
    rows = random_rows(21, n, h, width)
    rows[3, 1] = 0.0  # a row with no history mass: NaN
    hist = torch.tensor([600, 600, 50, 700, 1, 300, 650], dtype=torch.int32, device=DEVICE)
    sink = torch.tensor([0, 1, 4, 2, 0, 299, 3], dtype=torch.int32, device=DEVICE)
    salient_sets = [[5, 17, 400, 599], [0, 1, 2], []]  # the second lies in sinks for some rows
    salient_row = torch.tensor([0, 1, 0, 1, 2, 0, 2], dtype=torch.int32, device=DEVICE)
    masks = torch.cat([attncap_cuda.salient_mask(s, width, DEVICE) for s in salient_sets])
    cov, ent = attncap_cuda.history_stats(rows, hist, sink, masks, salient_row=salient_row)
    for r in range(n):
        sal = torch.tensor(salient_sets[int(salient_row[r])], dtype=torch.long)
        want_cov, want_ent = history_stats(rows[r], int(hist[r]), int(sink[r]), sal if sal.numel() else None)
        torch.testing.assert_close(cov[r], want_cov, equal_nan=True, **STAT_TOL)
        torch.testing.assert_close(ent[r], want_ent, equal_nan=True, **STAT_TOL)
    assert torch.isnan(ent[3, 1]) and torch.isnan(cov[3, 1])


@_apply(gpu)
def test_history_stats_broadcast_mask_and_2d_rows(kernels):
    rows = random_rows(4, 6, 1, 513)[:, 0]  # (n, W), e.g. head-mean rows
    mask = attncap_cuda.salient_mask([3, 9, 200, 512], 513, DEVICE)
    cov, ent = attncap_cuda.history_stats(rows, 500, 1, mask)
    want_cov, want_ent = history_stats(rows, 500, 1, torch.tensor([3, 9, 200, 512]))
    torch.testing.assert_close(cov, want_cov, equal_nan=True, **STAT_TOL)
    torch.testing.assert_close(ent, want_ent, equal_nan=True, **STAT_TOL)
    cov0, _ = attncap_cuda.history_stats(rows, 500, 1)  # no salient mask: coverage 0
    assert torch.equal(cov0, torch.zeros_like(cov0))


@_apply(gpu)
def test_elide_rows_match_reference(kernels):
    n, h, width, hist = 5, 3, 2100, 2000
    rows = random_rows(31, n, h, width)
    plan = plan_elision(hist, width, sink=1, salient=[3, 700, 1501, 1999], n_max=1024, window=512)
    torch.testing.assert_close(attncap_cuda.elide_rows(rows, plan), apply_elision(rows, plan), **SUM_TOL)
    # two requests with different plans in one launch: tables padded to one width (-2 = zero)
    other = plan_elision(1200, width, sink=0, salient=[10], n_max=1024, window=100)
    w_out = max(plan.out_width, other.out_width)
    src = torch.full((2, w_out), -2, dtype=torch.int32)
    src[0, :plan.out_width] = plan.src_col.to(torch.int32)
    src[1, :other.out_width] = other.src_col.to(torch.int32)
    elided = torch.stack([plan.elided, other.elided]).to(torch.uint8)
    which = torch.tensor([0, 1, 1, 0, 1], dtype=torch.int32)
    got = attncap_cuda.elide_rows(rows, src.to(DEVICE), elided.to(DEVICE), plan_row=which.to(DEVICE))
    for r in range(n):
        p = plan if int(which[r]) == 0 else other
        want = torch.zeros(h, w_out, device=DEVICE)
        want[:, :p.out_width] = apply_elision(rows[r], p)
        torch.testing.assert_close(got[r], want, **SUM_TOL)


# --------------------------------------------------------------------------- pinned pool (runs everywhere)


def test_pool_reuses_blocks_and_enforces_the_cap():
    pool = PinnedBufferPool(1 << 20, pin=False, min_block=1 << 12)
    a = pool.acquire((100, 100))  # 40,000 bytes -> 64 KiB block
    assert a.shape == (100, 100) and a.dtype == torch.float32
    assert pool.bytes_in_use == 1 << 16
    ptr = a.data_ptr()
    pool.release(a)
    b = pool.acquire((50, 200))  # same size class: the same block comes back
    assert b.data_ptr() == ptr
    c = pool.acquire((1 << 17,), torch.float16)  # 256 KiB
    assert pool.bytes_reserved == (1 << 16) + (1 << 18)
    with pytest.raises(PinnedPoolExhausted, match="max_bytes"):
        pool.acquire((1 << 20,), torch.uint8)  # 1 MiB does not fit next to the leased blocks
    pool.release(b)
    pool.release(c)
    d = pool.acquire((1 << 20,), torch.uint8)  # idle blocks are dropped to make room
    assert pool.bytes_reserved == 1 << 20
    with pytest.raises(ValueError, match="not acquired"):
        pool.release(torch.empty(3))
    pool.release(d)
    with pytest.raises(ValueError, match="released twice"):
        pool.release(d)
    assert pool.trim() == 1 << 20 and pool.bytes_reserved == 0


def test_pool_lease_context_and_dtypes():
    pool = PinnedBufferPool(1 << 20, pin=False)
    with pool.lease((3, 5), torch.int64) as buf:
        assert buf.shape == (3, 5) and buf.dtype == torch.int64
        buf.fill_(7)
        assert pool.bytes_in_use > 0
    assert pool.bytes_in_use == 0


def test_copier_and_kernels_fail_clearly_without_cuda_or_extension(monkeypatch):
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="needs CUDA"):
            AsyncCopier()
        assert not attncap_cuda.is_available()
    monkeypatch.setattr(attncap_cuda, "_ext", None)
    monkeypatch.setattr(attncap_cuda, "_ext_error", ImportError("simulated: not built"))
    assert not attncap_cuda.is_available()
    with pytest.raises(attncap_cuda.KernelsUnavailable, match="not built"):
        attncap_cuda._kernels()
    assert issubclass(attncap_cuda.KernelsUnavailable, ImportError)


# --------------------------------------------------------------------------- pinned pool and copier on CUDA


@_apply(gpu)
def test_pool_pins_and_defers_reuse_until_the_copy_is_done(kernels):
    pool = PinnedBufferPool(1 << 24)
    host = pool.acquire((1 << 20,))
    assert host.is_pinned()
    copier = AsyncCopier()
    src = torch.randn(1 << 20, device=DEVICE)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued ahead of the copy
    handle = copier.submit(src, host)
    pool.release(host, after=handle)
    other = pool.acquire((1 << 20,))
    assert other.data_ptr() != host.data_ptr()  # still being written: not handed out again
    handle.wait()
    pool.release(other)
    again = pool.acquire((1 << 20,))
    assert again.data_ptr() in (host.data_ptr(), other.data_ptr())


@_apply(gpu)
def test_copier_bytes_equal_and_compute_stream_never_waits(kernels):
    pool = PinnedBufferPool(1 << 31)
    n = 1 << 28  # 1 GiB of float32: ~20 ms at the ~55 GB/s measured for pinned D2H on an H100 (docs/gpu.md)
    host = pool.acquire((n,))
    copier = AsyncCopier()
    compute = torch.cuda.current_stream()
    src = torch.empty(n, device=DEVICE)
    torch.cuda._sleep(100_000_000)  # the producer is busy when submit is called
    src.normal_()

    t0 = time.perf_counter()
    handle = copier.submit(src, host)
    submit_s = time.perf_counter() - t0
    assert isinstance(handle, CopyHandle)
    assert not handle.ready()  # ordered after the queued producer work
    assert not compute.query()  # submit did not synchronise the compute stream
    assert submit_s < 0.05, f"submit blocked for {submit_s:.3f} s"

    # work queued on the compute stream after submit completes without waiting for the copy
    after = torch.cuda.Event()
    torch.ones(1, device=DEVICE).add_(1)
    after.record(compute)
    after.synchronize()
    assert not handle.ready(), "the compute stream's later work waited for the side-stream copy"

    assert handle.wait() is host
    assert handle.ready()
    assert torch.equal(host, src.cpu())


@_apply(gpu)
def test_copier_rejects_bad_arguments(kernels):
    copier = AsyncCopier()
    src = torch.zeros(4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="pinned"):
        copier.submit(src, torch.empty(4, 4))
    with pytest.raises(ValueError, match="mismatch"):
        copier.submit(src, torch.empty(4, 5).pin_memory())
    with pytest.raises(ValueError, match="contiguous"):
        copier.submit(src, torch.empty(4, 8).pin_memory()[:, ::2])
    assert math.isfinite(float(src.sum()))
