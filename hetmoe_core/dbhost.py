"""A thread's DuckDB host: an in-memory connection the results store's file is attached to, one operation at a time.

Opening a DuckDB database instance (``duckdb.connect`` of a file) builds its whole catalogue of functions and types
(~15-40 ms on this machine, measured, ``bench/bench_overhead.py``), while attaching a file to a live instance takes
~2 ms: ``store.Store`` opens its file for each operation this way and detaches it when the operation ends.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import duckdb


class _Host(threading.local):
    """This thread's in-memory DuckDB connection that store files are attached to, one operation at a time."""
    con = None
    pid = None
    busy = False


_host = _Host()
_ALIAS = "hetmoe_store"
_FORKED: list = []


def open_attached(path: Path, write: bool):
    """(DuckDB connection to the store file ``path``, ``close(failed)``): the file attached (``ATTACH``, read-only
    unless ``write``, made the default catalog by ``USE``) to this thread's in-memory connection, detached by
    ``close``. A new DuckDB database instance (``duckdb.connect`` of the file) costs ~15-40 ms, measured, most of it
    building its catalogue, more than a small result's forward; attaching a file to a live one ~2 ms. The locks
    are the same: DuckDB locks the file while it is attached and ``DETACH`` checkpoints and releases it, as
    closing a connection does, so no connection outlives its operation (``store``'s concurrency design). A nested
    operation of the same thread gets a connection of its own, a forked process a host of its own; ``close(True)``
    (the operation raised: an open transaction, a registered view may be left) closes the host connection."""
    h = _host
    if h.busy:
        con = duckdb.connect(str(path), read_only=not write)
        return con, lambda failed: con.close()
    if h.con is not None and h.pid != os.getpid():
        _FORKED.append(h.con)   # the parent's: never closed here (its destructor would run in this process)
        h.con = None
    if h.con is None:
        h.con, h.pid = duckdb.connect(":memory:"), os.getpid()
    name = "'" + str(path).replace("'", "''") + "'"
    try:
        h.con.execute(f"ATTACH {name} AS {_ALIAS}" + ("" if write else " (READ_ONLY)"))
        h.con.execute(f"USE {_ALIAS}")
    except BaseException:
        _drop_host()
        raise
    h.busy = True
    return h.con, _detach


def _detach(failed: bool) -> None:
    h = _host
    h.busy = False
    if not failed:
        try:
            h.con.execute("USE memory")
            h.con.execute(f"DETACH {_ALIAS}")
            return
        except duckdb.Error:
            pass
    _drop_host()


def _drop_host() -> None:
    """Close this thread's host connection (releasing every file attached to it); the next operation opens one."""
    h = _host
    con, h.con, h.busy = h.con, None, False
    if con is not None:
        con.close()
