r"""Rewards from a separate generation server: a TRL ``rollout_func`` that generates with a running attncap server.

TRL's server mode keeps the trainer and the generator apart (``trl vllm-serve``); the large RL stacks do the same
through vLLM's token-in/token-out endpoint ``/inference/v1/generate``. :func:`attncap_server_rollout` builds a TRL 1.16
``rollout_func`` (experimental in TRL) that, for every prompt of the batch,

1. tokenizes it exactly as the CAGSR reward will (``reward.encode(prompt).input_ids``, so the capture's prompt length
   matches the reward's),
2. posts the token ids to ``<base_url>/inference/v1/generate`` with the capture spec in
   ``sampling_params.extra_args.attncap`` (default: the head mean of the last layer, full rows),
3. reads the generated ids, their log-probabilities and the capture from the response's per-choice ``attncap``
   field (inline base64 ``.npy``), or, for a capture over the server's inline limit, from
   ``GET /v1/attncap/{key}``,

4. when the reward grounds its replies (``eta > 0``, the default, and no likelihood of its own), asks the server for
   the completion's token log-probabilities after its prompt and after the empty conversation
   (``reward.prior_prompt_ids``): two more requests with ``prompt_logprobs=0`` and one greedy token, so the scoring
   model is the model the server holds,

and returns ``{"prompt_ids", "completion_ids", "logprobs", "attncap_attention"}`` (plus ``attncap_logprobs`` and
``attncap_prior_logprobs`` after step 4). TRL forwards the extra columns (``attncap_attention``: one
:class:`~cagsr_reward.attention.CapturedAttention` per completion) to every reward function as keyword arguments,
where :func:`~cagsr_reward.integrations.trl.cagsr_reward_func` reads them instead of recomputing attention and
log-probabilities.

Weights: the server generates with the weights it holds. Pass ``sync_weights`` to push the trainer's weights before
each step's generation (on GPU, TRL's ``VLLMClient`` over NCCL to a server started with vLLM's weight-transfer
engine); see docs/rl.md for the recipe. Not run here: the CPU test trains against a fixed server.

Standard library and numpy only; nothing here imports trl, torch or vLLM.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..attention import CapturedAttention
from .trl import ATTENTION_KWARG, LOGPROBS_KWARG, PRIOR_LOGPROBS_KWARG

__all__ = ["attncap_server_rollout", "DEFAULT_SPEC", "GENERATE_PATH"]

#: What the rollout captures by default: the last layer's head-mean rows (what ``CAGSRConfig()`` aggregates).
DEFAULT_SPEC: dict[str, Any] = {"layers": [-1], "reduce": "head_mean"}
#: vLLM's token-in/token-out endpoint (served with ``--enable-scale-out``).
GENERATE_PATH = "/inference/v1/generate"


def _post(url: str, body: dict[str, Any], timeout: float, api_key: str | None) -> dict[str, Any]:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"attncap server {url}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None


def _get(url: str, timeout: float, api_key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"attncap server {url}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None


def _npy(entry: Mapping[str, Any]) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(entry["npy"])), allow_pickle=False)


def _captured(field: Mapping[str, Any], prompt_ids: list[int], token_ids: list[int]) -> CapturedAttention:
    """The reward SDK's value from an inline ``attncap`` field or a ``GET /v1/attncap`` body."""
    arrays = field.get("arrays")
    common = dict(reduce=field["reduce"], layer_ids=field["layers"], head_ids=field["heads"],
                  prompt_token_ids=prompt_ids, token_ids=token_ids)
    mode = field["mode"]
    if arrays is None:  # a GET body: rows as base64 float32, stats as lists
        if mode == "stats":
            return CapturedAttention(field["prompt_len"], coverage=np.asarray(field["coverage"], np.float32),
                                     entropy=np.asarray(field["entropy"], np.float32), **common)
        arr = np.frombuffer(base64.b64decode(field["data"]), dtype="<f4").reshape(field["shape"])
        if mode == "topk":
            return CapturedAttention(field["prompt_len"], topk_positions=arr[1].astype(np.int32),
                                     topk_probs=arr[0].copy(), prompt_start=field["spec"].get("prompt_start"),
                                     **common)
        return CapturedAttention(field["prompt_len"], arr.copy(), **common)
    if mode == "stats":
        return CapturedAttention(field["prompt_len"], coverage=_npy(arrays["coverage"]),
                                 entropy=_npy(arrays["entropy"]), **common)
    if mode == "topk":
        return CapturedAttention(field["prompt_len"], topk_positions=_npy(arrays["topk_positions"]),
                                 topk_probs=_npy(arrays["topk_probs"]), prompt_start=field.get("prompt_start"),
                                 **common)
    return CapturedAttention(field["prompt_len"], _npy(arrays["attention"]), **common)


def _token_logprobs(choice: Mapping[str, Any], n: int) -> list[float]:
    content = ((choice.get("logprobs") or {}).get("content")) or []
    out = [float(c.get("logprob", 0.0)) for c in content[:n]]
    return out + [0.0] * (n - len(out))


def _prompt_logprobs(base: str, context: list[int], tokens: list[int], timeout: float, api_key: str | None) -> list[float]:
    """log p(tokens[s] | context, tokens[:s]) from the server: ``context + tokens`` as the prompt, ``prompt_logprobs=0``
    (vLLM reads no prefix cache for such a request), one greedy token."""
    if not tokens:
        return []
    body = {"token_ids": list(context) + list(tokens),
            "sampling_params": {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}}
    table = _post(base + GENERATE_PATH, body, timeout, api_key).get("prompt_logprobs")
    n = len(context)
    if not table or len(table) != n + len(tokens):
        raise RuntimeError(f"attncap server {base}: no prompt_logprobs for {n + len(tokens)} tokens in the response")
    out = []
    for s, t in enumerate(tokens):
        entry = table[n + s] or {}
        item = entry.get(str(t), entry.get(t))
        if item is None:
            raise RuntimeError(f"attncap server {base}: prompt_logprobs lack token {t} at position {n + s}")
        out.append(float(item["logprob"] if isinstance(item, Mapping) else item))
    return out


def attncap_server_rollout(
    base_url: str,
    *,
    reward: Any = None,
    encode: Callable[[Any], Sequence[int]] | None = None,
    spec: Mapping[str, Any] | None = None,
    sampling: Mapping[str, Any] | None = None,
    max_workers: int = 8,
    timeout: float = 300.0,
    api_key: str | None = None,
    sync_weights: Callable[[Any], None] | None = None,
    grounding: bool | None = None,
) -> Callable[[list[Any], Any], dict[str, list[Any]]]:
    """Build a TRL ``rollout_func`` that generates with an attncap server and returns its captures.

    Args:
        base_url (`str`): the server, e.g. ``"http://127.0.0.1:8000"`` (vLLM's OpenAI server with
            ``--attention-backend attncap --enable-scale-out``).
        reward (*optional*): the :class:`~cagsr_reward.integrations.trl.CAGSRRewardFunction` that will score the
            completions; its ``encode`` tokenizes the prompts (so both agree on the prompt length).
        encode (`callable`, *optional*): ``prompt -> token ids``, instead of ``reward``.
        spec (`dict`, *optional*): the capture spec (docs/capture.md); default :data:`DEFAULT_SPEC`.
        sampling (`dict`, *optional*): extra sampling parameters for every request (e.g. ``{"top_p": 1.0}``);
            ``max_tokens`` and ``temperature`` default to the trainer's ``max_completion_length`` / ``temperature``.
        max_workers (`int`, defaults to 8): requests in flight at once.
        timeout (`float`, defaults to 300): seconds per HTTP request.
        api_key (`str`, *optional*): sent as a bearer token (the server's ``--api-key``).
        sync_weights (`callable`, *optional*): ``sync_weights(trainer)``, called before generating whenever the
            trainer's ``global_step`` changed since the last call (e.g. a push of the policy to the server with TRL's
            ``VLLMClient.update_model_params``; docs/rl.md). Default: none (the server keeps its weights).
        grounding (`bool`, *optional*): add ``attncap_logprobs`` / ``attncap_prior_logprobs`` (the grounding term's
            inputs, computed by the server: two more requests per completion). ``None`` (default): when ``reward``
            needs them (``reward.needs_logprob_columns``: ``eta > 0`` and no likelihood or source of its own).

    Returns:
        ``rollout_func(prompts, trainer) -> dict`` with ``prompt_ids``, ``completion_ids``, ``logprobs`` and
        ``attncap_attention`` (and the two log-probability columns when grounding), one entry per prompt of the
        (already repeated) batch.

    Raises:
        ValueError: neither ``reward`` nor ``encode`` is given, or ``grounding=True`` without ``reward`` (its
            ``prior_prompt_ids`` gives the empty conversation).
    """
    if encode is None:
        if reward is None or not hasattr(reward, "encode"):
            raise ValueError("attncap_server_rollout: give reward=cagsr_reward_func(...) or encode=prompt->ids")
        encode = lambda prompt: list(reward.encode(prompt).input_ids)  # noqa: E731
    if grounding is None:
        grounding = bool(getattr(reward, "needs_logprob_columns", False))
    if grounding and not hasattr(reward, "prior_prompt_ids"):
        raise ValueError("attncap_server_rollout: grounding=True needs reward=cagsr_reward_func(...) (its "
                         "prior_prompt_ids gives the empty conversation)")
    spec = dict(DEFAULT_SPEC if spec is None else spec)
    base = base_url.rstrip("/")

    def one(prompt: Any, params: dict[str, Any]) -> tuple:
        ids = [int(t) for t in encode(prompt)]
        body = {"token_ids": ids, "sampling_params": {**params, "logprobs": 0, "extra_args": {"attncap": spec}}}
        out = _post(base + GENERATE_PATH, body, timeout, api_key)
        choice = out["choices"][0]
        tokens = [int(t) for t in choice["token_ids"]]
        field = choice.get("attncap")
        if field is None:
            raise RuntimeError(f"attncap server {base}: the response carries no attncap field (is the server running "
                               "attncap with this vllm_attncap version?)")
        if "error" in field:
            raise RuntimeError(f"attncap server {base}: capture refused: {field['error']}")
        if field.get("inline") is False:  # over the inline limit: fetch it by key
            q = urllib.parse.urlencode({"num_tokens": max(1, len(tokens))})
            field = _get(f"{base}/v1/attncap/{urllib.parse.quote(field['key'], safe='')}?{q}", timeout, api_key)
        result = (ids, tokens, _token_logprobs(choice, len(tokens)), _captured(field, ids, tokens))
        if grounding:
            prior = [int(t) for t in reward.prior_prompt_ids(prompt)]
            result += (_prompt_logprobs(base, ids, tokens, timeout, api_key),
                       _prompt_logprobs(base, prior, tokens, timeout, api_key))
        return result

    synced_at: list[int] = []

    def rollout_func(prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
        step = int(getattr(getattr(trainer, "state", None), "global_step", 0) or 0)
        if sync_weights is not None and synced_at != [step]:
            sync_weights(trainer)
            synced_at[:] = [step]
        args = getattr(trainer, "args", None)
        params = {"max_tokens": int(getattr(args, "max_completion_length", 16) or 16),
                  "temperature": float(getattr(args, "temperature", 1.0))}
        params.update(sampling or {})
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(prompts)))) as pool:
            results = list(pool.map(lambda p: one(p, params), prompts))
        out = {
            "prompt_ids": [r[0] for r in results],
            "completion_ids": [r[1] for r in results],
            "logprobs": [r[2] for r in results],
            ATTENTION_KWARG: [r[3] for r in results],
        }
        if grounding:
            out[LOGPROBS_KWARG] = [r[4] for r in results]
            out[PRIOR_LOGPROBS_KWARG] = [r[5] for r in results]
        return out

    return rollout_func
