"""Sweeps: a grid of strategies x budgets x presets x seeds x tasks validated into ``RunSpec``s, grouped into units.

One *result* = one (model, placement request, noise preset, seed, backend, task, limit, few-shot, batch size),
keyed by ``RunSpec.key`` (sha256 of ``RunSpec.config()``). Results sharing everything but the task form a *unit*:
one placement + noise + seed = one noisy model that runs all its tasks. Planning touches neither model nor store.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property

from .backend import BACKENDS
from .store import canonical_json, config_key
from .strategies import STRATEGIES, get_strategy
from .tasks import TaskRef, resolve_tasks

IDEAL = "ideal"                    # strategy / preset / backend name of the all-digital reference results
DRAWS = "per-expert"
"""How programming noise is drawn, in every analog result's key: each routed expert from its own seed
(``tiles.ProgrammedCache``). Results stored before this field existed drew chunks of experts together and are
never taken for today's computations."""


@dataclass(frozen=True)
class RunSpec:
    """One result to compute or fetch. ``ideal`` results ignore strategy/budget/preset/seed/backend."""
    source: str
    fingerprint: str
    task: TaskRef
    limit: float | None
    num_fewshot: int
    batch_size: int
    device: str
    dtype: str
    ideal: bool = False
    strategy: str = IDEAL
    budget: float = 1.0
    scope: str = "layer"
    dense: tuple = ()            # DensePolicy fields as (name, bool) pairs
    noise: tuple = ()            # NoiseConfig.to_dict() items
    preset: str = IDEAL
    seed: int = 0
    backend: str = IDEAL
    calibration: str | None = None   # hash of the calibration text (strategies placed from it)

    def config(self) -> dict:
        """The canonical config whose hash is the cache key (see module docstring of store)."""
        from .evaluate import library_versions
        common = {"model": {"fingerprint": self.fingerprint, "dtype": self.dtype},
                  "device": self.device.split(":")[0], "task": {"name": self.task.name, "version": self.task.version},
                  "limit": self.limit, "num_fewshot": self.num_fewshot, "batch_size": self.batch_size,
                  "versions": library_versions()}
        if self.ideal:
            return {"kind": IDEAL, **common}
        return {"kind": "analog", **common,
                "placement": {"strategy": self.strategy, "budget": self.budget, "scope": self.scope,
                              "dense": dict(self.dense), "seed": self.seed if self.strategy == "random" else 0,
                              "calibration": self.calibration},
                "noise": dict(self.noise), "seed": self.seed, "backend": self.backend, "draws": DRAWS}

    @cached_property
    def key(self) -> str:
        """sha256 of :meth:`config` (computed once per spec: a sweep reads it many times)."""
        return config_key(self.config())

    def row(self) -> dict:
        """Columns of the runs table (besides key/status/timings)."""
        from .evaluate import library_versions
        return {"model_source": self.source, "model_fingerprint": self.fingerprint, "strategy": self.strategy,
                "budget": self.budget, "scope": self.scope if not self.ideal else IDEAL, "preset": self.preset,
                "seed": self.seed, "backend": self.backend, "task": self.task.name, "task_version": self.task.version,
                "limit": self.limit, "num_fewshot": self.num_fewshot, "batch_size": self.batch_size,
                "dtype": self.dtype,
                "config": canonical_json(self.config()), "versions": canonical_json(library_versions())}

    @property
    def unit(self) -> tuple:
        """Everything but the task: results sharing a unit share one noisy model."""
        return (self.ideal, self.strategy, self.budget, self.scope, self.dense, self.noise, self.seed, self.backend)


# ---------------------------------------------------------------------------------------------- validation

def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _as_list(x, kind=str) -> list:
    if isinstance(x, str):
        x = [p for p in x.split(",") if p.strip()]
    elif not isinstance(x, (list, tuple)):
        x = [x]
    out = []
    for v in x:
        try:
            out.append(kind(v.strip()) if isinstance(v, str) else kind(v))
        except (TypeError, ValueError):
            raise ValueError(f"{v!r} is not a valid {kind.__name__}") from None
    return out


def plan(source: str = "default", *, strategies=("maxnn",), budgets=(0.125,), presets=("paper-pcm-c1.5",),
         seeds=1, tasks=("hetmoe_cloze",), limit=None, num_fewshot: int = 0, batch_size: int = 8,
         backend: str = "fast", scope: str = "layer", dense: dict | None = None, preset_overrides: dict | None = None,
         include_ideal: bool = True, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
         calibration_hash: str | None = None, fingerprint: str | None = None) -> list[RunSpec]:
    """Validate a sweep and list its RunSpecs (ideal results first), without touching the model or the store.

    strategies/budgets/presets/tasks: lists or comma-separated strings; seeds: a count N (seeds 0..N-1) or a list.
    budgets in [0, 1] (share of routed experts kept digital); limit: lm-eval --limit (int docs, or a fraction < 1).
    Raises ValueError with what to change for any bad value.
    """
    from .fingerprints import source_fingerprint
    from .noise import get_preset
    from .placement import DensePolicy
    strategies = _as_list(strategies)
    budgets = _as_list(budgets, float)
    presets = _as_list(presets)
    seeds = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else _as_list(seeds, int)
    limit = _check_grid(strategies, budgets, presets, seeds, backend, scope, batch_size, num_fewshot, limit)
    try:
        dense_p = DensePolicy(**(dense or {}))
    except TypeError:
        raise ValueError(f"dense policy {dense} has unknown fields; use {list(asdict(DensePolicy()))}") from None
    noises = {p: get_preset(p, **(preset_overrides or {})) for p in presets}   # ValueError for unknown names/values
    fp = fingerprint or source_fingerprint(source, revision)
    refs = resolve_tasks(tasks)
    common = dict(source=source, fingerprint=fp, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                  device=device, dtype=dtype)
    specs = [RunSpec(task=t, ideal=True, **common) for t in refs] if include_ideal else []
    dense_items = tuple(sorted(asdict(dense_p).items()))
    if any(STRATEGIES[s].needs in ("stats", "measurement") for s in strategies):
        calibration_hash = calibration_hash or calibration_text(source)[1]
    for p in presets:
        noise = tuple(sorted(noises[p].to_dict().items()))
        for s in strategies:
            calib = None
            if STRATEGIES[s].needs in ("stats", "measurement"):   # placed from calibration text: it enters the key
                calib = calibration_hash
            specs += [RunSpec(task=t, strategy=s, budget=b, scope=scope, dense=dense_items, noise=noise, preset=p,
                              seed=seed, backend=backend, calibration=calib, **common)
                      for b in budgets for seed in seeds for t in refs]
    return specs


def _check_grid(strategies, budgets, presets, seeds, backend, scope, batch_size, num_fewshot, limit):
    """ValueError naming what to change for a bad sweep value; returns ``limit`` as a float (or None)."""
    from .placement import SCOPES
    _check(bool(strategies), f"give at least one strategy from {', '.join(STRATEGIES)}")
    for s in strategies:
        try:
            get_strategy(s)
        except ValueError as e:
            raise ValueError(f"strategies {strategies}: {e}") from None
    _check(bool(budgets) and all(math.isfinite(b) and 0 <= b <= 1 for b in budgets),
           f"budgets {budgets} must be numbers in [0, 1] (share of routed experts kept digital)")
    _check(bool(presets), "give at least one noise preset")
    _check(bool(seeds) and all(s >= 0 for s in seeds), f"seeds must be a count >= 1 or a list of seeds >= 0, got {seeds}")
    _check(backend in BACKENDS, f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    _check(scope in SCOPES, f"scope {scope!r}: choose one of {', '.join(SCOPES)}")
    _check(isinstance(batch_size, int) and batch_size >= 1, f"batch size must be an integer >= 1, got {batch_size!r}")
    _check(isinstance(num_fewshot, int) and num_fewshot >= 0, f"few-shot must be an integer >= 0, got {num_fewshot!r}")
    if limit is not None:
        limit = float(limit)
        _check(limit > 0 and (limit < 1 or limit.is_integer()),
               f"limit {limit} must be a whole number of documents >= 1 or a fraction in (0, 1)")
    return limit


# ---------------------------------------------------------------------------------------------- calibration text

def calibration_text(source: str | None = None) -> tuple[dict, str]:
    """Calibration text of the Activation Frequency / Weight (and measured) strategies for model ``source``
    (routing.default_calibration, the same text ``scores`` and ``place`` use: built-in sentences for ``tiny:``
    models) and its hash (routing.calibration_hash, max_length 256). Read and hashed once per process while the
    shipped files keep their size and mtime (~8 ms a read, measured: once per sweep call otherwise)."""
    from .routing import CALIBRATION_FILES, calibration_hash, default_calibration as texts_of
    stamp = (source, tuple((f.stat().st_size, f.stat().st_mtime_ns) if f.exists() else None for f in CALIBRATION_FILES))
    if _CALIBRATION.get("stamp") != stamp:
        texts, _ = texts_of(source)
        _CALIBRATION.update(stamp=stamp, texts=texts, hash=calibration_hash(texts, 256))
    return {k: list(v) for k, v in _CALIBRATION["texts"].items()}, _CALIBRATION["hash"]


_CALIBRATION: dict = {}


def units(specs: list[RunSpec]) -> list[list[RunSpec]]:
    """RunSpecs grouped by ``RunSpec.unit`` (one noisy model each), in first-seen order."""
    out: dict = {}
    for s in specs:
        out.setdefault(s.unit, []).append(s)
    return list(out.values())
