"""The CUDA extension builds through setup.py's own path (no GPU needed).

Runs ``python setup.py build_ext`` into a temporary directory exactly as an
install does, then checks the module: it imports without a GPU or driver
(the CUDA runtime is linked statically and initialises lazily), lists its
functions, and embeds sm_80 and sm_90 machine code plus sm_90 PTX for every
kernel. Skips when nvcc is absent. The build takes 35-45 s of wall time on 2
cores, hence the ``slow`` marker on the tests that need it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _kernel_build_module():
    spec = importlib.util.spec_from_file_location("attncap_kernel_build_test", ROOT / "kernels" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kb = _kernel_build_module()
NVCC = kb.find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")

EXPECTED_FUNCTIONS = {"paged_attention_probs", "head_mean", "history_stats", "elide_rows", "preload", "decode_capture",
                      "DecodeCaptureParams", "topk_keys",
                      "cuda_runtime_version", "device_count"}
KERNEL_NAMES = {"probs.cu": (b"probs_chunk_kernel", b"probs_normalize_kernel"),
                "decode_capture.cu": (b"decode_pass1_kernel", b"decode_rows_kernel"),
                "reduce.cu": (b"head_mean_kernel", b"history_stats_kernel", b"elide_rows_kernel"),
                "topk.cu": (b"topk_keys_kernel",)}


def _setup_build_ext(tmp: Path, mode: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    # the CPU kernel off: these tests are about the CUDA extension, and test_cpu_kernels_build.py compiles the CPU
    # one (each compile of cpu_capture.cpp costs ~10 s on 2 cores)
    env = dict(os.environ, ATTNCAP_BUILD_KERNELS=mode, ATTNCAP_BUILD_CPU_KERNELS="0", ATTNCAP_CUDA_ARCHS="8.0;9.0+PTX")
    env.update(extra_env or {})
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp / "lib"), "--build-temp", str(tmp / "temp")]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def built_module(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("attncap_build")
    res = _setup_build_ext(tmp, "1")
    assert res.returncode == 0, f"setup.py build_ext failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    found = list((tmp / "lib" / "vllm_attncap" / "engine" / "cuda").glob("_kernels*.so"))
    assert len(found) == 1, f"expected one built module, found {found}\n{res.stderr[-2000:]}"
    return found[0]


@pytest.mark.slow
def test_module_imports_without_gpu_and_lists_functions(built_module):
    probe = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('vllm_attncap.engine.cuda._kernels', {str(built_module)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(json.dumps({'names': sorted(n for n in dir(m) if not n.startswith('_')),\n"
        "                  'archs': m.CUDA_ARCHS, 'runtime': m.cuda_runtime_version(),\n"
        "                  'devices': m.device_count(), 'head_dims': list(m.PROBS_HEAD_DIMS)}))\n"
        # torch's count after the module's own: the module must not need torch to load or to count
        "import torch; print(torch.cuda.device_count())\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    *_, line, torch_devices = res.stdout.strip().splitlines()
    info = json.loads(line)
    assert EXPECTED_FUNCTIONS <= set(info["names"])
    assert info["archs"] == "sm_80;sm_90+PTX"
    assert info["runtime"] >= 12000
    assert info["head_dims"] == [64, 128]
    assert info["devices"] == int(torch_devices)  # what the CUDA driver reports (0 here, without one)


@pytest.mark.slow
def test_embedded_device_code_covers_sm80_sm90_and_ptx(built_module):
    images = kb.fatbin_images(built_module)
    kinds = {(img["kind"], img["arch"]) for img in images}
    assert {("sass", 80), ("sass", 90), ("ptx", 90)} <= kinds, kinds
    assert ("ptx", 80) not in kinds  # PTX only for the highest target
    for names in KERNEL_NAMES.values():
        for arch in (80, 90):
            cubins = [img["payload"] for img in images if img["kind"] == "sass" and img["arch"] == arch]
            for name in names:
                assert any(name in c for c in cubins), f"{name.decode()} missing from sm_{arch} code"


@pytest.mark.slow
def test_host_symbols(built_module):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not installed")
    dynamic = subprocess.run([nm, "-D", "--defined-only", str(built_module)], capture_output=True, text=True).stdout
    assert "PyInit__kernels" in dynamic
    # statically linked CUDA runtime: no libcudart.so needed at load time
    needed = subprocess.run(["ldd", str(built_module)], capture_output=True, text=True).stdout if shutil.which("ldd") else ""
    assert "libcudart" not in needed
    assert "libtorch" not in needed and "libc10" not in needed


def test_build_disabled_builds_nothing(tmp_path):
    res = _setup_build_ext(tmp_path, "0")
    assert res.returncode == 0, res.stderr
    assert not list(tmp_path.rglob("_kernels*.so"))


def test_failed_optional_build_warns_and_succeeds(tmp_path):
    fake = tmp_path / "cuda" / "bin"
    fake.mkdir(parents=True)
    (fake / "nvcc").write_text("#!/bin/sh\necho 'nvcc: simulated failure' >&2\nexit 1\n")
    (fake / "nvcc").chmod(0o755)
    # headers/libraries of the real toolkit, the broken compiler of the fake one
    real = kb.cuda_root(NVCC)
    (tmp_path / "cuda" / "include").symlink_to(kb.cuda_include_dir(real))
    (tmp_path / "cuda" / "lib64").symlink_to(kb.cuda_library_dir(real))
    env = {"CUDA_HOME": str(tmp_path / "cuda")}
    res = _setup_build_ext(tmp_path / "out", "", env)
    assert res.returncode == 0, res.stderr
    assert "building the CUDA extension failed" in res.stderr
    assert not list((tmp_path / "out").rglob("_kernels*.so"))
    res = _setup_build_ext(tmp_path / "out2", "1", env)
    assert res.returncode != 0 and "simulated failure" in res.stderr + res.stdout


def test_arch_parsing():
    assert kb.parse_archs("8.0;9.0+PTX") == [("80", False), ("90", True)]
    assert kb.parse_archs("sm_90a") == [("90a", False)]
    assert kb.gencode_flags([("90", True)]) == ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]
    with pytest.raises(kb.KernelBuildError):
        kb.parse_archs("banana")
    with pytest.raises(kb.KernelBuildError):
        kb.parse_archs("6.0")
