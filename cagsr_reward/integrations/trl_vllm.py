"""Deprecated: TRL with a capturing colocated vLLM engine moved to ``vllm_attncap.rl`` (0.2).

The trainers drive a vLLM engine, so they live on the side that may import both packages:
``from vllm_attncap.rl import CaptureGRPOTrainer, CaptureRLOOTrainer``. ``block_advantages`` (pure math) is now
:func:`cagsr_reward.advantages.block_advantages`.
"""

from __future__ import annotations

from .._moved import moved_module_getattr

__getattr__ = moved_module_getattr(
    __name__,
    stayed={"block_advantages": "cagsr_reward.advantages", "ATTENTION_KWARG": "cagsr_reward.integrations.trl"},
    left={
        **dict.fromkeys(("CaptureGRPOTrainer", "CaptureRLOOTrainer", "CapturingLLM", "attncap_colocate_engine",
                         "capture_spec_for", "DEFAULT_CAPTURE_SPEC"), "vllm_attncap.rl.trainers"),
        **dict.fromkeys(("capture_llm", "engine_model", "engine_weight_mismatch", "keep_cpu_linear_weights",
                         "repack_cpu_linear_weights", "sync_engine_weights"), "vllm_attncap.rl.engine_weights"),
    },
)
