"""Fixtures for engine tests: a tiny random GQA Llama, in-process vLLM engines,
and the Hugging Face eager-attention reference rows."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tiny_model import make_tiny_llama  # noqa: E402

pytestmark = pytest.mark.engine


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """3 layers, 4 query / 2 KV heads (GQA), head_dim 32, fp32."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def hf_tiny(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager", dtype=torch.float32).eval()


def free_engine(llm) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


@pytest.fixture
def make_llm(tiny_llama):
    """Factory for in-process engines on the tiny model; frees them afterwards."""
    made = []

    def _make(attncap: bool = True, **kw):
        from vllm import LLM

        args = dict(model=str(tiny_llama), enforce_eager=True, dtype="float32", max_model_len=512, seed=0)
        if attncap:
            args["attention_backend"] = "attncap"
        args.update(kw)
        llm = LLM(**args)
        made.append(llm)
        return llm

    yield _make
    while made:
        free_engine(made.pop())


def hf_rows(model, prompt_ids, gen_ids) -> np.ndarray:
    """Reference capture from HF eager attention: float32 (L, H, T, P+T-1) with
    row s = attentions[l][0, h, P-1+s, :P+s] (method.md)."""
    import torch

    P, T = len(prompt_ids), len(gen_ids)
    ids = list(prompt_ids) + list(gen_ids)
    with torch.no_grad():
        att = model(torch.tensor([ids]), output_attentions=True).attentions
    L, H = len(att), att[0].shape[1]
    out = np.zeros((L, H, T, P + T - 1), np.float32)
    for l in range(L):
        a = att[l][0].float().numpy()
        for s in range(T):
            out[l, :, s, : P + s] = a[:, P - 1 + s, : P + s]
    return out


def reduce_ref(full: np.ndarray, layers, heads, reduce: str) -> np.ndarray:
    """Apply a spec's selection/reduction to a full reference array (independent of the plugin)."""
    x = full[list(layers)][:, list(heads)]
    if reduce in ("head_mean", "layer_head_mean"):
        x = x.mean(axis=1, keepdims=True)
    if reduce == "layer_head_mean":
        x = x.mean(axis=0, keepdims=True)
    return x


PROMPTS = [
    "the quick brown fox jumps over the lazy dog",
    "my printer does not work after the update, what should I do?",
    "Alice sent 42 emails",
    "please restart the router and check the cables again and again, then tell me",
    "attention is all you need",
    "how many apples are left if Tom eats 3 of 10 apples?",
    "reward models need no human labels",
    "hi",
]
