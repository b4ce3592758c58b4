"""The CPU room of the engine: vLLM's CPU_ATTN backend plus capture.

- :mod:`~.backend`: ``AttnCapCPUBackend`` / ``...Metadata`` / ``...MetadataBuilder`` / ``...Impl`` (CPU_ATTN
  subclasses) and the shadow key store.
- :mod:`~.capture`: one layer's capture for every captured row of the step, batched into one kernel call.
- :mod:`~.kernels`: the thin Python API over the C++ kernel (``kernels/cpu_capture.cpp``, compiled to
  ``_cpu_kernels``).

The CUDA room (:mod:`vllm_attncap.engine.cuda`) has the same names; neither room imports the other.
"""
