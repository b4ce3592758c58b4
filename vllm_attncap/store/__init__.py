"""The capture data plane: a private store of one file per captured request, with a typed record.

Modules: :mod:`~vllm_attncap.store.record` (the record format: :class:`CaptureMeta`, :class:`CaptureRecord`),
:mod:`~vllm_attncap.store.namespace` (process liveness, directory safety, namespaces),
:mod:`~vllm_attncap.store.store` (:class:`CaptureStore`, the namespace of the calling process and the functions
over it; its docstring states the rules), :mod:`~vllm_attncap.store.writer` (:class:`CaptureWriter`, worker side)
and :mod:`~vllm_attncap.store.parts` (the per-rank parts of a TP/PP engine's record, and the readers that combine
them: :func:`read_capture` and :func:`list_captures` are the caller's entry for every engine).

The package imports only numpy, the standard library, :mod:`vllm_attncap.spec` and :mod:`vllm_attncap.envs`.
"""

from .namespace import ENV_BASE, ENV_NAMESPACE, ENV_TTL, StoreError, sweep_dead
from .parts import list_captures, read_capture
from .record import (FORMAT_VERSION, STATS_COVERAGE, STATS_ENTROPY, STATUS_ABANDONED, STATUS_ERROR, STATUS_FINISHED,
                     STATUS_OPEN, CaptureMeta, CaptureRecord, key_hash)
from .store import (CaptureClaimed, CaptureStore, current_store, discard_capture, key_exists, list_records,
                    pending_bytes, read_records, set_current_store, store_dir, write_error)
from .writer import CaptureWriter

__all__ = [
    "FORMAT_VERSION",
    "STATUS_OPEN",
    "STATUS_FINISHED",
    "STATUS_ABANDONED",
    "STATUS_ERROR",
    "STATS_COVERAGE",
    "STATS_ENTROPY",
    "ENV_BASE",
    "ENV_NAMESPACE",
    "ENV_TTL",
    "CaptureMeta",
    "CaptureWriter",
    "CaptureRecord",
    "CaptureStore",
    "CaptureClaimed",
    "StoreError",
    "current_store",
    "set_current_store",
    "sweep_dead",
    "key_hash",
    "store_dir",
    "read_capture",
    "list_captures",
    "read_records",
    "list_records",
    "key_exists",
    "discard_capture",
    "write_error",
    "pending_bytes",
]
