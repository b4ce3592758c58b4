"""PPO over dialogue turns: the math (advantages, clipped loss, returns per turn) and a 2-update run on a tiny model
with vLLM+attncap rollouts and in-process weight sync."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cagsr_reward import CAGSRConfig, TurnInput, score_dialogue  # noqa: E402
from cagsr_reward.advantages import turn_advantages  # noqa: E402
from cagsr_reward.integrations.ppo import PPOConfig, clipped_policy_loss  # noqa: E402
from vllm_attncap.rl.ppo import TurnPPOTrainer  # noqa: E402


def test_turn_advantages_are_return_minus_value():
    g, v = [1.5, 0.5, -0.25], [0.5, 0.5, 0.25]
    assert turn_advantages(g, v).tolist() == [1.0, 0.0, -0.5]
    a = turn_advantages(g, v, normalize=True)
    assert abs(a.mean()) < 1e-12 and abs(a.std() - 1.0) < 1e-6
    with pytest.raises(ValueError, match="shapes"):
        turn_advantages([1.0], [1.0, 2.0])


def test_clipped_loss_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    new = torch.randn(3, 5, generator=gen) * 0.3 - 1.0
    old = torch.randn(3, 5, generator=gen) * 0.3 - 1.0
    adv = torch.tensor([[1.0], [-2.0], [0.5]])
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    loss, clip_frac, kl = clipped_policy_loss(new, old, adv, mask, 0.2)
    expected, n, clipped, expected_kl = 0.0, 0, 0, 0.0
    for i in range(3):
        for s in range(5):
            if mask[i, s] == 0:
                continue
            log_r = float(new[i, s] - old[i, s])
            r = math.exp(log_r)
            a = float(adv[i, 0])
            expected += -min(r * a, min(max(r, 0.8), 1.2) * a)
            clipped += abs(r - 1) > 0.2
            expected_kl += (r - 1) - log_r  # the k3 estimator of KL(old || new), >= 0 token by token
            n += 1
    assert loss.item() == pytest.approx(expected / n, rel=1e-5)
    assert clip_frac.item() == pytest.approx(clipped / n)
    assert kl.item() == pytest.approx(expected_kl / n, rel=1e-5)
    assert kl.item() > 0  # the two policies differ
    # at ratio 1 every token of turn i gets gradient -A_i / n: the turn's advantage is shared by its tokens
    at_old = old.clone().requires_grad_(True)
    loss, _, _ = clipped_policy_loss(at_old, old, adv, mask, 0.2)
    loss.backward()
    n = int(mask.sum())
    expected_grad = -(adv * mask) / n
    assert torch.allclose(at_old.grad, expected_grad, atol=1e-7)


def test_samples_carry_returns_to_go_of_their_turn():
    class Turn:
        def __init__(self, p, r):
            self.prompt_token_ids, self.captured = p, type("C", (), {"token_ids": r})()

    class Rollout:
        turns = [Turn([1, 2, 3], [4, 5]), Turn([1, 2, 3, 4, 5, 6], [7])]

    cfg = CAGSRConfig.attention_only(beta=0.0, gamma=0.0)  # coverage only, to keep the returns simple
    score = score_dialogue(
        [TurnInput(np.array([[0.5, 0.5], [0.5, 0.5]]), [0]), TurnInput(np.array([[0.2, 0.2, 0.6]]), [2])], cfg
    )
    samples = TurnPPOTrainer.samples_from([Rollout()], [score])
    assert [s.ret for s in samples] == pytest.approx([1.1, 0.6])  # G_0 = R_0 + R_1, G_1 = R_1
    assert [s.reward for s in samples] == pytest.approx([0.5, 0.6])
    assert samples[1].prompt_ids == [1, 2, 3, 4, 5, 6] and samples[1].response_ids == [7]


def _advantage_trainer(config: PPOConfig) -> TurnPPOTrainer:
    """A TurnPPOTrainer with only what ``advantages`` uses (no model, no engine)."""
    from accelerate import Accelerator

    from cagsr_reward.integrations.ppo import TurnSample, value_head_class  # noqa: F401

    trainer = object.__new__(TurnPPOTrainer)
    trainer.config, trainer.history, trainer._critic_warm = config, [], False
    trainer.accelerator = Accelerator(cpu=True)
    trainer.value_head = value_head_class()(8)  # zero weight and bias: V = 0, the untrained critic
    return trainer


def _negative_samples():
    from cagsr_reward.integrations.ppo import TurnSample

    returns = [-0.9, -0.3, -0.5, -1.2, -0.25, -0.6]  # every reward negative, as the CAGSR reward mostly is
    return [TurnSample([1, 2], [3], g, g, i // 3, i % 3) for i, g in enumerate(returns)], returns


def test_first_update_advantages_are_centred_when_all_rewards_are_negative():
    samples, returns = _negative_samples()
    # the old set-up (zero critic, no normalisation): every advantage of the first update is negative
    old = _advantage_trainer(PPOConfig(normalize_advantages=False, critic_warm_start=False))
    assert (old.advantages(samples) < 0).all()

    samples, returns = _negative_samples()
    warm = _advantage_trainer(PPOConfig(normalize_advantages=False))  # warm start only
    adv = warm.advantages(samples)
    assert warm.value_head.linear.bias.item() == pytest.approx(np.mean(returns))  # V starts at the batch mean return
    assert adv.tolist() == pytest.approx((np.array(returns) - np.mean(returns)).tolist())
    assert (adv > 0).any() and (adv < 0).any()
    # the warm start happens once: the next batch keeps the critic
    more, _ = _negative_samples()
    for s in more:
        s.value = warm.value_head.linear.bias.item()
    warm.history.append({})
    warm.advantages(more)
    assert warm.value_head.linear.bias.item() == pytest.approx(np.mean(returns))

    samples, returns = _negative_samples()
    adv = _advantage_trainer(PPOConfig()).advantages(samples)  # the defaults: warm start and normalisation
    assert abs(adv.mean()) < 1e-9 and adv.std() == pytest.approx(1.0, rel=1e-6)
    assert [s.advantage for s in samples] == pytest.approx(adv.tolist())
    # the order of the turns is kept: the best return (-0.25) gets the largest advantage
    assert int(np.argmax(adv)) == int(np.argmax(returns)) and int(np.argmin(adv)) == int(np.argmin(returns))


def test_ppo_config_validates():
    with pytest.raises(ValueError, match="clip_epsilon"):
        PPOConfig(clip_epsilon=1.5)
    with pytest.raises(ValueError, match="ppo_epochs"):
        PPOConfig(ppo_epochs=0)


@pytest.mark.engine
@pytest.mark.slow
def test_two_ppo_updates_with_captured_rewards(tiny_llama):
    pytest.importorskip("vllm")
    pytest.importorskip("chatterbot_corpus")
    from rl_utils import free_engine

    from vllm_attncap.rl.engine_weights import engine_weight_mismatch
    from cagsr_reward.integrations.user_sim import UserSimulator

    sim = UserSimulator.from_sources(["tech_support"], seed=0)
    trainer = TurnPPOTrainer(
        str(tiny_llama),
        sim,
        CAGSRConfig(layers=(-1,)),  # the last layer: the shapes below
        config=PPOConfig(max_new_tokens=8, episodes_per_update=2, learning_rate=1e-3, max_model_len=1024, minibatch_size=4),
    )
    initial = {n: p.detach().clone() for n, p in trainer.unwrapped_policy.named_parameters()}
    head0 = trainer.value_head.linear.weight.detach().clone()
    for update in range(2):
        stats = trainer.step()
        # every assistant turn of every dialogue was captured while generated, with the right shape
        assert stats["num_turns"] == sum(len(r.turns) for r in trainer.last_rollouts) >= 6
        for r in trainer.last_rollouts:
            assert 3 <= len(r.turns) <= 5 and len(r.turns) == r.episode.num_turns
            for turn in r.turns:
                P, T = len(turn.prompt_token_ids), len(turn.captured.token_ids)
                assert turn.captured.attention.shape == (1, 1, T, P + T - 1)
        for key in ("policy_loss", "value_loss", "reward", "coverage", "focus", "grounding", "approx_kl"):
            assert math.isfinite(stats[key]), key  # grounding: eta > 0, the engine's log-probabilities
        assert stats["param_delta"] > 0
        # after the update the engine serves the updated policy
        assert engine_weight_mismatch(trainer.llm, trainer.unwrapped_policy) == 0.0
    changed = sum(
        not torch.equal(p.detach(), initial[n]) for n, p in trainer.unwrapped_policy.named_parameters()
    )
    assert changed == len(initial)
    assert not torch.equal(trainer.value_head.linear.weight.detach(), head0)
    assert trainer.history[1]["step"] == 2
    free_engine(trainer.llm)
