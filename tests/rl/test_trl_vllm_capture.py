"""TRL GRPO/RLOO with colocated vLLM (CPU) feeding captured attention (and, for the grounding term, token
log-probabilities) to the reward functions.

The GRPO run checks, for every completion of both steps, that the reward function received the attention vLLM
captured while generating it -- right shape, and equal to Hugging Face eager attention of the policy *as it was when
the batch was generated* (so the step-2 captures prove the weight sync of step 1 reached the engine), that the
engine's log-probabilities of each completion after its prompt and after the empty conversation equal that policy's,
and that after TRL's own weight sync the engine holds exactly the trained policy's weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("vllm")

from rl_utils import free_engine  # noqa: E402

from cagsr_reward import CAGSRConfig  # noqa: E402
from cagsr_reward.integrations.trl import cagsr_reward_func  # noqa: E402
from cagsr_reward.advantages import block_advantages  # noqa: E402
from vllm_attncap.rl.engine_weights import (  # noqa: E402
    engine_model,
    engine_weight_mismatch,
    keep_cpu_linear_weights,
)
from vllm_attncap.rl.trainers import DEFAULT_CAPTURE_SPEC, capture_spec_for  # noqa: E402

pytestmark = pytest.mark.engine


def _run(scenario: str, model_dir, tmp_path) -> dict:
    """Run one TRL training scenario of trl_capture_runs.py in a fresh interpreter and return what it measured."""
    script = Path(__file__).with_name("trl_capture_runs.py")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    r = subprocess.run(
        [sys.executable, str(script), scenario, str(model_dir), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((tmp_path / "result.json").read_text())


def test_grpo_reward_sees_captured_attention_and_weights_sync(tiny_llama, tmp_path):
    res = _run("grpo", tiny_llama, tmp_path)
    assert res["spec"] == {"layers": [-1], "reduce": "head_mean"}
    batches = [row for row in res["seen"] if "batch" in row]
    rows = [row for row in res["seen"] if "shape" in row]
    # 2 steps, every completion came with its capture and (the CAGSR reward grounds with eta > 0 and has no
    # likelihood) with the engine's log-probabilities
    assert res["eta"] > 0
    assert batches == [{"batch": 4, "entries": 4, "logprob_entries": 4}] * 2
    assert len(rows) == 8
    for row in rows:
        assert row["shape"] == [1, 1, row["T"], row["P"] + row["T"] - 1]
        assert row["prompt_len"] == row["P"]
        assert row["layer_ids"] == [2]  # the last of 3 layers
        assert row["token_ids_match"]  # the capture knows the completion it belongs to
        assert row["err_now"] < 1e-4, row  # captured while generating == eager attention of the current policy
        assert row["lp_err"] < 1e-4 and row["prior_err"] < 1e-4, row  # the engine's log-probs == the policy's
    # step 2 generated after a large update: the engine generated with the updated weights, not the initial ones
    assert max(r["err_initial"] for r in rows[4:]) > 1e-3
    assert len(res["logged_rewards"]) == 2 and all(np.isfinite(res["logged_rewards"]))
    assert len(res["logged_grounding"]) == 2 and all(np.isfinite(res["logged_grounding"]))
    assert res["stale"] > 0.0  # the last optimizer step changed the policy after the last sync ...
    assert res["synced"] == 0.0  # ... and TRL's sync (with our repack) makes the engine hold exactly its weights
    assert res["logprob_err"] < 1e-4  # and compute with them


@pytest.mark.slow
def test_rloo_reward_sees_captured_attention(tiny_llama, tmp_path):
    res = _run("rloo", tiny_llama, tmp_path)
    assert res["seen"] == [True] * 4


@pytest.mark.slow
def test_grpo_block_advantages_for_cot(tiny_llama, tmp_path):
    """CoT mode: the advantages handed to the loss are (B, T), constant over each 5-token block, and equal to
    block_advantages() of the reward's returns."""
    res = _run("grpo_block", tiny_llama, tmp_path)
    adv = np.array(res["adv"])
    assert adv.ndim == 2 and adv.shape[0] == 4
    expected = block_advantages([np.array(g) for g in res["returns"]], res["spans"], 4, adv.shape[1])
    assert np.allclose(adv, expected, atol=1e-6)
    for row, spans in zip(adv, res["spans"]):
        for s0, s1 in spans:
            assert np.allclose(row[s0:s1], row[s0])
    assert np.abs(adv).max() > 0


def _grpo_args(tmp_path, **kw):
    from trl import GRPOConfig

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, use_vllm=True,
                vllm_mode="colocate", use_cpu=True, report_to=[], max_steps=1)
    base.update(kw)
    return GRPOConfig(**base)


def test_capture_trainer_rejects_server_mode_and_n(tiny_llama, tmp_path):
    from vllm_attncap.rl.trainers import CaptureGRPOTrainer

    with pytest.raises(ValueError, match="colocate"):
        CaptureGRPOTrainer(model=str(tiny_llama), reward_funcs=[lambda **k: [0.0]], args=_grpo_args(tmp_path, vllm_mode="server"))
    with pytest.raises(ValueError, match="'n'"):
        CaptureGRPOTrainer(
            model=str(tiny_llama), reward_funcs=[lambda **k: [0.0]], args=_grpo_args(tmp_path, generation_kwargs={"n": 2})
        )


def test_keep_cpu_linear_weights_makes_engine_loadable(tiny_llama):
    """Inside the fix every linear layer keeps a loadable weight and computes with it: loading new weights changes
    the engine's output; outside it vLLM may repack and drop the weights (machine dependent)."""
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=0)
    prompt = {"prompt_token_ids": [5, 17, 33, 41, 9]}
    with keep_cpu_linear_weights():
        llm = LLM(model=str(tiny_llama), enforce_eager=True, dtype="float32", max_model_len=128, attention_backend="attncap")
    model = engine_model(llm)
    linear = model.model.layers[0].self_attn.qkv_proj
    assert linear.weight.numel() > 0 and hasattr(linear.weight, "weight_loader")
    before = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].logprobs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(1.5)
    from vllm_attncap.rl.engine_weights import sync_engine_weights

    sync_engine_weights(llm, hf.named_parameters())
    assert engine_weight_mismatch(llm, hf) == 0.0
    after = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].logprobs[0]
    tok_before, tok_after = next(iter(before)), next(iter(after))
    lp_before = before[tok_before].logprob
    lp_after = after[tok_after].logprob
    assert (tok_before, round(lp_before, 4)) != (tok_after, round(lp_after, 4))
    # and the new logits are the scaled model's (HF reference on the same prompt)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt["prompt_token_ids"]])).logits[0, -1], -1)
    assert abs(ref[tok_after].item() - lp_after) < 1e-3
    free_engine(llm)


def test_block_advantages_math():
    G = [np.array([2.0, 1.0, 0.5]), np.array([1.0, 0.0]), np.array([0.0]), np.array([3.0, 3.0])]
    spans = [[(0, 5), (5, 10), (10, 12)], [(0, 5), (5, 7)], [(0, 3)], [(0, 5), (5, 6)]]
    A = block_advantages(G, spans, group_size=2, width=12)
    scale1 = np.std([2.0, 1.0], ddof=1) + 1e-4
    assert np.allclose(A[0, :5], (2.0 - 1.5) / scale1)
    assert np.allclose(A[0, 5:10], (1.0 - 0.5) / scale1)
    assert np.allclose(A[0, 10:12], (0.5 - np.mean([0.5, 0.0])) / scale1)  # shorter completion: its last block
    assert np.allclose(A[1, 7:], 0.0)  # padding
    scale2 = np.std([0.0, 3.0], ddof=1) + 1e-4
    assert np.allclose(A[3, 5:6], (3.0 - np.mean([0.0, 3.0])) / scale2)
    with pytest.raises(ValueError, match="multiple"):
        block_advantages(G[:3], spans[:3], group_size=2, width=12)


def test_capture_spec_follows_reward_config(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert capture_spec_for([lambda **k: []]) == DEFAULT_CAPTURE_SPEC
    f = cagsr_reward_func(CAGSRConfig(layers=(-2, -1)), tokenizer=tok)
    g = cagsr_reward_func(CAGSRConfig(layers=(0,), heads=(1,)), tokenizer=tok)
    assert capture_spec_for([f]) == {"layers": [-2, -1], "reduce": "head_mean"}
    assert capture_spec_for([f, g]) == {"layers": [-2, -1, 0], "reduce": "none"}
    # the default band "last:K" is resolved against the model's depth when scoring, so every layer is captured
    assert capture_spec_for([cagsr_reward_func(CAGSRConfig(), tokenizer=tok)]) == {"layers": "all", "reduce": "head_mean"}


def test_module_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, vllm_attncap.rl, vllm_attncap.rl.trainers, vllm_attncap.rl.ppo, vllm_attncap.rl.evaluation, "
        "vllm_attncap.rl.engine_weights, cagsr_reward.integrations.ppo, cagsr_reward.integrations.cot, "
        "cagsr_reward.integrations.user_sim, cagsr_reward.integrations.embedding, cagsr_reward.metrics; "
        "print(sorted(m for m in ('trl', 'vllm', 'torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
