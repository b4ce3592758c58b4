"""Shared helpers for engine tests (not a conftest, so imports are unambiguous)."""

from __future__ import annotations

import gc

import numpy as np


def free_engine(llm) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


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


def stats_ref(rows: np.ndarray, history_len: int, sink: int, salient) -> tuple[np.ndarray, np.ndarray]:
    """Independent loop implementation of per-row coverage / history entropy."""
    L, H, T, _ = rows.shape
    cov = np.zeros((L, H, T))
    ent = np.zeros((L, H, T))
    for l in range(L):
        for h in range(H):
            for s in range(T):
                block = rows[l, h, s, sink:history_len].astype(np.float64)
                p = block / block.sum()
                ent[l, h, s] = -sum(x * np.log(x) for x in p if x > 0)
                cov[l, h, s] = sum(p[i - sink] for i in salient if i >= sink)
    return cov, ent


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
