"""Coverage: which module of a model runs on analog tiles and which stays digital, checked against the placement.

``analog()`` builds a ``CoverageReport`` before it changes any weight: every parameter is listed once, under the
module that holds it, as analog or digital, and the analog parameter count must equal the placement's analog share
(``placement.digital_share``); a mismatch raises instead of silently simulating another placement.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .models import is_norm, param_owner
from .placement import DENSE_KINDS
from .tiles import _tiles


@dataclass(frozen=True)
class ModuleCoverage:
    """One module of the model: where it runs and how many parameters it holds."""
    name: str
    kind: str
    state: str          # "analog" | "digital"
    params: int
    tiles: int = 0      # AIMC tiles its matrices occupy (0 when digital)
    note: str = ""


@dataclass
class CoverageReport:
    """Every module listed as analog or digital, checked against the placement.

    ``analog_params`` counts parameters of modules run on tiles (tile matrices plus their digital
    periphery: biases); ``expected_analog_params`` is the placement's analog share computed from
    the anatomy's parameter counts; ``clean_copy_bytes`` is the memory kept for exact restore.
    """
    backend: str
    seed: int
    noise: dict
    placement_key: str
    modules: list[ModuleCoverage] = field(default_factory=list)
    analog_params: int = 0
    digital_params: int = 0
    expected_analog_params: int = 0
    total_params: int = 0
    tiles: int = 0
    clean_copy_bytes: int = 0
    estimated_bytes: int = 0
    calibration_key: str = ""

    @property
    def analog_share(self) -> float:
        """Analog parameters / all parameters."""
        return self.analog_params / max(self.total_params, 1)

    def summary(self) -> dict:
        """JSON-able summary (no per-module rows)."""
        return {"backend": self.backend, "seed": self.seed, "noise": self.noise, "placement_key": self.placement_key,
                "analog_params": self.analog_params, "digital_params": self.digital_params,
                "expected_analog_params": self.expected_analog_params, "total_params": self.total_params,
                "analog_share": self.analog_share, "tiles": self.tiles, "clean_copy_bytes": self.clean_copy_bytes,
                "calibration_key": self.calibration_key,
                "analog_modules": sum(m.state == "analog" for m in self.modules),
                "digital_modules": sum(m.state == "digital" for m in self.modules)}

def _mvm_units(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """Matrix-vector-multiply units of a dense module: its nn.Linear submodules, or the module
    itself when it holds a 2-D ``weight`` (routers computing ``F.linear(x, self.weight)``)."""
    lins = [(f"{prefix}.{n}" if n else prefix, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if lins:
        return lins
    w = getattr(module, "weight", None)
    if isinstance(w, nn.Parameter) and w.dim() == 2 and not isinstance(module, nn.Embedding):
        return [(prefix, module)]
    return []

def _dense_analog_units(model, anatomy, placement):
    """(name, kind, module) of every MVM unit in a dense module the placement puts on analog."""
    dense = placement.dense
    out = []
    for kind in DENSE_KINDS:
        if dense.is_digital(kind):
            continue  # True = digital
        for mname in anatomy.modules.get(kind, ()):
            for uname, unit in _mvm_units(model.get_submodule(mname), mname):
                out.append((uname, kind, unit))
    return out


_MEMO_SIZE = 64   # placements whose rows an anatomy keeps (a sweep revisits each once per seed and preset)


def _coverage(model, anatomy, placement, noise, seed, backend, dense_units) -> CoverageReport:
    """Build the report and check it: analog params == the placement's analog share.

    The rows depend only on the model's modules, the placement and the tile size (and, for a router's note,
    whether converters act): they are kept on the anatomy for its last ``_MEMO_SIZE`` placements, as listing every
    module costs a few ms, a tenth of a small result's forward pass. The sums over the rows and the check are
    kept with them (each depends on the rows, the anatomy and the placement's dense policy alone), and the noise
    config's dict per config (``NoiseConfig.to_dict``: ``dataclasses.asdict`` of every field): together ~0.3 ms
    per entered placement, measured (``bench/bench_overhead.py``'s steady state runs one per result)."""
    memo = anatomy.__dict__.setdefault("_coverage_memo", {})
    nkey = ("noise", noise)
    if nkey not in memo:
        memo[nkey] = noise.to_dict()   # every field a scalar: a shallow copy per report is the dict to_dict gives
    rep = CoverageReport(backend=backend, seed=seed, noise=dict(memo[nkey]),
                         placement_key=str(getattr(placement, "key", "")))
    key = (placement.num_experts, placement.digital, placement.dense, noise.tile_size, noise.io_active,
           tuple(id(u) for _, _, u in dense_units))
    if key not in memo:
        rows, expected = _rows(model, anatomy, placement, noise, dense_units)
        first = CoverageReport(backend=backend, seed=seed, noise={}, placement_key="", modules=list(rows),
                               expected_analog_params=expected)
        first.analog_params = sum(r.params for r in rows if r.state == "analog")
        first.digital_params = sum(r.params for r in rows if r.state == "digital")
        first.total_params = first.analog_params + first.digital_params
        first.tiles = sum(r.tiles for r in rows)
        _check(first, anatomy, placement, dense_units)   # raises: nothing kept
        memo[key] = (rows, expected, first.analog_params, first.digital_params, first.tiles)
        while len(memo) > _MEMO_SIZE:
            memo.pop(next(iter(memo)))
    rows, rep.expected_analog_params, rep.analog_params, rep.digital_params, rep.tiles = memo[key]
    rep.modules = list(rows)
    rep.total_params = rep.analog_params + rep.digital_params
    return rep


def _rows(model, anatomy, placement, noise, dense_units) -> tuple[tuple, int]:
    """(every module's ModuleCoverage row, the placement's analog parameter count).

    The rows after the experts' (dense units, their periphery, every digital module) depend on the dense policy,
    tile size, converters and dense units alone, not on which experts are analog (the expert rows list every
    expert parameter whatever the placement): they are kept on the anatomy per those (``_MEMO_SIZE``). Walking
    the model for them took ~1.9 ms of the ~2.2 ms a new placement's rows cost (measured), and a sweep at a new
    seed meets new placements (a random strategy's at each budget) with the same dense policy."""
    counted: set[int] = set()   # ids of parameters already listed: each is listed once
    rows = _expert_rows(anatomy, placement, noise.tile_size, counted)
    memo = anatomy.__dict__.setdefault("_coverage_rest", {})
    key = (placement.dense, noise.tile_size, noise.io_active, tuple(id(u) for _, _, u in dense_units))
    if key not in memo:
        owner = param_owner(model, anatomy.modules)
        rest = _dense_rows(model, anatomy, placement, noise, dense_units, owner, counted)
        rest += _digital_rows(model, {id(u) for _, _, u in dense_units}, owner, counted)
        memo[key] = tuple(rest)
        while len(memo) > _MEMO_SIZE:
            memo.pop(next(iter(memo)))
    rows += memo[key]
    # the placement's analog share (placement.digital_share: analog experts + analog dense kinds)
    from .placement import digital_share
    return tuple(rows), digital_share(placement, anatomy)["analog_params"]


def _expert_rows(anatomy, placement, ts: int, counted: set) -> list[ModuleCoverage]:
    """Routed experts: one row per expert (its share of the layer's fused tensors)."""
    rows = []
    for m in anatomy.moe_layers:
        an = set(placement.analog_experts(m.index))
        per = sum(p.numel() for p in m.experts.parameters()) // m.num_experts
        O_in, I_in = (2 if m.gated else 1) * m.intermediate_size, m.hidden_size
        tiles = _tiles(O_in, I_in, ts) + _tiles(m.hidden_size, m.intermediate_size, ts)
        for e in range(m.num_experts):
            a = e in an
            rows.append(ModuleCoverage(f"{m.experts_name}[{e}]", "routed_experts", "analog" if a else "digital",
                                       per, tiles if a else 0))
        counted |= {id(p) for p in m.experts.parameters()}
    return rows


def _dense_rows(model, anatomy, placement, noise, dense_units, owner: dict, counted: set) -> list[ModuleCoverage]:
    """Dense MVM units placed analog, then the non-matrix parameters (periphery) of analog dense modules."""
    rows, ts = [], noise.tile_size
    for uname, kind, unit in dense_units:
        own = [p for p in unit.parameters(recurse=False) if id(p) not in counted]
        note = ""
        if any(owner.get(id(p)) != kind for p in own):
            note = "weight tied to the embeddings: the table is this matrix, counted here (as digital_share does)"
        if kind == "router" and noise.io_active:
            note = "router: weight noise and DAC simulated; its output is consumed inside, no ADC"
        O, I = unit.weight.shape
        rows.append(ModuleCoverage(uname, kind, "analog", sum(p.numel() for p in own), _tiles(O, I, ts), note))
        counted |= {id(p) for p in own}
    for kind in DENSE_KINDS:
        if placement.dense.is_digital(kind):
            continue
        for mname in anatomy.modules.get(kind, ()):
            rest = [p for p in model.get_submodule(mname).parameters()
                    if id(p) not in counted and owner.get(id(p)) == kind]
            if rest:
                rows.append(ModuleCoverage(mname, kind, "analog", sum(p.numel() for p in rest), 0,
                                           "periphery of an analog module (not a matrix): computed digitally"))
                counted |= {id(p) for p in rest}
    return rows


_DIGITAL_NOTES = {"embeddings": "table lookup: no matrix-vector product", "norms": "element-wise: no matrix-vector product",
                  "other": "not mapped to tiles"}


def _digital_rows(model, unit_ids: set, owner: dict, counted: set) -> list[ModuleCoverage]:
    """Everything else: digital (by placement, or not an MVM: embeddings, norms, ...)."""
    rows = []
    for name, mod in model.named_modules():
        if id(mod) in unit_ids:
            continue
        params = [p for p in mod.parameters(recurse=False) if id(p) not in counted]
        if not params:
            continue
        counted |= {id(p) for p in params}
        kinds = sorted({owner.get(id(p), "norms" if is_norm(mod) else "other") for p in params})
        note = _DIGITAL_NOTES.get(kinds[0], "digital by placement") if len(kinds) == 1 else ""
        rows.append(ModuleCoverage(name, "/".join(kinds), "digital", sum(p.numel() for p in params), 0, note))
    return rows


def _check(rep: CoverageReport, anatomy, placement, dense_units) -> None:
    """RuntimeError naming every mismatch between the listed modules, the anatomy and the placement."""
    problems = []
    if rep.total_params != anatomy.total_params:
        problems.append(f"{rep.total_params} parameters listed but the anatomy counts {anatomy.total_params}")
    if rep.analog_params != rep.expected_analog_params:
        problems.append(f"{rep.analog_params} analog parameters but the placement's analog share is "
                        f"{rep.expected_analog_params}")
    for kind in DENSE_KINDS:
        if not placement.dense.is_digital(kind) and anatomy.param_counts.get(kind, 0):
            if not any(k == kind for _, k, _ in dense_units):
                problems.append(f"{kind} placed analog but none of its modules has a matrix to put on tiles")
    if problems:
        raise RuntimeError("analog coverage does not match the placement: " + "; ".join(problems))
