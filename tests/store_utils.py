"""Test helper: give one test a capture store of its own, in-process."""

from __future__ import annotations

from pathlib import Path


def private_store(monkeypatch, base: Path):
    """Make a fresh private namespace under ``base`` the current store for the rest of the test.

    The store is process-wide (``vllm_attncap.store.current_store``): changing ``$VLLM_ATTNCAP_STORE`` after it was
    first used does not move it. ``monkeypatch`` restores the previous store and ``$VLLM_ATTNCAP_NAMESPACE`` after
    the test; the namespace lies under the test's ``tmp_path``.
    """
    from vllm_attncap.store import store as S  # the module that holds the current store

    st = S.CaptureStore.create(base)
    monkeypatch.setattr(S, "_CURRENT", st)
    monkeypatch.setenv(S.ENV_NAMESPACE, str(st.path))
    return st
