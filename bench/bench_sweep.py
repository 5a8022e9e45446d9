"""Time a default sweep and its cached rerun; prints both and their ratio.

    python bench/bench_sweep.py                       # 4 budgets x 5 strategies x 3 seeds x 2 tasks, limit 8
    python bench/bench_sweep.py --limit 4 --source tiny:olmoe

Tasks default to the default model's local tasks (hetmoe_cloze, hetmoe_choice) when they ship, else two paper
tasks. The store is a fresh DuckDB file in a temporary folder; the rerun is answered from it (no forward pass).
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
os.environ.setdefault("TQDM_DISABLE", "1")   # lm-eval's per-task progress bars
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hetmoe_core.evaluate import _local_tasks, evaluate_many  # noqa: E402
from hetmoe_core.scores import STRATEGIES  # noqa: E402


def main():
    import logging
    for name in ("lm_eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    local = [t for t in ("hetmoe_cloze", "hetmoe_choice") if t in _local_tasks()]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="default")
    ap.add_argument("--budgets", default="0,0.125,0.25,0.5")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tasks", default=",".join(local) if len(local) == 2 else "paper_arc_easy,paper_winogrande")
    ap.add_argument("--preset", default="paper-pcm-c1.5")
    ap.add_argument("--limit", type=int, default=8)
    a = ap.parse_args()
    kw = dict(strategies=a.strategies, budgets=a.budgets, presets=a.preset, seeds=a.seeds, tasks=a.tasks,
              limit=a.limit)
    with tempfile.TemporaryDirectory() as d:
        store = Path(d) / "bench.duckdb"
        t0 = time.perf_counter()
        first = evaluate_many(a.source, store=store, **kw)
        t_sweep = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = evaluate_many(a.source, store=store, **kw)
        t_cached = time.perf_counter() - t0
    assert all(r["cached"] for r in again) and len(again) == len(first)
    print(f"sweep: {len(first)} results ({a.budgets} x {a.strategies} x {a.seeds} seeds x {a.tasks}, "
          f"limit {a.limit}, ideal included) on {a.source}")
    print(f"computed: {t_sweep:.1f} s ({t_sweep / len(first):.2f} s/result)")
    print(f"cached rerun: {t_cached * 1000:.0f} ms ({t_cached / len(first) * 1000:.2f} ms/result)")
    print(f"ratio computed/cached: {t_sweep / t_cached:.0f}x")


if __name__ == "__main__":
    main()
