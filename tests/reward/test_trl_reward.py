"""The TRL reward function: equals score_turn by hand (the grounding term's log-probabilities from a plain full
forward); takes the log-probabilities from its columns, its likelihood or its source; logs its parts; trains 2 GRPO
(and RLOO) steps on CPU."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys

import numpy as np
import pytest

from cagsr_reward.spans import chat_message_spans

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cagsr_reward import CAGSRConfig, aggregate, history_block, score_cot, score_turn  # noqa: E402
from cagsr_reward.integrations.trl import (  # noqa: E402
    LOGPROBS_KWARG,
    PRIOR_LOGPROBS_KWARG,
    CAGSRRewardFunction,
    cagsr_reward_func,
)
from cagsr_reward.encoding import salient_positions, salient_positions_for_messages  # noqa: E402
from cagsr_reward.salient import IDFModel, SalientSelector  # noqa: E402
from cagsr_reward.sources import HFAttentionSource, HFLikelihood  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
TEXTS = [
    "Alice met Bob in Paris on 3 May 2021.",
    "The capital of France is Paris, the user said.",
    "What is 1,234.5 plus 7? The answer is 1,241.5.",
    "the cat sat on the mat and the dog ran to Rome",
    "Tell me about Carol and the red car in Berlin.",
]


def build_tokenizer():
    """Byte-level BPE trained locally (no downloads), BOS prepended, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention than the near-uniform initialisation
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(len(tokenizer))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, tokenizer):
    path = tmp_path_factory.mktemp("policy")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def selector():
    return SalientSelector(IDFModel.fit(TEXTS), keywords=["car"])


def _completions(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, size=length - (i % 3)).tolist() for i in range(n)]


def reference_logprobs(model, prompt_ids, completion):
    """log p(completion[s] | prompt_ids, completion[:s]): log_softmax of one full forward, gathered."""
    P = len(prompt_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([list(prompt_ids) + list(completion)])).logits[0].double(), -1)
    return np.array([float(logp[P - 1 + s, t]) for s, t in enumerate(completion)])


def prior_by_hand(tokenizer, prompt):
    """The empty conversation: BOS for a string prompt; the generation-prompt tokens of a chat prompt."""
    if isinstance(prompt, str):
        return [tokenizer.bos_token_id]
    full = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"])
    head = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=False)["input_ids"])
    assert full[: len(head)] == head and len(full) > len(head)
    return full[len(head):]


def by_hand(source, tokenizer, selector, cfg, prompt, completion, *, turn_index=0, scorer=None):
    """The reward computed step by step from the public pieces, independently of the integration; the grounding's
    log-probabilities (when ``cfg.eta > 0`` or a ``scorer`` is given) from a full forward of ``scorer`` (default:
    the source's model)."""
    if isinstance(prompt, str):
        enc = tokenizer(prompt, return_offsets_mapping=True)
        ids = enc["input_ids"]
        salient = salient_positions(prompt, tokenizer, selector, sink="auto")
        content = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a]  # no roles: every text token
    else:
        ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"])
        salient = salient_positions_for_messages(prompt, tokenizer, selector, sink="auto", roles=cfg.salient_roles)
        roles = cfg.salient_roles
        content = [
            i
            for span in chat_message_spans(tokenizer, prompt).spans
            if span.content is not None and (roles is None or span.role in roles)
            for i in range(*span.content)
        ]
    cap = source.attention(ids, completion)
    a = aggregate(cap, layers=cfg.layers, heads=cfg.heads, layer_ids=source.layer_ids, num_layers=source.num_layers)
    sink = 1 if ids[0] == tokenizer.bos_token_id else 0
    lp = lp0 = None
    if cfg.eta > 0 or scorer is not None:
        scorer = scorer if scorer is not None else source.model
        lp = reference_logprobs(scorer, ids, completion)
        lp0 = reference_logprobs(scorer, prior_by_hand(tokenizer, prompt), completion)
    return score_turn(
        history_block(a, len(ids)),
        salient,
        cfg,
        turn_index=turn_index,
        response_ids=completion,
        history_ids=ids,
        sink=sink,
        content_columns=[i for i in content if i >= sink] if cfg.columns == "content" else None,
        logprobs=lp,
        prior_logprobs=lp0,
    )


# -- unit level -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_rewards_equal_score_turn_by_hand(model, tokenizer, selector, mode):
    cfg = CAGSRConfig(mode=mode, ngram=1)  # the default grounding (eta, prior tokens)
    source = HFAttentionSource(model, layers="all")
    prompts = [TEXTS[0], TEXTS[0], [{"role": "user", "content": TEXTS[4]}], [{"role": "user", "content": TEXTS[4]}]]
    completions = _completions(4, 6, len(tokenizer))
    reward = cagsr_reward_func(cfg, source=source, tokenizer=tokenizer, selector=selector)
    got = reward(prompts, ["x"] * 4, completions)
    expected = [by_hand(source, tokenizer, selector, cfg, p, c) for p, c in zip(prompts, completions)]
    assert got == pytest.approx([e.reward for e in expected], abs=1e-6)  # the source's log-probs: chunked forward
    assert all(isinstance(r, float) for r in got)
    # the grounding comes from the source's own log-probabilities, and it moves the reward
    assert [s.grounding for s in reward.last_scores] == pytest.approx([e.grounding for e in expected], abs=1e-6)
    T, T0 = 6, cfg.grounding_tokens  # the grounding is the mean PMI shrunk by T / (T + T0)
    assert all(abs(e.grounding) * (T + T0) / T > 1e-3 for e in expected)
    # The parts are not degenerate: coverage is positive and the completions differ in reward.
    assert all(e.coverage > 0 for e in expected) and len(set(np.round(got, 9))) > 1
    assert [s.reward for s in reward.last_scores] == pytest.approx(got)


def test_layer_and_head_selection_follows_config(model, tokenizer, selector):
    cfg = CAGSRConfig.attention_only(mode="single", layers=(0,), heads=(1, 2))  # about the attention
    source = HFAttentionSource(model, layers="all")
    prompt, completion = TEXTS[1], _completions(1, 5, len(tokenizer), seed=3)[0]
    got = cagsr_reward_func(cfg, source=source, tokenizer=tokenizer, selector=selector)([prompt], [""], [completion])
    ids = tokenizer(prompt)["input_ids"]
    cap = source.attention(ids, completion)
    block = cap[0, [1, 2]].mean(axis=0)[:, : len(ids)]  # layer 0, heads 1 and 2, written out
    expected = score_turn(
        block, salient_positions(prompt, tokenizer, selector, sink=1), cfg, response_ids=completion, sink=1
    )
    assert got == pytest.approx([expected.reward], abs=1e-6)
    last = cagsr_reward_func(CAGSRConfig.attention_only(mode="single"), source=source, tokenizer=tokenizer,
                             selector=selector)
    assert last([prompt], [""], [completion]) != pytest.approx(got, abs=1e-6)


def test_chat_turn_index_counts_assistant_messages(model, tokenizer, selector):
    # floors high enough to bind; beta > 0 so that the floor reaches the reward (the default beta is 0)
    cfg = CAGSRConfig(mode="multi", h0=3.0, kappa=2.0, beta=0.1)
    source = HFAttentionSource(model)
    prompt = [
        {"role": "user", "content": TEXTS[0]},
        {"role": "assistant", "content": "Bob is in Paris."},
        {"role": "user", "content": TEXTS[4]},
    ]
    completion = _completions(1, 6, len(tokenizer), seed=5)[0]
    got = cagsr_reward_func(cfg, source=source, tokenizer=tokenizer, selector=selector)([prompt], [""], [completion])
    expected = by_hand(source, tokenizer, selector, cfg, prompt, completion, turn_index=1)
    assert got == pytest.approx([expected.reward], abs=1e-6)
    assert expected.floor == pytest.approx(5.0)
    turn0 = by_hand(source, tokenizer, selector, cfg, prompt, completion, turn_index=0)
    assert turn0.reward != pytest.approx(expected.reward)


def test_no_history_coverage_ablation_uses_last_user_message(model, tokenizer, selector):
    cfg = CAGSRConfig.attention_only(history_coverage=False)  # about the coverage columns
    source = HFAttentionSource(model)
    prompt = [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": "ok"},
              {"role": "user", "content": TEXTS[4]}]
    completion = _completions(1, 4, len(tokenizer), seed=6)[0]
    reward = cagsr_reward_func(cfg, source=source, tokenizer=tokenizer, selector=selector)
    got = reward([prompt], [""], [completion])
    enc = reward.encode(prompt)
    span = enc.last_span("user")
    ids = enc.input_ids
    a = aggregate(source.attention(ids, completion), layers=cfg.layers, layer_ids=source.layer_ids,
                  num_layers=source.num_layers)
    content = enc.content_positions(cfg.salient_roles)  # the default history columns (issue 25)
    expected = score_turn(a[:, : len(ids)], enc.salient, cfg, response_ids=completion, history_ids=ids, sink=1,
                          user_span=span, content_columns=content)
    full = score_turn(a[:, : len(ids)], enc.salient, CAGSRConfig.attention_only(), response_ids=completion,
                      history_ids=ids, sink=1, content_columns=content)
    assert got == pytest.approx([expected.reward], abs=1e-9)
    assert expected.coverage < full.coverage  # salient tokens of the first user message no longer count


def test_cot_mode_equals_score_cot(model, tokenizer, selector):
    # the papers' preset: prompt salient positions and every column, so score_cot's inputs are the public pieces
    # below (the default's content columns and generated salient positions are checked by the doctests and
    # experiments/validity.py, which scores CoT through this same integration)
    cfg = CAGSRConfig.paper(mode="cot", cot_block=2)
    source = HFAttentionSource(model)
    prompt, completion = TEXTS[2], _completions(1, 7, len(tokenizer), seed=7)[0]
    got = cagsr_reward_func(cfg, source=source, tokenizer=tokenizer, selector=selector)([prompt], [""], [completion])
    ids = tokenizer(prompt)["input_ids"]
    a = aggregate(source.attention(ids, completion), layers=cfg.layers, layer_ids=source.layer_ids,
                  num_layers=source.num_layers)
    tokens = [tokenizer.decode([t]) for t in completion]
    expected = score_cot(a, len(ids), salient_positions(prompt, tokenizer, selector, sink=1), completion, ids, cfg,
                         response_tokens=tokens, sink=1)
    assert got == pytest.approx([expected.total], abs=1e-9)


def test_captured_attention_kwarg_is_used_instead_of_the_source(model, tokenizer, selector):
    cfg = CAGSRConfig.attention_only(mode="single")  # about the attention (no_source below has no log-probs)
    source = HFAttentionSource(model, layers="all")
    prompts = [TEXTS[0], TEXTS[3]]
    completions = _completions(2, 5, len(tokenizer), seed=9)
    from_source = cagsr_reward_func(cfg, source=source, tokenizer=tokenizer, selector=selector)(
        prompts, ["", ""], completions
    )
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    caps = [source.attention(i, c) for i, c in zip(ids, completions)]
    no_source = cagsr_reward_func(cfg, tokenizer=tokenizer, selector=selector)
    # (a) bare arrays; (b) dicts with prompt_len and layer ids
    assert no_source(prompts, ["", ""], completions, attncap_attention=caps) == pytest.approx(from_source, abs=1e-9)
    dicts = [{"attention": c, "prompt_len": len(i), "layer_ids": [0, 1], "num_layers": 2} for c, i in zip(caps, ids)]
    assert no_source(prompts, ["", ""], completions, attncap_attention=dicts) == pytest.approx(from_source, abs=1e-9)
    # A different (uniform) capture changes the reward, even with a source present: the kwarg wins.
    uniform = []
    for i, c in zip(ids, completions):
        P, T = len(i), len(c)
        u = np.zeros((1, 1, T, P + T - 1), np.float32)
        for s in range(T):
            u[0, 0, s, : P + s] = 1.0 / (P + s)
        uniform.append(u)
    with_source = cagsr_reward_func(cfg, source=source, tokenizer=tokenizer, selector=selector)
    got = with_source(prompts, ["", ""], completions, attncap_attention=uniform)
    expected = [
        score_turn(history_block(aggregate(u), len(i)), salient_positions(p, tokenizer, selector, sink=1), cfg,
                   response_ids=c, sink=1).reward
        for u, i, p, c in zip(uniform, ids, prompts, completions)
    ]
    assert got == pytest.approx(expected, abs=1e-9) and got != pytest.approx(from_source, abs=1e-6)
    with pytest.raises(ValueError, match="prompt_len"):
        no_source(prompts[:1], [""], completions[:1], attncap_attention=[{**dicts[0], "prompt_len": 3}])
    with pytest.raises(ValueError, match="shape"):
        no_source(prompts[:1], [""], completions[:1], attncap_attention=[caps[0][..., :-1]])
    with pytest.raises(ValueError, match="source"):
        no_source(prompts[:1], [""], completions[:1])


def test_logging_hooks_receive_the_components(model, tokenizer, selector):
    source = HFAttentionSource(model)
    prompts = [TEXTS[0]] * 3
    completions = _completions(3, 5, len(tokenizer), seed=11)
    metrics, extras = {}, {}
    reward = cagsr_reward_func(CAGSRConfig(), source=source, tokenizer=tokenizer, selector=selector, name="attn")
    got = reward(
        prompts, [""] * 3, completions, trainer_state=None,
        log_metric=lambda k, v: metrics.__setitem__(k, v), log_extra=lambda k, v: extras.__setitem__(k, v),
    )
    assert set(metrics) == {"attn/coverage", "attn/focus", "attn/repetition", "attn/grounding", "attn/reward"}
    assert set(extras) == set(metrics)
    scores = reward.last_scores
    for part in ("coverage", "focus", "repetition", "grounding"):
        assert extras[f"attn/{part}"] == pytest.approx([getattr(s, part) for s in scores])
        assert metrics[f"attn/{part}"] == pytest.approx(np.mean([getattr(s, part) for s in scores]))
    assert np.isfinite(metrics["attn/grounding"])  # the source's log-probabilities
    assert metrics["attn/reward"] == pytest.approx(np.mean(got)) and extras["attn/reward"] == pytest.approx(got)
    # attention only, and nothing to compute log-probabilities with: grounding not computed, logged as NaN
    caps = [source.attention(tokenizer(p)["input_ids"], c) for p, c in zip(prompts, completions)]
    bare = cagsr_reward_func(CAGSRConfig.attention_only(), tokenizer=tokenizer, selector=selector, name="attn")
    metrics.clear()
    bare(prompts, [""] * 3, completions, attncap_attention=caps, log_metric=metrics.__setitem__)
    assert np.isnan(metrics["attn/grounding"]) and np.isfinite(metrics["attn/reward"])


def test_empty_completion_gives_none(model, tokenizer, selector):
    metrics = {}
    reward = cagsr_reward_func(source=HFAttentionSource(model), tokenizer=tokenizer, selector=selector)
    got = reward([TEXTS[0], TEXTS[0]], ["", ""], [[], [5, 6, 7]], log_metric=metrics.__setitem__)
    assert got[0] is None and isinstance(got[1], float)
    assert metrics["cagsr/reward"] == pytest.approx(got[1])
    empty = {}
    assert reward([TEXTS[0]], [""], [[]], log_metric=empty.__setitem__) == [None]
    assert math.isnan(empty["cagsr/coverage"])


def test_name_pickle_and_trl_callable_name(saved, tokenizer, selector):
    from trl.trainer.utils import get_callable_name

    reward = cagsr_reward_func(source=HFAttentionSource(saved), tokenizer=tokenizer, selector=selector)
    assert isinstance(reward, CAGSRRewardFunction)
    assert reward.__name__ == "cagsr" and get_callable_name(reward) == "cagsr"
    assert get_callable_name(cagsr_reward_func(tokenizer=tokenizer, name="attn_cov")) == "attn_cov"
    prompts, completions = [TEXTS[1]], _completions(1, 6, len(tokenizer), seed=13)
    before = reward(prompts, [""], completions)
    clone = pickle.loads(pickle.dumps(reward))
    assert clone.__name__ == "cagsr" and clone.source._model is None
    assert clone(prompts, [""], completions) == pytest.approx(before, abs=1e-9)
    # The tokenizer can come from the source.
    from_source = cagsr_reward_func(source=HFAttentionSource(saved), selector=selector)
    assert from_source(prompts, [""], completions) == pytest.approx(before, abs=1e-9)


def test_factory_errors_name_the_argument(model, tokenizer):
    with pytest.raises(ValueError, match="tokenizer"):
        cagsr_reward_func()
    with pytest.raises(TypeError, match="config"):
        cagsr_reward_func({"alpha": 1.0}, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="source"):
        cagsr_reward_func(source=object(), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="name"):
        cagsr_reward_func(tokenizer=tokenizer, name="")
    reduced = cagsr_reward_func(
        CAGSRConfig(heads=(0,)), source=HFAttentionSource(model, reduce="head_mean"), tokenizer=tokenizer
    )
    with pytest.raises(ValueError, match="heads"):
        reduced([TEXTS[0]], [""], [[5, 6]])


def test_reduced_sources_give_the_same_reward(model, tokenizer, selector):
    prompts, completions = [TEXTS[3]], _completions(1, 6, len(tokenizer), seed=17)
    values = [
        cagsr_reward_func(
            CAGSRConfig(layers="all"), source=HFAttentionSource(model, layers="all", reduce=r),
            tokenizer=tokenizer, selector=selector,
        )(prompts, [""], completions)[0]
        for r in ("none", "head_mean", "layer_head_mean")
    ]
    assert values == pytest.approx([values[0]] * 3, abs=1e-6)
    mismatch = cagsr_reward_func(
        CAGSRConfig(layers=(0,)), source=HFAttentionSource(model, layers="all", reduce="layer_head_mean"),
        tokenizer=tokenizer,
    )
    with pytest.raises(ValueError, match="layers"):
        mismatch(prompts, [""], completions)


# -- the grounding term's log-probabilities --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tokenizer):
    """A frozen scoring model other than the policy (another seed)."""
    return build_model(len(tokenizer), seed=1)


def _captured(source, reward, prompts, completions):
    return [source.attention(reward.encode(p).input_ids, c) for p, c in zip(prompts, completions)]


def test_likelihood_gives_the_grounding_beside_captured_attention(model, reference, tokenizer, selector):
    """Default config, attention from the column, log-probabilities from likelihood=HFLikelihood(reference): equal
    to score_turn with the reference model's full-forward log-probabilities after the prompt and after the empty
    conversation (BOS for a string prompt, the assistant header for a chat prompt)."""
    cfg = CAGSRConfig(eta=0.5)
    source = HFAttentionSource(model)
    prompts = [TEXTS[1], [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": TEXTS[4]}]]
    completions = _completions(2, 6, len(tokenizer), seed=21)
    reward = cagsr_reward_func(cfg, tokenizer=tokenizer, selector=selector, likelihood=HFLikelihood(reference))
    caps = _captured(source, reward, prompts, completions)
    got = reward(prompts, ["", ""], completions, attncap_attention=caps)
    expected = [by_hand(source, tokenizer, selector, cfg, p, c, turn_index=t, scorer=reference)
                for p, c, t in zip(prompts, completions, (0, 1))]
    assert got == pytest.approx([e.reward for e in expected], abs=1e-6)
    assert [s.grounding for s in reward.last_scores] == pytest.approx([e.grounding for e in expected], abs=1e-6)
    assert reward.prior_prompt_ids(prompts[0]) == [tokenizer.bos_token_id]
    assert reward.prior_prompt_ids(prompts[1]) == tokenizer("<s>assistant\n", add_special_tokens=False)["input_ids"]
    # the likelihood wins over the source's own log-probabilities
    with_source = cagsr_reward_func(cfg, source=source, tokenizer=tokenizer, selector=selector,
                                    likelihood=HFLikelihood(reference))
    assert with_source(prompts, ["", ""], completions) == pytest.approx(got, abs=1e-6)
    policy_scored = cagsr_reward_func(cfg, source=source, tokenizer=tokenizer, selector=selector)
    assert policy_scored(prompts, ["", ""], completions) != pytest.approx(got, abs=1e-4)


def test_logprob_columns_win_and_eta_zero_still_logs_grounding(model, reference, tokenizer, selector):
    source = HFAttentionSource(model)
    prompts, completions = [TEXTS[3], TEXTS[2]], _completions(2, 5, len(tokenizer), seed=23)
    rng = np.random.default_rng(23)
    lp = [-rng.uniform(0.1, 5.0, size=len(c)) for c in completions]
    lp0 = [-rng.uniform(0.1, 5.0, size=len(c)) for c in completions]
    reward = cagsr_reward_func(CAGSRConfig(eta=0.5, grounding_tokens=0.0), source=source, tokenizer=tokenizer,
                               selector=selector, likelihood=HFLikelihood(reference))
    caps = _captured(source, reward, prompts, completions)
    got = reward(prompts, ["", ""], completions, attncap_attention=caps,
                 **{LOGPROBS_KWARG: [x.tolist() for x in lp], PRIOR_LOGPROBS_KWARG: lp0})
    assert [s.grounding for s in reward.last_scores] == pytest.approx([float(np.mean(a - b)) for a, b in zip(lp, lp0)])
    plain = cagsr_reward_func(CAGSRConfig.attention_only(), tokenizer=tokenizer, selector=selector)
    base = plain(prompts, ["", ""], completions, attncap_attention=caps)
    assert got == pytest.approx([b + 0.5 * s.grounding for b, s in zip(base, reward.last_scores)], abs=1e-9)
    # a None entry in the columns: that completion's log-probabilities come from the likelihood
    mixed = reward(prompts, ["", ""], completions, attncap_attention=caps,
                   **{LOGPROBS_KWARG: [lp[0], None], PRIOR_LOGPROBS_KWARG: [lp0[0], None]})
    assert mixed[0] == pytest.approx(got[0]) and mixed[1] != pytest.approx(got[1])
    # eta = 0 with a likelihood: the reward is attention-only, the grounding is computed and logged
    metrics = {}
    zero = cagsr_reward_func(CAGSRConfig.attention_only(), tokenizer=tokenizer, selector=selector,
                             likelihood=HFLikelihood(reference), name="z")
    assert zero(prompts, ["", ""], completions, attncap_attention=caps, log_metric=metrics.__setitem__) == (
        pytest.approx(base, abs=1e-12))
    assert np.isfinite(metrics["z/grounding"]) and all(s.grounding is not None for s in zero.last_scores)


def test_cot_mode_grounds_each_block(model, reference, tokenizer, selector):
    cfg = CAGSRConfig.paper(mode="cot", cot_block=2, eta=0.5)
    source = HFAttentionSource(model)
    prompt, completion = TEXTS[2], _completions(1, 7, len(tokenizer), seed=25)[0]
    reward = cagsr_reward_func(cfg, source=source, tokenizer=tokenizer, selector=selector,
                               likelihood=HFLikelihood(reference))
    got = reward([prompt], [""], [completion])
    ids = tokenizer(prompt)["input_ids"]
    a = aggregate(source.attention(ids, completion), layers=cfg.layers, layer_ids=source.layer_ids,
                  num_layers=source.num_layers)
    expected = score_cot(a, len(ids), salient_positions(prompt, tokenizer, selector, sink=1), completion, ids, cfg,
                         response_tokens=[tokenizer.decode([t]) for t in completion], sink=1,
                         logprobs=reference_logprobs(reference, ids, completion),
                         prior_logprobs=reference_logprobs(reference, [tokenizer.bos_token_id], completion))
    assert got == pytest.approx([expected.total], abs=1e-6)
    assert all(b.grounding is not None for b in reward.last_scores[0].blocks)


def test_missing_logprobs_name_likelihood_and_the_alternatives(model, tokenizer, selector):
    source = HFAttentionSource(model)
    prompts, completions = [TEXTS[0]], _completions(1, 4, len(tokenizer), seed=27)
    bare = cagsr_reward_func(CAGSRConfig(eta=0.5), tokenizer=tokenizer, selector=selector)  # nothing for log-probs
    assert bare.needs_logprob_columns
    caps = _captured(source, bare, prompts, completions)
    for columns in ({}, {LOGPROBS_KWARG: [[-1.0] * 4]}):
        with pytest.raises(ValueError, match=r"^likelihood: .*HFLikelihood\(model\).*attncap_logprobs.*"
                                             r"attncap_prior_logprobs.*attention_only"):
            bare(prompts, [""], completions, attncap_attention=caps, **columns)
    with pytest.raises(ValueError, match=r"attncap_logprobs\[0\], attncap_prior_logprobs\[0\]: .*likelihood="):
        bare(prompts, [""], completions, attncap_attention=caps,
             **{LOGPROBS_KWARG: [None], PRIOR_LOGPROBS_KWARG: [None]})
    with pytest.raises(ValueError, match="give both"):
        bare(prompts, [""], completions, attncap_attention=caps,
             **{LOGPROBS_KWARG: [[-1.0] * 4], PRIOR_LOGPROBS_KWARG: [None]})
    with pytest.raises(ValueError, match=r"attncap_prior_logprobs\[0\]: expected a 1-D sequence of 4"):
        bare(prompts, [""], completions, attncap_attention=caps,
             **{LOGPROBS_KWARG: [[-1.0] * 4], PRIOR_LOGPROBS_KWARG: [[-1.0] * 3]})
    with pytest.raises(ValueError, match=r"attncap_logprobs: expected one entry per completion \(1\), got 2"):
        bare(prompts, [""], completions, attncap_attention=caps,
             **{LOGPROBS_KWARG: [[-1.0] * 4] * 2, PRIOR_LOGPROBS_KWARG: [[-1.0] * 4]})
    assert bare(prompts, [""], completions, attncap_attention=caps,
                **{LOGPROBS_KWARG: [[-1.0] * 4], PRIOR_LOGPROBS_KWARG: [[-2.0] * 4]})[0] is not None
    with pytest.raises(TypeError, match="likelihood: expected an object with .logprobs"):
        cagsr_reward_func(tokenizer=tokenizer, likelihood=object())
    # a source that has log-probabilities, or a likelihood, needs no columns
    assert not cagsr_reward_func(CAGSRConfig(eta=0.5), source=source, tokenizer=tokenizer).needs_logprob_columns
    assert not cagsr_reward_func(CAGSRConfig(eta=0.5), tokenizer=tokenizer,
                                 likelihood=HFLikelihood(model)).needs_logprob_columns
    assert not cagsr_reward_func(CAGSRConfig.attention_only(), tokenizer=tokenizer).needs_logprob_columns


def test_pickle_keeps_the_likelihood(saved, tokenizer, selector, model):
    reward = cagsr_reward_func(CAGSRConfig(eta=0.5), tokenizer=tokenizer, selector=selector,
                               likelihood=HFLikelihood(saved))
    prompts, completions = [TEXTS[4]], _completions(1, 5, len(tokenizer), seed=29)
    caps = _captured(HFAttentionSource(model), reward, prompts, completions)
    before = reward(prompts, [""], completions, attncap_attention=caps)
    clone = pickle.loads(pickle.dumps(reward))
    assert clone.likelihood._model is None
    assert clone(prompts, [""], completions, attncap_attention=caps) == pytest.approx(before, abs=1e-9)


def test_module_import_does_not_import_trl_or_torch():
    code = (
        "import sys, cagsr_reward.integrations.trl, cagsr_reward.integrations;"
        "bad = [m for m in ('trl', 'torch', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- end to end -----------------------------------------------------------------------------------------------------


def _train_args(config_cls, tmp_path, **extra):
    return config_cls(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


def test_grpo_trains_two_steps_with_the_cagsr_reward(tmp_path, saved, tokenizer, selector):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    policy = transformers.AutoModelForCausalLM.from_pretrained(saved)  # sdpa by default: the source switches
    reward = cagsr_reward_func(
        CAGSRConfig(), source=HFAttentionSource(policy, tokenizer), tokenizer=tokenizer, selector=selector
    )
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in TEXTS] * 2})
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[reward],
        args=_train_args(GRPOConfig, tmp_path),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    weights_before = policy.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer.train()
    assert trainer.state.global_step == 2
    steps = [log for log in trainer.state.log_history if "rewards/cagsr/mean" in log]
    assert len(steps) == 2
    for log in steps:
        for key in ("cagsr/coverage", "cagsr/focus", "cagsr/repetition", "cagsr/grounding", "cagsr/reward"):
            assert key in log and math.isfinite(log[key])
        assert 0.0 < log["cagsr/coverage"] <= 1.0 and log["cagsr/focus"] <= 0.0
        # The trainer's reward is ours: TRL's mean of our returned values equals the mean we logged.
        assert log["rewards/cagsr/mean"] == pytest.approx(log["cagsr/reward"], abs=1e-5)
    # The policy was updated and the source attended with the live (updated) model, restored to its settings.
    assert not torch.equal(weights_before, policy.model.layers[0].self_attn.q_proj.weight)
    assert policy.config._attn_implementation == "sdpa"
    assert len(reward.last_scores) == 4
    # Prompts are tokenized exactly as the trainer tokenizes them.
    trl_ids = trainer._tokenize_prompts([dataset[0]["prompt"], dataset[1]["prompt"]])[0]
    assert [reward.encode(dataset[i]["prompt"]).input_ids for i in range(2)] == [list(ids) for ids in trl_ids]


def test_rloo_trains_two_steps_with_the_cagsr_reward(tmp_path, saved, tokenizer, selector):
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    reward = cagsr_reward_func(CAGSRConfig(mode="single"), source=HFAttentionSource(saved), selector=selector)
    dataset = Dataset.from_dict({"prompt": TEXTS * 2})
    trainer = RLOOTrainer(
        model=saved,
        reward_funcs=[reward],
        args=_train_args(RLOOConfig, tmp_path),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    steps = [log for log in trainer.state.log_history if "rewards/cagsr/mean" in log]
    assert len(steps) == 2 and all("cagsr/coverage" in log for log in steps)
    assert all(log["rewards/cagsr/mean"] == pytest.approx(log["cagsr/reward"], abs=1e-5) for log in steps)
    trl_ids = trainer._tokenize_prompts([TEXTS[0], TEXTS[2]])[0]
    assert [reward.encode(t).input_ids for t in (TEXTS[0], TEXTS[2])] == [list(ids) for ids in trl_ids]


def test_captured_attention_is_read_by_attribute_only():
    """The 0.1 dict interface of attncap_attention entries is gone: a capture is read through its attributes."""
    from cagsr_reward import CapturedAttention

    a = np.zeros((1, 1, 2, 4), np.float32)
    a[0, 0, 0, :3] = 1 / 3
    a[0, 0, 1, :4] = 1 / 4
    cap = CapturedAttention(3, a, reduce="layer_head_mean", layer_ids=(1, 2), num_layers=3)
    assert (cap.prompt_len, cap.reduce, list(cap.layer_ids)) == (3, "layer_head_mean", [1, 2])
    with pytest.raises(TypeError):
        cap["attention"]
