"""What top-k capture costs in the CPU capture kernel, side by side with head-mean rows and stats, in one run.

One decode step of one layer of SmolLM2-135M's shape (9 query heads, 3 KV heads, head size 64, bf16 shadow keys) at
the four cells of ``benchmarks/cpu_capture.py`` (batch 1 and 8, prompts of 256 and 1024 tokens; the context is taken
mid-generation, prompt + 16 keys), every request of the step capturing the same spec:

- ``rows-hm``: head-mean rows (what ``{"layers": [-1], "reduce": "head_mean"}`` costs per layer and step);
- ``topk-hm``: the top-32 keys of that head-mean row (``"topk": 32``);
- ``stats``: per-head coverage / entropy (``{"mode": "stats"}``);
- ``topk``: the top-32 keys of every head (``{"topk": 32}``);
- ``rows``: every head's row (``{}``).

Each mode is one call of ``engine.cpu.kernels.capture_layer`` (the kernel the CPU backend runs per layer and step).
The modes are timed round-robin, ``--rounds`` rounds of ``--iters`` calls each, so load from other processes falls
on all of them alike; reported: the median per call over the rounds, and the median over the rounds of each round's
ratio to ``rows-hm`` and to ``stats`` (adjacent timings, so a slow stretch of the machine cancels out).
This is the capture kernel alone, not a whole engine step (docs/performance.md).

    python benchmarks/cpu_topk_kernel.py [--rounds 7] [--iters 40] [--k 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_state  # noqa: E402  (benchmarks/_machine.py, beside this script)
from vllm_attncap.engine.cpu import kernels as cpu_kernels  # noqa: E402

H, HKV, D, BS = 9, 3, 64, 16
CELLS = [(1, 256), (1, 1024), (8, 256), (8, 1024)]
MODES = ["rows-hm", "topk-hm", "stats", "topk", "rows"]


def _spec(mode: str, k: int) -> tuple[str, str]:
    return {"rows-hm": ("rows", "head_mean"), "topk-hm": ("topk", "head_mean"), "stats": ("stats", "none"),
            "topk": ("topk", "none"), "rows": ("rows", "none")}[mode]


def _setup(batch: int, ctx: int, mode: str, k: int, store, bt, blocks):
    kind, reduce = _spec(mode, k)
    h_out = 1 if reduce == "head_mean" else H
    reqs = []
    for i in range(batch):
        if kind == "rows":
            out = np.zeros((1, h_out, 1, ctx), np.float32)
        elif kind == "topk":
            out = np.zeros((2, 1, h_out, 1, k), np.float32)
        else:
            out = np.zeros((2, 1, H, 1), np.float32)
        reqs.append(cpu_kernels.KernelRequest(
            batch_row=i, q_rows=[i], q_pos=[ctx - 1], rows=[0], ctx_len=ctx, heads=list(range(H)), mode=kind,
            reduce=reduce, out=out, layer_slot={0: 0}, history_len=ctx - 17, sink=0, salient=[1, 2, 3],
            first_layer=0, last_layer=0, topk=k if kind == "topk" else 0))
    return cpu_kernels.build_tables(reqs, 1), reqs


def _out_bytes(mode: str, ctx: int, k: int) -> int:
    """Bytes one captured token adds to the request's capture for this layer."""
    kind, reduce = _spec(mode, k)
    h_out = 1 if reduce == "head_mean" else H
    return {"rows": 4 * h_out * ctx, "topk": 8 * h_out * k, "stats": 8 * H}[kind]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.iters < 1:
        ap.error("--rounds and --iters must be >= 1")
    if not cpu_kernels.available():
        print("the CPU capture kernel is not built (python setup.py build_ext --inplace)")
        return 1
    state = machine_state()
    flags = set(state.get("Flags", "").split())
    print(f"lscpu: {state.get('Model name')}; avx512f={'avx512f' in flags} avx2={'avx2' in flags}; "
          f"load average {state['loadavg_1_5_15']}; kernel threads {cpu_kernels._ext.num_threads()}", flush=True)
    results = {}
    t_start = time.perf_counter()
    for batch, prompt in CELLS:
        ctx = prompt + 16
        g = torch.Generator().manual_seed(batch * 100000 + ctx)
        blocks = -(-ctx // BS)
        store = torch.randn(batch * blocks * BS, HKV, D, generator=g).to(torch.bfloat16)
        bt = torch.arange(batch * blocks, dtype=torch.int32).reshape(batch, blocks)
        q = torch.randn(batch, H, D, generator=g)
        setups = {m: _setup(batch, ctx, m, args.k, store, bt, blocks) for m in MODES}

        def call(m):
            cpu_kernels.capture_layer(setups[m][0], 0, q, store, bt, BS, scale=0.125)

        for m in MODES:  # warm-up, and a check that each wrote something
            for _ in range(5):
                call(m)
            assert any(np.abs(r.out).sum() > 0 for r in setups[m][1]), m
        per_round = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for m in MODES:
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    call(m)
                per_round[m].append((time.perf_counter() - t0) / args.iters)
        cell = f"b={batch} p={prompt}"
        results[cell] = {m: {"median_us": statistics.median(v) * 1e6, "rounds_us": [x * 1e6 for x in v],
                             "bytes_per_token": _out_bytes(m, ctx, args.k)} for m, v in per_round.items()}
        print(f"{cell} (ctx {ctx}): " + ", ".join(f"{m} {results[cell][m]['median_us']:.1f} us" for m in MODES),
              flush=True)
    print(f"\nmedian us per call (one layer, one decode step), median per-round ratio to rows-hm / to stats; bytes "
          f"per token and layer; {time.perf_counter() - t_start:.0f} s\n")
    print("| capture | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for m in MODES:
        parts = []
        for cell, r in results.items():
            mine = r[m]["rounds_us"]
            to_hm = statistics.median(a / b for a, b in zip(mine, r["rows-hm"]["rounds_us"]))
            to_st = statistics.median(a / b for a, b in zip(mine, r["stats"]["rounds_us"]))
            r[m]["ratio_to_rows_hm"], r[m]["ratio_to_stats"] = to_hm, to_st
            parts.append(f"{r[m]['median_us']:.1f} us ({to_hm:.2f}× / {to_st:.2f}×), {r[m]['bytes_per_token']} B")
        print(f"| {m} | " + " | ".join(parts) + " |")
    state["loadavg_after"] = list(os.getloadavg())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"k": args.k, "rounds": args.rounds, "iters": args.iters,
                                               "results": results, "machine": state}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
