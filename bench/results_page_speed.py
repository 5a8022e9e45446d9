"""Results page on the example store (2,512 runs): a filter change with the store reads cached (ui.store_read) vs
the same rerun with the cache emptied first, as every rerun was before the cache. Alternating, in one process.
Run: HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=.:tests .venv/bin/python bench/results_page_speed.py"""
import os
import tempfile
import time

import streamlit as st

os.environ["HETMOE_STORE"] = tempfile.mkdtemp() + "/r.duckdb"
from hetmoe_core.examples import load_examples  # noqa: E402
from hetmoe_core.store import Store  # noqa: E402
from test_app import app, page  # noqa: E402

load_examples(Store())
at = page(app(), "results")
times = {"cached": [], "uncached": []}
for rnd in range(6):
    mode = "uncached" if rnd % 2 else "cached"
    if mode == "uncached":
        st.cache_data.clear()
    ms = at.multiselect(key="res_presets")
    val = ms.value[:1] if len(ms.value) > 1 else list(ms.options)
    t = time.perf_counter()
    ms.set_value(val).run()
    times[mode].append(time.perf_counter() - t)
    assert not at.exception
print({k: [round(x, 2) for x in v] for k, v in times.items()},
      f"uncached/cached = {min(times['uncached']) / min(times['cached']):.1f}x")
