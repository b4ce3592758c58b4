"""Bad specs fail their own request with a clear error; the engine keeps serving."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_utils import PROMPTS

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm(tiny_llama):
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    from engine_utils import free_engine

    engine = LLM(model=str(tiny_llama), attention_backend="attncap", enforce_eager=True, dtype="float32",
                 max_model_len=256, seed=0)
    yield engine
    free_engine(engine)


BAD = [
    ({"layer": [0]}, "unknown field"),
    ({"layers": [3]}, "'layers'"),
    ({"layers": [-4]}, "'layers'"),
    ({"heads": [4]}, "'heads'"),
    ({"reduce": "max"}, "'reduce'"),
    ({"mode": "full"}, "'mode'"),
    ({"max_bytes": -1}, "'max_bytes'"),
    ({"max_bytes": 100}, "'max_bytes'"),
    ({"sink": -2}, "'sink'"),
    ({"history_len": 10_000}, "'history_len'"),
    ({"salient": [1, 999]}, "'salient'"),
    ({"key": ".."}, "'key'"),  # keys are hashed into file names: any printable text but dots only
    ({"mode": "stats", "n_max": 0}, "'n_max'"),
    ({"n_max": 8}, "'n_max'"),  # elision is a stats-mode rule
    ({"mode": "stats", "n_max": 8, "window": -1}, "'window'"),
]


@pytest.mark.parametrize("spec,field", BAD)
def test_invalid_spec_fails_only_its_request(llm, spec, field):
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions

    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    outs = generate_with_attentions(llm, PROMPTS[:3], sp, spec=[{}, spec, {"reduce": "head_mean"}], use_tqdm=False)
    assert outs[1].output is None
    with pytest.raises(ValueError, match=field):
        outs[1].attention
    for o in (outs[0], outs[2]):
        assert o.error is None and len(o.token_ids) == 4 and o.attention.shape[2] == 4


def test_bad_spec_sent_directly_never_breaks_the_engine(llm):
    """A caller that bypasses the helper: the request still generates, capture is refused with the reason."""
    from vllm import SamplingParams

    from vllm_attncap import collect

    good = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, extra_args={"attncap": {"key": "good-1"}})
    bad = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                         extra_args={"attncap": {"key": "bad-1", "layers": [99]}})
    outs = llm.generate(PROMPTS[:2], [bad, good], use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 3 for o in outs)
    with pytest.raises(ValueError, match="'layers'"):
        collect(outs[0], "bad-1").attention
    assert collect(outs[1], "good-1").attention.shape[2] == 3


spec_values = st.fixed_dictionaries(
    {},
    optional={
        "layers": st.one_of(st.just("all"), st.lists(st.integers(-5, 5), max_size=4), st.integers(-5, 5), st.text(max_size=3)),
        "heads": st.one_of(st.just("all"), st.lists(st.integers(-6, 6), max_size=5), st.none()),
        "reduce": st.sampled_from(["none", "head_mean", "layer_head_mean", "mean", ""]),
        "mode": st.sampled_from(["rows", "stats", "x"]),
        "history_len": st.one_of(st.integers(-2, 40), st.floats(allow_nan=True), st.none()),
        "sink": st.one_of(st.integers(-1, 5), st.text(max_size=2)),
        "salient": st.one_of(st.lists(st.integers(-1, 30), max_size=5), st.integers(0, 3)),
        "max_bytes": st.one_of(st.integers(-10, 10**7), st.none()),
        "bogus": st.integers(),
    },
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=spec_values, max_tokens=st.integers(1, 6))
def test_fuzzed_specs_never_crash_the_engine(llm, spec, max_tokens):
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = generate_with_attentions(llm, [PROMPTS[0], PROMPTS[2]], sp, spec=[spec, {"layers": [-1]}], use_tqdm=False)
    fuzz, ctrl = outs
    assert ctrl.error is None and ctrl.attention.shape == (1, 4, max_tokens, ctrl.prompt_len + max_tokens - 1)
    if fuzz.error is None:
        arr = fuzz.stats["coverage"] if fuzz.spec.mode == "stats" else fuzz.attention
        assert arr.shape[-1 if fuzz.spec.mode == "stats" else 2] == max_tokens
        if fuzz.spec.mode == "rows":
            assert np.isfinite(arr).all()
    else:
        assert isinstance(fuzz.error, ValueError) and "attncap" in str(fuzz.error)
