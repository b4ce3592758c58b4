"""The value that crosses into the reward SDK: attention that produced a completion, with what it holds.

:class:`CapturedAttention` is defined here, on the consumer's side, and produced by whoever computed the attention:
the vLLM plugin (``vllm_attncap.api.CapturedOutput.captured``), the Hugging Face recompute source
(:meth:`cagsr_reward.sources.HFAttentionSource.capture`), or a file saved by either (:meth:`CapturedAttention.load`).
Every consumer (``score_turn`` / ``score_dialogue`` / ``score_cot``, the TRL reward callable, the ``attncap`` CLI)
takes it, and :meth:`CapturedAttention.aggregate` is the one place that turns it into a ``(T, P+T-1)`` map while
honouring what a device-side reduction already did.

Layout (docs/method.md, "Attention that produced a token"): rows mode holds float32 ``(L, H, T, P+T-1)``; row ``s``
is the attention of the query at position ``P-1+s`` over keys ``0..P-1+s``, zeros to the right. Stats mode holds
only per-row ``coverage`` and history ``entropy``, ``(L, H, T)`` each. Top-k mode holds, per row, the ``k`` keys of
highest probability: ``topk_positions`` int32 and ``topk_probs`` float32, ``(L, H, R, k)``, where the ``R`` rows start
at the token at position ``prompt_start`` (default ``P``: the reply's rows only). numpy only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .aggregate import aggregate
from .config import resolve_layers

__all__ = ["REDUCE_MODES", "CapturedAttention", "as_captured_attention"]

#: What a producer may already have averaged on the device.
REDUCE_MODES = ("none", "head_mean", "layer_head_mean")


def _ids(value: Any, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    out = tuple(int(v) for v in np.asarray(value).reshape(-1).tolist())
    return out


@dataclasses.dataclass(frozen=True)
class CapturedAttention:
    """Attention that produced one completion.

    Attributes:
        prompt_len (`int`): $P$, the number of prompt (history) tokens.
        attention (`np.ndarray` or `None`): rows mode, float32 ``(L, H, T, P+T-1)``; ``L`` is 1 for
            ``reduce="layer_head_mean"``, ``H`` is 1 for ``"head_mean"`` and ``"layer_head_mean"``.
        coverage, entropy (`np.ndarray` or `None`): stats mode, ``(L, H, T)`` per-row salient coverage and
            history entropy computed by the producer.
        reduce (`str`): ``"none"``, ``"head_mean"`` or ``"layer_head_mean"``: what the producer averaged.
        layer_ids (`tuple[int, ...]` or `None`): model layer of each ``L`` entry; with ``"layer_head_mean"`` the layers
            the single entry averages. ``None``: the ``L`` axis is the model's layers in order.
        head_ids (`tuple[int, ...]` or `None`): query head of each ``H`` entry (the heads averaged when reduced).
        num_layers (`int` or `None`): the model's layer count (resolves negative layer selections).
        prompt_token_ids, token_ids (`tuple[int, ...]` or `None`): the history's and the completion's ids, when the
            producer knows them.
        topk_positions, topk_probs (`np.ndarray` or `None`): top-k mode, int32 / float32 ``(L, H, R, k)``: per row,
            the key positions of highest probability (ties to the lower position) and their probabilities; rows
            with fewer than ``k`` keys are padded with -1 / 0. Row ``r`` is the attention of the query at position
            ``prompt_start - 1 + r`` (the one that produced the token at ``prompt_start + r``).
        prompt_start (`int` or `None`): top-k mode, the position of the first row's token, ``1..P`` (``None``: ``P``,
            the reply's rows only); ``R = P - prompt_start + T``.

    Example:
        >>> import numpy as np
        >>> a = np.zeros((2, 1, 1, 3), np.float32); a[0, 0, 0] = [1, 0, 0]; a[1, 0, 0] = [0, 1, 0]
        >>> cap = CapturedAttention(prompt_len=3, attention=a, reduce="head_mean", layer_ids=(4, 5), num_layers=6)
        >>> cap.aggregate(layers=[-1]).tolist()   # model layer 5
        [[0.0, 1.0, 0.0]]
        >>> cap.aggregate(layers="all").tolist()
        [[0.5, 0.5, 0.0]]
    """

    prompt_len: int
    attention: np.ndarray | None = None
    coverage: np.ndarray | None = None
    entropy: np.ndarray | None = None
    reduce: str = "none"
    layer_ids: tuple[int, ...] | None = None
    head_ids: tuple[int, ...] | None = None
    num_layers: int | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    topk_positions: np.ndarray | None = None
    topk_probs: np.ndarray | None = None
    prompt_start: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_len, (int, np.integer)) or isinstance(self.prompt_len, bool) or self.prompt_len < 1:
            raise ValueError(f"prompt_len: expected an int >= 1, got {self.prompt_len!r}")
        object.__setattr__(self, "prompt_len", int(self.prompt_len))
        if self.reduce not in REDUCE_MODES:
            raise ValueError(f"reduce: expected one of {REDUCE_MODES}, got {self.reduce!r}")
        for name in ("layer_ids", "head_ids", "prompt_token_ids", "token_ids"):
            object.__setattr__(self, name, _ids(getattr(self, name), name))
        if self.num_layers is not None:
            object.__setattr__(self, "num_layers", int(self.num_layers))
        given = [self.attention is not None, self.coverage is not None, self.topk_positions is not None]
        if sum(given) != 1:
            raise ValueError("CapturedAttention: give one of attention (rows mode), coverage and entropy (stats mode), "
                             "or topk_positions and topk_probs (top-k mode)")
        if self.topk_positions is not None:
            pos, val = np.asarray(self.topk_positions), np.asarray(self.topk_probs)
            if pos.ndim != 4 or pos.shape != val.shape:
                raise ValueError(f"topk_positions/topk_probs: expected two (L, H, R, k) arrays, got {pos.shape} and "
                                 f"{val.shape}")
            start = self.prompt_len if self.prompt_start is None else int(self.prompt_start)
            if not 1 <= start <= self.prompt_len:
                raise ValueError(f"prompt_start: expected an int in 1..{self.prompt_len}, got {self.prompt_start!r}")
            if pos.shape[2] < self.prompt_len - start:
                raise ValueError(f"topk_positions: {pos.shape[2]} rows, fewer than the {self.prompt_len - start} "
                                 f"prompt rows from prompt_start={start}")
            object.__setattr__(self, "prompt_start", start)
            object.__setattr__(self, "topk_positions", pos.astype(np.int32, copy=False))
            object.__setattr__(self, "topk_probs", val.astype(np.float32, copy=False))
            lead = pos.shape[:2]
        elif self.attention is not None:
            arr = np.asarray(self.attention)
            if arr.ndim != 4:
                raise ValueError(f"attention: expected (L, H, T, P+T-1), got shape {arr.shape}")
            t = arr.shape[2]
            if arr.shape[3] != self.prompt_len + t - 1:
                raise ValueError(
                    f"attention: expected shape (L, H, T, P+T-1) with P={self.prompt_len}, i.e. last axis "
                    f"{self.prompt_len + t - 1} for T={t}, got {arr.shape}"
                )
            object.__setattr__(self, "attention", arr)
            lead = arr.shape[:2]
        else:
            if self.entropy is None:
                raise ValueError("CapturedAttention: stats mode needs both coverage and entropy")
            cov, ent = np.asarray(self.coverage), np.asarray(self.entropy)
            if cov.ndim != 3 or cov.shape != ent.shape:
                raise ValueError(f"coverage/entropy: expected two (L, H, T) arrays, got {cov.shape} and {ent.shape}")
            object.__setattr__(self, "coverage", cov)
            object.__setattr__(self, "entropy", ent)
            lead = cov.shape[:2]
        if self.reduce == "layer_head_mean" and lead != (1, 1):
            raise ValueError(f"reduce='layer_head_mean': expected L = H = 1, got {lead}")
        if self.reduce == "head_mean" and lead[1] != 1:
            raise ValueError(f"reduce='head_mean': expected H = 1, got {lead[1]}")
        if self.layer_ids is not None and self.reduce != "layer_head_mean" and len(self.layer_ids) != lead[0]:
            raise ValueError(f"layer_ids: {len(self.layer_ids)} ids for {lead[0]} layer entries")
        if self.token_ids is not None and len(self.token_ids) != self.num_tokens:
            raise ValueError(f"token_ids: {len(self.token_ids)} ids for {self.num_tokens} attention rows")
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) != self.prompt_len:
            raise ValueError(f"prompt_token_ids: {len(self.prompt_token_ids)} ids for prompt_len={self.prompt_len}")

    # -- what it holds ------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """``"rows"``, ``"stats"`` or ``"topk"``."""
        if self.topk_positions is not None:
            return "topk"
        return "rows" if self.attention is not None else "stats"

    @property
    def num_tokens(self) -> int:
        """$T$, the number of generated tokens (attention rows of the reply)."""
        if self.topk_positions is not None:
            return int(self.topk_positions.shape[2]) - (self.prompt_len - self.prompt_start)
        return int(self.attention.shape[2] if self.attention is not None else self.coverage.shape[2])

    def _rows(self) -> np.ndarray:
        if self.topk_positions is not None:
            raise ValueError("this capture holds top-k keys per row (topk_positions / topk_probs), not full rows; "
                             "capture without topk to aggregate attention maps")
        if self.attention is None:
            raise ValueError("this capture ran in mode='stats' (per-row coverage/entropy only); capture rows to "
                             "aggregate attention maps")
        return self.attention

    # -- the one aggregation ------------------------------------------------------------------------------------
    def aggregate(self, layers: Any = (-1,), heads: Any = "all") -> np.ndarray:
        """``(T, P+T-1)``: the mean over the chosen layers and heads, honouring what the producer already averaged.

        Args:
            layers: ``"all"`` or model layer ids (negatives count from the model's last layer when ``num_layers`` is
                known, else from the last captured layer). With ``reduce="layer_head_mean"`` the choice must name
                exactly the averaged layers (or be ``"all"``).
            heads: ``"all"`` or query-head indices into the ``H`` axis; must be ``"all"`` for a head-reduced capture.

        Raises:
            ValueError: naming ``layers`` / ``heads`` when the choice cannot be honoured by this capture.
        """
        arr = self._rows()
        if self.reduce != "none" and heads != "all":
            raise ValueError(
                f"heads={heads!r} but the attention was already averaged over heads (reduce={self.reduce!r}); "
                "use heads='all' or capture with reduce='none'"
            )
        if isinstance(layers, str) and layers.startswith("last:"):  # the final K layers of the model
            known = self.num_layers
            if known is None and self.layer_ids is None and self.reduce != "layer_head_mean":
                known = int(np.asarray(self.attention).shape[0])
            layers = resolve_layers(layers, known)
        if self.reduce == "layer_head_mean":
            have = self.layer_ids
            if layers != "all" and have is not None:
                wanted = self._resolve_layers(layers, have)
                if wanted != set(have):
                    raise ValueError(
                        f"layers={layers!r} (layers {sorted(wanted)}) but the attention averages layers "
                        f"{sorted(have)} (reduce='layer_head_mean')"
                    )
            return aggregate(arr, layers="all", heads="all")
        heads = "all" if self.reduce == "head_mean" else heads
        if self.layer_ids is None:
            return aggregate(arr, layers=layers, heads=heads)
        if layers != "all" and self.num_layers is None:
            ids = list(self.layer_ids)
            try:  # negatives count from the last captured layer
                layers = [ids[v] if v < 0 else v for v in (layers if isinstance(layers, Sequence) else [layers])]
            except IndexError:
                raise ValueError(f"layers: {layers!r} does not exist among the captured layers {ids}") from None
        return aggregate(arr, layers=layers, heads=heads, layer_ids=list(self.layer_ids), num_layers=self.num_layers)

    def _resolve_layers(self, layers: Any, have: Sequence[int]) -> set[int]:
        values = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
        if self.num_layers is not None:
            return {int(v) % self.num_layers for v in values}
        ordered = sorted(have)
        return {ordered[v] if v < 0 else int(v) for v in values}

    def history_block(self, layers: Any = (-1,), heads: Any = "all") -> np.ndarray:
        """``(T, P)``: the history columns of :meth:`aggregate`."""
        return self.aggregate(layers, heads)[:, : self.prompt_len]

    # -- files --------------------------------------------------------------------------------------------------
    def save(self, path: str, **extra: Any) -> None:
        """Save as ``.npz``: ``attention`` (or ``coverage`` and ``entropy``), ``prompt_len``, ``reduce``, ``layers`` and
        ``heads`` (the ids), ``prompt_token_ids``, ``token_ids``, ``num_layers``, and the ``extra`` string/array
        fields (e.g. ``text``, ``spec``)."""
        arrays: dict[str, Any] = {"prompt_len": np.asarray(self.prompt_len), "reduce": np.asarray(self.reduce)}
        for name in ("attention", "coverage", "entropy", "topk_positions", "topk_probs"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        if self.prompt_start is not None:
            arrays["prompt_start"] = np.asarray(self.prompt_start)
        # file keys as vllm-attncap 0.1 wrote them ("layers", "heads"), so files stay readable both ways
        for name, key in (("layer_ids", "layers"), ("head_ids", "heads"), ("prompt_token_ids", "prompt_token_ids"),
                          ("token_ids", "token_ids")):
            if getattr(self, name) is not None:
                arrays[key] = np.asarray(getattr(self, name), dtype=np.int64)
        if self.num_layers is not None:
            arrays["num_layers"] = np.asarray(self.num_layers)
        for key, value in extra.items():
            arrays[key] = np.asarray(json.dumps(value) if isinstance(value, Mapping) else value)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str) -> tuple["CapturedAttention", dict[str, Any]]:
        """Read what :meth:`save` wrote: ``(capture, extra)`` (``extra``: the other fields, e.g. ``text``)."""
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        # the file says "layers"/"heads" for the ids
        if "layers" in data:
            data["layer_ids"] = data.pop("layers")
        if "heads" in data:
            data["head_ids"] = data.pop("heads")
        kw: dict[str, Any] = {"prompt_len": int(data.pop("prompt_len")), "reduce": str(data.pop("reduce"))}
        for name in ("attention", "coverage", "entropy", "topk_positions", "topk_probs"):
            if name in data:
                kw[name] = data.pop(name)
        if "prompt_start" in data:
            kw["prompt_start"] = int(data.pop("prompt_start"))
        for name in ("layer_ids", "head_ids", "prompt_token_ids", "token_ids"):
            if name in data:
                kw[name] = data.pop(name).tolist()
        if "num_layers" in data:
            kw["num_layers"] = int(data.pop("num_layers"))
        extra = {k: (v.item() if v.ndim == 0 else v) for k, v in data.items()}
        if isinstance(extra.get("spec"), str):
            try:
                extra["spec"] = json.loads(extra["spec"])
            except ValueError:
                pass
        return cls(**kw), extra


def as_captured_attention(value: Any, *, prompt_len: int | None = None, name: str = "attention") -> CapturedAttention:
    """Accept a :class:`CapturedAttention`, a 0.1-style dict (``attention``, ``prompt_len``, ``layer_ids``,
    ``num_layers``, ``reduce``, ``selected_layer_ids``) or a bare ``(L, H, T, P+T-1)`` array (with ``prompt_len``).

    Raises:
        ValueError: naming ``name`` when the value is none of these or its prompt length disagrees with ``prompt_len``.
    """
    if isinstance(value, CapturedAttention):
        cap = value
    elif isinstance(value, Mapping):
        if "attention" not in value:
            raise ValueError(f"{name}: a dict entry needs the key 'attention'")
        reduce = value.get("reduce", "none") or "none"
        # with layer_head_mean the averaged layers were given as "selected_layer_ids"
        layer_ids = value.get("selected_layer_ids") if reduce == "layer_head_mean" else value.get("layer_ids")
        plen = value.get("prompt_len", prompt_len)
        if plen is None:
            raise ValueError(f"{name}: the prompt length is unknown (give 'prompt_len')")
        if prompt_len is not None and int(plen) != int(prompt_len):
            raise ValueError(
                f"{name}['prompt_len'] is {plen} but the prompt tokenizes to {prompt_len} tokens here: the capture "
                "and this reward tokenized the prompt differently"
            )
        cap = CapturedAttention(int(plen), np.asarray(value["attention"]), reduce=reduce, layer_ids=layer_ids,
                                num_layers=value.get("num_layers"))
    else:
        arr = np.asarray(value)
        if arr.ndim != 4:
            raise ValueError(f"{name}: expected a CapturedAttention, a dict or an (L, H, T, P+T-1) array, got shape {arr.shape}")
        if prompt_len is None:
            raise ValueError(f"{name}: a bare array needs the prompt length")
        cap = CapturedAttention(int(prompt_len), arr)
    if prompt_len is not None and cap.prompt_len != int(prompt_len):
        raise ValueError(
            f"{name}: the capture's prompt_len is {cap.prompt_len} but the prompt tokenizes to {prompt_len} tokens "
            "here: the capture and this reward tokenized the prompt differently"
        )
    return cap
