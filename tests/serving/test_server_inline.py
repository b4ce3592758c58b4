"""Captures delivered inline (vllm_attncap/serving/inline.py) by a real server process on the loopback: the per-choice
``attncap`` field on completions and chat (the real OpenAI client) and on the token-in/token-out endpoint
``/inference/v1/generate`` (plain HTTP); the field decodes with numpy to the arrays ``generate_with_attentions`` gives
for the same request (computed offline, in a subprocess); a capture over the inline
limit comes as a handle and is fetched by key; bad ``topk`` / ``prompt_start`` are a 400 naming the field.

The server is the session's shared ``scale_out_server`` (tests/conftest.py; the TRL server-mode test uses it too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

requests = pytest.importorskip("requests")
openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).parent))  # tests/serving: the server helpers
sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared top-k check
sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))  # the tiny model
from server_utils import SCALE_OUT_INLINE_LIMIT  # noqa: E402
from topk_check import assert_topk_matches  # noqa: E402

from vllm_attncap.serving.inline import decode_array  # noqa: E402

pytestmark = pytest.mark.engine

INLINE_LIMIT = SCALE_OUT_INLINE_LIMIT
PROMPT = "Alice lives in Paris. Where does Alice live?"
TOPK_SPEC = {"layers": [-1], "reduce": "head_mean", "topk": 4}
TOKEN_SPEC = {"layers": [0, -1], "topk": 3, "prompt_start": 2}
MAX_TOKENS = 6

OFFLINE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm_attncap import generate_with_attentions
    model, out, prompt, spec_a, spec_b = sys.argv[1:6]
    if __name__ == "__main__":
        llm = LLM(model=model, attention_backend="attncap", enforce_eager=True, max_model_len=512, seed=0)
        sp = SamplingParams(max_tokens=%d, temperature=0, ignore_eos=True)
        a = generate_with_attentions(llm, prompt, sp, spec=json.loads(spec_a), use_tqdm=False)[0]
        ids = a.prompt_token_ids
        b = generate_with_attentions(llm, {"prompt_token_ids": ids}, sp, spec=json.loads(spec_b), use_tqdm=False)[0]
        np.savez(out, a_pos=a.topk_positions, a_val=a.topk_probs, a_tokens=np.array(a.token_ids),
                 prompt_ids=np.array(ids), b_pos=b.topk_positions, b_val=b.topk_probs, b_tokens=np.array(b.token_ids))
""" % MAX_TOKENS)


@pytest.fixture(scope="module")
def setup(scale_out_server, tmp_path_factory):
    """The shared server (tests/conftest.py) and what ``generate_with_attentions`` gives offline on its model."""
    srv = scale_out_server
    root = tmp_path_factory.mktemp("attncap-inline")
    model = srv["model_dir"]
    script = root / "offline.py"
    script.write_text(OFFLINE)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_ATTNCAP_STORE=str(root / "offline-store"))
    env.pop("VLLM_ATTNCAP_NAMESPACE", None)
    done = subprocess.run([sys.executable, str(script), str(model), str(root / "expected.npz"), PROMPT,
                           json.dumps(TOPK_SPEC), json.dumps(TOKEN_SPEC)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    expected = dict(np.load(root / "expected.npz"))
    yield srv, expected
    assert requests.get(f"{srv['base']}/v1/attncap", timeout=30).json()["records"] == 0  # every capture delivered


def _client(srv):
    return openai.OpenAI(base_url=f"{srv['base']}/v1", api_key="unused")


def _same_topk(pos, val, want_pos, want_val):
    """Equal to the offline arrays: probabilities within 1e-6, positions equal except between near-ties."""
    assert pos.dtype == np.int32 and val.dtype == np.float32 and pos.shape == want_pos.shape
    np.testing.assert_allclose(val, want_val, atol=1e-6, rtol=0)
    differ = pos != want_pos
    if differ.any():  # only where the two runs' probabilities tie to 1e-6
        assert np.abs(val[differ] - want_val[differ]).max() < 1e-6


def test_completions_inline_topk_equals_generate_with_attentions(setup):
    srv, want = setup
    resp = _client(srv).completions.create(
        model=srv["model"], prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True, "vllm_xargs": {"attncap": json.dumps(TOPK_SPEC)}},
    )
    field = resp.choices[0].model_extra["attncap"]
    assert field["mode"] == "topk" and field["topk"] == 4 and field["num_tokens"] == MAX_TOKENS
    arrays = field["arrays"]
    assert arrays["topk_positions"]["dtype"] == "int32" and arrays["topk_probs"]["dtype"] == "float32"
    pos, val = decode_array(arrays["topk_positions"]), decode_array(arrays["topk_probs"])
    assert list(pos.shape) == arrays["topk_positions"]["shape"] == [1, 1, MAX_TOKENS, 4]
    _same_topk(pos, val, want["a_pos"], want["a_val"])
    # delivered once: the store no longer holds it
    assert requests.get(f"{srv['base']}/v1/attncap/{field['key']}", params={"wait": 0}).status_code == 404


def test_chat_inline_rows_and_topk(setup):
    srv, _ = setup
    client = _client(srv)
    msgs = [{"role": "user", "content": "where is my printer?"}]
    rows = client.chat.completions.create(
        model=srv["model"], messages=msgs, max_tokens=4, temperature=0,
        extra_body={"ignore_eos": True, "vllm_xargs": {"attncap_layers": [-1], "attncap_reduce": "head_mean"}},
    ).choices[0].model_extra["attncap"]
    att = decode_array(rows["arrays"]["attention"])
    P = rows["prompt_len"]
    assert att.shape == (1, 1, 4, P + 3) and att.dtype == np.float32
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    top = client.chat.completions.create(
        model=srv["model"], messages=msgs, max_tokens=4, temperature=0,
        extra_body={"ignore_eos": True, "vllm_xargs": {"attncap_layers": [-1], "attncap_reduce": "head_mean",
                                                        "attncap_topk": 5}},
    ).choices[0].model_extra["attncap"]
    pos, val = decode_array(top["arrays"]["topk_positions"]), decode_array(top["arrays"]["topk_probs"])
    # the top-k of the same greedy rows (the second request repeats the first)
    assert_topk_matches(pos, val, att, list(range(P - 1, P + 3)), prob_tol=1e-5, tie_tol=1e-6)


def test_token_endpoint_inline_topk_with_prompt_start(setup):
    srv, want = setup
    body = {"token_ids": want["prompt_ids"].tolist(),
            "sampling_params": {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                                "extra_args": {"attncap": TOKEN_SPEC}}}
    r = requests.post(f"{srv['base']}/inference/v1/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == want["b_tokens"].tolist()
    field = choice["attncap"]
    assert field["prompt_start"] == 2 and field["prompt_len"] == len(want["prompt_ids"])
    pos, val = decode_array(field["arrays"]["topk_positions"]), decode_array(field["arrays"]["topk_probs"])
    assert pos.shape == (2, 4, len(want["prompt_ids"]) - 2 + MAX_TOKENS, 3)
    _same_topk(pos, val, want["b_pos"], want["b_val"])


def test_large_capture_comes_by_key(setup):
    srv, _ = setup
    resp = _client(srv).completions.create(  # 3 layers x 4 heads x 6 rows of ~120 columns: ~36 kB > the limit
        model=srv["model"], prompt=" ".join([PROMPT] * 10), max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True, "vllm_xargs": {"attncap_reduce": "none"}},
    )
    field = resp.choices[0].model_extra["attncap"]
    assert field["inline"] is False and field["nbytes"] > INLINE_LIMIT and "arrays" not in field
    got = requests.get(f"{srv['base']}/v1/attncap/{field['key']}", timeout=60)
    assert got.status_code == 200 and got.json()["shape"][:3] == [3, 4, MAX_TOKENS]


@pytest.mark.parametrize("xargs, field", [
    ({"attncap_topk": 0}, "topk"), ({"attncap_topk": 2000}, "topk"),
    ({"attncap_topk": 4, "attncap_reduce": "layer_head_mean"}, "reduce"),
    ({"attncap_prompt_start": 3}, "prompt_start"), ({"attncap_topk": 4, "attncap_prompt_start": 9999}, "prompt_start"),
])
def test_bad_topk_is_a_400_naming_the_field(setup, xargs, field):
    srv, _ = setup
    with pytest.raises(openai.BadRequestError) as info:
        _client(srv).completions.create(model=srv["model"], prompt=PROMPT, max_tokens=2,
                                        extra_body={"vllm_xargs": xargs})
    assert f"'{field}'" in str(info.value)


@pytest.mark.parametrize("spec, field", [({"topk": 0}, "topk"), ({"topk": 2, "prompt_start": 999}, "prompt_start")])
def test_token_endpoint_bad_topk_is_a_400(setup, spec, field):
    srv, want = setup
    body = {"token_ids": want["prompt_ids"].tolist(),
            "sampling_params": {"max_tokens": 2, "extra_args": {"attncap": spec}}}
    r = requests.post(f"{srv['base']}/inference/v1/generate", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert f"'{field}'" in r.text
