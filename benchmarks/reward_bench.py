"""Throughput of `score_turn` on one core: 1,000 turns of 64 generated tokens over a 1,024-token history.

Target: all 1,000 turns in <= 1 s. Run:  .venv/bin/python benchmarks/reward_bench.py

The reward is ``CAGSRConfig()``'s, grounding term included (eta = 4, 128 prior tokens): each turn carries synthetic log-probability
vectors (random, <= 0), since computing real ones is the scoring model's forward pass, not the reward's arithmetic.
"""

import os

# One core: pin every BLAS/OpenMP pool before numpy is imported.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cagsr_reward import CAGSRConfig, score_turn  # noqa: E402


def make_turns(num_turns: int, tokens: int, history: int, vocab: int, seed: int = 0):
    """Random but realistic turns: float32 rows with a heavy sink, some exact zeros, 5% salient positions; synthetic
    log-probabilities of the reply after its history and after the empty conversation (the grounding term)."""
    rng = np.random.default_rng(seed)
    turns = []
    for _ in range(num_turns):
        block = rng.dirichlet(np.full(history, 0.1), size=tokens).astype(np.float32) * np.float32(0.9)
        block[:, 0] += np.float32(0.05)  # a sink
        block[rng.random(block.shape) < 0.05] = 0.0
        salient = np.sort(rng.choice(history, size=history // 20, replace=False))
        history_ids = rng.integers(0, vocab, size=history)
        response_ids = rng.integers(0, vocab, size=tokens)
        response_ids[: tokens // 2] = history_ids[100 : 100 + tokens // 2]  # some copying from the history
        logprobs, prior_logprobs = -rng.exponential(2.0, size=tokens), -rng.exponential(3.0, size=tokens)
        turns.append((block, salient, response_ids, history_ids, logprobs, prior_logprobs))
    return turns


def run(num_turns: int, tokens: int, history: int, config: CAGSRConfig, repeats: int = 3) -> tuple[float, float]:
    """Best wall-clock and best CPU seconds over `repeats` passes (CPU time is immune to a busy machine)."""
    turns = make_turns(num_turns, tokens, history, vocab=50_000)
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for t, (block, salient, response_ids, history_ids, lp, lp0) in enumerate(turns):
            score_turn(block, salient, config, turn_index=t % 5, response_ids=response_ids,
                       history_ids=history_ids, sink=1, logprobs=lp, prior_logprobs=lp0)
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--history", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="best of N timed passes")
    args = parser.parse_args()
    config = CAGSRConfig()
    rows = [("multi, P=%d" % args.history, args.history, config),
            ("single, P=%d" % args.history, args.history, config.replace(mode="single")),
            ("multi, P=%d (elided)" % (2 * args.history), 2 * args.history, config)]
    print(f"score_turn throughput, {args.tokens} generated tokens per turn, 1 thread, best of {args.repeats}; "
          f"CAGSRConfig() (eta={config.eta}) with synthetic log-probabilities")
    print(f"load average before: {os.getloadavg()[0]:.2f} (a busy machine inflates wall-clock, not CPU time)")
    print(f"{'case':<26}{'turns':>7}{'seconds':>10}{'cpu s':>8}{'turns/s':>10}  target met (<= 1 s per 1,000 turns)")
    met_main = False
    for i, (name, history, cfg) in enumerate(rows):
        wall, cpu = run(args.turns, args.tokens, history, cfg, args.repeats)
        ok = wall * 1000 / args.turns <= 1.0
        if i == 0:
            met_main = ok
        print(f"{name:<26}{args.turns:>7}{wall:>10.3f}{cpu:>8.3f}{args.turns / wall:>10.0f}  {'yes' if ok else 'no'}")
    print("target: the first row (1,000 turns x 64 tokens over a 1,024-token history); 'seconds' is wall-clock")
    return 0 if met_main else 1


if __name__ == "__main__":
    raise SystemExit(main())
