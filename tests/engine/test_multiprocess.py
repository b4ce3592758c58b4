"""Capture through vLLM's default multiprocess engine (spawned EngineCore + worker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine_utils import hf_rows, reduce_ref

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_multiprocess_prefix_cache_chunked_prefill(tiny_llama, hf_tiny, tmp_path):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_KVCACHE_SPACE="1")
    script = Path(__file__).with_name("mp_capture_script.py")
    r = subprocess.run([sys.executable, str(script), str(tiny_llama), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("cached "))
    cached = [int(x) for x in line[len("cached ") :].strip("[]").split(",")]
    assert cached[0] > 0 and cached[2] > 0  # prefix cache hits in the worker
    for i, reduce in enumerate(["none", "head_mean", "none"]):
        z = np.load(tmp_path / f"out{i}.npz")
        full = hf_rows(hf_tiny, z["prompt_token_ids"].tolist(), z["token_ids"].tolist())
        ref = reduce_ref(full, z["layers"], z["heads"], reduce)
        assert int(z["prompt_len"]) > 48 or i == 1  # long prompts were chunked (max_num_batched_tokens=48)
        np.testing.assert_allclose(z["attention"], ref, atol=1e-4, rtol=0)
