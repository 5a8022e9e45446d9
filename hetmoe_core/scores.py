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
:func:`stream_scores` (module ``shards``) computes the same numbers straight from safetensors shards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .shards import _plan, _shards, stream_scores  # re-export
from .strategies import STRATEGIES as _REGISTRY, random_scores, strategy_scores  # re-export

PROJECTIONS = ("gate", "up", "down")
# names of the strategies scored without a measurement (the registry is strategies.STRATEGIES)
STRATEGIES = tuple(n for n, s in _REGISTRY.items() if s.needs != "measurement")


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

# float32 elements per block: rows of 2 MiB (the squares alone in L2 cache); for column sums 1 MiB (squares and
# accumulator together in L2). Big enough that Python's share of a block (torch calls holding the GIL) stays small;
# on warm mmap'd OLMoE pieces, 1 thread, 1 MiB row blocks cost 0.18 s/GB, 2 and 4 MiB 0.15 s/GB.
_ROWS_BLOCK, _COLS_BLOCK = 1 << 19, 1 << 18


class _Scratch:
    """Reusable float32 buffers of one reducing thread: an upcast copy and an accumulator. Fresh per-tensor
    temporaries fragment the heap: streaming OLMoE shards with them grew RSS to ten times the largest tensor."""
    def __init__(self):
        self.bufs = [torch.empty(0), torch.empty(0)]

    def __call__(self, shape, which: int = 0) -> torch.Tensor:
        n = math.prod(shape)
        if self.bufs[which].numel() < n:
            self.bufs[which] = torch.empty(n)
        return self.bufs[which][:n].view(shape)


def _squares(blk: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Exact float32 squares of bf16/fp16 ``blk`` (their products fit a float32 mantissa; float64 is rounded to
    float32 first) in the float32 ``buf``. No torch CPU op squares bf16 into float32 in one pass: mixed-dtype ops
    compute in bf16 (rounded) or upcast a copy first, and reductions with ``dtype=float32`` (vector_norm,
    linalg__powsum) copy the whole input first. So the block is copied (cast) into ``buf`` and squared in place."""
    return buf.copy_(blk).square_()


def _norms(w: torch.Tensor, dim: int, scratch: _Scratch | None = None) -> torch.Tensor:
    """float32 L2 norms of ``w`` along ``dim`` (any rank, any float dtype), accumulated in float32.

    bfloat16 on the CPU (checkpoints' dtype) goes to the one-pass compiled kernels (:func:`_bf16_norms`; their fixed
    summation order is in :mod:`.kernels`). fp16/fp64 (and bf16 on another device) are upcast block by block into a reused float32 buffer that stays in L2 cache (exact for
    bf16/fp16), so no float32 copy of the tensor is ever made and each element is read from memory once. Last dim:
    blocks of whole rows; upcast rows are squared in place and summed per row by torch.sum (a cascade sum with
    several vector accumulators: on warm mmap'd OLMoE rows, 1 thread, 0.148 s per GB of bf16 against 0.167 for
    vector_norm of the upcast block, whose float32 kernel keeps one accumulator); float32 rows go to vector_norm
    in place (one pass, nothing to cast: 0.047 s/GB against 0.067 for squares + sum). Another dim: each matrix
    [R, C] behind the leading dims (R reduced) is walked in blocks of ``s`` rows whose squares are added into a
    float32 accumulator [s, C] (addcmul_; a reduction over a strided dim is ~5x slower on CPU), summed over its rows
    at the end. The arithmetic of every norm depends only on its own row/matrix shape, so a tensor reduced whole (in
    memory, any thread count) or sliced by expert (streaming) gives the same bits. Single-threaded in effect:
    streaming reduces several tensors at once for parallelism. Relative error vs float64 ~3e-7.
    """
    dim = dim % w.dim()
    if w.dtype == torch.bfloat16 and w.device.type == "cpu":
        return _bf16_norms(w, dim)
    scratch = scratch or _Scratch()
    if dim == w.dim() - 1:
        flat = w.reshape(-1, w.shape[-1])
        out = torch.empty(flat.shape[0])
        step = max(1, _ROWS_BLOCK // max(1, flat.shape[1]))
        if w.dtype == torch.float32:                 # read once, in place: nothing to cast
            for blk, o in zip(flat.split(step), out.split(step)):
                torch.linalg.vector_norm(blk, dim=1, out=o)
            return out.view(w.shape[:-1])
        buf = scratch((min(step, flat.shape[0]), flat.shape[1]))
        for blk, o in zip(flat.split(step), out.split(step)):
            torch.sum(_squares(blk, buf if blk.shape[0] == buf.shape[0] else buf[:blk.shape[0]]), 1, out=o)
        return out.view(w.shape[:-1]).sqrt_()
    m = w.reshape(math.prod(w.shape[:dim]), w.shape[dim], math.prod(w.shape[dim + 1:]))
    out = torch.empty(m.shape[0], m.shape[2])
    step = max(1, min(m.shape[1], _COLS_BLOCK // max(1, m.shape[2])))
    acc = scratch((step, m.shape[2]), 1)
    upcast = w.dtype != torch.float32
    buf = scratch((step, m.shape[2])) if upcast else None
    for mat, o in zip(m.unbind(0), out.unbind(0)):
        acc.zero_()
        for blk in mat.split(step):
            n = blk.shape[0]
            x = (buf if n == step else buf[:n]).copy_(blk) if upcast else blk
            (acc[:n] if n != step else acc).addcmul_(x, x)
        torch.sum(acc, 0, out=o)
    return out.view(w.shape[:dim] + w.shape[dim + 1:]).sqrt_()


def _bf16_norms(w: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`_norms` of a bfloat16 CPU tensor through the one-pass kernels of :mod:`.kernels` (imported on first
    use: numba). Last dim: rows of the tensor seen as [-1, C]; another dim: each matrix [R, C] behind the leading
    dims, its R rows reduced. A non-contiguous tensor is made contiguous a block of rows (or a matrix) at a time,
    so its norms have the same bits as a contiguous copy's."""
    from . import kernels
    if dim == w.dim() - 1:
        flat = w.reshape(-1, w.shape[-1])
        out = torch.empty(flat.shape[0])
        if flat.is_contiguous():
            kernels.row_sumsq(flat, out)
        else:
            step = max(1, _ROWS_BLOCK // max(1, flat.shape[1]))
            for blk, o in zip(flat.split(step), out.split(step)):
                kernels.row_sumsq(blk.contiguous(), o)
        return out.view(w.shape[:-1]).sqrt_()
    m = w.reshape(math.prod(w.shape[:dim]), w.shape[dim], math.prod(w.shape[dim + 1:]))
    out = torch.empty(m.shape[0], m.shape[2])
    for mat, o in zip(m.unbind(0), out.unbind(0)):
        kernels.col_sumsq(mat.contiguous(), o)
    return out.view(w.shape[:dim] + w.shape[dim + 1:]).sqrt_()


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
