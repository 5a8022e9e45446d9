"""Coverage: which module of a model runs on analog tiles and which stays digital, checked against the placement.

``analog()`` builds a ``CoverageReport`` before it changes any weight: every parameter is listed once, under the
module that holds it, as analog or digital, and the analog parameter count must equal the placement's analog share
(``placement.digital_share``); a mismatch raises instead of silently simulating another placement.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .tiles import _tiles

_POLICY_KINDS = {"attention": "attention", "lm_head": "lm_head", "shared_experts": "shared_experts",
                 "router": "router", "dense_mlp": "dense_mlp"}  # DensePolicy field -> anatomy kind


@dataclass
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

def _is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower()


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
    for field_name, kind in _POLICY_KINDS.items():
        if getattr(dense, field_name, True):
            continue  # True = digital
        for mname in anatomy.modules.get(kind, ()):
            for uname, unit in _mvm_units(model.get_submodule(mname), mname):
                out.append((uname, kind, unit))
    return out

def _param_owner(model, anatomy) -> dict[int, str]:
    """id(param) -> anatomy kind, with the anatomy's precedence (norms inside modules = norms)."""
    norm = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    owner: dict[int, str] = {}
    for kind in ("embeddings", "lm_head", "router", "routed_experts", "shared_experts", "dense_mlp", "attention"):
        for name in anatomy.modules.get(kind, ()):
            for p in model.get_submodule(name).parameters():
                owner.setdefault(id(p), "norms" if id(p) in norm else kind)
    return owner


def _coverage(model, anatomy, placement, noise, seed, backend, dense_units) -> CoverageReport:
    """Build the report and check it: analog params == the placement's analog share."""
    rep = CoverageReport(backend=backend, seed=seed, noise=noise.to_dict(),
                         placement_key=str(getattr(placement, "key", "")))
    owner = _param_owner(model, anatomy)
    counted: set[int] = set()
    ts = noise.tile_size
    # routed experts: one row per expert
    for m in anatomy.moe_layers:
        an = set(placement.analog_experts(m.index))
        per = sum(p.numel() for p in m.experts.parameters()) // m.num_experts
        O_in, I_in = (2 if m.gated else 1) * m.intermediate_size, m.hidden_size
        tiles = _tiles(O_in, I_in, ts) + _tiles(m.hidden_size, m.intermediate_size, ts)
        for e in range(m.num_experts):
            a = e in an
            rep.modules.append(ModuleCoverage(f"{m.experts_name}[{e}]", "routed_experts", "analog" if a else "digital",
                                              per, tiles if a else 0))
        counted |= {id(p) for p in m.experts.parameters()}
    # dense MVM units placed analog
    unit_ids = {id(u) for _, _, u in dense_units}
    for uname, kind, unit in dense_units:
        own = [p for p in unit.parameters(recurse=False) if id(p) not in counted]
        note = ""
        if any(owner.get(id(p)) != kind for p in own):
            note = "weight tied to the embeddings: the table is this matrix, counted here (as digital_share does)"
        if kind == "router" and noise.io_active:
            note = "router: weight noise and DAC simulated; its output is consumed inside, no ADC"
        O, I = unit.weight.shape
        rep.modules.append(ModuleCoverage(uname, kind, "analog", sum(p.numel() for p in own), _tiles(O, I, ts), note))
        counted |= {id(p) for p in own}
    for field_name, kind in _POLICY_KINDS.items():  # non-matrix parameters of analog modules
        if getattr(placement.dense, field_name, True):
            continue
        for mname in anatomy.modules.get(kind, ()):
            rest = [p for p in model.get_submodule(mname).parameters()
                    if id(p) not in counted and owner.get(id(p)) == kind]
            if rest:
                rep.modules.append(ModuleCoverage(mname, kind, "analog", sum(p.numel() for p in rest), 0,
                                                  "periphery of an analog module (not a matrix): computed digitally"))
                counted |= {id(p) for p in rest}
    # everything else: digital (by placement, or not an MVM: embeddings, norms, ...)
    for name, mod in model.named_modules():
        if id(mod) in unit_ids:
            continue
        params = [p for p in mod.parameters(recurse=False) if id(p) not in counted]
        if not params:
            continue
        counted |= {id(p) for p in params}
        kinds = sorted({owner.get(id(p), "norms" if _is_norm(mod) else "other") for p in params})
        note = {"embeddings": "table lookup: no matrix-vector product", "norms": "element-wise: no matrix-vector product",
                "other": "not mapped to tiles"}.get(kinds[0], "digital by placement") if len(kinds) == 1 else ""
        rep.modules.append(ModuleCoverage(name, "/".join(kinds), "digital", sum(p.numel() for p in params), 0, note))
    rep.analog_params = sum(r.params for r in rep.modules if r.state == "analog")
    rep.digital_params = sum(r.params for r in rep.modules if r.state == "digital")
    rep.total_params = rep.analog_params + rep.digital_params
    rep.tiles = sum(r.tiles for r in rep.modules)
    # the placement's analog share (placement.digital_share: analog experts + analog dense kinds)
    from .placement import digital_share
    exp = digital_share(placement, anatomy)["analog_params"]
    rep.expected_analog_params = exp
    problems = []
    if rep.total_params != anatomy.total_params:
        problems.append(f"{rep.total_params} parameters listed but the anatomy counts {anatomy.total_params}")
    if rep.analog_params != exp:
        problems.append(f"{rep.analog_params} analog parameters but the placement's analog share is {exp}")
    for field_name, kind in _POLICY_KINDS.items():
        if not getattr(placement.dense, field_name, True) and anatomy.param_counts.get(kind, 0):
            if not any(k == kind for _, k, _ in dense_units):
                problems.append(f"{kind} placed analog but none of its modules has a matrix to put on tiles")
    if problems:
        raise RuntimeError("analog coverage does not match the placement: " + "; ".join(problems))
    return rep
