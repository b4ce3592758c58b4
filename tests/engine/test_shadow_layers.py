"""``VLLM_ATTNCAP_CPU_SHADOW_LAYERS`` caps the CPU backend's shadow key store to the listed layers: those layers
capture exactly as without the setting, the other layers keep no keys (no memory), and a request for one of
them fails alone, with an error naming the field and the allowed layers."""

from __future__ import annotations

import numpy as np
import pytest

from engine_utils import PROMPTS

pytestmark = pytest.mark.engine


def test_setting_parses_and_names_allowed_values():
    from vllm_attncap.engine.backends.cpu import SHADOW_LAYERS_ENV, shadow_layers

    assert shadow_layers(30, "all") is None and shadow_layers(30, "") is None
    assert shadow_layers(30, "-1") == frozenset({29})
    assert shadow_layers(30, "0, -1,29") == frozenset({0, 29})
    for bad in ("30", "-31", "last", "1;2"):
        with pytest.raises(ValueError, match=SHADOW_LAYERS_ENV) as e:
            shadow_layers(30, bad)
        assert "allowed values" in str(e.value) and "[-30, 29]" in str(e.value)


def _impls(llm):
    """The engine's attention impls (in-process engine: the worker shares the frontend's config object)."""
    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    return [layer.impl for layer in ctx.values()]


def test_capped_store_captures_the_kept_layer_and_refuses_others(make_llm, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the setting is read in this process's worker
    from vllm import SamplingParams

    from vllm_attncap import generate_with_attentions

    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    specs = [{"layers": [-1]}, {"layers": [-1], "mode": "stats"}, {"layers": [0, -1], "reduce": "head_mean"}]
    monkeypatch.delenv("VLLM_ATTNCAP_CPU_SHADOW_LAYERS", raising=False)
    full = generate_with_attentions(make_llm(), PROMPTS[:3], sp, spec=specs, use_tqdm=False)

    monkeypatch.setenv("VLLM_ATTNCAP_CPU_SHADOW_LAYERS", "-1")
    llm = make_llm()
    capped = generate_with_attentions(llm, PROMPTS[:3], sp, spec=specs, use_tqdm=False)
    assert capped[0].token_ids == full[0].token_ids and capped[1].token_ids == full[1].token_ids
    np.testing.assert_array_equal(capped[0].attention, full[0].attention)
    for k in ("coverage", "entropy"):
        np.testing.assert_array_equal(capped[1].stats[k], full[1].stats[k])
    assert capped[2].token_ids == full[2].token_ids  # layer 0 keeps no keys: the capture is refused, the text runs
    with pytest.raises(ValueError, match="'layers'") as e:
        capped[2].attention
    assert "[0]" in str(e.value) and "VLLM_ATTNCAP_CPU_SHADOW_LAYERS=-1" in str(e.value)

    impls = _impls(llm)
    assert len(impls) == 3  # in-process worker, 3 layers: only the last allocated shadow keys
    kept = [o for o in impls if o._keeps_keys]
    assert len(kept) == 1 and kept[0]._key_slots is not None
    assert all(o._key_slots is None for o in impls if o._keeps_keys is False)
    # the engine still serves and captures the kept layer
    again = generate_with_attentions(llm, PROMPTS[:1], sp, spec={"layers": [-1]}, use_tqdm=False)
    np.testing.assert_array_equal(np.asarray(again[0].attention), np.asarray(full[0].attention))
