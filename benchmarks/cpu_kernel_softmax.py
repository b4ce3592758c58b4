"""The CPU capture kernel's vectorised softmax against its general path, side by side in one run.

One layer of SmolLM2-135M's shape (9 query heads, 3 KV heads, head size 64) for ``--batch`` decode rows over
contexts of ``--ctx`` keys, stats mode and rows mode (``reduce="none"``). The general path (soft-cap / ALiBi /
sliding window, scalar ``std::exp``) is forced with a sliding window wider than the context, which masks nothing,
so both compute the same values; the ratio is general / vectorised (> 1: the vectorised path is faster).

    python benchmarks/cpu_kernel_softmax.py [--ctx 288 1056] [--batch 1 8] [--iters 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_attncap.engine.cpu import kernels as cpu_kernels  # noqa: E402

H, HKV, D, BS = 9, 3, 64, 16


def _setup(batch: int, ctx: int, mode: str):
    g = torch.Generator().manual_seed(0)
    blocks = -(-ctx // BS)
    store = torch.randn(batch * blocks * BS, HKV, D, generator=g)
    bt = torch.arange(batch * blocks, dtype=torch.int32).reshape(batch, blocks)
    q = torch.randn(batch, H, D, generator=g)
    reqs = []
    for i in range(batch):
        out = np.zeros((H, 1, 1, ctx) if mode == "rows" else (2, 1, H, 1), np.float32)
        if mode == "rows":
            out = np.zeros((1, H, 1, ctx), np.float32)
        reqs.append(cpu_kernels.KernelRequest(
            batch_row=i, q_rows=[i], q_pos=[ctx - 1], rows=[0], ctx_len=ctx, heads=list(range(H)), mode=mode,
            reduce="none", out=out, layer_slot={0: 0}, history_len=ctx - 1, sink=0, salient=[1, 2, 3],
            first_layer=0, last_layer=0))
    return cpu_kernels.build_tables(reqs, 1), q, store, bt, reqs


def _time(fn, iters: int) -> float:
    for _ in range(20):
        fn()
    best = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best.append((time.perf_counter() - t0) / iters)
    return sorted(best)[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, nargs="+", default=[288, 1056])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args(argv)
    if not cpu_kernels.available():
        print("the CPU capture kernel is not built")
        return 1
    print(f"threads: {cpu_kernels._ext.num_threads()}")
    print("| mode | batch | ctx | vectorised us | general us | general / vectorised | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("stats", "rows"):
        for b in args.batch:
            for c in args.ctx:
                tables, q, store, bt, reqs = _setup(b, c, mode)
                outs = {}
                times = {}
                for name, window in (("vec", -1), ("gen", 10 * c)):
                    def run(window=window):
                        cpu_kernels.capture_layer(tables, 0, q, store, bt, BS, scale=0.125, sliding_window=window)
                    times[name] = _time(run, args.iters)
                    outs[name] = [r.out.copy() for r in reqs]
                diff = max(float(np.nanmax(np.abs(a - b_))) for a, b_ in zip(outs["vec"], outs["gen"]))
                print(f"| {mode} | {b} | {c} | {times['vec'] * 1e6:.1f} | {times['gen'] * 1e6:.1f} | "
                      f"{times['gen'] / times['vec']:.2f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
