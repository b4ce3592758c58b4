"""TRL training runs with capture, one per process (TRL colocate mode sets up torch.distributed and accelerate state
for the whole process, so each run gets a fresh interpreter). Writes what it measured to OUT_DIR/result.json.

Usage: python trl_capture_runs.py {grpo,rloo,grpo_block} MODEL_DIR OUT_DIR
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


def _prompt_ids(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _prior_ids(tok, messages):
    """The empty conversation, by hand: what add_generation_prompt=True adds to the rendered chat."""
    full = _prompt_ids(tok, messages)
    head = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False),
               add_special_tokens=False)["input_ids"]
    assert full[: len(head)] == head
    return full[len(head):]


def _logprobs(model, context, ids):
    """log p(ids[s] | context, ids[:s]) from one full forward of a Hugging Face model."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([list(context) + list(ids)])).logits[0].double(), -1)
    return np.array([float(logp[len(context) - 1 + s, t]) for s, t in enumerate(ids)])


def _grpo_args(out_dir, **kw):
    from trl import GRPOConfig

    base = dict(
        output_dir=os.path.join(out_dir, "trainer"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        use_vllm=True,
        vllm_mode="colocate",
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        vllm_max_model_length=256,
        learning_rate=5e-2,
        temperature=1.0,
        seed=0,
    )
    base.update(kw)
    return GRPOConfig(**base)


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS * 4})


def grpo(model_dir: str, out_dir: str) -> dict:
    """2 GRPO steps; the spy compares each capture with eager attention of the policy at generation time."""
    import torch
    from rl_utils import eager_rows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cagsr_reward import CAGSRConfig
    from cagsr_reward.integrations.trl import cagsr_reward_func
    from vllm_attncap.rl.engine_weights import engine_weight_mismatch
    from vllm_attncap.rl.trainers import CaptureGRPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    holder: dict = {}
    seen: list[dict] = []

    def spy(prompts, completions, completion_ids, attncap_attention=None, attncap_logprobs=None,
            attncap_prior_logprobs=None, **kwargs):
        # the policy right now is the one the engine generated this batch with (synced at the start of the step)
        reference.load_state_dict(holder["trainer"].model.state_dict())
        seen.append({"batch": len(completion_ids), "entries": None if attncap_attention is None else len(attncap_attention),
                     "logprob_entries": None if attncap_logprobs is None else len(attncap_logprobs)})
        for i, (prompt, ids, entry) in enumerate(zip(prompts, completion_ids, attncap_attention or [])):
            p_ids = _prompt_ids(tok, prompt)
            now = eager_rows(reference, p_ids, ids)[-1].mean(0)
            first = eager_rows(initial, p_ids, ids)[-1].mean(0)
            # the engine's log-probabilities of the grounding term (the CAGSR reward has eta > 0 and no likelihood):
            # the current policy's, after the prompt and after the empty conversation
            lp_err = float(np.abs(np.asarray(attncap_logprobs[i]) - _logprobs(reference, p_ids, ids)).max())
            prior_err = float(np.abs(np.asarray(attncap_prior_logprobs[i])
                                     - _logprobs(reference, _prior_ids(tok, prompt), ids)).max())
            seen.append(
                {
                    "shape": list(entry.attention.shape),
                    "P": len(p_ids),
                    "T": len(ids),
                    "prompt_len": entry.prompt_len,
                    "layer_ids": list(entry.layer_ids),
                    "token_ids_match": list(entry.token_ids) == [int(t) for t in ids],
                    "err_now": float(np.abs(entry.attention[0, 0] - now).max()),
                    "err_initial": float(np.abs(entry.attention[0, 0] - first).max()),
                    "lp_err": lp_err,
                    "prior_err": prior_err,
                }
            )
        return [0.0] * len(completion_ids)

    cagsr = cagsr_reward_func(CAGSRConfig(layers=(-1,)), tokenizer=tok)  # eta > 0, no likelihood: the engine's
    trainer = CaptureGRPOTrainer(
        model=model_dir,
        reward_funcs=[cagsr, spy],
        args=_grpo_args(out_dir),
        train_dataset=_dataset(),
        vllm_engine_kwargs={"dtype": "float32"},
    )
    holder["trainer"] = trainer
    spec = trainer.attncap_spec
    trainer.train()
    llm = trainer.vllm_generation.llm
    stale = engine_weight_mismatch(llm, trainer.model)  # the last optimizer step came after the last sync
    trainer.vllm_generation.sync_weights()  # TRL's path (model.load_weights per parameter) + repack
    synced = engine_weight_mismatch(llm, trainer.model)
    # behaviour, not only tensors: the engine's next-token log-probs equal the trained policy's
    from vllm import SamplingParams

    ids = _prompt_ids(tok, PROMPTS[0])
    # temperature 1: TRL builds the engine with logprobs_mode="processed_logprobs" (after temperature scaling)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=1.0, logprobs=3), use_tqdm=False)
    lp = out[0].outputs[0].logprobs[0]
    reference.load_state_dict(trainer.model.state_dict())  # a plain HF model holding the trained weights
    with torch.no_grad():
        ref = torch.log_softmax(reference(torch.tensor([ids])).logits[0, -1].float(), -1)
    logprob_err = max(abs(v.logprob - ref[k].item()) for k, v in lp.items())
    logs = [h for h in trainer.state.log_history if "cagsr/coverage" in h]
    return {
        "eta": cagsr.config.eta,
        "logged_grounding": [h["cagsr/grounding"] for h in logs],
        "spec": spec,
        "seen": seen,
        "stale": stale,
        "synced": synced,
        "logprob_err": logprob_err,
        "logged_rewards": [h["cagsr/reward"] for h in logs],
    }


def rloo(model_dir: str, out_dir: str) -> dict:
    from transformers import AutoTokenizer
    from trl import RLOOConfig

    from cagsr_reward import CAGSRConfig
    from cagsr_reward.integrations.trl import cagsr_reward_func
    from vllm_attncap.rl.trainers import CaptureRLOOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    seen = []

    def spy(prompts, completions, completion_ids, attncap_attention=None, attncap_logprobs=None,
            attncap_prior_logprobs=None, **kwargs):
        for i, (prompt, ids, entry) in enumerate(zip(prompts, completion_ids, attncap_attention)):
            P = len(_prompt_ids(tok, prompt))
            seen.append(list(entry.attention.shape) == [1, 1, len(ids), P + len(ids) - 1]
                        and len(attncap_logprobs[i]) == len(attncap_prior_logprobs[i]) == len(ids))
        return [float(len(i)) for i in completion_ids]

    args = RLOOConfig(
        output_dir=os.path.join(out_dir, "trainer"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        use_vllm=True,
        vllm_mode="colocate",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        vllm_max_model_length=256,
    )
    trainer = CaptureRLOOTrainer(
        model=model_dir,
        reward_funcs=[spy, cagsr_reward_func(CAGSRConfig(layers=(-1,)), tokenizer=tok)],
        args=args,
        train_dataset=_dataset(),
    )
    trainer.train()
    return {"seen": seen}


def grpo_block(model_dir: str, out_dir: str) -> dict:
    from transformers import AutoTokenizer

    from cagsr_reward import CAGSRConfig
    from cagsr_reward.integrations.trl import cagsr_reward_func
    from vllm_attncap.rl.trainers import CaptureGRPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    reward = cagsr_reward_func(CAGSRConfig(mode="cot", cot_block=5), tokenizer=tok)
    captured: dict = {}

    class Probe(CaptureGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            captured["adv"] = out["advantages"].tolist()
            captured["spans"] = [[list(s) for s in score.spans] for score in self.reward_funcs[0].last_scores]
            captured["returns"] = [score.returns.tolist() for score in self.reward_funcs[0].last_scores]
            return out

    trainer = Probe(
        model=model_dir,
        reward_funcs=[reward],
        args=_grpo_args(out_dir, max_steps=1, max_completion_length=12),
        train_dataset=_dataset(),
        block_advantages=True,
    )
    trainer.train()
    return captured


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    scenario, model_dir, out_dir = sys.argv[1:4]
    result = {"grpo": grpo, "rloo": rloo, "grpo_block": grpo_block}[scenario](model_dir, out_dir)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f)
