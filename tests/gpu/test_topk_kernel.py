"""The CUDA top-k kernel (kernels/topk.cu, engine/cuda/kernels.py ``topk_keys``) against the torch reference
(engine/reference.py ``topk_keys``) on fresh random rows: exact ties, rows shorter than k, sliding windows, NaN
entries, k = 1 .. 1024, contexts up to 32k, strided inputs.

Both sides read the same float32 probabilities, so they must agree exactly: the same positions and bit-equal
probabilities (the kernel copies the values it selects; ties are broken by position on both sides).

Never run yet: no GPU has been at hand since the kernel was written (docs/kernels.md). Skipped without CUDA.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from vllm_attncap.engine.reference import topk_keys as reference_topk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _rows(n, h, c, seed, *, ties=False, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(n, h, c, generator=g) * sharp, dim=-1)
    if ties:  # the same value at several positions; quantised values give many more ties
        p = torch.round(p * 64) / 64
        p[:, :, 3::7] = p[:, :, 1:2]
    q_pos = torch.randint(0, c, (n,), generator=g)
    q_pos[0] = c - 1
    return p, q_pos


@pytest.mark.parametrize("k", [1, 2, 7, 32, 256, 1024])
@pytest.mark.parametrize("window", [-1, 50])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_kernel_matches_reference(kernels, k, window, ties):
    from vllm_attncap.engine.cuda import kernels as attncap_cuda

    for c, sharp in ((5, 1.0), (300, 4.0), (4096, 2.0), (32768, 8.0)):
        p, q_pos = _rows(6, 3, c, _seed(k, window, ties, c), ties=ties, sharp=sharp)
        want_pos, want_val = reference_topk(p, q_pos, k, sliding_window=window)
        got_pos, got_val = attncap_cuda.topk_keys(p.cuda(), q_pos.cuda(), k, sliding_window=window)
        torch.cuda.synchronize()
        assert torch.equal(got_pos.cpu(), want_pos), (k, window, ties, c)
        assert torch.equal(got_val.cpu(), want_val), (k, window, ties, c)


def test_topk_kernel_strided_input_and_nan(kernels):
    from vllm_attncap.engine.cuda import kernels as attncap_cuda

    p, q_pos = _rows(4, 5, 700, _seed("strided"))
    p[1, 2, 10] = float("nan")  # not a key
    view = p.cuda()[:, [4, 0, 2]]  # a head subset: strided rows
    got_pos, got_val = attncap_cuda.topk_keys(view, q_pos.cuda(), 16)
    want_pos, want_val = reference_topk(p[:, [4, 0, 2]].nan_to_num(-1.0).clamp(min=-1.0), q_pos, 16)
    assert torch.equal(got_pos.cpu(), want_pos)
    assert torch.equal(got_val.cpu(), want_val)


def test_topk_kernel_bad_arguments(kernels):
    from vllm_attncap.engine.cuda import kernels as attncap_cuda

    p, q_pos = _rows(2, 1, 10, 0)
    with pytest.raises(ValueError, match="k must"):
        attncap_cuda.topk_keys(p.cuda(), q_pos.cuda(), 1025)
    with pytest.raises(ValueError, match="float32"):
        attncap_cuda.topk_keys(p.cuda().half(), q_pos.cuda(), 4)
