"""The math of PPO over dialogue turns (MTC §4; docs/method.md "PPO over turns"), shared by any trainer.

- :class:`PPOConfig`: the trainer settings (paper values where MTC §4/§6 gives them).
- :class:`TurnSample`: one assistant turn as PPO sees it (H_t's ids, the reply's ids, the return G_t).
- :func:`~cagsr_reward.advantages.turn_advantages`: $A_t = G_t - V_\\phi(H_t)$, shared by every token of turn t.
- :func:`clipped_policy_loss`: PPO's clipped surrogate over the reply tokens.
- :class:`ValueHead`: $V_\\phi(H_t)$, a linear map of the policy's last hidden state at the last history token.

The trainer that rolls dialogues out with a capturing vLLM engine is ``vllm_attncap.rl.TurnPPOTrainer``. torch is
imported inside :func:`clipped_policy_loss` and when :class:`ValueHead` is first used, never at import time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..advantages import turn_advantages

__all__ = ["PPOConfig", "TurnSample", "ValueHead", "turn_advantages", "clipped_policy_loss", "value_head_class"]


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
        normalize_advantages (`bool`, True): standardise A_t over the batch (zero mean, unit std), so that an
            update pushes the better half of its turns up and the worse half down whatever the rewards' offset.
        critic_warm_start (`bool`, True): before the first update, set the critic's bias to the mean return of the
            first batch (its weight starts at zero), so that V starts as that batch's mean return instead of 0;
            with rewards that are all negative, a zero critic makes every advantage of the first update negative.
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
    normalize_advantages: bool = True
    critic_warm_start: bool = True
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


def value_head_class():
    """The :class:`ValueHead` class (built on first use, so that importing this module does not import torch)."""
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
        return value_head_class()
    if name == "TurnPPOTrainer":  # moved in 0.2: it drives a vLLM engine
        raise ImportError(
            f"{__name__}.TurnPPOTrainer moved to vllm_attncap.rl.ppo.TurnPPOTrainer (it drives a vLLM engine, and "
            "the cagsr_reward SDK never imports the capture package): use `from vllm_attncap.rl import TurnPPOTrainer`"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
