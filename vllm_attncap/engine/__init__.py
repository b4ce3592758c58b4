"""The engine seam: the part of vllm_attncap that runs inside vLLM.

Shared by both platforms (imports neither room):

- :mod:`~.plugin`: registration (``CUSTOM`` -> the platform's attncap backend, the ``ATTNCAP`` alias).
- :mod:`~.runner_hooks`: the one place that touches vLLM's model runner (request identity, step boundaries).
- :mod:`~.plan`: which query rows of a step are captured, for whom.
- :mod:`~.tracker`: worker-side bookkeeping, request id -> resolved spec and buffer.
- :mod:`~.parallel`: what each rank holds and captures under TP/PP.
- :mod:`~.backend`: what the backends share (model facts, layer identity, declared metadata subclasses).
- :mod:`~.capture`: one layer's capture on the torch path (both rooms' fallback).
- :mod:`~.reference`: the plain-torch reference (probabilities, statistics); :mod:`~.elide`: the elision rule.

One room per platform, with the same names inside (``backend``, ``capture``, ``kernels``):

- :mod:`~.cpu`: the CPU_ATTN backend, batched capture, the C++ kernel's API.
- :mod:`~.cuda`: the FLASH_ATTN backend, kernel capture, the CUDA kernels' API, pinned copies, CUDA graphs.

It imports the shared ``spec`` and ``store`` and nothing of the user surface (``api``, ``dialogue``, ``cli``,
``viz``, ``serving``, ``rl``); ``tool.importlinter`` in pyproject.toml checks it. Importing this package is cheap.
"""
