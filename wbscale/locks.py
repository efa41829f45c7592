"""Exclusive lock files: one writer per folder, on a local disk or a shared filesystem.

A lock is a small JSON file (``pid``, ``host``, ``started``, ``purpose``, ``heartbeat``,
and on Linux ``pid_start`` to tell a reused pid apart). It appears atomically, complete
and already locked: the holder writes a private temp file, takes an ``flock`` on it and
hard-links it to the lock's name (``link`` fails if the name exists, also over NFS); where
hard links are not supported it falls back to ``O_CREAT | O_EXCL``. While held, a daemon
thread rewrites the heartbeat in place every ``heartbeat_every`` seconds; the file is
removed on release (the context manager's exit, or interpreter exit).

Another process asking for the lock while it is held gets a :class:`LockHeld`
(a :class:`~wbscale.errors.UserError`, exit status 2) naming the holder and what to do.
A lock whose holder is gone is *stale* and is taken over with a one-line message:

* no process holds the file's ``flock`` (a live holder always does) **and**
* on the holder's host, its pid is not running (or is a zombie, or a newer process
  reusing the pid); on another host, where pids cannot be checked (SLURM nodes on a
  shared filesystem), its heartbeat is older than ``stale_after`` seconds.

A forked child (e.g. a multiprocessing worker) closes its copy of every held lock's
file descriptor, so it never keeps a lock alive after its parent is gone.

The heartbeat age is measured with this machine's clock against the later of the
recorded heartbeat and the file's mtime, so a few seconds of clock skew between nodes do
not matter; keep ``stale_after`` well above ``heartbeat_every``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from wbscale.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; liveness falls back to pid / heartbeat
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_HEARTBEAT_EVERY_S",
    "DEFAULT_STALE_AFTER_S",
    "Holder",
    "Lock",
    "LockHeld",
    "RUN_LOCK_FILE",
    "acquire",
    "pid_alive",
    "read_holder",
]

RUN_LOCK_FILE = ".fit.lock"  # in a run folder: its one ``wbscale fit`` (wbscale.train.fit.lock_run)
DEFAULT_HEARTBEAT_EVERY_S = 30.0
DEFAULT_STALE_AFTER_S = 300.0
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # fixed width: the in-place heartbeat keeps the length


def _now_iso() -> str:
    return time.strftime(_TIME_FORMAT, time.gmtime())


def _parse_iso(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s // 86400} days"


def _pid_start(pid: int) -> int | None:
    """Linux: the start time of ``pid`` in clock ticks since boot (None elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    try:
        return int(fields[19])  # field 22 of stat(5)
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs on this host (and, given ``start``, is the process that started then).

    A zombie is not alive; where /proc is missing (macOS) ``kill(pid, 0)`` is all it knows.
    """
    if pid <= 0:
        return False
    if os.name != "posix":
        return True  # no safe probe (os.kill would kill it): assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): kill(0) is all we know
    if stat[stat.rindex(")") + 2:].startswith(("Z", "X")):
        return False  # a zombie holds no lock
    now_start = _pid_start(pid)
    return start is None or now_start is None or now_start == start


@dataclass(frozen=True)
class Holder:
    """What a lock file says about its holder (fields None when unreadable)."""

    pid: int | None
    host: str | None
    started: str | None
    purpose: str | None
    heartbeat: str | None
    pid_start: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Holder:
        def get(key: str, kind: type) -> Any:
            value = data.get(key)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        return cls(
            get("pid", int), get("host", str), get("started", str), get("purpose", str),
            get("heartbeat", str), get("pid_start", int),
        )

    def describe(self) -> str:
        """``"pid 123 on node7 (wbscale fit), since 2024-05-01T12:00:03Z (5 min ago)"``."""
        if self.pid is None:
            return "an unknown process (the lock file is unreadable)"
        text = f"pid {self.pid} on {self.host or '?'}"
        if self.purpose:
            text += f" ({self.purpose})"
        started = _parse_iso(self.started)
        if started is not None:
            text += f", since {self.started} ({_ago(time.time() - started)} ago)"
        return text


class LockHeld(UserError):
    """The lock is held by a live process; ``holder`` says which (may be all None)."""

    def __init__(self, message: str, path: Path, holder: Holder) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder


def read_holder(path: str | Path) -> Holder | None:
    """The holder recorded in the lock file at ``path``; None if missing or unreadable."""
    for attempt in range(5):
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict):
            return Holder.from_json(data)
        if attempt < 4:
            time.sleep(0.05)  # caught mid-write (O_EXCL fallback): look again
    return None


# Locks held by this process: a forked child closes their descriptors (see module doc).
_held: set[Lock] = set()


def _close_in_child() -> None:
    for lock in list(_held):
        lock._forget_in_child()
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class Lock:
    """A held lock; release with :meth:`release` or by leaving its ``with`` block."""

    def __init__(self, path: Path, purpose: str, fd: int, heartbeat_every: float) -> None:
        self.path = path
        self.purpose = purpose
        self._fd: int | None = fd
        self._owner = os.getpid()
        self._ino = os.fstat(fd).st_ino
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if heartbeat_every > 0:
            self._thread = threading.Thread(
                target=self._beat, args=(heartbeat_every,), name="wbscale-lock-heartbeat", daemon=True
            )
            self._thread.start()
        _held.add(self)
        atexit.register(self.release)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def heartbeat(self) -> None:
        """Rewrite the heartbeat now (the background thread does so periodically)."""
        with self._guard:
            if self._fd is None:
                return
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(os.pread(self._fd, 1 << 16, 0))
                data["heartbeat"] = _now_iso()
                payload = (json.dumps(data, indent=1) + "\n").encode("utf-8")
                os.pwrite(self._fd, payload, 0)
                os.ftruncate(self._fd, len(payload))

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            self.heartbeat()

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and unlock; idempotent."""
        if os.getpid() != self._owner:
            return  # a forked child never releases its parent's lock
        self._stop.set()
        with self._guard:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                with contextlib.suppress(OSError):
                    if os.stat(self.path).st_ino == self._ino:  # not taken over meanwhile
                        os.unlink(self.path)
            finally:
                os.close(fd)  # drops the flock
        _held.discard(self)
        atexit.unregister(self.release)

    def _forget_in_child(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Lock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lock({str(self.path)!r}, held={self.held})"


def _try_flock(fd: int) -> bool | None:
    """Take the flock without waiting: True if taken, False if another holds it, None if
    the filesystem has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _create(path: Path, record: dict[str, Any]) -> int | None:
    """Create the lock file complete and flocked; its fd, or None if it exists already."""
    payload = (json.dumps(record, indent=1) + "\n").encode("utf-8")
    tmp = path.with_name(f".{path.name}.{record['host']}.{record['pid']}.new")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    linked = False
    try:
        os.write(fd, payload)
        os.fsync(fd)
        _try_flock(fd)
        try:
            os.link(tmp, path)
            linked = True
        except FileExistsError:
            pass
        except OSError as err:
            # NFS may report a failed link that happened: the link count tells.
            linked = os.fstat(fd).st_nlink == 2
            if not linked and err.errno not in (
                errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK
            ):
                raise
            if not linked:
                os.close(fd)
                fd = -1
                return _create_excl(path, payload)
        return fd if linked else None
    finally:
        if not linked and fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _create_excl(path: Path, payload: bytes) -> int | None:
    """Fallback for filesystems without hard links (readers retry a half-written file)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    try:
        _try_flock(fd)
        os.write(fd, payload)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


def _stale_reason(path: Path, holder: Holder | None, stale_after: float) -> str | None:
    """Why the holder is gone (the lock may be taken), or None if it may be alive."""
    if holder is None:
        return "the lock file is empty or unreadable (left by an older wbscale?) and no process holds it"
    if holder.pid is None:
        return "the lock file names no process"
    if holder.host == socket.gethostname():
        if not pid_alive(holder.pid, holder.pid_start):
            return "that process is no longer running"
        return None
    beats = [t for t in (_parse_iso(holder.heartbeat), _parse_iso(holder.started)) if t is not None]
    with contextlib.suppress(OSError):
        beats.append(path.stat().st_mtime)
    age = time.time() - max(beats)
    if age > stale_after:
        return f"no heartbeat for {_ago(age)}, more than {_ago(stale_after)}"
    return None


def _held_message(path: Path, holder: Holder, stale_after: float, hint: str | None) -> str:
    text = f"{path} is locked by {holder.describe()}"
    if holder.pid is not None and holder.host != socket.gethostname():
        beat = _parse_iso(holder.heartbeat)
        if beat is not None:
            text += f", last heartbeat {_ago(time.time() - beat)} ago"
    text += ". "
    if hint:
        return text + hint
    if holder.pid is None:
        return text + f"Wait for that process to finish; if none is running, delete {path}."
    if holder.host == socket.gethostname():
        return text + (
            f"Wait for it to finish, or stop it (`kill {holder.pid}`) and re-run; "
            "the lock of a stopped process is taken over automatically."
        )
    return text + (
        f"Wait for it to finish, or stop it on {holder.host}; if that process is gone, the "
        f"lock is taken over automatically once its heartbeat is {_ago(stale_after)} old "
        f"(or delete {path} if you are sure)."
    )


def acquire(
    path: str | Path,
    purpose: str,
    *,
    stale_after: float = DEFAULT_STALE_AFTER_S,
    heartbeat_every: float = DEFAULT_HEARTBEAT_EVERY_S,
    hint: str | None = None,
) -> Lock:
    """Take the exclusive lock file at ``path`` for ``purpose`` (e.g. ``"wbscale fit"``).

    Returns a :class:`Lock` (use it as a context manager). A stale lock (see the module
    doc) is taken over with a one-line message on stderr. Raises :class:`LockHeld` (exit
    status 2) naming the holder (pid, host, since when) if a live process holds it;
    ``hint`` replaces the default advice on how to proceed. ``heartbeat_every=0`` turns
    the heartbeat thread off.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for _ in range(20):
        record: dict[str, Any] = {
            "pid": os.getpid(),
            "host": host,
            "started": _now_iso(),
            "heartbeat": _now_iso(),
            "purpose": purpose,
        }
        start = _pid_start(os.getpid())
        if start is not None:
            record["pid_start"] = start
        try:
            fd = _create(path, record)
        except OSError as err:
            raise UserError(
                f"cannot create the lock file {path} ({err.strerror or err}): check that its "
                "folder is writable and its disk has free space"
            ) from None
        if fd is not None:
            return Lock(path, purpose, fd, heartbeat_every)
        try:
            efd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # released meanwhile: try again
        try:
            if os.fstat(efd).st_ino != _ino_or_none(path):
                continue  # replaced meanwhile
            holder = read_holder(path)
            free = _try_flock(efd)
            reason = None if free is False else _stale_reason(path, holder, stale_after)
            if reason is None:
                raise LockHeld(
                    _held_message(path, holder or Holder(None, None, None, None, None), stale_after, hint),
                    path,
                    holder or Holder(None, None, None, None, None),
                )
            if os.fstat(efd).st_ino != _ino_or_none(path):
                continue  # another process took it over first
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            who = holder.describe() if holder is not None else "an unknown process"
            print(f"wbscale: taking over the stale lock {path} of {who}: {reason}", file=sys.stderr)
        finally:
            os.close(efd)
    raise UserError(f"could not take the lock {path}: it keeps changing hands; re-run")


def _ino_or_none(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
