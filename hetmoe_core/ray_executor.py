"""Ray executor: run units of work on a Ray cluster, one actor per worker, results returned to the driver.

A *unit* is any picklable callable ``unit(cache) -> value`` that runs on a worker; ``cache`` is a dict private to
that worker process, kept for its lifetime (e.g. a loaded model is loaded once per worker, not once per unit).
:func:`run_units` dispatches units to a fixed set of actors with ``ray.wait`` and hands every value back to the
driver's ``on_result`` as it arrives; nothing on a worker touches the results store, so the driver stays its only
writer (DuckDB lets one read-write process lock out every other).

Failure handling:
  * a unit that raises ValueError (bad input, e.g. a task longer than the model's context) aborts the run with that
    message, as the local executor does;
  * a unit that raises anything else is reported once through ``on_error`` (not retried: code errors recur);
  * a worker that dies (killed, out of memory, node lost) is replaced by a new actor and its unit retried on the next
    free worker, at most ``max_retries`` times; then ``on_error`` says why;
  * Ctrl-C (KeyboardInterrupt) or ``cancel.set()`` kills the actors and returns; what ``on_result`` stored stays.

Ray is started by :func:`connect` when the caller has not: ``address=None`` starts a private local instance (no
dashboard, usage statistics off unless RAY_USAGE_STATS_ENABLED says otherwise) that ends with the run; an address
("auto", "host:6379", "ray://host:10001") joins an existing cluster started with ``ray start --head``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HETMOE_DEBUG")
"""Driver environment variables passed on to the workers when set (offline mode must hold there too)."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run.

    address: None starts a private local Ray for this run; "auto" joins the cluster this machine belongs to
        (``ray start``); "host:port" or "ray://host:10001" joins that cluster.
    workers: number of actors (each loads the model once); None: one per GPU (``gpus_per_worker`` > 0) or one per
        ``threads`` CPUs of the cluster.
    gpus_per_worker: GPUs each actor reserves (0: CPU workers); the actor sees only its own GPU(s), so
        ``--device cuda`` means its GPU.
    threads: torch intra-op threads per worker; None uses the driver's ``torch.get_num_threads()``, which makes CPU
        results bit-identical to the local executor on the same machine (float sums depend on the thread count).
    max_retries: how many times a unit whose worker died is retried on another worker before it is recorded failed.
    """
    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0
    threads: int | None = None
    max_retries: int = 2

    def check(self) -> None:
        """Raises ValueError for counts out of range."""
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ValueError(f"--workers must be an integer >= 1, got {self.workers!r}")
        if not self.gpus_per_worker >= 0:
            raise ValueError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads per worker must be >= 1, got {self.threads!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries!r}")


def _import_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # no usage report from a started head unless asked
    try:
        import ray
    except ImportError:
        raise ValueError("the Ray executor needs ray: run `bash scripts/setup.sh` (it installs requirements.txt)") from None
    return ray


def connect(address: str | None = None) -> bool:
    """Make sure this process is connected to Ray; returns True when this call started or joined it (then the
    caller shuts it down), False when Ray was already initialised (e.g. by a test or a notebook).

    Raises ValueError with what to do when the address does not answer.
    """
    ray = _import_ray()
    if ray.is_initialized():
        return False
    try:
        if address is None:   # a private instance: never attach to someone else's cluster by accident
            ray.init(address="local", include_dashboard=False, object_store_memory=200 * 2**20,
                     log_to_driver=False, logging_level=logging.WARNING)
        elif address.startswith("ray://"):   # Ray Client: the cluster's own settings apply
            ray.init(address=address)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise ValueError(f"no Ray cluster at {address!r} ({str(e).splitlines()[0]}); start one with "
                         "`ray start --head` or drop --address to run on a local Ray") from None
    return True


class _Worker:
    """The actor: runs the units it is sent, keeping ``cache`` (e.g. the loaded model) between them.

    The torch thread count comes from OMP_NUM_THREADS in its environment (read when a unit first imports torch;
    Ray would otherwise set it to the actor's CPU count), so units that never touch torch start fast.
    """

    def __init__(self):
        for name in ("lm_eval", "datasets", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.cache: dict = {}

    def run(self, unit):
        return unit(self.cache)


def _worker_count(ray, opts: RayOptions, threads: int) -> int:
    res = ray.cluster_resources()
    if opts.gpus_per_worker > 0:
        gpus = res.get("GPU", 0)
        fit = int(gpus // opts.gpus_per_worker)
        if fit < 1:
            raise ValueError(f"the Ray cluster has {gpus:g} GPUs, fewer than --gpus-per-worker "
                             f"{opts.gpus_per_worker:g}; join a GPU node or use --gpus-per-worker 0")
    else:
        fit = int(res.get("CPU", 1))
    if opts.workers is None:
        return max(1, fit if opts.gpus_per_worker > 0 else fit // threads)
    if opts.workers > fit:
        what = "GPUs" if opts.gpus_per_worker > 0 else "CPUs"
        raise ValueError(f"--workers {opts.workers} does not fit the Ray cluster ({fit} workers' worth of {what}); "
                         f"give --workers {fit} or fewer, or join more nodes")
    return opts.workers


def run_units(units: list, on_result: Callable[[Any, Any], None], on_error: Callable[[Any, str], None], *,
              options: RayOptions = RayOptions(), cancel: threading.Event | None = None) -> dict:
    """Run every unit on Ray workers; ``on_result(unit, value)`` / ``on_error(unit, why)`` run on the driver, in
    arrival order, one call per unit.

    Returns {"workers": n, "retries": worker deaths retried, "failed": units reported to on_error,
    "cancelled": bool, "started_ray": bool}. Raises ValueError for bad options or when a unit raised ValueError
    (after the actors are stopped); KeyboardInterrupt passes through after the actors are stopped.
    """
    options.check()
    if not units:
        return {"workers": 0, "retries": 0, "failed": 0, "cancelled": False, "started_ray": False}
    ray = _import_ray()
    from ray.exceptions import RayActorError, RayTaskError
    threads = options.threads
    if threads is None:
        import torch
        threads = torch.get_num_threads()
    started = connect(options.address)
    actors: list = []
    try:
        n = min(_worker_count(ray, options, threads), len(units))
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env.update(TQDM_DISABLE="1", DISABLE_MULTIPROC="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        cls = ray.remote(num_cpus=1, num_gpus=options.gpus_per_worker, max_restarts=0,
                         runtime_env={"env_vars": env})(_Worker)

        def new_actor():
            a = cls.remote()
            actors.append(a)
            return a

        idle = deque(new_actor() for _ in range(n))
        pending = deque(range(len(units)))
        running: dict = {}           # ObjectRef -> (actor, unit index)
        deaths = [0] * len(units)
        stats = {"workers": n, "retries": 0, "failed": 0, "cancelled": False, "started_ray": started}
        while pending or running:
            while idle and pending:
                a, i = idle.popleft(), pending.popleft()
                running[a.run.remote(units[i])] = (a, i)
            if cancel is not None and cancel.is_set():
                stats["cancelled"] = True
                break
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in done:
                a, i = running.pop(ref)
                try:
                    value = ray.get(ref)
                except RayActorError as e:      # the worker process died: replace it, retry the unit elsewhere
                    deaths[i] += 1
                    actors.remove(a)
                    ray.kill(a)                 # "unavailable" may mean cut off, not dead: never use it again
                    if deaths[i] <= options.max_retries:
                        stats["retries"] += 1
                        pending.appendleft(i)
                    else:
                        stats["failed"] += 1
                        on_error(units[i], f"worker died {deaths[i]} times running this unit; last: "
                                           f"{str(e).splitlines()[0][:300]}")
                    if pending:
                        idle.append(new_actor())
                    continue
                except RayTaskError as e:       # the unit raised on the worker
                    cause = e.cause
                    if isinstance(cause, ValueError):
                        raise ValueError(str(cause)) from None
                    stats["failed"] += 1
                    on_error(units[i], f"{type(cause).__name__}: {cause}" if cause else str(e).splitlines()[0])
                    idle.append(a)
                    continue
                idle.append(a)
                on_result(units[i], value)
        return stats
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------- sweeps

class _Outbox:
    """Stands in for the results store on a worker: records the writes ``evaluate._run_unit`` makes so that the
    driver replays them, each result in its own transaction, in the order they were made."""

    def __init__(self, sensitivities: dict | None = None):
        self.writes: list[tuple] = []
        self.sensitivities = {} if sensitivities is None else sensitivities   # key -> stored measurement (JSON)

    def put_result(self, key, run, metrics, placement=None) -> bool:
        self.writes.append(("result", key, run, metrics, placement))
        return True

    def get_computed_many(self, compute_keys):
        # A worker cannot read the driver's store: identical work done earlier in this worker is reused through
        # evaluate's memo; work done elsewhere is recomputed here (same numbers), stored without ``shared_from``.
        return {}

    def put_failure(self, key, run, error) -> None:
        self.writes.append(("failure", key, run, error))

    def get_expert_stats(self, model_fingerprint, name):
        return None          # the driver keeps the first copy it receives

    def put_expert_stats(self, model_fingerprint, name, stats) -> None:
        self.writes.append(("stats", model_fingerprint, name, stats))

    def get_model_shapes(self, model_fingerprint):
        return None          # the driver keeps the first copy it receives

    def put_model_shapes(self, model_fingerprint, model_source, shapes) -> bool:
        self.writes.append(("shapes", model_fingerprint, model_source, shapes))
        return True

    def get_sensitivity(self, key):
        return self.sensitivities.get(key)

    def put_sensitivity(self, key, model_fingerprint, preset, config, result) -> bool:
        self.sensitivities[key] = result
        self.writes.append(("sensitivity", key, model_fingerprint, preset, config, result))
        return True


@dataclass
class SweepUnit:
    """One noisy model of a sweep: the RunSpecs sharing ``RunSpec.unit`` (placement, noise preset, seed, backend),
    all their tasks, evaluated exactly as the local executor does (``evaluate._run_unit``), so the numbers are the
    same bits. Returns {"writes": [...], "error": str | None}; raises ValueError for bad input."""
    specs: list
    source: str
    revision: str | None
    trust_remote_code: bool
    calibration: dict | None
    sensitivities: dict      # stored sensitivity measurements of this model (oracle strategy), key -> JSON

    def __call__(self, cache: dict) -> dict:
        from . import evaluate as ev
        head = self.specs[0]
        lm = ev._get_model(self.source, head.device, head.dtype, self.revision, self.trust_remote_code)
        if lm.fingerprint != head.fingerprint:
            import socket
            raise ValueError(f"the model {self.source!r} on worker host {socket.gethostname()} has fingerprint "
                             f"{lm.fingerprint}, the driver's is {head.fingerprint}: put the same weights on every node")
        box = _Outbox(cache.setdefault("sensitivities", dict(self.sensitivities)))
        if not cache.get("scores_sent"):          # MaxNNScore / router norm for the dashboard, once per worker
            from .energy import keep_shapes
            from .scores import expert_scores
            box.put_expert_stats(lm.fingerprint, "scores", expert_scores(lm.anatomy).to_dict())
            keep_shapes(box, lm)                  # and the shapes energy costs need
            cache["scores_sent"] = True
        memo = cache.setdefault("memo", {})       # budget 0 gives all strategies one placement: computed once
        measured = cache.setdefault("measured", {})   # oracle / local_error scores, once per worker and noise
        st = ev._state(lm)
        error = None
        try:
            need = [s for s in self.specs if not s.ideal and (s.strategy, s.noise) not in measured]
            measured.update(ev._measured(lm, need, box, self.calibration, None))
            with st["lock"]:
                for _ in ev._run_unit(lm, st, self.specs, box, None, self.calibration, memo, measured):
                    pass
        except ValueError:
            raise
        except Exception as e:                    # its failure row is in the outbox; keep what was computed
            error = f"{type(e).__name__}: {e}"
        return {"writes": box.writes, "error": error}


def evaluate_many_ray(source: str = "default", *, store=None, progress=None, cancel: threading.Event | None = None,
                      trust_remote_code: bool = False, calibration: dict | None = None,
                      options: RayOptions = RayOptions(), **plan_kw) -> list[dict]:
    """:func:`evaluate.evaluate_many` on a Ray cluster: same arguments, same keys, same numbers, same return value.

    Stored keys are skipped before anything is dispatched; each missing unit (one noisy model, all its tasks) goes
    to a worker that loaded the model once; the driver writes each result to ``store`` in its own transaction as it
    arrives, so a killed driver resumes where it stopped and a dashboard sees results live. A unit whose worker died
    more than ``options.max_retries`` times gets an ``error`` row per result. Raises ValueError for bad input
    (nothing stored), RuntimeError after the run when some results failed (their error rows are stored).
    """
    import json
    from .evaluate import _result, cached_first
    from .strategies import STRATEGIES
    from .sweep import units as group_units
    options.check()
    specs, store, results, todo, report, _ = cached_first(source, store, progress, cancel, calibration, **plan_kw)
    if not todo:
        return [results[s.key] for s in specs if s.key in results]
    sens = {}
    if any(not s.ideal and STRATEGIES[s.strategy].needs == "measurement" for s in todo):
        rows = store.query("SELECT key, result FROM sensitivity WHERE model_fingerprint=?", [todo[0].fingerprint])
        sens = {k: json.loads(r) for k, r in zip(rows["key"], rows["result"])}
    units = [SweepUnit(g, source, plan_kw.get("revision"), trust_remote_code, calibration, sens)
             for g in group_units(todo)]
    by_key = {s.key: s for s in todo}
    stats_done: set = set()
    errors: list[str] = []

    def on_result(unit: SweepUnit, value: dict) -> None:
        for w in value["writes"]:
            if w[0] == "result":
                _, key, run, metrics, placement = w
                store.put_result(key, run, metrics, placement)
                report(by_key[key], _result(by_key[key], False, metrics, run))
            elif w[0] == "failure":
                store.put_failure(w[1], w[2], w[3])
            elif w[0] == "sensitivity":
                store.put_sensitivity(*w[1:])
            elif w[0] == "shapes":
                if ("shapes", w[1]) not in stats_done:   # append-only: a second copy changes nothing
                    store.put_model_shapes(w[1], w[2], w[3])
                    stats_done.add(("shapes", w[1]))
            elif (w[1], w[2]) not in stats_done:
                if store.get_expert_stats(w[1], w[2]) is None:
                    store.put_expert_stats(w[1], w[2], w[3])
                stats_done.add((w[1], w[2]))
        if value["error"]:
            errors.append(value["error"])

    def on_error(unit: SweepUnit, why: str) -> None:
        for s in unit.specs:
            if s.key not in results:
                store.put_failure(s.key, s.row(), why)
        errors.append(why)

    run_units(units, on_result, on_error, options=options, cancel=cancel)
    if errors:
        raise RuntimeError(f"{len(errors)} unit(s) failed, first: {errors[0]}; their error rows are in the store, "
                           f"the {len(results)} other results are stored (rerun to retry the failed ones)")
    return [results[s.key] for s in specs if s.key in results]
