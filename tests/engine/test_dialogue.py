"""Multi-turn capture: each turn is captured over the whole history, with role/turn spans."""

from __future__ import annotations

import numpy as np
import pytest

from engine_utils import hf_rows

pytestmark = pytest.mark.engine


def test_spans_partition_the_rendered_history(tiny_llama):
    from transformers import AutoTokenizer

    from vllm_attncap.dialogue import render_with_spans

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    msgs = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "my printer is broken"},
        {"role": "assistant", "content": "restart it"},
        {"role": "user", "content": "still broken"},
    ]
    ids, spans = render_with_spans(tok, msgs)
    assert spans[0].start == 0 and spans[-1].end == len(ids)
    assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
    assert [(s.role, s.turn) for s in spans] == [
        ("system", 0), ("user", 0), ("assistant", 0), ("user", 1), ("generation_prompt", 1)
    ]
    for s, m in zip(spans, msgs):  # each span decodes to its message inside the template
        text = tok.decode(ids[s.start : s.end])
        assert m["content"] in text and f"<|{m['role']}|>" in text


def test_dialogue_captures_each_turn_over_the_whole_history(llm, hf_tiny):
    from vllm import SamplingParams

    from vllm_attncap.dialogue import Dialogue

    d = Dialogue(llm, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), spec={"layers": [-1]}, system="be nice")
    t0 = d.say("my printer is broken")
    t1 = d.say("I restarted it and it is still broken")
    assert [m["role"] for m in d.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert t1.prompt_token_ids[: len(t0.prompt_token_ids)] == t0.prompt_token_ids  # history grows
    assert t1.user_span.turn == 1 and t0.user_span.turn == 0
    assert t1.captured.prompt_len == len(t1.prompt_token_ids) == t1.spans[-1].end
    for t in (t0, t1):
        full = hf_rows(hf_tiny, t.prompt_token_ids, t.captured.token_ids)[-1:]
        np.testing.assert_allclose(t.captured.attention, full, atol=1e-4, rtol=0)
