"""Namespaces of the store: process liveness, directory safety, the base and the namespaces under it.

See :mod:`vllm_attncap.store.store` for the rules (who creates, joins and removes a namespace).

This module imports only the standard library and :mod:`vllm_attncap.envs`.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from .. import envs

logger = logging.getLogger("vllm_attncap")

ENV_BASE = "VLLM_ATTNCAP_STORE"
ENV_NAMESPACE = "VLLM_ATTNCAP_NAMESPACE"
ENV_JOIN_TOKEN = "VLLM_ATTNCAP_NAMESPACE_TOKEN"
ENV_TTL = "VLLM_ATTNCAP_TTL_S"

_OWNER = "owner.json"
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NS_RE = re.compile(r"^ns-[0-9a-f]{32}$")
#: A namespace without an owner file this old is a failed creation and is removed by the sweep.
_ORPHAN_GRACE_S = 60.0


class StoreError(OSError):
    """The store's directory is unsafe (a symlink, another user's, too open) or cannot be created."""


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
def _check_dir(path: Path, *, what: str) -> None:
    """Refuse ``path`` unless it is a real directory owned by this uid with no group/other access."""
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
        raise StoreError(errno.EPERM, f"vllm_attncap: refusing the capture {what} {path}: mode "
                         f"{stat.S_IMODE(st.st_mode):o} lets other users in (must be 0700)")


def default_base() -> Path:
    """The base directory: ``$VLLM_ATTNCAP_STORE`` or ``/dev/shm/vllm-attncap-<uid>``."""
    env = envs.get(ENV_BASE)
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
    _check_dir(base, what="base")


_PRIVATE_BASE_RE = re.compile(r"^vllm-attncap-%d-private-[A-Za-z0-9_]+$" % os.geteuid())
#: Why this process's base is not the configured one (set by :func:`private_base`), or None.
_BASE_NOTE: str | None = None


def base_note() -> str | None:
    """Why this process stores its captures in a private base of its own instead of the configured one (the
    configured base was unusable: another uid's, a symlink, not a directory), or None when it uses the
    configured base."""
    return _BASE_NOTE


def private_base(wanted: Path, why: BaseException) -> Path:
    """A base of this process's own, used when ``wanted`` cannot be: a fresh directory with an unpredictable name
    (``vllm-attncap-<uid>-private-<random>``, ``mkdtemp``: created exclusively, mode 0700) next to ``wanted``
    (else in the temporary directory). Empty private bases of servers that are gone are removed first, and the
    dead namespaces in them swept."""
    global _BASE_NOTE
    parents = [wanted.parent, Path(tempfile.gettempdir())]
    last: BaseException = why
    for parent in parents:
        _sweep_private_bases(parent)
        try:
            path = Path(tempfile.mkdtemp(prefix=f"vllm-attncap-{os.geteuid()}-private-", dir=parent))
            _check_dir(path, what="base")
        except OSError as e:
            last = e
            continue
        _BASE_NOTE = (f"the configured capture base {wanted} is unusable ({why}); this server uses the private base "
                      f"{path} instead")
        logger.warning("vllm_attncap: %s", _BASE_NOTE)
        return path
    raise StoreError(errno.EPERM, f"vllm_attncap: the capture base {wanted} is unusable ({why}) and no private base "
                     f"could be made ({last})")


def _own_dirs(parent: Path, name_re) -> list[tuple[os.DirEntry, os.stat_result]]:
    """The directories directly under ``parent`` whose name matches ``name_re`` and that this uid owns (links not
    followed), with their stat; an unreadable ``parent`` or entry is skipped."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    found = []
    for entry in entries:
        if not name_re.match(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            found.append((entry, st))
    return found


def _sweep_private_bases(parent: Path) -> None:
    for entry, st in _own_dirs(parent, _PRIVATE_BASE_RE):
        sweep_dead(entry.path)
        if time.time() - st.st_mtime > _ORPHAN_GRACE_S:
            try:
                os.rmdir(entry.path)  # only when empty: a live server's base holds its namespace
            except OSError:
                pass


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


def _unlink(path: Path) -> int:
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0


def sweep_dead(base: Path | str) -> int:
    """Remove the namespaces under ``base`` whose owner process is gone; returns how many."""
    n = 0
    for entry, st in _own_dirs(Path(base), _NS_RE):
        alive = _owner_alive(Path(entry.path))
        if alive or (alive is None and time.time() - st.st_mtime < _ORPHAN_GRACE_S):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        logger.info("vllm_attncap: removed the capture namespace %s of an engine that is gone", entry.path)
        n += 1
    return n


def _may_join(owner: dict) -> bool:
    """Whether this process may use an inherited namespace with this owner file: the owner is this process or an
    ancestor, or the process carries the namespace's join token and the owner is still alive."""
    pid = owner.get("pid")
    if pid in _ancestors():
        return True
    token, expected = envs.get(ENV_JOIN_TOKEN), owner.get("join")
    if not (isinstance(token, str) and isinstance(expected, str) and isinstance(pid, int)):
        return False
    return hmac.compare_digest(token.encode(), expected.encode()) and _alive(pid, owner.get("start"))
