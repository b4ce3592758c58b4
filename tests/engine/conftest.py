"""Fixtures for engine tests: a tiny random GQA Llama, in-process vLLM engines,
and the Hugging Face eager-attention reference rows."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

from engine_utils import free_engine  # noqa: E402
from tiny_model import make_tiny_llama  # noqa: E402



@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """3 layers, 4 query / 2 KV heads (GQA), head_dim 32, fp32."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def hf_tiny(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager", dtype=torch.float32).eval()


def _tiny_engine(tiny_llama, attncap: bool = True, **kw):
    from vllm import LLM

    args = dict(model=str(tiny_llama), enforce_eager=True, dtype="float32", max_model_len=512, seed=0)
    if attncap:
        args["attention_backend"] = "attncap"
    args.update(kw)
    return LLM(**args)


@pytest.fixture
def make_llm(tiny_llama):
    """Factory for in-process engines on the tiny model with settings of a test's own; frees them afterwards.
    Tests that need the default settings share the module's engine (``llm``) instead: a start costs ~10-20 s."""
    made = []

    def _make(attncap: bool = True, **kw):
        llm = _tiny_engine(tiny_llama, attncap, **kw)
        made.append(llm)
        return llm

    yield _make
    while made:
        free_engine(made.pop())


# One engine per module for the tests that use the default settings. Module scope, not session scope: starting an
# attncap engine resets the process's capture tracker and freeing one tears down vLLM's distributed state, so an
# engine must not outlive the next module's engines. A test module uses either these or ``make_llm``, not both.
@pytest.fixture(scope="module")
def llm(tiny_llama):
    """The module's attncap engine on the tiny model (default settings, greedy tests only)."""
    engine = _tiny_engine(tiny_llama)
    yield engine
    free_engine(engine)


@pytest.fixture(scope="module")
def stock_llm(tiny_llama):
    """The module's engine on the platform's own attention backend (same settings as ``llm``)."""
    engine = _tiny_engine(tiny_llama, attncap=False)
    yield engine
    free_engine(engine)


