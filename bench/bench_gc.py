"""Cost of Streamlit's per-rerun full garbage collection (runner.postScriptGC = gc.collect(2)) in the dashboard's
process, before and after gc.freeze() of the heavy imports (prints figures; never a test).

    python bench/bench_gc.py

Imports what a dashboard server holds after the first model page (streamlit, plotly, torch, transformers,
hetmoe_core), loads the default model and its scores, then times gc.collect(2): (a) as Streamlit runs it today,
(b) after ui's one-time gc.freeze() of the imports. The ratio b / a is the figure to keep small; the freeze keeps
later objects (models, figures, session data) collectable, so memory stays bounded (see bench_soak.py for RSS).
"""
import gc
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(v, "1")


def collect_ms(n=7):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        gc.collect(2)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main():
    import plotly.graph_objects  # noqa: F401
    import streamlit  # noqa: F401
    from hetmoe_core.models import load_model
    from hetmoe_core.scores import expert_scores
    lm = load_model("default")
    sc = expert_scores(lm.anatomy)  # noqa: F841
    gc.collect()
    n_before = len(gc.get_objects())
    a = collect_ms()
    gc.freeze()
    n_after = len(gc.get_objects())
    b = collect_ms()
    print(f"objects tracked by gc: {n_before:,} before freeze, {n_after:,} after ({gc.get_freeze_count():,} frozen)")
    print(f"gc.collect(2) median: {a:.1f} ms unfrozen, {b:.1f} ms after gc.freeze() -> ratio {b / a:.3f}")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
