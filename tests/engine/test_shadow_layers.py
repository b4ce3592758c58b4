"""``VLLM_ATTNCAP_CPU_SHADOW_LAYERS`` caps the CPU backend's shadow key store to the listed layers: those layers
capture exactly as without the setting, the other layers keep no keys (no memory), and a request for one of
them fails alone, with an error naming the field and the allowed layers."""

from __future__ import annotations

import numpy as np
import pytest

from engine_utils import PROMPTS

pytestmark = pytest.mark.engine


def test_setting_parses_and_names_allowed_values():
    from vllm_attncap.engine.cpu.backend import SHADOW_LAYERS_ENV, shadow_layers

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


def _engine(tiny_llama):
    from vllm import LLM

    return LLM(model=str(tiny_llama), attention_backend="attncap", enforce_eager=True, dtype="float32",
               max_model_len=512, seed=0)


def test_capped_store_captures_the_kept_layer_and_refuses_others(tiny_llama, monkeypatch):
    from vllm import SamplingParams

    from engine_utils import free_engine
    from vllm_attncap import generate_with_attentions

    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    specs = [{"layers": [-1]}, {"layers": [-1], "mode": "stats"}, {"layers": [0, -1], "reduce": "head_mean"}]
    # one engine at a time, each freed before the next starts: an engine still referenced when the next one
    # starts is collected later and tears vLLM's distributed groups down under the live engine
    monkeypatch.delenv("VLLM_ATTNCAP_CPU_SHADOW_LAYERS", raising=False)
    box = [_engine(tiny_llama)]  # the only reference, so that free_engine really frees it
    try:
        full = generate_with_attentions(box[0], PROMPTS[:3], sp, spec=specs, use_tqdm=False)
        tokens = [full[i].token_ids for i in range(3)]
        rows, stats = np.array(full[0].attention), {k: np.array(v) for k, v in full[1].stats.items()}
        del full
    finally:
        free_engine(box.pop())

    monkeypatch.setenv("VLLM_ATTNCAP_CPU_SHADOW_LAYERS", "-1")  # read by the builder in this process's worker
    box = [_engine(tiny_llama)]
    try:
        llm = box[0]
        capped = generate_with_attentions(llm, PROMPTS[:3], sp, spec=specs, use_tqdm=False)
        assert [capped[i].token_ids for i in range(3)] == tokens  # the refused capture's text still runs
        np.testing.assert_array_equal(capped[0].attention, rows)
        for k in ("coverage", "entropy"):
            np.testing.assert_array_equal(capped[1].stats[k], stats[k])
        message = ""
        try:
            capped[2].attention  # layer 0 keeps no keys: this capture is refused, alone
        except ValueError as exc:
            message = str(exc)
        assert "'layers'" in message and "[0]" in message and "VLLM_ATTNCAP_CPU_SHADOW_LAYERS=-1" in message, message

        impls = _impls(llm)
        assert len(impls) == 3  # in-process worker, 3 layers: only the last allocated shadow keys
        kept = [o for o in impls if o._keeps_keys]
        assert len(kept) == 1 and kept[0]._key_slots is not None
        assert all(o._key_slots is None for o in impls if o._keeps_keys is False)
        del impls, kept
        # the engine still serves and captures the kept layer
        again = generate_with_attentions(llm, PROMPTS[:1], sp, spec={"layers": [-1]}, use_tqdm=False)
        np.testing.assert_array_equal(again[0].attention, rows)
        del capped, again, llm
    finally:
        free_engine(box.pop())
