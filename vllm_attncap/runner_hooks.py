"""The one place where vllm_attncap reaches into vLLM's model runner.

Attention metadata carries no request identity, so the builder needs the
runner's batch (row -> request id -> ``SamplingParams.extra_args``). The hook
wraps the V1 runner's ``execute_model`` to publish the runner executing the
current step, and to tell the tracker which requests vLLM finished or aborted
(``scheduler_output.finished_req_ids``) so their buffers are closed.

The method names used here are stable across vLLM 0.18-0.33 (see
docs/architecture.md); the hook is installed once per process, lazily, by the
backend's metadata builder — i.e. only when the attncap backend is in use.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from .tracker import get_tracker

logger = logging.getLogger("vllm_attncap")

__all__ = ["install", "active_runner"]

_ACTIVE: Any = None
_INSTALLED = False


def active_runner() -> Any:
    """The runner executing the current step in this process, or None outside a step."""
    return _ACTIVE


def _wrap_execute_model(orig):
    @functools.wraps(orig)
    def execute_model(self, scheduler_output, *args, **kwargs):
        global _ACTIVE
        finished = getattr(scheduler_output, "finished_req_ids", None)
        if finished:
            get_tracker().finish(finished)
        _ACTIVE = self
        try:
            return orig(self, scheduler_output, *args, **kwargs)
        finally:
            _ACTIVE = None

    execute_model.__attncap_wrapped__ = True
    return execute_model


def install() -> None:
    """Wrap the V1 model runner's ``execute_model`` (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not getattr(GPUModelRunner.execute_model, "__attncap_wrapped__", False):
        GPUModelRunner.execute_model = _wrap_execute_model(GPUModelRunner.execute_model)
    _INSTALLED = True
