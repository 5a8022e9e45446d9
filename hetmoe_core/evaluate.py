"""Noisy evaluation of an MoE model under a placement and a noise preset, cached in the results store.

One *result* = one (model, placement request, noise preset, seed, backend, task, limit, few-shot, batch size):
one row in ``runs`` plus its metrics, keyed by ``RunSpec.key`` (sha256 of ``RunSpec.config()``). The ideal (all-digital, noise-free) result of the
same model and task is always computed once and cached alongside. Scores come from the lm-eval harness
(``HFLM`` around the in-memory model; tasks by name from lm-eval's registry, the paper suite built by
``paper_tasks`` and the default model's local tasks in ``hetmoe_core/assets/tasks``).

Cache hits are answered from the store without loading the model or running a forward pass: the model fingerprint
of a local folder (``default`` included) is the weights' content hash, remembered per file size and mtime.
All public functions may run in a background thread (e.g. a Streamlit page): connections are per call and each
loaded model is guarded by its own lock while its weights are noisy.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .store import Store, canonical_json, config_key

os.environ.setdefault("DISABLE_MULTIPROC", "1")   # lm-eval's bootstrap stderr: no process pool inside our process
ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
LOCAL_TASKS = ASSETS / "tasks"
BACKENDS = ("fast", "aihwkit")
IDEAL = "ideal"                    # strategy / preset / backend name of the all-digital reference results
BOOTSTRAP_ITERS = 1000             # lm-eval bootstrap draws for perplexity stderr (deterministic seeds in lm-eval)
_FP_CACHE = ROOT / "cache" / "fingerprints.json"


class Cancelled(Exception):
    """Raised inside a model forward when the caller's cancel event is set."""


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


_fp_lock = threading.Lock()


def source_fingerprint(source: str, revision: str | None = None) -> str:
    """The fingerprint ``models.load_model(source).fingerprint`` will have, without loading the model.

    Local folders ("default" included): sha256 of config.json and *.safetensors (models.weights_fingerprint),
    remembered in cache/fingerprints.json per (path, size, mtime) of those files. Hub ids: "hub:<id>@<revision>".
    "tiny:<family>": "tiny:<family>:seed0". Raises ValueError for an empty source.
    """
    source = (source or "").strip()
    if not source:
        raise ValueError("empty model source: give 'default', a Hugging Face hub id (org/name) or a local folder")
    if source.startswith("tiny:"):
        return f"{source}:seed0"
    if source == "default":
        folder = ASSETS / "default"
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            return f"hub:{source}@{revision or 'main'}"
    files = sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
    if not all(f.exists() for f in files) or len(files) < 2:
        raise ValueError(f"{folder} needs config.json and *.safetensors weights")
    stamp = canonical_json([[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    path = str(folder.resolve())
    with _fp_lock:
        memo = json.loads(_FP_CACHE.read_text()) if _FP_CACHE.exists() else {}
        hit = memo.get(path)
        if hit and hit.get("stamp") == stamp:
            return hit["fingerprint"]
        from .models import weights_fingerprint
        fp = weights_fingerprint(folder)
        memo[path] = {"stamp": stamp, "fingerprint": fp}
        _FP_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = _FP_CACHE.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, _FP_CACHE)
    return fp


@dataclass(frozen=True)
class TaskRef:
    """A resolved task: lm-eval name, content version (enters the key), folder for TaskManager or None."""
    name: str
    version: str
    include_path: str | None = None


_local_index: dict = {}


def _local_tasks() -> dict[str, TaskRef]:
    """lm-eval tasks shipped in hetmoe_core/assets/tasks (hetmoe_cloze, hetmoe_choice, hetmoe_ppl_<domain>),
    versioned by a hash of the files of their folder; re-read when a file's size or mtime changes."""
    if not LOCAL_TASKS.is_dir():
        return {}
    with _local_lock:
        return _scan_local_tasks()


_local_lock = threading.Lock()


def _scan_local_tasks() -> dict[str, TaskRef]:
    files = sorted(p for p in LOCAL_TASKS.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    stamp = canonical_json([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    if _local_index.get("stamp") != stamp:
        out = {}
        for y in files:
            if y.suffix not in (".yaml", ".yml"):
                continue
            for line in y.read_text(encoding="utf-8").splitlines():
                name = line.split(":", 1)[1].strip().strip("'\"") if line.startswith("task:") else ""
                if name:   # a group's "task:" line lists its members below: not a task name
                    h = hashlib.sha256()
                    for f in sorted(p for p in y.parent.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
                        h.update(f.name.encode() + f.read_bytes())
                    out[name] = TaskRef(name, h.hexdigest()[:16], str(y.parent))
        _local_index.update(stamp=stamp, tasks=out)
    return dict(_local_index["tasks"])


def task_aliases() -> dict[str, list[str]]:
    """Names that stand for several tasks: "paper" (the paper's offline suite), "local" (the default model's),
    "ppl" (its per-domain perplexity tasks)."""
    from .paper_tasks import PAPER_TASKS
    local = sorted(_local_tasks())
    return {"paper": list(PAPER_TASKS), "local": local, "ppl": [t for t in local if t.startswith("hetmoe_ppl_")]}


def resolve_tasks(tasks) -> list[TaskRef]:
    """Task names (list or comma-separated string; aliases from task_aliases) -> TaskRefs.

    Local and paper tasks get a content version; any other name is an lm-eval registry task, versioned by the
    lm-eval version (its yaml ships with it) and checked against the registry when it first has to run.
    Raises ValueError for an empty list.
    """
    from .paper_tasks import PAPER_TASKS, paper_task_version, DEFAULT_DIR
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise ValueError("no task given; e.g. --tasks hetmoe_cloze,paper_arc_easy (aliases: paper, local)")
    aliases, local, out = task_aliases(), _local_tasks(), []
    for n in names:
        for name in aliases.get(n, [n]):
            if name in PAPER_TASKS:
                ref = TaskRef(name, paper_task_version(name), str(DEFAULT_DIR))
            elif name in local:
                ref = local[name]
            else:
                ref = TaskRef(name, f"lm_eval={library_versions()['lm_eval']}", None)
            if ref not in out:
                out.append(ref)
    if not out:
        raise ValueError(f"tasks {names} name no task (the 'local' tasks ship with the default model)")
    return out


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
    calibration: str | None = None   # hash of the calibration text (frequency / weight strategies)

    def config(self) -> dict:
        """The canonical config whose hash is the cache key (see module docstring of store)."""
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
                "noise": dict(self.noise), "seed": self.seed, "backend": self.backend}

    @property
    def key(self) -> str:
        return config_key(self.config())

    def row(self) -> dict:
        """Columns of the runs table (besides key/status/timings)."""
        return {"model_source": self.source, "model_fingerprint": self.fingerprint, "strategy": self.strategy,
                "budget": self.budget, "scope": self.scope if not self.ideal else IDEAL, "preset": self.preset,
                "seed": self.seed, "backend": self.backend, "task": self.task.name, "task_version": self.task.version,
                "limit": self.limit, "num_fewshot": self.num_fewshot, "batch_size": self.batch_size,
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
    from .noise import get_preset
    from .placement import DensePolicy, SCOPES
    from .scores import STRATEGIES
    strategies = _as_list(strategies)
    budgets = _as_list(budgets, float)
    presets = _as_list(presets)
    seeds = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else _as_list(seeds, int)
    _check(bool(strategies) and all(s in STRATEGIES for s in strategies),
           f"strategies {strategies} must be from {', '.join(STRATEGIES)}")
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
    for p in presets:
        noise = tuple(sorted(noises[p].to_dict().items()))
        for s in strategies:
            calib = calibration_hash if s in ("frequency", "weight") else None
            if s in ("frequency", "weight") and calib is None:
                calib = default_calibration(source)[1]
            for b in budgets:
                for seed in seeds:
                    for t in refs:
                        specs.append(RunSpec(task=t, strategy=s, budget=b, scope=scope,
                                             dense=tuple(sorted(asdict(dense_p).items())), noise=noise, preset=p,
                                             seed=seed, backend=backend, calibration=calib, **common))
    return specs


# ---------------------------------------------------------------------------------------------- calibration

def default_calibration(source: str | None = None) -> tuple[dict, str]:
    """Calibration text of the Activation Frequency / Weight strategies for model ``source``
    (routing.default_calibration, the same text ``scores`` and ``place`` use) and its hash
    (routing.calibration_hash, max_length 256)."""
    from .routing import calibration_hash, default_calibration as texts_of
    texts, _ = texts_of(source)
    return texts, calibration_hash(texts, 256)


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
            _per_model[lm] = {"lock": threading.Lock(), "hflm": {}}
        return _per_model[lm]


_tm_lock = threading.Lock()
_task_managers: dict = {}


def _task_manager(include_paths: tuple, defaults: bool):
    from lm_eval.tasks import TaskManager
    with _tm_lock:
        # task folders built later in this process (e.g. another paper task) must be indexed too
        k = (include_paths, defaults, tuple(sorted(str(f) for d in include_paths for f in Path(d).rglob("*.yaml"))))
        if k not in _task_managers:
            _task_managers[k] = TaskManager(include_path=list(include_paths) or None, include_defaults=defaults)
        return _task_managers[k]


def _run_task(hflm, ref: TaskRef, spec: RunSpec) -> list[dict]:
    """One lm-eval task on the model as it is now; returns [{task, metric, value, stderr}]."""
    import lm_eval
    tm = _task_manager((ref.include_path,) if ref.include_path else (), ref.include_path is None)
    limit = None if spec.limit is None else (int(spec.limit) if spec.limit >= 1 else spec.limit)
    try:
        with contextlib.redirect_stdout(sys.stderr):   # lm-eval prints progress notes; stdout stays for --json
            res = lm_eval.simple_evaluate(model=hflm, tasks=[ref.name], task_manager=tm, limit=limit,
                                          num_fewshot=spec.num_fewshot, bootstrap_iters=BOOTSTRAP_ITERS,
                                          log_samples=False, verbosity="ERROR")
    except AssertionError:   # lm-eval asserts that every answer fits the model's context window
        raise ValueError(f"task {ref.name} has answers longer than the model's context window "
                         f"({hflm.max_length} tokens); choose another task or a model with a longer context") from None
    out = []
    for task, vals in res["results"].items():
        for k, v in vals.items():
            if "," not in k or "_stderr," in k or not isinstance(v, (int, float)):
                continue
            metric, filt = k.split(",", 1)
            se = vals.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric}[{filt}]"
            out.append({"task": task, "metric": name, "value": float(v),
                        "stderr": float(se) if isinstance(se, (int, float)) else None})
    if not out:
        raise RuntimeError(f"lm-eval returned no metrics for {ref.name}")
    return out


# ---------------------------------------------------------------------------------------------- evaluation

def _result(spec: RunSpec, cached: bool, metrics: list[dict], run: dict | None = None) -> dict:
    return {"key": spec.key, "cached": cached, "ideal": spec.ideal, "task": spec.task.name, "strategy": spec.strategy,
            "budget": spec.budget, "preset": spec.preset, "seed": spec.seed, "backend": spec.backend,
            "metrics": {m["metric"]: m["value"] for m in metrics},
            "stderr": {m["metric"]: m["stderr"] for m in metrics},
            "digital_share": (run or {}).get("digital_share"), "duration_s": (run or {}).get("duration_s")}


def evaluate_many(source: str = "default", *, store: Store | str | None = None, lm=None,
                  progress: Callable[[int, int, dict], None] | None = None, cancel: threading.Event | None = None,
                  trust_remote_code: bool = False, calibration: dict | None = None, **plan_kw) -> list[dict]:
    """Evaluate the product strategies × budgets × presets × seeds × tasks (see :func:`plan`), cache first.

    Cached results are reported at once (progress(done, total, result) with result["cached"] True) and the model is
    not loaded when everything is cached. Missing results are computed unit by unit (one placement + noise + seed
    = one noisy model, all its tasks), each stored in its own transaction as soon as it is done, so a killed sweep
    resumes where it stopped. ``lm``: an already loaded models.LoadedModel to use instead of loading ``source``
    (its fingerprint keys the results; ``source`` is then only a label).
    ``cancel``: a threading.Event; when set, the running forward raises and the call returns the results so far.
    Returns one dict per result: key, cached, ideal, task, strategy, budget, preset, seed, backend,
    metrics {name: value}, stderr {name: value}, digital_share, duration_s.
    Raises ValueError for bad input (nothing is stored then).
    """
    calib_hash = None
    if calibration is not None:
        from .routing import calibration_hash
        calib_hash = calibration_hash(calibration, 256)
    fp = lm.fingerprint if lm is not None else None
    specs = plan(source, calibration_hash=calib_hash, fingerprint=fp, **plan_kw)   # all checks before the store
    store = store if isinstance(store, Store) else Store(store)
    total, results = len(specs), {}
    have = store.get_results(s.key for s in specs)
    for s in specs:
        if s.key in have:
            results[s.key] = _result(s, True, have[s.key]["metrics"], have[s.key]["run"])
            if progress:
                progress(len(results), total, results[s.key])
    todo = [s for s in specs if s.key not in results]
    if not todo or (cancel is not None and cancel.is_set()):
        return [results[s.key] for s in specs if s.key in results]
    registry = sorted({s.task.name for s in todo if s.task.include_path is None})
    if registry:   # check lm-eval registry names before loading anything
        unknown = [t for t in registry if t not in _task_manager((), True).all_tasks]
        _check(not unknown, f"unknown task(s) {', '.join(unknown)}: not a hetmoe, paper ({', '.join(task_aliases())} "
                            f"aliases) or lm-eval task")
    if lm is None:
        lm = _get_model(source, plan_kw.get("device", "cpu"), plan_kw.get("dtype", "float32"),
                        plan_kw.get("revision"), trust_remote_code)
    if lm.fingerprint != todo[0].fingerprint:   # cache fingerprint went stale: key by the loaded weights
        _FP_CACHE.unlink(missing_ok=True)
        raise RuntimeError(f"model fingerprint changed ({todo[0].fingerprint} -> {lm.fingerprint}); run again")
    st = _state(lm)
    if store.get_expert_stats(lm.fingerprint, "scores") is None:   # MaxNNScore / router norm, for the dashboard
        from .scores import expert_scores
        store.put_expert_stats(lm.fingerprint, "scores", expert_scores(lm.anatomy).to_dict())
    units, memo = {}, {}
    for s in todo:
        units.setdefault(s.unit, []).append(s)
    try:
        for group in units.values():
            if cancel is not None and cancel.is_set():
                break
            with st["lock"]:
                for spec, metrics, run in _run_unit(lm, st, group, store, cancel, calibration, memo):
                    results[spec.key] = _result(spec, False, metrics, run)
                    if progress:
                        progress(len(results), total, results[spec.key])
    except Cancelled:
        pass
    return [results[s.key] for s in specs if s.key in results]


def _run_unit(lm, st, group: list[RunSpec], store: Store, cancel, calibration, memo: dict):
    """Build the placement and noisy model of one unit and run its tasks; yields (spec, metrics, run row).

    ``memo`` maps a computation (digital set, dense policy, noise, seed, backend, task, limit, few-shot, batch) to
    metrics already computed in this call: e.g. budget 0 gives every strategy the same all-analog placement, and the
    analog noise depends only on the seed and which modules are analog, so those results are identical by
    construction and are stored without running the model again (duration_s 0).
    """
    from lm_eval.models.huggingface import HFLM
    from .placement import DensePolicy, Placement, digital_share, place
    head = group[0]
    if head.ideal:
        placement = Placement.all_digital(lm.anatomy)
    else:
        stats = _activation_stats(lm, store, calibration) if head.strategy in ("frequency", "weight") else None
        placement = place(lm.anatomy, head.strategy, head.budget, scope=head.scope, dense=DensePolicy(**dict(head.dense)),
                          seed=head.seed, stats=stats)
    share = digital_share(placement, lm.anatomy)["digital_share"]
    prow = {"key": placement.key, "model_fingerprint": lm.fingerprint, "strategy": placement.strategy,
            "budget": placement.budget, "scope": placement.scope, "seed": placement.seed, "placement": placement.to_json()}
    ident = (head.ideal, placement.digital, placement.dense, head.noise, head.seed, head.backend)

    def comp(spec):
        return ident + (spec.task, spec.limit, spec.num_fewshot, spec.batch_size)

    def save(spec, metrics, started, duration):
        run = {**spec.row(), "started_at": started, "duration_s": duration, "placement_key": placement.key,
               "digital_share": share}
        metrics = [{**m, "seed": spec.seed} for m in metrics]
        store.put_result(spec.key, run, metrics, prow)
        return spec, metrics, run
    pending = []
    for spec in group:
        if comp(spec) in memo:
            yield save(spec, memo[comp(spec)], datetime.now(timezone.utc).replace(tzinfo=None), 0.0)
        else:
            pending.append(spec)
    if not pending:
        return
    bs = head.batch_size
    if bs not in st["hflm"]:
        st["hflm"][bs] = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=bs)
    hflm = st["hflm"][bs]
    if head.ideal:
        ctx = contextlib.nullcontext()
    else:
        from .analog import analog
        from .noise import NoiseConfig
        ctx = analog(lm.model, lm.anatomy, placement, NoiseConfig(**dict(head.noise)), seed=head.seed,
                     backend=head.backend)

    def guard(_m, _a):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
    hook = lm.model.register_forward_pre_hook(guard)
    try:
        with ctx:
            for spec in pending:
                started, t0 = datetime.now(timezone.utc).replace(tzinfo=None), time.perf_counter()
                try:
                    metrics = _run_task(hflm, spec.task, spec)
                except (ValueError, Cancelled):
                    raise
                except Exception as e:
                    store.put_failure(spec.key, spec.row(), f"{type(e).__name__}: {e}")
                    raise
                memo[comp(spec)] = metrics
                yield save(spec, metrics, started, time.perf_counter() - t0)
    finally:
        hook.remove()


def _activation_stats(lm, store: Store, calibration: dict | None):
    """Routing statistics on the calibration text (routing caches them as .npz; the store keeps a JSON copy)."""
    from .routing import activation_stats, calibration_hash
    texts = calibration if calibration is not None else default_calibration(lm.source)[0]
    stats = activation_stats(lm.model, lm.tokenizer, lm.anatomy, texts, max_length=256, fingerprint=lm.fingerprint)
    name = f"activation:{calibration_hash(texts, 256)[:16]}"
    if store.get_expert_stats(lm.fingerprint, name) is None:
        store.put_expert_stats(lm.fingerprint, name, stats.to_dict())
    return stats


def evaluate(source: str = "default", *, strategy: str = "maxnn", budget: float = 0.125,
             preset: str = "paper-pcm-c1.5", seeds=1, tasks=("hetmoe_cloze",), **kw) -> list[dict]:
    """One placement and preset over ``seeds`` seeds: :func:`evaluate_many` with single-element lists."""
    return evaluate_many(source, strategies=[strategy], budgets=[budget], presets=[preset], seeds=seeds,
                         tasks=tasks, **kw)


def summarize(results: list[dict]) -> list[dict]:
    """Mean ± sample std over seeds per (strategy, budget, preset, backend, task, metric); ideal rows included.

    Returns [{strategy, budget, preset, backend, task, metric, mean, std, n_seeds, ideal, cached}] where cached is
    True when every seed came from the cache; std is None for one seed.
    """
    groups: dict = {}
    for r in results:
        for m, v in r["metrics"].items():
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
