"""The CPU capture kernel builds through setup.py's own path (as ``pip install`` runs it) and imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_setup_builds_cpu_kernel(tmp_path):
    env = dict(os.environ, ATTNCAP_BUILD_KERNELS="0", ATTNCAP_BUILD_CPU_KERNELS="1")
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
           "--build-temp", str(tmp_path / "temp")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"setup.py build_ext failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    found = list((tmp_path / "lib" / "vllm_attncap" / "engine" / "cpu").glob("_cpu_kernels*.so"))
    assert len(found) == 1, found
    assert not list((tmp_path / "lib").rglob("_kernels*.so"))  # ATTNCAP_BUILD_KERNELS=0: no CUDA extension
    probe = ("import importlib.util, sys, torch; s = importlib.util.spec_from_file_location("
             f"'vllm_attncap.engine.cpu._cpu_kernels', {str(found[0])!r}); m = importlib.util.module_from_spec(s); "
             "s.loader.exec_module(m); print(sorted(n for n in dir(m) if not n.startswith('_')), m.num_threads())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'capture_layer'" in out.stdout and "'num_threads'" in out.stdout
