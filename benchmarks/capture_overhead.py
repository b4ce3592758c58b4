"""What capture costs inside vLLM on a GPU, next to stock vLLM and HF (GPU only).

For each model shape, batch size and prompt length it measures, with 64 new
tokens per request (greedy, ``ignore_eos``):

- **stock**: vLLM 0.25.1 with its own backend (FLASH_ATTN, FULL_AND_PIECEWISE
  CUDA graphs unless ``--eager``);
- **stock-pw**: stock forced to PIECEWISE graphs (``compilation_config={"cudagraph_mode": "PIECEWISE"}``):
  attention eager between graphed pieces, which isolates what capture itself costs from what a graph mode costs
  (skip with ``--no-piecewise``);
- **attncap**: ``attention_backend="attncap"`` without any request asking for
  capture (full decode graphs holding the idle capture kernels + the plugin's per-step bookkeeping);
- **stats**: every request captures ``{"mode": "stats"}`` (all layers, all heads; inside the full decode graph);
- **rows-hm**: every request captures ``{"layers": [-1], "reduce": "head_mean"}`` (inside the full decode graph);
- **HF**: ``transformers`` ``generate(output_attentions=True)`` with eager
  attention (attention maps left on the GPU), skipped where the prefill maps
  alone would exceed ``--hf-max-gib``.

Reported per case: wall milliseconds per turn (one ``generate`` call for the
whole batch: prefill + 64 tokens), decode throughput
``batch * 63 / (t(64 tokens) - t(1 token))`` in tokens/s, and ratios to stock
(and HF / stats). Medians over ``--repeats`` turns after one warm-up turn, with
fresh random prompts every turn and prefix caching off (no cache hits).

Shapes (random weights: vLLM ``load_format="dummy"``, HF random init; the
cost does not depend on the values):

- ``smollm2-135m``: 30 layers, hidden 576, 9 q / 3 kv heads, head dim 64, vocab 49152;
- ``llama-1b``: 16 layers, hidden 2048, 32 q / 8 kv heads, head dim 64, vocab 128256.

    python benchmarks/capture_overhead.py                         # both shapes (long: 4 engines)
    python benchmarks/capture_overhead.py --models smollm2-135m   # one shape per device call
    python benchmarks/capture_overhead.py --quick --models smollm2-135m   # 3 repeats, batch 1 and 16, prompt 512

The JSON (``--json``) is rewritten after every engine, so a run cut short keeps what it measured. Engines run in
the order stock, attncap, HF, stock-pw (the no-capture ratio first).

Engines start with ``torch.compile`` unless ``--eager``; a cold compile cache makes
the first start of each engine take minutes (> 170 s on a fresh machine, docs/gpu.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _turns import timed_turn  # noqa: E402  (benchmarks/_turns.py, beside this script)

SHAPES = {
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "llama-1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                     tie_word_embeddings=True),
}
MODES = {
    "attncap": None,
    "stats": {"mode": "stats"},
    "rows-hm": {"layers": [-1], "reduce": "head_mean"},
}
NEW_TOKENS = 64


def _die(msg: str) -> None:
    print(f"capture_overhead: {msg}", file=sys.stderr)
    sys.exit(2)


def _check_gpu() -> None:
    try:
        import torch
    except ImportError:
        _die("torch is not installed")
    if not torch.cuda.is_available():
        _die("needs a CUDA GPU (torch.cuda.is_available() is False); this benchmark measures vLLM 0.25.1 "
             "on CUDA — run it on the lent GPU machine (scripts/gpu_check.sh OUTDIR phase2)")
    try:
        import vllm  # noqa: F401
    except ImportError:
        _die("vLLM is not importable; on the GPU machine `source /tmp/kit/env.sh` first (docs/gpu.md, 'Running the GPU check')")


def _plugin_setup() -> str:
    """Make sure vLLM finds the plugin in every process; returns how."""
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="vllm.general_plugins")}
    if "attncap" in names:
        return "entry point (multiprocess engine)"
    # Without the installed entry point a spawned EngineCore would not know "attncap":
    # run the engine in-process (for stock too, so both are measured alike) and register here.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm_attncap

    vllm_attncap.register()
    return "in-process engine (entry point not installed: pip install -e . --no-deps)"


def write_config(root: Path, name: str) -> Path:
    """A Llama config.json of the named shape (weights come from vLLM's dummy loader)."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
        max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16",
        attention_bias=False, mlp_bias=False, **SHAPES[name],
    )
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _free_engine(llm) -> None:
    import torch
    from vllm.distributed import cleanup_dist_env_and_memory

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
    torch.cuda.empty_cache()


def bench_vllm(model_dir: Path, name: str, attncap: bool, cases, repeats: int, eager: bool, mem: float,
               piecewise: bool = False) -> dict:
    """{(batch, prompt, mode): {"turn_ms", "prefill_ms", "decode_tps", "capture_ok"}} for one engine."""
    import numpy as np
    from vllm import LLM

    vocab = SHAPES[name]["vocab_size"]
    max_prompt = max(p for _, p in cases)
    kw = dict(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              max_model_len=max_prompt + NEW_TOKENS + 16, enable_prefix_caching=False,
              gpu_memory_utilization=mem, max_num_seqs=max(b for b, _ in cases), enforce_eager=eager)
    if attncap:
        kw["attention_backend"] = "attncap"
    if piecewise:
        kw["compilation_config"] = {"cudagraph_mode": "PIECEWISE"}
    t0 = time.perf_counter()
    llm = LLM(**kw)
    start_s = time.perf_counter() - t0
    label = "attncap" if attncap else ("stock-pw" if piecewise else "stock")
    try:
        cg = llm.llm_engine.vllm_config.compilation_config.cudagraph_mode
    except Exception:
        cg = "?"
    print(f"[{name}/{label}] engine up in {start_s:.0f} s (cudagraph_mode as configured: {cg})", flush=True)
    modes = list(MODES) if attncap else [label]
    rng = np.random.default_rng(0)
    res = {}
    try:
        for batch, prompt in cases:
            for mode in modes:
                spec = MODES.get(mode)

                def turn(max_tokens: int, check: bool = False) -> float:
                    dt, ok = timed_turn(llm, rng, batch=batch, prompt=prompt, vocab=vocab, spec=spec,
                                        max_tokens=max_tokens, check=check)
                    turn.ok = ok if ok is not None else getattr(turn, "ok", None)
                    return dt

                turn(NEW_TOKENS, check=True)  # warm-up (and a capture sanity check)
                full = [turn(NEW_TOKENS) for _ in range(repeats)]
                pre = [turn(1) for _ in range(repeats)]
                t_full, t_pre = statistics.median(full), statistics.median(pre)
                res[(batch, prompt, mode)] = dict(
                    turn_ms=t_full * 1e3, prefill_ms=t_pre * 1e3,
                    decode_tps=batch * (NEW_TOKENS - 1) / max(t_full - t_pre, 1e-9), capture_ok=turn.ok,
                )
                r = res[(batch, prompt, mode)]
                print(f"[{name}/{mode}] batch {batch:>2} prompt {prompt:>4}: {r['turn_ms']:8.1f} ms/turn, "
                      f"decode {r['decode_tps']:9.0f} tok/s" + ("" if r["capture_ok"] is None
                                                             else f", capture {'ok' if r['capture_ok'] else 'EMPTY'}"),
                      flush=True)
    finally:
        _free_engine(llm)
    return res


def bench_hf(name: str, cases, repeats: int, max_gib: float, device: str = "cuda") -> dict:
    """{(batch, prompt): turn_ms or None} for HF generate(output_attentions=True), eager attention."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    s = SHAPES[name]
    cfg = LlamaConfig(**s, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
    try:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.bfloat16)
    except TypeError:  # older transformers
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", torch_dtype=torch.bfloat16)
    model = model.to(device).eval()
    g = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    res = {}
    for batch, prompt in cases:
        L, H = s["num_hidden_layers"], s["num_attention_heads"]
        gib = L * batch * H * prompt * prompt * 2 / 2**30  # bf16 prefill attention maps alone
        if gib > max_gib:
            print(f"[{name}/HF] batch {batch:>2} prompt {prompt:>4}: skipped (prefill attention maps "
                  f"~{gib:.0f} GiB > --hf-max-gib {max_gib:g})", flush=True)
            res[(batch, prompt)] = None
            continue

        def turn() -> float:
            ids = torch.randint(10, s["vocab_size"] - 10, (batch, prompt), device=device, generator=g)
            sync()
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS, do_sample=False, output_attentions=True,
                                     return_dict_in_generate=True, pad_token_id=0)
            sync()
            dt = time.perf_counter() - t
            assert out.sequences.shape[1] == prompt + NEW_TOKENS and out.attentions is not None
            del out
            return dt

        try:
            turn()
            ms = statistics.median(turn() for _ in range(repeats)) * 1e3
        except torch.cuda.OutOfMemoryError:
            ms = None
            print(f"[{name}/HF] batch {batch:>2} prompt {prompt:>4}: out of GPU memory", flush=True)
        torch.cuda.empty_cache()
        res[(batch, prompt)] = ms
        if ms is not None:
            print(f"[{name}/HF] batch {batch:>2} prompt {prompt:>4}: {ms:8.1f} ms/turn", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def _fmt(x, spec=".0f") -> str:
    return "n/a" if x is None else format(x, spec)


def _ratio(a, b) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _tps_ratio(a: dict, b: dict) -> str:
    x, y = (a or {}).get("decode_tps"), (b or {}).get("decode_tps")
    return "n/a" if x is None or y is None or y == 0 else f"{x / y:.3f}"


def report(name: str, cases, stock: dict, stock_pw: dict, cap: dict, hf: dict) -> list[str]:
    """Decode-throughput ratios (the issue's criteria) and ms per turn, side by side."""
    def cell(batch: int, prompt: int):
        """One case's measurements: stock, stock piecewise, attncap per mode, HF turn ms."""
        return (stock.get((batch, prompt, "stock"), {}), stock_pw.get((batch, prompt, "stock-pw"), {}),
                {m: cap.get((batch, prompt, m), {}) for m in MODES}, hf.get((batch, prompt)))

    lines = [
        f"== {name}: decode throughput ratios (higher = faster; tok/s over {NEW_TOKENS - 1} decode steps) ==",
        f"{'batch':>5} {'prompt':>6} | {'cap/st':>6} {'stats/pw':>8} {'rows/pw':>7} {'stats/st':>8} {'rows/st':>7} | "
        f"{'HF/stats':>8} {'HF/rows':>7} (turn-time speed-ups over HF)",
    ]
    for batch, prompt in cases:
        st, pw, a, h = cell(batch, prompt)
        lines.append(
            f"{batch:>5} {prompt:>6} | {_tps_ratio(a['attncap'], st):>6} {_tps_ratio(a['stats'], pw):>8} "
            f"{_tps_ratio(a['rows-hm'], pw):>7} {_tps_ratio(a['stats'], st):>8} {_tps_ratio(a['rows-hm'], st):>7} | "
            f"{_ratio(h, a['stats'].get('turn_ms')):>8} {_ratio(h, a['rows-hm'].get('turn_ms')):>7}"
        )
    lines.append(f"-- {name}: ms per turn (prefill + {NEW_TOKENS} tokens, whole batch) and decode tok/s --")
    lines.append(f"{'batch':>5} {'prompt':>6} | {'stock':>7} {'st-pw':>7} {'attncap':>7} {'stats':>7} {'rows-hm':>7} "
                 f"{'HF':>7} | {'tok/s st':>8} {'st-pw':>8} {'attncap':>8} {'stats':>8} {'rows-hm':>8}")
    for batch, prompt in cases:
        st, pw, a, h = cell(batch, prompt)
        lines.append(
            f"{batch:>5} {prompt:>6} | {_fmt(st.get('turn_ms')):>7} {_fmt(pw.get('turn_ms')):>7} "
            f"{_fmt(a['attncap'].get('turn_ms')):>7} {_fmt(a['stats'].get('turn_ms')):>7} "
            f"{_fmt(a['rows-hm'].get('turn_ms')):>7} {_fmt(h):>7} | {_fmt(st.get('decode_tps')):>8} "
            f"{_fmt(pw.get('decode_tps')):>8} {_fmt(a['attncap'].get('decode_tps')):>8} "
            f"{_fmt(a['stats'].get('decode_tps')):>8} {_fmt(a['rows-hm'].get('decode_tps')):>8}"
        )
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated subset of {list(SHAPES)}")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompts", default="512,2048")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="3 repeats, prompt 512 only")
    ap.add_argument("--no-piecewise", action="store_true", help="skip the stock engine forced to PIECEWISE")
    ap.add_argument("--eager", action="store_true", help="enforce_eager for both engines (no torch.compile/graphs)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--hf-max-gib", type=float, default=24.0)
    ap.add_argument("--mem", type=float, default=0.6, help="gpu_memory_utilization of each engine (one at a time)")
    ap.add_argument("--json", default=os.environ.get("OUT", ".") + "/capture_overhead.json")
    args = ap.parse_args(argv)
    _check_gpu()
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # flashinfer is not in the devkit
    how = _plugin_setup()
    if args.quick:
        args.repeats, args.prompts = 3, "512"
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in SHAPES:
            _die(f"unknown model shape {m!r}; choose from {list(SHAPES)}")
    cases = [(int(b), int(p)) for p in args.prompts.split(",") for b in args.batches.split(",")]
    import torch

    print(f"capture_overhead: {torch.cuda.get_device_name()}, plugin via {how}, "
          f"{'enforce_eager' if args.eager else 'default compilation'}, repeats {args.repeats}", flush=True)
    from vllm_attncap.engine.cuda import kernels as attncap_cuda

    print(f"capture kernels: {'built' if attncap_cuda.is_available() else 'NOT built (torch path)'}", flush=True)
    all_lines, dump = [], {}

    def save() -> None:
        try:
            Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), eager=args.eager,
                                                       repeats=args.repeats, results=dump), indent=1))
        except OSError as e:
            print(f"could not write {args.json}: {e}")

    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            d = write_config(Path(tmp), name)
            entry = dump[name] = {}
            stock = bench_vllm(d, name, False, cases, args.repeats, args.eager, args.mem)
            entry["stock"] = {str(k): v for k, v in stock.items()}
            save()
            cap = bench_vllm(d, name, True, cases, args.repeats, args.eager, args.mem)
            entry["attncap"] = {str(k): v for k, v in cap.items()}
            save()
            hf = {} if args.no_hf else bench_hf(name, cases, args.repeats, args.hf_max_gib)
            entry["hf_ms"] = {str(k): v for k, v in hf.items()}
            save()
            stock_pw = {}
            if not args.no_piecewise and not args.eager:
                stock_pw = bench_vllm(d, name, False, cases, args.repeats, args.eager, args.mem, piecewise=True)
                entry["stock_pw"] = {str(k): v for k, v in stock_pw.items()}
                save()
            lines = report(name, cases, stock, stock_pw, cap, hf)
            entry["report"] = lines
            save()
            print("\n".join(lines), flush=True)
            all_lines += lines + [""]
    print("\n" + "\n".join(all_lines))
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
