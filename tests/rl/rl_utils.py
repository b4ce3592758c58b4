"""Helpers shared by the RL tests."""

from __future__ import annotations

import numpy as np


def eager_rows(model, prompt_ids, gen_ids) -> np.ndarray:
    """Reference capture ``(L, H, T, P+T-1)``: row s = eager attentions[l][0, h, P-1+s, :P+s] (method.md)."""
    import torch

    P, T = len(prompt_ids), len(gen_ids)
    with torch.no_grad():
        att = model(torch.tensor([list(prompt_ids) + list(gen_ids)]), output_attentions=True).attentions
    out = np.zeros((len(att), att[0].shape[1], T, P + T - 1), np.float32)
    for layer, a in enumerate(att):
        a = a[0].float().numpy()
        for s in range(T):
            out[layer, :, s, : P + s] = a[:, P - 1 + s, : P + s]
    return out


def free_engine(llm) -> None:
    import gc

    from vllm.distributed import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
