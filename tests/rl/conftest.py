"""Fixtures for the RL tests: a tiny random GQA Llama (from tests/engine/tiny_model.py), in-process vLLM on CPU,
and a Hugging Face eager-attention reference."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """3 layers, 4 query / 2 KV heads, head_dim 32, fp32, local BPE tokenizer with a chat template."""
    from tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("rl_tiny_llama"))
