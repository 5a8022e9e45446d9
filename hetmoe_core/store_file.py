"""Opening a results store file: every DuckDB connection of hetmoe is made here, under the store's locks.

Concurrency design (DuckDB lets one read-write process lock out every other process, readers included):
  * no connection lives longer than one operation: open, run one query or one transaction, close (the file is
    attached to the thread's in-memory DuckDB connection for the operation and detached after, ``dbhost``: the
    same lock as a connection of its own, without building a DuckDB instance per operation);
  * every operation first takes an advisory ``fcntl.flock`` on a sidecar file ``<db>.lock``: shared for reads,
    exclusive for writes, so DuckDB's own lock is never contended by hetmoe processes or threads (each
    operation opens its own file descriptor, so threads of one process exclude each other like processes do);
    a second lock ``<db>.lock-gate`` gives writers preference, so polling readers can never starve a sweep;
  * a DuckDB lock error from a foreign process (e.g. the duckdb CLI) is retried with backoff until ``timeout`` s;
  * a read waits at most ``READ_WAIT`` s for a foreign writer (``HETMOE_READ_WAIT`` for hetmoe's), then fails with
    one line naming it ("the store … is being written by another process (pid …); retry in a moment"): DuckDB cannot
    read a file another process holds read-write, so a page or ``runs --summary`` says so at once instead of
    hanging for the whole ``timeout`` (a hetmoe writer writes its pid into ``<db>.lock`` while it holds it);
  * results are append-only: one transaction writes a run and all its metrics, so ``kill -9`` leaves whole
    results only (DuckDB's WAL drops the uncommitted transaction on the next open).
Connections are never shared between threads; every public method is safe to call from any thread.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import time
from pathlib import Path

import duckdb

from .dbhost import open_attached

READ_WAIT = 3.0
"""Seconds a read waits for a foreign process's read-write DuckDB connection (the duckdb CLI, a notebook: it may
hold the file for hours, so waiting longer only hangs the page) before StoreBusy; writes wait the store's
``timeout``."""
HETMOE_READ_WAIT = 10.0
"""Seconds a read waits for hetmoe writers (the ``<db>.lock`` flock) before StoreBusy: each holds it for one
transaction (milliseconds; a snapshot import or schema upgrade: seconds), a queue of them a little longer."""

_READY: set = set()   # (device, inode, mtime, size, path) of store files whose schema this process checked


def _file_id(path: Path) -> tuple:
    info = path.stat()
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size, str(path))


class StoreBusy(RuntimeError):
    """Raised when the store stays locked by another process for longer than the timeout (``READ_WAIT`` for a
    read). Its message is one line naming the process when known."""


def busy_message(path, holder: str | None) -> str:
    """The one line a locked store gives: "the store <path> is being written by another process (pid 123,
    /usr/bin/python3); retry in a moment"."""
    return (f"the store {path} is being written by another process ({holder or 'pid unknown'}); retry in a "
            "moment")


def duckdb_holder(error: str) -> str | None:
    """"pid 123, /usr/bin/python3" from DuckDB's lock error ("… Conflicting lock is held in /usr/bin/python3
    (PID 123) …"), None when it names no process."""
    m = re.search(r"lock is held in (.*?) \(PID (\d+)\)", error)
    return f"pid {m.group(2)}, {m.group(1)}" if m else None


class StoreFile:
    """A DuckDB file opened one operation at a time under the locking protocol above (:class:`hetmoe_core.store.Store`
    is one, with the results tables on top).

    path: the .duckdb file (resolved); timeout: seconds to wait for a lock before StoreBusy; read_only: every
    connection is ``read_only=True`` and a write raises ValueError.
    """

    def __init__(self, path: Path, timeout: float = 60.0, read_only: bool = False):
        self.path = path
        self.timeout = timeout
        self.read_only = read_only
        self._lockfile = str(self.path) + ".lock"

    @property
    def writable(self) -> bool:
        """True when this process may write the store file and create files next to it (WAL, lock)."""
        if self.read_only:
            return False
        f = self.path if self.path.exists() else self.path.parent
        return os.access(f, os.W_OK) and os.access(self.path.parent, os.W_OK | os.X_OK)

    def _lock_fd(self, suffix: str, write: bool) -> int | None:
        """File descriptor of a sidecar lock file; None for a reader that cannot create one (read-only folder,
        where no hetmoe writer can work either). ValueError for a writer that cannot."""
        try:
            return os.open(self._lockfile + suffix, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            try:
                return os.open(self._lockfile + suffix, os.O_RDONLY)   # flock works on read-only descriptors
            except OSError:
                if write:
                    raise ValueError(self._read_only_message()) from None
                return None

    def _read_only_message(self) -> str:
        why = "was opened read-only" if self.read_only else "is read-only (the file or its folder is not writable)"
        return (f"store {self.path} {why}; this command writes results: give a writable --store path "
                f"(or copy the store somewhere writable)")

    @contextlib.contextmanager
    def _connect(self, write: bool):
        if write and not self.writable:
            raise ValueError(self._read_only_message())
        deadline = time.monotonic() + (self.timeout if write else min(self.timeout, HETMOE_READ_WAIT))
        gate = self._lock_fd("-gate", write)
        fd = self._lock_fd("", write)
        try:
            # Writer preference: a writer holds the gate exclusively while it waits for the readers inside to
            # leave, so a stream of short reads (dashboards polling) can never starve the sweep's writes.
            if gate is not None:
                self._flock(gate, fcntl.LOCK_EX if write else fcntl.LOCK_SH, deadline)
            try:
                if fd is not None:
                    self._flock(fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH, deadline)
            finally:
                if not write and gate is not None:
                    fcntl.flock(gate, fcntl.LOCK_UN)
            if write and fd is not None:   # who holds it, for a reader that gives up (busy_message)
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, str(os.getpid()).encode(), 0)
            # a write changes the file's mtime: the schema this process checked stays known (under the lock)
            checked = _file_id(self.path) if write and self.path.is_file() else None
            checked = checked if checked in _READY else None
            if not write:
                deadline = time.monotonic() + min(self.timeout, READ_WAIT)
            while True:
                try:
                    con, close = open_attached(self.path, write)
                    break
                except duckdb.IOException as e:   # lock held by a process outside this protocol
                    msg = str(e).lower()
                    if "permission denied" in msg or "read-only" in msg:
                        raise ValueError(self._read_only_message()) from None
                    if "lock" not in msg:
                        raise ValueError(f"{self.path} is not a readable DuckDB store ({str(e).splitlines()[0]}); "
                                         "use another --store path") from None
                    if time.monotonic() > deadline:
                        raise StoreBusy(busy_message(self.path, duckdb_holder(str(e)))) from None
                    time.sleep(0.02 + random.random() * 0.05)
                except duckdb.Error as e:
                    raise ValueError(f"{self.path} is not a readable DuckDB store ({e}); use another --store "
                                     "path") from None
            failed = True
            try:
                yield con
                failed = False
            finally:
                close(failed)
                if checked is not None:
                    _READY.discard(checked)
                    _READY.add(_file_id(self.path))
        finally:
            for f in (fd, gate):   # closing releases the flocks
                if f is not None:
                    os.close(f)

    def _flock(self, fd: int, mode: int, deadline: float) -> None:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreBusy(busy_message(self.path, self._hetmoe_holder())) from None
                time.sleep(0.002 + random.random() * 0.01)

    def _hetmoe_holder(self) -> str | None:
        """"pid 123, hetmoe" of the hetmoe process that last took the write lock (its pid in ``<db>.lock``; "this
        process" for a thread of this one), when that process is alive; else None."""
        try:
            with open(self._lockfile) as f:
                pid = int(f.read().strip() or 0)
            if pid <= 0:
                return None
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return f"pid {pid}, {'this process' if pid == os.getpid() else 'hetmoe'}"
