"""Pipeline check for the training grid: can its GRPO budget move a reward that is trivially learnable?

    python -m experiments.length_sanity [--out experiments/results/training/diagnostics/length_s0.json]

The reward is ``-|words - 6|`` of each completion (short replies win); everything else is a grid unit's
(:func:`experiments.training.train_arm`, the "full" budget, seed 0, the same prompts and held-out items). If this
reward moves the held-out reply length and the n-gram positive control does not, the budget works and the n-gram
signal is what is weak. Not a unit of the grid; its result is read by hand (docs/experiments.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from . import training as T

TARGET_WORDS = 6


def _length(ctx: T.Context, seed: int):
    def length(prompts, completions, **kwargs):
        return [-abs(len(T._completion_text(c).split()) - TARGET_WORDS) for c in completions]

    length.__name__ = "length"
    return length, {"kind": "length", "target_words": TARGET_WORDS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(T.RESULTS / "diagnostics" / "length_s0.json"))
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm_attncap.default_model import default_model_path

    ctx = T.Context(args.model or default_model_path(), "full", Path(args.out).parent)
    t0 = time.perf_counter()
    res = T.train_arm(ctx, T.Arm("length", f"sanity: -|words - {TARGET_WORDS}|", _length), 0)
    res["wall_seconds"] = time.perf_counter() - t0
    res["budget"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ctx.s.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res))
    print(f"wrote {args.out} ({res['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
