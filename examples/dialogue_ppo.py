#!/usr/bin/env python
"""Multi-turn dialogue RL with PPO over turns (MTC §4): vLLM+attncap rollouts against a user simulator, returns G_t
from the CAGSR turn rewards, a value head V(H_t), clipped PPO (epsilon 0.2, 3 epochs per batch), and the updated
policy loaded into the engine after every update.

Each update plays ``--batch-size`` episodes (3-5 user turns each, from chitchat-dataset / chatterbot tech_support)
against the policy; every assistant turn is sampled (temperature 0.8, top-p 0.95) and its attention over the
history captured while it is generated. The turn reward's grounding term is scored by the starting policy, frozen
(``HFLikelihood``), in training and in the held-out metrics alike. See cagsr_reward/integrations/ppo.py for the
algorithm.

    python examples/dialogue_ppo.py                        # bundled SmolLM2-135M-Instruct, CPU, a few minutes
    python examples/dialogue_ppo.py --steps 500 --batch-size 16 --device cuda --eval-episodes 64
    python examples/dialogue_ppo.py --no-entropy-floor     # an ablation (also --no-history-coverage, --uniform-turn-weights)

Writes to the run directory (``runs/dialogue-ppo-<timestamp>`` by default): ``summary.json``, ``eval_before.json`` /
``eval_after.json``, ``reward_components.png`` (per-update rollout reward components and losses) and
``turn_rewards_before.png`` / ``turn_rewards_after.png``.
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    from vllm_attncap.rl.runs import add_run_flags

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2, help="PPO updates")
    p.add_argument("--batch-size", type=int, default=1, help="episodes (dialogues) rolled out per update")
    p.add_argument("--minibatch-size", type=int, default=4, help="turns per gradient step")
    p.add_argument("--ppo-epochs", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens per assistant turn (paper: <= 64)")
    p.add_argument("--max-turn-chars", type=int, default=120,
                   help="use dialogues whose user turns are at most this long (0: no limit)")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--value-learning-rate", type=float, default=1e-3)
    p.add_argument("--normalize-advantages", action=argparse.BooleanOptionalAction, default=True,
                   help="standardise A_t over each batch (default on; --no-normalize-advantages for raw G_t - V)")
    p.add_argument("--sources", default="chitchat,tech_support", help="user-simulator sources, comma-separated")
    p.add_argument("--eval-episodes", type=int, default=4)
    p.add_argument("--eval-max-new-tokens", type=int, default=32)
    p.add_argument("--no-consistency", action="store_true")
    add_run_flags(p, "dialogue-ppo")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm
    from vllm import SamplingParams

    from cagsr_reward import CAGSRConfig
    from cagsr_reward.idf import IDFModel
    from cagsr_reward.integrations.embedding import SentenceEmbedder
    from cagsr_reward.integrations.ppo import PPOConfig
    from cagsr_reward.integrations.user_sim import UserSimulator
    from cagsr_reward.salient import SalientSelector
    from cagsr_reward.sources import HFLikelihood
    from vllm_attncap.rl.evaluation import evaluate_dialogues
    from vllm_attncap.rl.ppo import TurnPPOTrainer
    from vllm_attncap.rl.runs import config_from_flags, start_run, write_json
    from vllm_attncap.viz import plot_reward_components, plot_turn_rewards

    run = start_run("dialogue-ppo", args)
    sim = UserSimulator.from_sources(
        args.sources.split(","), seed=args.seed, limit_per_source=1000, max_turn_chars=args.max_turn_chars or None
    )
    train_sim, held_out = sim.split(args.eval_episodes, seed=args.seed)
    # method.md "Salient positions": IDF over the training dialogues' user turns
    selector = SalientSelector(IDFModel.fit([" ".join(e.user_turns) for e in train_sim.episodes]))
    config = config_from_flags(args)
    eval_config = CAGSRConfig()
    ppo_config = PPOConfig(
        learning_rate=args.learning_rate,
        value_learning_rate=args.value_learning_rate,
        ppo_epochs=args.ppo_epochs,
        minibatch_size=args.minibatch_size,
        episodes_per_update=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        normalize_advantages=args.normalize_advantages,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        seed=args.seed,
    )
    # the grounding term's scoring model: the starting policy, frozen (loaded on first use)
    scorer = HFLikelihood(run.model, device=args.device, dtype=args.dtype)
    trainer = TurnPPOTrainer(run.model, train_sim, config, selector=selector, config=ppo_config, likelihood=scorer)
    embedder = None if args.no_consistency else SentenceEmbedder()
    eval_sp = SamplingParams(temperature=0.0, max_tokens=args.eval_max_new_tokens)

    def evaluate(tag: str) -> dict:
        t0 = time.perf_counter()
        result = evaluate_dialogues(
            trainer.llm, held_out.episodes, eval_config, selector=selector, sampling_params=eval_sp,
            embedder=embedder, consistency=not args.no_consistency, likelihood=scorer,
        )
        write_json(run.dir / f"eval_{tag}.json", result)
        plot_turn_rewards(result["per_turn_index"], run.dir / f"turn_rewards_{tag}.png", title=f"held-out, {tag} training")
        s = result["summary"]
        run.log(
            f"held-out {tag}: reward={s['reward']:.4f} coverage={s['coverage']:.4f} "
            f"focus={s['focus']:.4f} repetition={s['repetition']:.4f} grounding={s['grounding']:.4f} "
            f"consistency={s['consistency']:.4f} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        return result

    before = evaluate("before")
    t_train = time.perf_counter()
    bar = tqdm(total=args.steps, desc="PPO updates", unit="update")

    def log(stats: dict) -> None:
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward']:.3f}", cov=f"{stats['coverage']:.3f}", pl=f"{stats['policy_loss']:.3f}",
                        vl=f"{stats['value_loss']:.3f}")
        tqdm.write(
            "[dialogue-ppo] update {step}: reward={reward:.4f} coverage={coverage:.4f} focus={focus:.4f} "
            "repetition={repetition:.4f} grounding={grounding:.4f} G0={return_0:.4f} policy_loss={policy_loss:.4f} "
            "value_loss={value_loss:.4f} "
            "clip={clip_fraction:.3f} kl={approx_kl:.4f}".format(**stats)
        )

    history = trainer.train(args.steps, callback=log)
    bar.close()
    train_s = time.perf_counter() - t_train
    after = evaluate("after")  # the engine already holds the final policy (synced after every update)

    plot_reward_components(
        [{k: h[k] for k in ("step", "reward", "coverage", "focus", "repetition", "grounding", "policy_loss", "value_loss")}
         for h in history],
        out=run.dir / "reward_components.png",
        title="dialogue PPO: rollouts per update",
    )
    if args.save_model:
        trainer.unwrapped_policy.save_pretrained(run.dir / "policy")
        trainer.tokenizer.save_pretrained(run.dir / "policy")
    summary = run.summary(
        train_config=config.to_dict(),
        eval_config=eval_config.to_dict(),
        ppo_config=vars(ppo_config),
        capture_spec=trainer.capture_spec,
        held_out_episodes=[e.episode_id for e in held_out.episodes],
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
