"""Shadow keys are written only where a capture can read them.

With prefix caching off, a step writes the shadow keys of the layers its capturing requests select and nothing
else: a step in which nobody captures copies no keys at all. Captures must still equal Hugging Face eager
attention, including a prompt whose first prefill chunks carry no captured row (their keys are read later) and
a mixed batch of requests selecting different layers. With prefix caching on, every layer is written every step
(a later request may hit the blocks)."""

from __future__ import annotations

import numpy as np
import pytest

from engine_utils import PROMPTS, hf_rows, reduce_ref, stats_ref

pytestmark = pytest.mark.engine
TOL = 1e-4


def _long_prompt(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over lazy dog printer router cables update Alice Bob Paris apples".split()
    return " ".join(rng.choice(words, size=n_words))


def _impls(llm):
    """The engine's attention impls by layer (in-process engine: the worker shares the frontend's config)."""
    from vllm_attncap.engine.backend import layer_index_of

    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    return {layer_index_of(layer): layer.impl for layer in ctx.values()}


def _written(impls) -> dict[int, bool]:
    """Layer -> whether its shadow key store holds any key (it is allocated at the first write)."""
    return {i: impl._key_slots is not None and bool(impl._key_slots.abs().sum() > 0) for i, impl in impls.items()}


def test_without_prefix_caching_only_captured_layers_write_keys(make_llm, hf_tiny):
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions
    from vllm_attncap.store import read_capture

    llm = make_llm(enable_prefix_caching=False, enable_chunked_prefill=True, max_num_batched_tokens=32,
                   max_num_seqs=4)
    impls = _impls(llm)
    last = max(impls)
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    llm.generate(PROMPTS[:3], sp, use_tqdm=False)  # nobody captures: no key is copied
    assert not any(_written(impls).values())

    # one last-layer capture over a chunked prompt: only the last layer's keys are written
    prompt = _long_prompt(60, 1)
    out = generate_with_attentions(llm, [prompt], sp, spec={"layers": [-1], "reduce": "head_mean"}, use_tqdm=False)[0]
    assert out.error is None and out.prompt_len > 32  # the prompt needed several prefill steps
    assert _written(impls) == {i: i == last for i in impls}
    full = hf_rows(hf_tiny, out.prompt_token_ids, out.token_ids)
    np.testing.assert_allclose(out.attention, reduce_ref(full, out.layers, out.heads, "head_mean"), atol=TOL, rtol=0)

    # a mixed batch: different layers per request, one request without capture, prompts over several chunks;
    # the blocks they get were last written by requests that did not keep layer-0 keys
    prompts = [_long_prompt(50, 2), _long_prompt(45, 3), PROMPTS[3], _long_prompt(40, 4)]
    specs = [{"layers": [0]}, {"layers": "all", "reduce": "layer_head_mean"}, None,
             {"layers": [0, -1], "mode": "stats", "sink": 1, "salient": [0, 2, 5, 7]}]
    keys = [f"step-keys-{i}" if spec else None for i, spec in enumerate(specs)]
    sps = [SamplingParams(max_tokens=t, temperature=0, ignore_eos=True,
                          extra_args={"attncap": {**spec, "key": k}} if spec else None)
           for t, spec, k in zip((6, 5, 4, 3), specs, keys)]
    outs = llm.generate(prompts, sps, use_tqdm=False)
    assert all(_written(impls).values())
    for out, spec, key in zip(outs, specs, keys):
        if spec is None:
            continue
        gen = list(out.outputs[0].token_ids)
        rec = read_capture(key, len(gen))[0]
        assert rec.error is None
        full = hf_rows(hf_tiny, out.prompt_token_ids, gen)
        layers, heads = list(rec.meta.layers), list(rec.meta.heads)
        if spec.get("mode") == "stats":
            cov, ent = stats_ref(full[layers][:, heads], len(out.prompt_token_ids), 1, spec["salient"])
            np.testing.assert_allclose(rec.coverage, cov, atol=TOL)
            np.testing.assert_allclose(rec.entropy, ent, atol=TOL)
        else:
            np.testing.assert_allclose(rec.array, reduce_ref(full, layers, heads, spec.get("reduce", "none")),
                                       atol=TOL, rtol=0)


def test_with_prefix_caching_every_layer_writes_keys(make_llm):
    from vllm import SamplingParams

    llm = make_llm(enable_prefix_caching=True)
    impls = _impls(llm)
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False)
    # nobody captured, yet a later request may hit these blocks: every layer kept its keys
    assert all(_written(impls).values())
