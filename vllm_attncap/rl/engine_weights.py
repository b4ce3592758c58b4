"""vLLM engines whose weights a trainer can update in place: the CPU weight fix, and the helpers around it.

**The CPU weight fix.** On CPU, vLLM's ``UnquantizedLinearMethod.process_weights_after_loading`` calls
``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``: the weight is repacked for oneDNN/SGL kernels (the
packed copy lives in a closure) and ``layer.weight`` is replaced by an empty ``Parameter`` without
``weight_loader``, so TRL's weight sync (``model.load_weights``) fails with ``'Parameter' object has no attribute
'weight_loader'``; the vocabulary projection (``remove_weight=False``) keeps its weight, but the kernel keeps
computing with the packed copy of the old one. :func:`keep_cpu_linear_weights` swaps that dispatcher, only while an
engine is built here, for one that runs vLLM's own kernel choice with ``remove_weight=False`` (weight and loader
stay), and :func:`repack_cpu_linear_weights` rebuilds the packed copies after every weight sync (the capture
trainers wrap TRL's ``sync_weights``; :func:`sync_engine_weights` does it for PPO). Keeping vLLM's kernels matters:
computing with ``torch.nn.functional.linear`` on the live weight instead made SmolLM2 (fp32) generation several
times slower on the 2-core test machine. On GPU the patch is not applied.

vLLM and torch are imported inside the functions; importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = [
    "PATCH_LOCK",
    "capture_llm",
    "cpu_env_defaults",
    "engine_model",
    "engine_weight_mismatch",
    "keep_cpu_linear_weights",
    "repack_cpu_linear_weights",
    "sync_engine_weights",
]

#: Serialises the module-global patches of this package (vLLM's CPU dispatcher, TRL's ``LLM`` name).
PATCH_LOCK = threading.RLock()


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _dispatch_keeping_weight(original):
    """A replacement for vLLM's ``dispatch_cpu_unquantized_gemm`` that keeps ``layer.weight`` (with its loader).

    vLLM's own kernel choice is kept (oneDNN / SGL prepacked weights are several times faster than
    ``torch.nn.functional.linear`` on CPU), but never with ``remove_weight=True``; the layer remembers the dispatcher
    so that :func:`repack_cpu_linear_weights` can rebuild the packed copy after new weights are loaded.
    """

    def dispatch(layer, remove_weight: bool) -> None:  # noqa: ARG001 - the weight is never removed here
        weight = getattr(layer, "weight", None)
        if weight is None or weight.is_meta or weight.ndim != 2:
            # meta (missing) layers and non-linear weights (conv / MoE experts): vLLM's own handling
            return original(layer, remove_weight)
        original(layer, False)
        layer._attncap_repack = original

    dispatch.__attncap_keeps_weight__ = True  # type: ignore[attr-defined]
    return dispatch


def repack_cpu_linear_weights(model) -> int:
    """Rebuild the CPU kernels' packed weight copies of ``model`` from its current ``weight`` tensors.

    Call after loading weights into an engine built inside :func:`keep_cpu_linear_weights` (done by
    :func:`sync_engine_weights` and by the capture trainers' weight sync). Returns the number of layers repacked
    (0 on GPU, where nothing is packed).
    """
    count = 0
    for module in model.modules():
        repack = getattr(module, "_attncap_repack", None)
        if repack is not None:
            repack(module, False)
            count += 1
    return count


@contextlib.contextmanager
def keep_cpu_linear_weights() -> Iterator[None]:
    """Within the block, vLLM engines built on CPU keep their linear weights loadable (see the module docstring).

    Without it, on CPU, ``model.load_weights(...)`` on a loaded engine fails with ``'Parameter' object has no
    attribute 'weight_loader'``, or (for layers that keep their weight) loads into a tensor the prepacked kernel
    no longer reads. Inside it, vLLM picks its kernels as usual but every linear layer keeps its weight and loader;
    after loading, :func:`repack_cpu_linear_weights` refreshes the packed copies. Costs one extra copy of the linear
    weights in memory. A no-op on non-CPU platforms. Not thread-safe against other code patching the same function.

    Example:
        >>> with keep_cpu_linear_weights():          # doctest: +SKIP
        ...     llm = LLM(model=path, enforce_eager=True)
        >>> sync_engine_weights(llm, policy.named_parameters())   # doctest: +SKIP
    """
    if not _is_cpu_platform():
        yield
        return
    import vllm.model_executor.layers.utils as layer_utils

    with PATCH_LOCK:
        original = layer_utils.dispatch_cpu_unquantized_gemm
        if getattr(original, "__attncap_keeps_weight__", False):  # nested use
            yield
            return
        layer_utils.dispatch_cpu_unquantized_gemm = _dispatch_keeping_weight(original)
        try:
            yield
        finally:
            layer_utils.dispatch_cpu_unquantized_gemm = original


def cpu_env_defaults() -> None:
    # vLLM on CPU sizes its KV cache from the NUMA node's memory unless told (docs/capture.md); 1 GiB is plenty here.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def capture_llm(model: str, *, enforce_eager: bool = True, in_process: bool = True, **llm_kwargs: Any):
    """Build a ``vllm.LLM`` that captures attention and accepts weight updates (PPO rollouts, evaluation).

    Args:
        model (`str`): Hugging Face model directory.
        enforce_eager (`bool`, defaults to `True`): no CUDA graphs / torch.compile (capture runs eagerly anyway).
        in_process (`bool`, defaults to `True`): run the engine core in this process
            (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which :func:`sync_engine_weights` needs.
        **llm_kwargs: any other ``vllm.LLM`` argument (``dtype``, ``max_model_len``, ``seed``, ...).

    Returns:
        `vllm.LLM` with ``attention_backend="attncap"``, built inside :func:`keep_cpu_linear_weights`.
    """
    cpu_env_defaults()
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    kwargs = {"attention_backend": "attncap", "enforce_eager": enforce_eager, **llm_kwargs}
    with keep_cpu_linear_weights():
        return LLM(model=model, **kwargs)


def engine_model(llm):
    """The ``torch.nn.Module`` an in-process engine runs (what TRL colocate mode loads weights into)."""
    llm = getattr(llm, "wrapped_llm", llm)
    executor = getattr(llm.llm_engine, "model_executor", None)
    if executor is None:
        raise RuntimeError(
            "engine_model: this LLM runs its engine core in another process; build it in-process "
            "(VLLM_ENABLE_V1_MULTIPROCESSING=0, e.g. with capture_llm(...)) to reach its weights"
        )
    return executor.driver_worker.model_runner.model


def sync_engine_weights(llm, named_parameters: Iterable[tuple[str, Any]]) -> int:
    """Copy a Hugging Face policy's parameters into an in-process engine (as TRL colocate mode does).

    Args:
        llm: an in-process ``vllm.LLM`` built with :func:`capture_llm` (or inside :func:`keep_cpu_linear_weights`).
        named_parameters: ``(hf_name, tensor)`` pairs, e.g. ``policy.named_parameters()``.

    Returns:
        `int`: the number of tensors loaded. The prefix cache is reset (cached KV came from the old weights).
    """
    import torch

    model = engine_model(llm)
    count = 0
    with torch.no_grad():
        for name, tensor in named_parameters:
            model.load_weights([(name, tensor.detach())])
            count += 1
    repack_cpu_linear_weights(model)
    getattr(llm, "wrapped_llm", llm).reset_prefix_cache()
    return count


def engine_weight_mismatch(llm, hf_model) -> float:
    """Largest absolute difference between ``hf_model``'s parameters (cast to the engine's dtype) and the engine's copy.

    vLLM fuses some projections (``qkv_proj`` = ``q_proj``, ``k_proj``, ``v_proj`` stacked on dim 0; ``gate_up_proj``
    = ``gate_proj``, ``up_proj``); the model's ``packed_modules_mapping`` says which, and each shard is compared at
    its offset. Tensor parallelism 1 only.

    Raises:
        KeyError: an ``hf_model`` parameter has no counterpart in the engine.
        ValueError: an engine weight was emptied (built without :func:`keep_cpu_linear_weights` on CPU).
    """
    model = engine_model(llm)
    engine_params = dict(model.named_parameters())
    packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
    hf_params = dict(hf_model.named_parameters())
    worst = 0.0
    for name, tensor in hf_params.items():
        target, start = name, 0
        if name not in engine_params:
            for fused, parts in packed.items():
                for part in parts:
                    if f".{part}." in name:
                        target = name.replace(f".{part}.", f".{fused}.")
                        # offset = sizes of the earlier shards of the same fused weight
                        start = sum(
                            hf_params[name.replace(f".{part}.", f".{p}.")].shape[0]
                            for p in parts[: parts.index(part)]
                        )
                        break
                if target != name:
                    break
        if target not in engine_params:
            raise KeyError(f"engine_weight_mismatch: no engine parameter for {name!r}")
        engine = engine_params[target]
        if engine.numel() == 0:
            raise ValueError(f"engine_weight_mismatch: the engine's {target!r} is empty (weights were repacked away)")
        piece = engine.detach()[start : start + tensor.shape[0]] if target != name else engine.detach()
        # compared in the engine's dtype: a bf16 engine holds the policy's fp32 weights rounded to bf16
        policy = tensor.detach().cpu().to(piece.dtype)
        diff = (piece.float().cpu() - policy.float()).abs().max().item()
        worst = max(worst, diff)
    return float(worst)

