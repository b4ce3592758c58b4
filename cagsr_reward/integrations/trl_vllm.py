"""TRL GRPO/RLOO with colocated vLLM whose reward functions see the attention captured during generation.

TRL 1.16 builds its colocated engine as ``trl.generation.vllm_generation.LLM(model=..., ...)`` with no way to pass
engine arguments, and keeps only token ids and logprobs of what vLLM returns. This module adds the three missing
pieces without copying any TRL code:

1. **Engine arguments.** While :class:`CaptureGRPOTrainer` / :class:`CaptureRLOOTrainer` run TRL's ``__init__``,
   the name ``LLM`` in ``trl.generation.vllm_generation`` points to a factory that builds the real ``vllm.LLM`` with
   ``attention_backend="attncap"`` and ``enforce_eager=True`` (plus any ``vllm_engine_kwargs``), inside
   :func:`keep_cpu_linear_weights`, and wraps it in a :class:`CapturingLLM`. The name is restored afterwards.
2. **Per-request capture.** TRL colocate mode sends one request per completion (``n=1``, prompts already repeated
   ``num_generations`` times) through ``llm.generate(prompts, sampling_params=<one SamplingParams>)``.
   :class:`CapturingLLM` clones that ``SamplingParams`` per request with ``extra_args["attncap"]`` carrying the
   capture spec and a unique key, and after generation reads every request's capture back with
   :func:`vllm_attncap.api.collect`.
3. **Delivery to the rewards.** The trainers override ``_generate``: GRPO returns the captures in ``extra_fields``
   (the tuple's 6th item, which TRL merges into the inputs that become reward-function kwargs); RLOO, whose
   ``_generate`` has no extra fields, hands them to ``_calculate_rewards``. Either way every reward function
   receives ``attncap_attention=[...]``, one entry per completion: a dict with ``attention`` (float32
   ``(L, H, T, P+T-1)``, ``T`` = that completion's length, ``P`` = its prompt length), ``prompt_len``,
   ``layer_ids``, ``num_layers`` and ``reduce`` -- exactly what :func:`~cagsr_reward.integrations.trl.cagsr_reward_func`
   consumes. No second forward pass.

**The CPU weight fix.** On CPU, vLLM's ``UnquantizedLinearMethod.process_weights_after_loading`` calls
``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``: the weight is repacked for oneDNN/SGL kernels (the
packed copy lives in a closure) and ``layer.weight`` is replaced by an empty ``Parameter`` without
``weight_loader``, so TRL's weight sync (``model.load_weights``) fails with ``'Parameter' object has no attribute
'weight_loader'``; the vocabulary projection (``remove_weight=False``) keeps its weight, but the kernel keeps
computing with the packed copy of the old one. :func:`keep_cpu_linear_weights` swaps that dispatcher, only while an
engine is built here, for one that runs vLLM's own kernel choice with ``remove_weight=False`` (weight and loader
stay), and :func:`repack_cpu_linear_weights` rebuilds the packed copies after every weight sync (the trainers wrap
TRL's ``sync_weights``; :func:`sync_engine_weights` does it for PPO). Keeping vLLM's kernels matters: computing with
``torch.nn.functional.linear`` on the live weight instead made SmolLM2 (fp32) generation several times slower on the
2-core test machine. On GPU the patch is not applied.

Everything heavy (trl, vllm, torch) is imported lazily: importing this module costs nothing, and the trainer classes
are built on first access (``from cagsr_reward.integrations.trl_vllm import CaptureGRPOTrainer``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from .trl import ATTENTION_KWARG, CAGSRRewardFunction

__all__ = [
    "ATTENTION_KWARG",
    "DEFAULT_CAPTURE_SPEC",
    "CapturingLLM",
    "CaptureGRPOTrainer",
    "CaptureRLOOTrainer",
    "attncap_colocate_engine",
    "block_advantages",
    "capture_llm",
    "capture_spec_for",
    "engine_model",
    "engine_weight_mismatch",
    "keep_cpu_linear_weights",
    "repack_cpu_linear_weights",
    "sync_engine_weights",
]

#: What the trainers capture unless told otherwise: the last layer, averaged over heads on the device (the MTC
#: paper's aggregate; small: ``(1, 1, T, P+T-1)`` per completion).
DEFAULT_CAPTURE_SPEC: dict[str, Any] = {"layers": [-1], "reduce": "head_mean"}

_PATCH_LOCK = threading.RLock()


# ----------------------------------------------------------------------------------------------------------------
# engine construction: the CPU weight fix and an attncap LLM
# ----------------------------------------------------------------------------------------------------------------
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

    with _PATCH_LOCK:
        original = layer_utils.dispatch_cpu_unquantized_gemm
        if getattr(original, "__attncap_keeps_weight__", False):  # nested use
            yield
            return
        layer_utils.dispatch_cpu_unquantized_gemm = _dispatch_keeping_weight(original)
        try:
            yield
        finally:
            layer_utils.dispatch_cpu_unquantized_gemm = original


def _cpu_env_defaults() -> None:
    # vLLM on CPU sizes its KV cache from the NUMA node's memory unless told (facts.md); 1 GiB is plenty here.
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
    _cpu_env_defaults()
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
    import torch

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


# ----------------------------------------------------------------------------------------------------------------
# the capturing proxy
# ----------------------------------------------------------------------------------------------------------------
def capture_spec_for(reward_funcs: Any) -> dict[str, Any]:
    """The capture spec that serves the CAGSR reward functions among ``reward_funcs``.

    Their ``config.layers`` are captured; heads are averaged on the device when the configs use all heads.
    Without a CAGSR reward function: :data:`DEFAULT_CAPTURE_SPEC`.
    """
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    configs = [f.config for f in funcs if isinstance(f, CAGSRRewardFunction)]
    if not configs:
        return dict(DEFAULT_CAPTURE_SPEC)
    layers: Any = set()
    all_heads = True
    for cfg in configs:
        if cfg.layers == "all":
            layers = "all"
        elif layers != "all":
            layers |= set(cfg.layers)
        all_heads = all_heads and cfg.heads == "all"
    return {
        "layers": "all" if layers == "all" else sorted(layers),
        "reduce": "head_mean" if all_heads else "none",
    }


class CapturingLLM:
    """A ``vllm.LLM`` proxy whose ``generate`` captures every request while recording is on.

    Everything except ``generate`` is delegated to the wrapped engine (TRL reaches ``llm_engine``,
    ``reset_prefix_cache``, ``sleep``, ``wake_up`` through it). While :meth:`recording` is active, each prompt of a
    ``generate`` call becomes its own request with a clone of its ``SamplingParams`` carrying
    ``extra_args["attncap"] = spec + {"key": <unique>}``, and the captures are appended to the recording in request
    order. Only ``n=1`` requests can be captured (TRL colocate mode always sends ``n=1``).

    Attributes:
        wrapped_llm: the real ``vllm.LLM``.
        spec (`dict`): the capture spec (without ``key``).
    """

    def __init__(self, llm: Any, spec: Mapping[str, Any] | None = None):
        from vllm_attncap.api import check_engine
        from vllm_attncap.spec import CaptureSpec

        check_engine(llm)
        spec = dict(spec or DEFAULT_CAPTURE_SPEC)
        spec.pop("key", None)
        CaptureSpec.from_any(spec)  # validate early, naming the bad field
        self.wrapped_llm = llm
        self.spec = spec
        self._records: list | None = None
        self._num_layers = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped_llm, name)

    @property
    def num_layers(self) -> int:
        if self._num_layers is None:
            from vllm_attncap.api import engine_model_shape

            self._num_layers = engine_model_shape(self.wrapped_llm)[0]
        return self._num_layers

    @contextlib.contextmanager
    def recording(self) -> Iterator[list]:
        """Capture every request generated inside the block; yields the list the captures are appended to."""
        if self._records is not None:
            raise RuntimeError("CapturingLLM.recording() is not re-entrant")
        self._records = []
        try:
            yield self._records
        finally:
            self._records = None

    def generate(self, prompts: Any, sampling_params: Any = None, *args: Any, **kwargs: Any):
        if self._records is None:
            return self.wrapped_llm.generate(prompts, sampling_params, *args, **kwargs)
        from vllm import SamplingParams
        from vllm_attncap.api import collect
        from vllm_attncap.store import discard_capture

        plist = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        base = sampling_params if sampling_params is not None else SamplingParams()
        sps = list(base) if isinstance(base, (list, tuple)) else [base] * len(plist)
        tag = uuid.uuid4().hex[:12]
        keys, per_request = [], []
        for i, sp in enumerate(sps):
            if getattr(sp, "n", 1) != 1:
                raise ValueError(
                    f"attncap capture needs one completion per request (n=1), got n={sp.n}; TRL colocate mode "
                    "sends n=1 -- remove 'n' from generation_kwargs"
                )
            key = f"trl-{os.getpid()}-{tag}-{i}"
            clone = sp.clone()
            clone.extra_args = {**(sp.extra_args or {}), "attncap": {**self.spec, "key": key}}
            keys.append(key)
            per_request.append(clone)
        try:
            outputs = self.wrapped_llm.generate(plist, per_request, *args, **kwargs)
        except BaseException:
            for key in keys:
                discard_capture(key)
            raise
        for key, out in zip(keys, outputs):
            self._records.append(collect(out, key, {**self.spec, "key": key}))
        return outputs


def _reward_entry(captured: Any, num_layers: int, spec: Mapping[str, Any]) -> dict[str, Any]:
    """One ``attncap_attention`` entry in the format :class:`CAGSRRewardFunction` reads."""
    entry = {
        "attention": captured.attention,
        "prompt_len": int(captured.prompt_len),
        "layer_ids": list(captured.layers),
        "num_layers": int(num_layers),
        "reduce": spec.get("reduce", "none"),
    }
    if entry["reduce"] == "layer_head_mean":
        entry["selected_layer_ids"] = list(captured.layers)
    return entry


def _match_captures(records: list, prompt_ids: list, completion_ids: list, num_layers: int, spec) -> list[dict]:
    """Pair the recorded captures with TRL's completions (same order), checking token ids."""
    if len(records) != len(completion_ids):
        raise RuntimeError(
            f"attncap: {len(records)} captured requests for {len(completion_ids)} completions; capture supports "
            "single-turn generation (no tools, rollout_func or tensor parallelism > 1)"
        )
    entries = []
    for i, (rec, p_ids, c_ids) in enumerate(zip(records, prompt_ids, completion_ids)):
        if rec.error is not None:
            raise RuntimeError(f"attncap: capture of completion {i} failed: {rec.error}")
        if list(rec.token_ids) != [int(t) for t in c_ids] or list(rec.prompt_token_ids) != [int(t) for t in p_ids]:
            raise RuntimeError(f"attncap: capture {i} belongs to another request (token ids differ)")
        entries.append(_reward_entry(rec, num_layers, spec))
    return entries


@contextlib.contextmanager
def attncap_colocate_engine(
    capture_spec: Mapping[str, Any] | None = None, engine_kwargs: Mapping[str, Any] | None = None
) -> Iterator[dict]:
    """While active, TRL's colocated engine is built with attncap, ``enforce_eager`` and the CPU weight fix.

    Replaces ``trl.generation.vllm_generation.LLM`` (the name TRL's ``VLLMGeneration._init_vllm`` calls) with a
    factory returning a :class:`CapturingLLM`; yields a dict whose ``"llm"`` is that proxy once built.

    Args:
        capture_spec (`dict`, *optional*): the spec (default :data:`DEFAULT_CAPTURE_SPEC`).
        engine_kwargs (`dict`, *optional*): extra ``vllm.LLM`` arguments; they override TRL's and ours
            (``attention_backend`` must stay ``"attncap"``).
    """
    import trl.generation.vllm_generation as vg

    extra = {"attention_backend": "attncap", "enforce_eager": True, **dict(engine_kwargs or {})}
    if str(extra["attention_backend"]).lower() != "attncap":
        raise ValueError("vllm_engine_kwargs['attention_backend'] must be 'attncap' for capture")
    built: dict[str, Any] = {}
    real_llm = vg.LLM

    def factory(*args: Any, **kwargs: Any):
        _cpu_env_defaults()
        kwargs.update(extra)
        with keep_cpu_linear_weights():
            llm = real_llm(*args, **kwargs)
        built["llm"] = CapturingLLM(llm, capture_spec)
        return built["llm"]

    with _PATCH_LOCK:
        vg.LLM = factory
        try:
            yield built
        finally:
            vg.LLM = real_llm


# ----------------------------------------------------------------------------------------------------------------
# block (turn) advantages for chains of thought
# ----------------------------------------------------------------------------------------------------------------
def block_advantages(
    block_returns: list[np.ndarray], block_spans: list[list[tuple[int, int]]], group_size: int, width: int
) -> np.ndarray:
    r"""Per-token advantages from per-block returns-to-go, GRPO style (one group = ``group_size`` completions).

    A chain of thought is cut into turns (blocks of ``cot_block`` tokens, then the answer; method.md "Episodes").
    Every token of block $b$ of completion $i$ gets

    $$A_{i,s} = \frac{G_{i,b} - \frac{1}{|g|}\sum_{j \in g} G_{j,\min(b, B_j - 1)}}{\operatorname{std}_{j \in g} G_{j,0} + 10^{-4}},$$

    the block's return-to-go minus the group's mean return-to-go at the same block index (the last block of a
    shorter completion stands in), scaled by the group's spread of total returns $G_{j,0}$ as GRPO scales rewards.
    Tokens outside every span (padding) get 0.

    Args:
        block_returns: per completion, ``G`` (``(B_i,)``).
        block_spans: per completion, the ``(start, end)`` token span of each block (same length as its ``G``).
        group_size: completions per prompt (``num_generations``); ``len(block_returns)`` must be a multiple.
        width: columns of the output (the padded completion length).

    Returns:
        `np.ndarray` ``(len(block_returns), width)`` float32.

    Example:
        >>> import numpy as np
        >>> A = block_advantages([np.array([3.0, 1.0]), np.array([1.0])], [[(0, 2), (2, 3)], [(0, 2)]], 2, 3)
        >>> A.astype(float).round(3).tolist()  # std of totals (3, 1) is sqrt(2); block 1: 1 - mean(1, 1) = 0
        [[0.707, 0.707, 0.0], [-0.707, -0.707, 0.0]]
    """
    n = len(block_returns)
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_size: {n} completions are not a multiple of {group_size}")
    out = np.zeros((n, width), dtype=np.float32)
    for g0 in range(0, n, group_size):
        group = [np.asarray(block_returns[j], dtype=np.float64) for j in range(g0, g0 + group_size)]
        if any(g.size == 0 for g in group):
            raise ValueError("block_returns: every completion needs at least one block")
        totals = np.array([g[0] for g in group])
        scale = (totals.std(ddof=1) if group_size > 1 else 0.0) + 1e-4
        for k, j in enumerate(range(g0, g0 + group_size)):
            spans = block_spans[j]
            if len(spans) != group[k].size:
                raise ValueError(f"block_spans[{j}]: {len(spans)} spans for {group[k].size} returns")
            for b, (s0, s1) in enumerate(spans):
                baseline = np.mean([g[min(b, g.size - 1)] for g in group])
                out[j, s0 : min(s1, width)] = (group[k][b] - baseline) / scale
    return out


# ----------------------------------------------------------------------------------------------------------------
# trainers (built lazily so that importing this module does not import trl)
# ----------------------------------------------------------------------------------------------------------------
def _check_args(args: Any, kwargs: Mapping[str, Any]) -> None:
    if args is None or not getattr(args, "use_vllm", False) or getattr(args, "vllm_mode", None) != "colocate":
        raise ValueError(
            "capture trainers need args.use_vllm=True and args.vllm_mode='colocate' (the engine must run in the "
            "trainer process to capture)"
        )
    if getattr(args, "vllm_tensor_parallel_size", 1) != 1:
        raise ValueError("capture trainers support vllm_tensor_parallel_size=1 only")
    if "n" in (getattr(args, "generation_kwargs", None) or {}):
        raise ValueError("capture needs one completion per request: remove 'n' from generation_kwargs")
    for name in ("tools", "rollout_func", "environment_factory"):
        if kwargs.get(name) is not None:
            raise ValueError(f"capture trainers do not support {name}= (a completion must be one vLLM request)")


class _CaptureMixin:
    """Shared engine set-up and capture hand-off; see the module docstring."""

    def _attncap_init(self, super_init, model, reward_funcs, args, capture_spec, vllm_engine_kwargs, kwargs):
        _check_args(args, kwargs)
        spec = dict(capture_spec) if capture_spec is not None else capture_spec_for(reward_funcs)
        with attncap_colocate_engine(spec, vllm_engine_kwargs) as built:
            super_init(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        if "llm" not in built:
            raise RuntimeError("attncap: TRL did not build a colocated vLLM engine")
        self.attncap_llm: CapturingLLM = built["llm"]
        self.attncap_spec = spec
        self.attncap_last_captures: list[dict] = []
        # TRL's sync loads every parameter with model.load_weights; the CPU kernels' packed copies are then rebuilt
        generation = self.vllm_generation
        trl_sync = generation.sync_weights

        def sync_weights() -> None:
            trl_sync()
            repack_cpu_linear_weights(engine_model(self.attncap_llm))

        generation.sync_weights = sync_weights

    @contextlib.contextmanager
    def _attncap_recording(self) -> Iterator[list]:
        with self.attncap_llm.recording() as records:
            yield records

    def _attncap_entries(self, records, prompt_ids, completion_ids) -> list[dict]:
        entries = _match_captures(records, prompt_ids, completion_ids, self.attncap_llm.num_layers, self.attncap_spec)
        self.attncap_last_captures = entries
        return entries


def _build_trainers():
    from trl import GRPOTrainer, RLOOTrainer

    class CaptureGRPOTrainer(_CaptureMixin, GRPOTrainer):
        """``trl.GRPOTrainer`` whose reward functions receive the attention vLLM captured while generating.

        Same arguments as ``GRPOTrainer`` plus:

        Args:
            capture_spec (`dict`, *optional*): the attncap spec of every request; default: the layers of the CAGSR
                reward functions given, heads averaged on the device (:func:`capture_spec_for`).
            vllm_engine_kwargs (`dict`, *optional*): extra ``vllm.LLM`` arguments for the colocated engine.
            block_advantages (`bool`, defaults to `False`): chain-of-thought mode: replace GRPO's per-completion
                advantage by per-token advantages that are constant over each CoT block (:func:`block_advantages`),
                from the returns-to-go of the single CAGSR reward function (``mode="cot"``).

        ``args`` must set ``use_vllm=True, vllm_mode="colocate"``. Every reward function is called with
        ``attncap_attention=[entry, ...]`` (one per completion; see the module docstring).

        Example:
            >>> reward = cagsr_reward_func(CAGSRConfig(), tokenizer=tok)                      # doctest: +SKIP
            >>> args = GRPOConfig(use_vllm=True, vllm_mode="colocate", use_cpu=True, ...)     # doctest: +SKIP
            >>> CaptureGRPOTrainer(model=path, reward_funcs=[reward], args=args, train_dataset=ds).train()  # doctest: +SKIP
        """

        def __init__(
            self,
            model,
            reward_funcs=None,
            args=None,
            *,
            capture_spec: Mapping[str, Any] | None = None,
            vllm_engine_kwargs: Mapping[str, Any] | None = None,
            block_advantages: bool = False,
            **kwargs: Any,
        ):
            self.use_block_advantages = bool(block_advantages)
            if self.use_block_advantages:
                funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
                if len(funcs) != 1 or not isinstance(funcs[0], CAGSRRewardFunction) or funcs[0].config.mode != "cot":
                    raise ValueError("block_advantages=True needs exactly one reward function: a CAGSR one, mode='cot'")
            self._attncap_init(super().__init__, model, reward_funcs, args, capture_spec, vllm_engine_kwargs, kwargs)

        def _generate(self, prompts: list):
            with self._attncap_recording() as records:
                result = super()._generate(prompts)
            prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images = result
            extra_fields = dict(extra_fields or {})
            extra_fields[ATTENTION_KWARG] = self._attncap_entries(records, prompt_ids, completion_ids)
            return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            for inp in inputs:  # the captures are consumed; do not keep them alive with the batch
                inp.pop(ATTENTION_KWARG, None)
            if self.use_block_advantages:
                output["advantages"] = self._block_advantages(output)
            return output

        def _block_advantages(self, output):
            import torch
            from accelerate.utils import gather_object

            reward = self.reward_funcs[0]
            mode = "train" if self.model.training else "eval"
            group = self.num_generations if mode == "train" else self.num_generations_eval
            local = []
            for score in reward.last_scores:
                if score is None:  # empty completion: no blocks
                    local.append(([0.0], [(0, 0)]))
                else:
                    local.append((score.returns.tolist(), [tuple(s) for s in score.spans]))
            everything = gather_object(local)
            width = output["completion_ids"].shape[1]
            adv = block_advantages([np.array(g) for g, _ in everything], [s for _, s in everything], group, width)
            start = self.accelerator.process_index * len(local)
            return torch.tensor(adv[start : start + len(local)], device=output["advantages"].device)

    class CaptureRLOOTrainer(_CaptureMixin, RLOOTrainer):
        """``trl.RLOOTrainer`` whose reward functions receive the attention vLLM captured while generating.

        Same arguments as ``RLOOTrainer`` plus ``capture_spec`` and ``vllm_engine_kwargs`` (see
        :class:`CaptureGRPOTrainer`). RLOO's ``_generate`` returns no extra fields, so the captures are attached to
        the inputs in ``_calculate_rewards``.
        """

        def __init__(
            self,
            model,
            reward_funcs,
            args=None,
            *,
            capture_spec: Mapping[str, Any] | None = None,
            vllm_engine_kwargs: Mapping[str, Any] | None = None,
            **kwargs: Any,
        ):
            self._attncap_pending: list[dict] | None = None
            self._attncap_init(super().__init__, model, reward_funcs, args, capture_spec, vllm_engine_kwargs, kwargs)

        def _generate(self, prompts: list):
            with self._attncap_recording() as records:
                prompt_ids, completion_ids, completions = super()._generate(prompts)
            self._attncap_pending = self._attncap_entries(records, prompt_ids, completion_ids)
            return prompt_ids, completion_ids, completions

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            pending, self._attncap_pending = self._attncap_pending, None
            if pending is None or len(pending) != len(inputs):
                raise RuntimeError("attncap: no captures for this batch (generation did not go through vLLM)")
            for inp, entry in zip(inputs, pending):
                inp[ATTENTION_KWARG] = entry
            try:
                return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            finally:
                for inp in inputs:
                    inp.pop(ATTENTION_KWARG, None)

    return CaptureGRPOTrainer, CaptureRLOOTrainer


_TRAINERS: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    if name in ("CaptureGRPOTrainer", "CaptureRLOOTrainer"):
        if not _TRAINERS:
            grpo, rloo = _build_trainers()
            _TRAINERS.update(CaptureGRPOTrainer=grpo, CaptureRLOOTrainer=rloo)
        return _TRAINERS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
