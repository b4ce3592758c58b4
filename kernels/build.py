"""Build helpers for the optional CUDA extension ``vllm_attncap.engine.cuda._kernels``.

Used by ``setup.py`` (its ``build_ext``) and by ``tests/engine/cuda/test_kernels_build.py``,
so that the test exercises the same commands a ``pip install`` runs. Standard
library only: this file is imported by setup.py before any build dependency is
guaranteed.

Environment:
    ATTNCAP_BUILD_KERNELS  ``0`` never build; ``1`` build and fail loudly;
                           unset/other: build when nvcc is found, warn and go
                           on without the extension if that fails.
    ATTNCAP_CUDA_ARCHS     targets, torch-style: ``"8.0;9.0+PTX"`` (default) —
                           SASS for each, PTX for those marked ``+PTX``;
                           ``80``, ``sm_90``, ``9.0a`` spellings work too.
    ATTNCAP_CUDART         ``static`` (default): link libcudart_static, so the
                           module needs no libcudart on the loader path;
                           ``shared``: link libcudart.so with an rpath.
    ATTNCAP_BUILD_JOBS     parallel nvcc processes (default: CPU count).
    CUDA_HOME / CUDA_PATH  toolkit root (else nvcc on PATH, else /usr/local/cuda).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent
CUDA_SOURCES = ("probs.cu", "reduce.cu", "decode_capture.cu", "topk.cu")
BINDING_SOURCE = "binding.cpp"
HEADERS = ("attncap_kernels.h", "common.cuh", "topk.h")
EXTENSION_NAME = "vllm_attncap.engine.cuda._kernels"
DEFAULT_ARCHS = "8.0;9.0+PTX"
NVCC_FLAGS = (
    "-O3",
    "-std=c++17",
    "-lineinfo",
    "-Xcompiler=-fPIC",
    "-Xcompiler=-fvisibility=hidden",
    "-Xptxas=-warn-spills",
)
HOST_FLAGS = ("-O2", "-g0", "-std=c++17", "-fvisibility=hidden")  # -g0: pybind11 debug info doubles the compile time


class KernelBuildError(RuntimeError):
    """The CUDA extension could not be built."""


def build_mode() -> str:
    """``"off"``, ``"require"`` or ``"try"`` from ``ATTNCAP_BUILD_KERNELS``."""
    value = os.environ.get("ATTNCAP_BUILD_KERNELS", "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on"):
        return "require"
    return "try"


def find_nvcc() -> str | None:
    """Path of nvcc: ``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, PATH, then /usr/local/cuda/bin."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def cuda_root(nvcc: str) -> Path:
    """Toolkit root of an nvcc.

    ``nvcc`` may be a symlink or a wrapper script (e.g. /usr/local/bin/nvcc that
    execs /usr/local/cuda-13.0/bin/nvcc), so when its own parent holds no
    headers, ask nvcc where it lives (``TOP`` in its ``--dryrun`` output).
    """
    root = Path(nvcc).resolve().parent.parent
    if (root / "include" / "cuda_runtime_api.h").is_file():
        return root
    try:
        res = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", res.stdout + res.stderr, re.MULTILINE)
        if m:
            return Path(m.group(1).strip()).resolve()
    except (OSError, subprocess.SubprocessError):
        pass
    return root


def cuda_include_dir(root: Path) -> Path:
    for cand in (root / "include", root / "targets" / "x86_64-linux" / "include"):
        if (cand / "cuda_runtime_api.h").is_file():
            return cand
    raise KernelBuildError(f"cuda_runtime_api.h not found under {root}")


def cuda_library_dir(root: Path) -> Path:
    for cand in (root / "lib64", root / "lib", root / "targets" / "x86_64-linux" / "lib"):
        if (cand / "libcudart_static.a").is_file() or (cand / "libcudart.so").is_file():
            return cand
    raise KernelBuildError(f"libcudart not found under {root}")


def parse_archs(spec: str | None = None) -> list[tuple[str, bool]]:
    """Parse a target list into ``[(arch, with_ptx)]``.

    >>> parse_archs("8.0;9.0+PTX")
    [('80', False), ('90', True)]
    >>> parse_archs("sm_80, 90a")
    [('80', False), ('90a', False)]
    """
    spec = os.environ.get("ATTNCAP_CUDA_ARCHS", DEFAULT_ARCHS) if spec is None else spec
    out: list[tuple[str, bool]] = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        core = item[:-4] if ptx else item
        core = core.lower().removeprefix("sm_").removeprefix("compute_")
        m = re.fullmatch(r"(\d+)\.?(\d)([af]?)", core)
        if not m:
            raise KernelBuildError(f"ATTNCAP_CUDA_ARCHS: cannot read target {item!r} (e.g. '8.0', '90', '9.0a+PTX')")
        arch = m.group(1) + m.group(2) + m.group(3)
        if int(m.group(1) + m.group(2)) < 70:
            raise KernelBuildError(f"ATTNCAP_CUDA_ARCHS: {item!r} is older than sm_70, which nvcc 13 dropped")
        out.append((arch, ptx))
    if not out:
        raise KernelBuildError("ATTNCAP_CUDA_ARCHS names no target")
    return out


def gencode_flags(archs: list[tuple[str, bool]]) -> list[str]:
    """nvcc ``-gencode`` flags: SASS per target, PTX where asked."""
    flags = []
    for arch, ptx in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def archs_label(archs: list[tuple[str, bool]]) -> str:
    """Human-readable target list baked into the module (``_kernels.CUDA_ARCHS``)."""
    return ";".join(f"sm_{a}" + ("+PTX" if p else "") for a, p in archs)


def _nvcc_command(nvcc: str, source: Path, obj: Path, archs: list[tuple[str, bool]], threads: int) -> list[str]:
    return [
        nvcc,
        "-c",
        str(source),
        "-o",
        str(obj),
        *NVCC_FLAGS,
        f"--threads={threads}",
        *gencode_flags(archs),
        f"-I{KERNELS_DIR}",
    ]


def compile_cuda_objects(
    build_temp: str | os.PathLike,
    *,
    nvcc: str | None = None,
    archs: list[tuple[str, bool]] | None = None,
    jobs: int | None = None,
    log=print,
) -> list[str]:
    """Compile the .cu sources into objects under ``build_temp``; returns their paths.

    An object is rebuilt only when its command line or an input changed (a
    stamp beside it records both). Sources compile in parallel processes.
    """
    nvcc = nvcc or find_nvcc()
    if not nvcc:
        raise KernelBuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    archs = archs or parse_archs()
    jobs = jobs or int(os.environ.get("ATTNCAP_BUILD_JOBS", "0") or 0) or (os.cpu_count() or 1)
    # Processes over files first; spare cores go to nvcc's per-target threads.
    procs = max(1, min(jobs, len(CUDA_SOURCES)))
    threads = max(1, jobs // procs)
    out_dir = Path(build_temp) / "attncap_cuda"
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs_digest = hashlib.sha256()
    for name in (*CUDA_SOURCES, *HEADERS):
        inputs_digest.update((KERNELS_DIR / name).read_bytes())

    def one(name: str) -> str:
        obj = out_dir / (Path(name).stem + ".o")
        cmd = _nvcc_command(nvcc, KERNELS_DIR / name, obj, archs, threads)
        stamp = obj.with_suffix(".stamp")
        key = hashlib.sha256((" ".join(cmd) + inputs_digest.hexdigest()).encode()).hexdigest()
        if obj.is_file() and stamp.is_file() and stamp.read_text() == key:
            log(f"[attncap] up to date: {obj}")
            return str(obj)
        log("[attncap] " + " ".join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise KernelBuildError(f"nvcc failed on {name} (exit {res.returncode}):\n{res.stdout}{res.stderr}")
        if res.stderr.strip():
            log(res.stderr.rstrip())
        stamp.write_text(key)
        return str(obj)

    with concurrent.futures.ThreadPoolExecutor(max_workers=procs) as pool:
        return list(pool.map(one, CUDA_SOURCES))


def extension_kwargs(nvcc: str, archs: list[tuple[str, bool]]) -> dict:
    """Keyword arguments of the setuptools ``Extension`` for the binding (host part)."""
    import pybind11  # build requirement (pyproject.toml [build-system])

    root = cuda_root(nvcc)
    libdir = cuda_library_dir(root)
    cudart = os.environ.get("ATTNCAP_CUDART", "static").strip().lower()
    if cudart == "shared":
        libraries = ["cudart"]
        runtime_dirs = [str(libdir)]
    elif cudart == "static":
        libraries = ["cudart_static", "rt", "pthread", "dl"]
        runtime_dirs = []
    else:
        raise KernelBuildError(f"ATTNCAP_CUDART must be 'static' or 'shared', got {cudart!r}")
    return dict(
        sources=[str(Path("kernels") / BINDING_SOURCE)],
        include_dirs=[pybind11.get_include(), str(cuda_include_dir(root)), str(KERNELS_DIR)],
        library_dirs=[str(libdir)],
        libraries=libraries,
        runtime_library_dirs=runtime_dirs,
        define_macros=[("ATTNCAP_CUDA_ARCHS", '"' + archs_label(archs) + '"')],
        extra_compile_args=list(HOST_FLAGS),
        depends=[str(Path("kernels") / n) for n in (*CUDA_SOURCES, *HEADERS)],
        language="c++",
    )


# --------------------------------------------------------------------------- inspection


def _elf_sections(data: bytes) -> dict[str, tuple[int, int]]:
    """Section name -> (offset, size) of a little-endian ELF64 image."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    str_off, str_size = headers[shstrndx][4], headers[shstrndx][5]
    names = data[str_off:str_off + str_size]
    out = {}
    for h in headers:
        end = names.index(b"\0", h[0])
        out[names[h[0]:end].decode()] = (h[4], h[5])
    return out


def fatbin_images(path: str | os.PathLike) -> list[dict]:
    """Device images embedded in a host ELF (its ``.nv_fatbin`` section).

    Returns one dict per image: ``kind`` ("sass" or "ptx"), ``arch`` (e.g. 90)
    and ``payload`` (the bytes; a SASS image is an uncompressed cubin ELF by
    default, PTX is usually compressed). Reads the fatbin container directly
    (header magic 0xBA55ED50, entries of kind 1 = PTX, 2 = ELF) because
    cuobjdump is not always installed next to nvcc.
    """
    data = Path(path).read_bytes()
    sections = _elf_sections(data)
    if ".nv_fatbin" not in sections:
        return []
    off, size = sections[".nv_fatbin"]
    blob = data[off:off + size]
    images = []
    pos = 0
    while pos + 16 <= len(blob):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != 0xBA55ED50:
            pos += 8  # containers are 8-byte aligned; skip padding
            continue
        entry = pos + header_size
        end = entry + fat_size
        while entry < end:
            kind, _unk, ehdr_size, payload_size = struct.unpack_from("<HHIQ", blob, entry)
            arch, = struct.unpack_from("<I", blob, entry + 28)
            payload = blob[entry + ehdr_size:entry + ehdr_size + payload_size]
            images.append({"kind": {1: "ptx", 2: "sass"}.get(kind, str(kind)), "arch": arch, "payload": payload})
            entry += ehdr_size + payload_size
        pos = end
    return images
