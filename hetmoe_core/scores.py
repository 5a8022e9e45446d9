"""Expert sensitivity scores: MaxNNScore, Router Norm, and the paper's data-driven baselines.

MaxNNScore (arXiv 2603.02633, Chowdhury et al. 2026, "expert score" section): for every projection of a routed
expert take the largest L2 norm of a *neuron's* weight vector, then multiply these maxima over the projections
(gate, up, down for SwiGLU experts; up and down when the MLP is not gated). Experts with large-norm neurons amplify
analog noise and are the ones to keep digital.

Orientation (our reading; the paper's code is unreleased): a neuron is one intermediate unit i. Its weight vectors
are the vector that *produces* it — row i of gate_proj and of up_proj, shape [H] — and the vector it *writes out*
— column i of down_proj, shape [H]. This keeps one norm per neuron in every projection (all three vectors live in
the model dimension H), so the three per-projection norm vectors are aligned by neuron index and the histogram the
UI shows is over the same I neurons. The alternative (rows of down_proj, i.e. per output channel) would mix all
neurons into each norm and not measure a neuron at all.

Everything is vectorised over experts: norms are taken over the fused 3-D tensors of transformers 5
(``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]; GPT-OSS: [E, H, 2I] with gate/up columns
interleaved and [E, I, H]), in cache-sized blocks that span all experts (no Python loop over experts).
:func:`stream_scores` computes the same numbers straight from safetensors shards.
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

PROJECTIONS = ("gate", "up", "down")
from .placement import STRATEGIES  # noqa: E402  (the names live with the placement request, torch-free)


@dataclass(frozen=True, eq=False)
class LayerScores:
    """Scores of one MoE layer.

    neuron_norms: projection name -> float32 [E, I] L2 norms of each neuron's weight vector ("gate" absent when the
    MLP is not gated). router_norm: float32 [E], L2 norm of each expert's router row (paper's Router Norm baseline).
    """
    moe_index: int
    layer: int
    neuron_norms: dict
    router_norm: np.ndarray

    @property
    def num_experts(self) -> int:
        return int(self.router_norm.shape[0])

    @property
    def proj_max(self) -> dict:
        """projection -> float32 [E]: largest neuron norm of each expert in that projection."""
        return {p: n.max(axis=1) for p, n in self.neuron_norms.items()}

    @property
    def maxnn(self) -> np.ndarray:
        """float64 [E]: MaxNNScore = product over projections of the largest neuron norm (float64: no overflow)."""
        out = np.ones(self.num_experts, dtype=np.float64)
        for m in self.proj_max.values():
            out *= m.astype(np.float64)
        return out


@dataclass(frozen=True, eq=False)
class ExpertScores:
    """MaxNNScore and Router Norm for every MoE layer (anatomy.moe_layers order)."""
    layers: tuple
    source: str = ""

    def get(self, name: str) -> list[np.ndarray]:
        """Per-layer [E] arrays of ``name``: 'maxnn', 'router_norm' or a projection ('gate'|'up'|'down')."""
        if name == "maxnn":
            return [ls.maxnn for ls in self.layers]
        if name == "router_norm":
            return [ls.router_norm for ls in self.layers]
        if name in PROJECTIONS:
            return [ls.proj_max.get(name) for ls in self.layers]
        raise ValueError(f"unknown score {name!r}; use 'maxnn', 'router_norm' or one of {PROJECTIONS}")

    def to_dict(self, neuron_norms: bool = False) -> dict:
        """JSON-able dict: per layer and expert maxnn, per-projection maxima, router_norm (optionally all norms)."""
        out = []
        for ls in self.layers:
            d = {"moe_index": ls.moe_index, "layer": ls.layer, "maxnn": ls.maxnn.tolist(),
                 "proj_max": {p: v.tolist() for p, v in ls.proj_max.items()}, "router_norm": ls.router_norm.tolist()}
            if neuron_norms:
                d["neuron_norms"] = {p: v.tolist() for p, v in ls.neuron_norms.items()}
            out.append(d)
        return {"source": self.source, "layers": out}


# ---------------------------------------------------------------- norms from fused / per-expert tensors

_BLOCK = 8 << 20   # bytes of float32 scratch per block: small enough to stay in cache between copy, square and sum


class _Scratch:
    """A reusable float32 buffer. Fresh per-tensor temporaries fragment the heap: streaming OLMoE shards with them
    grew RSS to ten times the largest tensor."""
    def __init__(self):
        self.buf = torch.empty(0)

    def __call__(self, shape) -> torch.Tensor:
        n = math.prod(shape)
        if self.buf.numel() < n:
            self.buf = torch.empty(n)
        return self.buf[:n].view(shape)


def _squares(blk: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
    x = scratch(blk.shape)
    if blk.dtype == torch.float32:
        return torch.mul(blk, blk, out=x)
    return x.copy_(blk).mul_(x)


def _norms(w: torch.Tensor, dim: int, scratch: _Scratch | None = None) -> torch.Tensor:
    """float32 L2 norms of ``w`` along ``dim`` (any rank), accumulated in float32 whatever w's dtype.

    float32 along the last dim: torch.linalg.vector_norm, no copy. Otherwise blocks of ~8 MiB — rows of all experts
    at once for the last dim, slices of the reduced dim for another — are squared into a reused float32 buffer and
    summed (vector_norm over a strided dim is ~10x slower on CPU, and a whole-tensor float32 copy costs memory)."""
    dim = dim % w.dim()
    if w.dtype == torch.float32 and dim == w.dim() - 1:
        return torch.linalg.vector_norm(w, dim=dim)
    scratch = scratch or _Scratch()
    if dim == w.dim() - 1:
        flat = w.reshape(-1, w.shape[-1])
        out = torch.empty(flat.shape[0])
        step = max(1, _BLOCK // (4 * flat.shape[1]))
        for r in range(0, flat.shape[0], step):
            torch.sum(_squares(flat[r:r + step], scratch), 1, out=out[r:r + step])
        return out.view(w.shape[:-1]).sqrt_()
    out = torch.zeros(w.shape[:dim] + w.shape[dim + 1:])
    step = max(1, _BLOCK // (4 * (w.numel() // max(1, w.shape[dim]))))
    for r in range(0, w.shape[dim], step):
        out += _squares(w.narrow(dim, r, min(step, w.shape[dim] - r)), scratch).sum(dim)
    return out.sqrt_()


def gate_up_norms(gate_up: torch.Tensor, *, gated: bool = True, transposed: bool = False,
                  interleaved: bool = False, scratch: _Scratch | None = None) -> dict[str, torch.Tensor]:
    """Per-neuron L2 norms of fused gate/up weights, vectorised over experts.

    gate_up: [E, 2I, H] (gate rows first, then up) or, ``transposed`` (GPT-OSS), [E, H, 2I]; ``interleaved`` means
    gate/up units alternate (GPT-OSS: gate = [..., ::2], up = [..., 1::2]). When ``gated`` is False the tensor is the
    up projection alone, [E, I, H] ([E, H, I] transposed). Returns {"gate"?, "up"} -> float32 [E, I].
    """
    if gate_up.dim() != 3:
        raise ValueError(f"fused gate_up must be 3-D [E, ., .], got shape {tuple(gate_up.shape)}")
    n = _norms(gate_up, 1 if transposed else 2, scratch)                # one norm per unit: [E, 2I] (gated)
    if not gated:
        return {"up": n}
    if n.shape[1] % 2:
        raise ValueError(f"gate_up has an odd number of units ({n.shape[1]}); is the MLP gated?")
    i = n.shape[1] // 2
    return {"gate": n[:, ::2], "up": n[:, 1::2]} if interleaved else {"gate": n[:, :i], "up": n[:, i:]}


def down_norms(down: torch.Tensor, *, transposed: bool = False, scratch: _Scratch | None = None) -> torch.Tensor:
    """float32 [E, I] norms of each neuron's output vector: columns of down_proj [E, H, I] (GPT-OSS: rows of
    [E, I, H])."""
    if down.dim() != 3:
        raise ValueError(f"fused down_proj must be 3-D [E, ., .], got shape {tuple(down.shape)}")
    return _norms(down, 2 if transposed else 1, scratch)


def fused_neuron_norms(gate_up: torch.Tensor, down: torch.Tensor, *, gated: bool = True, transposed: bool = False,
                       interleaved: bool = False) -> dict[str, torch.Tensor]:
    """{"gate"?, "up", "down"} -> float32 [E, I] from fused tensors (see :func:`gate_up_norms`, :func:`down_norms`)."""
    out = gate_up_norms(gate_up, gated=gated, transposed=transposed, interleaved=interleaved)
    out["down"] = down_norms(down, transposed=transposed)
    return out


def _fused_tensors(m) -> tuple[torch.Tensor | None, torch.Tensor]:
    ex = m.experts
    if m.gated:
        return ex.gate_up_proj, ex.down_proj
    up = getattr(ex, "up_proj", None)
    return (up if up is not None else ex.gate_up_proj), ex.down_proj


@torch.no_grad()
def layer_scores(m) -> LayerScores:
    """LayerScores of one anatomy MoELayer ``m`` from its in-memory fused tensors (no loop over experts)."""
    gu, down = _fused_tensors(m)
    norms = fused_neuron_norms(gu.detach(), down.detach(), gated=m.gated, transposed=m.transposed,
                               interleaved=m.interleaved)
    rn = _norms(m.router_weight().detach(), dim=1)
    return LayerScores(m.index, m.layer, {p: v.cpu().numpy() for p, v in norms.items()}, rn.cpu().numpy())


def expert_scores(anatomy) -> ExpertScores:
    """MaxNNScore, per-projection maxima, per-neuron norms and Router Norm of every MoE layer of a built model.

    anatomy: hetmoe_core.models.Anatomy. Source: arXiv 2603.02633 (MaxNNScore, Router Norm baseline).
    """
    if not anatomy.moe_layers:
        raise ValueError("the model has no MoE layers; expert scores need routed experts")
    return ExpertScores(tuple(layer_scores(m) for m in anatomy.moe_layers), source=anatomy.family)


# ---------------------------------------------------------------- baselines and strategy scores

def random_scores(num_experts: list[int], seed: int = 0) -> list[np.ndarray]:
    """Random baseline: i.i.d. U[0, 1) per expert from numpy's PCG64 seeded with ``seed`` (deterministic)."""
    rng = np.random.default_rng(seed)
    return [rng.random(e) for e in num_experts]


def strategy_scores(strategy: str, *, num_experts: list[int], scores: ExpertScores | None = None, stats=None,
                    seed: int = 0) -> list[np.ndarray]:
    """Per-layer float64 [E] scores for a placement strategy (higher -> digital).

    maxnn / router_norm need ``scores`` (ExpertScores); frequency (share of tokens routed to the expert) and weight
    (mean routing weight when routed; 0 for never-routed experts) need ``stats`` (routing.ActivationStats);
    random uses ``seed``. Raises ValueError for an unknown strategy or a missing input.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "random":
        out = random_scores(num_experts, seed)
    elif strategy in ("maxnn", "router_norm"):
        if scores is None:
            raise ValueError(f"strategy {strategy!r} needs expert scores (scores.expert_scores(anatomy))")
        out = scores.get(strategy)
    else:
        if stats is None:
            raise ValueError(f"strategy {strategy!r} needs activation statistics from calibration text "
                             "(routing.activation_stats)")
        mat = stats.frequency if strategy == "frequency" else stats.weight
        out = [np.asarray(row) for row in mat]
    out = [np.nan_to_num(np.asarray(s, dtype=np.float64), nan=0.0) for s in out]
    if [len(s) for s in out] != list(num_experts):
        raise ValueError(f"scores have {[len(s) for s in out]} experts per layer but the model has {list(num_experts)}")
    return out


# ---------------------------------------------------------------- streaming from safetensors shards

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


def _plan(files: list[Path]) -> list[_Tensor]:
    """Expert and router tensors of the shards, in file and offset order (sequential reads)."""
    plan, unsupported = [], []
    for f in files:
        with open(f, "rb") as fh:                      # header only: 8-byte length + JSON (safetensors format)
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            at = (end - start, 8 + n + start, tuple(info["shape"]))
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
    from safetensors import safe_open
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
    return ExpertScores(tuple(layers), source=str(folder))
