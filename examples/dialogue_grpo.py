#!/usr/bin/env python
"""Multi-turn dialogue RL with GRPO, TRL's colocated vLLM and the CAGSR reward on attention captured during generation.

Each training prompt is a real dialogue history (chitchat-dataset / chatterbot tech_support, through the user
simulator) cut at a user turn, with the recorded replies as the assistant's earlier turns; the policy writes the next
assistant turn. TRL generates with its colocated vLLM engine, built by ``CaptureGRPOTrainer`` with
``attention_backend="attncap"``; every completion's attention over its history reaches the reward function
(``attncap_attention``), which scores R_t = alpha*C + beta*F - gamma*rep + eta*G with the turn index = assistant
turns already in the history (so the entropy floor rises along the dialogue). No second forward pass for the
attention; the grounding G (the reply's mean per-token log-probability ratio with and without its history) is scored
by the starting policy, frozen (``HFLikelihood``: a yardstick that training does not move), for the training
reward and the held-out metrics alike.

Before and after training the policy plays held-out episodes with the user simulator (greedy) and the harness
(vllm_attncap.rl.evaluation) reports reward components under the full (non-ablated) reward and reply/history consistency.

    python examples/dialogue_grpo.py                       # bundled SmolLM2-135M-Instruct, CPU, a few minutes
    python examples/dialogue_grpo.py --steps 200 --batch-size 16 --device cuda --eval-episodes 64
    python examples/dialogue_grpo.py --no-history-coverage # an ablation (also --no-entropy-floor, --uniform-turn-weights)

Writes to the run directory (``runs/dialogue-grpo-<timestamp>`` by default): ``summary.json`` (arguments, configs,
timings, train history, held-out summaries before/after), ``eval_before.json`` / ``eval_after.json`` (every dialogue),
``reward_components.png`` (training curve) and ``turn_rewards_before.png`` / ``turn_rewards_after.png``.
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    from vllm_attncap.rl.runs import add_run_flags

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="GRPO optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="completions per step (per device)")
    p.add_argument("--num-generations", type=int, default=4, help="completions per prompt (GRPO group)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens per assistant turn (paper: <= 64)")
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="skip training histories longer than this")
    p.add_argument("--max-turn-chars", type=int, default=120,
                   help="use dialogues whose user turns are at most this long (0: no limit)")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus; keep 1.0: with < 1 TRL's vLLM importance-sampling ratio is biased low (docs/experiments.md)")
    p.add_argument("--sources", default="chitchat,tech_support", help="user-simulator sources, comma-separated")
    p.add_argument("--eval-episodes", type=int, default=4, help="held-out dialogues evaluated before and after")
    p.add_argument("--eval-max-new-tokens", type=int, default=32)
    p.add_argument("--no-consistency", action="store_true", help="skip the sentence-embedding consistency metric")
    add_run_flags(p, "dialogue-grpo")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    from datasets import Dataset
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from cagsr_reward import CAGSRConfig
    from cagsr_reward.idf import IDFModel
    from cagsr_reward.integrations.embedding import SentenceEmbedder
    from cagsr_reward.integrations.trl import cagsr_reward_func
    from cagsr_reward.integrations.user_sim import UserSimulator
    from cagsr_reward.salient import SalientSelector
    from cagsr_reward.sources import HFLikelihood
    from vllm_attncap.rl.evaluation import evaluate_dialogues
    from vllm_attncap.rl.runs import config_from_flags, grpo_args, reward_history, start_run, write_json
    from vllm_attncap.rl.trainers import CaptureGRPOTrainer
    from vllm_attncap.viz import plot_reward_components, plot_turn_rewards

    run = start_run("dialogue-grpo", args)
    sim = UserSimulator.from_sources(
        args.sources.split(","), seed=args.seed, limit_per_source=1000, max_turn_chars=args.max_turn_chars or None
    )
    train_sim, held_out = sim.split(args.eval_episodes, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(run.model)
    rng = np.random.default_rng(args.seed)
    num_prompts = max(1, args.steps * args.batch_size // args.num_generations)
    prompts = []  # a recorded history cut at a random user turn; the policy writes the next assistant turn
    for ep in train_sim.sample(len(train_sim.episodes)):
        prompt = UserSimulator.reference_prefix(ep, int(rng.integers(ep.num_turns)))
        rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) <= args.max_prompt_tokens:
            prompts.append(prompt)
        if len(prompts) == num_prompts:
            break

    # method.md "Salient positions": IDF fitted on the training data (the user turns of every training dialogue,
    # as in dialogue_ppo.py; the handful of prompts one CPU run samples would be a degenerate corpus)
    selector = SalientSelector(IDFModel.fit([" ".join(e.user_turns) for e in train_sim.episodes]))
    config = config_from_flags(args)
    eval_config = CAGSRConfig()  # held-out metrics always under the full reward, so ablated runs compare
    # the grounding term's scoring model: the starting policy, frozen (loaded on first use)
    scorer = HFLikelihood(run.model, tokenizer, device=args.device, dtype=args.dtype)
    reward = cagsr_reward_func(config, tokenizer=tokenizer, selector=selector, likelihood=scorer)
    trainer = CaptureGRPOTrainer(
        model=run.model,
        reward_funcs=[reward],
        args=grpo_args(run),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        vllm_engine_kwargs={"dtype": args.dtype, "seed": args.seed},
    )
    llm = trainer.attncap_llm.wrapped_llm
    embedder = None if args.no_consistency else SentenceEmbedder()
    eval_sp = SamplingParams(temperature=0.0, max_tokens=args.eval_max_new_tokens)

    def evaluate(tag: str) -> dict:
        t0 = time.perf_counter()
        result = evaluate_dialogues(
            llm, held_out.episodes, eval_config, selector=selector, sampling_params=eval_sp,
            embedder=embedder, consistency=not args.no_consistency, likelihood=scorer,
        )
        write_json(run.dir / f"eval_{tag}.json", result)
        plot_turn_rewards(result["per_turn_index"], run.dir / f"turn_rewards_{tag}.png", title=f"held-out, {tag} training")
        run.log(f"held-out {tag}: {_fmt(result['summary'])} ({time.perf_counter() - t0:.0f} s)")
        return result

    before = evaluate("before")
    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train
    trainer.vllm_generation.sync_weights()  # the engine serves the final policy for the evaluation
    after = evaluate("after")

    history = reward_history(trainer.state.log_history, reward.name)
    if history:
        plot_reward_components(history, out=run.dir / "reward_components.png", title="dialogue GRPO: training batches")
    if args.save_model:
        trainer.save_model(str(run.dir / "policy"))
    summary = run.summary(
        train_config=config.to_dict(),
        eval_config=eval_config.to_dict(),
        capture_spec=trainer.attncap_spec,
        num_train_prompts=len(prompts),
        held_out_episodes=[e.episode_id for e in held_out.episodes],
        train_history=history,
        eval_before=before["summary"],
        eval_after=after["summary"],
        train_seconds=train_s,
    )
    write_json(run.dir / "summary.json", summary)
    run.log(f"wrote {run.dir / 'summary.json'} ({summary['total_seconds']:.0f} s in all)")
    return 0


def _fmt(summary: dict) -> str:
    keys = ("reward", "coverage", "focus", "repetition", "grounding", "consistency", "total", "accuracy", "rouge_l")
    return ", ".join(f"{k}={summary[k]:.4f}" for k in keys if isinstance(summary.get(k), float))


if __name__ == "__main__":
    sys.exit(main())
