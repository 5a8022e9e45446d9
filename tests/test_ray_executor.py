"""Ray executor on a real local Ray: same numbers as the local executor, worker deaths retried, resumable driver."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetmoe_core.evaluate import evaluate_many, plan
from hetmoe_core.ray_executor import RayOptions, evaluate_many_ray, run_units
from hetmoe_core.store import Store

ROOT = Path(__file__).resolve().parent.parent
SWEEP = dict(strategies=["maxnn"], budgets=[0.25], presets=["paper-pcm-c1.5"], seeds=2, tasks=["hetmoe_cloze"],
             limit=3, batch_size=4)


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    # no idle workers started with the cluster: run_units' actors carry their own runtime env, so Ray never hands
    # them one, and on 2 cores their start-up only slows what the tests run meanwhile
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20,
             _system_config={"prestart_worker_first_driver": False})
    # units defined in this test module must reach the workers by value (tests/ is not on their path)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


def _rows(db):
    df = Store(db).runs_frame().sort_values(["key", "metric"])
    return df[["key", "metric", "value", "stderr", "digital_share", "config", "seed", "strategy"]].to_dict("records")


def test_ray_sweep_bit_identical_to_local(tmp_path, ray_local):
    local = evaluate_many("default", store=tmp_path / "local.duckdb", **SWEEP)
    seen = []
    remote = evaluate_many_ray("default", store=tmp_path / "ray.duckdb", options=RayOptions(workers=2),
                               progress=lambda d, t, r: seen.append((d, t, r["cached"])), **SWEEP)
    assert [r["key"] for r in remote] == [r["key"] for r in local] and len(local) == 3   # ideal + 2 seeds
    assert [r["metrics"] for r in remote] == [r["metrics"] for r in local]               # same bits
    assert [r["stderr"] for r in remote] == [r["stderr"] for r in local]
    assert local[1]["metrics"] != local[2]["metrics"]        # the seeds really differ: equality is not vacuous
    assert sorted(seen) == [(1, 3, False), (2, 3, False), (3, 3, False)]
    assert _rows(tmp_path / "ray.duckdb") == _rows(tmp_path / "local.duckdb")            # stored rows, configs
    a, b = Store(tmp_path / "local.duckdb"), Store(tmp_path / "ray.duckdb")
    fp = plan("default", **SWEEP)[0].fingerprint
    assert b.get_expert_stats(fp, "scores") == a.get_expert_stats(fp, "scores") is not None
    assert b.counts() == a.counts()
    again = evaluate_many_ray("default", store=tmp_path / "ray.duckdb", options=RayOptions(workers=2), **SWEEP)
    assert all(r["cached"] for r in again)                   # stored keys are never dispatched

    def ctrl_c(done, total, r):                              # Ctrl-C right after the first new result is stored
        if not r["cached"]:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        evaluate_many_ray("default", store=tmp_path / "ray.duckdb", options=RayOptions(workers=1), progress=ctrl_c,
                          **{**SWEEP, "seeds": 4})
    assert b.counts()["runs"] == 4                           # 3 before + the one whole result written
    deadline = time.monotonic() + 30                         # the actors are gone: their CPUs come back
    while ray_local.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_local.available_resources().get("CPU") == 2 and ray_local.is_initialized()


class _Ok:
    def __init__(self, x):
        self.x = x

    def __call__(self, cache):
        cache["n"] = cache.get("n", 0) + 1    # per-worker state survives between units
        return self.x * 2


class _DieOnce:
    """Kills its worker process the first time it runs (a marker file remembers), then succeeds."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __call__(self, cache):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return os.getpid()


class _AlwaysDie:
    def __call__(self, cache):
        os._exit(1)


class _Raise:
    def __init__(self, exc):
        self.exc = exc

    def __call__(self, cache):
        raise self.exc


def test_worker_death_retried_elsewhere_then_reported(tmp_path, ray_local):
    marker = tmp_path / "died"
    units = [_Ok(1), _DieOnce(marker), _AlwaysDie(), _Raise(RuntimeError("disk full")), _Ok(5)]
    got, errs = {}, {}
    stats = run_units(units, lambda u, v: got.__setitem__(units.index(u), v),
                      lambda u, why: errs.__setitem__(units.index(u), why), options=RayOptions(workers=2, max_retries=1))
    first_pid = int(marker.read_text())
    assert got[0] == 2 and got[4] == 10 and got[1] != first_pid     # retried on another (new) worker process
    assert set(got) == {0, 1, 4} and set(errs) == {2, 3}
    assert errs[2].startswith("worker died 2 times") and errs[3] == "RuntimeError: disk full"
    assert stats["retries"] == 2 and stats["failed"] == 2 and not stats["started_ray"]
    with pytest.raises(ValueError, match="context window"):          # bad input aborts, as locally
        run_units([_Raise(ValueError("answers longer than the model's context window"))], print, print,
                  options=RayOptions(workers=1))
    with pytest.raises(ValueError, match="--workers 9 does not fit"):
        run_units([_Ok(1)], print, print, options=RayOptions(workers=9))


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "hetmoe_core", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def test_cli_ray_sweep_kill9_then_resume(tmp_path, ray_local):
    """A real driver joins a running cluster (--address); kill -9 loses nothing stored; the rerun computes only
    what is missing."""
    db = tmp_path / "r.duckdb"
    address = ray_local.get_runtime_context().gcs_address
    args = ["sweep", "default", "--budgets", "0.25", "--seeds", "2", "--tasks", "hetmoe_cloze", "--limit", "3",
            "--batch-size", "4", "--executor", "ray", "--address", address, "--workers", "1", "--store", str(db),
            "--json"]
    p = _cli(*args)
    try:
        deadline = time.monotonic() + 300
        while not (db.exists() and Store(db).counts()["runs"] >= 1):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.2)
    finally:
        p.kill()                                                  # kill -9 of the driver
        p.wait()
    st = Store(db)
    n = st.counts()["runs"]
    per_run = st.query("SELECT r.key, count(m.key) AS n FROM runs r LEFT JOIN metrics m USING (key) GROUP BY r.key")
    assert 1 <= n < 3 and per_run.n.min() == per_run.n.max() > 0      # whole results only
    out, err = _cli(*args).communicate(timeout=300)
    res = json.loads(out)
    assert res["cached"] == n and res["computed"] == 3 - n, err
    assert {r["key"] for r in res["results"]} == {s.key for s in plan("default", budgets=[0.25], seeds=2,
                                                                      tasks=["hetmoe_cloze"], limit=3, batch_size=4)}
    assert Store(db).counts()["runs"] == 3


def test_measured_strategy_on_ray_same_numbers(tmp_path, ray_local):
    """local_error needs a measurement on the model: the workers make it and the numbers match the local run."""
    kw = dict(strategies=["local_error"], budgets=[0.25], presets=["paper-pcm-c2.5"], seeds=1, tasks=["hetmoe_cloze"],
              limit=2, batch_size=4, include_ideal=False)
    local = evaluate_many("tiny:olmoe", store=tmp_path / "a.duckdb", **kw)
    remote = evaluate_many_ray("tiny:olmoe", store=tmp_path / "b.duckdb", options=RayOptions(workers=1), **kw)
    assert [r["key"] for r in remote] == [r["key"] for r in local] and len(local) == 1
    assert remote[0]["metrics"] == local[0]["metrics"] and remote[0]["digital_share"] == local[0]["digital_share"]


def test_ray_validate_equals_local(tmp_path, ray_local):
    """validate with one seed per Ray unit (2 workers) gives the local validate's numbers, bit for bit."""
    from hetmoe_core.ray_executor import RayOptions as Opts
    from hetmoe_core.sensitivity import validate
    kw = dict(seeds=2, tokens=128, n_boot=50)
    local = validate("tiny:olmoe", "paper-pcm-c2.5", store=tmp_path / "l.duckdb", **kw).to_dict()
    seen = []
    remote = validate("tiny:olmoe", "paper-pcm-c2.5", store=tmp_path / "r.duckdb", executor=Opts(workers=2),
                      progress=lambda d, t: seen.append((d, t)), **kw).to_dict()
    assert remote == local and not remote["cached"] and sorted(seen) == [(1, 2), (2, 2)]
    from hetmoe_core.routing import is_builtin   # a tiny: model measures on the built-in sentences, as the UI does
    assert is_builtin(local["calibration"]["source"]) and local["calibration"]["tokens"] == 128
    per_seed = [r["only_this_seeds"] for r in local["experts"]]
    assert len(per_seed) == 16 and any(a != b for a, b in per_seed)   # the seeds really differ
    again = validate("tiny:olmoe", "paper-pcm-c2.5", store=tmp_path / "r.duckdb", executor=Opts(workers=2), **kw)
    assert again.cached and {**again.to_dict(), "cached": False} == remote   # the driver stored it
