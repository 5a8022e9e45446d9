"""What a placement costs: energy per token, throughput, latency, AIMC tiles and chips, digital weight memory.

The paper's case for heterogeneous computing (arXiv 2603.02633, Table 2) is cost: analog tiles hold weights in place,
so every routed expert moved to AIMC saves the energy and time of fetching its weights from HBM. This module prices a
``Placement`` on a ``hardware.Hardware`` (digital accelerator + AIMC chips); its figures and their sources live in
``hardware.py``. All quantities are per generated token in the decode phase, batch ``B`` tokens per step.

Model (one decode step of B tokens; p_e = share of tokens routed to expert e, rows sum to top-k — measured
``routing.ActivationStats.frequency`` when given, else uniform top-k / E; tokens of a batch route independently):

* digital weights stream from HBM once per step: dense digital modules always, a digital expert when at least one
  of the B tokens picks it, probability 1 - (1 - p_e)^B. Energy/token = bytes x e_HBM / B + MACs x e_MAC, MACs of
  an expert counted with weight p_e. Time of a part = max(bytes / bandwidth, B·MACs / peak MAC rate) (roofline):
  at B = 1 decode is memory-bound; as B grows the dense weights are shared by more tokens, but an MoE also touches
  more distinct experts (at B = 32, 64 experts, top-8: 98.6% of them), so routed experts stay memory-bound far
  longer than the dense modules.
* analog matrices are split into tiles as aihwkit's ``TileModuleArray`` does (``tile_split``), with hetmoe's analog
  layout (``coverage.py``): each expert's fused gate/up ``[(2)I, H]`` and down ``[H, I]``, each Linear of an analog
  dense module separately. A token's MVM through an r x c block costs r·c x (tile MVM energy / tile²) — DAC, array
  and ADC included — plus the digital periphery for each of its r outputs; all tiles of a layer run in parallel,
  one MVM takes ``mvm_latency``; a token's two expert stages (gate/up, then down) pipeline, so n tokens on the
  busiest analog expert take (n + 1) MVM times; a dense analog module of depth d takes (B + d - 1).
* per MoE layer digital and analog experts run at the same time (max of the two); dense modules add up.
* not modelled: static/idle power, the attention score and value products and KV-cache traffic (activations x
  activations: digital in every placement and context-length dependent), activation transfers between the
  accelerator and the AIMC chips, embedding look-ups.

Reference check — OLMoE-1B-7B shapes (``olmoe_1b_7b``: vocab 50304, hidden 2048, expert width 1024, 16 layers,
64 experts, top-8, untied LM head; 6.919e9 parameters) on ``h100+pcm``, batch 32, uniform routing, computed by
``table2()`` (``python -m hetmoe_core.energy``). The paper's figures are quoted from digests of its Table 2 only
(the full text was not reachable; /work/shared/paper-notes.md): its digital shares and c = 1.5 accuracies; the
digest's throughput and tokens/(W·s) columns are scrambled (all-analog slower than all-digital) and not quoted.

==============================  =======  ========  ============  ========  ========  ========  ======  =====
configuration                   paper    hetmoe    paper acc.    J/token   tokens/J  tokens/s  tiles   chips
                                digital  digital   (c = 1.5)     B = 32    B = 32    B = 32
==============================  =======  ========  ============  ========  ========  ========  ======  =====
all-analog (all on tiles)       0 %      0 %       58.45 ± 0.15  2.44e-4   4.10e3    2.09e5    26060   1629
dense-only digital              5.37 %   5.40 %    60.73 ± 0.10  1.47e-3   681       1.37e5    24576   1536
dense + 25 % experts digital    28.65 %  28.68 %   61.82 ± 0.06  4.88e-3   205       2.73e4    18432   1152
all-digital                     100 %    98.51 %*  63.17         1.51e-2   66.1      7.97e3    0       0
==============================  =======  ========  ============  ========  ========  ========  ======  =====

At batch 1 (``table2(batch=1)``) tokens/J are 4.10e3 / 40.9 / 26.7 / 13.0 and tokens/s 9.29e4 / 4.40e3 / 2.91e3 /
1.42e3: the digital part is memory-bound, every weight fetched serves one token. * ``placement.digital_share``
counts embeddings and norms as memory, not digital compute.

Tokens per joule follow the physics: all-analog ≥ dense-only ≥ + 25 % experts ≥ all-digital (62x from all-digital
to all-analog at batch 32, 315x at batch 1). hetmoe's digital shares keep the router
digital (2.1e6 parameters, +0.03 points); the paper's 5.37 % and 28.65 % are exactly (attention + LM head [+ 25 %
of experts]) / all parameters, i.e. it counts the router elsewhere. (The issue quotes hetmoe at 5.60 % / 28.82 %;
with the config above ``placement.digital_share`` gives 5.40 % / 28.68 %.)
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from .hardware import DEFAULT_HARDWARE, HARDWARE, Hardware, get_hardware
from .placement import DENSE_KINDS


def tile_split(size: int, tile: int) -> list[int]:
    """Split of one matrix dimension into tiles: ceil(size / tile) near-equal parts, the larger ones first
    (700 under 512 -> [350, 350]; 1030 -> [344, 343, 343]).

    The rule of aihwkit's ``TileModuleArray.get_split_sizes`` (aihwkit 1.1.0, simulator/tiles/array.py), which
    ``tiles.split_sizes`` calls; restated here so that costing a placement does not import aihwkit (seconds).
    tests/test_energy.py checks it against aihwkit's own TileModuleArray."""
    if tile <= 0:
        return [size]
    n = (size + tile - 1) // tile
    base, extra = divmod(size, n)
    return [base + (i < extra) for i in range(n)]


def tiles_of(rows: int, cols: int, tile: int) -> int:
    """Tiles a ``[rows (out), cols (in)]`` matrix occupies."""
    return len(tile_split(rows, tile)) * len(tile_split(cols, tile))


# ------------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class DenseModule:
    """A densely activated module: its weight matrices ``(rows = out, cols = in)`` and its depth on AIMC
    (sequential tile passes per token: 1 for one matrix, 2 otherwise, e.g. q/k/v then o)."""
    kind: str
    name: str
    matrices: tuple
    depth: int


@dataclass(frozen=True)
class ExpertLayer:
    """The routed experts of one MoE layer: E, top-k and one expert's matrices as hetmoe tiles them."""
    num_experts: int
    top_k: int
    matrices: tuple

    @property
    def expert_params(self) -> int:
        return sum(r * c for r, c in self.matrices)


@dataclass(frozen=True)
class ModelShapes:
    """The matrix shapes a cost needs — no weights. ``total_params`` counts every parameter (embeddings, norms).

    The results store keeps them per model fingerprint (``Store.put_model_shapes``, written as a model's results
    are computed; ``keep_shapes``), so costing stored results (``run_costs``: the report, the Results page) never
    builds the model."""
    source: str
    dense: tuple
    moe: tuple
    total_params: int

    @property
    def num_experts(self) -> tuple:
        return tuple(m.num_experts for m in self.moe)

    def to_dict(self) -> dict:
        """JSON-able form (``from_dict`` gives back an equal ModelShapes): matrices as [rows, cols] lists."""
        return {"source": self.source, "total_params": self.total_params,
                "dense": [{"kind": m.kind, "name": m.name, "matrices": [list(x) for x in m.matrices],
                           "depth": m.depth} for m in self.dense],
                "moe": [{"num_experts": m.num_experts, "top_k": m.top_k, "matrices": [list(x) for x in m.matrices]}
                        for m in self.moe]}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelShapes":
        """The ModelShapes of ``to_dict``'s output. Raises ValueError naming what is missing or malformed (a
        matrix is [rows, cols] of two integers >= 1; counts are integers >= 1)."""
        def count(v, what):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be an integer >= 1, got {v!r}")
            return v

        def mats(v, what):
            if not isinstance(v, list) or not v or not all(isinstance(x, list) and len(x) == 2 for x in v):
                raise ValueError(f"{what} must be a non-empty list of [rows, cols] pairs")
            return tuple((count(r, what), count(c, what)) for r, c in v)
        try:
            dense = tuple(DenseModule(str(m["kind"]), str(m["name"]), mats(m["matrices"], f"dense {m['name']}"),
                                      count(m["depth"], "depth")) for m in d["dense"])
            moe = tuple(ExpertLayer(count(m["num_experts"], "num_experts"), count(m["top_k"], "top_k"),
                                    mats(m["matrices"], "expert matrices")) for m in d["moe"])
            return cls(str(d["source"]), dense, moe, count(d["total_params"], "total_params"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"model shapes lack or mistype {e}") from None


def shapes_of(model, anatomy, source: str = "") -> ModelShapes:
    """Matrix shapes of a transformers MoE model (real or on the meta device) and its ``models.Anatomy``.

    Dense modules: every 2-D ``weight`` (not an embedding table) inside the anatomy's modules of each dense kind;
    a tied LM head is the embedding matrix ``[V, H]``. Experts: fused gate/up ``[(2 if gated)·I, H]`` and down
    ``[H, I]``, the layout hetmoe's analog backends tile."""
    from torch import nn
    dense = []
    for kind in DENSE_KINDS:
        for name in anatomy.modules.get(kind, ()):
            mod = model.get_submodule(name)
            mats = tuple((int(m.weight.shape[0]), int(m.weight.shape[1])) for m in mod.modules()
                         if not isinstance(m, nn.Embedding) and isinstance(getattr(m, "weight", None), nn.Parameter)
                         and m.weight.dim() == 2)
            if mats:
                dense.append(DenseModule(kind, name, mats, 1 if len(mats) == 1 else 2))
    moe = tuple(ExpertLayer(m.num_experts, m.top_k, (((2 if m.gated else 1) * m.intermediate_size, m.hidden_size),
                                                     (m.hidden_size, m.intermediate_size)))
                for m in anatomy.moe_layers)
    return ModelShapes(source, tuple(dense), moe, int(anatomy.total_params))


def meta_model(config):
    """A transformers causal LM built from ``config`` on the meta device: shapes only, no memory for weights."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _config_of(source: str):
    from transformers import AutoConfig, PretrainedConfig
    from .hosts import host_for
    from .models import resolve_source, tiny_config
    kind, where = resolve_source(source)
    if kind == "tiny":
        return tiny_config(where)
    try:
        cfg = PretrainedConfig.get_config_dict(where)[0]
    except OSError as e:
        raise ValueError(f"no config for {source!r} ({str(e).splitlines()[0]}); energy needs the model's "
                         "config.json (a local folder, or a hub id with the hub reachable)") from None
    host = host_for(cfg)
    return host.config if host else AutoConfig.from_pretrained(where)


@functools.lru_cache(maxsize=16)
def shapes_from_source(source: str) -> tuple[ModelShapes, object]:
    """(ModelShapes, Anatomy) of a model source from its config alone (meta device: no weights read or allocated).

    Raises ValueError when the source's config cannot be read or the model has no routed experts."""
    from .models import anatomy_of
    model = meta_model(_config_of(source))
    anatomy = anatomy_of(model)
    return shapes_of(model, anatomy, source), anatomy


def keep_shapes(store, lm) -> bool:
    """Store the shapes of a loaded ``models.LoadedModel`` under its fingerprint, once (``Store.put_model_shapes``,
    append-only; a store object without that method, e.g. an older outbox, is skipped). Returns True when written.
    evaluate calls it as it computes results, so ``run_costs`` reads them instead of building the model."""
    put = getattr(store, "put_model_shapes", None)
    if put is None:
        return False
    return put(lm.fingerprint, lm.source, shapes_of(lm.model, lm.anatomy, lm.source).to_dict())


def stored_shapes(store, model_fingerprint: str, source: str | None = None) -> ModelShapes | None:
    """The ModelShapes stored for ``model_fingerprint`` (None when the store holds none: a store or snapshot made
    before hetmoe stored them, or results put there without computing them), labelled ``source`` when given (a
    cost does not depend on the label). Raises ValueError when the stored JSON is malformed."""
    d = store.get_model_shapes(model_fingerprint)
    if d is None:
        return None
    return ModelShapes.from_dict(d if source is None else {**d, "source": source})


OLMOE_1B_7B = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                   tie_word_embeddings=False, max_position_embeddings=4096)
"""OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924) dimensions. transformers' OlmoeConfig defaults carry all of them except
the expert width (its default 2048; the checkpoint's 1024 gives the model's 6.92e9 parameters)."""


@functools.lru_cache(maxsize=1)
def olmoe_1b_7b():
    """(ModelShapes, Anatomy) of OLMoE-1B-7B built on the meta device from ``OLMOE_1B_7B`` (nothing allocated)."""
    from transformers import AutoConfig
    from .models import anatomy_of
    model = meta_model(AutoConfig.for_model("olmoe", **OLMOE_1B_7B))
    anatomy = anatomy_of(model)
    return shapes_of(model, anatomy, "OLMoE-1B-7B (config)"), anatomy


# ------------------------------------------------------------------------------------------------- cost
@dataclass(frozen=True)
class Cost:
    """What one placement costs on one hardware at batch B (decode, per token unless said otherwise)."""
    hardware: str
    batch: int
    routing: str                 # "measured" (ActivationStats) or "uniform" (top-k / E)
    energy_per_token_j: float    # J per token
    tokens_per_s: float          # tokens/s of the whole system at batch B
    latency_s: float             # s per decode step (each token of the batch waits this long)
    energy_j: dict               # J per token by part: hbm, digital_mac, analog_tile, periphery
    time_s: dict                 # s per step by part: digital_dense, analog_dense, experts
    digital_bound: str           # "memory" | "compute" | "none": which roofline limits the digital part
    tiles: int                   # AIMC tiles the analog matrices occupy
    chips: int                   # AIMC chips (ceil(tiles / tiles per chip))
    tile_utilization: float      # weights on tiles / tile cells
    tile_mvms_per_token: float   # tile MVMs per token (expected, routing-weighted)
    digital_bytes: int           # bytes of weights in digital memory (digital modules, embeddings, norms)
    accelerators: int            # digital accelerators needed to hold digital_bytes
    analog_params: int           # weights on tiles

    @property
    def tokens_per_j(self) -> float:
        return 1.0 / self.energy_per_token_j if self.energy_per_token_j > 0 else math.inf

    def to_dict(self, citations: dict | None = None) -> dict:
        d = dataclasses.asdict(self)
        d["tokens_per_j"] = self.tokens_per_j
        if citations is not None:
            d["citations"] = citations
        return d


def check_batch(batch) -> int:
    """Batch size as an int >= 1. Raises ValueError saying what to give."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1 (tokens decoded together per step), got {batch!r}")
    return int(batch)


def routing_frequency(shapes: ModelShapes, stats=None) -> tuple[list[np.ndarray], str]:
    """(p per MoE layer [E_l], "measured" | "uniform"): share of tokens routed to each expert.

    stats: ``routing.ActivationStats`` (its ``frequency``, rows sum to top-k), an ``[L][E]`` array-like, or None
    (uniform top-k / E). Raises ValueError when its layers or experts do not match the model."""
    if stats is None:
        return [np.full(m.num_experts, m.top_k / m.num_experts) for m in shapes.moe], "uniform"
    f = stats.frequency if hasattr(stats, "frequency") else stats
    rows = [np.asarray(r, dtype=float) for r in f]
    if len(rows) != len(shapes.moe) or any(len(r) < m.num_experts for r, m in zip(rows, shapes.moe)):
        raise ValueError("routing statistics do not match the model's MoE layers and experts")
    return [np.clip(r[:m.num_experts], 0.0, 1.0) for r, m in zip(rows, shapes.moe)], "measured"


class _Ledger:
    """Running totals of one placement on one hardware at batch B: energy (J per token) by part, digital roofline
    times (s per step) and tile MVMs per token."""

    def __init__(self, hw: Hardware, batch: int):
        d, a = hw.digital, hw.analog
        self.B, self.T, self.wb = batch, a.tile_size, d.weight_bytes
        self.e_byte, self.e_mac = d.hbm_energy * 1e-12, d.mac_energy * 1e-12
        self.e_amac, self.e_out = a.mac_energy_pj * 1e-12, a.periphery_energy * 1e-12
        self.bw, self.peak = d.hbm_bandwidth * 1e12, d.peak_macs
        self.energy = dict(hbm=0.0, digital_mac=0.0, analog_tile=0.0, periphery=0.0)
        self.memory_s = self.compute_s = self.mvms = 0.0

    def digital(self, params_step: float, macs_token: float) -> float:
        """Weights fetched once per step, MACs per token; returns the part's roofline time (s per step)."""
        self.energy["hbm"] += params_step * self.wb * self.e_byte / self.B
        self.energy["digital_mac"] += macs_token * self.e_mac
        mem, comp = params_step * self.wb / self.bw, self.B * macs_token / self.peak
        self.memory_s, self.compute_s = self.memory_s + mem, self.compute_s + comp
        return max(mem, comp)

    def analog(self, matrices, tokens: float) -> None:
        """``tokens`` tokens per generated token (a routing share) through these matrices on tiles."""
        for r, c in matrices:
            self.energy["analog_tile"] += tokens * r * c * self.e_amac
            self.energy["periphery"] += tokens * len(tile_split(c, self.T)) * r * self.e_out
            self.mvms += tokens * tiles_of(r, c, self.T)

    @property
    def bound(self) -> str:
        if not (self.memory_s or self.compute_s):
            return "none"
        return "memory" if self.memory_s >= self.compute_s else "compute"


def cost(shapes: ModelShapes, placement, hardware: Hardware | str | None = None, batch: int = 1,
         stats=None) -> Cost:
    """Energy per token, throughput, latency, tiles, chips and digital memory of ``placement`` (module docstring).

    shapes: ``shapes_of`` / ``shapes_from_source``; placement: ``placement.Placement`` of the same model;
    hardware: a ``Hardware`` or preset name (default ``h100+pcm``); batch: tokens per decode step (>= 1);
    stats: routing frequencies (``routing_frequency``). Units: J, s, bytes.
    Raises ValueError for batch < 1, an unknown hardware, or a placement / statistics for another model."""
    hw = get_hardware(hardware or DEFAULT_HARDWARE) if not isinstance(hardware, Hardware) else hardware
    B = check_batch(batch)
    if tuple(placement.num_experts) != shapes.num_experts:
        raise ValueError(f"placement is for experts per layer {placement.num_experts}, the model has "
                         f"{shapes.num_experts}")
    freq, routing = routing_frequency(shapes, stats)
    T, t_mvm = hw.analog.tile_size, hw.analog.mvm_latency * 1e-9
    led = _Ledger(hw, B)
    t = dict(digital_dense=0.0, analog_dense=0.0, experts=0.0)     # s per step
    tiles = cells = dig_dense = 0
    for m in shapes.dense:
        if placement.dense.is_digital(m.kind):
            dig_dense += sum(r * c for r, c in m.matrices)
        else:                               # B tokens pass the module's tiles one after another, d stages piped
            led.analog(m.matrices, 1.0)
            tiles += sum(tiles_of(r, c, T) for r, c in m.matrices)
            cells += sum(r * c for r, c in m.matrices)
            t["analog_dense"] += (B + m.depth - 1) * t_mvm
    if dig_dense:
        t["digital_dense"] = led.digital(dig_dense, dig_dense)
    for layer, p, dig in zip(shapes.moe, freq, placement.digital):
        per = layer.expert_params
        on = np.zeros(layer.num_experts, dtype=bool)
        on[list(dig)] = True
        t_dig = t_ana = 0.0
        if on.any():                        # an expert's weights are fetched when any of the B tokens picks it
            t_dig = led.digital(float((1.0 - (1.0 - p[on]) ** B).sum()) * per, float(p[on].sum()) * per)
        if (~on).any():                     # busiest analog expert: n tokens through 2 piped stages, n + 1 MVMs
            led.analog(layer.matrices, float(p[~on].sum()))
            tiles += int((~on).sum()) * tiles_of_expert(layer, T)
            cells += int((~on).sum()) * per
            t_ana = (max(1.0, B * float(p[~on].max())) + 1) * t_mvm
        t["experts"] += max(t_dig, t_ana)   # digital and analog experts of a layer work at the same time
    step = sum(t.values())
    digital_bytes = int(round((shapes.total_params - cells) * hw.digital.weight_bytes))
    return Cost(hardware=hw.name, batch=B, routing=routing, energy_per_token_j=sum(led.energy.values()),
                tokens_per_s=B / step if step > 0 else math.inf, latency_s=step, energy_j=led.energy, time_s=t,
                digital_bound=led.bound, tiles=tiles, chips=math.ceil(tiles / hw.analog.tiles_per_chip),
                tile_utilization=cells / (tiles * T * T) if tiles else 0.0, tile_mvms_per_token=led.mvms,
                digital_bytes=digital_bytes, accelerators=math.ceil(digital_bytes / (hw.digital.memory_gb * 1e9)),
                analog_params=cells)


def tiles_of_expert(layer: ExpertLayer, tile: int) -> int:
    """Tiles one expert of ``layer`` occupies (fused gate/up plus down)."""
    return sum(tiles_of(r, c, tile) for r, c in layer.matrices)


BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Batch sizes the dashboard offers (tokens decoded together per step)."""
REFERENCE_LABELS = {"all_digital": "all digital", "dense_only_digital": "dense digital, experts analog",
                    "all_analog": "all analog"}


def reference_placements(shapes: ModelShapes) -> dict:
    """The limits a placement sits between: {"all_digital", "dense_only_digital" (every routed expert analog,
    dense modules digital: budget 0), "all_analog" (every matrix on tiles)} as ``Placement`` objects."""
    from .placement import DensePolicy, Placement
    ne = shapes.num_experts
    return {"all_digital": Placement("all_digital", 1.0, "layer", 0, ne, tuple(tuple(range(e)) for e in ne)),
            "dense_only_digital": Placement("all_analog", 0.0, "layer", 0, ne, tuple(() for _ in ne)),
            "all_analog": Placement("all_analog", 0.0, "layer", 0, ne, tuple(() for _ in ne),
                                    DensePolicy(**{k: False for k in DENSE_KINDS}))}


def energy_block(shapes: ModelShapes, placement, hardware: Hardware | str | None = None, batch: int = 1,
                 stats=None) -> dict:
    """JSON-able block for the CLI and reports: this placement's cost, the references' headline figures and the
    citations of every hardware figure. Raises ValueError as ``cost``."""
    hw = get_hardware(hardware or DEFAULT_HARDWARE) if not isinstance(hardware, Hardware) else hardware
    c = cost(shapes, placement, hw, batch, stats)
    refs = {n: cost(shapes, p, hw, batch, stats) for n, p in reference_placements(shapes).items()}
    return {**c.to_dict(hw.citations()),
            "references": {n: {k: getattr(r, k) for k in ("energy_per_token_j", "tokens_per_s", "tiles", "chips")}
                           for n, r in refs.items()},
            "hardware_config": hw.to_dict()}


# ---------------------------------------------------------------------------------------- accuracy vs energy
def pareto_front(energy, score, higher_is_better: bool = True) -> np.ndarray:
    """Indices of the Pareto-optimal points (no other point has lower or equal energy and a better or equal score,
    one of them strictly), sorted by energy. energy, score: [N] arrays."""
    e, s = np.asarray(energy, float), np.asarray(score, float)
    s = s if higher_is_better else -s
    order = np.lexsort((-s, e))
    keep, best = [], -np.inf
    for i in order:
        if s[i] > best:
            keep.append(i)
            best = s[i]
    return np.array(keep, dtype=int)


def run_costs(store, model_fingerprint: str, hardware: Hardware | str | None = None, batch: int = 32):
    """Stored runs of one model (``store.runs_frame`` rows, one per run and metric) with their placement's
    ``energy_per_token_j``, ``tokens_per_s`` and ``tiles`` (columns added), routing measured when the store holds
    the model's activation statistics, else uniform. Labelled as the summary labels them (``summary.label_runs``):
    ``preset`` is the label an edited preset has on the Results page (``paper-pcm-c1.5 (adc_bits=6)``; the stored
    name in ``preset_name``) and ``config_id`` tells configurations apart as the summary's rows do.

    The model's shapes come from the store (``stored_shapes``: nothing heavy is imported); only a store or
    snapshot that holds none for the model (made before hetmoe stored them) has them built from the model's config
    on the meta device (``shapes_from_source``: imports torch and transformers), and the note says so.
    Returns (DataFrame, note) — the frame is None with a note saying why when the shapes are neither stored nor
    buildable (the model's config cannot be read)."""
    import json
    from .placement import Placement
    runs = store.runs_frame({"model_fingerprint": model_fingerprint})
    if runs.empty:
        return None, "no stored runs"
    placements, bad = {}, 0
    for k, js in store.placements_frame(runs.placement_key.dropna().unique().tolist())[["key", "placement"]].values:
        try:
            placements[k] = Placement.from_json(js)
        except ValueError:
            bad += 1
    if not placements:   # nothing to price: do not build the model's shapes (that imports transformers)
        return None, "no stored placement is readable"
    source, built = str(runs.model_source.iloc[0]), ""
    try:
        shapes = stored_shapes(store, model_fingerprint, source)
    except ValueError as e:
        shapes, built = None, f"stored shapes unreadable ({e})"
    if shapes is None:   # a store from before the model_shapes table: the config on the meta device
        try:
            shapes, _ = shapes_from_source(source)
        except ValueError as e:
            return None, f"energy needs the model's config: {e}"
        built = "; model shapes built from its config: " + (built or "the store holds none for this model "
                                                              "(made before hetmoe stored them)")
    stats = store.query("SELECT stats FROM expert_stats WHERE model_fingerprint = ? AND name LIKE 'activation:%' "
                        "ORDER BY created_at DESC LIMIT 1", [model_fingerprint])
    freq = json.loads(stats.stats.iloc[0])["frequency"] if len(stats) else None
    rows = {}
    for k, p in placements.items():
        try:   # a placement stored for another shape of the model gets no energy, not an error
            c = cost(shapes, p, hardware, batch, freq)
        except ValueError:
            bad += 1
            continue
        rows[k] = (c.energy_per_token_j, c.tokens_per_s, c.tiles)
    cols = np.array([rows.get(k, (np.nan, np.nan, 0)) for k in runs.placement_key], dtype=float).reshape(-1, 3)
    from .summary import label_runs
    out = label_runs(runs.assign(energy_per_token_j=cols[:, 0], tokens_per_s=cols[:, 1], tiles=cols[:, 2]))
    note = f"{'measured' if freq is not None else 'uniform'} routing, batch {batch}"
    return out, note + built + (f"; {bad} placement(s) do not fit the model's config: left out" if bad else "")


CONFIG_COLUMNS = ("task", "metric", "limit", "strategy", "budget", "scope", "preset", "backend")


def config_points(runs):
    """One point per configuration from ``run_costs`` rows: mean, sample std and number of seeds of the metric,
    the placement's energy_per_token_j and tokens_per_s (equal across seeds unless the random strategy draws a
    new placement per seed: then their mean). Configurations are told apart as the Results table's rows are: by
    CONFIG_COLUMNS and, when the rows carry it (``run_costs`` output), ``config_id`` (the whole config minus the
    seed), so an edited preset never averages with the preset it was edited from. Rows without a value or an
    energy are dropped (``unpriced`` lists them)."""
    import pandas as pd
    keys = [*CONFIG_COLUMNS, *(["config_id"] if "config_id" in runs else [])]
    r = runs.dropna(subset=["value", "energy_per_token_j"])
    if r.empty:
        return pd.DataFrame(columns=[*keys, "mean", "std", "n_seeds", "energy_per_token_j", "tokens_per_s"])
    g = r.groupby(keys, dropna=False, sort=True)
    return g.agg(mean=("value", "mean"), std=("value", "std"), n_seeds=("value", "size"),
                 energy_per_token_j=("energy_per_token_j", "mean"),
                 tokens_per_s=("tokens_per_s", "mean")).reset_index()


def unpriced(runs) -> list[str]:
    """The configurations among ``run_costs`` rows that have a value but no energy (their placement is missing
    from the store or does not fit the model's shapes), as "strategy budget% preset" lines, sorted: what the
    accuracy-vs-energy chart leaves out, for its note."""
    r = runs[runs["value"].notna() & runs["energy_per_token_j"].isna()]
    return sorted({f"{s} {b * 100:g}% {p}" for s, b, p in zip(r.strategy, r.budget, r.preset)})


# ---------------------------------------------------------------------------------------- Table 2 reference
PAPER_TABLE2 = (("all-analog", 0.0, "58.45 ± 0.15"), ("dense-only digital", 5.37, "60.73 ± 0.10"),
                ("dense + 25% experts digital", 28.65, "61.82 ± 0.06"), ("all-digital", 100.0, "63.17"))
"""arXiv 2603.02633 Table 2 (OLMoE, batch 32, c = 1.5) as quoted by digests: configuration, digital share (%),
zero-shot average accuracy. Its throughput and tokens/(W·s) columns are scrambled in the digests: not quoted."""


def table2(hardware: Hardware | str | None = None, batch: int = 32) -> list[dict]:
    """The four Table-2 configurations on OLMoE-1B-7B shapes: [{configuration, paper_digital_share_pct,
    digital_share_pct, paper_accuracy, energy_per_token_j, tokens_per_j, tokens_per_s, tiles, chips,
    digital_bytes}], uniform routing (any 25% of the experts cost the same)."""
    from .placement import Placement, digital_share
    shapes, anatomy = olmoe_1b_7b()
    refs = reference_placements(shapes)
    ne = shapes.num_experts
    quarter = Placement("first", 0.25, "layer", 0, ne, tuple(tuple(range(round(0.25 * e))) for e in ne))
    placements = (refs["all_analog"], refs["dense_only_digital"], quarter, refs["all_digital"])
    out = []
    for (name, paper_share, acc), p in zip(PAPER_TABLE2, placements):
        c = cost(shapes, p, hardware, batch)
        out.append({"configuration": name, "paper_digital_share_pct": paper_share,
                    "digital_share_pct": 100 * digital_share(p, anatomy)["digital_share"], "paper_accuracy": acc,
                    "energy_per_token_j": c.energy_per_token_j, "tokens_per_j": c.tokens_per_j,
                    "tokens_per_s": c.tokens_per_s, "tiles": c.tiles, "chips": c.chips,
                    "digital_bytes": c.digital_bytes})
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m hetmoe_core.energy [hardware] [batch]``: print the Table-2 comparison (``table2``). Bad input
    prints one line on stderr saying what to pass and returns 2 (the main CLI's convention), else 0."""
    import sys
    args = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: python -m hetmoe_core.energy [HARDWARE] [BATCH]; HARDWARE one of {', '.join(HARDWARE)}, " \
            "BATCH an integer >= 1 (default 32)"
    hw = args[0] if args else DEFAULT_HARDWARE
    batch = args[1] if len(args) > 1 else "32"
    if len(args) > 2 or hw in ("-h", "--help"):
        print(usage, file=sys.stderr)
        return 0 if hw in ("-h", "--help") else 2
    if hw not in HARDWARE:
        print(f"error: unknown hardware {hw!r}; choose one of {', '.join(HARDWARE)}", file=sys.stderr)
        return 2
    if not batch.isdigit() or int(batch) < 1:
        print(f"error: batch must be an integer >= 1 (tokens per step), got {batch!r}; "
              f"e.g. python -m hetmoe_core.energy {hw} 32", file=sys.stderr)
        return 2
    for r in table2(hw, int(batch)):
        print(f"{r['configuration']:<30} paper {r['paper_digital_share_pct']:6.2f}%  hetmoe "
              f"{r['digital_share_pct']:6.2f}%  acc {r['paper_accuracy']:<13} {r['tokens_per_j']:9.3g} tokens/J  "
              f"{r['tokens_per_s']:9.3g} tokens/s  {r['tiles']:6d} tiles  {r['chips']:5d} chips")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
