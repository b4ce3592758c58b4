"""PPO over dialogue turns with the CAGSR-vLLM-MTC reward (MTC §4; method.md "PPO over turns").

TRL removed ``PPOTrainer`` in 1.13 (and it only ever took an ``nn.Module`` reward model), so this is a compact
trainer of its own:

- **Rollouts** -- :func:`~cagsr_reward.evaluation.rollout_dialogues`: episodes from a
  :class:`~cagsr_reward.integrations.user_sim.UserSimulator` (3-5 user turns each) are played against the policy
  served by an in-process vLLM engine with ``attention_backend="attncap"``; every assistant turn is sampled
  (temperature 0.8, top-p 0.95, <= 64 new tokens by default) and its attention over the history H_t is captured
  while it is generated.
- **Returns** -- :func:`~cagsr_reward.evaluation.score_dialogue_rollout` scores each episode with
  :func:`~cagsr_reward.scoring.score_dialogue`: turn rewards R_t and returns-to-go
  $G_t = \\sum_{k \\ge t} \\delta^{k-t} w_k R_k$.
- **Critic** -- :class:`ValueHead`: a linear value $V_\\phi(H_t)$ on the policy's last-layer hidden state at the last
  history token. The hidden state is detached, so the critic loss trains the head only and never moves the policy.
- **Advantage** -- $A_t = G_t - V_\\phi(H_t)$, computed once per batch before the update and shared by every token of
  turn t (optionally normalised over the batch, ``PPOConfig.normalize_advantages``; off by default, as in method.md).
- **Losses** -- per token $r = \\pi_\\theta(y_{t,s} \\mid H_t, y_{t,<s}) / \\pi_{old}(\\cdot)$ with $\\pi_{old}$ = the policy
  that generated the batch (recomputed with the trained model, not vLLM's sampler); policy loss
  $-\\mathrm{mean}_{tokens} \\min(r A_t, \\mathrm{clip}(r, 1-\\epsilon, 1+\\epsilon) A_t)$, $\\epsilon = 0.2$; critic loss
  $\\mathrm{mean}_{turns} (V_\\phi(H_t) - G_t)^2$; ``ppo_epochs`` (3) passes over the batch in shuffled minibatches.
- **Devices** -- ``accelerate.Accelerator`` places the policy, the head and the optimiser (``device="cpu"`` or
  ``"cuda"``); one process.
- **Weight sync** -- after each update the policy's parameters are loaded into the engine
  (:func:`~cagsr_reward.integrations.trl_vllm.sync_engine_weights`, ``model.load_weights`` on the in-process
  engine, which works on CPU because the engine was built inside
  :func:`~cagsr_reward.integrations.trl_vllm.keep_cpu_linear_weights`), so the next rollouts come from the new policy.

>>> trainer = TurnPPOTrainer(model_path, UserSimulator.from_sources(), CAGSRConfig())   # doctest: +SKIP
>>> for stats in trainer.train(num_updates=10): print(stats["reward"], stats["policy_loss"])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..config import CAGSRConfig
from ..salient import SalientSelector

__all__ = ["PPOConfig", "TurnSample", "ValueHead", "TurnPPOTrainer", "turn_advantages", "clipped_policy_loss"]


@dataclasses.dataclass
class PPOConfig:
    """Settings of :class:`TurnPPOTrainer` (paper values where MTC §4/§6 gives them).

    Attributes:
        learning_rate (`float`, 1e-6): policy AdamW learning rate.
        value_learning_rate (`float`, 1e-3): value-head learning rate.
        clip_epsilon (`float`, 0.2): PPO ratio clip (MTC §4).
        ppo_epochs (`int`, 3): passes over each batch (MTC §4).
        minibatch_size (`int`, 8): turns per gradient step.
        value_coef (`float`, 0.5): weight of the critic loss in the summed loss.
        max_grad_norm (`float`, 1.0): gradient clipping.
        episodes_per_update (`int`, 4): dialogues rolled out per update.
        temperature (`float`, 0.8), top_p (`float`, 0.95), max_new_tokens (`int`, 64): sampling (MTC §6).
        normalize_advantages (`bool`, False): standardise A_t over the batch.
        device (`str`, ``"cpu"``): training device; dtype (`str`, ``"float32"``): policy and engine dtype.
        max_model_len (`int`, 2048): engine context.
        seed (`int`, 0).
    """

    learning_rate: float = 1e-6
    value_learning_rate: float = 1e-3
    clip_epsilon: float = 0.2
    ppo_epochs: int = 3
    minibatch_size: int = 8
    value_coef: float = 0.5
    max_grad_norm: float = 1.0
    episodes_per_update: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 64
    normalize_advantages: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    max_model_len: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.clip_epsilon < 1:
            raise ValueError(f"clip_epsilon: expected a float in (0, 1), got {self.clip_epsilon!r}")
        for name in ("ppo_epochs", "minibatch_size", "episodes_per_update", "max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(self, name)!r}")


@dataclasses.dataclass
class TurnSample:
    """One assistant turn as PPO sees it: H_t's ids, the reply's ids, the return G_t and the episode/turn index."""

    prompt_ids: list[int]
    response_ids: list[int]
    ret: float
    reward: float
    episode: int
    turn: int
    old_logprobs: Any = None  # (T,) tensor, filled before the update
    value: float = 0.0
    advantage: float = 0.0


def turn_advantages(returns: Sequence[float], values: Sequence[float], *, normalize: bool = False) -> np.ndarray:
    """$A_t = G_t - V(H_t)$ per turn; with ``normalize``, standardised over the batch (std + 1e-8).

    Example:
        >>> turn_advantages([1.0, 0.5], [0.25, 0.5]).tolist()
        [0.75, 0.0]
    """
    g, v = np.asarray(returns, np.float64), np.asarray(values, np.float64)
    if g.shape != v.shape:
        raise ValueError(f"returns/values: shapes {g.shape} and {v.shape} differ")
    adv = g - v
    if normalize and adv.size > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return adv


def clipped_policy_loss(new_logprobs, old_logprobs, advantages, mask, clip_epsilon: float = 0.2):
    r"""PPO's clipped surrogate, averaged over the unmasked tokens.

    $L = -\mathrm{mean}_{s:\,mask=1} \min(r_s A_s, \mathrm{clip}(r_s, 1-\epsilon, 1+\epsilon) A_s)$,
    $r_s = \exp(\log\pi_\theta - \log\pi_{old})$. ``advantages`` broadcasts against ``(B, T)``: a ``(B, 1)`` column
    gives every token of a turn the turn's advantage.

    Returns:
        ``(loss, clip_fraction, approx_kl)`` (the last two detached, for logging).

    Example:
        >>> import torch
        >>> new, old = torch.log(torch.tensor([[0.6, 0.5]])), torch.log(torch.tensor([[0.4, 0.5]]))
        >>> loss, clipped, _ = clipped_policy_loss(new, old, torch.tensor([[1.0]]), torch.ones(1, 2))
        >>> round(loss.item(), 4), clipped.item()  # ratios 1.5 (clipped to 1.2) and 1.0
        (-1.1, 0.5)
    """
    import torch

    ratio = torch.exp(new_logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    denom = mask.sum().clamp(min=1.0)
    loss = (per_token * mask).sum() / denom
    with torch.no_grad():
        clip_frac = (((ratio - 1.0).abs() > clip_epsilon).float() * mask).sum() / denom
        approx_kl = (((ratio - 1.0) - torch.log(ratio)) * mask).sum() / denom
    return loss, clip_frac, approx_kl


_CLASSES: dict[str, Any] = {}


def _value_head_class():
    if "ValueHead" in _CLASSES:
        return _CLASSES["ValueHead"]
    import torch

    class ValueHead(torch.nn.Module):
        """$V_\\phi(H_t)$: a linear map of the policy's last hidden state at the last history token (detached)."""

        def __init__(self, hidden_size: int):
            super().__init__()
            self.linear = torch.nn.Linear(hidden_size, 1)
            torch.nn.init.zeros_(self.linear.weight)
            torch.nn.init.zeros_(self.linear.bias)

        def forward(self, hidden):  # (B, hidden) -> (B,)
            return self.linear(hidden.detach().float()).squeeze(-1)

    _CLASSES["ValueHead"] = ValueHead
    return ValueHead


def __getattr__(name: str) -> Any:
    if name == "ValueHead":
        return _value_head_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TurnPPOTrainer:
    """PPO over dialogue turns with captured-attention rewards (see the module docstring).

    Args:
        model_path (`str`): Hugging Face model directory (the policy's start and the engine's model).
        simulator: a :class:`~cagsr_reward.integrations.user_sim.UserSimulator` (training episodes).
        reward_config (`CAGSRConfig`): the reward (``mode`` should be ``"multi"``).
        selector (`SalientSelector`, *optional*): salience rules; default ``SalientSelector()``.
        config (`PPOConfig`, *optional*).
        capture_spec (`dict`, *optional*): default ``{"layers": <reward_config.layers>, "reduce": "head_mean"}``.

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
    ):
        import torch
        from accelerate import Accelerator
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .trl_vllm import capture_llm

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
        value_head = _value_head_class()(policy.config.hidden_size)
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.learning_rate},
                {"params": value_head.parameters(), "lr": cfg.value_learning_rate},
            ]
        )
        self.policy, self.value_head, self.optimizer = self.accelerator.prepare(policy, value_head, optimizer)
        layers = self.reward_config.layers
        self.capture_spec = capture_spec or {
            "layers": "all" if layers == "all" else list(layers),
            "reduce": "head_mean" if self.reward_config.heads == "all" else "none",
        }
        self.llm = capture_llm(self.model_path, dtype=cfg.dtype, max_model_len=cfg.max_model_len, seed=cfg.seed)
        self.history: list[dict[str, Any]] = []
        self.last_rollouts: list = []

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
        from vllm_attncap.api import engine_model_shape

        from ..evaluation import rollout_dialogues, score_dialogue_rollout

        rollouts = rollout_dialogues(self.llm, episodes, self.sampling_params(), self.capture_spec)
        num_layers = engine_model_shape(self.llm)[0]
        scores = [
            score_dialogue_rollout(r, self.tokenizer, self.selector, self.reward_config, num_layers) for r in rollouts
        ]
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
        adv = turn_advantages([s.ret for s in samples], [s.value for s in samples], normalize=cfg.normalize_advantages)
        for s, a in zip(samples, adv):
            s.advantage = float(a)

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
        from .trl_vllm import sync_engine_weights

        sync_engine_weights(self.llm, self.unwrapped_policy.named_parameters())

        turn_scores = [ts for s in scores for ts in s.turns]
        stats = {
            "step": len(self.history) + 1,
            "reward": float(np.mean([ts.reward for ts in turn_scores])),
            "coverage": float(np.mean([ts.coverage for ts in turn_scores])),
            "focus": float(np.mean([ts.focus for ts in turn_scores])),
            "repetition": float(np.mean([ts.repetition for ts in turn_scores])),
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
