"""Deprecated: the evaluation harness moved (0.2).

- text metrics -> :mod:`cagsr_reward.metrics` (``token_f1``, ``rouge_l``, ``cosine_similarity``,
  ``consistency_scores``);
- sentence embeddings -> :mod:`cagsr_reward.integrations.embedding` (``SentenceEmbedder``, ...);
- rollouts, ``evaluate_dialogues``, ``evaluate_cot`` and the command line -> ``vllm_attncap.rl.evaluation``
  (``python -m vllm_attncap.rl.evaluation``); run helpers -> ``vllm_attncap.rl.runs``.
"""

from __future__ import annotations

from ._moved import moved_module_getattr

_METRICS = "cagsr_reward.metrics"
_EMBEDDING = "cagsr_reward.integrations.embedding"
__getattr__ = moved_module_getattr(
    __name__,
    stayed={
        "token_f1": _METRICS, "rouge_l": _METRICS, "cosine_similarity": _METRICS, "consistency_scores": _METRICS,
        "SentenceEmbedder": _EMBEDDING, "EmbeddingModelMissing": _EMBEDDING, "embedding_model_path": _EMBEDDING,
    },
    left={
        **dict.fromkeys(("DialogueRollout", "rollout_dialogues", "turn_attention", "score_dialogue_rollout",
                         "evaluate_dialogues", "evaluate_cot", "main"), "vllm_attncap.rl.evaluation"),
        **dict.fromkeys(("add_ablation_flags", "config_from_flags", "new_run_dir", "write_json"), "vllm_attncap.rl.runs"),
    },
)
