"""CUDA path of capture: thin wrappers over the ``vllm_attncap.engine.cuda._kernels`` extension.

Each function checks its tensors (device, dtype, shape, last-dimension
contiguity), picks the kernel and launches it on the current CUDA stream; the
math is that of :mod:`vllm_attncap.engine.reference` (probabilities, head
mean, history statistics) and :mod:`vllm_attncap.engine.elide` (elided
columns), and tests/gpu/test_kernels.py compares the two.

None of the functions synchronises or reads device data on the host (unless
``validate=True``), and their launch shapes depend only on tensor sizes, so
they can be recorded into a CUDA graph and replayed with new contents in the
same tensors; see docs/kernels.md, "Graph safety".

Importing this module is cheap and works without the extension or a GPU;
:func:`is_available` says whether the kernels can run, and calling a kernel
without the extension raises :class:`KernelsUnavailable` (an ``ImportError``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "KernelsUnavailable",
    "is_available",
    "paged_attention_probs",
    "head_mean",
    "history_stats",
    "salient_mask",
    "elide_rows",
    "topk_keys",
    "PROBS_HEAD_DIMS",
    "DEFAULT_CHUNK_LEN",
    "DecodeCapture",
    "preload",
]

#: Head dimensions the probabilities kernel is compiled for.
PROBS_HEAD_DIMS = (64, 128)
#: Key positions per thread block of the probabilities kernel.
DEFAULT_CHUNK_LEN = 1024

_ext = None
_ext_error: BaseException | None = None
_preloaded: set[int] = set()


class KernelsUnavailable(ImportError):
    """The compiled extension ``vllm_attncap.engine.cuda._kernels`` is not importable."""


def _load():
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            from . import _kernels  # noqa: PLC0415 - optional, loaded on first use

            _ext = _kernels
        except ImportError as exc:
            _ext_error = exc
    return _ext


def is_available() -> bool:
    """True when the extension imports and torch sees a CUDA device."""
    return _load() is not None and torch.cuda.is_available()


def _kernels():
    ext = _load()
    if ext is None:
        raise KernelsUnavailable(
            "vllm_attncap.engine.cuda._kernels is not built, so the CUDA capture kernels are unavailable "
            f"({_ext_error}). Build it with `ATTNCAP_BUILD_KERNELS=1 pip install -e .` (or "
            "`python setup.py build_ext --inplace`) on a machine with nvcc; see docs/kernels.md. "
            "The torch reference (vllm_attncap.engine.reference) needs no extension."
        )
    return ext


def _launch_context(device: torch.device) -> tuple[int, int]:
    """(device index, current stream handle); preloads the kernels on first use of a device."""
    ext = _kernels()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _preloaded:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "vllm_attncap kernels: first launch on a device inside a CUDA graph capture; "
                "run once eagerly (warm-up) before capturing"
            )
        ext.preload(index)
        _preloaded.add(index)
    return index, torch.cuda.current_stream(index).cuda_stream


def preload(device: torch.device) -> None:
    """Load every kernel on ``device`` now (before any CUDA graph capture can launch one)."""
    _launch_context(device)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cuda_device(name: str, t: torch.Tensor) -> torch.device:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got {t.device}")
    return t.device


def _check_cuda(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _check_index(name: str, t: torch.Tensor, n: int, device: torch.device) -> None:
    _check_cuda(name, t, device)
    if t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] != n or (n > 1 and t.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous ({n},) int32 tensor, got {tuple(t.shape)} {t.dtype}")


def _per_row(name: str, value: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        _check_index(name, value, n, device)
        return value
    return torch.full((n,), int(value), dtype=torch.int32, device=device)


def _check_rows(name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """float32 (n, h, W) or (n, W) with a contiguous last dimension, as (n, h, W)."""
    _check_cuda(name, t, device)
    if t.dtype != torch.float32 or t.dim() not in (2, 3):
        raise ValueError(f"{name} must be float32 (n, h, W) or (n, W), got {tuple(t.shape)} {t.dtype}")
    t3 = t if t.dim() == 3 else t.unsqueeze(1)
    if t3.shape[-1] > 1 and t3.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous")
    return t3


# --------------------------------------------------------------------------- probabilities


def paged_attention_probs(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    q_pos: torch.Tensor,
    ctx_len: torch.Tensor,
    *,
    scale: float,
    heads: torch.Tensor | Sequence[int] | None = None,
    q_index: torch.Tensor | None = None,
    bt_row: torch.Tensor | None = None,
    softcap: float = 0.0,
    sliding_window: int = -1,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    width: int | None = None,
    out: torch.Tensor | None = None,
    chunk_len: int = DEFAULT_CHUNK_LEN,
    validate: bool = False,
) -> torch.Tensor:
    """Float32 attention probabilities of ``n`` captured query rows over a paged key cache.

    Row ``r`` is query token ``q_index[r]`` (default ``r``) at position ``q_pos[r]``
    of the request whose block-table row is ``bt_row[r]`` (default ``r``); for each
    selected query head ``h`` (KV head ``h // (H / H_kv)``)

    .. math:: p_j = \\frac{\\exp(s_j)}{\\sum_{i} \\exp(s_i) + [\\exp(\\sigma_h)]},\\quad
              s_j = \\mathrm{cap}\\tanh\\!\\big(\\tfrac{\\mathrm{scale}\\, q\\cdot k_j}{\\mathrm{cap}}\\big)
              + \\mathrm{slope}_h (j - q\\_pos)

    over key positions ``j <= q_pos`` (``j > q_pos - sliding_window`` with a window,
    ``j < ctx_len``), zeros elsewhere; the bracketed sink term only with ``sinks``.
    Same result as ``reference.attention_probs(q, gather_keys(...), q_pos, ...)``.

    Args:
        query: ``(num_tokens, H, D)`` fp16/bf16, last dimension contiguous (any token/head strides).
        key_cache: ``(num_blocks, block_size, H_kv, D)``, same dtype, last dimension contiguous,
            other strides arbitrary multiples of 8 elements: vLLM 0.23-0.25 FlashAttention
            gives ``kv_cache.unbind(1)[0]`` of ``[num_blocks, 2, block_size, H_kv, D]``.
        block_table: ``(num_reqs, max_blocks)`` int32.
        q_pos: ``(n,)`` int32 query positions.
        ctx_len: ``(n,)`` int32 key positions present in the cache (``seq_lens`` of the row's request).
        scale: softmax scale.
        heads: query heads to compute, ``(h,)`` int32 tensor or ints (default all ``H``).
        q_index: ``(n,)`` int32 token of each row in ``query`` (default ``0..n-1``).
        bt_row: ``(n,)`` int32 block-table row of each row (default ``0..n-1``).
        softcap: tanh soft-cap (0 = none).
        sliding_window: window length (-1 = none).
        alibi_slopes: ``(H,)`` float32 or ``None``.
        sinks: ``(H,)`` float32 sink logits or ``None``.
        width: output row width (required without ``out``); must exceed every ``q_pos``
            (keys at or beyond ``width`` are ignored, which would leave a row unnormalised).
        out: ``(n, h, width)`` float32, last dimension contiguous, e.g. a slice of a capture buffer.
        chunk_len: key positions per thread block (rows longer than this take a second,
            normalising launch).
        validate: check index ranges on the host first (synchronises; debugging only).

    Returns:
        ``out``, ``(n, h, width)`` float32.
    """
    device = _cuda_device("paged_attention_probs: query", query)
    if query.dtype not in (torch.float16, torch.bfloat16) or query.dim() != 3:
        raise ValueError(f"paged_attention_probs: query must be fp16/bf16 (num_tokens, H, D), got {tuple(query.shape)} {query.dtype}")
    num_tokens, num_heads, head_dim = query.shape
    if head_dim not in PROBS_HEAD_DIMS:
        raise ValueError(f"paged_attention_probs: head dim {head_dim} is not compiled (supported: {PROBS_HEAD_DIMS})")
    if query.stride(-1) != 1:
        raise ValueError("paged_attention_probs: query's last dimension must be contiguous")
    _check_cuda("key_cache", key_cache, device)
    if key_cache.dtype != query.dtype or key_cache.dim() != 4 or key_cache.shape[-1] != head_dim:
        raise ValueError(
            f"paged_attention_probs: key_cache must be {query.dtype} (num_blocks, block_size, H_kv, {head_dim}), "
            f"got {tuple(key_cache.shape)} {key_cache.dtype}"
        )
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    if key_cache.stride(-1) != 1 or any(s % 8 for s in key_cache.stride()[:3]) or key_cache.data_ptr() % 16:
        raise ValueError(
            "paged_attention_probs: key_cache needs a contiguous last dimension, 16-byte alignment and "
            f"block/token/head strides that are multiples of 8 elements, got strides {key_cache.stride()}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"paged_attention_probs: {num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    _check_cuda("block_table", block_table, device)
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or (block_table.shape[1] > 1 and block_table.stride(1) != 1):
        raise ValueError(f"paged_attention_probs: block_table must be int32 (num_reqs, max_blocks) with contiguous rows, got {tuple(block_table.shape)} {block_table.dtype}")
    n = q_pos.shape[0] if q_pos.dim() == 1 else -1
    _check_index("q_pos", q_pos, n, device)
    _check_index("ctx_len", ctx_len, n, device)
    if q_index is not None:
        _check_index("q_index", q_index, n, device)
    elif n > num_tokens:
        raise ValueError(f"paged_attention_probs: {n} rows but query has {num_tokens} tokens; pass q_index")
    if bt_row is not None:
        _check_index("bt_row", bt_row, n, device)
    elif n > block_table.shape[0]:
        raise ValueError(f"paged_attention_probs: {n} rows but block_table has {block_table.shape[0]} rows; pass bt_row")
    heads_t = _heads_tensor(heads, num_heads, device)
    h = heads_t.shape[0]
    for name, vec in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if vec is not None:
            _check_cuda(name, vec, device)
            if vec.dtype != torch.float32 or vec.shape != (num_heads,) or (num_heads > 1 and vec.stride(0) != 1):
                raise ValueError(f"paged_attention_probs: {name} must be contiguous float32 ({num_heads},), got {tuple(vec.shape)} {vec.dtype}")
    if out is None:
        if width is None:
            raise ValueError("paged_attention_probs: pass width (or out); it must exceed every q_pos")
        out = torch.empty((n, h, int(width)), dtype=torch.float32, device=device)
    else:
        _check_cuda("out", out, device)
        if width is None:
            width = out.shape[-1] if out.dim() == 3 else -1
        if out.dtype != torch.float32 or tuple(out.shape) != (n, h, width) or (width > 1 and out.stride(-1) != 1):
            raise ValueError(f"paged_attention_probs: out must be float32 ({n}, {h}, {width}) with a contiguous last dimension, got {tuple(out.shape)} {out.dtype}")
    width = int(width)
    if chunk_len < 1:
        raise ValueError(f"paged_attention_probs: chunk_len must be >= 1, got {chunk_len}")
    if softcap < 0 or not math.isfinite(softcap):
        raise ValueError(f"paged_attention_probs: softcap must be finite and >= 0, got {softcap}")
    num_chunks = -(-width // chunk_len)
    if n == 0 or h == 0 or width == 0:
        return out
    if validate:
        _validate_probs(q_pos, ctx_len, heads_t, block_table, bt_row, q_index, num_heads, num_tokens, num_blocks,
                        block_size, width)
    partials = torch.empty((n, h, num_chunks, 2), dtype=torch.float32, device=device) if num_chunks > 1 else None
    ext = _kernels()
    index, stream = _launch_context(device)
    ext.paged_attention_probs(
        device=index, stream=stream,
        dtype=ext.DTYPE_BFLOAT16 if query.dtype == torch.bfloat16 else ext.DTYPE_FLOAT16, head_dim=head_dim,
        q=query.data_ptr(), q_stride_token=query.stride(0), q_stride_head=query.stride(1), q_index=_ptr(q_index),
        k=key_cache.data_ptr(), k_stride_block=key_cache.stride(0), k_stride_token=key_cache.stride(1),
        k_stride_head=key_cache.stride(2), block_size=block_size,
        block_table=block_table.data_ptr(), bt_stride=block_table.stride(0), bt_row=_ptr(bt_row),
        q_pos=q_pos.data_ptr(), ctx_len=ctx_len.data_ptr(), heads=heads_t.data_ptr(),
        n_rows=n, n_heads=h, group=num_heads // num_kv_heads, scale=float(scale), softcap=float(softcap),
        window=int(sliding_window) if sliding_window and sliding_window > 0 else -1,
        alibi=_ptr(alibi_slopes), sinks=_ptr(sinks),
        out=out.data_ptr(), out_stride_row=out.stride(0), out_stride_head=out.stride(1), width=width,
        chunk_len=int(chunk_len), partials=_ptr(partials),
    )
    return out


_heads_cache: dict[tuple[int, torch.device], torch.Tensor] = {}


def _heads_tensor(heads, num_heads: int, device: torch.device) -> torch.Tensor:
    if heads is None:
        key = (num_heads, device)
        if key not in _heads_cache:
            _heads_cache[key] = torch.arange(num_heads, dtype=torch.int32, device=device)
        return _heads_cache[key]
    if isinstance(heads, torch.Tensor):
        _check_cuda("heads", heads, device)
        if heads.dtype != torch.int32 or heads.dim() != 1 or (heads.numel() > 1 and heads.stride(0) != 1):
            raise ValueError(f"paged_attention_probs: heads must be a contiguous 1-D int32 tensor, got {tuple(heads.shape)} {heads.dtype}")
        return heads
    idx = [int(x) for x in heads]
    if any(not 0 <= x < num_heads for x in idx):
        raise ValueError(f"paged_attention_probs: head indices must lie in 0..{num_heads - 1}, got {idx}")
    return torch.tensor(idx, dtype=torch.int32, device=device)


def _validate_probs(q_pos, ctx_len, heads, block_table, bt_row, q_index, num_heads, num_tokens, num_blocks,
                    block_size, width) -> None:
    """Host-side range checks (synchronising)."""
    pos = q_pos.cpu()
    ctx = ctx_len.cpu()
    if int(pos.min()) < 0 or int(pos.max()) >= width:
        raise ValueError(f"paged_attention_probs: q_pos must lie in 0..{width - 1} (width), got {pos.tolist()}")
    hd = heads.cpu()
    if int(hd.min()) < 0 or int(hd.max()) >= num_heads:
        raise ValueError(f"paged_attention_probs: heads must lie in 0..{num_heads - 1}, got {hd.tolist()}")
    if q_index is not None:
        qi = q_index.cpu()
        if int(qi.min()) < 0 or int(qi.max()) >= num_tokens:
            raise ValueError(f"paged_attention_probs: q_index must lie in 0..{num_tokens - 1}")
    rows = bt_row.cpu().long() if bt_row is not None else torch.arange(pos.shape[0])
    if int(rows.min()) < 0 or int(rows.max()) >= block_table.shape[0]:
        raise ValueError(f"paged_attention_probs: bt_row must lie in 0..{block_table.shape[0] - 1}")
    table = block_table.cpu()
    used = torch.minimum(torch.minimum(pos + 1, ctx), torch.tensor(width))
    for r in range(pos.shape[0]):
        nblk = -(-int(used[r]) // block_size)
        if nblk > table.shape[1]:
            raise ValueError(f"paged_attention_probs: row {r} needs {nblk} blocks, block_table has {table.shape[1]}")
        ids = table[int(rows[r]), :nblk]
        if nblk and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
            raise ValueError(f"paged_attention_probs: row {r} has block ids outside 0..{num_blocks - 1}")


# --------------------------------------------------------------------------- reductions


def head_mean(
    probs: torch.Tensor, out: torch.Tensor | None = None, *, weight: float = 1.0, accumulate: bool = False
) -> torch.Tensor:
    """``out = (out if accumulate else 0) + weight * probs.mean(dim=1)``.

    With ``weight = 1/L`` and ``accumulate=True`` over a request's ``L`` layers,
    ``out`` ends as the layer-and-head mean (``reduce="layer_head_mean"``).

    Args:
        probs: ``(n, h, W)`` float32, last dimension contiguous.
        out: ``(n, W)`` float32, last dimension contiguous (required with ``accumulate``).
    """
    device = _cuda_device("probs", probs)
    p = _check_rows("probs", probs, device)
    if probs.dim() != 3:
        raise ValueError("head_mean: probs must be (n, h, W)")
    n, h, w = p.shape
    if h == 0:
        raise ValueError("head_mean: no heads to average")
    if out is None:
        if accumulate:
            raise ValueError("head_mean: accumulate=True needs out")
        out = torch.empty((n, w), dtype=torch.float32, device=device)
    else:
        _check_cuda("out", out, device)
        if out.dtype != torch.float32 or tuple(out.shape) != (n, w) or (w > 1 and out.stride(1) != 1):
            raise ValueError(f"head_mean: out must be float32 ({n}, {w}) with contiguous rows, got {tuple(out.shape)} {out.dtype}")
    if n == 0 or w == 0:
        return out
    ext = _kernels()
    index, stream = _launch_context(device)
    ext.head_mean(device=index, stream=stream, in_=p.data_ptr(), in_stride_row=p.stride(0), in_stride_head=p.stride(1),
                  n_rows=n, n_heads=h, width=w, out=out.data_ptr(), out_stride_row=out.stride(0),
                  weight=float(weight), accumulate=bool(accumulate))
    return out


def topk_keys(
    probs: torch.Tensor, q_pos: torch.Tensor, k: int, *, sliding_window: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` keys of highest probability of each row (kernels/topk.cu): the CUDA twin of
    :func:`vllm_attncap.engine.reference.topk_keys`, with the same arguments and result (int32 positions,
    float32 probabilities, ``(n, h, k)``; ties to the lower position; -1 / 0 padding).

    Written against the reference and compiled for sm_80/sm_90, but not yet run on a GPU (docs/kernels.md): the
    engine's top-k capture on CUDA uses the torch reference until ``tests/gpu/test_topk_kernel.py`` has passed.
    """
    device = _cuda_device("probs", probs)
    p = _check_rows("probs", probs, device)
    if probs.dim() != 3:
        raise ValueError("topk_keys: probs must be (n, h, C)")
    if not isinstance(k, int) or not 1 <= k <= 1024:
        raise ValueError(f"topk_keys: k must be an int in 1..1024, got {k!r}")
    n, h, w = p.shape
    qp = q_pos.to(device=device, dtype=torch.int32).contiguous()
    _check_index("q_pos", qp, n, device)
    positions = torch.full((n, h, k), -1, dtype=torch.int32, device=device)
    values = torch.zeros((n, h, k), dtype=torch.float32, device=device)
    if n == 0 or h == 0:
        return positions, values
    ext = _kernels()
    index, stream = _launch_context(device)
    ext.topk_keys(device=index, stream=stream, in_=p.data_ptr(), in_stride_row=p.stride(0), in_stride_head=p.stride(1),
                  n_rows=n, n_heads=h, width=w, q_pos=qp.data_ptr(), window=int(sliding_window or -1), k=k,
                  positions=positions.data_ptr(), pos_stride_row=positions.stride(0),
                  pos_stride_head=positions.stride(1), probs=values.data_ptr(), prob_stride_row=values.stride(0),
                  prob_stride_head=values.stride(1))
    return positions, values


def salient_mask(salient: torch.Tensor | Sequence[int], width: int, device: torch.device | str) -> torch.Tensor:
    """``(1, width)`` uint8 mask with ones at the salient positions (those ``>= width`` dropped)."""
    mask = torch.zeros((1, width), dtype=torch.uint8, device=device)
    pos = torch.as_tensor(salient, dtype=torch.long, device=device).flatten()
    pos = pos[(pos >= 0) & (pos < width)]
    if pos.numel():
        mask[0, pos] = 1
    return mask


def history_stats(
    probs: torch.Tensor,
    history_len: int | torch.Tensor,
    sink: int | torch.Tensor = 0,
    salient: torch.Tensor | None = None,
    *,
    salient_row: torch.Tensor | None = None,
    coverage: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row coverage and history entropy (``reference.history_stats`` on the device).

    The history block of row ``r`` is columns ``sink[r]..history_len[r]-1``,
    renormalised; coverage is its mass on salient columns, entropy
    ``-sum p ln p``; both NaN when the block has no mass (coverage 0 when no
    salient column lies in the block, as in the reference).

    Args:
        probs: ``(n, h, W)`` or ``(n, W)`` float32, last dimension contiguous.
        history_len: int or ``(n,)`` int32 per row.
        sink: int or ``(n,)`` int32 per row.
        salient: ``(M, Ws)`` uint8/bool mask of salient columns (:func:`salient_mask`);
            one row applies to all rows, else row ``salient_row[r]`` (default ``r``).
        salient_row: ``(n,)`` int32.
        coverage, entropy: optional outputs shaped ``probs.shape[:-1]`` (any strides).

    Returns:
        ``(coverage, entropy)``, float32, shaped ``probs.shape[:-1]``.
    """
    device = _cuda_device("probs", probs)
    p = _check_rows("probs", probs, device)
    n, h, w = p.shape
    hist = _per_row("history_len", history_len, n, device)
    snk = _per_row("sink", sink, n, device)
    mask = None
    if salient is not None:
        _check_cuda("salient", salient, device)
        if salient.dtype not in (torch.uint8, torch.bool) or salient.dim() != 2 or (salient.shape[1] > 1 and salient.stride(1) != 1):
            raise ValueError(f"history_stats: salient must be a (M, W) uint8/bool mask with contiguous rows, got {tuple(salient.shape)} {salient.dtype}")
        mask = salient.view(torch.uint8) if salient.dtype == torch.bool else salient
        if salient_row is not None:
            _check_index("salient_row", salient_row, n, device)
        elif mask.shape[0] not in (1, n):
            raise ValueError(f"history_stats: salient has {mask.shape[0]} rows for {n} rows; pass salient_row")
    outs = []
    for name, t in (("coverage", coverage), ("entropy", entropy)):
        if t is None:
            t = torch.empty(probs.shape[:-1], dtype=torch.float32, device=device)
        else:
            _check_cuda(name, t, device)
            if t.dtype != torch.float32 or tuple(t.shape) != tuple(probs.shape[:-1]):
                raise ValueError(f"history_stats: {name} must be float32 {tuple(probs.shape[:-1])}, got {tuple(t.shape)} {t.dtype}")
        outs.append(t)
    cov, ent = outs
    if n == 0 or h == 0:
        return cov, ent
    cov3 = cov if cov.dim() == 2 else cov.unsqueeze(1)
    ent3 = ent if ent.dim() == 2 else ent.unsqueeze(1)
    ext = _kernels()
    index, stream = _launch_context(device)
    ext.history_stats(
        device=index, stream=stream, in_=p.data_ptr(), in_stride_row=p.stride(0), in_stride_head=p.stride(1),
        n_rows=n, n_heads=h, width=w, history_len=hist.data_ptr(), sink=snk.data_ptr(),
        salient=_ptr(mask), salient_stride_row=0 if mask is None or (mask.shape[0] == 1 and salient_row is None) else mask.stride(0),
        salient_width=0 if mask is None else mask.shape[1], salient_row=_ptr(salient_row),
        coverage=cov3.data_ptr(), cov_stride_row=cov3.stride(0), cov_stride_head=cov3.stride(1),
        entropy=ent3.data_ptr(), ent_stride_row=ent3.stride(0), ent_stride_head=ent3.stride(1),
    )
    return cov, ent


def elide_rows(
    probs: torch.Tensor,
    plan,
    elided: torch.Tensor | None = None,
    *,
    plan_row: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The elided-column rule on the device (reference: :func:`elide.apply_elision`).

    Args:
        probs: ``(n, h, W)`` or ``(n, W)`` float32, last dimension contiguous.
        plan: an :class:`~vllm_attncap.engine.elide.ElisionPlan` (its tables are
            copied to the device on each call: keep device tables for hot loops), or
            the ``(M, W_out)`` int32 source-column table on the device.
        elided: with a table ``plan``: ``(M, W_e)`` uint8/bool mask of elided columns.
        plan_row: ``(n,)`` int32 table row of each row (default: row 0 for all when
            ``M == 1``, else row ``r``).
        out: ``(n, h, W_out)`` (or ``(n, W_out)``) float32.

    Returns:
        ``out``: rows laid out as the plan says.
    """
    device = _cuda_device("probs", probs)
    p = _check_rows("probs", probs, device)
    n, h, w = p.shape
    if not isinstance(plan, torch.Tensor):
        if elided is not None:
            raise ValueError("elide_rows: pass either an ElisionPlan or (src_col, elided) tables")
        if plan.width != w:
            raise ValueError(f"elide_rows: rows have {w} columns, the plan expects {plan.width}")
        src = plan.src_col.to(device=device, dtype=torch.int32).view(1, -1)
        mask = plan.elided.to(device=device, dtype=torch.uint8).view(1, -1)
    else:
        src, mask = plan, elided
        if mask is None:
            raise ValueError("elide_rows: a src_col table needs its elided mask")
        for name, t, dtypes in (("src_col", src, (torch.int32,)), ("elided", mask, (torch.uint8, torch.bool))):
            _check_cuda(name, t, device)
            if t.dtype not in dtypes or t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
                raise ValueError(f"elide_rows: {name} must be a 2-D {dtypes} table with contiguous rows, got {tuple(t.shape)} {t.dtype}")
        if src.shape[0] != mask.shape[0]:
            raise ValueError("elide_rows: src_col and elided need the same number of rows")
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
    broadcast = src.shape[0] == 1 and plan_row is None
    if plan_row is not None:
        _check_index("plan_row", plan_row, n, device)
    elif not broadcast and src.shape[0] != n:
        raise ValueError(f"elide_rows: {src.shape[0]} plan rows for {n} rows; pass plan_row")
    w_out = src.shape[1]
    if out is None:
        out = torch.empty((n, h, w_out) if probs.dim() == 3 else (n, w_out), dtype=torch.float32, device=device)
    out3 = _check_rows("out", out, device)
    if tuple(out3.shape) != (n, h, w_out):
        raise ValueError(f"elide_rows: out must be ({n}, {h}, {w_out}), got {tuple(out.shape)}")
    if n == 0 or h == 0:
        return out
    ext = _kernels()
    index, stream = _launch_context(device)
    ext.elide_rows(
        device=index, stream=stream, in_=p.data_ptr(), in_stride_row=p.stride(0), in_stride_head=p.stride(1),
        n_rows=n, n_heads=h, in_width=w, src_col=src.data_ptr(), src_stride_row=0 if broadcast else src.stride(0),
        elided=mask.data_ptr(), elided_stride_row=0 if broadcast else mask.stride(0), elided_width=mask.shape[1],
        plan_row=_ptr(plan_row), out=out3.data_ptr(), out_stride_row=out3.stride(0),
        out_stride_head=out3.stride(1), out_width=w_out,
    )
    return out


# --------------------------------------------------------------------------- fused decode capture


class DecodeCapture:
    """The fused decode-capture launch of one layer (``kernels/decode_capture.cu``), prepared once.

    Everything fixed for the engine (buffers, model constants, the layer) is set in the launch record at
    construction; :meth:`launch` sets the step's query / cache / block-table / ``seq_lens`` addresses and the
    number of rows, then launches on the current stream. Inside a CUDA graph capture the launch is recorded with
    those addresses (vLLM keeps them static for full graphs) and replays with the buffers' new contents.

    Args:
        buffers: the :class:`~vllm_attncap.engine.cuda.graph_buffers.DecodeBuffers` (CUDA tensors).
        layer: the model layer of this launch.
        scale / softcap / window / alibi / sinks: the layer's attention parameters (``alibi`` / ``sinks``
            contiguous float32 ``(H,)`` CUDA tensors or None).
        rows: also run the head-mean rows pass (off when no rows request can run in the graph).
    """

    def __init__(self, buffers, *, layer: int, scale: float, softcap: float = 0.0, window: int = -1,
                 alibi: torch.Tensor | None = None, sinks: torch.Tensor | None = None, rows: bool = True) -> None:
        ext = _kernels()
        lay = buffers.layout
        if lay.num_heads // lay.num_kv_heads > 32:
            raise ValueError("DecodeCapture: at most 32 query heads per KV head")
        p = ext.DecodeCaptureParams()
        p.row_table = buffers.row_table.data_ptr()
        p.layer_mask = buffers.layer_mask.data_ptr()
        p.layer_mask_stride = buffers.layer_mask.stride(0)
        p.head_mask = buffers.head_mask.data_ptr()
        p.head_mask_stride = buffers.head_mask.stride(0)
        p.salient_mask = buffers.salient_mask.data_ptr()
        p.salient_stride = buffers.salient_mask.stride(0)
        p.salient_width = buffers.salient_mask.shape[1]
        p.num_heads = lay.num_heads
        p.num_kv_heads = lay.num_kv_heads
        p.group = lay.num_heads // lay.num_kv_heads
        p.num_layers = lay.num_layers
        p.layer = int(layer)
        p.n_splits = lay.n_splits
        p.scale = float(scale)
        p.softcap = float(softcap or 0.0)
        p.window = int(window) if window and window > 0 else -1
        p.alibi = _ptr(alibi)
        p.sinks = _ptr(sinks)
        p.stats = buffers.stats.data_ptr()
        p.rows = buffers.rows.data_ptr()
        p.rows_stride = buffers.rows.stride(0)
        p.partials = buffers.partials.data_ptr()
        p.counters = buffers.counters.data_ptr()
        self.params = p
        self.max_rows = lay.max_rows
        self.passes = 3 if rows else 1
        self._ext = ext
        self._keep = (buffers, alibi, sinks)

    def launch(self, query: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor, n_rows: int) -> None:
        """Capture this layer for the first ``n_rows`` batch rows (row ``b`` = query token ``b``)."""
        p = self.params
        p.q = query.data_ptr()
        p.q_stride_token = query.stride(0)
        p.q_stride_head = query.stride(1)
        p.k = key_cache.data_ptr()
        p.k_stride_block = key_cache.stride(0)
        p.k_stride_token = key_cache.stride(1)
        p.k_stride_head = key_cache.stride(2)
        p.block_size = key_cache.shape[1]
        p.block_table = block_table.data_ptr()
        p.bt_stride = block_table.stride(0)
        p.seq_lens = seq_lens.data_ptr()
        p.n_rows = min(int(n_rows), self.max_rows, block_table.shape[0], seq_lens.shape[0])
        index, stream = _launch_context(query.device)
        ext = self._ext
        self._ext.decode_capture(p, index, stream, ext.DTYPE_BFLOAT16 if query.dtype == torch.bfloat16
                                 else ext.DTYPE_FLOAT16, query.shape[2], self.passes)
