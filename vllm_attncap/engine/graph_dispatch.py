"""Graph mode per step: stock FULL decode graphs unless a request of the step cannot be captured inside them.

The CUDA builder declares ``UNIFORM_SINGLE_TOKEN_DECODE`` support, so vLLM keeps its default
``FULL_AND_PIECEWISE`` mode: pure decode steps replay a full CUDA graph (which holds the fused decode-capture
kernel, :mod:`~vllm_attncap.engine.graph_buffers`), prefill and mixed steps run PIECEWISE. A step whose scheduled
requests include one that the full graph cannot capture (full rows, head-mean rows of several layers, elision —
:func:`~vllm_attncap.engine.graph_buffers.graph_kind` is None — or any capture while the in-graph path is off) must
run attention eagerly: the runner's CUDA-graph dispatch is wrapped (:func:`wrap_dispatch`, installed by
:mod:`~vllm_attncap.engine.runner_hooks`) to ask vLLM for the batch as if it were not a uniform decode, which
selects the PIECEWISE entry of the same size (Model Runner V2: ``uniform_token_count=None``; V1:
``uniform_decode=False``).

Pure Python (no vLLM, no CUDA): the decision and the argument rewrite are unit-tested with fakes.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, Iterable

from ..spec import CaptureSpec
from .graph_buffers import graph_kind

logger = logging.getLogger("vllm_attncap")

__all__ = ["StepGraphPolicy", "force_non_uniform", "wrap_dispatch", "policy"]

#: Dispatch arguments that, rewritten so, make vLLM treat a batch as non-uniform (MRv2, V1).
_NON_UNIFORM = {"uniform_token_count": None, "uniform_decode": False}


class StepGraphPolicy:
    """Decides, before the runner dispatches a step, whether it must leave the full decode graph.

    Attributes:
        graphs: whether the platform runs graphs at all (False on CPU, set by the CPU builder: no step is forced,
            no step pays for the decision).
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
