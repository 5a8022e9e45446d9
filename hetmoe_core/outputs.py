"""Files a command writes from the results store (snapshots, reports): where one may be written, and writing it
atomically. The store itself is never a target (it is protected by path, link and inode), nor is a user's file
overwritten unless asked.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def output_path(out: str | os.PathLike, overwrite: bool = False, protect=()) -> Path:
    """Check that a result file (snapshot, report) may be written at ``out``; returns its resolved path.

    Raises ValueError when ``out`` is a folder, exists and ``overwrite`` is False, or is (after resolving links,
    or as the same inode) one of the ``protect`` paths or their DuckDB sidecars (the store being read), which is
    never overwritten, not even with ``overwrite``.
    """
    out = Path(out).expanduser()
    target = out.resolve()
    if target.is_dir():
        raise ValueError(f"{out} is a folder; give a file path to write (e.g. {out / 'snapshot.zip'})")
    for p in protect:
        p = Path(p).expanduser().resolve()
        sidecars = [p] + [p.with_name(p.name + s) for s in (".wal", ".lock", ".lock-gate")]
        if target in sidecars or (target.exists() and p.exists() and os.path.samefile(target, p)):
            raise ValueError(f"refusing to write {out}: it is the store being read ({p}); choose another file")
    if target.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --force to overwrite it, or choose another file")
    return target


@contextlib.contextmanager
def atomic_write(path: Path):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` at once, on error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
