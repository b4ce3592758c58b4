"""Captured rows equal Hugging Face eager attention, and tokens equal the stock backend."""

from __future__ import annotations

import numpy as np
import pytest

from engine_utils import PROMPTS, hf_rows, reduce_ref, stats_ref

pytestmark = pytest.mark.engine
TOL = 1e-4  # fp32 tiny model; measured max |diff| ~2e-6


def test_mixed_batch_rows_match_hf(make_llm, hf_tiny):
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions

    llm = make_llm()
    specs = [
        {},  # every layer and head
        {"layers": [-1], "reduce": "head_mean"},
        {"layers": [0, -1], "heads": [3, 1], "reduce": "none"},
        {"layers": [0, 2], "reduce": "layer_head_mean"},
        {"layers": "all", "heads": [0], "reduce": "none"},
    ]
    prompts = PROMPTS[:5]
    sps = [SamplingParams(max_tokens=t, temperature=0, ignore_eos=True) for t in (9, 5, 7, 3, 1)]
    outs = generate_with_attentions(llm, prompts, sps, spec=specs, use_tqdm=False)
    for out, spec, sp in zip(outs, specs, sps):
        assert out.error is None
        full = hf_rows(hf_tiny, out.prompt_token_ids, out.token_ids)
        ref = reduce_ref(full, out.layers, out.heads, spec.get("reduce", "none"))
        assert out.attention.shape == ref.shape
        assert out.attention.shape[2] == sp.max_tokens
        np.testing.assert_allclose(out.attention, ref, atol=TOL, rtol=0)
        # every row is a distribution over its causal context
        P = out.prompt_len
        for s in range(out.attention.shape[2]):
            np.testing.assert_allclose(out.attention[:, :, s, : P + s].sum(-1), 1.0, atol=1e-4)
            assert not out.attention[:, :, s, P + s :].any()


def test_selected_heads_and_layers_keep_order(make_llm, hf_tiny):
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions

    llm = make_llm()
    out = generate_with_attentions(
        llm, PROMPTS[1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
        spec={"layers": [-1, 0], "heads": [-1, 0]}, use_tqdm=False,
    )[0]
    assert out.layers == (2, 0) and out.heads == (3, 0)
    full = hf_rows(hf_tiny, out.prompt_token_ids, out.token_ids)
    np.testing.assert_allclose(out.attention, full[[2, 0]][:, [3, 0]], atol=TOL, rtol=0)


@pytest.mark.parametrize("reduce", ["none", "head_mean", "layer_head_mean"])
def test_stats_mode_matches_rows(make_llm, hf_tiny, reduce):
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions

    llm = make_llm()
    salient = [0, 2, 5, 7]
    spec = {"mode": "stats", "sink": 1, "salient": salient, "layers": [1, 2], "reduce": reduce}
    out = generate_with_attentions(
        llm, PROMPTS[0], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), spec=spec, use_tqdm=False
    )[0]
    full = hf_rows(hf_tiny, out.prompt_token_ids, out.token_ids)
    ref_rows = reduce_ref(full, out.layers, out.heads, reduce)
    cov, ent = stats_ref(ref_rows, out.prompt_len, 1, salient)
    assert out.stats["coverage"].shape == cov.shape
    np.testing.assert_allclose(out.stats["coverage"], cov, atol=1e-4)
    np.testing.assert_allclose(out.stats["entropy"], ent, atol=1e-4)
    with pytest.raises(ValueError, match="stats"):
        out.attention


@pytest.mark.parametrize("reduce", ["none", "layer_head_mean"])
def test_stats_mode_elides_long_histories_like_the_reward_sdk(make_llm, hf_tiny, reduce):
    """spec n_max/window: the engine applies the reward's long-history rule before the statistics. Reference: the
    SDK's own elide() and core entropy/coverage on HF rows (an independent implementation)."""
    from vllm import SamplingParams

    from cagsr_reward import elide, row_entropy
    from vllm_attncap import generate_with_attentions

    llm = make_llm()
    prompt = " ".join(PROMPTS[:4])  # ~60 tokens > n_max
    salient, sink, n_max, window = [1, 4, 9, 30], 1, 16, 6
    spec = {"mode": "stats", "sink": sink, "salient": salient, "layers": [0, 2], "reduce": reduce,
            "n_max": n_max, "window": window}
    out = generate_with_attentions(
        llm, prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), spec=spec, use_tqdm=False
    )[0]
    assert out.error is None and out.prompt_len > n_max
    rows = reduce_ref(hf_rows(hf_tiny, out.prompt_token_ids, out.token_ids), out.layers, out.heads, reduce)
    P = out.prompt_len
    L, H, T, _ = rows.shape
    cov = np.zeros((L, H, T))
    ent = np.zeros((L, H, T))
    for l in range(L):
        for h in range(H):
            eb = elide(rows[l, h, :, :P].astype(np.float64), salient, n_max=n_max, window=window, sink=sink)
            assert eb.elided_count > 0
            ent[l, h] = row_entropy(eb.block, sink=sink)
            kept = eb.block[:, sink:]
            cov[l, h] = kept[:, eb.salient - sink].sum(-1) / kept.sum(-1)
    np.testing.assert_allclose(out.stats["entropy"], ent, atol=1e-4)
    np.testing.assert_allclose(out.stats["coverage"], cov, atol=1e-4)
    # the same request without n_max sees the full history: a different entropy
    plain = generate_with_attentions(
        llm, prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
        spec={k: v for k, v in spec.items() if k not in ("n_max", "window")}, use_tqdm=False,
    )[0]
    assert np.abs(plain.stats["entropy"] - out.stats["entropy"]).max() > 1e-3


def test_tokens_identical_to_stock_backend(make_llm):
    """Greedy, 8 prompts: stock CPU_ATTN vs attncap without capture vs attncap with capture."""
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions

    sp = SamplingParams(max_tokens=12, temperature=0)
    stock = make_llm(attncap=False)
    ref = [list(o.outputs[0].token_ids) for o in stock.generate(PROMPTS, sp, use_tqdm=False)]
    ref_text = [o.outputs[0].text for o in stock.generate(PROMPTS, sp, use_tqdm=False)]
    from engine_utils import free_engine

    del stock
    cap = make_llm()
    plain = [list(o.outputs[0].token_ids) for o in cap.generate(PROMPTS, sp, use_tqdm=False)]
    specs = [{} if i % 2 == 0 else {"layers": [-1], "reduce": "head_mean"} for i in range(len(PROMPTS))]
    with_capture = generate_with_attentions(cap, PROMPTS, sp, spec=specs, use_tqdm=False)
    assert plain == ref
    assert [o.token_ids for o in with_capture] == ref
    assert [o.text for o in with_capture] == ref_text


def test_stock_backend_untouched_without_selection(make_llm):
    """Without attention_backend='attncap' the platform's own backend class runs."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import vllm_attncap

    vllm_attncap.register()
    assert AttentionBackendEnum["ATTNCAP"] is AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum["attncap".upper()].get_path().startswith(
        ("vllm_attncap.engine.cpu.backend.", "vllm_attncap.engine.cuda.backend."))
    llm = make_llm(attncap=False)
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    impls = {type(m.impl).__name__ for m in model.modules() if hasattr(m, "impl")}
    assert impls == {"CPUAttentionBackendImpl"}
