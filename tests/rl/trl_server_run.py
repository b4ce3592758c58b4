"""Two GRPO steps whose reward is read from captures made by a separate attncap server (one process per run:
TRL sets up accelerate state for the whole process). Writes OUT_DIR/result.json.

Usage: python trl_server_run.py BASE_URL MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

PROMPTS = [
    [{"role": "user", "content": "my printer does not work after the update, what should I do?"}],
    [{"role": "user", "content": "Alice sent 42 emails to Bob about the Paris meeting"}],
]


def _logprobs(model, context, ids):
    """log p(ids[s] | context, ids[:s]) from one full forward of a Hugging Face model."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([list(context) + list(ids)])).logits[0].double(), -1)
    return np.array([float(logp[len(context) - 1 + s, t]) for s, t in enumerate(ids)])


def main(base_url: str, model_dir: str, out_dir: str) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from cagsr_reward import CAGSRConfig
    from cagsr_reward.attention import CapturedAttention
    from cagsr_reward.integrations.trl import cagsr_reward_func
    from cagsr_reward.integrations.trl_server import attncap_server_rollout

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    server_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # what the server holds (no weight sync)
    cagsr = cagsr_reward_func(CAGSRConfig(layers=(-1,)), tokenizer=tok)  # eta > 0, no likelihood: the server's
    seen: list[dict] = []

    def reward(prompts, completions, completion_ids, **kwargs):
        caps = kwargs.get("attncap_attention")
        seen.append({
            "has_captures": caps is not None and len(caps) == len(completion_ids),
            "all_captured": caps is not None and all(isinstance(c, CapturedAttention) for c in caps),
            "tokens_match": caps is not None and all(
                list(c.token_ids) == [int(t) for t in ids] for c, ids in zip(caps, completion_ids)),
            "prompt_lens": [c.prompt_len for c in caps] if caps else [],
            "rows_sum": [float(np.abs(c.attention[..., :].sum(-1) - 1).max()) for c in caps] if caps else [],
        })
        lps, lp0s = kwargs.get("attncap_logprobs"), kwargs.get("attncap_prior_logprobs")
        seen[-1]["has_logprobs"] = lps is not None and lp0s is not None and len(lps) == len(lp0s) == len(completion_ids)
        if seen[-1]["has_logprobs"]:  # the server's log-probabilities after the prompt and after the empty conversation
            seen[-1]["lp_err"] = max(float(np.abs(np.asarray(lp) - _logprobs(server_model, c.prompt_token_ids, ids)).max())
                                     for lp, c, ids in zip(lps, caps, completion_ids))
            seen[-1]["prior_err"] = max(
                float(np.abs(np.asarray(lp0) - _logprobs(server_model, cagsr.prior_prompt_ids(p), ids)).max())
                for lp0, p, ids in zip(lp0s, prompts, completion_ids))
            # how far apart the two contexts put the log-probabilities (what the errors must stay well below)
            seen[-1]["context_gap"] = min(
                float(np.abs(_logprobs(server_model, c.prompt_token_ids, ids)
                             - _logprobs(server_model, cagsr.prior_prompt_ids(p), ids)).mean())
                for c, p, ids in zip(caps, prompts, completion_ids))
        out = cagsr(prompts, completions, completion_ids, **kwargs)
        seen[-1]["rewards"] = out
        return out

    reward.__name__ = "cagsr_from_server"
    args = GRPOConfig(
        output_dir=os.path.join(out_dir, "trainer"), per_device_train_batch_size=4, num_generations=2,
        max_completion_length=6, max_steps=2, use_vllm=False, use_cpu=True, report_to=[], logging_steps=1,
        save_strategy="no", learning_rate=1e-3, temperature=1.0, seed=0,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=[reward], args=args, processing_class=tok,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        rollout_func=attncap_server_rollout(base_url, reward=cagsr, sampling={"ignore_eos": True}),
    )
    trainer.train()
    logged = [h.get("rewards/cagsr_from_server/mean") for h in trainer.state.log_history
              if "rewards/cagsr_from_server/mean" in h]
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump({"seen": seen, "logged_rewards": logged, "global_step": trainer.state.global_step}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
