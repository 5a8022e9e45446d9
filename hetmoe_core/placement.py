"""Which routed experts run digitally: an immutable, hashable Placement built from expert scores and a budget.

Paper setting (arXiv 2603.02633): a digital budget b in [0, 1] is the share of routed experts that run on digital
hardware; the experts with the highest score get it; densely activated modules (attention, LM head, shared experts,
router, dense MLP layers) stay digital. Embeddings are a table lookup: they live in digital memory but do no
matrix-vector work, so they count in the parameter total and never as digital compute.

Rounding: per-layer scope gives each MoE layer n = floor(b * E + 0.5) digital experts (round half up, so 0.125 * 4
experts = 0.5 -> 1); global scope gives n = floor(b * N + 0.5) for all N routed experts of the model, taken from
the top of one ranking across layers. Both counts are non-decreasing in b and the ranking is fixed (score
descending, ties to the lower MoE layer then the lower expert id), so a smaller budget's digital set is contained
in a larger one's.

Global scope compares raw scores across layers. This is meaningful for all strategies: MaxNNScore is a product
of weight norms in the same units everywhere and measures absolute noise amplification (a layer full of
large-norm experts *should* get more digital slots); Activation Frequency is a share of tokens (each layer's
row sums to top-k), Activation Weight a routing probability and Router Norm a norm of rows of same-shaped
matrices; random scores are i.i.d. Normalising per layer would make global placement collapse back to per-layer.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, fields

import numpy as np

from .strategies import STRATEGIES, get_strategy, strategy_scores

MEASURED_STRATEGIES = tuple(n for n, s in STRATEGIES.items() if s.needs == "measurement")
"""Strategies scored by measurement under a noise preset (``sensitivity.measured_scores``), from the registry."""
SCOPES = ("layer", "global")


@dataclass(frozen=True)
class DensePolicy:
    """Placement of the densely activated modules: True = digital (paper default: all digital)."""
    attention: bool = True
    lm_head: bool = True
    shared_experts: bool = True
    router: bool = True
    dense_mlp: bool = True

    def is_digital(self, kind: str) -> bool:
        if kind not in DENSE_KINDS:
            raise ValueError(f"unknown dense module kind {kind!r}; one of {', '.join(DENSE_KINDS)}")
        return bool(getattr(self, kind))


DENSE_KINDS = tuple(f.name for f in fields(DensePolicy))   # the densely activated module kinds, in policy order


@dataclass(frozen=True)
class Placement:
    """Digital routed experts per MoE layer (anatomy.moe_layers order) plus the dense-module policy.

    digital[i]: sorted ids of the digital experts of MoE layer i; num_experts[i]: E of that layer.
    ``seed`` matters only for strategy "random" (0 otherwise, so equal placements hash equal).
    Raises ValueError on construction for a budget outside [0, 1], an unknown scope, or bad expert ids.
    """
    strategy: str
    budget: float
    scope: str
    seed: int
    num_experts: tuple
    digital: tuple
    dense: DensePolicy = DensePolicy()

    def __post_init__(self):
        _check_budget(self.budget)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        ne = tuple(int(e) for e in self.num_experts)
        dig = tuple(tuple(sorted(int(x) for x in d)) for d in self.digital)
        if len(ne) != len(dig):
            raise ValueError(f"{len(dig)} digital sets for {len(ne)} MoE layers")
        for i, (e, d) in enumerate(zip(ne, dig)):
            if len(set(d)) != len(d) or (d and (d[0] < 0 or d[-1] >= e)):
                raise ValueError(f"MoE layer {i}: digital experts {d} must be distinct ids in 0..{e - 1}")
        object.__setattr__(self, "budget", float(self.budget))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "num_experts", ne)
        object.__setattr__(self, "digital", dig)
        if isinstance(self.dense, dict):
            object.__setattr__(self, "dense", DensePolicy(**self.dense))

    def is_digital(self, moe_index: int, expert: int) -> bool:
        return expert in self.digital[moe_index]

    def analog_experts(self, moe_index: int) -> tuple[int, ...]:
        """Sorted ids of the routed experts of MoE layer ``moe_index`` that run on AIMC."""
        d = set(self.digital[moe_index])
        return tuple(e for e in range(self.num_experts[moe_index]) if e not in d)

    @property
    def per_layer_digital(self) -> tuple[int, ...]:
        return tuple(len(d) for d in self.digital)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_experts"], d["digital"] = list(self.num_experts), [list(x) for x in self.digital]
        return d

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal placements give identical strings. Made once per
        placement (it is frozen) and kept: a sweep asks for it, and its hash ``key``, several times per result."""
        got = self.__dict__.get("_json")
        if got is None:
            got = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
            object.__setattr__(self, "_json", got)
        return got

    @classmethod
    def from_json(cls, s: str) -> "Placement":
        """Inverse of to_json. Raises ValueError for malformed JSON or missing/unknown fields."""
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"placement is not valid JSON: {e}") from None
        names = {f.name for f in fields(cls)}
        required = {"strategy", "budget", "scope", "num_experts", "digital"}
        if not isinstance(d, dict) or set(d) - names or required - set(d):
            raise ValueError(f"placement JSON must hold the fields {sorted(names)}")
        return cls(**d)

    @property
    def key(self) -> str:
        """sha256 hex of the canonical JSON: a stable content hash (same across processes and machines)."""
        got = self.__dict__.get("_key")
        if got is None:
            got = hashlib.sha256(self.to_json().encode()).hexdigest()
            object.__setattr__(self, "_key", got)
        return got

    @classmethod
    def all_digital(cls, anatomy) -> "Placement":
        """Every routed expert and dense module digital (the noise-free reference)."""
        ne = tuple(m.num_experts for m in anatomy.moe_layers)
        return cls("all_digital", 1.0, "layer", 0, ne, tuple(tuple(range(e)) for e in ne), DensePolicy())

    @classmethod
    def all_analog(cls, anatomy, dense: DensePolicy = DensePolicy()) -> "Placement":
        """Every routed expert on AIMC; dense modules as ``dense`` says (default digital, the paper's setting)."""
        ne = tuple(m.num_experts for m in anatomy.moe_layers)
        return cls("all_analog", 0.0, "layer", 0, ne, tuple(() for _ in ne), dense)


def _check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
            or not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be a number in [0, 1] (share of routed experts run digitally), got {budget!r}")


def digital_count(budget: float, total: int) -> int:
    """Digital slots of a budget in [0, 1] over ``total`` experts: floor(budget × total + 0.5), round half up
    (0.125 × 4 = 0.5 -> 1; Python's round() would give 0). The one rounding rule of every page and command."""
    return min(total, math.floor(budget * total + 0.5))


_n = digital_count


def budgets_from_percent(text: str) -> list[float]:
    """Budgets typed in percent ("0, 12.5; 25") as fractions in [0, 1], in the order given, each once.

    Raises ValueError in percent terms (the field's unit): "'abc' is not a number", "150 % is outside 0-100 %",
    and when no budget is given."""
    out = []
    for part in text.replace(";", ",").split(","):
        part = part.strip().rstrip("%").strip()
        if not part:
            continue
        # a plain decimal only: float() would also take "1_0" (= 10) and "1e1"
        if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)", part):
            raise ValueError(f"{part!r} is not a number: give percentages between 0 and 100, e.g. 0, 12.5, 25")
        v = float(part)
        if not (math.isfinite(v) and 0.0 <= v <= 100.0):
            raise ValueError(f"{part} % is outside 0-100 %: a digital budget is a percentage of the routed experts")
        if v / 100.0 not in out:
            out.append(v / 100.0)
    if not out:
        raise ValueError("no budget given: type one or more percentages between 0 and 100, e.g. 0, 12.5, 25")
    return out


def empty_budget_note(budget: float, num_experts, scope: str = "layer") -> str | None:
    """One line when a budget in (0, 1 %) makes no expert digital (digital_count rounds it to 0 in every MoE layer,
    or over all routed experts for scope "global"), as typing "0.25" for 25 % does; None otherwise.
    ``num_experts``: routed experts per MoE layer."""
    total = max(num_experts) if scope == "layer" else sum(num_experts)
    if 0.0 < budget < 0.01 and digital_count(budget, total) == 0:
        return (f"{budget * 100:g} % keeps no expert digital in any layer (same as 0 %); "
                f"did you mean {budget * 10000:g}?")
    return None


def percent_text(budgets) -> str:
    """Budgets (fractions) as the Evaluate page's field takes them: [0.0, 0.125, 0.25] -> "0, 12.5, 25" (the inverse
    of budgets_from_percent)."""
    return ", ".join(f"{b * 100:g}" for b in budgets)


def overlap(p: Placement, q: Placement) -> dict:
    """How far two placements agree: {"shared": experts digital in both, "union": digital in either,
    "n_p": digital in ``p``, "jaccard": shared / union (None when neither has a digital expert)}.
    Raises ValueError when they are for different expert counts per layer."""
    if p.num_experts != q.num_experts:
        raise ValueError(f"placements for different models: {p.num_experts} vs {q.num_experts} experts per layer")
    shared = sum(len(set(x) & set(y)) for x, y in zip(p.digital, q.digital))
    union = sum(len(set(x) | set(y)) for x, y in zip(p.digital, q.digital))
    return {"shared": shared, "union": union, "n_p": sum(len(x) for x in p.digital),
            "jaccard": shared / union if union else None}


def check_request(strategy: str, budget: float, scope: str = "layer") -> None:
    """Validate a placement request before any model work. Raises ValueError naming the valid values."""
    _check_budget(budget)
    get_strategy(strategy)   # ValueError "unknown strategy ..." with the closest name and the list
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")


def place(anatomy, strategy: str, budget: float, scope: str = "layer", dense: DensePolicy = DensePolicy(),
          seed: int = 0, stats=None, scores=None, measured=None) -> Placement:
    """Choose the digital routed experts: the highest-scoring ones under ``budget`` (see module docstring).

    strategy: a name in strategies.STRATEGIES ("random" is seeded). stats: routing.ActivationStats (for strategies
    that need "stats"); scores: scores.ExpertScores (computed from the model if not given); measured: per-layer
    float64 [E] scores of a strategy that needs a "measurement" (oracle / local_error) for the chosen noise preset
    (``sensitivity.measured_scores``).
    Raises ValueError for an unknown strategy or scope, a budget outside [0, 1], or missing stats / measured scores.
    """
    from .scores import expert_scores   # here, not at the top: validating a request needs no torch
    check_request(strategy, budget, scope)
    ne = [m.num_experts for m in anatomy.moe_layers]
    if STRATEGIES[strategy].needs == "scores" and scores is None:
        scores = expert_scores(anatomy)
    s = strategy_scores(strategy, num_experts=ne, scores=scores, stats=stats, measured=measured, seed=seed)
    # one fixed ranking per scope: score descending, ties -> lower MoE layer, then lower expert id
    if scope == "layer":
        digital = [np.lexsort((np.arange(e), -x))[:_n(budget, e)] for x, e in zip(s, ne)]
    else:
        flat = np.concatenate(s)
        lay = np.concatenate([np.full(e, i) for i, e in enumerate(ne)])
        exp = np.concatenate([np.arange(e) for e in ne])
        top = np.lexsort((exp, lay, -flat))[:_n(budget, len(flat))]
        digital = [exp[top[lay[top] == i]] for i in range(len(ne))]
    return Placement(strategy, budget, scope, seed if strategy == "random" else 0, tuple(ne),
                     tuple(tuple(d.tolist()) for d in digital), dense)


SHARE_HELP = {
    "digital_share": "Parameters that run digitally / all parameters of the model. Digital: the routed experts the "
                     "placement keeps digital, the dense modules (attention, LM head, routers, shared experts, "
                     "dense MLPs) the policy keeps digital, and - with a tied LM head - the embedding table, which "
                     "is also the LM head's matrix. Untied embeddings and norms are memory, not matrix-vector work; "
                     "they count in the total only.",
    "routed_digital_share": "Digital routed experts / all routed experts, counted in experts (not parameters): the "
                            "digital budget as placed, after each layer's round-half-up.",
}
"""What the two shares mean: the one wording of every page, tooltip and JSON output (``digital_share()["help"]``)."""


def digital_share(placement: Placement, anatomy) -> dict:
    """Parameter share of digital matrix-vector modules.

    Every parameter is counted once as digital, analog or memory: digital routed experts (each expert's share of
    its layer's fused tensors, biases included), dense kinds the policy keeps digital and "other" (modules hetmoe
    maps to no AIMC tile run digitally) are digital; analog experts and dense kinds the policy moves to AIMC are
    analog; embeddings (table lookup) and norms (element-wise) are memory, not matrix-vector work. With a tied
    LM head the embedding table is also the LM head's matrix and follows the LM head. digital_share =
    digital_params / total_params, total_params being all of the model's parameters (embeddings included).
    Returns {"digital_share", "digital_params", "analog_params", "memory_params", "total_params",
    "per_layer_digital", "per_layer_experts", "routed_digital_share",
    "by_kind": {kind: {"params", "digital", "analog", "memory"}}, "help": SHARE_HELP}.
    Raises ValueError when the placement does not match the anatomy's MoE layers.
    """
    ne = tuple(m.num_experts for m in anatomy.moe_layers)
    if placement.num_experts != ne:
        raise ValueError(f"placement is for experts per layer {placement.num_experts}, the model has {ne}")
    pc = {k: int(v) for k, v in anatomy.param_counts.items()}
    per_expert = [sum(p.numel() for p in m.experts.parameters()) // m.num_experts for m in anatomy.moe_layers]
    routed_dig = sum(len(d) * pe for d, pe in zip(placement.digital, per_expert))
    routed_dig = min(routed_dig, pc.get("routed_experts", 0))

    def row(n, where):
        return {"params": n, "digital": n if where == "digital" else 0, "analog": n if where == "analog" else 0,
                "memory": n if where == "memory" else 0}
    by_kind = {"routed_experts": {"params": pc.get("routed_experts", 0), "digital": routed_dig,
                                  "analog": pc.get("routed_experts", 0) - routed_dig, "memory": 0}}
    for k in DENSE_KINDS:
        by_kind[k] = row(pc.get(k, 0), "digital" if placement.dense.is_digital(k) else "analog")
    tied = anatomy.tied_lm_head and pc.get("lm_head", 0) == 0
    lm_where = "digital" if placement.dense.is_digital("lm_head") else "analog"
    by_kind["embeddings"] = row(pc.get("embeddings", 0), lm_where if tied else "memory")
    by_kind["norms"] = row(pc.get("norms", 0), "memory")
    by_kind["other"] = row(pc.get("other", 0), "digital")
    tot = {c: sum(v[c] for v in by_kind.values()) for c in ("params", "digital", "analog", "memory")}
    return {"digital_share": tot["digital"] / tot["params"] if tot["params"] else 0.0,
            "digital_params": tot["digital"], "analog_params": tot["analog"], "memory_params": tot["memory"],
            "total_params": tot["params"], "per_layer_digital": list(placement.per_layer_digital),
            "per_layer_experts": list(ne), "routed_digital_share": sum(placement.per_layer_digital) / max(1, sum(ne)),
            "by_kind": by_kind, "help": dict(SHARE_HELP)}
