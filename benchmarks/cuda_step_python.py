"""Python that the CUDA backend adds to a decode step where nobody captures, timed on the CPU with runner fakes.

    PYTHONPATH=. python benchmarks/cuda_step_python.py [--batch 1 16] [--layers 30] [--steps 2000]
        [--baseline DIR] [--json OUT]

One no-capture step of Model Runner V2 runs, besides stock vLLM: the ``execute_model`` wrapper (graph-mode decision),
the ``prepare_inputs`` wrapper (the step view), the builder's additions to ``build()`` (plan, in-graph bookkeeping,
the metadata subclass), every layer's ``forward`` prelude (``super().forward`` is replaced by a no-op here), the
step-end callback and the ``sample_tokens`` output mark. This script calls exactly those functions of
``vllm_attncap`` on fakes shaped like 0.25.1's objects (nothing of vLLM runs but its classes' definitions) and reports
microseconds per step, for a step whose attention runs in Python (eager / PIECEWISE: every layer's forward) and for
a full-graph replay (no forward in Python). ``--baseline DIR`` also times another checkout's ``vllm_attncap`` (e.g. ``git archive`` of an
earlier commit) in a subprocess, interleaved with this one, so the two numbers come from one run on one machine.

What it cannot show: the GPU side (kernel launches inside graphs, docs/gpu.md) and vLLM's own Python per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace


def _measure(batch: int, layers: int, steps: int) -> dict:
    import numpy as np
    import torch
    from vllm.v1.attention.backends import flash_attn as fa

    from vllm_attncap.engine import runner_hooks
    from vllm_attncap.engine.cuda import backend as flash
    from vllm_attncap.engine.cuda.graph_buffers import BufferLayout
    from vllm_attncap.engine.cuda.graph_step import GraphCapture
    from vllm_attncap.engine.cuda.graph_dispatch import policy
    from vllm_attncap.engine.tracker import CaptureTracker, ModelShape

    torch.cuda.is_current_stream_capturing = lambda: False  # a C call on a CUDA build; absent on a CPU one
    # stock pieces replaced by no-ops: FlashAttention's forward and build (their cost is stock's, not ours)
    fa.FlashAttentionImpl.forward = lambda self, layer, q, k, v, kv, md, out, *a, **kw: out
    md_fields = {f: None for f in fa.FlashAttentionMetadata.__dataclass_fields__}
    base_md = fa.FlashAttentionMetadata(**{k: v for k, v in md_fields.items()
                                           if fa.FlashAttentionMetadata.__dataclass_fields__[k].init})
    fa.FlashAttentionMetadataBuilder.build = lambda self, cpl, cm, fast_build=False: base_md

    tracker = CaptureTracker()
    tracker.set_model_shape(ModelShape(layers, 9, 3, 64, 2048))
    flash.get_tracker = lambda: tracker
    lay = BufferLayout(max_rows=max(batch, 16), num_layers=layers, num_heads=9, num_kv_heads=3, width=2048)

    class _Up:
        blocking_waits = 0

        def upload(self, pairs):
            pass

    graph = GraphCapture(lay, lambda s, d: torch.zeros(s, dtype=d), _Up(), lambda n: None)
    flash._GRAPH = graph
    policy.graphs, policy.in_graph, policy.num_layers = True, True, layers

    builder = fa.FlashAttentionMetadataBuilder.__new__(flash.AttnCapFlashMetadataBuilder)
    builder._graph, builder._own_layers, builder._layer_names = graph, None, []
    impls = []
    for i in range(layers):
        impl = flash.AttnCapFlashImpl.__new__(flash.AttnCapFlashImpl)
        impl._layer_index, impl._dev = i, {}
        impl.attn_type = fa.AttentionType.DECODER
        impls.append(impl)
    layer_objs = [SimpleNamespace(layer_name=f"model.layers.{i}.self_attn.attn") for i in range(layers)]

    # a Model Runner V2 decode step of `batch` requests, none capturing
    rids = [f"req-{i}" for i in range(batch)]

    class Runner:
        def __init__(self):
            self.req_states = SimpleNamespace(prompt_len=SimpleNamespace(np=np.full(batch, 512, np.int32)))

        def add_requests(self, so):
            pass

        def finish_requests(self, so):
            pass

        def execute_model(self, so, intermediate_tensors=None):
            runner_hooks._ACTIVE = None
            self.prepare_inputs(so)
            return None

        def prepare_inputs(self, so):
            return SimpleNamespace(req_ids=rids, idx_mapping_np=np.arange(batch), num_reqs=batch)

        def sample_tokens(self, grammar_output):
            return "out"

    runner_hooks.install_mrv2(Runner)
    runner_hooks.on_step_end(flash.flush_pending)
    runner_hooks.on_output(flash.output_mark)
    runner = Runner()
    so = SimpleNamespace(scheduled_new_reqs=[], finished_req_ids=set(), preempted_req_ids=set(),
                         num_scheduled_tokens={r: 1 for r in rids})
    cm = SimpleNamespace(num_reqs=batch, max_query_len=1, query_start_loc_cpu=torch.arange(batch + 1),
                         seq_lens=torch.full((batch,), 600), seq_lens_cpu_upper_bound=torch.full((batch,), 600),
                         block_table_tensor=torch.zeros((batch, 8), dtype=torch.int32))
    q = torch.zeros((batch, 9, 64))
    out = torch.zeros((batch, 9 * 64))

    def one_step(replay):
        runner.execute_model(so)  # wrapper: decide + (in the real runner) prepare_inputs -> the view
        runner_hooks._ACTIVE = runner_hooks.MRv2StepView(runner, runner.prepare_inputs(so))
        md = builder.build(0, cm)
        if not replay:  # a full-graph replay runs no forward in Python
            for impl, lo in zip(impls, layer_objs):
                impl.forward(lo, q, None, None, None, md, out)
        runner_hooks._ACTIVE = None
        runner.sample_tokens(None)

    def bare_step(replay):  # the same calls without attncap: the fakes' own cost, subtracted
        runner.prepare_inputs(so)
        runner.prepare_inputs(so)
        md = base_md
        if not replay:
            for impl, lo in zip(impls, layer_objs):
                fa.FlashAttentionImpl.forward(impl, lo, q, None, None, None, md, out)
        "out"

    for _ in range(200):
        one_step(False)
        bare_step(False)
    best = {}
    for name, fn in (("attncap", lambda: one_step(False)), ("bare", lambda: bare_step(False)),
                     ("attncap_replay", lambda: one_step(True)), ("bare_replay", lambda: bare_step(True))):
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            runs.append((time.perf_counter() - t0) / steps * 1e6)
        best[name] = min(runs)
    return {"batch": batch, "layers": layers, "us_per_step": round(best["attncap"] - best["bare"], 2),
            "us_per_replay_step": round(best["attncap_replay"] - best["bare_replay"], 2),
            "fakes_us": round(best["bare"], 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--baseline", help="another checkout's root, timed in a subprocess in the same run")
    ap.add_argument("--json")
    ap.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._one:
        print(json.dumps([_measure(b, args.layers, args.steps) for b in args.batch]))
        return 0
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = {"this": here}
    if args.baseline:
        roots["baseline"] = os.path.abspath(args.baseline)
    result = {name: [] for name in roots}
    for rnd in range(2):  # interleaved rounds: this, baseline, this, baseline
        for name, root in roots.items():
            env = dict(os.environ, PYTHONPATH=root, VLLM_CPU_KVCACHE_SPACE="1")
            cmd = [sys.executable, os.path.abspath(__file__), "--_one", "--layers", str(args.layers), "--steps",
                   str(args.steps), "--batch", *map(str, args.batch)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=root)
            result[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {}
    for name, rounds in result.items():
        summary[name] = {r["batch"]: {k: min(x[i][k] for x in rounds) for k in ("us_per_step", "us_per_replay_step")}
                         for i, r in enumerate(rounds[0])}
        print(f"{name:9s} " + "  ".join(f"batch {b}: eager/piecewise step {v['us_per_step']:6.1f} us, full-graph "
                                        f"replay step {v['us_per_replay_step']:6.1f} us"
                                        for b, v in summary[name].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rounds": result, "layers": args.layers, "steps": args.steps,
                       "machine": os.uname().nodename}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
