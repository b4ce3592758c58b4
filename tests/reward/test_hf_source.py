"""HFAttentionSource: recomputed attention equals a hand-written softmax(QK^T) and HF's output_attentions rows;
its log-probabilities and HFLikelihood's equal a plain log_softmax of one full forward."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from cagsr_reward.sources import AttentionSource, HFAttentionSource, HFLikelihood, Likelihood  # noqa: E402
from float_tolerance import float_atol  # noqa: E402

# The tiny model's longest reduction is the MLP's (intermediate 256); probabilities pass through 2 layers and
# a softmax. Two evaluations that differ only in blocking (chunking, BLAS, threads) agree to this.
ATOL = float_atol(np.float32, 256, stages=3)

VOCAB = 100


def tiny_llama(seed: int = 0, attn_implementation: str = "eager") -> LlamaForCausalLM:
    """2 layers, hidden 128, 4 query heads / 2 KV heads (GQA), head_dim 32, fp32, vocab 100."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        attn_implementation=attn_implementation,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharpen the (near-uniform at init) attention so rows differ a lot
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def manual_attention(model: LlamaForCausalLM, ids: list[int]) -> np.ndarray:
    """(L, H, N, N) softmax(Q K^T / sqrt(d) + causal mask), Q/K from the model's own projections with RoPE."""
    cfg = model.config
    n = len(ids)
    input_ids = torch.tensor([ids])
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    with torch.no_grad():
        hidden = model(input_ids, output_hidden_states=True).hidden_states
        position_ids = torch.arange(n)[None]
        out = []
        for layer_idx, layer in enumerate(model.model.layers):
            h = layer.input_layernorm(hidden[layer_idx])
            attn = layer.self_attn
            q = attn.q_proj(h).view(1, n, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, n, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
            cos, sin = model.model.rotary_emb(h, position_ids)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(groups, dim=1)  # GQA: query head h reads KV head h // groups
            scores = (q @ k.transpose(-1, -2)) * cfg.head_dim**-0.5
            mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
            scores = scores.masked_fill(mask, float("-inf"))
            out.append(torch.softmax(scores, dim=-1)[0].numpy())
    return np.stack(out)


def capture_from_full(full: np.ndarray, prompt_len: int, n_completion: int) -> np.ndarray:
    """Cut the capture layout (L, H, T, P+T-1) out of full (L, H, N', N') maps."""
    P, T = prompt_len, n_completion
    cap = np.zeros(full.shape[:2] + (T, P + T - 1), dtype=np.float32)
    for s in range(T):
        cap[:, :, s, : P + s] = full[:, :, P - 1 + s, : P + s]
    return cap


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


def _ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).tolist()


PROMPT = _ids(1, 7)
COMPLETION = _ids(2, 6)


def test_equals_manual_softmax_with_rope_and_gqa(model):
    src = HFAttentionSource(model, layers="all", chunk_size=4)
    cap = src.attention(PROMPT, COMPLETION)
    P, T = len(PROMPT), len(COMPLETION)
    assert cap.shape == (2, 4, T, P + T - 1) and cap.dtype == np.float32
    expected = capture_from_full(manual_attention(model, PROMPT + COMPLETION), P, T)
    assert np.max(np.abs(cap - expected)) <= 1e-5
    # Rows are distributions over their causal prefix and exactly zero to the right of it.
    np.testing.assert_allclose(cap.sum(-1), 1.0, atol=1e-5)
    for s in range(T):
        assert not cap[..., s, P + s :].any()
    # The attention is far from uniform, so the comparison above is not trivially satisfied.
    assert cap.max() > 0.5


def test_equals_output_attentions_rows(model):
    P, T = len(PROMPT), len(COMPLETION)
    with torch.no_grad():
        attentions = model(torch.tensor([PROMPT + COMPLETION]), output_attentions=True).attentions
    cap = HFAttentionSource(model, layers=(0, 1), chunk_size=None).attention(PROMPT, COMPLETION)
    for layer in range(2):
        for h in range(4):
            for s in range(T):
                ref = attentions[layer][0, h, P - 1 + s, : P + s].numpy()
                assert np.max(np.abs(cap[layer, h, s, : P + s] - ref)) <= 1e-5


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 64])
def test_chunking_does_not_change_the_result(model, chunk_size):
    whole = HFAttentionSource(model, layers="all", chunk_size=None).attention(PROMPT, COMPLETION)
    chunked = HFAttentionSource(model, layers="all", chunk_size=chunk_size).attention(PROMPT, COMPLETION)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=ATOL)


def test_chunks_bound_the_attention_maps(model):
    """No attention map wider than chunk_size query rows is ever computed (the memory bound)."""
    seen = []
    handles = [
        layer.self_attn.register_forward_hook(lambda m, a, out: seen.append(tuple(out[1].shape)))
        for layer in model.model.layers
    ]
    try:
        HFAttentionSource(model, layers=(-1,), chunk_size=3).attention(PROMPT, COMPLETION)
    finally:
        for h in handles:
            h.remove()
    assert seen and max(shape[2] for shape in seen) <= 3
    assert max(shape[3] for shape in seen) == len(PROMPT) + len(COMPLETION) - 1


def test_reduce_modes_are_means_of_the_full_array(model):
    full = HFAttentionSource(model, layers="all", chunk_size=4).attention(PROMPT, COMPLETION)
    head = HFAttentionSource(model, layers="all", reduce="head_mean", chunk_size=4).attention(PROMPT, COMPLETION)
    both = HFAttentionSource(model, layers="all", reduce="layer_head_mean", chunk_size=4).attention(PROMPT, COMPLETION)
    assert head.shape == (2, 1) + full.shape[2:] and both.shape == (1, 1) + full.shape[2:]
    np.testing.assert_allclose(head, full.mean(axis=1, keepdims=True), atol=ATOL)
    np.testing.assert_allclose(both, full.mean(axis=(0, 1), keepdims=True), atol=ATOL)


def test_layer_and_head_selection(model):
    full = HFAttentionSource(model, layers="all").attention(PROMPT, COMPLETION)
    sel = HFAttentionSource(model, layers=(-1, 0), heads=(3, 1)).attention(PROMPT, COMPLETION)
    np.testing.assert_array_equal(sel, full[[1, 0]][:, [3, 1]])
    src = HFAttentionSource(model, layers=(-1,))
    assert src.layer_ids == (1,) and src.num_layers == 2 and src.head_ids == (0, 1, 2, 3)
    assert HFAttentionSource(model, reduce="layer_head_mean").layer_ids is None


def test_single_token_prompt_and_completion(model):
    cap = HFAttentionSource(model, layers=(0,)).attention([5], [7])
    assert cap.shape == (1, 4, 1, 1)
    np.testing.assert_allclose(cap, 1.0, atol=1e-6)


def test_live_sdpa_model_is_switched_to_eager_and_restored():
    model = tiny_llama(attn_implementation="sdpa").train()
    reference = HFAttentionSource(tiny_llama(), layers="all").attention(PROMPT, COMPLETION)
    cap = HFAttentionSource(model, layers="all").attention(PROMPT, COMPLETION)
    np.testing.assert_allclose(cap, reference, atol=ATOL)  # sdpa model switched to eager
    assert model.config._attn_implementation == "sdpa"
    assert model.training


def test_errors_name_the_argument(model):
    with pytest.raises(ValueError, match="reduce"):
        HFAttentionSource(model, reduce="max")
    with pytest.raises(ValueError, match="chunk_size"):
        HFAttentionSource(model, chunk_size=0)
    with pytest.raises(ValueError, match="layers"):
        HFAttentionSource(model, layers=(2,)).attention(PROMPT, COMPLETION)
    with pytest.raises(ValueError, match="heads"):
        HFAttentionSource(model, heads=(4,)).attention(PROMPT, COMPLETION)
    with pytest.raises(ValueError, match="completion_ids"):
        HFAttentionSource(model).attention(PROMPT, [])
    with pytest.raises(ValueError, match="prompt_ids"):
        HFAttentionSource(model).attention([], COMPLETION)
    with pytest.raises(TypeError, match="model_or_path"):
        HFAttentionSource(3.5)


def test_pickle_reloads_from_path(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    src = HFAttentionSource(str(tmp_path / "m"), layers="all", chunk_size=2)
    expected = src.attention(PROMPT, COMPLETION)
    assert src._model is not None
    blob = pickle.dumps(src)
    assert len(blob) < 10_000  # the loaded weights are dropped, not pickled
    clone = pickle.loads(blob)
    assert clone._model is None
    np.testing.assert_allclose(clone.attention(PROMPT, COMPLETION), expected, atol=ATOL)
    assert isinstance(clone, AttentionSource)


def test_live_model_without_path_refuses_to_pickle():
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(HFAttentionSource(tiny_llama()))


# -- log-probabilities (the grounding term's input) ------------------------------------------------------------------


def reference_logprobs(model: LlamaForCausalLM, prompt: list[int], completion: list[int]) -> np.ndarray:
    """log p(completion[s] | prompt, completion[:s]) from the log_softmax of one full forward, gathered."""
    P = len(prompt)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + completion])).logits[0].double(), dim=-1)
    return np.array([float(logp[P - 1 + s, t]) for s, t in enumerate(completion)])


@pytest.mark.parametrize("chunk_size", [1, 3, None])
@pytest.mark.parametrize("seed", [31, 32])
def test_logprobs_equal_one_full_forward(model, chunk_size, seed):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, VOCAB, size=int(rng.integers(1, 12))).tolist()
    completion = rng.integers(0, VOCAB, size=int(rng.integers(1, 10))).tolist()
    expected = reference_logprobs(model, prompt, completion)
    for provider in (HFAttentionSource(model, chunk_size=chunk_size), HFLikelihood(model, chunk_size=chunk_size)):
        got = provider.logprobs(prompt, completion)
        assert got.shape == (len(completion),) and got.dtype == np.float64
        assert np.max(np.abs(got - expected)) <= 1e-5
        assert (got <= 0).all()
    assert isinstance(HFLikelihood(model), Likelihood) and isinstance(HFAttentionSource(model), Likelihood)


def test_logprobs_of_a_training_sdpa_model_leave_it_as_it_was():
    """Dropout off during the call (eval mode), the model put back in training mode; sdpa needs no switch."""
    train = tiny_llama(attn_implementation="sdpa")
    for layer in train.model.layers:  # dropout that would change every value if the call ran in training mode
        layer.self_attn.attention_dropout = 0.5
    train.train()
    rng = np.random.default_rng(33)
    prompt, completion = rng.integers(0, VOCAB, size=6).tolist(), rng.integers(0, VOCAB, size=5).tolist()
    got = HFLikelihood(train).logprobs(prompt, completion)
    assert train.training and train.config._attn_implementation == "sdpa"
    np.testing.assert_allclose(got, reference_logprobs(tiny_llama().eval(), prompt, completion), rtol=0, atol=1e-5)


def test_likelihood_errors_and_pickling(tmp_path, model):
    with pytest.raises(ValueError, match="completion_ids"):
        HFLikelihood(model).logprobs([1, 2], [])
    with pytest.raises(ValueError, match="prompt_ids"):
        HFLikelihood(model).logprobs([], [3])
    with pytest.raises(TypeError, match="model_or_path"):
        HFLikelihood(3.5)
    with pytest.raises(ValueError, match="chunk_size"):
        HFLikelihood(model, chunk_size=0)
    with pytest.raises(TypeError, match="HFLikelihood .*pickle"):
        pickle.dumps(HFLikelihood(tiny_llama()))
    model.save_pretrained(tmp_path / "m")
    rng = np.random.default_rng(34)
    prompt, completion = rng.integers(0, VOCAB, size=4).tolist(), rng.integers(0, VOCAB, size=3).tolist()
    lik = HFLikelihood(str(tmp_path / "m"), chunk_size=2)
    expected = lik.logprobs(prompt, completion)
    np.testing.assert_allclose(expected, reference_logprobs(model, prompt, completion), rtol=0, atol=1e-5)
    blob = pickle.dumps(lik)
    assert len(blob) < 10_000
    np.testing.assert_allclose(pickle.loads(blob).logprobs(prompt, completion), expected, rtol=0, atol=1e-9)


def test_likelihood_cache_answers_repeated_calls(model):
    rng = np.random.default_rng(35)
    pairs = [(rng.integers(0, VOCAB, size=5).tolist(), rng.integers(0, VOCAB, size=4).tolist()) for _ in range(3)]
    calls = []
    handle = model.register_forward_hook(lambda m, a, out: calls.append(1))
    try:
        lik = HFLikelihood(model, cache_size=2)
        first = [lik.logprobs(p, c) for p, c in pairs[:2]]
        n = len(calls)
        again = [lik.logprobs(p, c) for p, c in pairs[:2]]  # both cached: no forward
        assert len(calls) == n and all(a is b for a, b in zip(first, again))
        lik.logprobs(*pairs[2])  # evicts the least recently used (pairs[0])
        n = len(calls)
        lik.logprobs(*pairs[1])
        assert len(calls) == n
        np.testing.assert_allclose(lik.logprobs(*pairs[0]), reference_logprobs(model, *pairs[0]), rtol=0, atol=1e-5)
        assert len(calls) > n
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="cache_size"):
        HFLikelihood(model, cache_size=-1)


def test_import_does_not_load_torch():
    code = "import sys, cagsr_reward.sources.hf, cagsr_reward.sources; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
