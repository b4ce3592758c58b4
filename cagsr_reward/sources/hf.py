"""Recompute the attention that produced a completion, and its tokens' log-probabilities, with a Hugging Face model
(no vLLM needed).

The result has exactly the capture layout of method.md ("Attention that produced a token"): a float32 array
``(L, H, T, P+T-1)`` whose row ``s`` is the attention of the query at position ``P-1+s`` over keys ``0..P-1+s``,
zeros to the right; equal to
``model(prompt + completion, output_attentions=True).attentions[l][0, h, P-1+s, :P+s]``.

How memory stays bounded: the sequence ``prompt + completion[:-1]`` (the last generated token is never a key of
any row) is fed in chunks of ``chunk_size`` query positions with a KV cache, using eager attention. A forward hook on
each *selected* layer's attention module copies that chunk's rows out as soon as the layer has computed them, so
no layer's full ``(H, N, N)`` map and no unselected layer's weights are ever kept. Peak memory, with
``N = P + T - 1`` and ``C = chunk_size``:

- the KV cache, ``2 * num_layers * num_kv_heads * N * head_dim`` values (model dtype);
- one layer's transient eager weights for one chunk, about ``2 * H * C * N`` values (scores and softmax);
- the result, ``|layers| * |heads| * T * N`` float32 (``|layers| * T * N`` with ``reduce="head_mean"``,
  ``T * N`` with ``reduce="layer_head_mean"``);
- the usual per-chunk activations (``C * hidden_size`` and ``C * vocab`` are avoided: the LM head is not run).

Token log-probabilities (the grounding term's input, `cagsr_reward.core.grounding`): ``HFAttentionSource.logprobs``
and :class:`HFLikelihood` (the same computation for a caller whose attention is captured elsewhere) feed the same
sequence in chunks with a KV cache and run the LM head only on the positions that predict a completion token, at
most ``C * vocab`` logits at once.

torch and transformers are imported only inside methods: ``import cagsr_reward.sources.hf`` stays light.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..attention import CapturedAttention
from ..config import DEFAULT_LAYERS

__all__ = ["HFAttentionSource", "HFLikelihood", "REDUCE_MODES"]

#: Allowed values of ``HFAttentionSource(reduce=...)``.
REDUCE_MODES = ("none", "head_mean", "layer_head_mean")

_DTYPES = ("float32", "float16", "bfloat16", "auto")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _index_spec(name: str, value: Any) -> str | tuple[int, ...]:
    if isinstance(value, str):
        if value == "all" or (name == "layers" and re.fullmatch(r"last:[1-9][0-9]*", value)):
            return value
        raise ValueError(f"{name}: expected 'all' or a non-empty sequence of ints, got {value!r}")
    if _is_int(value):
        return (int(value),)
    if not isinstance(value, Sequence) or len(value) == 0 or not all(_is_int(v) for v in value):
        raise ValueError(f"{name}: expected 'all' or a non-empty sequence of ints, got {value!r}")
    return tuple(int(v) for v in value)


def _resolve(name: str, spec: str | tuple[int, ...], size: int) -> list[int]:
    """Model indices for a selection, negatives counted from the end, order kept, duplicates dropped."""
    if spec == "all":
        return list(range(size))
    if isinstance(spec, str):  # "last:K": the last K layers, all of a smaller model
        return list(range(max(size - int(spec.split(":", 1)[1]), 0), size))
    out: list[int] = []
    for v in spec:
        if not -size <= v < size:
            raise ValueError(f"{name}: index {v} is out of range for a model with {size} {name}")
        if v % size not in out:
            out.append(v % size)
    return out


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected None, a torch dtype or one of {_DTYPES}, got {dtype!r}")
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"dtype: expected None, a torch dtype or one of {_DTYPES}, got {dtype!r}")
    return name


def _check_ids(name: str, ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    try:
        out = [int(i) for i in ids]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a sequence of token ids (ints), got {type(ids).__name__}") from exc
    if any(i < 0 for i in out):
        raise ValueError(f"{name}: token ids must be >= 0")
    return out


def _decoder(model: Any) -> Any:
    """The decoder stack without the LM head (``model.get_decoder()``), or the model itself."""
    try:
        return model.get_decoder()
    except Exception:  # noqa: BLE001 - exotic wrappers: running the whole model is correct, only slower
        return model


def _attention_modules(model: Any) -> list[Any]:
    """The self-attention module of every decoder layer, in layer order."""
    layers = getattr(_decoder(model), "layers", None)
    if layers is not None and all(hasattr(layer, "self_attn") for layer in layers):
        return [layer.self_attn for layer in layers]
    found = [
        m for _, m in model.named_modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")
    ]
    if not found:
        raise ValueError(
            f"model_or_path: cannot find the attention modules of {type(model).__name__}; expected "
            "model.get_decoder().layers[i].self_attn"
        )
    return sorted(found, key=lambda m: m.layer_idx)



def _check_pair(prompt_ids: Any, completion_ids: Any) -> tuple[list[int], list[int]]:
    prompt = _check_ids("prompt_ids", prompt_ids)
    completion = _check_ids("completion_ids", completion_ids)
    if not prompt:
        raise ValueError("prompt_ids: expected at least one token")
    if not completion:
        raise ValueError("completion_ids: expected at least one token (no generated token, no attention row)")
    return prompt, completion


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Eval mode (no dropout) for the duration of a call; a training model is put back in training mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _teacher_forced_logprobs(model: Any, prompt: list[int], completion: list[int], chunk: int | None) -> np.ndarray:
    r"""$\log p(y_s \mid x, y_{<s})$ of each completion token under ``model``, teacher-forced, float64 ``(T,)``.

    ``prompt + completion[:-1]`` is fed in chunks of ``chunk`` positions with a KV cache; the LM head runs only on
    the positions that predict a completion token (``P-1 .. P+T-2``), so at most ``chunk * vocab`` logits exist at
    once. A chunk that predicts no completion token runs the decoder alone.
    """
    import torch

    P, T = len(prompt), len(completion)
    ids = prompt + completion[:-1]
    N = len(ids)
    step = chunk or N
    device = next(model.parameters()).device
    target = torch.tensor(completion, dtype=torch.long, device=device)
    out = np.empty(T, dtype=np.float64)
    with torch.no_grad(), _eval_mode(model):
        past = None
        for start in range(0, N, step):
            stop = min(start + step, N)
            input_ids = torch.tensor([ids[start:stop]], dtype=torch.long, device=device)
            use_cache = stop < N
            first = max(start, P - 1)  # the first position of this chunk that predicts a completion token
            if first >= stop:
                result = _decoder(model)(input_ids=input_ids, past_key_values=past, use_cache=use_cache)
            else:
                keep = stop - first
                try:
                    result = model(input_ids=input_ids, past_key_values=past, use_cache=use_cache, logits_to_keep=keep)
                except TypeError:  # a model without logits_to_keep: every row's logits, the last `keep` used
                    result = model(input_ids=input_ids, past_key_values=past, use_cache=use_cache)
                logits = result.logits[0, -keep:].double()
                s0, s1 = first - (P - 1), stop - (P - 1)
                logp = torch.log_softmax(logits, dim=-1).gather(-1, target[s0:s1, None]).squeeze(-1)
                out[s0:s1] = logp.cpu().numpy()
            past = result.past_key_values if use_cache else None
    return out


class _HFModel:
    """A Hugging Face causal LM given live or as a path (loaded lazily), its tokenizer, and pickling by path."""

    #: the attention implementation a model loaded from a path gets (None: the model's default)
    _attn_implementation: str | None = None

    def _init_model(self, model_or_path: Any, tokenizer: Any, device: str, dtype: Any, chunk_size: int | None) -> None:
        if isinstance(model_or_path, (str, os.PathLike)):
            self._path: str | None = os.fspath(model_or_path)
            self._model = None
        elif hasattr(model_or_path, "config") and callable(model_or_path):
            self._model = model_or_path
            name = getattr(model_or_path, "name_or_path", "") or ""
            self._path = name or None
        else:
            raise TypeError(
                f"model_or_path: expected a path (str/os.PathLike) or a transformers model, "
                f"got {type(model_or_path).__name__}"
            )
        if not isinstance(device, str) or not device:
            raise ValueError(f"device: expected a device string such as 'cpu' or 'cuda:0', got {device!r}")
        self.device = device
        self.dtype = _dtype_name(dtype)
        if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
            raise ValueError(f"chunk_size: expected an int >= 1 or None, got {chunk_size!r}")
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self._tokenizer = tokenizer
        self._config = None

    # -- lazy loading -------------------------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        """The model, loaded on first use when it was given as a path."""
        if self._model is None:
            if self._path is None:
                raise RuntimeError(f"this {type(self).__name__} has no model and no path to load one from")
            import torch
            from transformers import AutoModelForCausalLM

            dtype = "auto" if self.dtype == "auto" else getattr(torch, self.dtype or "float32")
            kwargs: dict[str, Any] = {"dtype": dtype}
            if self._attn_implementation is not None:
                kwargs["attn_implementation"] = self._attn_implementation
            model = AutoModelForCausalLM.from_pretrained(self._path, **kwargs)
            self._model = model.to(self.device).eval()
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The tokenizer given at construction, or ``AutoTokenizer.from_pretrained(model_or_path)`` on first use."""
        if self._tokenizer is None or isinstance(self._tokenizer, (str, os.PathLike)):
            source = self._tokenizer if self._tokenizer is not None else self._path
            if source is None:
                raise RuntimeError("tokenizer: none was given and the model has no name_or_path to load one from")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(os.fspath(source))
        return self._tokenizer

    def logprobs(self, prompt_ids: Any, completion_ids: Any) -> np.ndarray:
        r"""Teacher-forced $\log p(y_s \mid x, y_{<s})$ of each completion token after the prompt, under the model.

        Args:
            prompt_ids (`Sequence[int]`): the ``P >= 1`` context token ids $x$ (a chat prompt's ids, or
                `cagsr_reward.encoding.prior_prompt_ids` for the empty conversation).
            completion_ids (`Sequence[int]`): the ``T >= 1`` reply token ids $y$.

        Returns:
            `np.ndarray`: float64 ``(T,)``, each ``<= 0``. The sequence is fed in chunks of ``chunk_size`` positions
            with a KV cache and the LM head runs only where a reply token is predicted; the model's attention
            implementation is left as it is and a training model is in eval mode (no dropout) for the call.

        Example:
            >>> HFLikelihood(model).logprobs([1, 5, 9], [7, 2])  # doctest: +SKIP
            array([-4.61, -4.58])
        """
        prompt, completion = _check_pair(prompt_ids, completion_ids)
        return _teacher_forced_logprobs(self.model, prompt, completion, self.chunk_size)

    # -- pickling -----------------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        if self._path is None:
            raise TypeError(
                f"{type(self).__name__} built from a model without name_or_path cannot be pickled: pass a path, or "
                "save the model and set model.name_or_path"
            )
        state = dict(self.__dict__)
        state["_model"] = None  # reloaded lazily from _path; a live model's in-memory weights are NOT carried
        state["_config"] = None
        return state


class HFLikelihood(_HFModel):
    r"""Teacher-forced token log-probabilities under a Hugging Face causal LM: what the grounding term needs.

    ``logprobs(prompt_ids, completion_ids)`` returns $\log p(y_s \mid x, y_{<s})$ for every reply token, float64
    ``(T,)``. Give it to :func:`~cagsr_reward.integrations.trl.cagsr_reward_func` as ``likelihood=`` when the attention
    is captured (by the vLLM plugin) but the log-probabilities are not, e.g. a frozen copy of the starting policy
    as the scoring model: ``HFLikelihood(reference_model, tokenizer)``. It must share the policy's tokenizer (it
    reads the policy's token ids). :class:`HFAttentionSource` has the same method.

    Args:
        model_or_path (`str | os.PathLike | PreTrainedModel`): a local directory / hub id (loaded lazily with
            ``AutoModelForCausalLM.from_pretrained``) or a live model (used as it is, in eval mode during a call).
        tokenizer (*optional*): a tokenizer or a path, exposed as :attr:`tokenizer` (loaded lazily from
            ``model_or_path`` when not given).
        device (`str`, defaults to ``"cpu"``): where a model loaded from a path runs.
        dtype (*optional*): dtype of a model loaded from a path (as for :class:`HFAttentionSource`); ``None`` means
            float32.
        chunk_size (`int | None`, defaults to 256): positions per forward (``None``: one forward).
        cache_size (`int`, defaults to 0): keep the results of the last ``cache_size`` distinct calls and answer a
            repeated call from them (two reward functions scoring the same completions with one frozen model compute
            them once). Only for a model whose weights do not change: a cached value is never recomputed.

    Pickling keeps the path (a live model's ``name_or_path``), never the weights, as :class:`HFAttentionSource` does
    (and not the cache).

    Example:
        >>> lik = HFLikelihood("path/to/model")  # doctest: +SKIP
        >>> lik.logprobs([1, 15, 27], [33, 8]).shape  # doctest: +SKIP
        (2,)
    """

    def __init__(
        self,
        model_or_path: Any,
        tokenizer: Any = None,
        *,
        device: str = "cpu",
        dtype: Any = None,
        chunk_size: int | None = 256,
        cache_size: int = 0,
    ):
        self._init_model(model_or_path, tokenizer, device, dtype, chunk_size)
        if not _is_int(cache_size) or cache_size < 0:
            raise ValueError(f"cache_size: expected an int >= 0, got {cache_size!r}")
        self.cache_size = int(cache_size)
        self._cache: dict[tuple, np.ndarray] = {}

    def logprobs(self, prompt_ids: Any, completion_ids: Any) -> np.ndarray:
        if not self.cache_size:
            return super().logprobs(prompt_ids, completion_ids)
        prompt, completion = _check_pair(prompt_ids, completion_ids)
        key = (tuple(prompt), tuple(completion))
        hit = self._cache.pop(key, None)
        if hit is None:
            hit = _teacher_forced_logprobs(self.model, prompt, completion, self.chunk_size)
            hit.setflags(write=False)
            while len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))  # the least recently used
        self._cache[key] = hit
        return hit

    logprobs.__doc__ = _HFModel.logprobs.__doc__

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_cache"] = {}
        return state

    def __repr__(self) -> str:
        return f"HFLikelihood({self._path!r}, chunk_size={self.chunk_size}, cache_size={self.cache_size})"


class HFAttentionSource(_HFModel):
    r"""Recomputes, with a Hugging Face causal LM, the attention that produced each generated token.

    ``attention(prompt_ids, completion_ids)`` returns a float32 array ``(L, H, T, P+T-1)`` in the capture layout of
    method.md: row ``s`` is the attention of the query at position ``P-1+s`` over keys ``0..P-1+s`` (zeros to the
    right), for the selected layers (``L`` axis, in the order given) and query heads (``H`` axis; with GQA every
    query head separately). Attention runs eagerly and in chunks of ``chunk_size`` query positions with a KV cache;
    see the module docstring for the memory bound.

    Args:
        model_or_path (`str | os.PathLike | PreTrainedModel`): a local directory / hub id (loaded lazily with
            ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="eager")``) or a live model. A live
            model (e.g. the policy being trained, so the reward sees its current weights) is switched to eager
            attention and eval mode only for the duration of each call.
        tokenizer (*optional*): a tokenizer or a path; exposed as :attr:`tokenizer` (loaded lazily from
            ``model_or_path`` when not given). The source itself works on token ids.
        layers (`"all"`, `"last:K"` or `Sequence[int]`, defaults to `cagsr_reward.config.DEFAULT_LAYERS`): model layers
            to return (negatives from the end; ``"last:K"`` the last K), by default the reward's default band.
        heads (`"all"` or `Sequence[int]`, defaults to ``"all"``): query heads to return.
        reduce (`str`, defaults to ``"none"``): ``"none"`` keeps ``(L, H, ...)``; ``"head_mean"`` averages the selected
            heads, giving ``(L, 1, T, P+T-1)``; ``"layer_head_mean"`` also averages the layers, ``(1, 1, T, P+T-1)``.
        device (`str`, defaults to ``"cpu"``): where a model loaded from a path runs (a live model stays where it is).
        dtype (*optional*): dtype of a model loaded from a path: a torch dtype or ``"float32"``, ``"float16"``,
            ``"bfloat16"``, ``"auto"``; ``None`` means float32.
        chunk_size (`int | None`, defaults to 256): query positions per forward; ``None`` runs one forward over the
            whole sequence (no chunking).

    ``logprobs(prompt_ids, completion_ids)`` (the grounding term's input, as :class:`HFLikelihood` computes it) returns
    the teacher-forced log-probability of each completion token under the same model, float64 ``(T,)``: with a live
    policy the reward then sees its current weights for both the attention and the likelihood.

    Pickling keeps the path (for a live model: its ``name_or_path``) and never the weights: an unpickled copy of a
    source built from a live model loads the checkpoint saved at ``name_or_path``, not the in-memory (possibly
    trained) weights; a live model without ``name_or_path`` refuses to pickle.

    Example:
        >>> src = HFAttentionSource("path/to/model", layers=(-1,), chunk_size=128)  # doctest: +SKIP
        >>> cap = src.attention([1, 15, 27, 9], [33, 8, 2])  # doctest: +SKIP
        >>> cap.shape  # (L, H, T, P+T-1)  # doctest: +SKIP
        (1, 4, 3, 6)
    """

    _attn_implementation = "eager"

    def __init__(
        self,
        model_or_path: Any,
        tokenizer: Any = None,
        *,
        layers: Any = DEFAULT_LAYERS,
        heads: Any = "all",
        reduce: str = "none",
        device: str = "cpu",
        dtype: Any = None,
        chunk_size: int | None = 256,
    ):
        self._init_model(model_or_path, tokenizer, device, dtype, chunk_size)
        self.layers = _index_spec("layers", layers)
        self.heads = _index_spec("heads", heads)
        if reduce not in REDUCE_MODES:
            raise ValueError(f"reduce: expected one of {REDUCE_MODES}, got {reduce!r}")
        self.reduce = reduce

    # -- the model's shape ----------------------------------------------------------------------------------

    def _text_config(self) -> Any:
        if self._model is not None:
            config = self._model.config
        elif self._config is None:
            from transformers import AutoConfig

            config = self._config = AutoConfig.from_pretrained(self._path)
        else:
            config = self._config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def num_layers(self) -> int:
        """Number of decoder layers of the model (reads only the config when the model is not loaded yet)."""
        return int(self._text_config().num_hidden_layers)

    @property
    def num_heads(self) -> int:
        """Number of query heads per layer."""
        return int(self._text_config().num_attention_heads)

    @property
    def layer_ids(self) -> tuple[int, ...] | None:
        """Model layer id of each entry of the returned ``L`` axis; ``None`` when ``reduce="layer_head_mean"``."""
        if self.reduce == "layer_head_mean":
            return None
        return tuple(_resolve("layers", self.layers, self.num_layers))

    @property
    def selected_layer_ids(self) -> tuple[int, ...]:
        """Model layer ids that are captured (averaged together when ``reduce="layer_head_mean"``)."""
        return tuple(_resolve("layers", self.layers, self.num_layers))

    @property
    def head_ids(self) -> tuple[int, ...]:
        """Query heads that are captured (averaged together when ``reduce`` is not ``"none"``)."""
        return tuple(_resolve("heads", self.heads, self.num_heads))

    def __repr__(self) -> str:
        return (
            f"HFAttentionSource({self._path!r}, layers={self.layers!r}, heads={self.heads!r}, "
            f"reduce={self.reduce!r}, chunk_size={self.chunk_size})"
        )

    # -- computing ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _eager_eval(self, model: Any) -> Iterator[None]:
        """Eager attention and eval mode for the duration of a call; restored afterwards."""
        previous = getattr(model.config, "_attn_implementation", None)
        switched = previous not in (None, "eager")
        if switched:
            model.set_attn_implementation("eager")
            if model.config._attn_implementation != "eager":
                raise RuntimeError(
                    f"model_or_path: {type(model).__name__} cannot switch to eager attention "
                    f"(it uses {previous!r}), so attention weights are not available"
                )
        try:
            with _eval_mode(model):
                yield
        finally:
            if switched:
                model.set_attn_implementation(previous)

    def capture(self, prompt_ids: Any, completion_ids: Any) -> CapturedAttention:
        """:meth:`attention` as the reward SDK's value: the array with its layer ids, head ids and reduction.

        Example:
            >>> cap = HFAttentionSource(model, layers=[-1]).capture([1, 5, 9], [7, 2])  # doctest: +SKIP
            >>> cap.history_block().shape  # doctest: +SKIP
            (2, 3)
        """
        return CapturedAttention(
            len(prompt_ids),
            self.attention(prompt_ids, completion_ids),
            reduce=self.reduce,
            layer_ids=self.selected_layer_ids,
            head_ids=self.head_ids,
            num_layers=self.num_layers,
            prompt_token_ids=[int(t) for t in prompt_ids],
            token_ids=[int(t) for t in completion_ids],
        )

    def attention(self, prompt_ids: Any, completion_ids: Any) -> np.ndarray:
        """Attention of every generated token's query over the history, in the capture layout.

        Args:
            prompt_ids (`Sequence[int]`): the ``P >= 1`` prompt token ids (as fed to the policy).
            completion_ids (`Sequence[int]`): the ``T >= 1`` generated token ids.

        Returns:
            `np.ndarray`: float32 ``(L, H, T, P+T-1)`` (``H = 1`` / ``L = H = 1`` for the reduced modes); row ``s``
            holds the query at position ``P-1+s`` over keys ``0..P-1+s``, zeros to the right.

        Raises:
            ValueError: on an empty prompt or completion, or a layer/head index out of range.

        Example:
            >>> cap = HFAttentionSource(model).attention([1, 5, 9], [7, 2])  # doctest: +SKIP
            >>> cap.shape, float(cap[0, 0, 0].sum())  # doctest: +SKIP
            ((1, 4, 2, 4), 1.0)
        """
        import torch

        prompt, completion = _check_pair(prompt_ids, completion_ids)
        P, T = len(prompt), len(completion)
        N = P + T - 1
        ids = prompt + completion[:-1]  # the last generated token is a key of no row: never fed

        model = self.model
        modules = _attention_modules(model)
        layer_ids = _resolve("layers", self.layers, len(modules))
        head_ids = _resolve("heads", self.heads, self.num_heads)
        all_heads = head_ids == list(range(self.num_heads))
        n_out_layers = 1 if self.reduce == "layer_head_mean" else len(layer_ids)
        n_out_heads = len(head_ids) if self.reduce == "none" else 1
        # float64 accumulator only when several layers are summed into one row.
        accumulate = n_out_layers < len(layer_ids)
        out = np.zeros((n_out_layers, n_out_heads, T, N), dtype=np.float64 if accumulate else np.float32)
        chunk = self.chunk_size or N
        cursor = {"start": 0}
        head_index = None if all_heads else torch.tensor(head_ids)

        def capture(slot: int):
            def hook(module: Any, args: Any, output: Any) -> None:
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if weights is None:
                    raise RuntimeError(
                        f"layer {layer_ids[slot]} returned no attention weights; eager attention is required"
                    )
                start = cursor["start"]
                q, k = weights.shape[-2], weights.shape[-1]
                if k != start + q:
                    raise RuntimeError(
                        f"layer {layer_ids[slot]}: expected {start + q} keys for queries {start}..{start + q - 1}, "
                        f"got {k} (sliding-window or compressed caches are not supported)"
                    )
                first = max(start, P - 1)  # absolute position of the first query row we need
                if first >= start + q:
                    return
                rows = weights[0, :, first - start :, :].detach()
                if head_index is not None:
                    rows = rows[head_index.to(rows.device)]
                rows = rows.float()
                positions = torch.arange(first, start + q, device=rows.device)
                causal = torch.arange(k, device=rows.device)[None, :] <= positions[:, None]
                rows = rows * causal  # exact zeros right of the causal limit (method.md layout)
                if self.reduce != "none":
                    rows = rows.mean(dim=0, keepdim=True)
                block = rows.cpu().numpy()
                s0, s1 = first - (P - 1), start + q - (P - 1)
                if self.reduce == "layer_head_mean":
                    out[0, :, s0:s1, :k] += block
                else:
                    out[slot, :, s0:s1, :k] = block

            return hook

        device = next(model.parameters()).device
        decoder = _decoder(model)
        handles = [modules[layer].register_forward_hook(capture(slot)) for slot, layer in enumerate(layer_ids)]
        try:
            with torch.no_grad(), self._eager_eval(model):
                past = None
                for start in range(0, N, chunk):
                    stop = min(start + chunk, N)
                    cursor["start"] = start
                    input_ids = torch.tensor([ids[start:stop]], dtype=torch.long, device=device)
                    use_cache = stop < N
                    result = decoder(input_ids=input_ids, past_key_values=past, use_cache=use_cache)
                    past = result.past_key_values if use_cache else None
        finally:
            for handle in handles:
                handle.remove()
        if self.reduce == "layer_head_mean":
            out = (out / len(layer_ids)).astype(np.float32)
        return out
