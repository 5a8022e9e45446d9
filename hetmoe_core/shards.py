"""Streaming expert tensors straight from safetensors shards: MaxNNScore without building the model.

The safetensors header (8-byte length + JSON) gives every tensor's byte range, so only expert and router tensors are
queued in file order, with the kernel reading ahead (posix_fadvise), and reduced on worker threads by the same
norm kernels ``scores`` uses on a built model (imported at call time: ``scores`` re-exports ``stream_scores``).
"""
from __future__ import annotations

import collections
import json
import os
import re
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
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                start, end = (int(x) for x in info["data_offsets"])
                at = (end - start, 8 + n + start, tuple(int(x) for x in info["shape"]))
            except (KeyError, TypeError, ValueError):
                raise _damaged(f, f"tensor {key!r} has no valid data_offsets/shape") from None
            if not 0 <= start <= end or 8 + n + end > f.stat().st_size:
                raise _damaged(f, f"tensor {key!r} lies outside the file (truncated?)")
            if (mt := _PER_EXPERT.search(key)):
                plan.append(_Tensor(f, key, "expert", int(mt[1]), int(mt[2]), _ROLE[mt[3]], *at))
            elif (mt := _FUSED.search(key)):
                plan.append(_Tensor(f, key, "fused", int(mt[1]), None, _ROLE[mt[2] or mt[3]], *at))
            elif (mt := _ROUTER.search(key)):
                plan.append(_Tensor(f, key, "router", int(mt[1]), None, "router", *at))
            elif re.search(r"experts.*(_blocks|_scales|scale_inv|qweight)$", key):
                unsupported.append(key)
    if unsupported and not any(p.kind != "router" for p in plan):
        raise ValueError(f"quantized expert weights ({unsupported[0]}, ...) are not supported for streaming; "
                         "use a bf16/fp32 checkpoint")
    return sorted(plan, key=lambda p: (str(p.file), p.offset))


class _Readahead:
    """Asks the kernel (posix_fadvise WILLNEED) to read the next ~``window`` bytes of expert tensors while the
    current one is reduced, so disk reads overlap compute (skipped tensors such as embeddings are never read)."""
    def __init__(self, plan: list[_Tensor], window: int = 128 << 20):
        self.plan, self.window, self.next, self.fds = plan, window, 0, {}
        self.cum = np.cumsum([0] + [t.nbytes for t in plan])

    def advise(self, i: int) -> None:
        while hasattr(os, "posix_fadvise") and self.next < len(self.plan) and \
                self.cum[self.next] - self.cum[i] < self.window:
            t = self.plan[self.next]
            if t.file not in self.fds:
                self.fds[t.file] = os.open(t.file, os.O_RDONLY)
            os.posix_fadvise(self.fds[t.file], t.offset, t.nbytes, os.POSIX_FADV_WILLNEED)
            self.next += 1

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


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
                  gated: bool | None = None, chunk_bytes: int = 64 << 20,
                  progress: Callable[[int, int], None] | None = None, threads: int | None = None) -> ExpertScores:
    """MaxNNScore and Router Norm straight from a folder of safetensors shards, without building the model.

    ``threads`` workers (default min(4, CPUs)) each read one tensor at a time through safetensors' memory-mapped
    ``safe_open`` (fused tensors in slices of experts of about ``chunk_bytes``; a handle is dropped after
    ~``chunk_bytes`` so mapped pages do not pile up), reduce it into their own reused float32 buffer and keep only
    the [I] norm vectors; the kernel is asked to read the next 128 MiB ahead (posix_fadvise). Tensors other than
    experts and routers are never read. Memory above the interpreter's stays about (2 threads + 1) x
    ``chunk_bytes`` (at most that many tensors or slices read or mapped) + 8 MiB per thread, whatever the checkpoint
    size. The result does not depend on ``threads`` (same bits). Key layouts understood:
    fused ``...layers.L.mlp.experts.gate_up_proj`` / ``down_proj`` (transformers 5; GPT-OSS transposed and
    interleaved, detected from config.json ``model_type`` unless given), per-expert
    ``...layers.L.mlp.experts.E.{gate,up,down}_proj.weight`` (OLMoE hub), Mixtral's
    ``block_sparse_moe.experts.E.{w1,w3,w2}.weight``, Granite's ``block_sparse_moe.{input,output}_linear.weight``;
    routers ``...layers.L.mlp.gate.weight`` / ``router.weight`` / ``router.layer.weight``. MoE layers are numbered
    in decoder order (moe_index). progress(done_bytes, total_bytes) is called after each tensor.
    Raises ValueError when the folder holds no expert tensors, the shapes disagree, or experts are quantized.
    Equal (to float32 rounding) to :func:`expert_scores` on the built model.
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


def _reduce(plan: list[_Tensor], gated: bool, transposed: bool, interleaved: bool, chunk_bytes: int,
            progress, threads: int | None = None) -> dict[int, dict]:
    """Read the planned tensors in order and keep only their norms: {layer: {"router": [E], "experts": {...}}}."""
    from safetensors import safe_open
    from .scores import _Scratch, _norms, down_norms, gate_up_norms
    per_layer: dict[int, dict] = {}
    total, done = sum(p.nbytes for p in plan), 0
    threads = max(1, threads or min(4, os.cpu_count() or 1))
    # Jobs (one tensor, or one slice of experts of a fused tensor) are reduced by `threads` workers, each with its
    # own scratch buffer and its own short-lived safe_open handle, at most threads + 1 in flight (memory stays
    # bounded); results are collected in plan order, and each job's arithmetic does not depend on the thread count,
    # so the numbers are the same bit for bit. Reading a job's pages (the copy out of the page cache, or the disk
    # read) overlaps the other workers' reductions: torch releases the GIL.
    local = threading.local()

    def job(t: _Tensor, e0: int | None, step: int):
        try:
            return _job(t, e0, step)
        except Exception as e:   # safetensors' SafetensorError (a header that lies about its data) derives from Exception
            if "Safetensor" not in type(e).__name__:
                raise
            raise _damaged(t.file, str(e)) from None

    def _job(t: _Tensor, e0: int | None, step: int):
        scratch = local.__dict__.setdefault("scratch", _Scratch())
        if e0 is None:   # a thread keeps its handle for ~chunk_bytes of tensors, then reopens (mapped pages go)
            fh, fh_file, fh_bytes = local.__dict__.get("fh", (None, None, 0))
            if fh is None or fh_file != t.file or fh_bytes >= chunk_bytes:
                fh = fh_bytes = None
                fh, fh_bytes = safe_open(str(t.file), framework="pt"), 0
            w = fh.get_tensor(t.key)
            local.fh = (fh, t.file, fh_bytes + t.nbytes)
        else:
            with safe_open(str(t.file), framework="pt") as h:
                w = h.get_slice(t.key)[e0:e0 + step]
        if t.kind == "router":
            return _norms(w, 1, scratch)              # router [E, H]: rows
        if t.kind != "fused":                         # gate/up [I, H]: rows; down [H, I]: columns
            return _norms(w, 0 if t.role == "down" else 1, scratch)
        if t.role == "down":
            return {"down": down_norms(w, transposed=transposed, scratch=scratch)}
        return gate_up_norms(w, gated=gated and t.role == "gate_up", transposed=transposed,
                             interleaved=interleaved, scratch=scratch)

    def release():   # each worker drops its handle before the pool ends
        local.__dict__.pop("fh", None)
        barrier.wait()

    def jobs():
        for i, t in enumerate(plan):
            ahead.advise(i)
            if t.kind != "fused":
                yield t, None, 0, True
                continue
            step = max(1, int(chunk_bytes // max(1, t.nbytes // t.shape[0])))
            starts = range(0, t.shape[0], step)
            for e0 in starts:
                yield t, e0, step, e0 == starts[-1]

    ahead = _Readahead(plan)
    pending, parts, barrier = collections.deque(), [], threading.Barrier(threads)
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="hetmoe-scores") as pool:
            try:
                for t, e0, step, last in jobs():
                    pending.append((t, last, pool.submit(job, t, e0, step)))
                    while len(pending) > threads:
                        t, last, fut = pending.popleft()
                        done = _collect(per_layer, t, fut.result(), parts, last, done, total, progress)
                while pending:
                    t, last, fut = pending.popleft()
                    done = _collect(per_layer, t, fut.result(), parts, last, done, total, progress)
            finally:
                for f in [pool.submit(release) for _ in range(threads)]:
                    f.result()
    finally:
        ahead.close()
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
