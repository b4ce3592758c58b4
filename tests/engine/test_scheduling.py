"""Row semantics hold under chunked prefill, prefix caching and preemption/recompute."""

from __future__ import annotations

import numpy as np
import pytest

from engine_utils import hf_rows

pytestmark = pytest.mark.engine
TOL = 1e-4


def _long_prompt(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over lazy dog printer router cables update Alice Bob Paris apples".split()
    return " ".join(rng.choice(words, size=n_words))


def _check(outs, hf):
    for out in outs:
        assert out.error is None
        full = hf_rows(hf, out.prompt_token_ids, out.token_ids)
        np.testing.assert_allclose(out.attention, full, atol=TOL, rtol=0)


def test_chunked_prefill_spreads_prompt_over_steps(make_llm, hf_tiny):
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions

    llm = make_llm(enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=4)
    prompts = [_long_prompt(60, 1), _long_prompt(45, 2), "hi there"]
    outs = generate_with_attentions(llm, prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
    assert max(o.prompt_len for o in outs) > 32  # the prompt really needed several steps
    _check(outs, hf_tiny)


def test_prefix_cache_hit_uses_keys_of_an_earlier_request(make_llm, hf_tiny):
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions

    llm = make_llm(enable_prefix_caching=True)
    block = llm.llm_engine.vllm_config.cache_config.block_size
    shared = _long_prompt(block + 40, 3)  # > one full block of tokens
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate([shared + " first"], sp, use_tqdm=False)  # no capture: fills the prefix cache
    outs = generate_with_attentions(llm, [shared + " second question"], sp, use_tqdm=False)
    assert outs[0].output.num_cached_tokens >= block  # keys came from the cache
    _check(outs, hf_tiny)


def test_preemption_and_recompute(make_llm, hf_tiny):
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions
    from vllm_attncap.engine.tracker import get_tracker

    # 4 KV blocks for 4 requests that each grow past one block: the scheduler must preempt.
    llm = make_llm(num_gpu_blocks_override=4, max_model_len=256, max_num_seqs=4, enable_prefix_caching=False)
    block = llm.llm_engine.vllm_config.cache_config.block_size
    before = get_tracker().recomputed_rows
    # prompts fit one block (~0.75 block of tokens); prompt + output needs two
    prompts = [_long_prompt(int(block * 0.31), s) for s in range(4)]
    sp = SamplingParams(max_tokens=block - 28, temperature=0, ignore_eos=True)
    outs = generate_with_attentions(llm, prompts, sp, spec={"layers": [0, -1]}, use_tqdm=False)
    assert get_tracker().recomputed_rows > before, "no request was preempted; the test did not exercise recompute"
    for out in outs:
        full = hf_rows(hf_tiny, out.prompt_token_ids, out.token_ids)[[0, -1]]
        np.testing.assert_allclose(out.attention, full, atol=TOL, rtol=0)
