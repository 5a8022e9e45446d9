"""Noisy evaluation of an MoE model under a placement and a noise preset, cached in the results store.

One *result* = one (model, placement request, noise preset, seed, backend, task, limit, few-shot, batch size):
``sweep`` plans the results (``RunSpec``, ``plan``), ``tasks`` resolves task names and runs lm-eval; this module
looks the plan up in the store and computes what is missing, unit by unit. The ideal (all-digital, noise-free)
result of the same model and task is always computed once and cached alongside. Scores come from the lm-eval harness
(``HFLM`` around the in-memory model; tasks by name from lm-eval's registry, the paper suite built by
``paper_tasks`` and the default model's local tasks in ``hetmoe_core/assets/tasks``).

Cache hits are answered from the store without loading the model or running a forward pass: the model fingerprint
of a local folder (``default`` included) is the weights' content hash, remembered per file size and mtime.
All public functions may run in a background thread (e.g. a Streamlit page): connections are per call and each
loaded model is guarded by its own lock while its weights are noisy.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import math
import threading
import time
import weakref
from datetime import datetime, timezone
from typing import Callable

from .store import Store, config_key
from .strategies import STRATEGIES
from .sweep import BACKENDS, IDEAL, RunSpec, _check, calibration_text, plan, units  # re-export
from .tasks import (BOOTSTRAP_ITERS, LOCAL_TASKS, TaskRef, _local_tasks, _run_task, _task_manager,  # re-export
                    resolve_tasks, task_aliases)


def __getattr__(name: str):
    """Old import paths: ``source_fingerprint`` (now in fingerprints, torch-free) and ``default_calibration`` (now ``sweep.calibration_text``)."""
    if name == "source_fingerprint":
        from .fingerprints import source_fingerprint
        return source_fingerprint
    if name == "default_calibration":
        return calibration_text
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Cancelled(Exception):
    """Raised inside a model forward when the caller's cancel event is set."""


@contextlib.contextmanager
def cancel_hooks(model, anatomy, cancelled: Callable[[], bool] | None):
    """Within the block, every decoder layer, MoE experts block and the LM head check ``cancelled()`` before they
    run and raise :class:`Cancelled` when it returns True, so a cancel stops a forward pass within one layer (a
    check on the whole model waits for a full lm-eval batch). ``cancelled`` None: no hooks. The hooks are removed
    on exit; a check costs one Python call per module (``bench/bench_cancel.py`` times the forward with and
    without: no measurable cost)."""
    if cancelled is None:
        yield
        return

    def guard(_module, _args):
        if cancelled():
            raise Cancelled()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    modules = [model, *getattr(decoder, "layers", ()), *(m.experts for m in anatomy.moe_layers)]
    if model.get_output_embeddings() is not None:
        modules.append(model.get_output_embeddings())
    hooks = [m.register_forward_pre_hook(guard) for m in dict.fromkeys(modules)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------------------------------------- versions, keys

_VERSIONS: dict | None = None


def library_versions() -> dict:
    """Versions of the libraries a result depends on (enter every cache key): torch, transformers, aihwkit,
    lm_eval, hetmoe. Read from package metadata: no heavy import."""
    global _VERSIONS
    if _VERSIONS is None:
        from . import __version__
        v = {}
        for pkg in ("torch", "transformers", "aihwkit", "lm_eval"):
            try:
                v[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                v[pkg] = None
        v["hetmoe"] = __version__
        _VERSIONS = v
    return dict(_VERSIONS)


# ---------------------------------------------------------------------------------------------- models

_model_lock = threading.Lock()
_loaded: dict = {}                                # (source, device, dtype, revision) -> LoadedModel (one at a time)
_per_model: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # LoadedModel -> {"lock", "hflm": {bs: HFLM}}


def _get_model(source, device, dtype, revision, trust_remote_code):
    key = (source, device, dtype, revision)
    with _model_lock:
        if key not in _loaded:
            from .models import load_model
            _loaded.clear()   # keep one model in memory
            _loaded[key] = load_model(source, device=device, dtype=dtype, revision=revision,
                                      trust_remote_code=trust_remote_code)
        return _loaded[key]


def _state(lm) -> dict:
    with _model_lock:
        if lm not in _per_model:
            # tasks: tasks._built_tasks; stats: routing statistics by (calibration hash, default text) and the
            # expert scores ("scores"), computed once per loaded model
            # last_digital: see _chained
            _per_model[lm] = {"lock": threading.Lock(), "hflm": {}, "tasks": {}, "stats": {}, "last_digital": {}}
        return _per_model[lm]


# ---------------------------------------------------------------------------------------------- evaluation

def _result(spec: RunSpec, cached: bool, metrics: list[dict], run: dict | None = None) -> dict:
    return {"key": spec.key, "cached": cached, "ideal": spec.ideal, "task": spec.task.name, "strategy": spec.strategy,
            "budget": spec.budget, "preset": spec.preset, "seed": spec.seed, "backend": spec.backend,
            "metrics": {m["metric"]: m["value"] for m in metrics},
            "stderr": {m["metric"]: m["stderr"] for m in metrics},
            "higher_is_better": {m["metric"]: m.get("higher_is_better") for m in metrics},
            "digital_share": (run or {}).get("digital_share"), "duration_s": (run or {}).get("duration_s"),
            "shared_from": (run or {}).get("shared_from")}


def evaluate_many(source: str = "default", *, store: Store | str | None = None, lm=None,
                  progress: Callable[[int, int, dict], None] | None = None, cancel: threading.Event | None = None,
                  trust_remote_code: bool = False, calibration: dict | None = None, write_every_s: float | None = None,
                  measure_progress: Callable[[str, int, int], None] | None = None, **plan_kw) -> list[dict]:
    """Evaluate the product strategies × budgets × presets × seeds × tasks (see :func:`plan`), cache first.

    Cached results are reported at once (progress(done, total, result) with result["cached"] True) and the model is
    not loaded when everything is cached. Missing results are computed unit by unit (one placement + noise + seed
    = one noisy model, all its tasks) and written to the store together every ``write_every_s`` seconds (default
    ``HETMOE_WRITE_EVERY_S``, 2 s; one connection costs more than a small result's forward) and when the call ends,
    is cancelled or fails, so a killed sweep resumes where it stopped, losing at most those seconds; 0 writes
    each result as it is done (the dashboard's jobs: what a page shows as done is stored, and a cancel has
    nothing left to write). ``lm``: an already loaded models.LoadedModel to use instead of loading ``source``
    (its fingerprint keys the results; ``source`` is then only a label). ``calibration``: calibration *text*
    {domain: [texts]} for the routing-statistics strategies (default: ``sweep.calibration_text()``).
    ``cancel``: a threading.Event; when set, the running forward raises and the call returns the results so far.
    ``measure_progress(line, done, total)``: called during the measurement a measured strategy (oracle,
    local_error) makes before its first result, ``line`` = :func:`measurement_line` (e.g. "measuring expert damage
    under paper-pcm-c1.5 for Oracle (measured damage): 37 / 1,370 forwards").
    Returns one dict per result: key, cached, ideal, task, strategy, budget, preset, seed, backend,
    metrics {name: value}, stderr {name: value}, higher_is_better {name: bool | None}, digital_share, duration_s,
    shared_from (the key of the identical computation whose numbers this result reuses, None when computed for
    itself; see _run_unit).
    Raises ValueError for bad input (nothing is stored then).
    """
    fp = lm.fingerprint if lm is not None else None
    specs, store, results, todo, report, known = cached_first(source, store, progress, cancel, calibration,
                                                              fingerprint=fp, **plan_kw)
    if todo:
        lm = _model_for(todo, lm, source, plan_kw, trust_remote_code)
        _run_units(lm, todo, store, cancel, calibration, report, write_every_s, known, measure_progress)
    return [results[s.key] for s in specs if s.key in results]


def cached_first(source: str, store, progress, cancel, calib_text: dict | None, **plan_kw):
    """What every executor does first (local here, Ray in ``ray_executor``): plan the sweep (all input checks,
    nothing stored on bad input), answer the stored keys at once and check lm-eval registry task names.

    Returns (specs, store, results {key: result dict}, todo: RunSpecs left to compute, empty when all are stored or
    ``cancel`` is set, report(spec, result): records a result and calls ``progress(done, total, result)``, known:
    the compute keys stored for the model (``Store.computed_keys``, read with the results in one connection)).
    Raises ValueError for bad input or unknown task names.
    """
    calib_hash = None
    if calib_text is not None:
        from .routing import calibration_hash
        calib_hash = calibration_hash(calib_text, 256)
    specs = plan(source, calibration_hash=calib_hash, **plan_kw)   # all checks before the store
    store = store if isinstance(store, Store) else Store(store)
    results: dict = {}

    def report(spec, res):
        results[spec.key] = res
        if progress:
            progress(len(results), len(specs), res)
    have, known = store.lookup((s.key for s in specs), specs[0].fingerprint if specs else None)
    for s in specs:
        if s.key in have:
            report(s, _result(s, True, have[s.key]["metrics"], have[s.key]["run"]))
    todo = [s for s in specs if s.key not in results]
    if not todo or (cancel is not None and cancel.is_set()):
        return specs, store, results, [], report, known
    _check_registry_tasks(todo)
    return specs, store, results, todo, report, known


def _check_registry_tasks(todo: list[RunSpec]) -> None:
    """ValueError for task names that are neither hetmoe's nor lm-eval's, before any model is loaded."""
    from .tasks import TASK_LISTING, lm_eval_may_know
    registry = sorted({s.task.name for s in todo if s.task.include_path is None})
    if registry:
        maybe = lm_eval_may_know(registry)    # names in no lm-eval file fail at once, without indexing lm-eval
        unknown = [t for t in registry if t not in maybe or t not in _task_manager((), True).all_tasks]
        _check(not unknown, f"unknown task(s) {', '.join(unknown)}: not a hetmoe, paper ({', '.join(task_aliases())} "
                            f"aliases) or lm-eval task; {TASK_LISTING}")


def _model_for(todo: list[RunSpec], lm, source: str, plan_kw: dict, trust_remote_code: bool):
    """The loaded model the results are keyed by; RuntimeError when its fingerprint is not the planned one."""
    if lm is None:
        lm = _get_model(source, plan_kw.get("device", "cpu"), plan_kw.get("dtype", "float32"),
                        plan_kw.get("revision"), trust_remote_code)
    if lm.fingerprint != todo[0].fingerprint:   # cache fingerprint went stale: key by the loaded weights
        from .fingerprints import forget_fingerprints
        forget_fingerprints()
        raise RuntimeError(f"model fingerprint changed ({todo[0].fingerprint} -> {lm.fingerprint}); run again")
    return lm


def _run_units(lm, todo: list[RunSpec], store: Store, cancel, calib_text, report,
               write_every_s: float | None = None, known: set | None = None, measure_progress=None) -> None:
    """Compute the missing results unit by unit, each under the model's lock; stops quietly when cancelled.
    ``known``: the compute keys stored for ``lm`` when the sweep began (None: read them here);
    ``measure_progress``: see :func:`evaluate_many`."""
    state = _state(lm)
    if _stats_missing(store, lm.fingerprint, "scores"):   # MaxNNScore / router norm, for the dashboard
        from .scores import expert_scores
        store.put_expert_stats(lm.fingerprint, "scores", expert_scores(lm.anatomy).to_dict())
    if _stats_missing(store, lm.fingerprint, SHAPES):   # what energy costs need: the report never builds the model
        from .energy import keep_shapes
        keep_shapes(store, lm)
    memo: dict = {}
    if known is None:
        known = store.computed_keys(lm.fingerprint)   # computations stored before this call (one read)
    writer = _Batched(store, max_s=write_every_s)
    try:
        # outside the model lock: the measurement takes it
        measured = _measured(lm, todo, store, calib_text, cancel, measure_progress)
        groups, placed = _seed_major(units(todo)), {}
        if len(groups) > 1:   # placements up front (under the model lock: a strategy may need routing statistics)
            with state["lock"]:
                same: dict = {}
                for g in groups:
                    if cancel is not None and cancel.is_set():
                        break
                    k = _placement_inputs(g[0], calib_text)
                    if k not in same:
                        same[k] = _unit_placement(lm, store, g[0], calib_text, measured)
                    placed[id(g)] = same[k]
                groups = _chained(groups, placed, state["last_digital"])
        for group in groups:
            if cancel is not None and cancel.is_set():
                break
            with state["lock"]:
                ran = False
                for spec, metrics, run in _run_unit(lm, state, group, writer, cancel, calib_text, memo, measured,
                                                    known, placed.get(id(group))):
                    ran = ran or run["shared_from"] is None
                    report(spec, _result(spec, False, metrics, run))
                if ran and id(group) in placed and not group[0].ideal:   # the next call's chain starts near it
                    last = state["last_digital"]
                    last.pop((group[0].noise, group[0].seed, group[0].backend), None)
                    last[(group[0].noise, group[0].seed, group[0].backend)] = _digital_set(placed[id(group)])
                    while len(last) > _LAST_KEPT:
                        last.pop(next(iter(last)))
    except Cancelled:
        pass
    finally:
        writer.flush()


class _Batched:
    """The store as a sweep writes it: results are kept and written together (``Store.put_results``, one
    connection) once ``max_n`` wait or ``max_s`` seconds passed since the last write, and whenever the sweep ends,
    fails or is cancelled (``flush``). A killed process loses at most those seconds' results (the sweep resumes
    there); everything else goes straight to the store. ``max_s`` defaults to ``HETMOE_WRITE_EVERY_S`` (2 s;
    0 writes each result as it is done)."""

    def __init__(self, store, max_n: int = 64, max_s: float | None = None):
        import os
        self.store, self.max_n = store, max_n
        self.max_s = float(os.environ.get("HETMOE_WRITE_EVERY_S", "2")) if max_s is None else max_s
        self.pending: list[tuple] = []
        self.since = time.monotonic()

    def __getattr__(self, name):
        return getattr(self.store, name)

    def put_result(self, key, run, metrics, placement=None) -> bool:
        self.pending.append((key, run, metrics, placement))
        if len(self.pending) >= self.max_n or time.monotonic() - self.since >= self.max_s:
            self.flush()
        return True

    def put_failure(self, key, run, error) -> None:
        self.flush()
        self.store.put_failure(key, run, error)

    def flush(self) -> None:
        if self.pending:
            self.store.put_results(self.pending)
            self.pending.clear()
        self.since = time.monotonic()


def _seed_major(groups: list[list[RunSpec]]) -> list[list[RunSpec]]:
    """Units ordered so that those sharing (noise, seed, backend) follow each other (else first-seen order): the
    experts programmed for one seed are reused by every placement (``tiles.ProgrammedCache``) before the next seed
    pushes them out of a bounded cache."""
    first: dict = {}
    for g in groups:
        first.setdefault((g[0].noise, g[0].seed, g[0].backend), len(first))
    return sorted(groups, key=lambda g: first[(g[0].noise, g[0].seed, g[0].backend)])


_LAST_KEPT = 64    # (noise, seed, backend) whose last digital set a model's state keeps for the next chain (_chained)
_CHAIN_MAX = 512   # units per (noise, seed, backend) ordered by nearest placement (quadratic in their number)


def _chained(groups: list[list[RunSpec]], placed: dict, before: dict | None = None) -> list[list[RunSpec]]:
    """Units of each run that shares (noise, seed, backend) (see :func:`_seed_major`) ordered so that each unit's
    analog experts differ from the previous unit's in few experts: the fast backend copies only the experts whose
    state changed into the fused tensors it keeps (``fast_backend.FastBackend._swap``), and a sweep's strategies at
    one budget share most of their analog experts where one strategy's budgets, run in a row, change many (greedy
    nearest neighbour on the symmetric difference of the digital sets, which is the analog sets', from the run's
    first unit; a run of more
    than ``_CHAIN_MAX`` units, or one the chain would not shorten, keeps its order). Only the order of the work changes, no number (each unit's noise is
    seeded by itself). ``placed``: {id(group): Placement}; a group without one keeps its place.

    ``before``: {(noise, seed, backend): digital set {(layer, expert)} of the unit that ran last with them in an
    earlier call on this model} (``_run_units`` keeps it): a run with an entry starts at its unit nearest to that
    set (first of equals) instead of its first unit, as the fused tensors still hold that unit's experts. A second
    sweep at a seed, e.g. other budgets (``bench/bench_overhead.py``'s steady state), otherwise began by copying
    ~20% of its expert copies to undo the first sweep's last placement (measured: 164 changed experts per preset
    instead of 202)."""
    out, i = [], 0
    while i < len(groups):
        k = (groups[i][0].noise, groups[i][0].seed, groups[i][0].backend)
        j = i
        while j < len(groups) and (groups[j][0].noise, groups[j][0].seed, groups[j][0].backend) == k:
            j += 1
        run = groups[i:j]
        if 2 < len(run) <= _CHAIN_MAX and all(id(g) in placed for g in run):
            sets = {id(g): _digital_set(placed[id(g)]) for g in run}
            start = (before or {}).get(k)
            head = 0 if start is None else min(range(len(run)), key=lambda q: len(start ^ sets[id(run[q])]))
            chain, left = [run[head]], run[:head] + run[head + 1:]
            while left:
                last = sets[id(chain[-1])]
                nxt = min(range(len(left)), key=lambda q: len(last ^ sets[id(left[q])]))   # first of equals: stable
                chain.append(left.pop(nxt))

            def changes(order):
                return sum(len(sets[id(a)] ^ sets[id(b)]) for a, b in zip(order, order[1:])) + \
                    (len(start ^ sets[id(order[0])]) if start is not None else 0)
            run = chain if changes(chain) < changes(run) else run   # greedy is no optimum: never worse than given
        out += run
        i = j
    return out


def _digital_set(placement) -> set:
    """{(MoE layer number, expert)} of a placement's digital experts."""
    return {(n, e) for n, d in enumerate(placement.digital) for e in d}


def cancelled_line(n_results: int) -> str:
    """The Evaluate page's line for a cancelled sweep: what finished before the cancel is stored, each result as it
    was done (jobs.Job); with none finished, nothing was."""
    if not n_results:
        return "Cancelled after 0 results: none had finished, so nothing was stored."
    return f"Cancelled after {n_results} result{'s' if n_results > 1 else ''} (those are stored)."


def measurement_line(strategy: str | None, preset: str, done: int, total: int) -> str:
    """The progress line of a measurement, the same in the dashboard's job progress and the CLI: "measuring expert
    damage under paper-pcm-c1.5 for Oracle (measured damage): 37 / 1,370 forwards" (``strategy`` "oracle"; None:
    ``validate``'s own measurement, "measuring expert damage under paper-pcm-c1.5: 37 / 1,370 forwards"),
    "measuring Local output error under paper-pcm-c1.5: 5 / 14 forwards" ("local_error"). ``preset``: the noise
    as the pages name it (``noise.preset_label``). A forward is one batched forward of ``sensitivity.measure``
    (``measurement_forwards`` counts them) or, for the Local output error, one calibration forward or one MoE
    layer's experts forward under one seed (``criteria.local_error_scores``)."""
    from .strategies import label
    what = (f"expert damage under {preset}" + (f" for {label(strategy)}" if strategy else "")
            if strategy in (None, "oracle") else f"{label(strategy)} under {preset}")
    return f"measuring {what}: {done:,} / {total:,} forwards"


def _measured(lm, specs, store, calib_text, cancel, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Scores of the strategies that need a measurement (oracle, local_error) per (strategy, noise) the specs need.
    ``progress(line, done, total)`` during each measurement (``measurement_line``)."""
    out = {}
    for s in specs:
        if not s.ideal and STRATEGIES[s.strategy].needs == "measurement" and (s.strategy, s.noise) not in out:
            from .noise import NoiseConfig, preset_label
            from .sensitivity import measured_scores
            noise = NoiseConfig(**dict(s.noise))
            tell = None
            if progress is not None:
                def tell(done, total, _strategy=s.strategy, _preset=preset_label(s.preset, s.noise)):
                    progress(measurement_line(_strategy, _preset, done, total), done, total)
            out[(s.strategy, s.noise)] = measured_scores(
                lm, s.strategy, noise, store=store, texts=calib_text, progress=tell,
                cancel=(lambda: cancel.is_set()) if cancel is not None else None)
    return out


def _placement_inputs(head: RunSpec, calib_text) -> tuple:
    """Everything :func:`_unit_placement` reads from a unit's head spec (and whether the calibration text is the
    default): units with equal inputs get the same (frozen) Placement, placed once. A sweep's presets share each
    placement but for a measured strategy (its scores are measured under the unit's noise): placing one and making
    its JSON and key took ~0.3 ms per unit (measured, ``bench/bench_overhead.py``'s steady state)."""
    measured = not head.ideal and STRATEGIES[head.strategy].needs == "measurement"
    return (head.ideal, head.strategy, head.budget, head.scope, head.dense, head.seed, head.calibration,
            calib_text is None, head.noise if measured else None)


def _unit_placement(lm, store: Store, head: RunSpec, calib_text, measured: dict):
    """The placement of a unit: all digital for the ideal reference, else ``place`` with what the strategy needs."""
    from .placement import DensePolicy, Placement, place
    if head.ideal:
        return Placement.all_digital(lm.anatomy)
    stats = scores = None
    memo = _state(lm)["stats"]
    if STRATEGIES[head.strategy].needs == "stats":   # the same calibration text (hash in the spec): read once
        key = (head.calibration, calib_text is None)
        if key not in memo or head.calibration is None:
            memo[key] = _activation_stats(lm, store, calib_text)
        stats = memo[key]
    if STRATEGIES[head.strategy].needs == "scores":   # MaxNNScore / router norm of the loaded weights: once
        from .scores import expert_scores
        if "scores" not in memo:
            memo["scores"] = expert_scores(lm.anatomy)
        scores = memo["scores"]
    return place(lm.anatomy, head.strategy, head.budget, scope=head.scope, dense=DensePolicy(**dict(head.dense)),
                 seed=head.seed, stats=stats, scores=scores, measured=measured.get((head.strategy, head.noise)))


def spec_routing_drift(lm, spec: RunSpec, store: Store | str | None = None, *, tokens: int = 1024,
                       calib_text: dict | None = None) -> list[dict]:
    """Routing drift of one planned result: its placement (strategy, budget, scope, dense policy) under its noise
    and seed vs the digital model, on ``tokens`` calibration tokens (``sensitivity.routing_drift`` rows per MoE
    layer: changed_share = share of tokens whose top-k expert set changes, max/mean expert load ideal vs noisy).
    ROMER (arXiv 2605.11800) reports that noise breaks expert load balance. Raises ValueError for the ideal
    reference (nothing is noisy) and for the oracle without a stored measurement of this noise (measure it on
    the Validate page or with ``validate`` first: it takes minutes, too long to start here)."""
    from .noise import NoiseConfig
    from .sensitivity import calibration_tokens, routing_drift
    from .validation import _texts, stored_validation
    st = store if isinstance(store, Store) else Store(store)
    if spec.ideal:
        raise ValueError("the ideal reference is all digital and noise-free: it has no routing drift")
    noise = NoiseConfig(**dict(spec.noise))
    if spec.strategy == "oracle" and stored_validation(lm.source, noise, texts=calib_text, store=st) is None:
        raise ValueError(f"the oracle needs the measured damage under {noise.name}: measure it on the Validate page "
                         "(or `python -m hetmoe_core validate`) first")
    placement = _unit_placement(lm, st, spec, calib_text, _measured(lm, [spec], st, calib_text, None))
    ids = calibration_tokens(lm.tokenizer, _texts(calib_text, lm.source)[0], tokens)
    return routing_drift(lm, placement, noise, ids, seeds=[spec.seed])


@functools.lru_cache(maxsize=256)
def _noise_of(items: tuple):
    """The NoiseConfig of a spec's ``noise`` items (``NoiseConfig.to_dict()`` items), one frozen object per value:
    building and validating one took ~30 us, twice per unit (measured, ``bench/bench_overhead.py``)."""
    from .noise import NoiseConfig
    return NoiseConfig(**dict(items))


def _unit_model(lm, state: dict, head: RunSpec, placement, check=None):
    """(lm-eval HFLM of the batch size, context that makes the model noisy for this unit; ``check()`` runs between
    the programmed layers and may raise Cancelled)."""
    from .tasks import quiet_hflm
    bs = head.batch_size
    if bs not in state["hflm"]:
        state["hflm"][bs] = quiet_hflm(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=bs)
    if head.ideal:
        return state["hflm"][bs], contextlib.nullcontext()
    from .analog import analog
    return state["hflm"][bs], analog(lm.model, lm.anatomy, placement, _noise_of(head.noise),
                                     seed=head.seed, backend=head.backend, check=check)


def _run_unit(lm, state, group: list[RunSpec], store: Store, cancel, calib_text, memo: dict, measured: dict,
              known: set | None = None, placement=None):
    """Build the placement and noisy model of one unit and run its tasks; yields (spec, metrics, run row).

    Identical work is done once. A computation is (weights, dtype, device, digital set, dense policy, noise,
    seed, backend, task, limit, few-shot, batch size, library versions), where the seed is dropped for a
    deterministic noise config (``NoiseConfig.deterministic``: no weight or output noise, so every seed gives the
    same numbers); e.g. budget 0 gives every strategy the same all-analog placement. Its hash is stored with each
    result (``compute_key``); a result whose computation was already done, in this call (``memo``) or in the
    store, is stored under its own key without running the model, marked ``shared_from`` = the key of the result
    that was computed, with duration_s 0. ``known``: the compute keys the store held when the sweep began
    (``Store.computed_keys``; None: look every one up), so a unit reads the store only for a computation found
    there (one computed meanwhile by another process is computed again: the same numbers, not marked shared).
    ``placement``: the unit's placement when the caller built it already (None: built here).
    """
    head = group[0]
    placement = placement if placement is not None else _unit_placement(lm, store, head, calib_text, measured)
    share = _digital_share(placement, lm.anatomy)
    prow = {"key": placement.key, "model_fingerprint": lm.fingerprint, "strategy": placement.strategy,
            "budget": placement.budget, "scope": placement.scope, "seed": placement.seed, "placement": placement.to_json()}
    same_any_seed = head.ideal or _noise_of(head.noise).deterministic
    cfg = head.config()
    ident = {"model": cfg["model"], "device": cfg["device"], "versions": cfg["versions"], "ideal": head.ideal,
             "digital": placement.digital, "dense": placement.dense, "noise": dict(head.noise),
             "seed": None if same_any_seed else head.seed, "backend": head.backend, "draws": cfg.get("draws")}

    comps = {id(spec): config_key({**ident, "task": [spec.task.name, spec.task.version], "limit": spec.limit,
                                   "num_fewshot": spec.num_fewshot, "batch_size": spec.batch_size})
             for spec in group}

    def comp(spec):
        return comps[id(spec)]

    def save(spec, metrics, started, duration, shared_from=None):
        run = {**spec.row(), "started_at": started, "duration_s": duration, "placement_key": placement.key,
               "digital_share": share, "compute_key": comp(spec), "shared_from": shared_from}
        metrics = [{**m, "seed": spec.seed} for m in metrics]
        store.put_result(spec.key, run, metrics, prow)
        return spec, metrics, run
    pending = []
    found = store.get_computed_many(c for c in map(comp, group) if c not in memo and (known is None or c in known))
    for spec in group:
        done = memo.get(comp(spec)) or found.get(comp(spec))
        if done is not None:
            memo[comp(spec)] = done
            yield save(spec, done[1], datetime.now(timezone.utc).replace(tzinfo=None), 0.0, shared_from=done[0])
        else:
            pending.append(spec)
    if not pending:
        return
    cancelled = cancel.is_set if cancel is not None else None
    check = _raiser(cancelled)
    check()
    hflm, ctx = _unit_model(lm, state, head, placement, check)
    with cancel_hooks(lm.model, lm.anatomy, cancelled), ctx:
        for spec in pending:
            check()
            started, t0 = datetime.now(timezone.utc).replace(tzinfo=None), time.perf_counter()
            try:
                metrics = _run_task(hflm, spec.task, spec, state["tasks"])
            except (ValueError, Cancelled):
                raise
            except Exception as e:
                store.put_failure(spec.key, spec.row(), f"{type(e).__name__}: {e}")
                raise
            memo[comp(spec)] = (spec.key, metrics)
            yield save(spec, metrics, started, time.perf_counter() - t0)


_SHARES_KEPT = 256   # placements whose digital share an anatomy keeps (_digital_share)


def _digital_share(placement, anatomy) -> float:
    """``placement.digital_share(placement, anatomy)["digital_share"]``, kept on the anatomy per placement key
    (the last ``_SHARES_KEPT``): a sweep stores it with every result, each preset's units of one placement alike,
    and counting the parameters took ~0.1 ms per result (measured, ``bench/bench_overhead.py``'s steady state)."""
    from .placement import digital_share
    memo = anatomy.__dict__.setdefault("_share_memo", {})
    if placement.key not in memo:
        memo[placement.key] = digital_share(placement, anatomy)["digital_share"]
        while len(memo) > _SHARES_KEPT:
            memo.pop(next(iter(memo)))
    return memo[placement.key]


def _raiser(cancelled: Callable[[], bool] | None) -> Callable[[], None]:
    """A check to call between pieces of work: raises :class:`Cancelled` once ``cancelled()`` is True."""
    def check():
        if cancelled is not None and cancelled():
            raise Cancelled()
    return check


def _activation_stats(lm, store: Store, calib_text: dict | None):
    """Routing statistics on the calibration text (routing caches them as .npz; the store keeps a JSON copy)."""
    from .routing import activation_stats, calibration_hash
    texts = calib_text if calib_text is not None else calibration_text(lm.source)[0]
    stats = activation_stats(lm.model, lm.tokenizer, lm.anatomy, texts, max_length=256, fingerprint=lm.fingerprint)
    name = f"activation:{calibration_hash(texts, 256)[:16]}"
    if _stats_missing(store, lm.fingerprint, name):
        store.put_expert_stats(lm.fingerprint, name, stats.to_dict())
    return stats


_STATS_KEPT: set = set()   # (store file, inode, model fingerprint, name) of expert statistics known to be stored
SHAPES = "(model shapes)"  # as a name for _stats_missing: the model's row of the model_shapes table


def _stats_missing(store, fingerprint: str, name: str) -> bool:
    """True when the store lacks the expert statistics ``name`` of the model, or its shapes for ``name`` = SHAPES
    (the caller then puts them); looked up once per process and store file (a connection costs ~10 ms), once per
    store object for a store without a path (a Ray worker's outbox). A store file replaced by a new one (new
    inode) is looked up again."""
    path = getattr(store, "path", None)
    if path is None:
        seen, key = store.__dict__.setdefault("_stats_kept", set()), (fingerprint, name)
    else:
        seen = _STATS_KEPT
        key = (str(path), path.stat().st_ino if path.exists() else None, fingerprint, name)
    if key in seen:
        return False
    missing = (store.get_model_shapes(fingerprint) if name == SHAPES else
               store.get_expert_stats(fingerprint, name)) is None
    seen.add(key)
    return missing


def evaluate(source: str = "default", *, strategy: str = "maxnn", budget: float = 0.125,
             preset: str = "paper-pcm-c1.5", seeds=1, tasks=("hetmoe_cloze",), **kw) -> list[dict]:
    """One placement and preset over ``seeds`` seeds: :func:`evaluate_many` with single-element lists."""
    return evaluate_many(source, strategies=[strategy], budgets=[budget], presets=[preset], seeds=seeds,
                         tasks=tasks, **kw)


def summarize(results: list[dict]) -> list[dict]:
    """Mean ± sample std over seeds per (strategy, budget, preset, backend, task, metric); ideal rows included.

    Returns [{strategy, budget, preset, backend, task, metric, mean, std, n_seeds, ideal, cached}] where cached is
    True when every seed came from the cache; std is None for one seed. Rows come in the order of ``results`` (the
    plan's), metrics by name within each: a computed result lists lm-eval's order, a stored one another, and a
    rerun must print the same rows in the same order.
    """
    groups: dict = {}
    for r in results:
        for m, v in sorted(r["metrics"].items()):
            k = (r["strategy"], r["budget"], r["preset"], r["backend"], r["task"], m)
            groups.setdefault(k, []).append((v, r["cached"], r["ideal"]))
    out = []
    for (s, b, p, be, t, m), vals in groups.items():
        xs = [v for v, _, _ in vals]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
        out.append({"strategy": s, "budget": b, "preset": p, "backend": be, "task": t, "metric": m, "mean": mean,
                    "std": std, "n_seeds": len(xs), "ideal": vals[0][2], "cached": all(c for _, c, _ in vals)})
    return out
