"""Cost of Streamlit's per-rerun full garbage collection (runner.postScriptGC = gc.collect(2)) in the dashboard's
process, before and after gc.freeze() of the heavy imports (prints figures; never a test).

    python bench/bench_gc.py

Imports what a dashboard server holds after the first model page (streamlit, plotly, torch, transformers,
hetmoe_core), loads the default model and its scores, then times gc.collect(2): (a) as Streamlit runs it today,
(b) after ui's gc.freeze() that follows each model load. The ratio b / a is the figure to keep small; the freeze keeps
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
    from hetmoe_core import figures, ui  # noqa: F401
    from hetmoe_core.models import load_model
    from hetmoe_core.scores import expert_scores
    gc.collect()
    a_imports = collect_ms()
    lm = load_model("default")
    ui._freeze_heap()                                      # what the dashboard does after each model load
    sc = expert_scores(lm.anatomy)  # noqa: F841
    gc.collect()
    n_after = len(gc.get_objects())
    b = collect_ms()
    gc.unfreeze()
    gc.collect()
    n_before = len(gc.get_objects())
    a = collect_ms()
    print(f"objects tracked by gc with the model loaded: {n_before:,} without the freeze, {n_after:,} after it")
    print(f"gc.collect(2) median (Streamlit's runner.postScriptGC, once per rerun): {a:.1f} ms without the freeze, "
          f"{b:.1f} ms with ui's gc.freeze() after the model load -> ratio {b / a:.3f} "
          f"(imports alone, before the freeze: {a_imports:.1f} ms)")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
