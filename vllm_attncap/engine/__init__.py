"""The engine seam: the part of vllm_attncap that runs inside vLLM.

- :mod:`~.plugin`: registration (``CUSTOM`` -> the platform's attncap backend, the ``ATTNCAP`` alias).
- :mod:`~.runner_hooks`: the one place that touches vLLM's model runner (request identity, step boundaries).
- :mod:`~.plan`: which query rows of a step are captured, for whom.
- :mod:`~.tracker`: worker-side bookkeeping, request id -> resolved spec and buffer.
- :mod:`~.capture`: one layer's capture on the torch path; :mod:`~.kernel_capture` the CUDA kernel path.
- :mod:`~.backends`: ``cpu`` (CPU_ATTN subclass) and ``flash`` (FlashAttention subclass).
- :mod:`~.compute`: the torch reference, the CUDA kernels' Python API, pinned copies, the elision rule.

It imports the shared ``spec`` and ``store`` and nothing of the user surface (``api``, ``dialogue``, ``cli``,
``viz``, ``serving``, ``rl``); ``tool.importlinter`` in pyproject.toml checks it. Importing this package is cheap.
"""
