"""RL on captured attention: the code that drives a capturing vLLM engine for training and evaluation.

It may use both packages (the reward SDK ``cagsr_reward`` and the capture plugin); neither of them imports it.

- :mod:`~vllm_attncap.rl.trainers`: ``CaptureGRPOTrainer`` / ``CaptureRLOOTrainer`` (TRL with a colocated capturing
  engine whose reward functions receive the captured attention).
- :mod:`~vllm_attncap.rl.ppo`: ``TurnPPOTrainer`` (PPO over dialogue turns with vLLM rollouts).
- :mod:`~vllm_attncap.rl.evaluation`: held-out dialogue / chain-of-thought evaluation.
- :mod:`~vllm_attncap.rl.engine_weights`: engines whose weights a trainer can update (the CPU weight fix).
- :mod:`~vllm_attncap.rl.runs`: ablation flags, run folders, JSON results.

The research harness that validates and trains rewards is not part of the package: ``experiments/`` at the
repository root (``python -m experiments.validity``, ``python -m experiments.training``, docs/experiments.md).

Importing this package imports none of trl, vllm or torch; the names below load their module on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CaptureGRPOTrainer",
    "CaptureRLOOTrainer",
    "CapturingLLM",
    "TurnPPOTrainer",
    "capture_llm",
    "evaluate_cot",
    "evaluate_dialogues",
    "sync_engine_weights",
]

_LAZY = {
    "CaptureGRPOTrainer": "trainers",
    "CaptureRLOOTrainer": "trainers",
    "CapturingLLM": "trainers",
    "TurnPPOTrainer": "ppo",
    "capture_llm": "engine_weights",
    "sync_engine_weights": "engine_weights",
    "evaluate_dialogues": "evaluation",
    "evaluate_cot": "evaluation",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
