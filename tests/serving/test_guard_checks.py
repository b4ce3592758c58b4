"""The guard's checks without a server (issue 28): the body as parsed, whatever its spelling; caller keys and
request ids in separate name spaces; one HTTP request per caller key; the TTL on reads; a base the process cannot
own. tests/serving/test_server_guard.py runs the same through a real server."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from vllm_attncap import store as S
from vllm_attncap.serving import admission
from vllm_attncap.serving.admission import admit_request
from vllm_attncap.serving.install import _first_event_verdict, _needs_parse
from vllm_attncap.serving.xargs import SpecError, check_request_body, spec_from_xargs


def _body(xargs_json: str) -> bytes:
    return b'{"model": "m", "prompt": "hi", "max_tokens": 2, "vllm_xargs": %s}' % xargs_json.encode()


@pytest.mark.parametrize(
    "xargs_json, field",
    [
        ('{"\\u0061ttncap_layers": true}', "layers"),
        ('{"attncap_layers": [0], "attncap_l\\u0061yers": [1]}', "layers"),
        ('{"attncap_layers": [0]}, "vllm_xargs": {"attncap_layers": [1]}', None),
        ('{"attncap_layers": [1000000000000000000000000000000]}', "layers"),
        ('{"attncap_n_max": 1180591620717411303424}', "n_max"),
        ('{"attncap": "{\\"layers\\": [%s]}"}' % ("9" * 5001), "layers"),
        ('{"attncap_layers": [%s]}' % ("9" * 5001), "layers"),
        ('{"attncap_reduce": "max"}', "reduce"),
        ('{"attncap_colour": "red"}', "colour"),
        ('{"attncap": "{\\"layers\\": [0], \\"l\\\\u0061yers\\": [1]}"}', "layers"),  # twice in the JSON string
    ],
)
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-le", "utf-32"])
def test_body_checked_as_parsed(xargs_json, field, encoding):
    raw = _body(xargs_json).decode().encode(encoding)
    assert _needs_parse(raw)
    check = check_request_body(raw)
    assert check.asks_capture and isinstance(check.error, SpecError), check
    assert check.error.field == field and str(check.error)
    if field:
        assert f"'{field}'" in str(check.error)


def test_body_spellings_agree():
    plain = check_request_body(_body('{"attncap_layers": [-1], "attncap_key": "k"}'))
    escaped = check_request_body(_body('{"\\u0061ttncap_layers": [-1], "attncap_\\u006bey": "k"}').decode()
                                 .encode("utf-16"))
    assert plain.asks_capture and escaped.asks_capture and plain.error is None and escaped.error is None
    # the token endpoint's nested extra_args, a JSON object spec
    nested = check_request_body(b'{"token_ids": [1], "sampling_params": {"extra_args": {"attncap": {"reduce": "x"}}}}')
    assert nested.error is not None and nested.error.field == "reduce"
    # no spec name as a key: not a capture request, whatever the text says
    assert not check_request_body(b'{"prompt": "attncap_layers \\u0041"}').asks_capture
    assert not _needs_parse(b'{"prompt": "plain"}')


def test_spec_integers_and_booleans_name_the_field():
    for xargs, field in [({"attncap_layers": [2**63]}, "layers"), ({"attncap_sink": True}, "sink"),
                         ({"attncap": json.dumps({"n_max": 2**70})}, "n_max"),
                         ({"attncap": {"salient": [[1, 10**40]]}}, "salient")]:
        with pytest.raises(SpecError) as e:
            spec_from_xargs(xargs)
        assert e.value.field == field and f"'{field}'" in str(e.value)
    assert spec_from_xargs({"attncap_layers": [2**63 - 1]})[0] == {"layers": [2**63 - 1]}


def test_stream_verdict():
    err = b'data: {"error": {"message": "attncap spec field \'layers\': index 40", "code": 400}}\n\n'
    assert _first_event_verdict(err, final=False)[:2] == ("error", 400)
    other = b'event: error\ndata: {"type": "error", "error": {"message": "mangled"}}\n\n'
    assert _first_event_verdict(other, final=False) == "pass"
    assert _first_event_verdict(other, final=False, refused=True)[:2] == ("error", 400)
    prelude = b'event: response.created\ndata: {"type": "response.created"}\n\n'
    assert _first_event_verdict(prelude, final=False) is None  # held with what follows
    assert _first_event_verdict(prelude + b'data: {"choices": []}\n\n', final=False) == "pass"
    assert _first_event_verdict(b'data: {"choi', final=False) is None
    assert _first_event_verdict(b'data: {"choi', final=True) == "pass"


@pytest.fixture
def store(tmp_path, monkeypatch):
    ns = S.CaptureStore.create(tmp_path / "store")
    S.set_current_store(ns)
    monkeypatch.setattr(admission, "_reservations", {})
    monkeypatch.setattr(admission, "_owners", {})
    yield ns
    S.set_current_store(None)
    ns.remove()


def _admit(extra, request_id, caller=None):
    return admit_request(extra, request_id=request_id, prompt_len=4, max_tokens=2, n=1, num_layers=3, num_heads=4,
                         max_model_len=64, max_bytes=10**6, max_pending_bytes=10**7, caller=caller)


def test_one_http_request_per_caller_key(store):
    spec = {"attncap_key": "k", "attncap_layers": [-1]}
    first, second = object(), object()
    assert _admit(spec, "cmpl-same-0", first)["attncap"]["key"] == "k"
    assert _admit(spec, "cmpl-same-1", first)["attncap"]["key"] == "k"  # the next prompt of the same request
    for rid, caller in (("cmpl-same-0", second), ("cmpl-same-2", second), ("cmpl-same-0", first)):
        with pytest.raises(SpecError, match="pending") as e:
            _admit(spec, rid, caller)
        assert e.value.field == "key"


def test_name_spaces_do_not_meet(store):
    for key in ("cmpl-x", "generate-tokens-1", "transcription-a"):
        with pytest.raises(SpecError, match="prefix") as e:
            _admit({"attncap_key": key}, "cmpl-a-0")
        assert e.value.field == "key"
    with pytest.raises(SpecError, match="request-id prefixes") as e:  # a Responses request_id the caller chose
        _admit({"attncap_layers": [-1]}, "team-1")
    assert e.value.field == "key"
    assert _admit({"attncap_layers": [-1]}, "resp_abc")["attncap"]["key"] == "resp_abc"


def test_reads_never_return_an_expired_record(tmp_path, monkeypatch):
    ns = S.CaptureStore.create(tmp_path / "b")
    try:
        monkeypatch.setenv("VLLM_ATTNCAP_TTL_S", "0.5")
        ns.write_error("old", "old-1", "refused")  # a closed record
        assert ns.exists("old")
        time.sleep(0.7)
        assert not ns.exists("old") and ns.find() == []
        assert list(ns.path.glob("*.cap")) == []  # removed on the way, not only hidden
    finally:
        ns.remove()


def test_base_of_another_uid_gives_a_private_base(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory of another uid")
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    os.chown(hostile, 65534, 65534)
    monkeypatch.setenv("VLLM_ATTNCAP_STORE", str(hostile))
    ns = S.CaptureStore.create()
    try:
        base = ns.path.parent
        assert base.parent == tmp_path and base.name.startswith(f"vllm-attncap-{os.geteuid()}-private-")
        assert stat.S_IMODE(os.lstat(base).st_mode) == 0o700 and os.lstat(base).st_uid == os.geteuid()
        assert "owned by uid 65534" in S.base_note()
        with pytest.raises(S.StoreError):  # an explicit base is what the caller asked for: refused, not replaced
            S.CaptureStore.create(hostile)
    finally:
        ns.remove()
    assert not base.exists() and list(tmp_path.iterdir()) == [hostile]
