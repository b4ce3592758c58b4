"""The capture data plane: a private store of one file per captured request, with a typed record.

vLLM runs the model in a worker process that may differ from the caller's process (EngineCore + workers), and
nothing beyond token ids and logprobs travels back in ``RequestOutput``. Captured rows therefore go into a file in
a shared-memory directory (``/dev/shm`` by default, i.e. RAM), written in place by the worker while the request
runs and read, then deleted, by the caller.

**Namespaces.** Every engine instance gets a namespace of its own: a directory with an unpredictable name
(``ns-<32 hex>``, mode 0700) under the *base* (``$VLLM_ATTNCAP_STORE``, else ``/dev/shm/vllm-attncap-<uid>``,
mode 0700; ``$VLLM_ATTNCAP_DIR`` is accepted as an older name for the base). The first process that uses the store
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

**Reading.** :func:`read_capture` (and :func:`discard_capture`) first claim the key (an ``O_EXCL`` marker file),
so of several concurrent readers exactly one gets the records; the others get :class:`CaptureClaimed` (a
``LookupError``). The worker keeps its file descriptor, so a record read and deleted while the worker still
writes never reappears.

Public API (the only way in; nobody else opens the files or indexes the layout):

* worker side: :class:`CaptureWriter` (:meth:`~CaptureWriter.write_rows`, :meth:`~CaptureWriter.write_stats`,
  :meth:`~CaptureWriter.close`) and :func:`write_error`;
* caller side: :func:`find_captures` / :func:`list_captures` (records without data), :func:`key_exists`,
  :func:`read_capture` (records with data, deleted by default), :func:`discard_capture`;
* the namespace: :func:`current_store` (a :class:`CaptureStore`), :func:`store_dir`, :func:`pending_bytes`.

This module imports only numpy, the standard library and :mod:`vllm_attncap.spec`.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import hashlib
import hmac
import json
import logging
import math
import mmap
import os
import re
import secrets
import shutil
import stat
import struct
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .spec import capture_shape

logger = logging.getLogger("vllm_attncap")

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
    "find_captures",
    "list_captures",
    "key_exists",
    "discard_capture",
    "write_error",
    "pending_bytes",
    "MAX_PENDING_BYTES",
    "TTL_S",
]

#: Version of the record layout (the prefix and the JSON fields); a reader ignores records of another version.
FORMAT_VERSION = 2
MAX_PENDING_BYTES = int(os.environ.get("VLLM_ATTNCAP_MAX_PENDING_BYTES", str(2 * 1024**3)))
#: Seconds after which a finished capture nobody fetched is removed (0: never).
TTL_S = float(os.environ.get("VLLM_ATTNCAP_TTL_S", "3600"))
ENV_BASE = "VLLM_ATTNCAP_STORE"
ENV_BASE_OLD = "VLLM_ATTNCAP_DIR"
ENV_NAMESPACE = "VLLM_ATTNCAP_NAMESPACE"
ENV_JOIN_TOKEN = "VLLM_ATTNCAP_NAMESPACE_TOKEN"
ENV_TTL = "VLLM_ATTNCAP_TTL_S"

STATUS_OPEN = "open"
STATUS_FINISHED = "finished"
STATUS_ABANDONED = "abandoned"
STATUS_ERROR = "error"
_STATUS_CODES = {STATUS_OPEN: 0, STATUS_FINISHED: 1, STATUS_ABANDONED: 2, STATUS_ERROR: 3}
_STATUS_NAMES = {v: k for k, v in _STATUS_CODES.items()}
#: Stats-mode layout ``(2, L, H, T)``: index of the per-row coverage and history entropy.
STATS_COVERAGE = 0
STATS_ENTROPY = 1

_MAGIC = b"ATTNCAP\0"
# magic, version, json_len, data_offset, status, 7 pad bytes, rows_written, closed
_PREFIX = struct.Struct("<8sIIQB7xQd")
_STATUS_OFFSET = 24
_TAIL = struct.Struct("<Qd")  # rows_written, closed at offset 32
_TAIL_OFFSET = 32
_PAGE = 4096
_SUFFIX = ".cap"
_OWNER = "owner.json"
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NS_RE = re.compile(r"^ns-[0-9a-f]{32}$")
#: A namespace without an owner file this old is a failed creation and is removed by the sweep.
_ORPHAN_GRACE_S = 60.0
#: How often (at most) a writer's cap check also runs the TTL pass.
_EXPIRE_EVERY_S = 10.0


class StoreError(OSError):
    """The store's directory is unsafe (a symlink, another user's, too open) or cannot be created."""


class CaptureClaimed(LookupError):
    """Another reader claimed (is fetching or deleting) this key's captures."""


def _hash(text: str, person: bytes) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, person=person).hexdigest()


def key_hash(key: str) -> str:
    """The fixed-length name part of a key (32 hex digits)."""
    return _hash(key, b"attncap-key")


def _record_name(key: str, req_id: str) -> str:
    return f"{key_hash(key)}-{_hash(req_id, b'attncap-req')}{_SUFFIX}"


@dataclass
class CaptureMeta:
    """The record of one request's capture.

    Attributes:
        key: the caller's correlation key; req_id: vLLM's internal request id.
        status: ``"open"`` while the worker writes, then ``"finished"``, ``"abandoned"`` (engine gone) or
            ``"error"`` (capture refused; ``error`` says why, there is no data).
        mode, reduce, layers, heads, prompt_len, max_tokens, history_len, sink, salient, spec: the resolved spec.
        rows_written: rows ``0..rows_written-1`` hold data (set when the writer closes).
        created, closed: wall-clock times (seconds since the epoch).
        part: set on the part of one rank of a multi-rank engine (:mod:`vllm_attncap.parts`), else None.
        topk, prompt_start: mode ``"topk"``: keys per row, and the position of the first row's token (rows
            ``0..P-prompt_start-1`` are prompt tokens, then the reply's).
    """

    key: str
    req_id: str
    status: str = STATUS_OPEN
    error: str | None = None
    mode: str = "rows"
    reduce: str = "none"
    layers: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    prompt_len: int = 0
    max_tokens: int = 0
    history_len: int = 0
    sink: int = 0
    salient: list[int] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    rows_written: int = 0
    created: float = 0.0
    closed: float | None = None
    format_version: int = FORMAT_VERSION
    part: dict[str, Any] | None = None
    topk: int = 0
    prompt_start: int = 0

    # -- layout -------------------------------------------------------------------------------------------------
    @property
    def out_layers(self) -> int:
        return 1 if self.reduce == "layer_head_mean" else len(self.layers)

    @property
    def out_heads(self) -> int:
        return 1 if self.reduce in ("head_mean", "layer_head_mean") else len(self.heads)

    @property
    def prompt_rows(self) -> int:
        """Top-k mode: rows of prompt tokens before the reply's (``P - prompt_start``)."""
        return self.prompt_len - self.prompt_start if self.mode == "topk" and self.prompt_start else 0

    @property
    def shape(self) -> tuple[int, ...]:
        """The data's shape: rows ``(L, H, T_max, P+T_max-1)``, stats ``(2, L, H, T_max)``, top-k
        ``(2, L, H, P-prompt_start+T_max, k)`` (probabilities, then positions as float32); () for errors."""
        if self.status == STATUS_ERROR:
            return ()
        return capture_shape(self.mode, self.out_layers, self.out_heads, self.prompt_len, self.max_tokens,
                             topk=self.topk, prompt_rows=self.prompt_rows)

    @property
    def nbytes(self) -> int:
        """Nominal bytes of the data (float32)."""
        return 4 * math.prod(self.shape) if self.shape else 0

    @property
    def order(self) -> tuple[int, int, str]:
        """Sort key of the records under one key: (prompt index, completion index, request id).

        vLLM's internal ids are ``[<completion>_]<external id>-<random>``; a completions request's external id
        ends in ``-<prompt index>``.
        """
        rid = self.req_id
        m = re.match(r"^(\d+)_(.*)$", rid)
        child, rest = (int(m.group(1)), m.group(2)) if m else (0, rid)
        p = re.search(r"-(\d+)-[^-]+$", rest)
        return (int(p.group(1)) if p else 0, child, rid)

    def trim(self, array: np.ndarray, num_tokens: int) -> np.ndarray:
        """An owned copy of ``array`` (the file's) cut to ``num_tokens`` generated tokens."""
        t = max(0, min(int(num_tokens), self.max_tokens))
        if self.mode == "topk":
            return np.array(array[:, :, :, : self.prompt_rows + t])
        if self.mode == "stats":
            return np.array(array[..., :t])
        return np.array(array[:, :, :t, : self.prompt_len + t - 1])

    # -- (de)serialisation --------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CaptureMeta":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class CaptureRecord:
    """Caller side: what a request's capture held."""

    meta: CaptureMeta
    array: np.ndarray | None  # trimmed to the generated length, owned (not a memmap); None for errors

    @property
    def key(self) -> str:
        return self.meta.key

    @property
    def req_id(self) -> str:
        return self.meta.req_id

    @property
    def error(self) -> str | None:
        return self.meta.error

    @property
    def num_tokens(self) -> int:
        """Generated tokens in ``array``."""
        if self.array is None:
            return 0
        if self.meta.mode == "topk":
            return int(self.array.shape[3]) - self.meta.prompt_rows
        return int(self.array.shape[-1] if self.meta.mode == "stats" else self.array.shape[2])

    @property
    def topk_positions(self) -> np.ndarray:
        """Top-k mode: ``(L, H, R, k)`` int32 key positions (-1 pads rows with fewer than k keys)."""
        return self.array[1].astype(np.int32)

    @property
    def topk_probs(self) -> np.ndarray:
        """Top-k mode: ``(L, H, R, k)`` float32 probabilities of those keys (0 for padding)."""
        return np.ascontiguousarray(self.array[0])

    @property
    def coverage(self) -> np.ndarray:
        """Stats mode: ``(L, H, T)`` per-row coverage."""
        return self.array[STATS_COVERAGE]

    @property
    def entropy(self) -> np.ndarray:
        """Stats mode: ``(L, H, T)`` per-row history entropy."""
        return self.array[STATS_ENTROPY]


# -- processes ----------------------------------------------------------------------------------------------------
def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # pid (comm) state ppid ... ; comm may contain spaces and parentheses
    return text[text.rfind(")") + 2:].split()


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start is None:
        return True
    now = _start_time(pid)
    return now is None or now == start


def _ancestors() -> set[int]:
    """This process and its ancestors (Linux; just this process elsewhere)."""
    out, pid = {os.getpid()}, os.getppid()
    if not os.path.isdir("/proc"):
        return out | {pid}
    for _ in range(64):
        if pid <= 1 or pid in out:
            break
        out.add(pid)
        fields = _proc_stat(pid)
        if not fields:
            break
        pid = int(fields[1])
    return out


# -- directories ----------------------------------------------------------------------------------------------------
def _check_dir(path: Path, *, what: str, tighten: bool) -> None:
    """Refuse ``path`` unless it is a real directory owned by this uid with no group/other access.

    ``tighten``: a directory of ours that is too open is made 0700 (the base of older versions was 0755).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise StoreError(errno.ENOENT, f"vllm_attncap: the capture {what} {path} does not exist") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StoreError(errno.EPERM, f"vllm_attncap: refusing the capture {what} {path}: not a directory (a symlink?)")
    if st.st_uid != os.geteuid():
        raise StoreError(
            errno.EPERM,
            f"vllm_attncap: refusing the capture {what} {path}: owned by uid {st.st_uid}, not {os.geteuid()}; "
            f"remove it or point {ENV_BASE} at a directory of your own",
        )
    if st.st_mode & 0o077:
        if not tighten:
            raise StoreError(errno.EPERM, f"vllm_attncap: refusing the capture {what} {path}: mode "
                             f"{stat.S_IMODE(st.st_mode):o} lets other users in (must be 0700)")
        os.chmod(path, 0o700)  # checked above: a directory of ours, not a symlink


def default_base() -> Path:
    """The base directory: ``$VLLM_ATTNCAP_STORE``, ``$VLLM_ATTNCAP_DIR`` or ``/dev/shm/vllm-attncap-<uid>``."""
    env = os.environ.get(ENV_BASE) or os.environ.get(ENV_BASE_OLD)
    if env:
        return Path(env)
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return root / f"vllm-attncap-{os.getuid()}"


def _ensure_base(base: Path) -> None:
    if not base.parent.exists():
        base.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    _check_dir(base, what="base", tighten=True)


def _read_owner(ns: Path) -> dict | None:
    try:
        fd = os.open(ns / _OWNER, os.O_RDONLY | _NO_FOLLOW | _CLOEXEC)
    except OSError:
        return None
    try:
        return json.loads(os.read(fd, 4096).decode())
    except (ValueError, OSError):
        return None
    finally:
        os.close(fd)


def _owner_alive(ns: Path) -> bool | None:
    """True/False for a namespace whose owner file is readable, None when it has none."""
    owner = _read_owner(ns)
    if owner is None or not isinstance(owner.get("pid"), int):
        return None
    return _alive(owner["pid"], owner.get("start"))


def _write_exclusive(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW | _CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


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

    def __repr__(self) -> str:
        return f"CaptureStore({str(self.path)!r}, owner={self.owner})"

    # -- lifecycle ------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, base: Path | str | None = None, *, sweep: bool = True) -> "CaptureStore":
        """A fresh namespace under ``base`` (default :func:`default_base`), owned by this process; removes
        dead engines' namespaces of the same base first (``sweep``)."""
        base = Path(base) if base is not None else default_base()
        _ensure_base(base)
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
        _check_dir(ns, what="namespace", tighten=False)
        owner = {"pid": os.getpid(), "start": _start_time(os.getpid()), "created": time.time(),
                 "format_version": FORMAT_VERSION, "join": secrets.token_hex(16)}
        _write_exclusive(ns / _OWNER, json.dumps(owner).encode())
        store = cls(ns, owner=True)
        atexit.register(store.remove)
        return store

    @classmethod
    def attach(cls, path: Path | str) -> "CaptureStore":
        """An existing namespace (checked: a directory of this uid, mode 0700)."""
        path = Path(path)
        _check_dir(path.parent, what="base", tighten=False)
        _check_dir(path, what="namespace", tighten=False)
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

    def _scan(self, key: str | None) -> list[tuple[Path, CaptureMeta]]:
        out = []
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
        """See :func:`read_capture`."""
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
        ttl = TTL_S if ttl_s is None else float(ttl_s)
        if ttl <= 0:
            return 0
        now, n = time.time(), 0
        for path, meta in self._scan(None):
            since = meta.closed or meta.created
            if meta.status != STATUS_OPEN and since and now - since > ttl:
                n += _unlink(path)
                logger.info("vllm_attncap: removed capture %r (unfetched for more than %s s)", meta.key, ttl)
        return n

    def enforce_cap(self, incoming: int, cap: int | None = None) -> None:
        """Delete the oldest closed records when the namespace would exceed ``cap`` with ``incoming`` more."""
        cap = MAX_PENDING_BYTES if cap is None else cap
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


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _unlink(path: Path) -> int:
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0


def sweep_dead(base: Path | str) -> int:
    """Remove the namespaces under ``base`` whose owner process is gone; returns how many."""
    base, n = Path(base), 0
    try:
        entries = list(os.scandir(base))
    except OSError:
        return 0
    for entry in entries:
        if not _NS_RE.match(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue
        alive = _owner_alive(Path(entry.path))
        if alive or (alive is None and time.time() - st.st_mtime < _ORPHAN_GRACE_S):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        logger.info("vllm_attncap: removed the capture namespace %s of an engine that is gone", entry.path)
        n += 1
    return n


_CURRENT: CaptureStore | None = None
_CURRENT_LOCK = threading.Lock()


def _export(store: CaptureStore) -> None:
    os.environ[ENV_NAMESPACE] = str(store.path)
    token = store.join_token
    if token:
        os.environ[ENV_JOIN_TOKEN] = token
    else:
        os.environ.pop(ENV_JOIN_TOKEN, None)


def _may_join(owner: dict) -> bool:
    """Whether this process may use an inherited namespace with this owner file: the owner is this process or an
    ancestor, or the process carries the namespace's join token and the owner is still alive."""
    pid = owner.get("pid")
    if pid in _ancestors():
        return True
    token, expected = os.environ.get(ENV_JOIN_TOKEN), owner.get("join")
    if not (isinstance(token, str) and isinstance(expected, str) and isinstance(pid, int)):
        return False
    return hmac.compare_digest(token.encode(), expected.encode()) and _alive(pid, owner.get("start"))


def current_store() -> CaptureStore:
    """The calling process's namespace: the inherited ``$VLLM_ATTNCAP_NAMESPACE`` when this process or an ancestor
    owns it (or the process carries its join token, ``$VLLM_ATTNCAP_NAMESPACE_TOKEN``, and the owner is alive), else
    a new one (exported in both variables for the processes it starts)."""
    global _CURRENT
    with _CURRENT_LOCK:
        if _CURRENT is not None and _CURRENT.path.is_dir():
            env = os.environ.get(ENV_NAMESPACE)
            if env is None or Path(env) == _CURRENT.path:
                _export(_CURRENT)
                return _CURRENT
        env = os.environ.get(ENV_NAMESPACE)
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
            os.environ.pop(ENV_NAMESPACE, None)
            os.environ.pop(ENV_JOIN_TOKEN, None)
        else:
            _export(store)


def store_dir() -> Path:
    """The calling process's namespace directory (:func:`current_store`)."""
    return current_store().path


def write_error(key: str, req_id: str, message: str) -> None:
    """Record that a request's capture was refused (the request itself still runs)."""
    current_store().write_error(key, req_id, message)


def find_captures(key: str | None = None) -> list[CaptureMeta]:
    """The records stored under exactly ``key`` (every record when ``None``), without data, in order
    (prompt index, then completion index)."""
    return current_store().find(key)


list_captures = find_captures


def key_exists(key: str) -> bool:
    """Whether anything is stored under exactly ``key``."""
    return current_store().exists(key)


def pending_bytes() -> int:
    """Backed bytes of the records in the calling process's namespace."""
    return current_store().pending_bytes()


def read_capture(key: str, num_tokens: list[int] | int, *, wait_s: float = 5.0, delete: bool = True) -> list[CaptureRecord]:
    """Read (and by default delete) the capture(s) stored under ``key``.

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
