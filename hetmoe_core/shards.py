"""Streaming expert tensors straight from safetensors shards: MaxNNScore without building the model.

The safetensors header (8-byte length + JSON) gives every tensor's byte range, so only expert and router tensors are
mapped (zero-copy mmap), in file order, with a thread faulting the next ones in ahead, and reduced on worker
threads by the same norm kernels ``scores`` uses on a built model (imported at call time: ``scores`` re-exports
``stream_scores``).
"""
from __future__ import annotations

import collections
import ctypes
import errno
import json
import math
import mmap
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

_LAYER = r"(?:^|\.)layers\.(\d+)\.(?:mlp|block_sparse_moe|feed_forward)\."
_PER_EXPERT = re.compile(_LAYER + r"experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_FUSED = re.compile(_LAYER + r"(?:experts\.(gate_up_proj|up_proj|down_proj)|(input_linear|output_linear)\.weight)$")
_ROUTER = re.compile(_LAYER + r"(?:gate|router|router\.layer)\.weight$")
_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down",
         "gate_up_proj": "gate_up", "input_linear": "gate_up", "output_linear": "down"}
_TRANSPOSED_TYPES = {"gpt_oss"}   # fused [E, H, 2I] with interleaved gate/up columns


def _shards(folder: Path) -> list[Path]:
    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        names = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {folder}; pass a folder holding a safetensors checkpoint")
    return files


class _Tensor(NamedTuple):
    file: Path
    key: str
    kind: str            # "expert" (per-expert key) | "fused" | "router"
    layer: int
    expert: int | None
    role: str            # gate | up | down | gate_up | router
    nbytes: int
    offset: int          # absolute byte offset in the file
    shape: tuple
    dtype: torch.dtype


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _damaged(f: Path, why: str) -> ValueError:
    return ValueError(f"{f} is a damaged safetensors file ({why}); download or save the checkpoint again")


def _header(f: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and its length (format: 8-byte little-endian length + JSON),
    checked before anything is read or mapped: a damaged file gets one ValueError naming it."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        n = int.from_bytes(raw, "little")
        if len(raw) < 8 or not 2 <= n <= size - 8:
            raise _damaged(f, f"header length {n} does not fit a {size}-byte file")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _damaged(f, f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _damaged(f, "header is not a JSON object")
    return header, n


def _plan(files: list[Path]) -> list[_Tensor]:
    """Expert and router tensors of the shards, in file and offset order (sequential reads)."""
    plan, unsupported = [], []
    for f in files:
        header, n = _header(f)
        size = f.stat().st_size
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                start, end = (int(x) for x in info["data_offsets"])
                shape = tuple(int(x) for x in info["shape"])
                at = (end - start, 8 + n + start, shape, _DTYPES.get(info["dtype"]))
            except (KeyError, TypeError, ValueError):
                raise _damaged(f, f"tensor {key!r} has no valid data_offsets/shape/dtype") from None
            if not 0 <= start <= end or 8 + n + end > size:
                raise _damaged(f, f"tensor {key!r} lies outside the file (truncated?)")
            if at[3] is not None and end - start != math.prod(shape) * at[3].itemsize:
                raise _damaged(f, f"tensor {key!r} holds {end - start} bytes, not {shape} x {info['dtype']}")
            if (mt := _PER_EXPERT.search(key)):
                t = _Tensor(f, key, "expert", int(mt[1]), int(mt[2]), _ROLE[mt[3]], *at)
            elif (mt := _FUSED.search(key)):
                t = _Tensor(f, key, "fused", int(mt[1]), None, _ROLE[mt[2] or mt[3]], *at)
            elif (mt := _ROUTER.search(key)):
                t = _Tensor(f, key, "router", int(mt[1]), None, "router", *at)
            else:
                if re.search(r"experts.*(_blocks|_scales|scale_inv|qweight)$", key):
                    unsupported.append(key)
                continue
            if t.dtype is None:
                raise ValueError(f"{f.name}: {key} is stored as {info['dtype']}; streaming reads BF16, F16, F32 and "
                                 "F64 tensors: use a bf16/fp16/fp32 checkpoint")
            plan.append(t)
    if unsupported and not any(p.kind != "router" for p in plan):
        raise ValueError(f"quantized expert weights ({unsupported[0]}, ...) are not supported for streaming; "
                         "use a bf16/fp16/fp32 checkpoint")
    return sorted(plan, key=lambda p: (str(p.file), p.offset))


class _Piece(NamedTuple):
    """A whole tensor, or a slice of experts of a fused tensor (its bytes are contiguous)."""
    t: _Tensor
    start: int           # absolute byte offset
    nbytes: int
    shape: tuple
    last: bool           # the last slice of its tensor


class _Job(NamedTuple):
    """Pieces that lie together in one file, mapped at once: [start, start + nbytes) covers them all."""
    file: Path
    start: int
    nbytes: int
    pieces: tuple


def _jobs(plan: list[_Tensor], chunk_bytes: int) -> list[_Job]:
    """Fused tensors cut into slices of experts of ~chunk_bytes; neighbouring pieces of a file (gaps under
    64 KiB) grouped into jobs of up to ~chunk_bytes, so per-expert checkpoints do not pay a mapping and a
    queue round trip per 4 MiB tensor."""
    pieces = []
    for t in plan:
        if t.kind != "fused" or not t.shape or t.shape[0] == 0:
            pieces.append(_Piece(t, t.offset, t.nbytes, t.shape, True))
            continue
        row = t.nbytes // t.shape[0]
        step = max(1, chunk_bytes // max(1, row))
        for e0 in range(0, t.shape[0], step):
            n = min(step, t.shape[0] - e0)
            pieces.append(_Piece(t, t.offset + e0 * row, n * row, (n,) + t.shape[1:], e0 + n == t.shape[0]))
    jobs, group = [], []
    for pc in pieces + [None]:
        if group and (pc is None or pc.t.file != group[0].t.file or pc.start - end > 64 << 10
                      or pc.start + pc.nbytes - group[0].start > chunk_bytes):
            jobs.append(_Job(group[0].t.file, group[0].start, end - group[0].start, tuple(group)))
            group = []
        if pc is not None:
            group.append(pc)
            end = pc.start + pc.nbytes
    return jobs


class _Files:
    """Read-only descriptors of the shards (opened once), and the read-ahead: ``readers`` threads fault the next
    ~``window`` bytes of jobs into the page cache through mappings marked MADV_HUGEPAGE, one job each at a time, so
    disk reads overlap the reductions (tensors no job needs, such as embeddings, are never read) and the kernel
    reads them in 2 MiB folios. A fault reads synchronously; 4 readers keep about as many requests in flight as
    WILLNEED did (1 reader: cold throughput vs cat, median of paired runs, 0.84 vs WILLNEED's 1.20; 4 readers 1.38
    vs 1.25).

    Why not posix_fadvise(WILLNEED): the kernel's forced read-ahead fills the page cache with 4 KiB folios, and
    every later (warm) run then pays a page fault per 64 KiB and a TLB miss per 4 KiB: measured 40-60% more CPU per
    GB warm than on 2 MiB folios, which a fault in a MADV_HUGEPAGE mapping reads (and maps with one entry)."""
    def __init__(self, jobs: list[_Job], window: int = 128 << 20, readers: int = 4):
        self.jobs, self.window, self.readers, self.next, self.queued, self.fds = jobs, window, readers, 0, 0, {}
        self.cum = np.cumsum([0] + [j.nbytes for j in jobs])
        self.ahead: ThreadPoolExecutor | None = None

    def fd(self, f: Path) -> int:
        if f not in self.fds:
            self.fds[f] = os.open(f, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return self.fds[f]

    def advise(self, i: int) -> None:
        """Call (from one thread) before job i is queued: the jobs up to ``window`` bytes ahead go to the read-ahead
        threads, which skip those already queued by then (their worker faults them in itself). Jobs whose pages are
        all in the page cache already (:func:`_cached`) go to none: on a warm rerun the readers only mapped every job
        a second time (measured: ~0.015 s of CPU per GB, 8% of a warm run)."""
        self.queued = i
        while self.next < len(self.jobs) and self.cum[self.next] - self.cum[i] < self.window:
            j, fd = self.jobs[self.next], self.fd(self.jobs[self.next].file)
            if not _cached(fd, j.start, j.nbytes):         # a warm rerun hands nothing over
                if self.ahead is None:
                    self.ahead = ThreadPoolExecutor(self.readers, thread_name_prefix="hetmoe-readahead")
                self.ahead.submit(self._fault_in, self.next, fd)
            self.next += 1

    def _fault_in(self, k: int, fd: int, step: int = 8 << 20) -> None:
        """Touch one byte per 2 MiB of job k (pieces of ``step`` bytes mapped at a time: RSS stays low); the faults
        read the pages in (a torch op: the GIL is released while the disk works); cached pages cost only the mapping."""
        j = self.jobs[k]
        for at in range(j.start, j.start + j.nbytes, step):
            if k < self.queued:
                return
            mm = _mapped(fd, _Job(j.file, at, min(step, j.start + j.nbytes - at), ()))
            try:
                t = torch.frombuffer(mm, dtype=torch.uint8)
                t[at % mmap.ALLOCATIONGRANULARITY::_PMD].sum()
                t[-1:].sum()
                del t
            finally:
                mm.close()

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.shutdown(cancel_futures=True)
        for fd in self.fds.values():
            os.close(fd)


_PMD = 2 << 20                                     # a huge page (x86-64, arm64 with 4 KiB pages)


class _CacheStat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted",
                                                "nr_recently_evicted")]


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


_SYS_CACHESTAT = 451       # the same number on every Linux architecture (the unified syscall table; Linux 6.5+)
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PAGE = mmap.PAGESIZE


def _cached(fd: int, start: int, n: int) -> bool:
    """Whether every page of the bytes [start, start + n) of the file is in the page cache: Linux's cachestat(2),
    which counts cached pages without reading, mapping or starting a read-ahead (a preadv(RWF_NOWAIT) probe starts
    a read-ahead of small folios; mincore needs a mapping). False where the OS cannot tell (not Linux, or < 6.5)."""
    global _libc
    if _libc is None or n <= 0:
        return False
    first, end = start - start % _PAGE, start + n
    rng, st = _Range(first, end - first), _CacheStat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):   # an older kernel or a seccomp filter: stop asking
            _libc = None
        return False
    return st.nr_cache >= -(-(end - first) // _PAGE)


def _mapped(fd: int, j: _Job) -> mmap.mmap | None:
    """A private mapping of just the job's pages (never written; ``None`` for an empty job): pages count in RSS
    only while the job holds them. Views come from :func:`_view`; drop them before closing the mapping.

    Marked MADV_HUGEPAGE where the OS has it: a page the read-ahead has not brought in yet is then read in a 2 MiB
    folio, and cached 2 MiB folios are mapped whole (the kernel aligns the mapping to the file offset modulo 2 MiB),
    so the reduction takes one page fault and one TLB entry per 2 MiB instead of per 64 KiB / 4 KiB."""
    if j.nbytes == 0:
        return None
    base = j.start - j.start % mmap.ALLOCATIONGRANULARITY
    # pages are faulted in by the reduction itself, with the GIL released (mmap.madvise(MADV_POPULATE_READ) would
    # hold the GIL through a cold read)
    mm = mmap.mmap(fd, j.start + j.nbytes - base, offset=base, access=mmap.ACCESS_COPY)
    if _HUGE is not None:
        try:
            mm.madvise(_HUGE)
        except OSError:                   # a kernel without transparent huge pages: 4 KiB pages then
            pass
    return mm


_HUGE = getattr(mmap, "MADV_HUGEPAGE", None) if hasattr(mmap.mmap, "madvise") else None


def _view(mm: mmap.mmap | None, j: _Job, pc: _Piece) -> torch.Tensor:
    """Zero-copy tensor of one piece inside its job's mapping."""
    if pc.nbytes == 0:
        return torch.empty(pc.shape, dtype=pc.t.dtype)
    at = pc.start - (j.start - j.start % mmap.ALLOCATIONGRANULARITY)
    return torch.frombuffer(mm, dtype=torch.uint8, count=pc.nbytes, offset=at).view(pc.t.dtype).view(pc.shape)


def _collect(per_layer: dict, t: _Tensor, res, parts: list, last: bool, done: int, total: int, progress) -> int:
    """File one job's norms under its layer (slices of a fused tensor are joined after the last one)."""
    d = per_layer.setdefault(t.layer, {"experts": {}})
    if t.kind == "router":
        d["router"] = res
    elif t.kind != "fused":
        d["experts"].setdefault(t.role, {})[t.expert] = res
    else:
        parts.append(res)
        if not last:
            return done
        for p in parts[0]:
            d["experts"][p] = torch.cat([q[p] for q in parts])
        parts.clear()
    done += t.nbytes
    if progress:
        progress(done, total)
    return done


@torch.no_grad()
def stream_scores(folder: str | Path, *, transposed: bool | None = None, interleaved: bool | None = None,
                  gated: bool | None = None, chunk_bytes: int = 32 << 20,
                  progress: Callable[[int, int], None] | None = None, threads: int | None = None) -> ExpertScores:
    """MaxNNScore and Router Norm straight from a folder of safetensors shards, without building the model.

    Only expert and router tensors are touched, in file order: each job (neighbouring tensors, or a slice of experts
    of a fused tensor, ~``chunk_bytes`` in all) maps its bytes zero-copy (mmap: no read into a buffer, no float32
    copy) and reduces them on one of ``threads`` workers (default: the usable CPUs, at most 8) into [I] norm
    vectors, upcasting bf16/fp16 in L2-cache-sized blocks and accumulating in float32; the kernel reads the next
    128 MiB ahead (a read-ahead thread faults them in, in 2 MiB folios where the OS has transparent huge pages), so
    a cold read keeps the disk busy and a warm rerun maps 2 MiB per page fault. Memory above the interpreter's stays
    about ``threads`` x (largest job + 2 MiB) + 32 MiB, whatever the checkpoint size.
    Workers run torch single-threaded (they are the parallelism); the torch thread count that threads started
    meanwhile inherit, and MKL's, read 1 during the call and are restored after. The result does not depend on
    ``threads`` or ``chunk_bytes`` (same bits), and equals :func:`expert_scores` on the built model bit for bit
    when the model holds the same dtype. Key layouts understood:
    fused ``...layers.L.mlp.experts.gate_up_proj`` / ``down_proj`` (transformers 5; GPT-OSS transposed and
    interleaved, detected from config.json ``model_type`` unless given), per-expert
    ``...layers.L.mlp.experts.E.{gate,up,down}_proj.weight`` (OLMoE hub), Mixtral's
    ``block_sparse_moe.experts.E.{w1,w3,w2}.weight``, Granite's ``block_sparse_moe.{input,output}_linear.weight``;
    routers ``...layers.L.mlp.gate.weight`` / ``router.weight`` / ``router.layer.weight``. MoE layers are numbered
    in decoder order (moe_index). progress(done_bytes, total_bytes) is called after each tensor.
    Raises ValueError when the folder holds no expert tensors, the shapes disagree, a shard is damaged, or experts
    are quantized.
    """
    from .scores import ExpertScores
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; pass a local checkpoint folder")
    cfg_path = folder / "config.json"
    mtype = json.loads(cfg_path.read_text()).get("model_type", "") if cfg_path.exists() else ""
    transposed = (mtype in _TRANSPOSED_TYPES) if transposed is None else transposed
    interleaved = (mtype in _TRANSPOSED_TYPES) if interleaved is None else interleaved
    plan = _plan(_shards(folder))
    if not any(p.kind != "router" for p in plan):
        raise ValueError(f"no routed-expert tensors found in {folder}; is this a Mixture-of-Experts checkpoint?")
    if gated is None:       # per-expert: gated iff gate_proj/w1 exists; fused: gate_up holds two halves
        gated = any(p.role == "gate" for p in plan) or any(p.role == "gate_up" and not p.key.endswith(".up_proj")
                                                            for p in plan)
    per_layer = _reduce(plan, gated, transposed, interleaved, chunk_bytes, progress, threads)
    return ExpertScores(_assemble(per_layer), source=str(folder))


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _reduce(plan: list[_Tensor], gated: bool, transposed: bool, interleaved: bool, chunk_bytes: int,
            progress, threads: int | None = None) -> dict[int, dict]:
    """Reduce the planned tensors and keep only their norms: {layer: {"router": [E], "experts": {...}}}.

    Jobs go to ``threads`` workers, each with its own scratch buffers; at most 2 x threads are queued, results are
    collected in plan order, and a job's arithmetic does not depend on which worker ran it, so the numbers are the
    same bit for bit for any thread count. The mapped pages' reads (page-cache faults or disk) overlap the other
    workers' reductions: torch releases the GIL."""
    from .scores import _Scratch, _norms, down_norms, gate_up_norms
    per_layer: dict[int, dict] = {}
    total, done = sum(p.nbytes for p in plan), 0
    threads = max(1, threads or min(8, _cpus()))
    jobs = _jobs(plan, chunk_bytes)
    files = _Files(jobs)
    local, torch_threads = threading.local(), torch.get_num_threads()

    def norms(pc: _Piece, w: torch.Tensor, scratch):
        t = pc.t
        if t.kind == "router":
            return _norms(w, 1, scratch)              # router [E, H]: rows
        if t.kind != "fused":                         # gate/up [I, H]: rows; down [H, I]: columns
            return _norms(w, 0 if t.role == "down" else 1, scratch)
        if t.role == "down":
            return {"down": down_norms(w, transposed=transposed, scratch=scratch)}
        return gate_up_norms(w, gated=gated and t.role == "gate_up", transposed=transposed,
                             interleaved=interleaved, scratch=scratch)

    def reduce(j: _Job, fd: int) -> list:
        if not hasattr(local, "scratch"):
            local.scratch = _Scratch()
            torch.set_num_threads(1)          # this worker's ops only (OpenMP's setting is per thread)
        mm = _mapped(fd, j)
        try:
            return [norms(pc, _view(mm, j, pc), local.scratch) for pc in j.pieces]
        finally:                              # views are gone with the frames: unmap
            if mm is not None:
                try:
                    mm.close()
                except BufferError:           # views still held by a traceback: unmapped with them
                    pass

    def collect(j: _Job, fut, done: int) -> int:
        for pc, res in zip(j.pieces, fut.result()):
            done = _collect(per_layer, pc.t, res, parts, pc.last, done, total, progress)
        return done

    pending, parts = collections.deque(), []
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="hetmoe-scores") as pool:
            try:
                for i, j in enumerate(jobs):
                    files.advise(i)
                    pending.append((j, pool.submit(reduce, j, files.fd(j.file))))
                    while len(pending) > 2 * threads or (pending and pending[0][1].done()):
                        done = collect(*pending.popleft(), done)
                while pending:
                    done = collect(*pending.popleft(), done)
            except BaseException:
                for _, fut in pending:
                    fut.cancel()
                raise
    finally:
        files.close()
        torch.set_num_threads(torch_threads)   # what new threads inherit (and MKL's, global) as it was
    return per_layer


def _assemble(per_layer: dict[int, dict]) -> tuple:
    """LayerScores per MoE layer (decoder order) from the reduced norms; ValueError for inconsistent layers."""
    from .scores import PROJECTIONS, LayerScores
    layers = []
    for moe_index, layer in enumerate(sorted(k for k, v in per_layer.items() if v["experts"])):
        d = per_layer[layer]
        if "router" not in d:
            raise ValueError(f"layer {layer} has experts but no router weight "
                             f"(expected ...layers.{layer}.mlp.gate.weight)")
        norms = {}
        for p in PROJECTIONS:
            v = d["experts"].get(p)
            if isinstance(v, dict):                        # per-expert layout: stack in expert order
                if sorted(v) != list(range(len(v))):
                    raise ValueError(f"layer {layer}: experts of {p} are not numbered 0..{len(v) - 1}")
                v = torch.stack([v[e] for e in range(len(v))])
            if v is not None:
                norms[p] = v.numpy()
        if "down" not in norms or "up" not in norms:
            raise ValueError(f"layer {layer}: missing up or down projection of the experts")
        E = d["router"].shape[0]
        if any(n.shape[0] != E for n in norms.values()) or len({n.shape[1] for n in norms.values()}) != 1:
            raise ValueError(f"layer {layer}: expert tensor shapes disagree "
                             f"({ {p: n.shape for p, n in norms.items()} }, router {E} experts)")
        layers.append(LayerScores(moe_index, layer, norms, d["router"].numpy()))
    return tuple(layers)
