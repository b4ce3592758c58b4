"""The seams table (scripts/vllm_seams.py) covers every vLLM symbol the CUDA path imports and every metadata field it
reads; the checker (scripts/check_vllm_seams.py) passes on the cached wheels of the supported releases.

The checker needs each release's wheel (``pip download vllm==X --no-deps``, ~250-340 MB): in CI it runs only
against wheels already in the cache (``~/.cache/vllm-attncap/vllm-wheels``) and is skipped, with that reason,
otherwise (docs/gpu.md, "Following vLLM's releases").
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts"))

import check_vllm_seams  # noqa: E402
from vllm_seams import SEAMS, imported_names  # noqa: E402

#: the CUDA path and the runner seams it shares (not the CPU backend, not the front end)
CUDA_PATH = [
    "vllm_attncap/engine/cuda/backend.py",
    "vllm_attncap/engine/backend.py",
    "vllm_attncap/engine/runner_hooks.py",
    "vllm_attncap/engine/plan.py",
    "vllm_attncap/engine/parallel.py",
    "vllm_attncap/engine/plugin.py",
    "vllm_attncap/engine/cuda/graph_buffers.py",
    "vllm_attncap/engine/cuda/graph_step.py",
    "vllm_attncap/engine/cuda/graph_dispatch.py",
    "vllm_attncap/engine/cuda/result_ring.py",
    "vllm_attncap/engine/cuda/capture.py",
    "vllm_attncap/engine/cuda/kv_layout.py",
    "vllm_attncap/engine/cuda/kernels.py",
    "vllm_attncap/engine/cuda/pinned.py",
]

SUPPORTED = ("0.25.1", "0.33.0")


def _vllm_imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
            for a in node.names:
                yield node.module, a.name, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "vllm":
                    yield a.name, None, node.lineno


def test_cuda_path_imports_nothing_outside_the_table():
    allowed = imported_names()
    outside = []
    for rel in CUDA_PATH:
        p = ROOT / rel
        if not p.exists():  # moved by the layout work: the test names what it scans
            pytest.fail(f"{rel} is gone: update CUDA_PATH here")
        for module, name, line in _vllm_imports(p):
            if (module, name) not in allowed:
                outside.append(f"{rel}:{line}: from {module} import {name}")
    assert not outside, "vLLM symbols used outside scripts/vllm_seams.py:\n" + "\n".join(outside)


def test_metadata_fields_read_are_in_the_table():
    """Every ``getattr(md, "...")`` / ``md.X`` on FlashAttention metadata in the CUDA backend is a seam."""
    fields = {name.split(".", 1)[1] for kind, module, name, _d, _u in SEAMS
              if kind == "field" and name.startswith("FlashAttentionMetadata.")}
    fields |= {f for kind, _m, name, d, _u in SEAMS if kind == "any_field" for f in d}
    tree = ast.parse((ROOT / "vllm_attncap/engine/cuda/backend.py").read_text())
    read = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2:
            obj, attr = node.args[0], node.args[1]
            if isinstance(obj, ast.Name) and obj.id == "md" and isinstance(attr, ast.Constant):
                read.add(attr.value)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "md":
            read.add(node.attr)
    ours = {"attncap_plan", "attncap_graph", "attncap_kernel_step"}  # AttnCapFlashMetadata's own fields
    assert read - ours <= fields, sorted(read - ours - fields)


def test_table_entries_are_well_formed():
    kinds = {"module", "class", "function", "name", "member", "method", "field", "any_field", "source"}
    for kind, module, name, detail, used_by in SEAMS:
        assert kind in kinds and module.startswith("vllm") and (ROOT / used_by).exists(), (kind, module, name)
        if kind in ("member", "method", "field", "source"):
            assert "." in name, name


def _cached(version):
    return check_vllm_seams.find_wheel(check_vllm_seams.default_cache(), version)


@pytest.mark.parametrize("version", SUPPORTED)
def test_seams_hold_in_the_cached_release(version):
    wheel = _cached(version)
    if wheel is None:
        pytest.skip(f"no cached vllm {version} wheel in {check_vllm_seams.default_cache()} (fetch it with "
                    f"`python scripts/check_vllm_seams.py --vllm {version}`; CI does not download ~300 MB wheels)")
    results = check_vllm_seams.check_version(wheel)
    bad = [r for r in results if not r["ok"] and not r["optional"]]
    assert not bad, bad
    layout = next(r["label"] for r in results if r["kind"] == "source")
    assert layout == ("kv_first" if version == "0.25.1" else "head_major")


def test_checker_offline_skips_a_missing_wheel(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/check_vllm_seams.py"), "--vllm", "0.0.1", "--offline",
                          "--cache", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "SKIPPED" in out.stdout
