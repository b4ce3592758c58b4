"""Buffers are bounded and freed: aborted requests, many sequential requests."""

from __future__ import annotations

import gc
import os

import pytest

from engine_utils import PROMPTS

pytestmark = pytest.mark.engine


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _store_bytes() -> int:
    from vllm_attncap.store import pending_bytes

    return pending_bytes()  # backed bytes of the capture records in this process's namespace


def test_aborted_request_frees_its_buffer(make_llm):
    from vllm import SamplingParams

    from vllm_attncap.store import discard_capture
    from vllm_attncap.engine.tracker import get_tracker

    llm = make_llm()
    engine = llm.llm_engine
    tracker = get_tracker()
    sp = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True, extra_args={"attncap": {"key": "abort-me"}})
    engine.add_request("abort-me", PROMPTS[0], sp)
    for _ in range(3):
        engine.step()
    mine = [rid for rid in tracker.active if rid.startswith("abort-me")]
    assert len(mine) == 1
    writer = tracker.active[mine[0]].writer
    assert writer.array is not None and writer.rows_written >= 2
    engine.abort_request(["abort-me"])
    # the worker learns about the abort with the next scheduled step
    llm.generate([PROMPTS[1]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert mine[0] not in tracker.active
    assert writer.array is None  # unmapped
    assert discard_capture("abort-me") == 1  # one record file; the caller (or the cap) removes it


@pytest.mark.slow
def test_2000_sequential_capture_requests_stay_bounded(make_llm, tmp_path, monkeypatch):
    """2,000 capture requests, sent as 100 sequential batches of 20 (one request per
    batch would only time Python overhead): RSS grows < 64 MiB after warm-up (measured:
    ~1 MiB), no file is left behind."""
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions
    from vllm_attncap.engine.tracker import get_tracker

    from store_utils import private_store

    # a store of this test's own: other processes' captures must not count
    private_store(monkeypatch, tmp_path / "store")
    llm = make_llm()
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    specs = [{}, {"layers": [-1], "reduce": "head_mean"}, {"mode": "stats", "salient": [1, 2]}]
    before_files = _store_bytes()
    batch = 20
    prompts = [PROMPTS[i % 8] for i in range(batch)]
    spec_batch = [specs[i % 3] for i in range(batch)]
    for _ in range(5):  # warm-up: allocator pools, caches
        generate_with_attentions(llm, prompts, sp, spec=spec_batch, use_tqdm=False)
    gc.collect()
    rss0 = _rss_mb()
    for _ in range(2000 // batch):
        outs = generate_with_attentions(llm, prompts, sp, spec=spec_batch, use_tqdm=False)
        assert all(o.error is None for o in outs)
    gc.collect()
    growth = _rss_mb() - rss0
    print(f"RSS growth over 2000 capture requests: {growth:.1f} MiB")
    assert growth < 64
    assert len(get_tracker().active) <= batch  # at most the last batch, closed at the next step
    assert before_files == 0
    assert _store_bytes() == 0  # every capture file was collected
