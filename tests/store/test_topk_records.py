"""Top-k records without an engine: the store's layout and trimming, rank parts combined (TP/PP), the reward SDK's
value (CapturedAttention) and its file round trip, and spec validation."""

from __future__ import annotations

import numpy as np
import pytest

from cagsr_reward.attention import CapturedAttention
from vllm_attncap.store.parts import combine_parts, make_part_meta
from vllm_attncap.spec import CaptureSpec, resolve_spec
from vllm_attncap.store import CaptureMeta, CaptureRecord


def _final(reduce="none", heads=(0, 1, 2, 3), layers=(0, 1), k=3, prompt_len=6, prompt_start=4, t=5):
    return CaptureMeta("key", "req", mode="topk", reduce=reduce, layers=list(layers), heads=list(heads),
                       prompt_len=prompt_len, max_tokens=t, history_len=prompt_len, topk=k, prompt_start=prompt_start)


def test_layout_and_trim():
    meta = _final()
    assert meta.prompt_rows == 2 and meta.shape == (2, 2, 4, 2 + 5, 3)
    arr = np.arange(np.prod(meta.shape), dtype=np.float32).reshape(meta.shape)
    cut = meta.trim(arr, 3)
    assert cut.shape == (2, 2, 4, 5, 3) and np.array_equal(cut, arr[:, :, :, :5])
    rec = CaptureRecord(meta, cut)
    assert rec.num_tokens == 3
    assert rec.topk_positions.dtype == np.int32 and np.array_equal(rec.topk_positions, cut[1].astype(np.int32))
    assert rec.topk_probs.dtype == np.float32 and np.array_equal(rec.topk_probs, cut[0])


@pytest.mark.parametrize("split", ["tp", "pp"])
def test_parts_combine_into_the_single_rank_array(split):
    final = _final()
    rng = np.random.default_rng(0)
    whole = np.zeros(final.shape, np.float32)
    whole[0] = rng.random(whole[0].shape)
    whole[1] = rng.integers(-1, 9, whole[1].shape)
    parts = []
    for i in range(2):
        if split == "tp":
            layers, layer_pos, heads, head_pos = [0, 1], [0, 1], [2 * i, 2 * i + 1], [2 * i, 2 * i + 1]
        else:
            layers, layer_pos, heads, head_pos = [i], [i], [0, 1, 2, 3], [0, 1, 2, 3]
        meta = make_part_meta(final, i, 2, layers=layers, layer_pos=layer_pos, heads=heads, head_pos=head_pos)
        meta.status = "finished"
        assert meta.shape == (2, len(layers), len(heads), 7, 3)
        parts.append(CaptureRecord(meta, whole[(slice(None),) + np.ix_(layer_pos, head_pos)]))
    got = combine_parts(parts, 2)
    assert got.meta.mode == "topk" and got.error is None
    np.testing.assert_array_equal(got.array, whole)


def test_captured_attention_topk_round_trip(tmp_path):
    pos = np.array([[[[2, 0, -1], [3, 1, 0]]]], np.int32)
    val = np.array([[[[0.7, 0.3, 0.0], [0.5, 0.3, 0.2]]]], np.float32)
    cap = CapturedAttention(3, topk_positions=pos, topk_probs=val, reduce="head_mean", prompt_start=2,
                            token_ids=[7])
    assert cap.mode == "topk" and cap.num_tokens == 1 and cap.prompt_start == 2
    with pytest.raises(ValueError, match="top-k"):
        cap.aggregate()
    cap.save(str(tmp_path / "c.npz"))
    back, _ = CapturedAttention.load(str(tmp_path / "c.npz"))
    assert back.mode == "topk" and back.prompt_start == 2
    np.testing.assert_array_equal(back.topk_positions, pos)
    np.testing.assert_array_equal(back.topk_probs, val)
    with pytest.raises(ValueError, match="prompt_start"):
        CapturedAttention(3, topk_positions=pos, topk_probs=val, prompt_start=4)
    with pytest.raises(ValueError, match="one of"):
        CapturedAttention(3, attention=np.zeros((1, 1, 1, 3), np.float32), topk_positions=pos, topk_probs=val)


@pytest.mark.parametrize("bad, field", [
    ({"topk": 0}, "topk"), ({"topk": 1025}, "topk"), ({"topk": True}, "topk"), ({"topk": 2.0}, "topk"),
    ({"topk": 4, "reduce": "layer_head_mean"}, "reduce"), ({"topk": 4, "mode": "stats"}, "mode"),
    ({"prompt_start": 3}, "prompt_start"), ({"topk": 4, "prompt_start": 0}, "prompt_start"),
    ({"topk": 4, "prompt_start": "1"}, "prompt_start"),
])
def test_bad_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        CaptureSpec.from_any(bad)


def test_resolve_sizes_and_prompt_start():
    r = resolve_spec({"topk": 8, "layers": [-1], "prompt_start": 4}, num_layers=3, num_heads=4, prompt_len=10,
                     max_tokens=5)
    assert r.capture_mode == "topk" and r.row_origin == 3 and r.shape == (2, 1, 4, 6 + 5, 8)
    assert resolve_spec({"topk": 1}, num_layers=3, num_heads=4, prompt_len=10, max_tokens=5).row_origin == 9
    with pytest.raises(ValueError, match="'prompt_start'.*1..10"):
        resolve_spec({"topk": 2, "prompt_start": 11}, num_layers=3, num_heads=4, prompt_len=10, max_tokens=5)
    with pytest.raises(ValueError, match="'max_bytes'"):
        resolve_spec({"topk": 1024, "max_bytes": 1000}, num_layers=3, num_heads=4, prompt_len=10, max_tokens=5)


def test_tracker_refuses_a_head_mean_topk_whose_heads_span_tp_ranks(tmp_path, monkeypatch):
    from vllm_attncap import store
    from vllm_attncap.engine.parallel import RankFacts
    from vllm_attncap.engine.tracker import CaptureTracker, ModelShape

    monkeypatch.setenv(store.ENV_BASE, str(tmp_path / "base"))
    store.set_current_store(None)
    try:
        tr = CaptureTracker()
        ranks = RankFacts(tp_rank=0, tp_size=2, num_layers=2, num_heads=4, layer_start=0, layer_end=2)
        tr.set_model_shape(ModelShape(2, 4, 2, 32, 64, ranks=ranks))
        assert tr.lookup("a", {"topk": 2, "reduce": "head_mean", "key": "a"}, 5, 3) is None
        err = store.read_capture("a", 3)[0]
        assert err.error and "'reduce'" in err.error
        # heads of one rank's slice, and per-head top-k, are fine
        assert tr.lookup("b", {"topk": 2, "reduce": "head_mean", "heads": [0, 1], "key": "b"}, 5, 3) is not None
        assert tr.lookup("c", {"topk": 2, "key": "c"}, 5, 3) is not None
        tr.close_all()
    finally:
        store.set_current_store(None)


def test_server_sends_prompt_rows_past_the_prefix_cache():
    """serving.inline.prepare_sampling_params: a top-k request with prompt rows skips reading the prefix cache (its
    prompt rows need their queries); other requests keep it."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from vllm_attncap.serving.inline import prepare_sampling_params

    cases = [({"topk": 4, "prompt_start": 3}, 10, True), ({"topk": 4, "prompt_start": 10}, 10, False),
             ({"topk": 4}, 10, False), ({"layers": [-1]}, 10, False)]
    for spec, plen, skip in cases:
        sp = SamplingParams(max_tokens=2, extra_args={"attncap": spec})
        assert sp.skip_reading_prefix_cache is False
        prepare_sampling_params(sp, plen)
        assert sp.skip_reading_prefix_cache is skip, spec


def test_inline_arrays_round_trip_through_npy():
    from vllm_attncap.serving.inline import decode_array, encode_array, inline_field, trimmed_nbytes

    meta = _final(reduce="head_mean", heads=(0, 1), layers=(2,), k=2, prompt_len=4, prompt_start=2, t=3)
    meta.status = "finished"
    arr = np.zeros(meta.shape, np.float32)
    arr[0] = 0.5
    arr[1] = 1
    rec = CaptureRecord(meta, meta.trim(arr, 2))
    field = inline_field(rec)
    assert field["mode"] == "topk" and field["prompt_start"] == 2 and field["num_tokens"] == 2
    pos = decode_array(field["arrays"]["topk_positions"])
    assert pos.dtype == np.int32 and pos.shape == (1, 1, 4, 2) and (pos == 1).all()
    assert field["arrays"]["topk_probs"]["shape"] == [1, 1, 4, 2]
    assert trimmed_nbytes(meta, 2) == 4 * 2 * 1 * 1 * 4 * 2
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(decode_array(encode_array(x)), x)


def test_inline_default_is_one_mib_and_zero_leaves_the_capture_for_get(monkeypatch):
    """Inline delivery is on by default (1 MiB); VLLM_ATTNCAP_INLINE_MAX_BYTES=0: a handle at once, nothing read."""
    from vllm_attncap.serving import inline

    monkeypatch.delenv("VLLM_ATTNCAP_INLINE_MAX_BYTES", raising=False)
    assert inline.inline_max_bytes() == 1 << 20
    monkeypatch.setenv("VLLM_ATTNCAP_INLINE_MAX_BYTES", "0")
    assert inline.inline_max_bytes() == 0
    called = []
    monkeypatch.setattr(inline, "list_captures", lambda key: called.append(key) or [])
    field = inline._deliver("some-key", [3], inline.inline_max_bytes())
    assert field == [{"key": "some-key", "inline": False, "nbytes": None,
                      "reason": "inline delivery is off (VLLM_ATTNCAP_INLINE_MAX_BYTES=0): fetch it by key"}]
    assert called == []
