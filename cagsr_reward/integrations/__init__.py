"""Adapters from the reward math to training libraries.

- :mod:`cagsr_reward.integrations.trl`: :func:`~cagsr_reward.integrations.trl.cagsr_reward_func`, a TRL 1.16
  ``reward_funcs`` entry for ``GRPOTrainer`` / ``RLOOTrainer``.

Each adapter imports its library lazily; importing this package imports none of them.
"""

from __future__ import annotations

__all__: list[str] = []
