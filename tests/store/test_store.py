"""The capture store: private namespaces, exact keys, claim-on-read, cleanup of dead engines (no engine needed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vllm_attncap import store as S

ROOT = Path(__file__).resolve().parents[2]




def _writer(key, req_id, *, tokens=4, prompt=3, store=None):
    meta = S.CaptureMeta(key, req_id, layers=[0], heads=[0, 1], prompt_len=prompt, max_tokens=tokens)
    return S.CaptureWriter(meta, store)


def _finished(key, req_id, value=1.0, store=None):
    w = _writer(key, req_id, store=store)
    w.write_rows(0, 0, 2, 4, np.full((2, 2, 4), value, np.float32))
    w.note_rows(2)
    w.close()


def _py(code: str, env=None, **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=60, **kw)


def test_namespace_is_private(ns, tmp_path):
    base = tmp_path / "base"
    assert stat.S_IMODE(os.lstat(base).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(ns.path).st_mode) == 0o700
    assert ns.path.parent == base and len(ns.path.name) == 35  # ns- + 32 hex digits: unpredictable
    _finished("secret-key", "req-1")
    files = [p for p in ns.path.iterdir() if p.name != "owner.json"]
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert "secret" not in files[0].name and "req" not in files[0].name  # names reveal nothing


def test_keys_match_exactly(ns):
    """Item 1: key ``team`` must not address ``team__alice`` / ``team__bob`` (nor the other way round)."""
    _finished("team__alice", "r1", 1.0)
    _finished("team__bob", "r2", 2.0)
    assert not S.key_exists("team")
    assert S.list_records("team") == []
    with pytest.raises(LookupError):
        S.read_records("team", 2, wait_s=0)
    assert S.discard_capture("team") == 0
    assert S.key_exists("team__alice") and S.key_exists("team__bob")
    _finished("team", "r3", 3.0)
    (rec,) = S.read_records("team", 2)
    assert rec.key == "team" and float(rec.array.max()) == 3.0
    assert S.discard_capture("team__alice") == 1 and S.key_exists("team__bob")


def test_any_key_and_request_id_fit(ns):
    """Item 4: a 400-character request id (past 255 bytes as a file name before) gets its record."""
    long_id = "x" * 400
    _finished("k" * 128, long_id)
    (rec,) = S.read_records("k" * 128, 2)
    assert rec.req_id == long_id and rec.array.shape == (1, 2, 2, 4)
    S.write_error("a/b", "../" * 100, "refused")
    (err,) = S.list_records("a/b")
    assert err.status == S.STATUS_ERROR and err.error == "refused"
    assert not S.key_exists("a_b")  # no two keys share a name


def test_unsafe_bases_are_refused(tmp_path):
    """Item 2: never use a base that is a symlink or another user's, nor an own base that is too open."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(S.StoreError, match="symlink"):
        S.CaptureStore.create(link)
    if os.geteuid() == 0:
        other = tmp_path / "other"
        other.mkdir(mode=0o777)
        os.chown(other, 65534, 65534)
        with pytest.raises(S.StoreError, match="owned by uid 65534"):
            S.CaptureStore.create(other)
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    with pytest.raises(S.StoreError, match="0700"):
        S.CaptureStore.create(loose)
    assert stat.S_IMODE(os.lstat(loose).st_mode) == 0o777  # refused, not changed
    store = S.CaptureStore.create(tmp_path / "base")
    os.chmod(store.path, 0o755)
    with pytest.raises(S.StoreError, match="0700"):
        S.CaptureStore.attach(store.path)
    store.remove()


def test_engines_do_not_share_captures(tmp_path):
    """Item 2: two engines on one base never see (nor evict) each other's captures."""
    a = S.CaptureStore.create(tmp_path / "base")
    b = S.CaptureStore.create(tmp_path / "base")
    try:
        assert a.path != b.path
        _finished("shared-name", "r1", store=a)
        assert b.find("shared-name") == [] and b.find() == []
        b.enforce_cap(10**9, cap=1)  # b's eviction cannot reach a's files
        assert len(a.find("shared-name")) == 1
    finally:
        a.remove()
        b.remove()


def test_claim_on_read_delivers_once_among_8_readers(ns):
    """Item 5: 8 concurrent reads of one key: exactly one gets the records, the others a LookupError."""
    for round_ in range(5):
        key = f"race-{round_}"
        _finished(key, "r0")
        _finished(key, "1_r0")
        got, errors, failures = [], [], []
        barrier = threading.Barrier(8)

        def reader():
            barrier.wait()
            try:
                got.append(S.read_records(key, [2, 2], wait_s=0))
            except LookupError as e:
                errors.append(e)
            except Exception as e:  # noqa: BLE001 - anything else is the bug
                failures.append(e)

        threads = [threading.Thread(target=reader) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        assert len(got) == 1 and len(got[0]) == 2 and len(errors) == 7
        assert not S.key_exists(key)


def test_read_racing_discard_and_writer(ns):
    """A read racing a delete never raises anything but LookupError; a record taken while the worker still
    writes is not recreated by the worker's close."""
    w = _writer("live", "r1")
    w.write_rows(0, 0, 1, 3, np.ones((2, 1, 3), np.float32))
    (rec,) = S.read_records("live", 1)
    assert rec.meta.status == S.STATUS_OPEN and rec.array.shape == (1, 2, 1, 3)
    w.write_rows(0, 1, 2, 4, np.ones((2, 1, 4), np.float32))
    w.close()
    assert S.list_records() == []
    for i in range(20):
        _finished("dr", f"r{i}")
        out = []

        def read():
            try:
                out.append(len(S.read_records("dr", 2, wait_s=0)))
            except LookupError:
                out.append(0)

        t = threading.Thread(target=read)
        t.start()
        removed = S.discard_capture("dr")
        t.join()
        assert removed + out[0] == 1


def test_ttl_and_cap(ns):
    _finished("old", "r1")
    _finished("new", "r2")
    assert ns.expire(ttl_s=3600) == 0
    time.sleep(0.05)
    assert ns.expire(ttl_s=0.01) == 2
    open_w = _writer("open", "r3")
    time.sleep(0.05)
    assert ns.expire(ttl_s=0.01) == 0  # open records are never expired
    open_w.close()


def test_owner_process_exit_removes_its_namespace(tmp_path):
    """Item 3: a graceful exit removes the namespace; after kill -9 the next engine on the base removes it."""
    base = tmp_path / "base"
    code = ("import os,sys,time; from vllm_attncap import store as S; s=S.current_store(); "
            "m=S.CaptureMeta('k','r',layers=[0],heads=[0],prompt_len=2,max_tokens=2); S.CaptureWriter(m).close(); "
            "print(s.path, flush=True); time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)")
    env = dict(os.environ, VLLM_ATTNCAP_STORE=str(base))
    env.pop(S.ENV_NAMESPACE, None)
    out = _py(code, env)
    assert out.returncode == 0, out.stderr
    assert not Path(out.stdout.strip()).exists()
    proc = subprocess.Popen([sys.executable, "-c", code, "60"], env=dict(env, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, text=True)
    path = Path(proc.stdout.readline().strip())
    assert path.is_dir() and len(list(path.glob("*.cap"))) == 1
    fresh = S.CaptureStore.create(base)  # the owner is alive: kept
    assert path.is_dir()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    fresh2 = S.CaptureStore.create(base)  # dead owner: removed, whatever its age
    assert not path.exists()
    assert sorted(p.name for p in base.iterdir()) == sorted([fresh.path.name, fresh2.path.name])
    fresh.remove()
    fresh2.remove()


def test_reused_pid_is_not_a_live_owner(tmp_path):
    base = tmp_path / "base"
    victim = S.CaptureStore.create(base)
    owner = json.loads((victim.path / "owner.json").read_text())
    assert owner["pid"] == os.getpid()
    if owner["start"] is None:
        pytest.skip("no /proc start times on this platform")
    os.chmod(victim.path / "owner.json", 0o600)
    (victim.path / "owner.json").unlink()
    (victim.path / "owner.json").write_text(json.dumps({**owner, "start": owner["start"] - 1}))
    S.sweep_dead(base)
    assert not victim.path.exists()


def test_children_inherit_the_namespace_strangers_do_not(ns, tmp_path):
    code = "from vllm_attncap import store as S; print(S.store_dir())"
    child = _py(code)
    assert child.stdout.strip() == str(ns.path), child.stderr
    # a namespace whose owner is not an ancestor (here: pid 1) is not used, even when the variable points at it
    fake = ns.path.parent / ("ns-" + "0" * 32)
    fake.mkdir(mode=0o700)
    (fake / "owner.json").write_text(json.dumps({"pid": 1, "start": S.namespace._start_time(1)}))
    stranger = _py(code, dict(os.environ, VLLM_ATTNCAP_NAMESPACE=str(fake)))
    assert stranger.returncode == 0, stranger.stderr
    assert stranger.stdout.strip() not in (str(fake), str(ns.path))
    shutil.rmtree(fake)


def test_a_non_descendant_joins_with_the_token_only(tmp_path):
    """Ray starts an engine's workers from its daemons, not as the engine's children, with the driver's VLLM_*
    variables: the join token lets them in; a wrong token, no token, or a dead owner does not."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), VLLM_ATTNCAP_STORE=str(tmp_path / "base"))
    for k in ("VLLM_ATTNCAP_NAMESPACE", "VLLM_ATTNCAP_NAMESPACE_TOKEN"):
        env.pop(k, None)
    owner = subprocess.Popen(
        [sys.executable, "-c", "import os,sys\nfrom vllm_attncap import store as S\nS.current_store()\n"
         "print(os.environ['VLLM_ATTNCAP_NAMESPACE'], os.environ['VLLM_ATTNCAP_NAMESPACE_TOKEN'], flush=True)\n"
         "sys.stdin.read()"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        path, token = owner.stdout.readline().split()
        assert len(token) == 32 and token in (Path(path) / "owner.json").read_text()
        code = "from vllm_attncap import store as S; print(S.store_dir())"
        sibling = dict(env, VLLM_ATTNCAP_NAMESPACE=path)  # a sibling of the owner, not its descendant
        assert _py(code, dict(sibling, VLLM_ATTNCAP_NAMESPACE_TOKEN=token)).stdout.strip() == path
        for bad in ({}, {"VLLM_ATTNCAP_NAMESPACE_TOKEN": "0" * 32}):
            r = _py(code, dict(sibling, **bad))
            assert r.returncode == 0 and r.stdout.strip() not in ("", path), (bad, r.stderr)
        assert Path(path).is_dir()  # the joiner does not remove the owner's namespace when it exits
    finally:
        owner.stdin.close()
        owner.wait(timeout=30)
    assert not Path(path).exists()  # the owner removed it at exit
    # a dead owner's token opens nothing: recreate the directory as the dead owner left it
    Path(path).mkdir(mode=0o700)
    (Path(path) / "owner.json").write_text(json.dumps({"pid": owner.pid, "start": None, "join": token}))
    r = _py(code, dict(env, VLLM_ATTNCAP_NAMESPACE=path, VLLM_ATTNCAP_NAMESPACE_TOKEN=token))
    assert r.returncode == 0 and r.stdout.strip() != path, r.stderr


def _setpriv_works() -> str | None:
    if os.geteuid() != 0:
        return "needs root to switch to a second uid"
    if shutil.which("setpriv") is None:
        return "setpriv is not installed"
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", "1"],
                       capture_output=True, timeout=30)
    return None if r.returncode == 0 else f"setpriv cannot run Python as uid 65534: {r.stderr[-200:]!r}"


def test_a_second_uid_cannot_read_or_plant(tmp_path):
    """Item 2 with a real second user (uid 65534 via setpriv)."""
    why = _setpriv_works()
    if why:
        pytest.skip(why)
    os.chmod(tmp_path, 0o755)
    base = tmp_path / "base"
    store = S.CaptureStore.create(base)
    try:
        _finished("k", "r", store=store)
        (rec,) = store.find("k")
        record = next(store.path.glob("*.cap"))
        probe = (
            "import os,sys\n"
            "res=[]\n"
            "for op in (lambda: os.listdir(sys.argv[1]), lambda: os.listdir(sys.argv[2]),\n"
            "           lambda: open(sys.argv[3],'rb').read(1), lambda: open(sys.argv[2]+'/planted','w')):\n"
            "    try: op(); res.append('ok')\n"
            "    except PermissionError: res.append('denied')\n"
            "print(','.join(res))\n"
        )
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                            probe, str(base), str(store.path), str(record)], capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == "denied,denied,denied,denied", r.stderr
        # the second user's own default-style base next to ours: ours refuses theirs
        theirs = tmp_path / "theirs"
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "mkdir", "-m", "777",
                            str(theirs)], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            with pytest.raises(S.StoreError, match="owned by uid 65534"):
                S.CaptureStore.create(theirs)
    finally:
        store.remove()
