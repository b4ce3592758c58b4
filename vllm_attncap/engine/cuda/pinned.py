"""Pinned host buffers and asynchronous device-to-host copies of captures.

Two pieces, both usable from the worker process of the plugin:

- :class:`PinnedBufferPool`: a bounded pool of page-locked host buffers reused
  across requests. ``acquire(shape, dtype)`` hands out a tensor view over a
  pooled block, ``release(tensor, after=handle)`` gives it back (recycled only
  once the copy that fills it has completed); the total pinned bytes never
  exceed ``max_bytes`` and running out raises :class:`PinnedPoolExhausted`.
- :class:`AsyncCopier`: ``submit(device_tensor, host_view)`` orders the copy
  after the work already queued on the current (compute) stream, runs it on a
  side stream, and returns a :class:`CopyHandle` (``ready()`` / ``wait()``).
  The compute stream never waits for the copy and the host never blocks in
  ``submit``.

Why not a plain ``host.copy_(dev, non_blocking=True)``: on the compute stream
the copy would delay the next forward step by its own duration; on a side
stream it overlaps with the next step (docs/kernels.md, "Copies").

This module imports on a CPU-only machine; the pool then hands out ordinary
(unpinned) memory unless ``pin=True`` is asked for, and the copier refuses to
start without CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ... import envs

logger = logging.getLogger("vllm_attncap")

__all__ = ["PinnedPoolExhausted", "PinnedBufferPool", "CopyHandle", "AsyncCopier", "HostSink", "CudaRingOps",
           "Uploader"]


class PinnedPoolExhausted(RuntimeError):
    """The pool cannot hand out a buffer without exceeding its byte cap."""


def _size_class(nbytes: int, min_block: int) -> int:
    # Powers of two: torch's caching host allocator rounds pinned allocations
    # the same way, so a block's class is what it really pins.
    n = max(nbytes, min_block)
    return 1 << (n - 1).bit_length()


@dataclass
class _Block:
    storage: torch.Tensor  # uint8, (size,)
    size: int
    pending: Any = None  # event the block waits on before reuse (torch.cuda.Event or None)


@dataclass
class _PoolState:
    idle: dict[int, list[_Block]] = field(default_factory=dict)  # size class -> blocks
    pending: list[_Block] = field(default_factory=list)
    leased: dict[int, _Block] = field(default_factory=dict)  # data_ptr -> block
    reserved: int = 0


class PinnedBufferPool:
    """A bounded pool of (pinned) host buffers.

    Args:
        max_bytes: cap on the bytes the pool holds, leased and idle together.
        pin: page-lock the buffers; ``None`` (default) pins when CUDA is available.
        min_block: smallest block in bytes (blocks are powers of two).

    Thread-safe: the worker may release from a callback thread.

    Example (CPU, unpinned):
        >>> pool = PinnedBufferPool(1 << 20, pin=False)
        >>> buf = pool.acquire((4, 8))
        >>> buf.shape, buf.dtype, pool.bytes_in_use
        (torch.Size([4, 8]), torch.float32, 65536)
        >>> pool.release(buf); pool.bytes_in_use
        0
    """

    def __init__(self, max_bytes: int, *, pin: bool | None = None, min_block: int = 1 << 16) -> None:
        if max_bytes < 1:
            raise ValueError(f"PinnedBufferPool: max_bytes must be >= 1, got {max_bytes}")
        if min_block < 1:
            raise ValueError(f"PinnedBufferPool: min_block must be >= 1, got {min_block}")
        self.max_bytes = int(max_bytes)
        self.pin = torch.cuda.is_available() if pin is None else bool(pin)
        self.min_block = int(min_block)
        self._lock = threading.Lock()
        self._s = _PoolState()

    # ------------------------------------------------------------------ accounting
    @property
    def bytes_reserved(self) -> int:
        """Bytes of all blocks the pool holds (leased, pending and idle)."""
        return self._s.reserved

    @property
    def bytes_in_use(self) -> int:
        """Bytes of blocks currently leased out."""
        with self._lock:
            return sum(b.size for b in self._s.leased.values())

    # ------------------------------------------------------------------ lease / release
    def acquire(self, shape: Sequence[int] | int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A host tensor of ``shape``/``dtype`` over a pooled block (contents undefined).

        Raises:
            PinnedPoolExhausted: when the block would push the pool over ``max_bytes``
                even after dropping every idle block.
        """
        shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"PinnedBufferPool.acquire: negative dimension in {shape}")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        size = _size_class(nbytes, self.min_block)
        with self._lock:
            block = self._take_idle(size)
            if block is None:
                self._make_room(size, nbytes)
                block = _Block(self._allocate(size), size)
                self._s.reserved += size
            self._s.leased[block.storage.data_ptr()] = block
        return block.storage[:nbytes].view(dtype).view(shape)

    def release(self, tensor: torch.Tensor, *, after: "CopyHandle | Any | None" = None) -> None:
        """Return a tensor from :meth:`acquire` to the pool.

        Args:
            tensor: the tensor :meth:`acquire` returned (or any view starting at its first byte).
            after: a :class:`CopyHandle` or ``torch.cuda.Event``; the block is reused only
                once it has completed (so a copy still writing into it is never overrun).
        """
        event = after.done if isinstance(after, CopyHandle) else after
        with self._lock:
            block = self._s.leased.pop(tensor.data_ptr(), None)
            if block is None:
                raise ValueError("PinnedBufferPool.release: tensor was not acquired from this pool (or released twice)")
            if event is not None and not event.query():
                block.pending = event
                self._s.pending.append(block)
            else:
                self._s.idle.setdefault(block.size, []).append(block)

    @contextlib.contextmanager
    def lease(self, shape: Sequence[int] | int, dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:
        """``with pool.lease(shape) as buf:`` acquire, then release on exit."""
        buf = self.acquire(shape, dtype)
        try:
            yield buf
        finally:
            self.release(buf)

    def trim(self) -> int:
        """Drop every idle block; returns the bytes freed."""
        with self._lock:
            self._collect_pending()
            freed = sum(b.size for blocks in self._s.idle.values() for b in blocks)
            self._s.idle.clear()
            self._s.reserved -= freed
            return freed

    # ------------------------------------------------------------------ internals (lock held)
    def _collect_pending(self) -> None:
        still = []
        for b in self._s.pending:
            if b.pending.query():
                b.pending = None
                self._s.idle.setdefault(b.size, []).append(b)
            else:
                still.append(b)
        self._s.pending = still

    def _take_idle(self, size: int) -> _Block | None:
        self._collect_pending()
        blocks = self._s.idle.get(size)
        return blocks.pop() if blocks else None

    def _make_room(self, size: int, nbytes: int) -> None:
        if self._s.reserved + size <= self.max_bytes:
            return
        # Drop idle blocks of other sizes, largest first, until the new one fits.
        for cls in sorted(self._s.idle, reverse=True):
            blocks = self._s.idle[cls]
            while blocks and self._s.reserved + size > self.max_bytes:
                blocks.pop()
                self._s.reserved -= cls
        self._s.idle = {k: v for k, v in self._s.idle.items() if v}
        if self._s.reserved + size > self.max_bytes:
            in_use = sum(b.size for b in self._s.leased.values())
            pending = sum(b.size for b in self._s.pending)
            raise PinnedPoolExhausted(
                f"pinned pool exhausted: a {nbytes}-byte buffer needs a {size}-byte block, but "
                f"{in_use} bytes are leased and {pending} await copy completion out of max_bytes={self.max_bytes}; "
                "release finished captures, reduce the capture size, or raise the pool's max_bytes"
            )

    def _allocate(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)


class CopyHandle:
    """One submitted device-to-host copy.

    Holds the source and destination tensors until the copy completes, so
    neither can be freed under it.
    """

    __slots__ = ("src", "dst", "done")

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, done: Any) -> None:
        self.src = src
        self.dst = dst
        self.done = done  # torch.cuda.Event recorded on the side stream after the copy

    def ready(self) -> bool:
        """True once the host buffer holds the data (never blocks)."""
        return bool(self.done.query())

    def wait(self) -> torch.Tensor:
        """Block the calling host thread until the copy is complete; returns the host tensor."""
        self.done.synchronize()
        self.src = None  # the device tensor may be reused now
        return self.dst


class AsyncCopier:
    """Device-to-host copies on a side stream, ordered after the compute stream's work.

    ``submit`` records an event on the current stream, makes the side stream wait
    for it, queues ``host.copy_(device, non_blocking=True)`` on the side stream and
    records a completion event there. Nothing waits on the host, and the compute
    stream never waits for the side stream. Not for use inside CUDA graph capture
    (issue copies after a replay, from buffers the graph wrote).

    Args:
        device: CUDA device (default: the current one).
        stream: side stream to use (default: a new one on ``device``).
        require_pinned: refuse pageable host tensors, whose copies are not asynchronous.
    """

    def __init__(self, device: torch.device | int | str | None = None, *, stream: Any = None,
                 require_pinned: bool = True) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("AsyncCopier needs CUDA (torch.cuda.is_available() is False)")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"AsyncCopier: device must be a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = stream if stream is not None else torch.cuda.Stream(device=self.device)
        self.require_pinned = require_pinned

    def submit(self, src: torch.Tensor, dst: torch.Tensor) -> CopyHandle:
        """Queue ``dst.copy_(src)`` after the current stream's queued work; returns at once."""
        if src.device != self.device:
            raise ValueError(f"AsyncCopier.submit: source must be on {self.device}, got {src.device}")
        if dst.device.type != "cpu":
            raise ValueError(f"AsyncCopier.submit: destination must be a host tensor, got {dst.device}")
        if dst.shape != src.shape or dst.dtype != src.dtype:
            raise ValueError(
                f"AsyncCopier.submit: shape/dtype mismatch: source {tuple(src.shape)} {src.dtype}, "
                f"destination {tuple(dst.shape)} {dst.dtype}"
            )
        if not dst.is_contiguous():
            raise ValueError("AsyncCopier.submit: the destination must be contiguous (a strided host copy is synchronous)")
        if self.require_pinned and not dst.is_pinned():
            raise ValueError("AsyncCopier.submit: the destination is not pinned, so the copy would block the host; "
                             "use PinnedBufferPool(pin=True) or pass require_pinned=False")
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("AsyncCopier.submit cannot run during CUDA graph capture; issue copies after replay")
        compute = torch.cuda.current_stream(self.device)
        produced = torch.cuda.Event()
        produced.record(compute)
        self.stream.wait_event(produced)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        # The caching allocator must not hand src's memory to the compute stream
        # before the side stream has read it.
        src.record_stream(self.stream)
        return CopyHandle(src, dst, done)


class HostSink:
    """Device results -> pinned host buffers (side-stream copies) -> a host callback at :meth:`flush`.

    ``submit(device_tensor, write)`` starts the copy into a pooled pinned buffer and remembers ``write``;
    :meth:`flush` waits for the copies (host side only), calls each ``write(host_tensor)`` and recycles the buffers.
    A result larger than the whole pool is copied synchronously (with a one-time warning).
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        #: the pool's cap (None: ``VLLM_ATTNCAP_PINNED_BYTES``, read when the pool is made)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self._warned = False
        self.copier: AsyncCopier | None = None
        self.pool: PinnedBufferPool | None = None
        self.pending: list[tuple[Any, torch.Tensor, Callable[[torch.Tensor], None]]] = []
        #: results submitted / written so far (``flush_through``)
        self.submitted = 0
        self.written = 0

    def submit(self, dev: torch.Tensor, write: Callable[[torch.Tensor], None]) -> None:
        if self.copier is None or self.copier.device != dev.device:
            self.flush()
            self.copier = AsyncCopier(dev.device)
            if self.max_bytes is None:
                self.max_bytes = int(envs.VLLM_ATTNCAP_PINNED_BYTES)
            self.pool = PinnedBufferPool(self.max_bytes, pin=True)
        dev = dev.contiguous()
        try:
            host = self.pool.acquire(dev.shape, dev.dtype)
        except PinnedPoolExhausted:
            self.flush()  # waits for this step's copies so far, frees their blocks
            try:
                host = self.pool.acquire(dev.shape, dev.dtype)
            except PinnedPoolExhausted:
                if not self._warned:
                    self._warned = True
                    logger.warning("vllm_attncap: pinned pool (%d bytes) too small for one result; "
                                   "copying synchronously (raise VLLM_ATTNCAP_PINNED_BYTES)", self.max_bytes)
                write(dev.cpu())
                return
        handle = self.copier.submit(dev, host)
        self.pending.append((handle, host, write))
        self.submitted += 1

    def drain_ready(self) -> None:
        """Write the copies that have completed, oldest first, stopping at the first one still in flight
        (never waits)."""
        while self.pending and self.pending[0][0].ready():
            handle, host, write = self.pending.pop(0)
            handle.wait()  # complete: returns at once, drops the device reference
            self.written += 1
            try:
                write(host)
            finally:
                self.pool.release(host)

    def flush_through(self, mark: int) -> None:
        """Write the results submitted up to number ``mark``, waiting for those only."""
        while self.pending and self.written < mark:
            handle, host, write = self.pending.pop(0)
            handle.wait()
            self.written += 1
            try:
                write(host)
            finally:
                self.pool.release(host)

    def flush(self) -> None:
        """Wait for the submitted copies (host side only) and write them into the request buffers."""
        self.flush_through(self.written + len(self.pending))


class CudaRingOps:
    """The device layer of :class:`~vllm_attncap.engine.cuda.result_ring.ResultRing` on CUDA: pinned slots, copies on a
    side stream ordered after the compute stream, completion events."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(int(nbytes), dtype=torch.uint8, pin_memory=True)

    def copy(self, pairs):
        compute = torch.cuda.current_stream(self.device)
        produced = torch.cuda.Event()
        produced.record(compute)
        self.stream.wait_event(produced)
        with torch.cuda.stream(self.stream):
            for src, dst in pairs:
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def done(self, event) -> bool:
        return bool(event.query())

    def wait(self, event) -> None:
        event.synchronize()

    def gpu_wait(self, event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)


class Uploader:
    """Host-to-device uploads from a ring of pinned staging buffers, never blocking the host in the common case.

    ``upload(pairs)`` packs the host arrays into the next staging buffer, queues one non-blocking copy on the
    current stream and scatters on the device (``dst.copy_`` of views of one device staging tensor). A staging
    buffer is reused only once its previous upload completed (an event; the host waits only if ``n_buffers``
    uploads are still queued, i.e. the host ran that far ahead of the device).

    Args:
        device: the CUDA device (``cpu`` in tests: then plain copies and no events).
        nbytes: the largest upload.
        n_buffers: staging buffers in rotation.
    """

    def __init__(self, device: torch.device, nbytes: int, n_buffers: int = 4) -> None:
        self.device = torch.device(device)
        self.nbytes = int(nbytes)
        pin = self.device.type == "cuda"
        self._host = [torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(n_buffers)]
        self._dev = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        self._events: list[Any] = [None] * n_buffers
        self._next = 0
        self.blocking_waits = 0

    def upload(self, pairs) -> None:
        """``pairs``: ``(numpy array, device tensor of the same bytes)``; one host-to-device copy in all."""
        total = sum(-(-a.nbytes // 16) * 16 for a, _ in pairs)
        if total > self.nbytes:
            raise ValueError(f"Uploader: {total} bytes exceed the staging size {self.nbytes}")
        i = self._next
        self._next = (i + 1) % len(self._host)
        ev = self._events[i]
        if ev is not None and not ev.query():
            self.blocking_waits += 1
            ev.synchronize()
        host = self._host[i]
        hv = host.numpy()
        spans, off = [], 0
        for a, dst in pairs:
            b = a.view(np.uint8).reshape(-1)
            hv[off:off + b.size] = b
            spans.append((off, b.size, dst))
            off += -(-b.size // 16) * 16
        dev = self._dev
        dev[:off].copy_(host[:off], non_blocking=True)
        for o, n, dst in spans:
            dst.view(-1).view(torch.uint8).copy_(dev[o:o + n])
        if self.device.type == "cuda":
            e = torch.cuda.Event()
            e.record(torch.cuda.current_stream(self.device))
            self._events[i] = e
