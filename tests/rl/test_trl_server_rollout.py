"""TRL server mode with captures: GRPO (TRL 1.16, ``rollout_func``) trains two steps on a CAGSR reward read from
captures that a separate attncap server process made (loopback HTTP, ``/inference/v1/generate``, inline field),
with the grounding term's log-probabilities computed by the same server (``prompt_logprobs``).
Weight sync to the server is out of scope on CPU (docs/rl.md says what the GPU recipe does instead)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")
requests = pytest.importorskip("requests")


pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_grpo_trains_on_rewards_from_server_captures(scale_out_server, tmp_path):
    srv = scale_out_server  # the session's loopback server (tests/conftest.py): tiny Llama, token endpoint, inline
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("trl_server_run.py")), srv["base"],
                           str(srv["model_dir"]), str(tmp_path)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    res = json.loads((tmp_path / "result.json").read_text())
    records = requests.get(f"{srv['base']}/v1/attncap", timeout=30).json()
    assert res["global_step"] == 2
    assert len(res["seen"]) == 2  # one reward call per step
    for call in res["seen"]:
        assert call["has_captures"] and call["all_captured"] and call["tokens_match"]
        # the CAGSR reward grounds (eta > 0) without a likelihood: the server computed the log-probabilities
        # (the server runs the float32 checkpoint in bfloat16, vLLM's CPU choice for "auto": errors of ~1e-2, against
        # a gap of ~0.3 between the two contexts' log-probabilities)
        assert call["has_logprobs"], call
        assert max(call["lp_err"], call["prior_err"]) < min(0.03, call["context_gap"] / 3), call
        assert max(call["rows_sum"]) < 1e-4  # real attention rows (each sums to 1)
        assert all(np.isfinite(r) for r in call["rewards"])
    assert len(res["logged_rewards"]) == 2 and all(np.isfinite(res["logged_rewards"]))
    # the rewards differ between completions: they were computed from each completion's own capture
    assert len({round(r, 6) for call in res["seen"] for r in call["rewards"]}) > 1
    assert records["records"] == 0  # every capture was delivered inline and deleted
