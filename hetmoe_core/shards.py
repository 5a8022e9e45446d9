"""Streaming expert tensors straight from safetensors shards: MaxNNScore without building the model.

The safetensors header (8-byte length + JSON) gives every tensor's byte range, so only expert and router tensors are
read, in file order, with the kernel reading ahead (posix_fadvise) while the current tensor is reduced by the same
norm kernels ``scores`` uses on a built model (imported at call time: ``scores`` re-exports ``stream_scores``).
"""
from __future__ import annotations

import json
import os
import re
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


@torch.no_grad()
def stream_scores(folder: str | Path, *, transposed: bool | None = None, interleaved: bool | None = None,
                  gated: bool | None = None, chunk_bytes: int = 64 << 20,
                  progress: Callable[[int, int], None] | None = None) -> ExpertScores:
    """MaxNNScore and Router Norm straight from a folder of safetensors shards, without building the model.

    Reads one tensor at a time through safetensors' memory-mapped ``safe_open`` (fused tensors in slices of
    experts of about ``chunk_bytes``; a handle is dropped after ~``chunk_bytes`` so mapped pages do not pile up),
    reduces it into a reused float32 buffer and keeps only the [I] norm vectors; the kernel is asked to read the next
    128 MiB ahead (posix_fadvise). Tensors other than experts and routers are never read. Memory above the
    interpreter's stays about ``chunk_bytes`` + 8 MiB whatever the checkpoint size. Key layouts understood:
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
    from .scores import PROJECTIONS, ExpertScores, LayerScores, _Scratch, _norms, down_norms, gate_up_norms
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
    total, done, scratch = sum(p.nbytes for p in plan), 0, _Scratch()
    # safe_open maps the whole shard and pages read stay resident until the handle is dropped, so a handle serves
    # at most ~chunk_bytes of tensors (fused tensors: one slice of experts) and is then reopened.
    fh, fh_file, fh_bytes = None, None, 0
    ahead = _Readahead(plan)
    try:
        for i, t in enumerate(plan):
            ahead.advise(i)
            d = per_layer.setdefault(t.layer, {"experts": {}})
            if t.kind != "fused":
                if fh is None or fh_file != t.file or fh_bytes >= chunk_bytes:
                    fh = None
                    fh, fh_file, fh_bytes = safe_open(str(t.file), framework="pt"), t.file, 0
                w = fh.get_tensor(t.key)              # router [E, H]: rows; gate/up [I, H]: rows; down [H, I]: columns
                fh_bytes += t.nbytes
                if t.kind == "router":
                    d["router"] = _norms(w, 1, scratch)
                else:
                    d["experts"].setdefault(t.role, {})[t.expert] = _norms(w, 0 if t.role == "down" else 1, scratch)
                del w
            else:
                fh = None
                step, parts = max(1, int(chunk_bytes // max(1, t.nbytes // t.shape[0]))), []
                for e0 in range(0, t.shape[0], step):
                    with safe_open(str(t.file), framework="pt") as h:
                        w = h.get_slice(t.key)[e0:e0 + step]
                    parts.append({"down": down_norms(w, transposed=transposed, scratch=scratch)} if t.role == "down"
                                 else gate_up_norms(w, gated=gated and t.role == "gate_up", transposed=transposed,
                                                    interleaved=interleaved, scratch=scratch))
                    del w
                for p in parts[0]:
                    d["experts"][p] = torch.cat([q[p] for q in parts])
            done += t.nbytes
            if progress:
                progress(done, total)
    finally:
        fh = None
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
