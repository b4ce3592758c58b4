"""Top-k capture: the torch reference (engine/reference.py ``topk_keys``) against a plain numpy ranking, and the CPU
kernel (kernels/cpu_capture.cpp, kinds TOPK_NONE / TOPK_MEAN) against the torch reference, on fresh random inputs:
GQA, fp32 and bf16 keys, exact ties (duplicated keys), rows shorter than k, sinks, soft-cap / ALiBi / sliding
window, head subsets, several layers, prompt rows (rows before the reply)."""

from __future__ import annotations

import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2]))  # tests/: the shared top-k check
from topk_check import assert_topk_matches  # noqa: E402
from vllm_attncap.engine.cpu import kernels as cpu_kernels  # noqa: E402
from vllm_attncap.engine.reference import attention_probs, gather_keys, topk_keys  # noqa: E402

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU capture kernel not built "
                                  "(python setup.py build_ext --inplace)")


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


@pytest.mark.parametrize("case", range(6))
def test_reference_ranks_like_numpy(case):
    g = torch.Generator().manual_seed(_seed("ref", case))
    n, h, ctx = 5, 3, 23
    probs = torch.softmax(torch.randn(n, h, ctx, generator=g) * 3, dim=-1)
    probs[:, :, 4] = probs[:, :, 9]  # exact ties
    q_pos = torch.tensor([0, 3, 10, 21, 22])
    window = [-1, 5][case % 2]
    k = [1, 4, 30][case % 3]
    pos, val = topk_keys(probs, q_pos, k, sliding_window=window)
    assert pos.shape == val.shape == (n, h, k)
    assert_topk_matches(pos.numpy().transpose(1, 0, 2), val.numpy().transpose(1, 0, 2),
                        probs.numpy().transpose(1, 0, 2), q_pos.tolist(), window=window, prob_tol=0, tie_tol=0)


def test_reference_ties_go_to_the_lower_position():
    probs = torch.tensor([[[0.1, 0.3, 0.1, 0.3, 0.2]]])
    pos, val = topk_keys(probs, torch.tensor([4]), 4)
    assert pos.tolist() == [[[1, 3, 4, 0]]]
    assert val[0, 0].tolist() == pytest.approx([0.3, 0.3, 0.2, 0.1])


def _case(seed, key_dtype, num_heads, num_kv, d, opts, kinds, *, bs=16, num_layers=3, ties=False):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    per_req = -(-120 // bs)
    num_blocks = len(kinds) * per_req + 3
    stores = [torch.randn(num_blocks * bs, num_kv, d, generator=g).to(key_dtype) for _ in range(num_layers)]
    num_tokens = 48
    qs = [torch.randn(num_tokens, num_heads, d, generator=g) for _ in range(num_layers)]
    bt = torch.from_numpy(rng.permutation(num_blocks)[: len(kinds) * per_req].reshape(len(kinds), per_req)
                          .astype(np.int32))
    if ties:  # several positions of a request hold the same key: exactly equal probabilities
        for layer in range(num_layers):
            slots = stores[layer]
            for i in range(len(kinds)):
                row = bt[i].long()
                src = row[0] * bs + 2
                for p in (5, 7, 11, 40, 41):
                    slots[row[p // bs] * bs + p % bs] = slots[src]
    krs, tok = [], 0
    for i, reduce in enumerate(kinds):
        k = int(rng.choice([1, 3, 8, 64, 200]))
        prompt = int(rng.integers(2, 100))
        prompt_start = int(rng.integers(1, prompt + 1))  # rows of prompt tokens too
        n = int(rng.integers(1, 6))
        first_row = int(rng.integers(0, 3))
        origin = prompt_start - 1
        q_pos = list(range(origin + first_row, origin + first_row + n))
        n_rows = (prompt - prompt_start) + first_row + n + 2
        heads = sorted(rng.choice(num_heads, size=int(rng.integers(1, num_heads + 1)), replace=False).tolist())
        sel = sorted(rng.choice(num_layers, size=int(rng.integers(1, num_layers + 1)), replace=False).tolist())
        layer_slot = {layer: s for s, layer in enumerate(sel)}
        out_h = 1 if reduce == "head_mean" else len(heads)
        out = np.full((2, len(sel), out_h, n_rows, k), np.nan, np.float32)  # rows not captured stay NaN
        kr = cpu_kernels.KernelRequest(
            batch_row=i, q_rows=list(range(tok, tok + n)), q_pos=q_pos, rows=list(range(first_row, first_row + n)),
            ctx_len=q_pos[-1] + 1, heads=heads, mode="topk", reduce=reduce, out=out, layer_slot=layer_slot,
            first_layer=min(sel), last_layer=max(sel), topk=k)
        tok += n
        krs.append(kr)
    tables = cpu_kernels.build_tables(krs, num_layers)
    for layer in range(num_layers):
        cpu_kernels.capture_layer(tables, layer, qs[layer], stores[layer], bt, bs, **opts)
    window = opts.get("sliding_window", -1)
    for kr in krs:
        for layer, slot in kr.layer_slot.items():
            keys = gather_keys(stores[layer], bt[kr.batch_row], kr.ctx_len, bs)
            q = qs[layer][torch.tensor(kr.q_rows)]
            qp = torch.tensor(kr.q_pos)
            p = attention_probs(q, keys, qp, heads=torch.tensor(kr.heads), **opts)  # (n, h, C)
            if kr.reduce == "head_mean":
                p = p.mean(dim=1, keepdim=True)
            r0, r1 = kr.rows[0], kr.rows[-1] + 1
            got_v = kr.out[0, slot, :, r0:r1]
            got_p = kr.out[1, slot, :, r0:r1]
            assert np.isfinite(got_p).all() and (got_p == np.round(got_p)).all()
            what = f"{kr.reduce} k={kr.topk} layer {layer}"
            assert_topk_matches(got_p.astype(np.int32), got_v, p.permute(1, 0, 2).numpy(), kr.q_pos,
                                window=window, what=what)
            # the kernel equals the torch reference's own top-k (up to near-ties)
            ref_p, ref_v = topk_keys(p, qp, kr.topk, sliding_window=window)
            np.testing.assert_allclose(got_v, ref_v.permute(1, 0, 2).numpy(), atol=1e-5, rtol=0, err_msg=what)
            untouched = np.ones(kr.out.shape[3], bool)
            untouched[r0:r1] = False
            assert np.isnan(kr.out[:, slot, :, untouched]).all(), "rows outside the step were written"
    return krs


KINDS = ["none", "head_mean", "none", "head_mean"]


@needs_kernel
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_matches_reference_gqa(key_dtype, seed):
    _case(_seed("gqa", seed, str(key_dtype)), key_dtype, 6, 2, 64, dict(scale=1 / math.sqrt(64)), KINDS)


@needs_kernel
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_breaks_exact_ties_by_position(key_dtype, seed):
    krs = _case(_seed("ties", seed, str(key_dtype)), key_dtype, 4, 2, 32, dict(scale=0.2), KINDS, ties=True)
    # the duplicated keys must show up as exact ties somewhere (else the case tests nothing)
    v = np.concatenate([kr.out[0][~np.isnan(kr.out[0])] for kr in krs])
    assert len(v) != len(np.unique(v[v > 0])) + (v == 0).sum()


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_sinks_on_the_vectorised_path(seed):
    g = torch.Generator().manual_seed(_seed("sinks", seed))
    _case(_seed("sinks", seed), torch.bfloat16, 6, 3, 64, dict(scale=1.0, sinks=3 * torch.randn(6, generator=g)),
          KINDS)


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_softcap_alibi_window_sinks(seed):
    g = torch.Generator().manual_seed(_seed("general", seed))
    opts = dict(scale=0.125, softcap=5.0, sliding_window=9, alibi_slopes=torch.rand(8, generator=g),
                sinks=torch.randn(8, generator=g))
    _case(_seed("general", seed), torch.float32, 8, 2, 64, opts, KINDS, bs=5)


@needs_kernel
def test_kernel_refuses_a_mismatched_output():
    out = np.zeros((2, 1, 1, 3, 4), np.float32)
    kr = cpu_kernels.KernelRequest(batch_row=0, q_rows=[0], q_pos=[3], rows=[0], ctx_len=4, heads=[0],
                                   mode="topk", reduce="none", out=out, layer_slot={0: 0}, topk=5)
    with pytest.raises(ValueError, match="topk"):
        cpu_kernels.build_tables([kr], 1)
    kr.out = np.zeros((1, 1, 3, 4), np.float32)
    with pytest.raises(ValueError, match="5-d"):
        cpu_kernels.build_tables([kr], 1)
