"""Build script. Metadata, packages and dependencies come from pyproject.toml;
this file only adds the compiled extensions: the CPU capture kernel ``vllm_attncap.engine.cpu._cpu_kernels``
(kernels/cpu_capture.cpp, C++/OpenMP, built on every machine with a C++ compiler) and the optional CUDA
extension ``vllm_attncap.engine.cuda._kernels``.

The CPU kernel: ``ATTNCAP_BUILD_CPU_KERNELS=0`` skips it, ``=1`` fails the install if it cannot be built;
unset: try, and on failure warn (capture then uses the torch path).

The extension is built when nvcc is found (kernels/build.py has the commands
and the environment variables; docs/kernels.md the design):

    ATTNCAP_BUILD_KERNELS=0   never build it (CI on CPU, quick installs)
    ATTNCAP_BUILD_KERNELS=1   build it, and fail the install if that fails
    unset                     try; on failure warn and install without it

Without the extension every package still works: the plugin falls back to the
torch reference (vllm_attncap/engine/reference.py).
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_kernel_build():
    """kernels/build.py, or None when it is missing (e.g. an sdist without kernels/)."""
    path = os.path.join(HERE, "kernels", "build.py")
    if not os.path.isfile(path):
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location("attncap_kernel_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _warn(message: str) -> None:
    print(f"WARNING: vllm-attncap: {message}", file=sys.stderr)


kb = _load_kernel_build()
MODE = kb.build_mode() if kb else ("off" if os.environ.get("ATTNCAP_BUILD_KERNELS") == "0" else "try")


class BuildExtWithCuda(build_ext):
    """build_ext that compiles the .cu sources with nvcc, then links them with the binding."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name == CPU_EXTENSION_NAME:
            try:
                return super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - optional unless required
                if CPU_MODE == "require":
                    raise
                _warn(f"building the CPU capture kernel failed, installing without it (torch path): {exc}")
                return None
        if kb is None or ext.name != kb.EXTENSION_NAME:
            return super().build_extension(ext)
        try:
            ext.extra_objects = kb.compile_cuda_objects(self.build_temp, nvcc=NVCC, archs=ARCHS)
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - optional extension: report and go on unless required
            if MODE == "require":
                raise
            _warn(f"building the CUDA extension failed, installing without it (torch fallback): {exc}")


CPU_EXTENSION_NAME = "vllm_attncap.engine.cpu._cpu_kernels"
CPU_MODE = {"0": "off", "1": "require"}.get(os.environ.get("ATTNCAP_BUILD_CPU_KERNELS", "").strip(), "try")


def _cpu_extension() -> Extension | None:
    """The CPU capture kernel: plain pybind11 (no torch headers), OpenMP, -O3 with AVX-512/AVX2 clones."""
    try:
        import pybind11
    except ImportError:
        if CPU_MODE == "require":
            raise SystemExit("vllm-attncap: ATTNCAP_BUILD_CPU_KERNELS=1 but pybind11 is not installed")
        _warn("not building the CPU capture kernel: pybind11 is not installed")
        return None
    return Extension(
        CPU_EXTENSION_NAME,
        sources=[os.path.join("kernels", "cpu_capture.cpp")],
        include_dirs=[pybind11.get_include()],
        language="c++",
        extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-fvisibility=hidden", "-g0"],
        extra_link_args=["-fopenmp"],
    )


ext_modules = []
if CPU_MODE != "off" and os.path.isfile(os.path.join(HERE, "kernels", "cpu_capture.cpp")):
    _cpu = _cpu_extension()
    if _cpu is not None:
        ext_modules.append(_cpu)
NVCC = ARCHS = None
if MODE != "off":
    problem = None
    if kb is None:
        problem = "kernels/build.py is missing"
    else:
        NVCC = kb.find_nvcc()
        if NVCC is None:
            problem = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if problem is None:
        try:
            ARCHS = kb.parse_archs()
            ext_modules.append(Extension(kb.EXTENSION_NAME, **kb.extension_kwargs(NVCC, ARCHS)))
        except Exception as exc:  # noqa: BLE001 - e.g. pybind11 missing, bad ATTNCAP_CUDA_ARCHS
            problem = str(exc)
    if problem is not None:
        if MODE == "require":
            raise SystemExit(f"vllm-attncap: ATTNCAP_BUILD_KERNELS=1 but the CUDA extension cannot be built: {problem}")
        _warn(f"not building the CUDA extension: {problem}")

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtWithCuda})
