"""Capture on the bundled SmolLM2-135M-Instruct (bf16) equals HF eager attention.

Tolerance: bf16 activations on both sides round differently (vLLM's fused CPU
kernels vs HF's eager matmuls), so rows agree to max |diff| <= 0.05 and mean
|diff| <= 1e-3 (measured: max 0.036, mean 3e-4 over 3 layers x 9 heads x 24 rows).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine_utils import free_engine, hf_rows

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_smollm2_bf16_rows_match_hf_eager(smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    from vllm_attncap import generate_with_attentions

    llm = LLM(model=str(smollm2_path), attention_backend="attncap", enforce_eager=True, dtype="bfloat16",
              max_model_len=512, seed=0)
    try:
        tok = llm.get_tokenizer()
        convs = [
            [{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "user", "content": "My printer is offline after the update. What should I do?"}],
        ]
        prompts = [{"prompt_token_ids": tok.encode(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                                                   add_special_tokens=False)} for c in convs]
        outs = generate_with_attentions(llm, prompts, SamplingParams(max_tokens=12, temperature=0),
                                        spec={"layers": [0, 14, -1]}, use_tqdm=False)
    finally:
        free_engine(llm)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, attn_implementation="eager", dtype=torch.bfloat16).eval()
    for out in outs:
        assert out.layers == (0, 14, 29) and out.attention.shape[1] == 9
        ref = hf_rows(hf, out.prompt_token_ids, out.token_ids)[[0, 14, 29]]
        diff = np.abs(out.attention - ref)
        assert diff.max() <= 0.05 and diff.mean() <= 1e-3, (diff.max(), diff.mean())
        P = out.prompt_len
        for s in range(out.attention.shape[2]):
            np.testing.assert_allclose(out.attention[:, :, s, : P + s].sum(-1), 1.0, atol=1e-3)
