"""Registration with vLLM (the ``vllm.general_plugins`` entry point).

``register()`` runs in every vLLM process (frontend, EngineCore, workers) before
``attention_backend`` is parsed. It:

1. registers the platform's attncap backend class on the ``CUSTOM`` member of
   ``AttentionBackendEnum`` (CPU: :class:`~vllm_attncap.engine.cpu.backend.AttnCapCPUBackend`;
   CUDA: :class:`~vllm_attncap.engine.cuda.backend.AttnCapFlashBackend`);
2. adds ``ATTNCAP`` as an alias name of that member, so ``attention_backend="attncap"``
   (any case) parses in every process — an alias pickles as ``CUSTOM``, which
   survives vLLM's spawned processes (a new enum member would not);
3. on CPU, makes the platform honour the selection: ``CpuPlatform`` always
   returns CPU_ATTN, so its ``get_attn_backend_cls`` is wrapped to return the
   attncap backend when, and only when, ``CUSTOM``/``attncap`` was selected;

Without ``attention_backend="attncap"`` nothing else changes: vLLM resolves its
own backends exactly as if the plugin were not installed.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm_attncap")

__all__ = ["register", "backend_class_path"]

CPU_BACKEND = "vllm_attncap.engine.cpu.backend.AttnCapCPUBackend"
CUDA_BACKEND = "vllm_attncap.engine.cuda.backend.AttnCapFlashBackend"


def backend_class_path(platform) -> str | None:
    """The attncap backend class for a vLLM platform, or None if unsupported."""
    if platform.is_cpu():
        return CPU_BACKEND
    if platform.is_cuda():
        return CUDA_BACKEND
    return None


def _patch_cpu_platform(platform_cls, enum) -> None:
    orig = platform_cls.get_attn_backend_cls
    if getattr(orig, "__attncap_wrapped__", False):
        return
    orig_func = orig.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if (
            selected_backend == enum.CUSTOM
            and enum.CUSTOM.get_path() == CPU_BACKEND
            and not getattr(attn_selector_config, "use_mla", False)
            and not getattr(attn_selector_config, "use_sparse", False)
        ):
            return CPU_BACKEND
        return orig_func(cls, selected_backend, attn_selector_config, *args, **kwargs)

    get_attn_backend_cls.__attncap_wrapped__ = True
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def register() -> None:
    """Entry point called by vLLM in every process (idempotent, cheap)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum, register_backend

    path = backend_class_path(current_platform)
    if path is None:
        logger.debug("vllm_attncap: platform %s not supported; backend not registered", type(current_platform).__name__)
        return
    existing = _ATTN_OVERRIDES.get(AttentionBackendEnum.CUSTOM)
    if existing not in (None, path):
        logger.warning("vllm_attncap: replacing the CUSTOM attention backend %s registered by another plugin", existing)
    register_backend(AttentionBackendEnum.CUSTOM, path)
    AttentionBackendEnum._member_map_.setdefault("ATTNCAP", AttentionBackendEnum.CUSTOM)
    if current_platform.is_cpu():
        _patch_cpu_platform(type(current_platform), AttentionBackendEnum)
