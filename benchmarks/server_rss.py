"""Engine-process RSS growth of `vllm serve` under N requests: stock backend vs attncap (without / with capture).

Each configuration starts its own server on 127.0.0.1 (a private capture store base in a temporary directory),
sends a warm-up, records the RSS of the server's engine processes (EngineCore, which runs the model with one
worker), sends N completions at a fixed concurrency (capture requests fetch their capture, as a client would),
and records the RSS again. It prints one row per configuration, side by side:

    python benchmarks/server_rss.py --requests 400                       # all three, bundled SmolLM2
    python benchmarks/server_rss.py --requests 400 --configs stock       # one at a time (shorter runs)

Configurations: ``stock`` (no attncap backend), ``attncap`` (attncap backend, requests without a spec),
``capture`` (attncap backend, every request captures the last layer, head-mean, and fetches it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

CONFIGS = ("stock", "attncap", "capture")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _descendants(pid: int) -> list[int]:
    kids = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _engine_rss(api_pid: int) -> float:
    """RSS (MiB) of the server's engine processes (its descendants; the resource tracker is tiny)."""
    total = 0.0
    for pid in _descendants(api_pid):
        try:
            total += _rss_mb(pid)
        except OSError:
            pass
    return total


def run_config(name: str, model: str, n: int, concurrency: int, max_tokens: int, warmup: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="attncap-rss-"))
    port = _free_port()
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--enforce-eager",
            "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port)]
    if name != "stock":
        args += ["--attention-backend", "attncap"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ATTNCAP_STORE=str(root / "store"))
    env.pop("VLLM_ATTNCAP_NAMESPACE", None)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() - t0 > 600:
                raise RuntimeError("server not healthy after 600 s")
            time.sleep(1)
        xargs = {"attncap_layers": [-1], "attncap_reduce": "head_mean"} if name == "capture" else None

        def one(i: int) -> None:
            body = {"model": model, "prompt": f"Request {i}: my printer stopped working after the update, what now?",
                    "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
            if xargs:
                body["vllm_xargs"] = xargs
            r = requests.post(f"{url}/v1/completions", json=body, timeout=300)
            r.raise_for_status()
            if xargs:  # small captures ride inline (VLLM_ATTNCAP_INLINE_MAX_BYTES); a handle is fetched by key
                field = r.json()["choices"][0].get("attncap") or {}
                if "arrays" not in field:
                    requests.get(f"{url}/v1/attncap/{r.json()['id']}", timeout=300).raise_for_status()

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(warmup)))
            rss0 = _engine_rss(proc.pid)
            t1 = time.monotonic()
            list(pool.map(one, range(n)))
            elapsed = time.monotonic() - t1
        rss1 = _engine_rss(proc.pid)
        left = len(list((root / "store").glob("ns-*/*.cap")))
        return {"config": name, "requests": n, "rss_before_mb": rss0, "rss_after_mb": rss1,
                "growth_mb": rss1 - rss0, "seconds": elapsed, "records_left": left}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--json", action="store_true", help="print one JSON line per configuration as well")
    a = ap.parse_args()
    model = a.model
    if model is None:
        from vllm_attncap.default_model import default_model_path

        model = str(default_model_path())
    rows = [run_config(c, model, a.requests, a.concurrency, a.max_tokens, a.warmup) for c in a.configs]
    print(f"{'config':<9} {'requests':>8} {'RSS before':>11} {'RSS after':>10} {'growth':>8} {'s':>6} {'left':>5}")
    for r in rows:
        print(f"{r['config']:<9} {r['requests']:>8} {r['rss_before_mb']:>9.0f}MB {r['rss_after_mb']:>8.0f}MB "
              f"{r['growth_mb']:>+6.1f}MB {r['seconds']:>6.1f} {r['records_left']:>5}")
        if a.json:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
