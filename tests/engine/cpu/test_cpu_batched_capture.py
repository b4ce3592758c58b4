"""The batched CPU path (engine/cpu/capture.py: one kernel call per layer for the whole step) against the
per-request torch path (engine/capture.py), on mixed steps: different specs, prompt lengths, a prefill chunk
next to decode rows, requests without capture, a request with long-history elision (kept on the torch path),
over several steps and layers. No engine: plans and buffers are built as the metadata builder builds them."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_attncap.engine.cpu import capture as cpu_capture
from vllm_attncap.engine.capture import capture_layer
from vllm_attncap.engine.reference import gather_keys
from vllm_attncap.engine.plan import RowBatch, StepPlan
from vllm_attncap.engine.tracker import CaptureTracker, ModelShape
from store_utils import private_store  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_capture.kernel_enabled(), reason="CPU capture kernel not built")

L, H, HKV, D, BS = 4, 6, 2, 64, 16
SPECS = [
    {},  # rows, all layers and heads
    {"layers": [-1], "reduce": "head_mean"},
    {"layers": [0, 2], "heads": [1, 4, 5], "reduce": "layer_head_mean"},
    {"mode": "stats", "salient": [1, 3, 7], "sink": 1},
    {"mode": "stats", "reduce": "head_mean", "heads": [0, 2]},
    {"mode": "stats", "reduce": "layer_head_mean", "layers": [1, 3], "salient": [2]},
    {"mode": "stats", "n_max": 8, "window": 4, "salient": [2]},  # elision: torch path inside the batched step
    None,  # no capture
]


def _steps(rng, prompts, new_tokens):
    """Per step: list of (request index, q_len, seq_len) - a chunked prefill, then prefills + decodes mixed."""
    n = len(prompts)
    done = [0] * n
    steps = []
    while any(done[i] < prompts[i] + new_tokens - 1 for i in range(n)):
        step = []
        for i in range(n):
            total = prompts[i] + new_tokens - 1
            if done[i] >= total:
                continue
            q = min(total - done[i], int(rng.integers(5, 40))) if done[i] < prompts[i] else 1
            step.append((i, q, done[i] + q))
            done[i] += q
        steps.append(step)
    return steps


def _run(use_kernel, tmp_path, monkeypatch, seed=0):
    private_store(monkeypatch, tmp_path / ("k" if use_kernel else "t"))
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [int(rng.integers(4, 60)) for _ in SPECS]
    prompts[6] = 40  # longer than its n_max: elided
    fallback_steps = 0
    new_tokens = 5
    tracker = CaptureTracker()
    tracker.set_model_shape(ModelShape(L, H, HKV, D, 256))
    tracker.set_cache_type(cpu_capture.CpuRequestCache)  # as the CPU metadata builder does
    max_blocks = -(-(max(prompts) + new_tokens) // BS)
    num_blocks = len(SPECS) * max_blocks + 3
    bt = torch.from_numpy(rng.permutation(num_blocks)[: len(SPECS) * max_blocks].reshape(len(SPECS), -1)
                          .astype(np.int32))
    stores = [torch.randn(num_blocks * BS, HKV, D, generator=g).to(torch.bfloat16) for _ in range(L)]
    impl = SimpleNamespace(scale=1 / math.sqrt(D), logits_soft_cap=None, alibi_slopes=None, sinks=None)
    rcs = {}
    for step in _steps(rng, prompts, new_tokens):
        qsl = [0]
        for _, q, _ in step:
            qsl.append(qsl[-1] + q)
        query = [torch.randn(qsl[-1], H, D, generator=g).to(torch.bfloat16) for _ in range(L)]
        batches, layers = [], set()
        for row, (i, q_len, seq_len) in enumerate(step):
            if SPECS[i] is None:
                continue
            p = prompts[i]
            rc = tracker.lookup(f"req{i}", SPECS[i], p, new_tokens)
            rcs[i] = rc
            first_pos = seq_len - q_len
            lo, hi = max(first_pos, p - 1), min(seq_len, p - 1 + rc.resolved.max_tokens)
            if hi <= lo:
                continue
            pos = torch.arange(lo, hi)
            batches.append(RowBatch(rc=rc, token_index=pos - first_pos + qsl[row], q_pos=pos,
                                    rows=list(range(lo - (p - 1), hi - (p - 1))), ctx_len=hi,
                                    block_table_row=bt[i], batch_row=row))
            layers.update(rc.resolved.layers)
        if not batches:
            continue
        # the step's block table: row r = the request at batch row r
        step_bt = torch.stack([bt[i] for i, _, _ in step])
        plan = StepPlan(batches, frozenset(layers), block_table=step_bt)
        cpu_step = None  # what AttnCapCPUMetadata.attncap_cpu_step holds: made at the first captured layer
        for layer in range(L):
            if not plan.wants(layer):
                continue
            if use_kernel:
                if cpu_step is None:
                    cpu_step = cpu_capture.prepare_step(plan, stores[layer].dtype)
                cpu_capture.capture_layer(impl, layer, query[layer], stores[layer], BS, plan, cpu_step)
            else:
                capture_layer(impl, layer, query[layer],
                              lambda b, s=stores[layer]: gather_keys(s, b.block_table_row, b.ctx_len, BS), plan)
        if use_kernel:
            assert cpu_step is not None and cpu_step.tables is not None
            fallback_steps += cpu_step.fallback is not None  # the elision request
    assert not use_kernel or fallback_steps > 0
    out = {i: (np.array(rc.writer.array), rc.writer.rows_written) for i, rc in rcs.items()}
    tracker.close_all()
    return out


def test_batched_matches_per_request(tmp_path, monkeypatch):
    got = _run(True, tmp_path, monkeypatch)
    want = _run(False, tmp_path, monkeypatch)
    assert set(got) == set(want) == {i for i, s in enumerate(SPECS) if s is not None}
    for i in got:
        (a, ra), (b, rb) = got[i], want[i]
        assert ra == rb == 5, SPECS[i]
        assert np.abs(a).sum() > 0, SPECS[i]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, equal_nan=True, err_msg=str(SPECS[i]))


def test_switch_off_uses_torch_path(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ATTNCAP_CPU_KERNEL", "0")
    assert not cpu_capture.kernel_enabled()
