"""The caller-facing API: generate with capture, get arrays back per request.

>>> from vllm import LLM, SamplingParams                       # doctest: +SKIP
>>> llm = LLM(model=path, attention_backend="attncap")          # doctest: +SKIP
>>> out = generate_with_attentions(llm, "Hello", SamplingParams(max_tokens=8),
...                                spec={"layers": [-1], "reduce": "head_mean"})[0]  # doctest: +SKIP
>>> out.attention.shape        # (L, H, T, P + T - 1)          # doctest: +SKIP
(1, 1, 8, 13)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from cagsr_reward.attention import CapturedAttention

from .spec import CaptureSpec, resolve_spec
from .store import CaptureRecord, discard_capture, read_capture  # a TP/PP engine's per-rank parts combined

__all__ = [
    "CapturedOutput", "EngineLikelihood", "generate_with_attentions", "collect", "engine_model_shape", "check_engine",
    "token_logprobs",
]


@dataclass
class CapturedOutput:
    """One request's output and its capture.

    Attributes:
        output: vLLM's ``RequestOutput`` (None if the request was rejected).
        spec: the spec the request ran with.
        captured: the capture as the reward SDK's value (:class:`cagsr_reward.attention.CapturedAttention`,
            with layer/head ids, reduction and token ids); None when capture was refused.
        error: the reason capture was refused, else None.
    """

    output: Any
    spec: CaptureSpec
    captured: CapturedAttention | None = None
    error: Exception | None = None
    _prompt_len: int = field(default=0, repr=False)

    def _check(self) -> CapturedAttention:
        if self.error is not None:
            raise self.error
        assert self.captured is not None
        return self.captured

    @property
    def prompt_len(self) -> int:
        """P, the number of prompt tokens."""
        return self.captured.prompt_len if self.captured is not None else self._prompt_len

    @property
    def layers(self) -> tuple[int, ...]:
        """Model layer index of each ``L`` entry (all selected layers when ``reduce="layer_head_mean"``,
        where ``L`` is 1)."""
        return self.captured.layer_ids if self.captured is not None else ()

    @property
    def heads(self) -> tuple[int, ...]:
        """Query-head index of each ``H`` entry (the averaged heads for reductions)."""
        return self.captured.head_ids if self.captured is not None else ()

    @property
    def attention(self) -> np.ndarray:
        """float32 ``(L, H, T, P + T - 1)``: row ``s`` is the attention of the query
        at position ``P-1+s`` over keys ``0..P-1+s`` (zeros to the right); rows mode only."""
        cap = self._check()
        if cap.attention is None:
            raise ValueError(f"attncap: this request ran in mode={cap.mode!r}; use "
                             f"{'.stats' if cap.mode == 'stats' else '.topk_positions / .topk_probs'}")
        return cap.attention

    @property
    def topk_positions(self) -> np.ndarray:
        """int32 ``(L, H, R, k)``: per row the key positions of highest probability (-1 pads short rows); row
        ``r`` is the query at position ``prompt_start - 1 + r``; top-k captures only."""
        cap = self._check()
        if cap.topk_positions is None:
            raise ValueError(f"attncap: this request ran without topk (mode={cap.mode!r})")
        return cap.topk_positions

    @property
    def topk_probs(self) -> np.ndarray:
        """float32 ``(L, H, R, k)``: the probabilities of :attr:`topk_positions` (0 for padding)."""
        cap = self._check()
        if cap.topk_probs is None:
            raise ValueError(f"attncap: this request ran without topk (mode={cap.mode!r})")
        return cap.topk_probs

    @property
    def stats(self) -> dict[str, np.ndarray]:
        """``{"coverage": (L, H, T), "entropy": (L, H, T)}``; stats mode only."""
        cap = self._check()
        if cap.coverage is None:
            raise ValueError("attncap: this request ran in mode='rows'; use .attention")
        return {"coverage": cap.coverage, "entropy": cap.entropy}

    @property
    def token_ids(self) -> list[int]:
        return list(self.output.outputs[0].token_ids) if self.output is not None else []

    @property
    def prompt_token_ids(self) -> list[int]:
        return list(self.output.prompt_token_ids) if self.output is not None else []

    @property
    def text(self) -> str:
        return self.output.outputs[0].text if self.output is not None else ""

    def history_block(self, history_len: int | None = None) -> np.ndarray:
        """Mean over L and H of the history columns: ``(T, history_len)`` (default P)."""
        a = self.attention
        return a.mean(axis=(0, 1))[:, : (history_len or self.prompt_len)]

    def save(self, path: str) -> None:
        """Save as ``.npz``: the capture (:meth:`CapturedAttention.save`), the spec and the text;
        :meth:`CapturedAttention.load` reads it back."""
        self._check().save(path, spec=self.spec.to_dict(), text=self.text)


def _engine(llm):
    return getattr(llm, "llm_engine", llm)


def check_engine(llm) -> None:
    """Raise ValueError unless ``llm`` runs the attncap backend."""
    vc = _engine(llm).vllm_config
    backend = getattr(vc.attention_config, "backend", None)
    if backend is None or getattr(backend, "name", None) != "CUSTOM":
        raise ValueError(
            "attncap: this LLM was not created with attention_backend='attncap' "
            f"(attention backend: {getattr(backend, 'name', 'auto')}); create it with "
            "LLM(model=..., attention_backend='attncap')"
        )


def engine_model_shape(llm) -> tuple[int, int, int]:
    """(num_layers, num_query_heads, max_model_len) of the engine's model (the whole model, whatever its tensor or
    pipeline parallelism)."""
    from .engine.parallel import global_counts

    vc = _engine(llm).vllm_config
    num_layers, num_heads = global_counts(vc)
    return num_layers, num_heads, vc.model_config.max_model_len


def _as_list(x, n: int, name: str) -> list:
    if isinstance(x, (list, tuple)) and not isinstance(x, CaptureSpec):
        if len(x) != n:
            raise ValueError(f"attncap: {name} has {len(x)} entries for {n} prompts")
        return list(x)
    return [x] * n


def _prompt_len(prompt: Any, tokenizer) -> int:
    if isinstance(prompt, Mapping):
        if "prompt_token_ids" in prompt:
            return len(prompt["prompt_token_ids"])
        prompt = prompt.get("prompt", "")
    if isinstance(prompt, str):
        return len(tokenizer.encode(prompt))
    raise ValueError(f"attncap: unsupported prompt type {type(prompt).__name__}")


def _normalise_prompts(prompts: Any) -> tuple[list, bool]:
    single = isinstance(prompts, (str, Mapping)) or (
        isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts)
    )
    plist = [prompts] if single else list(prompts)
    out = []
    for p in plist:
        if isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
            p = {"prompt_token_ids": list(p)}
        out.append(p)
    return out, single


def _record_to_output(req_output, spec: CaptureSpec, rec: CaptureRecord, num_layers: int) -> CapturedOutput:
    meta = rec.meta
    prompt_len = len(req_output.prompt_token_ids)
    if rec.error is not None:
        return CapturedOutput(req_output, spec, error=ValueError(rec.error), _prompt_len=prompt_len)
    stats, topk = meta.mode == "stats", meta.mode == "topk"
    captured = CapturedAttention(
        meta.prompt_len,
        None if stats or topk else rec.array,
        coverage=rec.coverage if stats else None,
        entropy=rec.entropy if stats else None,
        topk_positions=rec.topk_positions if topk else None,
        topk_probs=rec.topk_probs if topk else None,
        prompt_start=meta.prompt_start if topk else None,
        reduce=meta.reduce,
        layer_ids=meta.layers,
        head_ids=meta.heads,
        num_layers=num_layers,
        prompt_token_ids=list(req_output.prompt_token_ids),
        token_ids=list(req_output.outputs[0].token_ids),
    )
    return CapturedOutput(req_output, spec, captured)


def collect(
    request_output, key: str, spec: CaptureSpec | Mapping | None = None, *, num_layers: int | None = None
) -> CapturedOutput:
    """Fetch the capture of a request submitted with ``llm.generate`` directly.

    The request must have carried ``extra_args={"attncap": {..., "key": key}}``.
    The capture's files are deleted once read. ``num_layers`` (the model's layer count,
    :func:`engine_model_shape`) lets the capture resolve negative layer selections.
    """
    spec = CaptureSpec.from_any(spec or {"key": key})
    t = len(request_output.outputs[0].token_ids)
    rec = read_capture(key, t)[0]
    return _record_to_output(request_output, spec, rec, num_layers)


def generate_with_attentions(
    llm,
    prompts: Any,
    sampling_params: Any = None,
    spec: CaptureSpec | Mapping | Sequence | None = None,
    *,
    use_tqdm: bool = True,
) -> list[CapturedOutput]:
    """Generate with vLLM and return each request's output with its attention.

    Args:
        llm: a ``vllm.LLM`` created with ``attention_backend="attncap"``.
        prompts: a prompt or a list (strings, ``{"prompt_token_ids": [...]}``
            dicts, or lists of token ids).
        sampling_params: one ``SamplingParams`` or one per prompt (default:
            vLLM's defaults). Only ``n=1`` is supported with capture.
        spec: a :class:`CaptureSpec`, a dict, or one per prompt. ``None`` uses
            the spec already in ``sampling_params.extra_args["attncap"]`` or,
            failing that, the defaults (every layer and head, rows mode).
        use_tqdm: show vLLM's progress bar.

    Returns:
        One :class:`CapturedOutput` per prompt, in order. A request whose spec
        is invalid is not generated: its entry has ``output=None`` and
        ``error`` set, and reading ``.attention`` raises that ``ValueError``
        (naming the field); the other requests complete normally.
    """
    from vllm import SamplingParams

    check_engine(llm)
    plist, _ = _normalise_prompts(prompts)
    n = len(plist)
    sps = _as_list(sampling_params if sampling_params is not None else SamplingParams(), n, "sampling_params")
    specs = _as_list(spec, n, "spec")
    num_layers, num_heads, max_len = engine_model_shape(llm)
    tokenizer = llm.get_tokenizer()

    results: list[CapturedOutput | None] = [None] * n
    to_run: list[tuple[int, Any, Any, CaptureSpec]] = []
    for i, (p, sp, sv) in enumerate(zip(plist, sps, specs)):
        try:
            if sv is None:
                sv = (sp.extra_args or {}).get("attncap") if getattr(sp, "extra_args", None) else None
            cs = CaptureSpec.from_any(sv)
            if getattr(sp, "n", 1) != 1:
                raise ValueError(f"attncap: SamplingParams field 'n' must be 1 with capture, got {sp.n}")
            plen = _prompt_len(p, tokenizer)
            t_max = sp.max_tokens if sp.max_tokens is not None else max_len - plen
            resolve_spec(cs, num_layers=num_layers, num_heads=num_heads, prompt_len=plen, max_tokens=max(1, min(t_max, max_len - plen)))
        except ValueError as e:
            results[i] = CapturedOutput(None, CaptureSpec(), error=e)
            continue
        key = cs.key or f"ac-{uuid.uuid4().hex}"
        cs = CaptureSpec.from_any({**cs.to_dict(), "key": key})
        sp2 = sp.clone()
        sp2.extra_args = {**(sp.extra_args or {}), "attncap": cs.to_dict()}
        if cs.prompt_start is not None and cs.prompt_start < plen:
            sp2.skip_reading_prefix_cache = True  # rows of prompt tokens need their queries computed
        to_run.append((i, p, sp2, cs))

    if to_run:
        try:
            outs = llm.generate([r[1] for r in to_run], [r[2] for r in to_run], use_tqdm=use_tqdm)
        except BaseException:
            for r in to_run:
                discard_capture(r[3].key)
            raise
        for (i, _, _, cs), out in zip(to_run, outs):
            try:
                rec = read_capture(cs.key, len(out.outputs[0].token_ids))[0]
                results[i] = _record_to_output(out, cs, rec, num_layers)
            except LookupError as e:
                results[i] = CapturedOutput(out, cs, error=ValueError(str(e)), _prompt_len=len(out.prompt_token_ids))
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# token log-probabilities (the grounding term of the CAGSR reward)
# ----------------------------------------------------------------------------------------------------------------
def token_logprobs(
    llm, contexts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, use_tqdm: bool = False
) -> list[np.ndarray]:
    r"""Teacher-forced $\log p(y_s \mid x, y_{<s})$ of each completion $y$ after its context $x$, under the engine's
    model: one request per pair, ``context + completion`` as the prompt with ``prompt_logprobs=0`` and one greedy
    token (no capture; vLLM does not read the prefix cache for such a request, so every position is computed).

    These are the inputs of the CAGSR grounding term (`cagsr_reward.core.grounding`): call it once with the chat
    prompts' ids and once with the empty conversations (`cagsr_reward.encoding.prior_prompt_ids`).

    Args:
        llm: a ``vllm.LLM`` (any attention backend; a ``CapturingLLM`` is unwrapped).
        contexts: one non-empty list of token ids per pair.
        completions: one list of token ids per pair (an empty one gives an empty array, no request).
        use_tqdm: show vLLM's progress bar.

    Returns:
        `list[np.ndarray]`: float64 ``(T_i,)`` per pair, in order.

    Raises:
        ValueError: on an empty context, a length mismatch, or an engine whose ``logprobs_mode`` returns logits.

    Example:
        >>> token_logprobs(llm, [[1, 520, 9531, 198]], [[19556, 17]])  # doctest: +SKIP
        [array([-3.1, -0.4])]
    """
    from vllm import SamplingParams

    llm = getattr(llm, "wrapped_llm", llm)
    if len(contexts) != len(completions):
        raise ValueError(f"contexts: {len(contexts)} entries for {len(completions)} completions")
    mode = str(getattr(_engine(llm).vllm_config.model_config, "logprobs_mode", "raw_logprobs"))
    if mode.endswith("logits"):
        raise ValueError(f"token_logprobs: the engine's logprobs_mode={mode!r} returns logits; use a *_logprobs mode")
    pairs = [([int(t) for t in c], [int(t) for t in y]) for c, y in zip(contexts, completions)]
    for i, (c, _) in enumerate(pairs):
        if not c:
            raise ValueError(f"contexts[{i}]: expected at least one token")
    todo = [i for i, (_, y) in enumerate(pairs) if y]
    out = [np.zeros(0, np.float64) for _ in pairs]
    if not todo:
        return out
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    results = llm.generate([{"prompt_token_ids": pairs[i][0] + pairs[i][1]} for i in todo], sp, use_tqdm=use_tqdm)
    for i, res in zip(todo, results):
        c, y = pairs[i]
        table = res.prompt_logprobs  # position 0 has none; position k: {token id: Logprob} with the prompt's token
        out[i] = np.array([table[len(c) + s][t].logprob for s, t in enumerate(y)], dtype=np.float64)
    return out


class EngineLikelihood:
    """The grounding term's scoring model served by a vLLM engine: ``logprobs(prompt_ids, completion_ids)`` (the
    :class:`cagsr_reward.sources.Likelihood` protocol) through :func:`token_logprobs`, and ``logprobs_many`` for a
    batch in one ``generate``.

    Example:
        >>> lik = EngineLikelihood(llm)  # doctest: +SKIP
        >>> reward = cagsr_reward_func(tokenizer=llm.get_tokenizer(), likelihood=lik)  # doctest: +SKIP
    """

    def __init__(self, llm):
        self.llm = llm

    def logprobs(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> np.ndarray:
        if not len(completion_ids):
            raise ValueError("completion_ids: expected at least one token")
        return token_logprobs(self.llm, [prompt_ids], [completion_ids])[0]

    def logprobs_many(self, contexts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> list[np.ndarray]:
        return token_logprobs(self.llm, contexts, completions)

    def __getstate__(self):
        raise TypeError("EngineLikelihood holds a live vLLM engine and cannot be pickled")
