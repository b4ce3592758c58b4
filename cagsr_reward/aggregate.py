"""From captured attention to one turn's history block: head/layer averaging, the history slice, long-history elision.

Layout (method.md, "Attention that produced a token"): a full capture is a float32 array ``(L, H, T, P+T-1)``;
row ``s`` is the attention of the query at position ``P-1+s`` (the one whose logits produced ``y_s``) over keys
``0..P-1+s``, zeros to the right. numpy only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import ELISION_N_MAX, ELISION_WINDOW
from .core import _check_attn, _check_positions, _check_sink, _is_int

__all__ = ["ElidedBlock", "aggregate", "elide", "history_block"]


def _select(name: str, spec: Any, size: int, ids: np.ndarray | None, num_ids: int | None) -> np.ndarray:
    """Indices into an axis of length `size` for a selection `spec` ("all" or ints, negatives allowed)."""
    if isinstance(spec, str):
        if spec == "all":
            return np.arange(size)
        raise ValueError(f"{name}: expected 'all' or a sequence of ints, got {spec!r}")
    if _is_int(spec):
        spec = (spec,)
    if not isinstance(spec, (Sequence, np.ndarray)) or len(spec) == 0 or not all(_is_int(v) for v in spec):
        raise ValueError(f"{name}: expected 'all' or a non-empty sequence of ints, got {spec!r}")
    if ids is None:
        out = []
        for v in spec:
            if not -size <= v < size:
                raise ValueError(f"{name}: index {v} out of range for an axis of {size} entr(y/ies)")
            out.append(int(v) % size)
        return np.unique(np.asarray(out, dtype=np.int64))
    # `spec` names model layer ids; `ids[k]` is the model layer id held at array index k.
    out = []
    for v in spec:
        model_id = int(v)
        if model_id < 0:
            if num_ids is None:
                raise ValueError(f"num_layers: needed to resolve the negative layer id {model_id} given layer_ids")
            model_id += num_ids
        hits = np.flatnonzero(ids == model_id)
        if hits.size == 0:
            raise ValueError(f"{name}: model layer {v} (id {model_id}) was not captured; captured: {ids.tolist()}")
        out.append(int(hits[0]))
    return np.unique(np.asarray(out, dtype=np.int64))


def aggregate(
    attention: Any,
    *,
    layers: Any = (-1,),
    heads: Any = "all",
    layer_ids: Sequence[int] | None = None,
    num_layers: int | None = None,
) -> np.ndarray:
    r"""
    Average a capture over the chosen heads, then over the chosen layers (method.md; MTC §3):

    $$
    a_{s,i} = \frac{1}{|\mathcal L|} \sum_{l \in \mathcal L} \frac{1}{|\mathcal H|} \sum_{h \in \mathcal H}
    A^{(l,h)}_{s,i}.
    $$

    Args:
        attention (`np.ndarray`):
            Either the full capture ``(L, H, T, K)`` (``K = P+T-1``; ``L`` or ``H`` may be 1 for captures reduced
            on the device) or an already aggregated ``(T, K)`` array, returned unchanged after validation (then
            `layers` and `heads` are not consulted).
        layers (`"all"` or sequence of `int`, *optional*, defaults to `(-1,)`):
            Layers to average. Without `layer_ids` these index the ``L`` axis (``-1`` = last entry); with
            `layer_ids` they are model layer ids. Duplicates (after resolving negatives) count once.
        heads (`"all"` or sequence of `int`, *optional*, defaults to `"all"`):
            Query heads to average, indices into the ``H`` axis (negatives allowed). Duplicates count once.
        layer_ids (sequence of `int` or `None`, *optional*, defaults to `None`):
            Model layer id of each entry of the ``L`` axis, for captures that hold a subset of the layers.
        num_layers (`int` or `None`, *optional*, defaults to `None`):
            Number of layers of the model; needed to resolve negative `layers` when `layer_ids` is given
            (``-1`` then means model layer ``num_layers - 1``).

    Returns:
        `np.ndarray` of shape `(T, K)`: float32 for a float32 capture (averaged in float64, stored back at the
        capture's precision, which keeps the scoring on the fast float32 path), float64 otherwise.

    Example:
    ```python
    >>> import numpy as np
    >>> cap = np.zeros((2, 2, 1, 2), dtype=np.float32)
    >>> cap[1, 0, 0] = [1.0, 0.0]; cap[1, 1, 0] = [0.5, 0.5]; cap[0, :, 0] = [0.0, 1.0]
    >>> aggregate(cap).tolist()  # last layer, mean of its two heads
    [[0.75, 0.25]]
    >>> aggregate(cap, layers="all", heads=[0]).tolist()
    [[0.5, 0.5]]
    >>> aggregate(cap[1:], layers=[29], layer_ids=[29]).tolist()  # a capture that only holds model layer 29
    [[0.75, 0.25]]

    ```
    """
    arr = np.asarray(attention)
    if arr.ndim == 2:
        return _check_attn(arr, "attention")
    if arr.ndim != 4:
        raise ValueError(f"attention: expected a (L, H, T, K) or (T, K) array, got {arr.ndim}-D with shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"attention: expected a floating-point array, got dtype {arr.dtype}")
    n_layers, n_heads = arr.shape[:2]
    ids = None
    if layer_ids is not None:
        ids = np.asarray(layer_ids)
        if ids.ndim != 1 or ids.size != n_layers or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"layer_ids: expected {n_layers} integer layer ids (one per L entry), got {layer_ids!r}")
        if np.unique(ids).size != ids.size:
            raise ValueError(f"layer_ids: duplicate layer ids {ids.tolist()}")
    if num_layers is not None and (not _is_int(num_layers) or num_layers < 1):
        raise ValueError(f"num_layers: expected an int >= 1, got {num_layers!r}")
    li = _select("layers", layers, n_layers, ids, num_layers)
    hi = _select("heads", heads, n_heads, None, None)
    chosen = arr[li][:, hi] if (li.size != n_layers or hi.size != n_heads) else arr
    # mean over heads then layers == mean over both at once (equal group sizes); accumulate in float64.
    out = chosen.mean(axis=(0, 1), dtype=np.float64)
    if not np.isfinite(out).all():
        raise ValueError("attention: non-finite values in the selected layers/heads")
    return out.astype(np.float32) if arr.dtype == np.float32 else out


def history_block(a: Any, prompt_len: int) -> np.ndarray:
    r"""
    The history block of an aggregated turn: columns ``0..P-1`` of ``a`` (the prompt / conversation history).

    Args:
        a (`np.ndarray` of shape `(T, K)`):
            Aggregated attention (see `aggregate`), ``K = P+T-1`` for a full row layout.
        prompt_len (`int`):
            $P$, the number of history tokens, ``1 <= P <= K``.

    Returns:
        `np.ndarray` of shape `(T, P)`: a view of ``a`` (not renormalised).

    Example:
    ```python
    >>> import numpy as np
    >>> a = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])  # P = 2, T = 2
    >>> history_block(a, 2).tolist()
    [[0.5, 0.5], [0.2, 0.3]]

    ```
    """
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise ValueError(f"a: expected a 2-D (T, K) array, got {arr.ndim}-D with shape {arr.shape}")
    if not _is_int(prompt_len) or not 1 <= prompt_len <= arr.shape[1]:
        raise ValueError(f"prompt_len: expected an int in [1, {arr.shape[1]}], got {prompt_len!r}")
    return arr[:, : int(prompt_len)]


@dataclasses.dataclass(frozen=True)
class ElidedBlock:
    """A history block after the long-history rule (MTC §5.1).

    Attributes:
        block (`np.ndarray` of shape `(T, P')`): the kept columns in position order, with the merged column (if any)
            where the first elided position was.
        salient (`np.ndarray` of int64): salient positions remapped to column indices of `block` (sinks removed).
        columns (`np.ndarray` of int64, shape `(P',)`): original history position of each column, ``-1`` for the
            merged elided column.
        elided_count (`int`): number of original columns merged into the elided column (0 = nothing elided).
    """

    block: np.ndarray
    salient: np.ndarray
    columns: np.ndarray
    elided_count: int


def _elide_checked(a: np.ndarray, positions: np.ndarray, n_max: int, window: int, sink: int) -> ElidedBlock:
    num = a.shape[1]
    positions = positions[positions >= sink] if sink else positions
    if num <= n_max:
        return ElidedBlock(a, positions, np.arange(num, dtype=np.int64), 0)
    keep = np.zeros(num, dtype=bool)
    keep[:sink] = True
    keep[positions] = True
    if window:
        keep[max(num - window, 0) :] = True
    elided = ~keep
    count = int(elided.sum())
    if count == 0:
        return ElidedBlock(a, positions, np.arange(num, dtype=np.int64), 0)
    first = int(np.argmax(elided))
    slots = np.flatnonzero(keep)
    slots = np.insert(slots, np.searchsorted(slots, first), first)  # original positions in order
    block = np.take(a, slots, axis=1)  # a fresh array, safe to write into (take: ~5x faster than a[:, slots])
    at = int(np.searchsorted(slots, first))
    # merged mass as a matrix-vector product with the 0/1 mask: one BLAS pass instead of a strided column gather
    block[:, at] = a @ elided.astype(a.dtype)
    columns = slots.copy()
    columns[at] = -1
    return ElidedBlock(block, np.searchsorted(slots, positions).astype(np.int64), columns, count)


def elide(
    block: Any, salient: Any, *, n_max: int = ELISION_N_MAX, window: int = ELISION_WINDOW, sink: int = 0
) -> ElidedBlock:
    r"""
    The long-history rule (MTC §5.1, method.md "Long histories"). When the history has more than `n_max`
    positions, keep the sink columns, the salient positions and the last `window` positions, and merge the mass
    of every other column into one elided column, which counts as one outcome in the entropy and is never
    salient. Row mass is preserved, so renormalisation and coverage are unchanged by construction; only the
    entropy sees the merge. With ``P <= n_max`` the block is returned unchanged.

    Args:
        block (`np.ndarray` of shape `(T, P)`):
            Raw history block.
        salient (sequence of `int`):
            Salient positions, each in ``[0, P)``; positions below `sink` are dropped.
        n_max (`int`, *optional*, defaults to `1024`):
            $N_{\max}$: longest history kept in full.
        window (`int`, *optional*, defaults to `512`):
            $W$: most recent positions always kept.
        sink (`int`, *optional*, defaults to `0`):
            Leading sink columns, always kept (and never salient).

    Returns:
        `ElidedBlock`.

    Example:
    ```python
    >>> import numpy as np
    >>> row = np.array([[0.1, 0.1, 0.2, 0.1, 0.2, 0.3]])
    >>> e = elide(row, [2], n_max=4, window=2, sink=1)
    >>> e.columns.tolist(), e.block.round(2).tolist(), e.salient.tolist(), e.elided_count
    ([0, -1, 2, 4, 5], [[0.1, 0.2, 0.2, 0.2, 0.3]], [2], 2)

    ```
    """
    a = _check_attn(block, "block")
    if not _is_int(n_max) or n_max < 1:
        raise ValueError(f"n_max: expected an int >= 1, got {n_max!r}")
    if not _is_int(window) or window < 0:
        raise ValueError(f"window: expected an int >= 0, got {window!r}")
    sink = _check_sink(sink, a.shape[1])
    positions = _check_positions(salient, a.shape[1])
    return _elide_checked(a, positions, int(n_max), int(window), sink)
