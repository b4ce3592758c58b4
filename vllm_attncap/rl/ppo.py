"""PPO over dialogue turns with the CAGSR-vLLM-MTC reward (MTC §4; docs/method.md "PPO over turns"): the trainer.

TRL removed ``PPOTrainer`` in 1.13 (and it only ever took an ``nn.Module`` reward model), so this is a compact
trainer of its own. The math it applies (``PPOConfig``, advantages, the clipped loss, the value head) lives in the
reward SDK, :mod:`cagsr_reward.integrations.ppo`; this module drives the capturing vLLM engine:

- **Rollouts** -- :func:`~vllm_attncap.rl.evaluation.rollout_dialogues`: episodes from a
  :class:`~cagsr_reward.integrations.user_sim.UserSimulator` (3-5 user turns each) are played against the policy
  served by an in-process vLLM engine with ``attention_backend="attncap"``; every assistant turn is sampled
  (temperature 0.8, top-p 0.95, <= 64 new tokens by default) and its attention over the history H_t is captured
  while it is generated.
- **Returns** -- :func:`~vllm_attncap.rl.evaluation.score_dialogue_rollout` scores each episode with
  :func:`~cagsr_reward.scoring.score_dialogue`: turn rewards R_t and returns-to-go
  $G_t = \\sum_{k \\ge t} \\delta^{k-t} w_k R_k$. The grounding term (``eta > 0``, the default) takes each reply's
  log-probabilities after H_t and after the empty conversation from ``likelihood`` (default: the engine, i.e. the
  policy that generated the batch, one batched prefill per episode; pass e.g. ``HFLikelihood(model_path)`` for a
  frozen scorer).
- **Critic** -- :class:`~cagsr_reward.integrations.ppo.ValueHead`: a linear value $V_\\phi(H_t)$ on the policy's
  last-layer hidden state at the last history token. The hidden state is detached, so the critic loss trains the
  head only and never moves the policy.
- **Advantage** -- $A_t = G_t - V_\\phi(H_t)$, computed once per batch before the update and shared by every token of
  turn t, normalised over the batch (``PPOConfig.normalize_advantages``, on by default). The critic is warm-started
  (``PPOConfig.critic_warm_start``, on by default): before the first update its bias is set to the first batch's mean
  return, so that the first advantages are centred instead of all negative when every reward is negative (a zero
  critic against the CAGSR reward, which is negative on most replies, pushed every sampled token down).
- **Losses** -- per token $r = \\pi_\\theta(y_{t,s} \\mid H_t, y_{t,<s}) / \\pi_{old}(\\cdot)$ with $\\pi_{old}$ = the policy
  that generated the batch (recomputed with the trained model, not vLLM's sampler); policy loss
  $-\\mathrm{mean}_{tokens} \\min(r A_t, \\mathrm{clip}(r, 1-\\epsilon, 1+\\epsilon) A_t)$, $\\epsilon = 0.2$; critic loss
  $\\mathrm{mean}_{turns} (V_\\phi(H_t) - G_t)^2$; ``ppo_epochs`` (3) passes over the batch in shuffled minibatches.
- **Devices** -- ``accelerate.Accelerator`` places the policy, the head and the optimiser (``device="cpu"`` or
  ``"cuda"``); one process.
- **Weight sync** -- after each update the policy's parameters are loaded into the engine
  (:func:`~vllm_attncap.rl.engine_weights.sync_engine_weights`, ``model.load_weights`` on the in-process engine,
  which works on CPU because the engine was built inside
  :func:`~vllm_attncap.rl.engine_weights.keep_cpu_linear_weights`), so the next rollouts come from the new policy.

>>> trainer = TurnPPOTrainer(model_path, UserSimulator.from_sources(), CAGSRConfig())   # doctest: +SKIP
>>> for stats in trainer.train(num_updates=10): print(stats["reward"], stats["policy_loss"])  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from cagsr_reward.advantages import turn_advantages
from cagsr_reward.config import CAGSRConfig
from cagsr_reward.integrations.ppo import PPOConfig, TurnSample, clipped_policy_loss, value_head_class
from cagsr_reward.salient import SalientSelector

from .engine_weights import capture_llm, sync_engine_weights
from .evaluation import rollout_dialogues, score_dialogue_rollout

__all__ = ["TurnPPOTrainer"]


class TurnPPOTrainer:
    """PPO over dialogue turns with captured-attention rewards (see the module docstring).

    Args:
        model_path (`str`): Hugging Face model directory (the policy's start and the engine's model).
        simulator: a :class:`~cagsr_reward.integrations.user_sim.UserSimulator` (training episodes).
        reward_config (`CAGSRConfig`): the reward (``mode`` should be ``"multi"``).
        selector (`SalientSelector`, *optional*): salience rules; default ``SalientSelector()``.
        config (`PPOConfig`, *optional*).
        capture_spec (`dict`, *optional*): default ``{"layers": <reward_config.layers>, "reduce": "head_mean"}``.
        likelihood (*optional*): the grounding term's scoring model (``logprobs(prompt_ids, completion_ids)``, e.g.
            ``cagsr_reward.sources.HFLikelihood``); default, when ``reward_config.eta > 0``: the engine
            (:class:`~vllm_attncap.api.EngineLikelihood`).

    Attributes:
        policy, value_head, optimizer, accelerator, llm, tokenizer, history (`list[dict]`: stats per update).
    """

    def __init__(
        self,
        model_path: str,
        simulator: Any,
        reward_config: CAGSRConfig | None = None,
        *,
        selector: SalientSelector | None = None,
        config: PPOConfig | None = None,
        capture_spec: dict[str, Any] | None = None,
        likelihood: Any = None,
    ):
        import torch
        from accelerate import Accelerator
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config or PPOConfig()
        self.reward_config = reward_config or CAGSRConfig()
        self.selector = selector or SalientSelector()
        self.simulator = simulator
        self.model_path = str(model_path)
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.accelerator = Accelerator(cpu=cfg.device == "cpu")
        dtype = getattr(torch, cfg.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        policy = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        policy.config.use_cache = False
        value_head = value_head_class()(policy.config.hidden_size)
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.learning_rate},
                {"params": value_head.parameters(), "lr": cfg.value_learning_rate},
            ]
        )
        self.policy, self.value_head, self.optimizer = self.accelerator.prepare(policy, value_head, optimizer)
        layers = self.reward_config.layers
        self.capture_spec = capture_spec or {
            # "last:K" is resolved against the model's depth when scoring: capture every layer
            "layers": "all" if isinstance(layers, str) else list(layers),
            "reduce": "head_mean" if self.reward_config.heads == "all" else "none",
        }
        self.llm = capture_llm(self.model_path, dtype=cfg.dtype, max_model_len=cfg.max_model_len, seed=cfg.seed)
        if likelihood is None and self.reward_config.eta > 0:
            from ..api import EngineLikelihood

            likelihood = EngineLikelihood(self.llm)
        self.likelihood = likelihood
        self.history: list[dict[str, Any]] = []
        self.last_rollouts: list = []
        self._critic_warm = False

    # -- pieces ------------------------------------------------------------------------------------------------

    @property
    def unwrapped_policy(self):
        return self.accelerator.unwrap_model(self.policy)

    def sampling_params(self):
        from vllm import SamplingParams

        c = self.config
        return SamplingParams(temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_new_tokens, seed=None)

    def rollout(self, episodes: Sequence[Any]) -> tuple[list, list]:
        """Play ``episodes`` with the engine; returns ``(rollouts, scores)`` (one DialogueScore per rollout)."""
        rollouts = rollout_dialogues(self.llm, episodes, self.sampling_params(), self.capture_spec)
        scores = [score_dialogue_rollout(r, self.tokenizer, self.selector, self.reward_config, likelihood=self.likelihood)
                  for r in rollouts]
        return rollouts, scores

    @staticmethod
    def samples_from(rollouts: Sequence[Any], scores: Sequence[Any]) -> list[TurnSample]:
        """One :class:`TurnSample` per assistant turn, with its return G_t."""
        samples = []
        for e, (r, s) in enumerate(zip(rollouts, scores)):
            for t, turn in enumerate(r.turns):
                samples.append(
                    TurnSample(
                        list(turn.prompt_token_ids),
                        list(turn.captured.token_ids),
                        float(s.returns[t]),
                        float(s.rewards[t]),
                        e,
                        t,
                    )
                )
        return samples

    def _forward(self, samples: Sequence[TurnSample]):
        """Token log-probs of each reply ``(B, T_max)`` (masked), its mask, and V(H_t) ``(B,)``."""
        import torch

        device = self.accelerator.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        width, t_max = max(lengths), max(len(s.response_ids) for s in samples)
        ids = torch.full((len(samples), width), pad, dtype=torch.long, device=device)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(samples):
            seq = s.prompt_ids + s.response_ids
            ids[i, : len(seq)] = torch.tensor(seq, device=device)
            attn[i, : len(seq)] = 1
        # the backbone once, then the (large-vocabulary) head only where a reply token is predicted
        policy = self.unwrapped_policy
        backbone = getattr(policy, policy.base_model_prefix)
        hidden = backbone(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        head = policy.get_output_embeddings()
        logps = torch.zeros(len(samples), t_max, device=device)
        mask = torch.zeros(len(samples), t_max, device=device)
        last_hist = []
        for i, s in enumerate(samples):
            P, T = len(s.prompt_ids), len(s.response_ids)
            # the hidden state at position P-1+k predicts reply token k (method.md: row s <-> query P-1+s)
            step_logits = head(hidden[i, P - 1 : P - 1 + T]).float()
            target = torch.tensor(s.response_ids, device=device)
            logps[i, :T] = torch.log_softmax(step_logits, dim=-1).gather(-1, target[:, None]).squeeze(-1)
            mask[i, :T] = 1.0
            last_hist.append(hidden[i, P - 1])
        values = self.value_head(torch.stack(last_hist))
        return logps, mask, values

    def _minibatches(self, n: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        order = rng.permutation(n)
        size = self.config.minibatch_size
        for i in range(0, n, size):
            yield order[i : i + size]

    def advantages(self, samples: Sequence[TurnSample]) -> np.ndarray:
        """A_t = G_t - V(H_t) for each sample (stored in ``sample.advantage``), after the critic's warm start on the
        first batch (``critic_warm_start``: the bias is moved by the batch's mean return minus its mean value, and every
        ``sample.value`` with it, since V is linear) and normalised over the batch (``normalize_advantages``)."""
        import torch

        cfg = self.config
        if cfg.critic_warm_start and not self.history and not self._critic_warm:
            shift = float(np.mean([s.ret for s in samples]) - np.mean([s.value for s in samples]))
            with torch.no_grad():
                self.accelerator.unwrap_model(self.value_head).linear.bias.add_(shift)
            for s in samples:
                s.value += shift
            self._critic_warm = True
        adv = turn_advantages([s.ret for s in samples], [s.value for s in samples], normalize=cfg.normalize_advantages)
        for s, a in zip(samples, adv):
            s.advantage = float(a)
        return adv

    # -- one update ----------------------------------------------------------------------------------------------

    def step(self, episodes: Sequence[Any] | None = None) -> dict[str, Any]:
        """Roll out, score, run ``ppo_epochs`` of clipped-PPO + critic updates, sync the engine; return the stats."""
        import torch

        cfg = self.config
        episodes = episodes if episodes is not None else self.simulator.sample(cfg.episodes_per_update)
        rollouts, scores = self.rollout(episodes)
        self.last_rollouts = rollouts
        samples = self.samples_from(rollouts, scores)

        # pi_old and V(H_t) of the policy that generated the batch
        self.policy.eval()
        with torch.no_grad():
            for idx in self._minibatches(len(samples), np.random.default_rng(0)):
                batch = [samples[i] for i in idx]
                logps, mask, values = self._forward(batch)
                for k, s in enumerate(batch):
                    s.old_logprobs = logps[k, : len(s.response_ids)].clone()
                    s.value = float(values[k])
        adv = self.advantages(samples)

        self.policy.train()
        rng = np.random.default_rng(cfg.seed + len(self.history))
        before = {n: p.detach().clone() for n, p in self.unwrapped_policy.named_parameters()}
        pl, vl, cf, kl = [], [], [], []
        for _ in range(cfg.ppo_epochs):
            for idx in self._minibatches(len(samples), rng):
                batch = [samples[i] for i in idx]
                logps, mask, values = self._forward(batch)
                old = torch.zeros_like(logps)
                for k, s in enumerate(batch):
                    old[k, : len(s.response_ids)] = s.old_logprobs
                a = torch.tensor([s.advantage for s in batch], device=logps.device)[:, None]
                g = torch.tensor([s.ret for s in batch], device=logps.device)
                policy_loss, clip_frac, approx_kl = clipped_policy_loss(logps, old, a, mask, cfg.clip_epsilon)
                value_loss = ((values - g) ** 2).mean()
                loss = policy_loss + cfg.value_coef * value_loss
                self.optimizer.zero_grad(set_to_none=True)
                self.accelerator.backward(loss)
                self.accelerator.clip_grad_norm_(
                    list(self.policy.parameters()) + list(self.value_head.parameters()), cfg.max_grad_norm
                )
                self.optimizer.step()
                pl.append(policy_loss.item())
                vl.append(value_loss.item())
                cf.append(clip_frac.item())
                kl.append(approx_kl.item())
        self.policy.eval()
        delta = math.sqrt(
            sum(float(((p.detach() - before[n]) ** 2).sum()) for n, p in self.unwrapped_policy.named_parameters())
        )
        sync_engine_weights(self.llm, self.unwrapped_policy.named_parameters())

        turn_scores = [ts for s in scores for ts in s.turns]
        stats = {
            "step": len(self.history) + 1,
            "reward": float(np.mean([ts.reward for ts in turn_scores])),
            "coverage": float(np.mean([ts.coverage for ts in turn_scores])),
            "focus": float(np.mean([ts.focus for ts in turn_scores])),
            "repetition": float(np.mean([ts.repetition for ts in turn_scores])),
            "grounding": float(np.mean([ts.grounding for ts in turn_scores]))
            if all(ts.grounding is not None for ts in turn_scores) else float("nan"),
            "return_0": float(np.mean([s.returns[0] for s in scores])),
            "value": float(np.mean([s.value for s in samples])),
            "advantage_abs": float(np.mean(np.abs(adv))),
            "policy_loss": float(np.mean(pl)),
            "value_loss": float(np.mean(vl)),
            "clip_fraction": float(np.mean(cf)),
            "approx_kl": float(np.mean(kl)),
            "param_delta": delta,
            "num_turns": len(samples),
            "num_dialogues": len(rollouts),
            "mean_reply_tokens": float(np.mean([len(s.response_ids) for s in samples])),
        }
        self.history.append(stats)
        return stats

    def train(self, num_updates: int, *, callback: Callable[[dict[str, Any]], None] | None = None) -> list[dict]:
        """Run ``num_updates`` updates; ``callback(stats)`` after each. Returns the stats of these updates."""
        out = []
        for _ in range(num_updates):
            stats = self.step()
            out.append(stats)
            if callback is not None:
                callback(stats)
        return out
