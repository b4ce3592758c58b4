"""Time spent inside attncap's own code, exclusive of the stock vLLM code it calls (used by ``cpu_engine_alone.py
--attribute``).

The attncap CPU engine is stock vLLM plus a few seams: the metadata builder's ``build``, the attention impl's
``do_kv_cache_update`` and ``forward``, and the runner's ``execute_model`` / ``sample_tokens`` wrappers. Each of
them calls the stock method it extends. :class:`SelfTimer` wraps both sides — the attncap method (``ours``) and the
stock method it calls (``theirs``) — and adds up, for the ``ours`` frames only, their elapsed time minus the
elapsed time of the instrumented frames directly below them. What remains is the time attncap's code itself takes
(its plan, the capture kernel and its wrapper, the shadow-key writes, the bookkeeping), which is what the engine
adds to stock vLLM's turn apart from effects on caches. The timer's own ``perf_counter`` calls fall partly into
that sum, so it errs high, never low.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

__all__ = ["SelfTimer", "instrument_cpu_engine"]


class SelfTimer:
    """Exclusive ("self") time of the ``ours`` frames, summed, in seconds (:attr:`total`)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.total = 0.0
        self.calls = 0
        self._children: list[float] = []  # per open frame: elapsed time of its instrumented direct children

    def wrap(self, fn: Callable, ours: bool) -> Callable:
        clock = self.clock

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._children.append(0.0)
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = clock() - t0
                below = self._children.pop()
                if self._children:
                    self._children[-1] += dt
                if ours:
                    self.total += dt - below
                    self.calls += 1

        timed.__attncap_self_timed__ = True
        return timed

    def patch(self, owner: Any, name: str, ours: bool) -> None:
        """Replace ``owner.name`` (a class attribute) by its timed form (idempotent)."""
        fn = owner.__dict__[name]
        if not getattr(fn, "__attncap_self_timed__", False):
            setattr(owner, name, self.wrap(fn, ours))

    def patch_closure(self, wrapper: Callable, ours: bool = False) -> None:
        """Time the function a wrapper closes over as ``orig`` (attncap's runner wrappers hold vLLM's method so)."""
        names = wrapper.__code__.co_freevars
        cell = wrapper.__closure__[names.index("orig")]
        if not getattr(cell.cell_contents, "__attncap_self_timed__", False):
            cell.cell_contents = self.wrap(cell.cell_contents, ours)


def instrument_cpu_engine(timer: SelfTimer) -> None:
    """Wrap the attncap CPU engine's seams and the stock methods they call. Call it after the ``LLM`` is built (the
    runner hooks are installed by the backend's builder, during engine start)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadataBuilder
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_attncap.engine.cpu.backend import AttnCapCPUImpl, AttnCapCPUMetadataBuilder

    timer.patch(AttnCapCPUMetadataBuilder, "build", ours=True)
    timer.patch(CPUAttentionMetadataBuilder, "build", ours=False)
    for name in ("do_kv_cache_update", "forward"):
        timer.patch(AttnCapCPUImpl, name, ours=True)
        timer.patch(CPUAttentionBackendImpl, name, ours=False)
    for name in ("execute_model", "sample_tokens"):
        wrapper = GPUModelRunner.__dict__[name]
        if not getattr(wrapper, "__attncap_wrapped__", False):
            raise RuntimeError(f"GPUModelRunner.{name} is not attncap's wrapper: is the attncap backend in use?")
        timer.patch_closure(wrapper, ours=False)
        timer.patch(GPUModelRunner, name, ours=True)
