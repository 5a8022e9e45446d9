"""Ray executor on a real local Ray: same numbers as the local executor, worker deaths retried, resumable driver."""
import json
import os
import signal
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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
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


def _wait_for_results(db, n, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if db.exists() and Store(db).counts()["runs"] >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} results after {timeout} s")


def test_cli_ray_sweep_ctrl_c_kill9_then_resume(tmp_path):
    """A real driver: Ctrl-C stops it cleanly, kill -9 loses nothing stored, the rerun computes only what is missing."""
    db = tmp_path / "r.duckdb"
    args = ["sweep", "default", "--budgets", "0.25", "--seeds", "3", "--tasks", "hetmoe_cloze", "--limit", "3",
            "--batch-size", "4", "--executor", "ray", "--workers", "1", "--store", str(db), "--json"]
    groups = []
    try:
        p = _cli(*args)
        groups.append(p.pid)
        _wait_for_results(db, 1, p)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130 and "interrupted" in err
        n1 = Store(db).counts()["runs"]
        p = _cli(*args)
        groups.append(p.pid)
        _wait_for_results(db, n1 + 1, p)
        p.kill()                                                  # kill -9 of the driver
        p.wait()
        st = Store(db)
        n2 = st.counts()["runs"]
        per_run = st.query("SELECT r.key, count(m.key) AS n FROM runs r LEFT JOIN metrics m USING (key) GROUP BY r.key")
        assert n1 < n2 < 4 and per_run.n.min() == per_run.n.max() > 0   # whole results only
        p = _cli(*args)
        out, err = p.communicate(timeout=300)
        res = json.loads(out)
        assert res["cached"] == n2 and res["computed"] == 4 - n2, err
        assert {r["key"] for r in res["results"]} == {s.key for s in plan("default", budgets=[0.25], seeds=3,
                                                                          tasks=["hetmoe_cloze"], limit=3, batch_size=4)}
    finally:
        for g in groups:      # Ray's node agents of a killed driver outlive it for a while: end them with it
            try:
                os.killpg(g, signal.SIGKILL)
            except ProcessLookupError:
                pass
