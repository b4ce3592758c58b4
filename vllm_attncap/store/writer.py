"""Worker side of the store: :class:`CaptureWriter`, the buffer of one captured request mapped from its record."""

from __future__ import annotations

import mmap
import os
import time

import numpy as np

from .namespace import _unlink
from .record import (STATS_COVERAGE, STATS_ENTROPY, STATUS_FINISHED, STATUS_OPEN, _PREFIX, _STATUS_CODES,
                     _STATUS_OFFSET, _TAIL, _TAIL_OFFSET, CaptureMeta)
from .store import CaptureStore, current_store


class CaptureWriter:
    """Worker side: the buffer of one captured request.

    ``array`` is a writable float32 view of ``meta.shape`` mapped from the record file (None once closed).
    Backends write through :meth:`write_rows` and :meth:`write_stats`, which own the layout.
    """

    def __init__(self, meta: CaptureMeta, store: CaptureStore | None = None):
        self.meta = meta
        self.key, self.req_id = meta.key, meta.req_id
        self.store = store or current_store()
        self.dir = self.store.path
        meta.status, meta.created, meta.closed, meta.rows_written = STATUS_OPEN, time.time(), None, 0
        self.nbytes = meta.nbytes
        self.store.enforce_cap(self.nbytes)
        self._fd, self.path = self.store._create_file(meta.key, meta.req_id, meta, self.nbytes)
        offset = os.pread(self._fd, _PREFIX.size, 0)
        offset = _PREFIX.unpack(offset)[3]
        try:
            self._mmap = mmap.mmap(self._fd, offset + self.nbytes)
        except BaseException:
            os.close(self._fd)
            _unlink(self.path)
            raise
        # sparse: pages are only backed once written
        self.array: np.ndarray | None = np.ndarray(meta.shape, dtype=np.float32, buffer=self._mmap, offset=offset)
        self.rows_written = 0

    # -- layout-aware writes ------------------------------------------------------------------------------------
    def write_rows(self, slot: int, r0: int, r1: int, ctx_len: int, rows: np.ndarray, *, accumulate: bool = False) -> None:
        """Rows mode: ``rows`` ``(H_out, r1-r0, ctx_len)`` into layer slot ``slot``, generated rows ``r0..r1-1``.

        ``accumulate`` adds instead of assigning (the layer mean's later layers).
        """
        if self.array is None:
            return
        view = self.array[slot, :, r0:r1, :ctx_len]
        if accumulate:
            view += rows
        else:
            view[...] = rows

    def write_topk(self, slot: int, r0: int, r1: int, positions: np.ndarray, probs: np.ndarray) -> None:
        """Top-k mode: ``positions`` / ``probs`` ``(H_out, r1-r0, k)`` into layer slot ``slot``, rows ``r0..r1-1``."""
        if self.array is None:
            return
        self.array[0, slot, :, r0:r1] = probs
        self.array[1, slot, :, r0:r1] = positions

    def write_stats(self, slot: int, r0: int, r1: int, coverage: np.ndarray, entropy: np.ndarray) -> None:
        """Stats mode: per-row ``coverage`` / ``entropy`` ``(H_out, r1-r0)`` into layer slot ``slot``."""
        if self.array is None:
            return
        self.array[STATS_COVERAGE, slot, :, r0:r1] = coverage
        self.array[STATS_ENTROPY, slot, :, r0:r1] = entropy

    def note_rows(self, upto: int) -> None:
        self.rows_written = max(self.rows_written, upto)

    def close(self, status: str = STATUS_FINISHED) -> None:
        """Unmap and record the final status; the record stays for the reader (a record the reader already took
        is not recreated: the update goes to the deleted file)."""
        if self.array is None:
            return
        self.array = None
        try:
            self._mmap.close()
        except BufferError:  # a view is still exported somewhere; the GC unmaps it
            pass
        try:
            os.pwrite(self._fd, _TAIL.pack(self.rows_written, time.time()), _TAIL_OFFSET)
            os.pwrite(self._fd, bytes([_STATUS_CODES.get(status, 1)]), _STATUS_OFFSET)
        finally:
            os.close(self._fd)
        self.meta.status, self.meta.rows_written = status, self.rows_written
