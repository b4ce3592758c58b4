"""Top-k capture (spec ``topk``, ``prompt_start``) against Hugging Face eager attention: per head and head mean, in
a batch mixed with full-row captures, under chunked prefill, prefix caching and preemption, and over three turns.

Contract (docs/capture.md, "Top-k mode"): positions equal HF's top-k of the same rows, except between keys whose
probabilities differ by less than 1e-6; probabilities within 1e-5."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from topk_check import assert_topk_matches  # noqa: E402

from engine_utils import PROMPTS, hf_rows, reduce_ref  # noqa: E402

pytestmark = pytest.mark.engine


def hf_query_rows(model, ids, q_positions) -> np.ndarray:
    """float32 (L, H, R, len(ids)): HF eager attention rows of the queries at ``q_positions`` (zeros right of each
    row's causal limit)."""
    import torch

    with torch.no_grad():
        att = model(torch.tensor([list(ids)]), output_attentions=True).attentions
    return np.stack([a[0].float().numpy()[:, list(q_positions), :] for a in att])


def _check_topk(out, hf, spec):
    assert out.error is None, out.error
    ids = list(out.prompt_token_ids) + list(out.token_ids)
    P, T = out.prompt_len, len(out.token_ids)
    start = spec.get("prompt_start", P)
    q = list(range(start - 1, P - 1 + T))
    ref = reduce_ref(hf_query_rows(hf, ids, q), out.layers, out.heads, spec.get("reduce", "none"))
    pos, val = out.topk_positions, out.topk_probs
    h_out = 1 if spec.get("reduce") == "head_mean" else len(out.heads)
    assert pos.shape == (len(out.layers), h_out, len(q), spec["topk"])
    assert out.captured.num_tokens == T and out.captured.prompt_start == start
    assert_topk_matches(pos, val, ref, q, prob_tol=1e-5, tie_tol=1e-6, what=str(spec))


def test_topk_matches_hf_per_head_and_head_mean(make_llm, hf_tiny):
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions

    llm = make_llm()
    specs = [
        {"layers": [0, -1], "topk": 5},
        {"layers": [-1], "reduce": "head_mean", "topk": 3},
        {"heads": [3, 1], "topk": 64},  # more keys asked for than the rows have: padded
        {"layers": [1], "reduce": "head_mean", "topk": 4, "prompt_start": 3},
        {"layers": [-1], "reduce": "head_mean"},  # full rows in the same batch
        {"topk": 1, "prompt_start": 1},  # every token's row, position 0 included
    ]
    sps = [SamplingParams(max_tokens=t, temperature=0, ignore_eos=True) for t in (7, 5, 6, 4, 3, 2)]
    outs = generate_with_attentions(llm, PROMPTS[:6], sps, spec=specs, use_tqdm=False)
    for out, spec in zip(outs, specs):
        if "topk" in spec:
            _check_topk(out, hf_tiny, spec)
            with pytest.raises(ValueError, match="topk"):
                out.attention
        else:
            full = reduce_ref(hf_rows(hf_tiny, out.prompt_token_ids, out.token_ids), out.layers, out.heads,
                              "head_mean")
            np.testing.assert_allclose(out.attention, full, atol=1e-4, rtol=0)
    assert (outs[2].topk_positions[..., 0, -1] == -1).all()  # row 0 has P keys < 64


def test_topk_bad_values_fail_their_request_only(make_llm):
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions

    llm = make_llm()
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    bad = [({"topk": 0}, "topk"), ({"topk": 1025}, "topk"), ({"topk": "8"}, "topk"),
           ({"topk": 4, "reduce": "layer_head_mean"}, "reduce"), ({"topk": 4, "mode": "stats"}, "mode"),
           ({"prompt_start": 2}, "prompt_start"), ({"topk": 2, "prompt_start": 0}, "prompt_start"),
           ({"topk": 2, "prompt_start": 999}, "prompt_start")]
    specs = [b[0] for b in bad] + [{"topk": 2}]
    outs = generate_with_attentions(llm, [PROMPTS[0]] * len(specs), sp, spec=specs, use_tqdm=False)
    for out, (_, field) in zip(outs, bad):
        assert out.output is None and f"'{field}'" in str(out.error), (field, out.error)
    assert outs[-1].error is None and outs[-1].topk_positions.shape == (3, 4, 3, 2)


def _long_prompt(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over lazy dog printer router cables update Alice Bob Paris apples".split()
    return " ".join(rng.choice(words, size=n_words))


def test_topk_under_chunked_prefill(make_llm, hf_tiny):
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions

    llm = make_llm(enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=4)
    prompts = [_long_prompt(60, 1), _long_prompt(45, 2), "hi there"]
    specs = [{"topk": 6, "prompt_start": 5}, {"topk": 3, "reduce": "head_mean", "prompt_start": 20},
             {"topk": 2, "layers": [-1]}]
    outs = generate_with_attentions(llm, prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                                    spec=specs, use_tqdm=False)
    assert max(o.prompt_len for o in outs) > 32  # the prompt rows really came from several chunks
    for out, spec in zip(outs, specs):
        _check_topk(out, hf_tiny, spec)


def test_topk_under_prefix_caching(make_llm, hf_tiny):
    from vllm import SamplingParams

    from vllm_attncap import collect, generate_with_attentions

    llm = make_llm(enable_prefix_caching=True)
    block = llm.llm_engine.vllm_config.cache_config.block_size
    shared = _long_prompt(block + 40, 3)
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate([shared + " first"], sp, use_tqdm=False)  # fills the prefix cache
    specs = [{"topk": 4, "layers": [0, 2]}, {"topk": 3, "reduce": "head_mean", "prompt_start": 2}]
    outs = generate_with_attentions(llm, [shared + " second question", shared + " third one"], sp, spec=specs,
                                    use_tqdm=False)
    assert outs[0].output.num_cached_tokens >= block  # the reply's rows read cached keys
    assert outs[1].output.num_cached_tokens == 0  # prompt rows: the helper skipped reading the cache
    for out, spec in zip(outs, specs):
        _check_topk(out, hf_tiny, spec)
    # a caller that asks for prompt rows but lets the cache cover them gets an error naming prompt_start
    raw = SamplingParams(max_tokens=2, temperature=0, extra_args={"attncap": {"topk": 2, "prompt_start": 2,
                                                                              "key": "topk-cached"}})
    res = llm.generate([shared + " fourth"], raw, use_tqdm=False)[0]
    assert res.num_cached_tokens >= block
    got = collect(res, "topk-cached")
    assert got.error is not None and "'prompt_start'" in str(got.error) and "skip_reading_prefix_cache" in str(got.error)


def test_topk_under_preemption(make_llm, hf_tiny):
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions
    from vllm_attncap.engine.tracker import get_tracker

    llm = make_llm(num_gpu_blocks_override=4, max_model_len=256, max_num_seqs=4, enable_prefix_caching=False)
    block = llm.llm_engine.vllm_config.cache_config.block_size
    before = get_tracker().recomputed_rows
    prompts = [_long_prompt(int(block * 0.31), s) for s in range(4)]
    sp = SamplingParams(max_tokens=block - 28, temperature=0, ignore_eos=True)
    specs = [{"topk": 5, "layers": [0, -1]}, {"topk": 8, "reduce": "head_mean"},
             {"topk": 3, "prompt_start": 4}, {"topk": 2, "reduce": "head_mean", "prompt_start": 1}]
    outs = generate_with_attentions(llm, prompts, sp, spec=specs, use_tqdm=False)
    assert get_tracker().recomputed_rows > before, "no request was preempted; the test did not exercise recompute"
    for out, spec in zip(outs, specs):
        _check_topk(out, hf_tiny, spec)


def test_prompt_start_over_three_turns(make_llm, hf_tiny):
    """Token-in multi-turn: each turn sends the whole history and prompt_start = the first token the caller has not
    seen; the three turns' rows, end to end, are exactly one row per token of the final conversation from the
    first reply on, each equal to HF's top-k over the whole context."""
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions

    llm = make_llm(enable_prefix_caching=True)
    tok = llm.get_tokenizer()
    users = ["my printer does not work", " it still fails after a restart", " thanks, what about the router?"]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    history: list[int] = []
    seen = None
    rows_pos, rows_prob = [], []
    for turn, text in enumerate(users):
        history = history + tok.encode(text)
        spec = {"topk": 4, "layers": [-1], "reduce": "head_mean"}
        if seen is not None:
            spec["prompt_start"] = seen
        out = generate_with_attentions(llm, {"prompt_token_ids": history}, sp, spec=spec, use_tqdm=False)[0]
        assert out.error is None, out.error
        P = out.prompt_len
        want_rows = (P - (seen if seen is not None else P)) + len(out.token_ids)
        assert out.topk_positions.shape[2] == want_rows
        rows_pos.append(out.topk_positions[0, 0])
        rows_prob.append(out.topk_probs[0, 0])
        history = history + list(out.token_ids)
        seen = len(history)  # every token so far has had its row (the last reply token's query runs next turn)
    first = len(tok.encode(users[0])) - 1  # the query of the first reply token
    q = list(range(first, len(history) - 1))
    pos, val = np.concatenate(rows_pos), np.concatenate(rows_prob)
    assert pos.shape[0] == len(q)
    ref = hf_query_rows(hf_tiny, history, q)[-1].mean(axis=0, keepdims=True)
    assert_topk_matches(pos[None], val[None], ref, q, prob_tol=1e-5, tie_tol=1e-6, what="three turns")
