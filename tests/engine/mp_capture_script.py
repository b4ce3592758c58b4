"""Run capture with vLLM's default multiprocess engine (EngineCore + worker processes).

Usage: python mp_capture_script.py MODEL_DIR OUT_DIR
"""

import os
import sys

if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from vllm_attncap import generate_with_attentions

    model, out_dir = sys.argv[1], sys.argv[2]
    llm = LLM(model=model, attention_backend="attncap", enforce_eager=True, dtype="float32", max_model_len=512,
              seed=0, enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=48)
    shared = " ".join(["printer router cables update Alice Bob"] * 30)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm.generate([shared + " warm the cache"], sp, use_tqdm=False)
    prompts = [shared + " first question", "the quick brown fox", shared + " second one"]
    outs = generate_with_attentions(llm, prompts, sp, spec=[{}, {"layers": [-1], "reduce": "head_mean"}, {}], use_tqdm=False)
    for i, o in enumerate(outs):
        o.save(os.path.join(out_dir, f"out{i}.npz"))
    print("cached", [o.output.num_cached_tokens for o in outs])
