"""Time one 24-result sweep with the local executor and with Ray (2 workers); print the ratio and Ray's overhead.

    python bench/bench_ray.py                     # default model, 3 strategies x 2 budgets x 2 seeds x 2 tasks, limit 8
    python bench/bench_ray.py --workers 2 --limit 4

Both runs start from a fresh store in a temporary folder and must give the same keys and bit-identical numbers
(checked). Ray runs on a local instance started here (``ray.init(num_cpus=N)``, no dashboard), timed apart. Overhead
per unit = (Ray wall time, start included - local wall time) / units: on a 2-core machine Ray cannot be faster (the
local executor already uses both cores), so this is what the distribution costs, not a speed-up; on a cluster each
worker is another machine or GPU.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hetmoe_core.evaluate import evaluate_many, plan  # noqa: E402
from hetmoe_core.ray_executor import RayOptions, evaluate_many_ray  # noqa: E402


def main():
    import logging
    for name in ("lm_eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="default")
    ap.add_argument("--strategies", default="maxnn,router_norm,random")
    ap.add_argument("--budgets", default="0.125,0.25")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--tasks", default="hetmoe_cloze,hetmoe_choice")
    ap.add_argument("--preset", default="paper-pcm-c1.5")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance")
    a = ap.parse_args()
    kw = dict(strategies=a.strategies, budgets=a.budgets, presets=a.preset, seeds=a.seeds, tasks=a.tasks,
              limit=a.limit, include_ideal=False)
    specs = plan(a.source, **kw)
    units = len({s.unit for s in specs})
    import ray
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        local = evaluate_many(a.source, store=Path(d) / "local.duckdb", **kw)
        t_local = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        t_start = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            remote = evaluate_many_ray(a.source, store=Path(d) / "ray.duckdb", options=RayOptions(workers=a.workers),
                                       **kw)
            t_run = time.perf_counter() - t0
        finally:
            ray.shutdown()
    assert [r["key"] for r in remote] == [r["key"] for r in local], "different keys"
    assert [r["metrics"] for r in remote] == [r["metrics"] for r in local], "different numbers"
    t_ray = t_start + t_run
    print(f"sweep: {len(local)} results in {units} units ({a.strategies} x budgets {a.budgets} x {a.seeds} seeds x "
          f"{a.tasks}, limit {a.limit}) on {a.source}; {os.cpu_count()} CPUs; same keys, bit-identical numbers")
    print(f"local executor: {t_local:.1f} s ({t_local / units:.2f} s/unit)")
    print(f"ray, {a.workers} workers: {t_ray:.1f} s = start {t_start:.1f} s + run {t_run:.1f} s "
          f"({t_ray / units:.2f} s/unit)")
    print(f"ratio ray/local: {t_ray / t_local:.2f}")
    print(f"ray overhead per unit: {(t_ray - t_local) / units:+.2f} s ((ray - local) / {units} units)")


if __name__ == "__main__":
    main()
