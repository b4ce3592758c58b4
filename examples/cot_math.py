#!/usr/bin/env python
"""Chain-of-thought RL on CHAMP math problems with GRPO and the CAGSR-vLLM-MTC CoT reward (MTC §5.3).

The policy reasons briefly and ends with "The answer is ...". TRL's colocated vLLM engine (``CaptureGRPOTrainer``,
``attention_backend="attncap"``) captures each completion's attention while generating it; the reward cuts the
reasoning into blocks of 5 tokens, scores each block as a turn whose history is the problem plus every earlier
generated token, treats the final-answer span as the last turn with weight ``final_answer_weight`` (2.0), and sums
(``score_cot``). Each block's grounding term is scored by the starting policy, frozen (``HFLikelihood``), in training
and in the held-out metrics alike. By default the advantages are per block (``--no-block-advantages`` gives GRPO's one advantage per
completion): every token of block b gets (G_b - group mean of G at block b) / group std of the total.

The reward is self-supervised: answers are never used for training. Accuracy (exact match of the extracted
answer) and step overlap with the reference solution (ROUGE-L, token F1) are measured on held-out problems before and
after training, with greedy decoding.

    python examples/cot_math.py                               # bundled SmolLM2-135M-Instruct, CPU, a few minutes
    python examples/cot_math.py --steps 300 --batch-size 16 --device cuda --eval-problems 70
    python examples/cot_math.py --uniform-turn-weights        # an ablation (also --no-history-coverage, --no-entropy-floor)

Writes ``summary.json``, ``eval_before.json`` / ``eval_after.json`` (every problem: completion, extracted answer,
correctness, overlap, reward components) and ``reward_components.png`` into the run directory
(``runs/cot-math-<timestamp>`` by default).
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
    p.add_argument("--num-generations", type=int, default=4, help="completions per problem (GRPO group)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="reasoning + answer tokens (paper: ~20 reasoning)")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus; keep 1.0: with < 1 TRL's vLLM importance-sampling ratio is biased low (docs/experiments.md)")
    p.add_argument("--no-block-advantages", action="store_true", help="one advantage per completion (plain GRPO)")
    p.add_argument("--eval-problems", type=int, default=8, help="held-out problems evaluated before and after")
    p.add_argument("--eval-max-new-tokens", type=int, default=64)
    add_run_flags(p, "cot-math")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    from datasets import Dataset
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from cagsr_reward import CAGSRConfig
    from cagsr_reward.idf import IDFModel
    from cagsr_reward.integrations.cot import cot_dataset_rows, cot_reward_func, load_champ, split_problems
    from cagsr_reward.salient import SalientSelector
    from cagsr_reward.sources import HFLikelihood
    from vllm_attncap.rl.evaluation import evaluate_cot
    from vllm_attncap.rl.runs import config_from_flags, grpo_args, reward_history, start_run, write_json
    from vllm_attncap.rl.trainers import CaptureGRPOTrainer
    from vllm_attncap.viz import plot_reward_components

    run = start_run("cot-math", args)
    train_problems, held_out = split_problems(load_champ(), args.eval_problems, seed=args.seed)
    num_prompts = max(1, args.steps * args.batch_size // args.num_generations)
    rng = np.random.default_rng(args.seed)
    chosen = [train_problems[int(i)] for i in rng.choice(len(train_problems), size=num_prompts, replace=False)]
    rows = cot_dataset_rows(chosen)

    selector = SalientSelector(IDFModel.fit([p.question for p in train_problems]))
    config = config_from_flags(args, mode="cot")
    eval_config = CAGSRConfig(mode="cot")
    tokenizer = AutoTokenizer.from_pretrained(run.model)
    # the grounding term's scoring model: the starting policy, frozen (loaded on first use)
    scorer = HFLikelihood(run.model, tokenizer, device=args.device, dtype=args.dtype)
    reward = cot_reward_func(config, tokenizer=tokenizer, selector=selector, likelihood=scorer)
    trainer = CaptureGRPOTrainer(
        model=run.model,
        reward_funcs=[reward],
        args=grpo_args(run),
        train_dataset=Dataset.from_dict(rows),
        vllm_engine_kwargs={"dtype": args.dtype, "seed": args.seed},
        block_advantages=not args.no_block_advantages,
    )
    llm = trainer.attncap_llm.wrapped_llm
    eval_sp = SamplingParams(temperature=0.0, max_tokens=args.eval_max_new_tokens)

    def evaluate(tag: str) -> dict:
        t0 = time.perf_counter()
        result = evaluate_cot(llm, held_out, eval_config, selector=selector, sampling_params=eval_sp, likelihood=scorer)
        write_json(run.dir / f"eval_{tag}.json", result)
        s = result["summary"]
        run.log(
            f"held-out {tag}: accuracy={s['accuracy']:.3f} answered={s['answered']:.3f} "
            f"rouge_l={s['rouge_l']:.4f} token_f1={s['token_f1']:.4f} reward={s['reward']:.4f} "
            f"coverage={s['coverage']:.4f} focus={s['focus']:.4f} repetition={s['repetition']:.4f} "
            f"grounding={s['grounding']:.4f} ({time.perf_counter() - t0:.0f} s)"
        )
        return result

    before = evaluate("before")
    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train
    trainer.vllm_generation.sync_weights()
    after = evaluate("after")

    history = reward_history(trainer.state.log_history, reward.name)
    if history:
        plot_reward_components(history, out=run.dir / "reward_components.png", title="CoT GRPO: training batches")
    if args.save_model:
        trainer.save_model(str(run.dir / "policy"))
    summary = run.summary(
        train_config=config.to_dict(),
        eval_config=eval_config.to_dict(),
        capture_spec=trainer.attncap_spec,
        train_problems=[p.problem_id for p in chosen],
        held_out_problems=[p.problem_id for p in held_out],
        train_history=history,
        eval_before=before["summary"],
        eval_after=after["summary"],
        train_seconds=train_s,
    )
    write_json(run.dir / "summary.json", summary)
    run.log(f"wrote {run.dir / 'summary.json'} ({summary['total_seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
