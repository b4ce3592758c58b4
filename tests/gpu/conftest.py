"""Fixtures for the CUDA kernel tests (tests/gpu/).

Tests that need a GPU carry the ``gpu`` marker and are skipped where
``torch.cuda.is_available()`` is False. On a machine with a GPU a missing
extension is an error, not a skip: build it first (docs/kernels.md).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def kernels():
    """The built extension on a CUDA machine (fails with build instructions when missing)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    try:
        from vllm_attncap.engine.cuda import _kernels
    except ImportError as exc:
        pytest.fail(
            f"CUDA is available but vllm_attncap.engine.cuda._kernels is not built ({exc}); run "
            "`ATTNCAP_BUILD_KERNELS=1 python setup.py build_ext --inplace` first",
            pytrace=False,
        )
    # the torch reference must run in true float32 (no TF32) to be a reference
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return _kernels
