"""Sums of squares of bfloat16 weights, read once and accumulated in float32: the inner loop of MaxNNScore.

No eager torch 2.13 CPU op reads bfloat16 and accumulates squares into float32 in one pass (``vector_norm(dtype=)``
and ``_linalg__powsum`` upcast the whole input first, ``mm``/``bmm`` with an output dtype do not run on CPU,
mixed-dtype ``addcmul_`` copies), so torch upcasts each block into a float32 buffer, squares it and sums it: three
passes. ``sumsq.c`` does it in one, built on first use by the system C compiler (``$CC``, else ``cc``) into
``cache/native/`` and called through ctypes (which releases the GIL: several threads reduce at once). Measured on
this project's 2-core AMD EPYC (one thread, bf16 data in memory, s per GB of bf16): torch blocks 0.23 (rows) and
0.25 (columns); the compiled loops 0.11 and 0.12 (x86-64 baseline, SSE2), about the speed of reading memory.

Where no compiler is found (or ``HETMOE_NATIVE=0``), :func:`row_sumsq` / :func:`col_sumsq` take a torch route that
does the same float32 additions in the same order, so the numbers are the same bits either way (tested), only
slower. The order (``sumsq.c`` documents it too):
  * a bfloat16 value is the top half of a float32, so its upcast and its square are exact in float32;
  * rows: element c of a row goes to lane c mod ``LANES``; each lane adds its squares in order; the lanes are then
    added by halving (lane j += lane j + 32, then + 16, ... + 1);
  * columns: row r goes to lane r mod ``LANES`` (a row of accumulators per lane), each lane adds its rows in order,
    then the lanes are added by halving, missing lanes (fewer rows than lanes) counting as zero.
Lanes are independent, so a vectorising compiler reorders nothing: the same bits on every CPU. Relative error vs
float64 on N(0, 1) rows of 2,048: ~2e-7.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

LANES = 64
_SOURCE = Path(__file__).with_name("sumsq.c")
_CACHE = Path(__file__).resolve().parent.parent / "cache" / "native"
_FLAGS = ["-O3", "-ffp-contract=off", "-std=c99", "-fPIC", "-shared"]
_lock = threading.Lock()
_scratch = threading.local()      # each thread's column accumulators, reused
_lib: ctypes.CDLL | None = None
_why = ""                 # why the torch route is taken ("" until the first call decides)


def _build() -> ctypes.CDLL | None:
    """The compiled library, built once per source, compiler flags and machine into ``cache/native/``; None (and
    ``_why`` set) when it cannot be built or loaded. A build goes to a temporary name and is renamed into place, so
    concurrent processes never load half a file."""
    global _why
    if os.environ.get("HETMOE_NATIVE", "1") == "0":
        _why = "HETMOE_NATIVE=0"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc or sys.platform == "win32":
        _why = "no C compiler found (set CC)"
        return None
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([cc, *_FLAGS, platform.machine()]).encode()).hexdigest()
    lib = _CACHE / f"sumsq-{key[:16]}.so"
    try:
        if not lib.exists():
            _CACHE.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=_CACHE)
            os.close(fd)
            try:
                done = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True,
                                      timeout=120)
                if done.returncode:
                    _why = f"{cc} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
                    return None
                os.replace(tmp, lib)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as e:
        _why = f"could not build or load {lib.name}: {e}"
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    dll.hetmoe_lanes.restype = i64
    dll.hetmoe_row_sumsq.argtypes = [ptr, i64, i64, ptr]
    dll.hetmoe_col_sumsq.argtypes = [ptr, i64, i64, ptr, ptr]
    dll.hetmoe_row_sumsq.restype = dll.hetmoe_col_sumsq.restype = None
    if dll.hetmoe_lanes() != LANES:
        _why = f"{lib.name} has {dll.hetmoe_lanes()} lanes, this module {LANES}"
        return None
    return dll


def route() -> str:
    """Which route the kernels take in this process: "compiled (<library>)" or "torch (<why>)"; builds on first call."""
    global _lib, _why
    with _lock:
        if _lib is None and not _why:
            _lib = _build()
            _why = _why or ("" if _lib is not None else "unknown")
    return f"compiled ({_lib._name})" if _lib is not None else f"torch ({_why})"


def _check(x: torch.Tensor, out: torch.Tensor, n: int, what: str) -> None:
    if x.dtype != torch.bfloat16 or x.dim() != 2 or not x.is_contiguous() or x.device.type != "cpu":
        raise ValueError(f"{what}: needs a contiguous 2-D bfloat16 CPU tensor, got {x.dtype} {tuple(x.shape)} "
                         f"on {x.device}{'' if x.is_contiguous() else ' (not contiguous)'}")
    if out.dtype != torch.float32 or tuple(out.shape) != (n,) or not out.is_contiguous():
        raise ValueError(f"{what}: out must be a contiguous float32 [{n}] tensor, got {out.dtype} {tuple(out.shape)}")


def _halve(acc: torch.Tensor) -> torch.Tensor:
    """Add lanes by halving along dim 0 of ``acc`` [lanes, ...] (missing lanes count as zero); returns acc[0]."""
    h = LANES // 2
    while h:
        n = max(0, min(h, acc.shape[0] - h))
        if n:
            acc[:n] += acc[h:h + n]
        h //= 2
    return acc[0]


def row_sumsq(x: torch.Tensor, out: torch.Tensor, *, native: bool = True) -> torch.Tensor:
    """Sum of squares of each row, in float32: out[r] = sum_c x[r, c]^2, in the lane order of the module docstring.

    x: bfloat16 [R, C], contiguous, on the CPU (e.g. a zero-copy view of mapped safetensors bytes); out: float32 [R],
    written and returned. ``native=False`` forces the torch route (same bits). Raises ValueError for any other
    dtype, rank, layout or device, or a wrong ``out``.
    """
    _check(x, out, x.shape[0], "row_sumsq")
    if native and route().startswith("compiled"):
        _lib.hetmoe_row_sumsq(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
        return out
    rows, cols = x.shape
    step = max(1, (1 << 19) // max(1, cols))          # rows per block: 2 MiB of float32 squares
    whole = cols // LANES
    for r0 in range(0, rows, step):
        sq = x[r0:r0 + step].float().square_()
        acc = torch.zeros(LANES, sq.shape[0])
        lanes = acc.t()                               # [rows, LANES] view: lane j of row r at lanes[r, j]
        for i in range(whole):
            lanes += sq[:, i * LANES:(i + 1) * LANES]
        tail = sq[:, whole * LANES:]
        lanes[:, :tail.shape[1]] += tail
        out[r0:r0 + step] = _halve(acc)
    return out


def col_sumsq(x: torch.Tensor, out: torch.Tensor, *, native: bool = True) -> torch.Tensor:
    """Sum of squares of each column, in float32: out[c] = sum_r x[r, c]^2, in the lane order of the module
    docstring. x: bfloat16 [R, C], contiguous, on the CPU; out: float32 [C], written and returned. Scratch:
    min(R, LANES) x C float32. ``native=False`` forces the torch route (same bits). Raises ValueError as
    :func:`row_sumsq`."""
    _check(x, out, x.shape[1], "col_sumsq")
    rows, cols = x.shape
    n = min(rows, LANES) * cols
    if native and route().startswith("compiled"):
        if _scratch.__dict__.get("acc") is None or _scratch.acc.numel() < n:
            _scratch.acc = torch.empty(n)             # kept per thread: a fresh 256 KiB buffer costs page faults
        _lib.hetmoe_col_sumsq(x.data_ptr(), rows, cols, out.data_ptr(), _scratch.acc.data_ptr())
        return out
    if rows == 0:
        return out.zero_()
    acc = torch.zeros(min(rows, LANES), cols)
    for r0 in range(0, rows, LANES):
        blk = x[r0:r0 + LANES].float().square_()
        acc[:blk.shape[0]] += blk
    return out.copy_(_halve(acc))
