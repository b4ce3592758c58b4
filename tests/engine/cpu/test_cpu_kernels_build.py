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


def test_unbuilt_kernel_is_said_once_and_the_torch_path_is_used(monkeypatch, caplog):
    """A source tree without the compiled kernel captures on the torch path, and says so once (not per step)."""
    import logging

    from vllm_attncap.engine.cpu import capture as cpu_capture
    from vllm_attncap.engine.cpu import kernels as cpu_kernels

    monkeypatch.setattr(cpu_kernels, "_ext", None)
    monkeypatch.setattr(cpu_capture, "_warned_unbuilt", False)
    monkeypatch.delenv("VLLM_ATTNCAP_CPU_KERNEL", raising=False)
    with caplog.at_level(logging.WARNING, logger="vllm_attncap"):
        assert [cpu_capture.kernel_enabled() for _ in range(3)] == [False] * 3
    said = [r.getMessage() for r in caplog.records if "CPU capture kernel" in r.getMessage()]
    assert len(said) == 1 and "torch path" in said[0] and "build_ext --inplace" in said[0]
    monkeypatch.setenv("VLLM_ATTNCAP_CPU_KERNEL", "0")  # switched off: no kernel wanted, nothing said
    caplog.clear()
    monkeypatch.setattr(cpu_capture, "_warned_unbuilt", False)
    assert cpu_capture.kernel_enabled() is False and not caplog.records
