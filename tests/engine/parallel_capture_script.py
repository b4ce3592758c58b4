"""Capture with one engine (any TP / PP / executor) for every reduce mode and stats; saves what it got.

Usage: python parallel_capture_script.py MODEL_DIR OUT_DIR TP PP EXECUTOR EAGER

Writes ``OUT_DIR/result.json`` (tokens, errors, what the store still holds afterwards) and one ``<name>.npy`` per
captured array. ``run`` is also called in-process by the tests for the TP = PP = 1 reference.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

SALIENT = [0, 2, 5, 7]
#: name -> spec; every reduce mode in rows and stats mode, a head only rank 0 holds, long-history elision
SPECS = {
    "all": {},
    "last_head_mean": {"layers": [-1], "reduce": "head_mean"},
    "pick": {"layers": [0, -1], "heads": [3, 1]},
    "layer_mean": {"layers": [0, 2], "reduce": "layer_head_mean"},
    "one_head": {"heads": [0]},
    "one_head_mean": {"heads": [2], "layers": [2], "reduce": "head_mean"},
    "stats_none": {"mode": "stats", "sink": 1, "salient": SALIENT, "layers": [1, 2], "reduce": "none"},
    "stats_head_mean": {"mode": "stats", "sink": 1, "salient": SALIENT, "reduce": "head_mean"},
    "stats_layer_mean": {"mode": "stats", "sink": 1, "salient": SALIENT, "reduce": "layer_head_mean"},
    "stats_elided": {"mode": "stats", "sink": 1, "salient": [1, 4, 9, 30], "layers": [0, 2],
                     "reduce": "layer_head_mean", "n_max": 16, "window": 6},
    "stats_elided_head_mean": {"mode": "stats", "sink": 1, "salient": [1, 4, 9, 30], "reduce": "head_mean",
                               "n_max": 16, "window": 6},
}
PROMPTS = [
    "the quick brown fox jumps over the lazy dog",
    "my printer does not work after the update, what should I do?",
    "Alice sent 42 emails",
    "please restart the router and check the cables again and again, then tell me",
]
LONG = " ".join(PROMPTS)  # ~60 tokens > n_max


def run(llm, out_dir: Path) -> dict:
    from vllm import SamplingParams

    from vllm_attncap import collect, generate_with_attentions
    from vllm_attncap.store import list_records

    out_dir = Path(out_dir)
    names = list(SPECS)
    prompts = [LONG if "elided" in n else PROMPTS[i % len(PROMPTS)] for i, n in enumerate(names)]
    sps = [SamplingParams(max_tokens=4 + i % 4, temperature=0, ignore_eos=True) for i in range(len(names))]
    outs = generate_with_attentions(llm, prompts, sps, spec=[SPECS[n] for n in names], use_tqdm=False)
    result = {"tokens": {}, "errors": {}}
    for name, out in zip(names, outs):
        result["tokens"][name] = out.token_ids
        result["errors"][name] = None if out.error is None else str(out.error)
        if out.error is None:
            arr = out.stats if SPECS[name].get("mode") == "stats" else {"rows": out.attention}
            for k, v in arr.items():
                import numpy as np

                np.save(out_dir / f"{name}.{k}.npy", v)
    # A spec the frontend did not check (sent to llm.generate directly): refused by the workers, for its request
    # only; the request beside it captures normally.
    tag = uuid.uuid4().hex[:12]
    bad = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                         extra_args={"attncap": {"layers": [7], "key": f"bad-{tag}"}})
    good = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                          extra_args={"attncap": {"layers": [-1], "reduce": "head_mean", "key": f"good-{tag}"}})
    o_bad, o_good = llm.generate([PROMPTS[0], PROMPTS[1]], [bad, good], use_tqdm=False)
    c_bad = collect(o_bad, f"bad-{tag}")
    c_good = collect(o_good, f"good-{tag}")
    result["bad_error"] = None if c_bad.error is None else str(c_bad.error)
    result["bad_tokens"] = list(o_bad.outputs[0].token_ids)
    result["good_error"] = None if c_good.error is None else str(c_good.error)
    if c_good.error is None:
        import numpy as np

        np.save(out_dir / "good_spec.rows.npy", c_good.attention)
    result["left"] = [m.key for m in list_records()]
    (out_dir / "result.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    model, out_dir, tp, pp, executor, eager = sys.argv[1:7]
    tp, pp = int(tp), int(pp)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if tp * pp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tp * pp)))
    from vllm import LLM

    llm = LLM(model=model, attention_backend="attncap", enforce_eager=eager == "1", dtype="float32",
              max_model_len=512, seed=0, tensor_parallel_size=tp, pipeline_parallel_size=pp,
              distributed_executor_backend=executor)
    run(llm, Path(out_dir))
    print("done")
