"""Graph mode per step: stock FULL decode graphs unless a request of the step cannot be captured inside them.

The CUDA builder declares ``UNIFORM_SINGLE_TOKEN_DECODE`` support, so vLLM keeps its default
``FULL_AND_PIECEWISE`` mode: pure decode steps replay a full CUDA graph (which holds the fused decode-capture
kernel, :mod:`~vllm_attncap.engine.cuda.graph_buffers`), prefill and mixed steps run PIECEWISE. A step whose scheduled
requests include one that the full graph cannot capture (full rows, head-mean rows of several layers, elision —
:func:`~vllm_attncap.engine.cuda.graph_buffers.graph_kind` is None — or any capture while the in-graph path is off) must
run attention eagerly: the runner's CUDA-graph dispatch is wrapped (:func:`wrap_dispatch`, installed with the
decision's runner hooks by :func:`install`, which the CUDA metadata builder calls) to ask vLLM for the batch as if it were not a uniform decode, which
selects the PIECEWISE entry of the same size (Model Runner V2: ``uniform_token_count=None``; V1:
``uniform_decode=False``).

Pure Python (no CUDA; vLLM only through :mod:`~vllm_attncap.engine.runner_hooks`): the decision and the argument
rewrite are unit-tested with fakes.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from typing import Any, Callable, Iterable

from ...spec import CaptureSpec
from .. import runner_hooks
from .graph_buffers import graph_kind

logger = logging.getLogger("vllm_attncap")

__all__ = ["StepGraphPolicy", "force_non_uniform", "wrap_dispatch", "install", "policy"]

_MRV2_DISPATCH = ("vllm.v1.worker.gpu.cudagraph_utils", "CudaGraphManager")
_V1_DISPATCH = ("vllm.v1.cudagraph_dispatcher", "CudagraphDispatcher")

#: Dispatch arguments that, rewritten so, make vLLM treat a batch as non-uniform (MRv2, V1).
_NON_UNIFORM = {"uniform_token_count": None, "uniform_decode": False}


class StepGraphPolicy:
    """Decides, before the runner dispatches a step, whether it must leave the full decode graph.

    Attributes:
        graphs: whether the platform runs graphs at all (False: no step is forced, no step pays for the
            decision).
        in_graph: whether the in-graph capture path is usable in this engine (set by the CUDA builder); when False,
            every step with a capturing request goes PIECEWISE.
        num_layers: the model's layers (``head_mean`` over "all" layers of a one-layer model runs in the graph).
        force: the decision for the step being dispatched (read by the wrapped dispatch).
        forced_steps: steps sent to PIECEWISE (diagnostics, tests).
    """

    def __init__(self) -> None:
        self.graphs = True
        self.in_graph = False
        self.num_layers = 0
        self.force = False
        self.forced_steps = 0
        #: what the graph captures (the CUDA builder sets it with :attr:`in_graph`)
        self.kinds: tuple[str, ...] = ("stats", "rows")
        self._kinds: dict[str, str | None] = {}

    def kind_of(self, req_id: str, raw_spec: Any) -> str | None:
        k = self._kinds.get(req_id, "?")
        if k == "?":
            try:
                k = graph_kind(CaptureSpec.from_any(raw_spec), self.num_layers)
            except (ValueError, TypeError):
                k = "refused"  # the tracker refuses it: the request runs without capture, in the graph
            self._kinds[req_id] = k
        return k

    def decide(self, req_ids: Iterable[str], raw_spec_of: Callable[[str], Any]) -> bool:
        """True when one of ``req_ids`` asks for capture the full graph cannot hold; sets :attr:`force`."""
        if not self.graphs:
            self.force = False
            return False
        force = False
        for rid in req_ids:
            raw = raw_spec_of(rid)
            if raw is None:
                continue
            k = self.kind_of(rid, raw)
            if k == "refused":
                continue
            if k not in self.kinds or not self.in_graph:
                force = True
                break
        self.force = force
        return force

    def forget(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            self._kinds.pop(rid, None)


policy = StepGraphPolicy()


def force_non_uniform(sig: inspect.Signature, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` of a dispatch call rewritten as a non-uniform batch, or None when the signature has none
    of the uniform-batch parameters."""
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    changed = False
    for name, value in _NON_UNIFORM.items():
        if name in sig.parameters:
            bound.arguments[name] = value
            changed = True
    if not changed:
        return None
    return bound.args, bound.kwargs


def wrap_dispatch(orig: Callable, pol: StepGraphPolicy | None = None) -> Callable:
    """``orig`` (an unbound ``dispatch`` method) that, while ``pol.force`` is set, dispatches as non-uniform."""
    pol = pol or policy
    sig = inspect.signature(orig)
    warned = []

    @functools.wraps(orig)
    def dispatch(*args, **kwargs):
        if pol.force:
            rewritten = force_non_uniform(sig, args, kwargs)
            if rewritten is not None:
                pol.forced_steps += 1
                return orig(*rewritten[0], **rewritten[1])
            if not warned:
                warned.append(True)
                logger.warning("vllm_attncap: cannot switch this step to PIECEWISE (dispatch signature %s); "
                               "captures of full rows may be missing from full-graph steps", sig)
        return orig(*args, **kwargs)

    dispatch.__attncap_wrapped__ = True
    return dispatch


def _install_dispatch(module_name: str, cls_name: str, pol: StepGraphPolicy) -> bool:
    """Wrap ``cls.dispatch`` of a loaded module (idempotent); False when the module or class is absent."""
    mod = sys.modules.get(module_name)
    cls = getattr(mod, cls_name, None) if mod is not None else None
    fn = getattr(cls, "dispatch", None) if cls is not None else None
    if fn is None:
        return False
    if not getattr(fn, "__attncap_wrapped__", False):
        cls.dispatch = wrap_dispatch(fn, pol)
    return True


_WARNED_MRV2 = False


def install(pol: StepGraphPolicy | None = None) -> None:
    """Make ``pol`` (default :data:`policy`) decide every step: it hears the step's scheduled requests and the
    finished ones through :mod:`~vllm_attncap.engine.runner_hooks`, and the runners' graph dispatch (Model Runner
    V2's when that runner is hooked, V1's) is wrapped. Call after :func:`runner_hooks.install` (idempotent)."""
    global _WARNED_MRV2
    pol = pol or policy
    runner_hooks.on_schedule(pol.decide)
    runner_hooks.on_finish(pol.forget)
    if runner_hooks.mrv2_installed() and not _install_dispatch(*_MRV2_DISPATCH, pol) and not _WARNED_MRV2:
        _WARNED_MRV2 = True
        logger.warning("vllm_attncap: Model Runner V2's CUDA-graph dispatch was not found; steps with requests "
                       "the full decode graph cannot capture may lose those captures")
    _install_dispatch(*_V1_DISPATCH, pol)  # the V1 runner's dispatcher (its module is loaded with the runner's)
