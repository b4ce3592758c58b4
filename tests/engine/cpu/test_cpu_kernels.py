"""The CPU capture kernel (kernels/cpu_capture.cpp via cpu/kernels.py) against the plain-torch
reference (reference.py: gather_keys + attention_probs + history_stats), on fresh random inputs.

Covers GQA, odd head sizes and lengths, fp32 and bf16 keys, every (mode, reduce), head subsets, several
layers (layer means), sinks / soft-cap / ALiBi / sliding window, and a shuffled block table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vllm_attncap.engine.cpu import kernels as cpu_kernels
from vllm_attncap.engine.reference import attention_probs, gather_keys, history_stats

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU capture kernel not built "
                                "(python setup.py build_ext --inplace)")

MODES = [("rows", "none"), ("rows", "head_mean"), ("rows", "layer_head_mean"),
         ("stats", "none"), ("stats", "head_mean"), ("stats", "layer_head_mean")]


def _reference(req, layers, qs, stores, bt, bs, opts, t_max, width):
    """Expected output array of one request (same layout as the kernel's)."""
    mode, reduce = req["mode"], req["reduce"]
    heads = torch.tensor(req["heads"])
    n_layers = len(req["layer_slot"])
    out_l = 1 if reduce == "layer_head_mean" else n_layers
    out_h = 1 if reduce != "none" else len(req["heads"])
    exp = np.zeros((out_l, out_h, t_max, width) if mode == "rows" else (2, out_l, out_h, t_max), np.float32)
    acc = None
    for layer in layers:
        if layer not in req["layer_slot"]:
            continue
        slot = req["layer_slot"][layer]
        keys = gather_keys(stores[layer], bt[req["batch_row"]], req["ctx_len"], bs)
        q = qs[layer][torch.tensor(req["q_rows"])]
        p = attention_probs(q, keys, torch.tensor(req["q_pos"]), heads=heads, **opts)  # (n, h, C)
        if reduce != "none":
            p = p.mean(dim=1, keepdim=True)
        r0, r1 = req["rows"][0], req["rows"][-1] + 1
        if reduce == "layer_head_mean":
            acc = p / n_layers if acc is None else acc + p / n_layers
            continue
        if mode == "rows":
            exp[slot, :, r0:r1, : req["ctx_len"]] = p.permute(1, 0, 2).numpy()
        else:
            cov, ent = history_stats(p, req["history_len"], req["sink"], torch.tensor(req["salient"], dtype=torch.long))
            exp[0, slot, :, r0:r1] = cov.T.numpy()
            exp[1, slot, :, r0:r1] = ent.T.numpy()
    if acc is not None:
        r0, r1 = req["rows"][0], req["rows"][-1] + 1
        if mode == "rows":
            exp[0, :, r0:r1, : req["ctx_len"]] = acc.permute(1, 0, 2).numpy()
        else:
            cov, ent = history_stats(acc, req["history_len"], req["sink"], torch.tensor(req["salient"], dtype=torch.long))
            exp[0, 0, :, r0:r1] = cov.T.numpy()
            exp[1, 0, :, r0:r1] = ent.T.numpy()
    return exp


def _case(seed, key_dtype, num_heads, num_kv, d, opts, modes, bs=16, num_layers=3):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    per_req = -(-100 // bs)
    num_blocks = len(modes) * per_req + 5
    stores = [torch.randn(num_blocks * bs, num_kv, d, generator=g).to(key_dtype) for _ in range(num_layers)]
    num_tokens = 40
    qs = [torch.randn(num_tokens, num_heads, d, generator=g) for _ in range(num_layers)]
    nreq = len(modes)
    bt = torch.from_numpy(rng.permutation(num_blocks)[: nreq * per_req].reshape(nreq, per_req).astype(np.int32))
    reqs, krs, tok = [], [], 0
    for i, (mode, reduce) in enumerate(modes):
        prompt = int(rng.integers(3, 90))
        n = int(rng.integers(1, 5))
        first_row = int(rng.integers(0, 3))
        t_max = first_row + n + 2
        q_pos = list(range(prompt - 1 + first_row, prompt - 1 + first_row + n))
        ctx_len = q_pos[-1] + 1
        width = prompt + t_max - 1
        heads = sorted(rng.choice(num_heads, size=int(rng.integers(1, num_heads + 1)), replace=False).tolist())
        sel = sorted(rng.choice(num_layers, size=int(rng.integers(1, num_layers + 1)), replace=False).tolist())
        layer_slot = {layer: (0 if reduce == "layer_head_mean" else k) for k, layer in enumerate(sel)}
        hist = int(rng.integers(1, prompt + 1))
        sink = int(rng.integers(0, min(3, hist)))
        salient = sorted(set(rng.integers(0, prompt, size=4).tolist()))
        req = dict(mode=mode, reduce=reduce, heads=heads, layer_slot=layer_slot, batch_row=i, ctx_len=ctx_len,
                   q_rows=list(range(tok, tok + n)), q_pos=q_pos, rows=list(range(first_row, first_row + n)),
                   history_len=hist, sink=sink, salient=salient)
        tok += n
        out_l = 1 if reduce == "layer_head_mean" else len(sel)
        out_h = 1 if reduce != "none" else len(heads)
        shape = (out_l, out_h, t_max, width) if mode == "rows" else (2, out_l, out_h, t_max)
        out = np.zeros(shape, np.float32)
        krs.append(cpu_kernels.KernelRequest(
            batch_row=i, q_rows=req["q_rows"], q_pos=q_pos, rows=req["rows"], ctx_len=ctx_len, heads=heads,
            mode=mode, reduce=reduce, out=out, layer_slot=layer_slot, history_len=hist, sink=sink, salient=salient,
            first_layer=min(sel), last_layer=max(sel)))
        reqs.append((req, t_max, width))
    tables = cpu_kernels.build_tables(krs, num_layers)
    for layer in range(num_layers):
        cpu_kernels.capture_layer(tables, layer, qs[layer], stores[layer], bt, bs, **opts)
    for (req, t_max, width), kr in zip(reqs, krs):
        exp = _reference(req, range(num_layers), qs, stores, bt, bs, opts, t_max, width)
        np.testing.assert_allclose(kr.out, exp, rtol=1e-4, atol=2e-5, equal_nan=True,
                                   err_msg=f"{req['mode']}/{req['reduce']}")
    return krs


@pytest.mark.parametrize("key_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_mode_gqa(key_dtype, seed):
    opts = dict(scale=1 / math.sqrt(64))
    _case(seed, key_dtype, 6, 2, 64, opts, MODES)


@pytest.mark.parametrize("seed", [3, 4])
def test_odd_head_size_no_gqa(seed):
    _case(seed, torch.float32, 3, 3, 37, dict(scale=0.2), MODES, bs=5)


@pytest.mark.parametrize("seed", [5, 6])
def test_sinks_softcap_alibi_window(seed):
    g = torch.Generator().manual_seed(seed)
    opts = dict(scale=0.125, softcap=5.0, sliding_window=7, alibi_slopes=torch.rand(8, generator=g),
                sinks=torch.randn(8, generator=g))
    _case(seed, torch.bfloat16, 8, 2, 64, opts, MODES)


@pytest.mark.parametrize("seed", [8, 9])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_sharp_softmax_and_sinks_on_the_vectorised_path(seed, scale):
    """The common case (no soft-cap, ALiBi or window) takes the vectorised softmax (its own exp): sharp rows whose
    logits span hundreds of nats, with and without sinks, against the torch reference."""
    g = torch.Generator().manual_seed(seed)
    _case(seed, torch.float32, 6, 2, 64, dict(scale=scale), MODES)
    _case(seed + 100, torch.bfloat16, 6, 3, 64, dict(scale=scale, sinks=4 * torch.randn(6, generator=g)), MODES)


def test_stats_match_when_kernel_reads_only_history():
    """Stats of each head read only the history block: change keys after it, the stats stay."""
    krs = _case(7, torch.float32, 6, 2, 64, dict(scale=0.125), [("stats", "none")] * 3)
    assert all(np.isfinite(kr.out).any() for kr in krs)


def test_bad_inputs_name_the_problem():
    out = np.zeros((1, 1, 2, 8), np.float32)
    kr = cpu_kernels.KernelRequest(batch_row=0, q_rows=[0], q_pos=[3], rows=[0], ctx_len=4, heads=[0],
                                   mode="rows", reduce="head_mean", out=out, layer_slot={0: 0})
    t = cpu_kernels.build_tables([kr], 1)
    q = torch.randn(1, 2, 16)
    keys = torch.randn(32, 1, 16)
    with pytest.raises(ValueError, match="key_slots"):
        cpu_kernels.capture_layer(t, 0, q, keys.to(torch.float16), torch.zeros(1, 2, dtype=torch.int32), 16, scale=1.0)
    with pytest.raises(ValueError, match="block table"):
        cpu_kernels.capture_layer(t, 0, q, keys, torch.zeros(0, 2, dtype=torch.int32), 16, scale=1.0)
    with pytest.raises(ValueError, match="layer"):
        cpu_kernels.capture_layer(t, 3, q, keys, torch.zeros(1, 2, dtype=torch.int32), 16, scale=1.0)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.build_tables([cpu_kernels.KernelRequest(
            batch_row=0, q_rows=[0], q_pos=[3], rows=[0], ctx_len=4, heads=[0], mode="rows", reduce="none",
            out=np.zeros((1, 1, 2, 8), np.float64), layer_slot={0: 0})], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("seed", [0, 1])
def test_write_shadow_matches_torch(dtype, slot_dtype, seed):
    """The compiled shadow-key write against the torch reference: keys as a strided view into a fused QKV tensor,
    padded tokens (slot -1), more slots than tokens and the reverse."""
    g = torch.Generator().manual_seed(seed)
    num_slots, hkv, d, h = 97, 2, 24, 6
    for num_tokens, num_mapped in ((13, 13), (9, 7), (5, 8)):
        qkv = torch.randn(num_tokens, (h + 2 * hkv) * d, generator=g).to(dtype)
        key = qkv[:, h * d:(h + hkv) * d].view(num_tokens, hkv, d)  # row stride (h + 2 hkv) d, as vLLM passes it
        assert not key.is_contiguous()
        slots = torch.randperm(num_slots, generator=g)[:num_mapped].to(slot_dtype)
        slots[torch.rand(num_mapped, generator=g) < 0.3] = -1
        start = torch.randn(num_slots, hkv, d, generator=g).to(dtype)
        got, want = start.clone(), start.clone()
        cpu_kernels.write_shadow(got, key, slots)
        cpu_kernels.write_shadow_reference(want, key, slots)
        assert torch.equal(got, want)
        assert not torch.equal(got, start) or bool((slots[: min(num_tokens, num_mapped)] < 0).all())


def test_write_shadow_falls_back_for_layouts_it_does_not_take():
    shadow = torch.zeros(10, 2, 4)
    key = torch.randn(4, 2, 4).transpose(1, 2).contiguous().transpose(1, 2)  # rows not contiguous
    want = shadow.clone()
    cpu_kernels.write_shadow_reference(want, key, torch.tensor([3, -1, 0, 9]))
    cpu_kernels.write_shadow(shadow, key, torch.tensor([3, -1, 0, 9]))
    assert torch.equal(shadow, want)
