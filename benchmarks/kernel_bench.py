"""Capture-kernel and copy benchmark (GPU only).

For one decode step of a batch (every request's newest row, all heads, all
layers) it times

- the CUDA probabilities kernel (``vllm_attncap.engine.cuda.kernels.paged_attention_probs``)
  against the torch reference the CPU path uses (``reference.gather_keys`` +
  ``reference.attention_probs`` per request and layer), and
- moving that step's rows (float32, ``L x B x H x width``) to pinned host
  memory: ``AsyncCopier`` (side stream) against a plain
  ``host.copy_(dev, non_blocking=True)`` + synchronise on the compute stream,
  both as achieved bandwidth, and the step time when the copy of step t
  overlaps the kernels of step t+1 (copier) or follows them (plain copy).

Shapes: SmolLM2-135M (30 layers, 9 q / 3 kv heads, head dim 64) and a 1B
llama-like model (16 layers, 32 q / 8 kv heads, head dim 64); batch 1 and 16;
contexts 512+64 and 2048+64 (prompt + generated tokens).

    python benchmarks/kernel_bench.py            # full table
    python benchmarks/kernel_bench.py --quick    # fewer iterations
    python benchmarks/kernel_bench.py --decode   # the fused decode-capture kernel of full graphs (below)

``--decode`` times, per decode step (all layers, replayed as one CUDA graph like vLLM's full decode graph), the
fused kernel (``compute.cuda.DecodeCapture``) with every row capturing per-head statistics, with every row
capturing last-layer head-mean rows only, and with every row off (what an engine pays when nobody captures),
next to the eager kernel path for the same statistics (``paged_attention_probs`` + ``history_stats`` per layer).

Random weights and keys: the kernels' cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "smollm2-135m": dict(layers=30, heads=9, kv_heads=3, head_dim=64),
    "llama-1b": dict(layers=16, heads=32, kv_heads=8, head_dim=64),
}
BATCHES = (1, 16)
CONTEXTS = ((512, 64), (2048, 64))
BLOCK_SIZE = 16


def cuda_ms(fn, iters: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` measured with CUDA events (host overhead included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_ms(fn, iters: int, warmup: int) -> float:
    """Median wall-clock milliseconds of ``fn()`` followed by a device synchronise."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def steps_ms(step, finish, steps: int, warmup: int) -> float:
    """Milliseconds per step of ``steps`` consecutive calls of ``step`` (then ``finish`` and a synchronise)."""
    for _ in range(warmup):
        step()
    finish()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    finish()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / steps


class Workload:
    """Paged key caches (one per layer), block tables and each request's newest row."""

    def __init__(self, shape: dict, batch: int, prompt: int, gen: int, dtype=torch.bfloat16):
        self.L, self.H, self.H_kv, self.D = shape["layers"], shape["heads"], shape["kv_heads"], shape["head_dim"]
        self.B = batch
        self.ctx = prompt + gen - 1  # keys present at the step that produces the last token
        self.width = prompt + gen - 1  # capture row width P + T - 1
        dev = torch.device("cuda")
        blocks_per_req = -(-self.ctx // BLOCK_SIZE)
        self.num_blocks = blocks_per_req * batch + 8
        # vLLM 0.23-0.25 layout: [num_blocks, 2, block_size, H_kv, D], keys = unbind(1)[0]
        self.kv = [torch.randn(self.num_blocks, 2, BLOCK_SIZE, self.H_kv, self.D, device=dev, dtype=dtype)
                   for _ in range(self.L)]
        self.key_cache = [kv.unbind(1)[0] for kv in self.kv]
        perm = torch.randperm(self.num_blocks, device=dev)[: blocks_per_req * batch].to(torch.int32)
        self.block_table = perm.view(batch, blocks_per_req).contiguous()
        self.q = [torch.randn(batch, self.H, self.D, device=dev, dtype=dtype) for _ in range(self.L)]
        self.q_pos = torch.full((batch,), self.ctx - 1, dtype=torch.int32, device=dev)
        self.ctx_len = torch.full((batch,), self.ctx, dtype=torch.int32, device=dev)
        self.heads = torch.arange(self.H, dtype=torch.int32, device=dev)
        self.out = torch.empty(self.L, batch, self.H, self.width, device=dev)
        self.scale = self.D ** -0.5
        # the reference reads slot-indexed keys (contiguous copy, built once, not timed)
        self.key_slots = [kc.reshape(-1, self.H_kv, self.D) for kc in self.key_cache]

    @property
    def step_bytes(self) -> int:
        return self.out.numel() * 4

    def kernel_step(self) -> None:
        from vllm_attncap.engine.cuda import kernels as attncap_cuda

        for layer in range(self.L):
            attncap_cuda.paged_attention_probs(
                self.q[layer], self.key_cache[layer], self.block_table, self.q_pos, self.ctx_len,
                scale=self.scale, heads=self.heads, out=self.out[layer],
            )

    def reference_step(self) -> None:
        from vllm_attncap.engine.reference import attention_probs, gather_keys

        pos = self.q_pos[:1].long()  # the same position for every request here
        for layer in range(self.L):
            for b in range(self.B):
                k = gather_keys(self.key_slots[layer], self.block_table[b], self.ctx, BLOCK_SIZE)
                p = attention_probs(self.q[layer][b:b + 1], k, pos, scale=self.scale)
                self.out[layer, b, :, : self.ctx] = p[0]


def run(args) -> None:
    from vllm_attncap.engine.cuda import kernels as attncap_cuda
    from vllm_attncap.engine.cuda.pinned import AsyncCopier, PinnedBufferPool

    if not attncap_cuda.is_available():
        raise SystemExit("kernel_bench.py: vllm_attncap.engine.cuda._kernels is not built; run "
                         "`ATTNCAP_BUILD_KERNELS=1 python setup.py build_ext --inplace` first")
    from vllm_attncap.engine.cuda import _kernels

    iters, warmup = (5, 2) if args.quick else (args.iters, 3)
    props = torch.cuda.get_device_properties(0)
    print(f"# device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}; "
          f"kernels built for {_kernels.CUDA_ARCHS}, CUDA runtime {_kernels.cuda_runtime_version()}")
    print(f"# one decode step, all heads of all layers, rows float32; medians of {iters} runs")
    header = (f"{'shape':<13} {'B':>3} {'ctx':>5} | {'kernel ms':>9} {'torch ms':>9} {'speed-up':>8} | "
              f"{'MB/step':>8} {'copier GB/s':>11} {'copy_ GB/s':>10} {'ratio':>6} | "
              f"{'step+copy_ ms':>13} {'step+copier ms':>14}")
    print(header)
    print("-" * len(header))
    pool = PinnedBufferPool(8 << 30)
    copier = AsyncCopier()
    for name, shape in SHAPES.items():
        for batch in BATCHES:
            for prompt, gen in CONTEXTS:
                wl = Workload(shape, batch, prompt, gen)
                t_kernel = cuda_ms(wl.kernel_step, iters, warmup)
                t_ref = cuda_ms(wl.reference_step, max(2, iters // 2), 1)
                host = pool.acquire(tuple(wl.out.shape))

                def plain_copy():
                    host.copy_(wl.out, non_blocking=True)

                def async_copy():
                    copier.submit(wl.out, host).wait()

                t_plain = wall_ms(plain_copy, iters, warmup)
                t_async = wall_ms(async_copy, iters, warmup)
                gbps_plain = wl.step_bytes / t_plain / 1e6
                gbps_async = wl.step_bytes / t_async / 1e6

                # N decode steps: each step's kernels then its copy on the compute stream, versus
                # the copy of step t on the side stream while step t+1's kernels run (the rows
                # are snapshotted on the device first so step t+1 may overwrite them)
                snapshot = torch.empty_like(wl.out)
                pending: list = []

                def serial_step():
                    wl.kernel_step()
                    host.copy_(wl.out, non_blocking=True)

                def overlapped_step():
                    wl.kernel_step()
                    if pending:  # host waits here while this step's kernels run on the GPU
                        pending.pop().wait()
                    snapshot.copy_(wl.out)
                    pending.append(copier.submit(snapshot, host))

                def drain():
                    while pending:
                        pending.pop().wait()

                t_serial = steps_ms(serial_step, lambda: None, iters, warmup)
                t_overlap = steps_ms(overlapped_step, drain, iters, warmup)
                pool.release(host)
                print(f"{name:<13} {batch:>3} {wl.ctx:>5} | {t_kernel:>9.3f} {t_ref:>9.2f} {t_ref / t_kernel:>7.1f}x | "
                      f"{wl.step_bytes / 1e6:>8.1f} {gbps_async:>11.1f} {gbps_plain:>10.1f} {gbps_async / gbps_plain:>6.2f} | "
                      f"{t_serial:>13.3f} {t_overlap:>14.3f}", flush=True)
                del wl, snapshot
                torch.cuda.empty_cache()


def run_decode(args) -> None:
    """The fused decode kernel inside a CUDA graph: stats rows, head-mean rows, rows off; eager path for stats."""
    import numpy as np

    from vllm_attncap.engine.cuda import kernels as attncap_cuda
    from vllm_attncap.engine.cuda.decode_reference import F_FIRST_LAYER, F_HEADS, F_HISTORY, F_WEIGHT, FLAG_ROWS, FLAG_STATS
    from vllm_attncap.engine.cuda.graph_buffers import BufferLayout, DecodeBuffers

    if not attncap_cuda.is_available():
        raise SystemExit("kernel_bench.py: the extension is not built")
    iters, warmup = (5, 2) if args.quick else (args.iters, 3)
    dev = torch.device("cuda")
    print(f"# fused decode capture, one step = all layers replayed as one CUDA graph; medians of {iters} runs (ms)")
    print(f"{'shape':<13} {'B':>3} {'ctx':>5} | {'off':>7} {'stats':>7} {'rows-hm':>7} | {'eager stats':>11} "
          f"{'speed-up':>8}")
    for name, shape in SHAPES.items():
        for batch in BATCHES:
            for prompt, gen in CONTEXTS:
                wl = Workload(shape, batch, prompt, gen)
                lay = BufferLayout(max_rows=batch, num_layers=wl.L, num_heads=wl.H, num_kv_heads=wl.H_kv,
                                   width=wl.width + 1)
                bufs = DecodeBuffers(lay, lambda s, d: torch.zeros(s, dtype=d, device=dev))
                seq = wl.ctx_len.clone()
                attncap_cuda.preload(dev)
                dcs = [attncap_cuda.DecodeCapture(bufs, layer=l, scale=wl.scale) for l in range(wl.L)]

                def step():
                    for l, dc in enumerate(dcs):
                        dc.launch(wl.q[l], wl.key_cache[l], wl.block_table, seq, batch)

                step()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()

                def table(kind: str) -> None:
                    t = np.zeros((batch, 8), dtype=np.int32)
                    if kind == "stats":
                        t[:, 0], t[:, F_HISTORY] = FLAG_STATS, prompt
                        bufs.layer_mask.fill_(1)
                    elif kind == "rows":
                        t[:, 0], t[:, F_FIRST_LAYER], t[:, F_HEADS] = FLAG_ROWS, wl.L - 1, wl.H
                        t[:, F_WEIGHT] = np.float32(1.0).view(np.int32)
                        bufs.layer_mask.zero_()
                        bufs.layer_mask[:, wl.L - 1] = 1
                        bufs.head_mask.fill_(1)
                    t[:, 1] = np.arange(batch)
                    bufs.row_table.copy_(torch.from_numpy(t))

                res = {}
                for kind in ("off", "stats", "rows"):
                    table(kind)
                    res[kind] = cuda_ms(graph.replay, iters, warmup)
                hist = torch.full((batch,), prompt, dtype=torch.int32, device=dev)
                sink = torch.zeros(batch, dtype=torch.int32, device=dev)
                cov = torch.empty(batch, wl.H, device=dev)
                ent = torch.empty(batch, wl.H, device=dev)

                def eager_stats():
                    for l in range(wl.L):
                        probs = attncap_cuda.paged_attention_probs(
                            wl.q[l], wl.key_cache[l], wl.block_table, wl.q_pos, wl.ctx_len, scale=wl.scale,
                            heads=wl.heads, width=wl.width)
                        attncap_cuda.history_stats(probs, hist, sink, None, coverage=cov, entropy=ent)

                t_eager = cuda_ms(eager_stats, iters, warmup)
                print(f"{name:<13} {batch:>3} {wl.ctx:>5} | {res['off']:>7.3f} {res['stats']:>7.3f} "
                      f"{res['rows']:>7.3f} | {t_eager:>11.3f} {t_eager / res['stats']:>7.1f}x", flush=True)
                del wl, bufs, graph
                torch.cuda.empty_cache()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20, help="timed runs per measurement (default 20)")
    parser.add_argument("--quick", action="store_true", help="5 timed runs per measurement")
    parser.add_argument("--decode", action="store_true", help="the fused decode-capture kernel (see above)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernel_bench.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing to measure here")
    if args.decode:
        run_decode(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
