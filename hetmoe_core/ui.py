"""Streamlit-side frame of ``app.py`` and ``pages/``: the page frame and sidebar, and the cached model (``MODELS``,
``get_model``). The rest lives by concept: the view state shared across pages and mirrored in the URL
(``view_state``), the pages' cached reads (``page_cache``), what the forms say and check (``forms``); their names
are re-exported here, so ``ui.X`` and ``from hetmoe_core.ui import X`` keep working. The pages' background jobs
live in ``jobs``.

No science lives here: every number comes from the core modules (models, scores, routing, placement, evaluate,
store). Importing this module imports streamlit.
"""
from __future__ import annotations

import functools
import gc
import os
import threading
import time
from contextlib import contextmanager

import streamlit as st

from .modelcache import ModelCache, ModelHandle, model_bytes
from .view_state import (DEFAULTS, QUERY, budget, init_state, source_kind, sync_query_params,  # noqa: F401
                         view_params)
from .page_cache import (activation_stats, calibration, expert_scores, scores, shapes, stats_for,  # noqa: F401
                         store_read, store_state)
from .forms import (BUDGETS_HELP, allowed_text, budget_notes, budgets_from_text, hardware_editor,  # noqa: F401
                    SWEEP_NUMBERS, measurement_notice, measurement_time, sweep_form_problem, sweep_number_help,
                    sweep_number_problem, unavailable_strategy)


# ------------------------------------------------------------------------------------------- page frame
PAGE_ICON = "🧮"
"""Browser-tab icon: an emoji (drawn by the browser). A ``:material/...:`` page icon makes the browser fetch an SVG
from fonts.gstatic.com on every page load, which fails offline; the navigation icons use the Material Symbols
font that ships inside Streamlit's own static files."""

_RUN = threading.local()
"""Per script run, on the script thread: ``framed`` (app.py drew the frame and is running the page), ``owner``
(the token the run's model holds are taken under) and ``slot`` (the sidebar line the model summary goes to).
Kept off st.session_state on purpose: Streamlit drops session-state writes made after st.stop() (e.g. in a
``finally``), so a flag kept there stayed set after a page stopped on an error, and the next run skipped the
sidebar — the white screen."""


def _begin_run() -> None:
    """A new run on this thread: give back the model holds of the previous run here (a run that ended without
    reaching page_run's clean-up, e.g. a page run alone under AppTest) and take a new owner token."""
    old = getattr(_RUN, "owner", None)
    if old is not None:
        MODELS.release(old)
    _RUN.owner = (threading.current_thread(), time.monotonic_ns())
    _RUN.slot = None
    _RUN.busy_shown = False


@contextmanager
def page_run():
    """app.py runs the chosen page inside this: the page's ``frame()`` call is a no-op, and the run's model holds
    are given back when the page ends, whether it finished, stopped (st.stop) or raised."""
    _RUN.framed = True
    try:
        yield
    finally:
        _RUN.framed = False
        if getattr(_RUN, "owner", None) is not None:
            MODELS.release(_RUN.owner)
            _RUN.owner = None


def fragment(func):
    """``st.fragment`` for a page's interactive part: a widget inside it reruns only that function, not app.py,
    the sidebar or the rest of the page (a budget-slider move redraws its charts without the whole app).

    A rerun of the fragment alone is a script run of its own (no ``frame()``/``page_run()`` around it): the
    models it holds (``get_model``) are given back when it ends, and it never writes to the sidebar. When the
    fragment runs as part of the full page run, the page run's holds apply."""
    @functools.wraps(func)
    def run(*args, **kwargs):
        from streamlit.runtime.scriptrunner import get_script_run_ctx
        ctx = get_script_run_ctx()
        if not (ctx is not None and ctx.fragment_ids_this_run):
            return func(*args, **kwargs)
        _begin_run()
        try:
            return func(*args, **kwargs)
        finally:
            MODELS.release(_RUN.owner)
            _RUN.owner = None
    return st.fragment(run)


_NAV_FLAG_CHECKED = ((1, 36), (1, 67))
"""Streamlit minor versions whose ``PagesManager.uses_pages_directory`` behaves as ``_use_navigation_mode`` needs."""


def _use_navigation_mode() -> bool:
    """Switch this server process from Streamlit's pages-directory mode to st.navigation mode; True if switched.

    Why a private flag: app.py sits next to ``pages/`` (the folder keeps its name: the design card names it), so
    Streamlit starts every server process in its pages-directory mode, where a deep link such as /placement runs
    pages/placement.py alone — without app.py's sidebar and navigation — until some run calls st.navigation. No
    public option or API turns that mode off (``client.showSidebarNavigation`` only hides the list). st.navigation
    sets ``PagesManager.uses_pages_directory = False`` on its first call; this sets it the same way, once, so that
    the page can rerun through app.py. Outside the Streamlit versions checked here the flag is left alone and the
    page draws its own frame (the navigation list then appears after the first click)."""
    import streamlit
    from streamlit.runtime import pages_manager
    version = tuple(int(x) for x in streamlit.__version__.split(".")[:2])
    manager = getattr(pages_manager, "PagesManager", None)
    if not (_NAV_FLAG_CHECKED[0] <= version <= _NAV_FLAG_CHECKED[1]) or manager is None \
            or not hasattr(manager, "uses_pages_directory"):
        return False
    manager.uses_pages_directory = False
    return True


def frame(entry: bool = False) -> None:
    """Page set-up and the sidebar (model source, device, dtype), once per run.

    app.py calls ``frame(entry=True)`` before ``st.navigation`` and runs the page inside ``page_run()``; every
    page calls ``frame()``, a no-op there. A page run alone (Streamlit's pages-directory mode: a fresh server
    opened on a deep link, and AppTest on every run) switches the process to st.navigation mode and reruns once,
    through app.py, on the same page; under AppTest, which resets the mode before every run, it draws the frame
    itself."""
    ss = st.session_state
    if not entry and getattr(_RUN, "framed", False):
        return
    if not entry:
        from streamlit import config
        switched = _use_navigation_mode()
        if switched and not ss.get("_redirected") and not config.get_option("global.appTest"):
            ss["_redirected"] = True
            st.rerun()
    _begin_run()
    st.set_page_config(page_title="hetmoe", page_icon=PAGE_ICON, layout="wide")
    init_state()
    with st.sidebar:
        _sidebar()
    sync_query_params()


METRIC_WIDTH = 175
"""Width (px) of one metric in a ``metric_row``: a value of ~9 characters in Streamlit's 36 px metric font and a
label of ~24 characters fit whole, four in a row at 1280 px (~780 px of page), two at 820 px (four columns,
~120 px each, cut "9.19…" µJ)."""


def metric_row(parent, n: int, width: int = METRIC_WIDTH) -> list:
    """``n`` cells of ``width`` px for ``st.metric``s, side by side while they fit and wrapped onto further rows when
    they do not (``st.columns`` shares the width out however narrow it gets and cuts the values). ``parent``: ``st``
    or a container."""
    return filter_row(parent, [width] * n)


def filter_row(parent, widths) -> list:
    """Cells of ``widths`` px for widgets (filters, metrics), side by side while they fit and wrapped onto further
    rows when they do not, so a multiselect's chips and a metric's value keep their text (in ``st.columns`` a
    sixth of the page showed the chip "fast" as "f…"). ``parent``: ``st`` or a container."""
    row = parent.container(horizontal=True, wrap=True, gap="medium")
    return [row.container(width=w) for w in widths]


def store_or_stop(read):
    """``read()``'s value (a function that opens the results store and reads it), or the page stops with one line:
    while another process writes the store, :func:`store_busy`'s line and Retry (the sidebar stays usable); a
    store hetmoe cannot use (not a DuckDB file, a newer schema, unreadable), what is wrong and what to do."""
    from .store import StoreBusy
    try:
        return read()
    except StoreBusy as e:
        store_busy(e)
    except (ValueError, RuntimeError) as e:
        st.error(f"Could not open the results store: {e}\n\nSet HETMOE_STORE to another file or close the program "
                 "holding it.")
    st.stop()


def store_busy(error, stale: bool = False) -> None:
    """Say, once per run, that the results store is being written by another process (``error``: the StoreBusy
    naming it): a warning that the page shows results as last read (``stale``), else an error line and a Retry
    button; the page goes on (stale) or the caller stops it. One line, no traceback."""
    if getattr(_RUN, "busy_shown", False):
        return
    _RUN.busy_shown = True
    text = str(error)
    text = text[:1].upper() + text[1:]
    if stale:
        st.warning(f"Showing the results as last read. {text}.")
    else:
        st.error(f"{text}.")
        st.button("Retry", key="store_busy_retry")


def _sidebar() -> None:
    ss = st.session_state
    st.markdown("### Model")
    kind = st.radio("Source", ["Default", "Hub id", "Local folder", "Tiny (random)"], key="source_kind",
                    persist_state="session", horizontal=True,
                    help="Default: the small OLMoE shipped with hetmoe. Hub id: org/name on the Hugging Face hub "
                         "(needs network). Local folder: config.json + *.safetensors. Tiny: random test models.")
    if kind == "Default":
        source = "default"
    elif kind == "Tiny (random)":
        from .models import TINY_FAMILIES
        source = "tiny:" + st.selectbox("Family", TINY_FAMILIES, key="source_tiny", persist_state="session")
    else:
        source = st.text_input("Hub id" if kind == "Hub id" else "Folder", key="source_text", persist_state="session",
                               placeholder="allenai/OLMoE-1B-7B-0924" if kind == "Hub id" else "/path/to/model",
                               help="Press Enter to load.").strip()
    c1, c2 = st.columns(2)
    devices = ["cpu"] + _cuda_devices()
    if ss.get("device") not in devices:
        ss["device"] = "cpu"
    c1.selectbox("Device", devices, key="device", persist_state="session")
    c2.selectbox("dtype", ["float32", "bfloat16", "float16"], key="dtype", persist_state="session",
                 help="Weights' number format. float32 on CPU is fastest and exact.")
    ss["source"] = source     # empty: pages say what to enter
    # filled by get_model() when a page loads the model, so that the page's first chart need not wait for it
    _RUN.slot = st.empty()
    from .models import shorten
    _RUN.slot.caption("Enter a model source above." if not source else f"Model: `{shorten(source, 60)}`")
    if (w := ss.pop("_query_warning", None)):
        st.warning(f"The link held {'an invalid value' if len(w) == 1 else f'{len(w)} invalid values'}, "
                   f"ignored (the default is used instead): {'; '.join(w)}.")
    _memory_panel()


def _memory_panel() -> None:
    """Which models this server keeps in memory, their size and whether a run or an evaluation holds them."""
    rows = MODELS.entries()
    if not rows:
        return
    total = sum(r["bytes"] for r in rows)
    with st.expander(f"Models in memory: {len(rows)} · {total / 2**20:,.0f} MiB"):
        st.markdown("\n".join(f"- `{r['key'][0]}` · {r['key'][2]} on {r['key'][1]} · {r['bytes'] / 2**20:,.1f} MiB"
                              + (" · in use" if r["holds"] else "") for r in rows))
        st.caption(f"The server keeps models up to {MODELS.limit() / 2**30:.1f} GiB (a share of the available "
                   "memory, HETMOE_MODEL_CACHE_SHARE), least recently used out first, never one in use.")


def _cuda_devices() -> list[str]:
    """cuda:N names once torch is imported (by the page's model or scores). The sidebar never imports torch itself,
    so a cold start draws the first chart sooner; the GPUs appear in the list from the next rerun on."""
    import sys
    torch = sys.modules.get("torch")
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch is not None else []


# ------------------------------------------------------------------------------------------- cached model
def _load(key: tuple) -> tuple:
    """ModelCache loader: (LoadedModel, bytes) of (source, device, dtype)."""
    from .models import load_model
    lm = load_model(key[0], device=key[1], dtype=key[2])
    _freeze_heap()
    return lm, model_bytes(lm.model)


def _freeze_enabled() -> bool:
    return os.environ.get("HETMOE_GC_FREEZE", "1") != "0"


def _freeze_heap() -> None:
    """Collect, then move every live object into the garbage collector's permanent generation (gc.freeze).

    Why: Streamlit's runner.postScriptGC runs gc.collect(2) after every script run, and with torch, transformers
    and a model in memory that full collection walked ~430 000 objects — most of a slider rerun. Frozen objects
    are skipped by it; objects made later (figures, session data) are still collected each run. Called after
    each model load (transformers imports a family's modules inside the load), and undone around each release
    (``_after_release``) so an evicted model's reference cycles are still freed. HETMOE_GC_FREEZE=0 turns it off
    (bench/bench_soak.py's comparison)."""
    if _freeze_enabled():
        gc.collect()
        gc.freeze()


def _after_release(handle) -> None:
    """A model left the cache: unfreeze so its cycles can be collected, collect, freeze what is left again."""
    if _freeze_enabled():
        gc.unfreeze()
        _freeze_heap()


MODELS = ModelCache(_load, on_release=_after_release)
"""The dashboard's models: one per (source, device, dtype), sized by memory, never released while a run or an
evaluation holds it (see hetmoe_core.modelcache)."""


def _count(n: int) -> str:
    """A parameter count in words: 41.2 k, 8.41 M, 6.92 B."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return str(n)


def get_model(show_errors: bool = True) -> ModelHandle | None:
    """The model chosen in the sidebar, held until this script run ends (loaded once per source/device/dtype).

    A bad source shows st.error with what to do and returns None (no traceback)."""
    ss = st.session_state
    if getattr(_RUN, "owner", None) is None:    # a run that did not go through frame() (a fragment)
        _begin_run()
    key = (ss["source"], ss["device"], ss["dtype"])
    try:
        if key not in MODELS:   # the sidebar says hub id or folder: check it as that before any loading
            from .models import resolve_source
            resolve_source(ss["source"], {"Hub id": "hub", "Local folder": "folder"}.get(ss.get("source_kind")))
        if key in MODELS:      # no spinner when loaded: st.spinner starts a timer thread, on every slider move
            h = MODELS.hold(key, _RUN.owner)
        else:
            with st.spinner(f"Loading {ss['source'][:60]} …"):
                h = MODELS.hold(key, _RUN.owner)
        a, slot = h.lm.anatomy, getattr(_RUN, "slot", None)
        if slot is not None:
            slot.caption(f"**{a.model_class}** · {len(a.moe_layers)} MoE layers · {a.moe_layers[0].num_experts} "
                         f"experts · top-{a.moe_layers[0].top_k} · {_count(a.total_params)} params  \n"
                         f"`{h.lm.fingerprint}`")
        return h
    except (ValueError, OSError) as e:
        if show_errors:
            st.error(f"Could not load model: {e}\n\nChoose *Default* in the sidebar, or give a "
                     "local folder with config.json and *.safetensors, or a Hugging Face hub id (org/name) when the "
                     "hub is reachable.")
    except ImportError as e:
        if show_errors:
            st.error(f"Loading **{ss['source']}** needs a package that is not installed: {e}")
    return None


def require_model() -> ModelHandle:
    """get_model(), or stop the page (the error is already shown)."""
    h = get_model()
    if h is None:
        st.stop()
    return h
