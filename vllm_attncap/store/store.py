"""The capture data plane: a private store of one file per captured request, with a typed record.

vLLM runs the model in a worker process that may differ from the caller's process (EngineCore + workers), and
nothing beyond token ids and logprobs travels back in ``RequestOutput``. Captured rows therefore go into a file in
a shared-memory directory (``/dev/shm`` by default, i.e. RAM), written in place by the worker while the request
runs and read, then deleted, by the caller.

**Namespaces.** Every engine instance gets a namespace of its own: a directory with an unpredictable name
(``ns-<32 hex>``, mode 0700) under the *base* (``$VLLM_ATTNCAP_STORE``, else ``/dev/shm/vllm-attncap-<uid>``,
mode 0700). The first process that uses the store
(the frontend: the offline ``LLM`` process or the API server, where the plugin's ``register()`` runs before the
engine spawns) creates it, writes an owner file (pid and process start time) and exports its path in
``$VLLM_ATTNCAP_NAMESPACE``; EngineCore and worker processes inherit the variable and use the same namespace. A
process ignores an inherited namespace whose owner is not itself or one of its ancestors, unless it also carries
the namespace's join token (``$VLLM_ATTNCAP_NAMESPACE_TOKEN``, 128 random bits kept in the owner file, exported
with the path) and the owner is alive: that is how workers that an engine starts through a daemon rather than as
its children (vLLM's Ray executor, which copies the driver's ``VLLM_*`` variables to its workers on the same
machine) join the engine's namespace. Base and namespace
are checked with ``lstat``: a symlink, a directory owned by another uid or a namespace with group/other access is
refused (:class:`StoreError`); files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600.

**Cleanup.** The owner removes its namespace when it exits (``atexit``); when a namespace is created, namespaces
of the same base whose owner process is gone (pid dead, or reused by a process with another start time) are
removed, whatever their age. Finished captures nobody fetched are removed after ``$VLLM_ATTNCAP_TTL_S`` seconds
(default 3600; 0 keeps them) and, oldest first, when the namespace exceeds ``$VLLM_ATTNCAP_MAX_PENDING_BYTES``
(default 2 GiB).

**Records.** One file per (key, request id): ``<blake2b(key)>-<blake2b(request id)>.cap`` (32 hex digits each,
so any key or request id fits, no key is a prefix of another, and names reveal nothing). The file starts with a
48-byte prefix (magic, :data:`FORMAT_VERSION`, JSON length, data offset, then the mutable status, rows written
and close time at fixed offsets), the :class:`CaptureMeta` JSON (which carries the real key and request id:
lookups compare them exactly), and, page-aligned, the float32 array of :attr:`CaptureMeta.shape` (rows mode
``(L, H, T_max, P + T_max - 1)``; stats mode ``(2, L, H, T_max)``, coverage then entropy; top-k mode
``(2, L, H, rows, k)``, probabilities then key positions), sparse, so untouched
rows cost no memory. A refused capture is a record with status ``"error"`` and no data. The worker writes every
row of a step before that step's output leaves the worker, so when the caller holds a finished ``RequestOutput``
with T tokens, rows ``0..T-1`` are in the file.

**Reading.** :func:`read_records` (through which :func:`~vllm_attncap.store.parts.read_capture` reads) and
:func:`discard_capture` first claim the key (an ``O_EXCL`` marker file), so of several concurrent readers exactly one gets the records; the others get :class:`CaptureClaimed` (a
``LookupError``). The worker keeps its file descriptor, so a record read and deleted while the worker still
writes never reappears.

The package (:mod:`vllm_attncap.store`) holds the record format (:mod:`~vllm_attncap.store.record`), process
liveness, directory safety and namespaces (:mod:`~vllm_attncap.store.namespace`), this module's
:class:`CaptureStore`, the worker's :class:`~vllm_attncap.store.writer.CaptureWriter` and the per-rank parts of a
TP/PP engine (:mod:`~vllm_attncap.store.parts`). Public API (the only way in; nobody else opens the files or indexes
the layout), all importable from :mod:`vllm_attncap.store`:

* worker side: :class:`~vllm_attncap.store.writer.CaptureWriter` (``write_rows``, ``write_stats``, ``close``) and
  :func:`write_error`;
* caller side, for every engine (a TP/PP engine's per-rank parts combined):
  :func:`~vllm_attncap.store.parts.list_captures` (records without data),
  :func:`~vllm_attncap.store.parts.read_capture` (records with data, deleted by default), :func:`key_exists`,
  :func:`discard_capture`;
* the raw records of this namespace, parts not combined: :func:`list_records`, :func:`read_records`;
* the namespace: :func:`current_store` (a :class:`CaptureStore`), :func:`store_dir`, :func:`pending_bytes`.

The store package imports only numpy, the standard library, :mod:`vllm_attncap.spec` and :mod:`vllm_attncap.envs`.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import math
import mmap
import os
import secrets
import shutil
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import envs
from .namespace import (_CLOEXEC, _NO_FOLLOW, _NS_RE, _OWNER, ENV_JOIN_TOKEN, ENV_NAMESPACE, StoreError, _check_dir,
                        _ensure_base, _may_join, _read_owner, _start_time, _unlink, _write_exclusive, default_base,
                        private_base, sweep_dead)
from .record import (_MAGIC, _PAGE, _PREFIX, _STATUS_CODES, _STATUS_NAMES, _SUFFIX, FORMAT_VERSION, STATUS_ERROR,
                     STATUS_OPEN, CaptureMeta, CaptureRecord, _record_name, key_hash)

logger = logging.getLogger("vllm_attncap")

__all__ = [
    "CaptureStore",
    "CaptureClaimed",
    "current_store",
    "set_current_store",
    "store_dir",
    "read_records",
    "list_records",
    "key_exists",
    "discard_capture",
    "write_error",
    "pending_bytes",
]

#: How often (at most) a writer's cap check also runs the TTL pass.
_EXPIRE_EVERY_S = 10.0


class CaptureClaimed(LookupError):
    """Another reader claimed (is fetching or deleting) this key's captures."""


class CaptureStore:
    """One engine instance's private namespace (see the module docstring).

    Create with :meth:`create` (a new namespace, owned by this process) or :meth:`attach` (an existing one);
    :func:`current_store` picks the right one for the calling process.
    """

    def __init__(self, path: Path, *, owner: bool):
        self.path = Path(path)
        self.owner = owner
        self._owner_pid = os.getpid() if owner else None
        self._lock = threading.Lock()
        self._last_expire = -math.inf
        self._private_base = False  # the base is this namespace's own (made because the configured one was unusable)

    def __repr__(self) -> str:
        return f"CaptureStore({str(self.path)!r}, owner={self.owner})"

    # -- lifecycle ------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, base: Path | str | None = None, *, sweep: bool = True) -> "CaptureStore":
        """A fresh namespace under ``base`` (default :func:`default_base`), owned by this process; removes
        dead engines' namespaces of the same base first (``sweep``)."""
        private = False
        if base is not None:
            base = Path(base)
            _ensure_base(base)
        else:
            base = default_base()
            try:
                _ensure_base(base)
            except OSError as e:  # another uid's (anyone can pre-create the predictable default), a symlink, ...
                base, private = private_base(base, e), True
        if sweep:
            sweep_dead(base)
        for _ in range(8):
            ns = base / f"ns-{secrets.token_hex(16)}"
            try:
                os.mkdir(ns, 0o700)
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 128-bit collisions
            raise StoreError(errno.EEXIST, f"vllm_attncap: could not create a namespace in {base}")
        _check_dir(ns, what="namespace")
        owner = {"pid": os.getpid(), "start": _start_time(os.getpid()), "created": time.time(),
                 "format_version": FORMAT_VERSION, "join": secrets.token_hex(16)}
        _write_exclusive(ns / _OWNER, json.dumps(owner).encode())
        store = cls(ns, owner=True)
        store._private_base = private
        atexit.register(store.remove)
        return store

    @classmethod
    def attach(cls, path: Path | str) -> "CaptureStore":
        """An existing namespace (checked: a directory of this uid, mode 0700)."""
        path = Path(path)
        _check_dir(path.parent, what="base")
        _check_dir(path, what="namespace")
        return cls(path, owner=False)

    @property
    def join_token(self) -> str | None:
        """The token that lets a process that is not a descendant of the owner join (None if unreadable)."""
        owner = _read_owner(self.path)
        token = owner.get("join") if owner else None
        return token if isinstance(token, str) else None

    def remove(self) -> None:
        """Delete the namespace and every capture in it (the owner does this at exit)."""
        if self.owner and self._owner_pid != os.getpid():
            return  # a forked child inherited the atexit hook: the namespace is not its to remove
        shutil.rmtree(self.path, ignore_errors=True)
        if self._private_base:
            try:
                os.rmdir(self.path.parent)  # the private base made for this namespace, when nothing else is in it
            except OSError:
                pass

    # -- records --------------------------------------------------------------------------------------------------
    def _record_paths(self, key: str | None) -> list[Path]:
        pattern = f"{key_hash(key)}-*{_SUFFIX}" if key is not None else f"*{_SUFFIX}"
        try:
            return sorted(p for p in self.path.glob(pattern) if not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def record_path(self, key: str, req_id: str) -> Path:
        return self.path / _record_name(key, req_id)

    def _open_record(self, path: Path) -> int | None:
        try:
            fd = os.open(path, os.O_RDONLY | _NO_FOLLOW | _CLOEXEC)
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            return None
        return fd

    @staticmethod
    def _read_meta_fd(fd: int) -> tuple[CaptureMeta, int] | None:
        head = os.pread(fd, _PREFIX.size, 0)
        if len(head) < _PREFIX.size:
            return None
        magic, version, json_len, data_offset, status, rows, closed = _PREFIX.unpack(head)
        if magic != _MAGIC or version != FORMAT_VERSION:
            return None
        try:
            meta = CaptureMeta.from_json(os.pread(fd, json_len, _PREFIX.size).decode())
        except (ValueError, TypeError):
            return None
        meta.status = _STATUS_NAMES.get(status, STATUS_ERROR)
        meta.rows_written, meta.closed = int(rows), (closed or None)
        return meta, int(data_offset)

    def _scan(self, key: str | None, *, expired: bool = False) -> list[tuple[Path, CaptureMeta]]:
        """The records under exactly ``key`` (all when None), in order. Records past the TTL are removed on the
        way and left out (``expired``: kept, for :meth:`expire`), so the TTL holds for every read and listing."""
        out = []
        ttl, now = envs.VLLM_ATTNCAP_TTL_S, time.time()
        for p in self._record_paths(key):
            fd = self._open_record(p)
            if fd is None:
                continue
            try:
                got = self._read_meta_fd(fd)
            finally:
                os.close(fd)
            if got is None or (key is not None and got[0].key != key):
                continue
            if not expired and _past_ttl(got[0], now, ttl):
                if _unlink(p):
                    logger.info("vllm_attncap: removed capture %r (unfetched for more than %s s)", got[0].key, ttl)
                continue
            out.append((p, got[0]))
        out.sort(key=lambda pm: pm[1].order)
        return out

    def find(self, key: str | None = None) -> list[CaptureMeta]:
        """The records stored under exactly ``key`` (every record when ``None``), in order, without data."""
        return [m for _, m in self._scan(key)]

    def exists(self, key: str) -> bool:
        return bool(self._scan(key))

    @contextmanager
    def claim(self, key: str) -> Iterator[None]:
        """Hold ``key`` exclusively (an ``O_EXCL`` marker); :class:`CaptureClaimed` if another reader holds it."""
        marker = self.path / f".claim-{key_hash(key)}"
        try:
            _write_exclusive(marker, str(os.getpid()).encode())
        except FileExistsError:
            raise CaptureClaimed(f"vllm_attncap: the capture under {key!r} is being fetched or deleted by another "
                                 "request (it is delivered once)") from None
        except FileNotFoundError:
            raise LookupError(f"vllm_attncap: the capture store {self.path} is gone") from None
        try:
            yield
        finally:
            try:
                os.unlink(marker)
            except FileNotFoundError:
                pass

    def read(self, key: str, num_tokens: list[int] | int, *, wait_s: float = 5.0, delete: bool = True,
             expected: int | None = None) -> list[CaptureRecord]:
        """See :func:`read_records`."""
        counts = [num_tokens] if isinstance(num_tokens, int) else list(num_tokens)
        want = len(counts) if expected is None else expected
        deadline = time.monotonic() + wait_s
        while True:
            paths = self._record_paths(key)
            if len(paths) >= want or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        with self.claim(key) if delete else _nullcontext():
            found = self._scan(key)
            if not found:
                raise LookupError(
                    f"vllm_attncap: no capture found for key {key!r} (already fetched, never requested, expired or "
                    "evicted; was the request sent with an attncap spec to an engine started with "
                    "attention_backend='attncap'?)"
                )
            out = []
            for i, (path, meta) in enumerate(found):
                arr = None
                fd = self._open_record(path)
                if fd is None:
                    continue  # evicted meanwhile
                try:
                    got = self._read_meta_fd(fd)
                    if got is None:
                        continue
                    meta, offset = got
                    if meta.status != STATUS_ERROR and meta.nbytes:
                        size = offset + meta.nbytes
                        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
                            view = np.ndarray(meta.shape, dtype=np.float32, buffer=mm, offset=offset)
                            arr = meta.trim(view, counts[i] if i < len(counts) else counts[-1])
                            del view
                finally:
                    os.close(fd)
                if delete:
                    _unlink(path)
                out.append(CaptureRecord(meta, arr))
            if not out:
                raise LookupError(f"vllm_attncap: the capture under {key!r} was removed while being read")
            return out

    def discard(self, key: str) -> int:
        """Delete every record stored under exactly ``key``; returns how many were removed."""
        with self.claim(key):
            n = 0
            for path, _ in self._scan(key):
                n += _unlink(path)
            return n

    def pending_bytes(self) -> int:
        """Bytes of the records in this namespace (backed pages, sparse files)."""
        total = 0
        for p in self._record_paths(None):
            try:
                total += p.stat().st_blocks * 512
            except FileNotFoundError:
                pass
        return total

    def expire(self, ttl_s: float | None = None) -> int:
        """Remove closed records older than ``ttl_s`` (default ``$VLLM_ATTNCAP_TTL_S``); returns how many."""
        ttl = envs.VLLM_ATTNCAP_TTL_S if ttl_s is None else float(ttl_s)
        if ttl <= 0:
            return 0
        now, n = time.time(), 0
        for path, meta in self._scan(None, expired=True):
            if _past_ttl(meta, now, ttl):
                n += _unlink(path)
                logger.info("vllm_attncap: removed capture %r (unfetched for more than %s s)", meta.key, ttl)
        return n

    def enforce_cap(self, incoming: int, cap: int | None = None) -> None:
        """Delete the oldest closed records when the namespace would exceed ``cap`` with ``incoming`` more."""
        cap = envs.VLLM_ATTNCAP_MAX_PENDING_BYTES if cap is None else cap
        now = time.monotonic()
        if now - self._last_expire > _EXPIRE_EVERY_S:  # the TTL pass reads every record: not on every request
            self._last_expire = now
            self.expire()
        total = self.pending_bytes()
        if total + incoming <= cap:
            return
        closed = [(m.closed or m.created, p, m) for p, m in self._scan(None) if m.status != STATUS_OPEN]
        for _, p, m in sorted(closed, key=lambda x: x[0]):
            try:
                size = p.stat().st_blocks * 512
            except FileNotFoundError:
                continue
            if _unlink(p):
                logger.warning("vllm_attncap: deleted uncollected capture %r (pending captures exceeded %d bytes)",
                               m.key, cap)
                total -= size
            if total + incoming <= cap:
                return

    def _create_file(self, key: str, req_id: str, meta: CaptureMeta, data_bytes: int) -> tuple[int, Path]:
        """Write a record under a temporary name and link it in place; returns (fd, final path)."""
        body = meta.to_json().encode()
        offset = (-(-(_PREFIX.size + len(body)) // _PAGE) * _PAGE) if data_bytes else 0
        tmp = self.path / f".tmp-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NO_FOLLOW | _CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, offset + data_bytes if data_bytes else _PREFIX.size + len(body))
            os.pwrite(fd, _PREFIX.pack(_MAGIC, FORMAT_VERSION, len(body), offset, _STATUS_CODES[meta.status],
                                       meta.rows_written, meta.closed or 0.0) + body, 0)
            final = self.record_path(key, req_id)
            os.link(tmp, final)  # fails if a record of this (key, request id) exists
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        _unlink(tmp)
        return fd, final

    def write_error(self, key: str, req_id: str, message: str) -> None:
        """Record that a request's capture was refused (the request itself still runs)."""
        meta = CaptureMeta(key, req_id, status=STATUS_ERROR, error=message, created=time.time(), closed=time.time())
        try:
            fd, _ = self._create_file(key, req_id, meta, 0)
        except FileExistsError:  # replace an open record of the same request
            _unlink(self.record_path(key, req_id))
            fd, _ = self._create_file(key, req_id, meta, 0)
        os.close(fd)


def _past_ttl(meta: CaptureMeta, now: float, ttl: float) -> bool:
    """Whether a closed record is older than the TTL (``ttl`` <= 0: never)."""
    since = meta.closed or meta.created
    return ttl > 0 and meta.status != STATUS_OPEN and bool(since) and now - since > ttl


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_CURRENT: CaptureStore | None = None
_CURRENT_LOCK = threading.Lock()


def _export(store: CaptureStore) -> None:
    envs.export(ENV_NAMESPACE, str(store.path))
    token = store.join_token
    if token:
        envs.export(ENV_JOIN_TOKEN, token)
    else:
        envs.unset(ENV_JOIN_TOKEN)


def current_store() -> CaptureStore:
    """The calling process's namespace: the inherited ``$VLLM_ATTNCAP_NAMESPACE`` when this process or an ancestor
    owns it (or the process carries its join token, ``$VLLM_ATTNCAP_NAMESPACE_TOKEN``, and the owner is alive), else
    a new one (exported in both variables for the processes it starts)."""
    global _CURRENT
    with _CURRENT_LOCK:
        if _CURRENT is not None and _CURRENT.path.is_dir():
            env = envs.get(ENV_NAMESPACE)
            if env is None or Path(env) == _CURRENT.path:
                _export(_CURRENT)
                return _CURRENT
        env = envs.get(ENV_NAMESPACE)
        if env and _NS_RE.match(Path(env).name) and Path(env).is_dir():
            owner = _read_owner(Path(env))
            if owner is not None and _may_join(owner):
                store = CaptureStore.attach(env)
                store.owner = owner.get("pid") == os.getpid()
                _CURRENT = store
                return store
        _CURRENT = CaptureStore.create()
        _export(_CURRENT)
        return _CURRENT


def set_current_store(store: CaptureStore | None) -> None:
    """Make ``store`` this process's namespace (exported for the processes it starts); ``None`` forgets it, so
    the next use creates a fresh one. For tests and embedders that manage namespaces themselves."""
    global _CURRENT
    with _CURRENT_LOCK:
        _CURRENT = store
        if store is None:
            envs.unset(ENV_NAMESPACE)
            envs.unset(ENV_JOIN_TOKEN)
        else:
            _export(store)


def store_dir() -> Path:
    """The calling process's namespace directory (:func:`current_store`)."""
    return current_store().path


def write_error(key: str, req_id: str, message: str) -> None:
    """Record that a request's capture was refused (the request itself still runs)."""
    current_store().write_error(key, req_id, message)


def list_records(key: str | None = None) -> list[CaptureMeta]:
    """The records stored under exactly ``key`` (every record when ``None``), without data, in order
    (prompt index, then completion index); a TP/PP engine's per-rank parts as they are (the caller's entry is
    :func:`vllm_attncap.store.list_captures`, which combines them)."""
    return current_store().find(key)


def key_exists(key: str) -> bool:
    """Whether anything is stored under exactly ``key``."""
    return current_store().exists(key)


def pending_bytes() -> int:
    """Backed bytes of the records in the calling process's namespace."""
    return current_store().pending_bytes()


def read_records(key: str, num_tokens: list[int] | int, *, wait_s: float = 5.0, delete: bool = True) -> list[CaptureRecord]:
    """Read (and by default delete) the records stored under ``key``, a TP/PP engine's per-rank parts as they are
    (the caller's entry is :func:`vllm_attncap.store.read_capture`, which combines them).

    Args:
        key: the correlation key of the request (``spec.key``).
        num_tokens: generated tokens per completion (one int per completion for ``n > 1``); the arrays are
            trimmed to these lengths.
        wait_s: how long to wait for as many records as ``num_tokens`` has entries.
        delete: remove the records after reading (frees the memory). Deleting reads claim the key first: of
            several concurrent readers one gets the records.

    Returns:
        One record per completion, ordered like ``RequestOutput.outputs``.

    Raises:
        LookupError: nothing is stored under ``key``; :class:`CaptureClaimed` when another reader holds it.
    """
    return current_store().read(key, num_tokens, wait_s=wait_s, delete=delete)


def discard_capture(key: str) -> int:
    """Delete every record stored under exactly ``key``; returns how many were removed (0 when another reader
    holds the key)."""
    try:
        return current_store().discard(key)
    except LookupError:
        return 0
