"""The CUDA room of the engine: vLLM's FLASH_ATTN backend plus capture (written, not yet run on a GPU).

- :mod:`~.backend`: ``AttnCapFlashBackend`` / ``...Metadata`` / ``...MetadataBuilder`` / ``...Impl``
  (FlashAttention subclasses).
- :mod:`~.capture`: one layer's capture with the CUDA kernels (row groups, launches, pinned copies).
- :mod:`~.kernels`: the thin Python API over ``kernels/`` (compiled to ``_kernels``).
- :mod:`~.pinned`: pinned host buffers, asynchronous copies, the ``HostSink``.
- :mod:`~.graph_buffers`, :mod:`~.graph_step`, :mod:`~.graph_dispatch`, :mod:`~.result_ring`: capture inside full
  decode CUDA graphs (static buffers, their per-step life, the per-step graph decision and dispatch rewrite, the
  pinned result ring); :mod:`~.decode_reference`: the fused decode-capture kernel's torch reference.

The CPU room (:mod:`vllm_attncap.engine.cpu`) has the same names for what both have; neither room imports the other.
"""
