"""Streamlit-side helpers shared by ``app.py`` and ``pages/``: the cached model, scores and routing statistics, the
view state shared across pages and mirrored in the URL (the pages' background jobs live in ``jobs``).

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


# ------------------------------------------------------------------------------------------- shared view state
DEFAULTS = {"source": "default", "device": "cpu", "dtype": "float32", "strategy": "maxnn", "budget_pct": 12.5,
            "scope": "layer", "preset": "paper-pcm-c1.5"}
QUERY = {"model": "source", "strategy": "strategy", "budget": "budget_pct", "preset": "preset"}
"""URL query parameter -> session-state key: a pasted link reproduces the view (budget in the URL is a fraction)."""


def _from_query(name: str, raw: str):
    """A URL value as session state, or ValueError when it is not valid."""
    if name == "budget":
        try:
            b = float(raw)
        except ValueError:
            b = float("nan")
        if not 0.0 <= b <= 1.0:
            raise ValueError("a fraction between 0 and 1, e.g. 0.125")
        return round(b * 100, 3)
    if name == "strategy":      # any registered one: Placement falls back to maxnn when a measurement is not stored
        from .strategies import STRATEGIES
        if raw not in STRATEGIES:
            raise ValueError(f"one of {', '.join(STRATEGIES)}")
    if name == "model":         # what the sidebar checks before a load (no network): says what is valid
        from .models import resolve_source
        resolve_source(raw)
    if name == "preset":
        from .noise import PRESETS
        if raw not in PRESETS:
            raise ValueError(f"one of {', '.join(PRESETS)}")
    return raw


def init_state() -> None:
    """First run of a session: defaults, overridden by the URL's query parameters (bad values are ignored with a
    warning). Widgets keep their values across pages with ``persist_state="session"``."""
    ss = st.session_state
    if not ss.get("_initialised"):
        for k, v in DEFAULTS.items():
            ss.setdefault(k, v)
        bad = []   # every ignored parameter is named, not only the last
        for q, key in QUERY.items():
            if q in st.query_params:
                try:
                    ss[key] = _from_query(q, st.query_params[q])
                except ValueError as e:
                    from .models import shorten
                    bad.append(f"{q}={shorten(st.query_params[q])!r}" + (f" ({e})" if str(e) else ""))
        if bad:
            ss["_query_warning"] = bad
        ss["source_kind"] = source_kind(ss["source"])
        if ss["source"].startswith("tiny:"):
            ss["source_tiny"] = ss["source"][5:]
        ss["source_text"] = ss["source"] if ss["source_kind"] in ("Hub id", "Local folder") else ""
        ss["_initialised"] = True


def sync_query_params() -> None:
    """Write the current view (model, strategy, budget, preset) into the URL (only values that changed)."""
    ss = st.session_state
    for q, key in QUERY.items():
        v = ss.get(key)
        if v is None:
            continue
        v = f"{float(v) / 100:g}" if q == "budget" else str(v)
        if st.query_params.get(q) != v:
            st.query_params[q] = v


def source_kind(source: str) -> str:
    """Sidebar radio label of a model source."""
    if source == "default":
        return "Default"
    if source.startswith("tiny:"):
        return "Tiny (random)"
    if source.startswith((".", "/", "~")):
        return "Local folder"
    return "Hub id"


def budget() -> float:
    """Digital budget as a fraction in [0, 1] (the sliders hold percent)."""
    return float(st.session_state.get("budget_pct", DEFAULTS["budget_pct"])) / 100.0


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


# ------------------------------------------------------------------------------------------- cached data
# st.cache_resource, not st.cache_data: these are read-only, and cache_data unpickles a fresh copy on every call
# (every rerun: the calibration text, every expert's neuron norms). Keys are fingerprints and short strings;
# the model handle is never hashed (leading underscore).
@st.cache_resource(max_entries=8, show_spinner=False)
def expert_scores(fingerprint: str, dtype: str, _handle: ModelHandle):
    """scores.ExpertScores of the loaded model (cached by weights fingerprint and dtype; read under the model lock)."""
    from .scores import expert_scores as compute
    with _handle.lock:
        return compute(_handle.lm.anatomy)


@st.cache_resource(max_entries=4, show_spinner=False)
def calibration(source: str | None = None) -> tuple[dict | None, str | None, str]:
    """(texts by domain, hash, message) for model ``source``: the default calibration text (sweep.calibration_text;
    message: a note when it is the built-in tiny-model sentences, else ""), or (None, None, why not) when its
    file is unreadable."""
    try:
        from .routing import BUILTIN_TEXTS, default_calibration as where_of, is_builtin
        from .sweep import calibration_text
        texts, h = calibration_text(source)
        return texts, h, (f"Calibration: {BUILTIN_TEXTS}; load a real model for real statistics)."
                          if is_builtin(where_of(source)[1]) else "")
    except (ValueError, OSError) as e:
        return None, None, str(e)


@st.cache_resource(max_entries=8, show_spinner=False)
def activation_stats(fingerprint: str, calib_hash: str, _handle: ModelHandle, _texts: dict):
    """routing.ActivationStats on the calibration text (also cached on disk by routing)."""
    from .routing import activation_stats as compute
    lm = _handle.lm
    with _handle.lock:
        return compute(lm.model, lm.tokenizer, lm.anatomy, _texts, fingerprint=fingerprint)


def stats_for(handle: ModelHandle, show: bool = True):
    """Activation statistics of the model on the default calibration text, or None (with an info message)."""
    texts, h, why = calibration(handle.lm.source)
    if texts is None:
        if show:
            st.info(f"Activation frequency / weight are not available yet: {why}")
        return None
    if why and show:
        st.caption(why)
    if handle.lock.locked():
        if show:
            st.info("An evaluation is running on this model; activation statistics appear when it finishes.")
        return None
    with st.spinner("Routing the calibration text through the model (once per model) …"):
        try:
            return activation_stats(handle.lm.fingerprint, h, handle, texts)
        except ValueError as e:
            if show:
                st.warning(f"Activation statistics failed: {e}")
            return None


@st.cache_resource(max_entries=8, show_spinner=False)
def _shapes(fingerprint: str, source: str, _handle: ModelHandle):
    from .energy import shapes_of
    return shapes_of(_handle.lm.model, _handle.lm.anatomy, source)


def shapes(handle: ModelHandle):
    """energy.ModelShapes of the held model (cached by weights fingerprint: a rerun does not walk the modules)."""
    return _shapes(handle.lm.fingerprint, handle.lm.source, handle)


# ------------------------------------------------------------------------------------------- scores without a model
@st.cache_resource(max_entries=8, show_spinner=False)
def _streamed_scores(fingerprint: str, folder: str):
    from .scores import stream_scores
    return stream_scores(folder)


def scores(handle: ModelHandle | None = None):
    """ExpertScores of the sidebar's model, cached by weights fingerprint.

    Without ``handle``, local safetensors folders (the default included) are read straight from the files
    (scores.stream_scores: no transformers import and no model build, so the Sensitivity page's first heatmap is
    quick). With ``handle`` (pages that place experts) the scores come from the loaded model's weights, exactly as
    evaluate's placements see them in the chosen dtype. None (error shown) if the model fails to load."""
    from pathlib import Path
    from .models import resolve_source
    source = st.session_state["source"]
    if handle is None:
        try:
            kind, where = resolve_source(source)
            if kind in ("default", "folder") and (Path(where) / "config.json").exists() \
                    and any(Path(where).glob("*.safetensors")):
                from .evaluate import source_fingerprint
                return _streamed_scores(source_fingerprint(source), where)
        except ValueError:
            pass   # fall through: loading shows the error with what to do
    handle = handle or get_model()
    return None if handle is None else expert_scores(handle.lm.fingerprint, handle.lm.anatomy.dtype, handle)


# ------------------------------------------------------------------------------------------- hardware constants
def hardware_editor(key: str = "hw"):
    """A hardware preset and its constants, editable in an expander (labels, units, help and sources are read
    from the field metadata of ``hardware.DigitalConfig`` / ``AnalogConfig``). Returns the ``Hardware``; an
    invalid edit shows one warning and returns the preset unchanged."""
    from .hardware import HARDWARE, HARDWARE_DOCS, AnalogConfig, DigitalConfig, field_docs, get_hardware
    with st.expander("Hardware constants (units and sources in the tooltips)"):
        name = st.selectbox("Hardware preset", list(HARDWARE), key=f"{key}_preset", format_func=lambda n: n,
                            help=" · ".join(f"{n}: {d}" for n, d in HARDWARE_DOCS.items()))
        base, changes = HARDWARE[name], {"digital": {}, "analog": {}}
        for part, cls in (("digital", DigitalConfig), ("analog", AnalogConfig)):
            title = cls.PART
            st.markdown(f"**{title}** · {getattr(base, part).name}")
            cols = st.columns(3)
            for i, f in enumerate(field_docs(cls)):
                v = getattr(getattr(base, part), f["name"])
                is_int = isinstance(v, int)
                w = cols[i % 3].number_input(
                    f"{f['name']} ({f['unit']})", value=v, min_value=1 if is_int else 1e-9,
                    step=1 if is_int else None, format=None if is_int else "%.4g",
                    key=f"{key}_{name}_{part}_{f['name']}",
                    help=f"{f['help']} Unit: {f['unit']}. Allowed: {f['allowed'][0]:g} to {f['allowed'][1]:g}. "
                         f"Source: {f['source']}")
                if w != v:
                    changes[part][f["name"]] = int(w) if is_int else float(w)
        try:
            hw = get_hardware(name, **changes)
        except ValueError as e:
            st.warning(f"{e} — using the preset's values.")
            return base
        if changes["digital"] or changes["analog"]:
            st.caption("Edited: " + ", ".join(f"{p}.{k}" for p in changes for k in changes[p]))
    return hw


@st.cache_resource(max_entries=8, show_spinner=False)
def _forward_seconds(fingerprint: str, dtype: str, device: str, _handle: ModelHandle) -> float:
    """sensitivity.forward_seconds of the loaded model, timed once per model (weights fingerprint, dtype, device)."""
    from .sensitivity import forward_seconds
    return forward_seconds(_handle.lm)


def _duration(seconds: float) -> str:
    return (f"about {seconds / 3600:.1f} h" if seconds > 5400 else f"about {seconds / 60:.0f} min" if seconds > 90
            else f"about {seconds:.0f} s")


def measurement_time(handle: ModelHandle, seeds: int, tokens: int) -> str:
    """How long measuring the damage (``sensitivity.validate``) of the held model takes here, in words with its
    basis: "about 12 min here at most (1,370 forwards × 0.5 s, one forward timed on this machine)"."""
    from .sensitivity import measurement_estimate
    fs = _forward_seconds(handle.lm.fingerprint, st.session_state["dtype"], st.session_state["device"], handle)
    e = measurement_estimate(handle.lm, seeds=seeds, tokens=tokens, forward_s=fs)
    return (f"{_duration(e['seconds'])} here at most ({e['forwards']:,} forwards × {fs:.1f} s, one forward "
            "timed on this machine)")


def measurement_notice(handle: ModelHandle, strategies, noise, store, preset_label: str) -> str | None:
    """What the measured strategies among ``strategies`` compute before the run's first result, for the Evaluate
    page (None when nothing): the oracle needs ``validate``'s measurement under ``noise`` — from the store when
    it is there (validation.stored_validation), else measured first, with sensitivity.measurement_estimate's
    time (forwards x one clean forward timed on this machine); Local output error one calibration pass."""
    from .criteria import LOCAL_ERROR_TOKENS
    from .sensitivity import ORACLE_SEEDS, ORACLE_TOKENS
    from .validation import stored_validation
    from .noise import PRESETS
    if noise == PRESETS["ideal"]:      # nothing is analog-noisy: every result is the ideal reference
        return None
    out = []
    if "oracle" in strategies:
        try:
            have = stored_validation(handle.lm.source, noise, store=store, device=st.session_state["device"],
                                     dtype=st.session_state["dtype"]) is not None
        except ValueError:
            have = False
        if not have:
            out.append(f"**Oracle** needs a measured damage under {preset_label}: none is stored, so this run "
                       f"measures it first ({ORACLE_SEEDS} seeds × {ORACLE_TOKENS:,} tokens) — "
                       f"{measurement_time(handle, ORACLE_SEEDS, ORACLE_TOKENS)}; or measure it on the "
                       "**Validate** page.")
    if "local_error" in strategies:
        out.append(f"**Local output error** runs the model once over {LOCAL_ERROR_TOKENS:,} calibration tokens "
                   f"under {preset_label} before its first result (not stored: every run repeats it).")
    return "\n\n".join(out) or None


def allowed_text(doc: dict) -> str:
    """A number field's allowed range as the Evaluate form states it, from its field metadata (noise.field_docs):
    "1 to 24 bits, or 0 for ideal ADC" (the form's 0 stands for an optional field's None); "" for choices."""
    allowed = doc.get("allowed")
    if not allowed or isinstance(allowed[0], (str, bool)):
        return ""
    unit = f" {doc['unit']}" if doc.get("unit") and doc["unit"] not in ("unitless", "on/off") else ""
    zero = f", or 0 for {doc['optional']}" if doc.get("optional") else ""
    return f"{allowed[0]:g} to {allowed[1]:g}{unit}{zero}"


def unavailable_strategy(strategy: str, preset: str) -> str:
    """The Placement page's one line when the session's strategy (a link's ``strategy=oracle``, or one chosen under
    another noise preset) needs a damage measurement this model lacks under ``preset``: what it needs, that
    MaxNNScore is shown instead, and what to do."""
    from .sensitivity import ORACLE_SEEDS, ORACLE_TOKENS
    from .strategies import label
    head = f"Strategy **{label(strategy)}** (strategy={strategy}) places by the damage measured under the noise preset"
    if preset == "ideal":
        return (f"{head}, and **ideal** damages nothing: showing MaxNNScore instead. Choose a noisy preset on the "
                "Evaluate page, then this strategy again.")
    return (f"{head} **{preset}**, and none of this model is stored: showing MaxNNScore instead. Measure it on the "
            f"Validate page ({ORACLE_SEEDS} seeds × {ORACLE_TOKENS:,} tokens), then choose this strategy again.")


BUDGETS_HELP = ("Percentages of routed experts kept digital, e.g. 0, 12.5, 25. Decimals take a dot (12.5); budgets "
                "are separated by a comma and a space, a semicolon or spaces. A comma between two digits (12,5) is "
                "refused, since it reads as 12.5 in Europe and as 12 and 5 elsewhere.")


def budgets_from_text(text: str) -> list[float]:
    """The Evaluate page's digital budgets (percent text, see BUDGETS_HELP) as fractions in [0, 1]
    (placement.budgets_from_percent after the separators are checked). Raises ValueError with one line that says
    what to type when a comma stands between two digits ("12,5" or "12 ,5": a decimal comma or two budgets?)."""
    import re
    from .placement import budgets_from_percent
    if m := re.search(r"\d+\s*,\d+", text):   # "12,5" and "12 ,5": only a comma and a space separate
        a, b = (x.strip() for x in m.group().split(",", 1))
        raise ValueError(f"'{m.group()}' is ambiguous: use a dot for decimals ({a}.{b}); separate budgets with a "
                         f"comma and a space, a semicolon or spaces ({a}, {b})")
    return budgets_from_percent(re.sub(r"\s+", ",", text.strip()))


def sweep_form_problem(strategies, tasks) -> str | None:
    """The Evaluate form's one-line error, in its widget labels, for an empty Strategies or Tasks choice (the
    CLI's own wording, sweep._check_grid and tasks.resolve_tasks, names its flags); None when both are given."""
    if not strategies:
        return "Choose at least one strategy above (Strategies)."
    if not tasks:
        return "Choose at least one task above (Tasks)."
    return None


def budget_notes(budgets, anatomy, scope: str = "layer") -> list[str]:
    """placement.empty_budget_note for each budget (fractions) on this model's MoE layers: the budgets below 1 %
    that keep no expert digital, as when "0.25" is typed for 25 %."""
    from .placement import empty_budget_note
    ne = [m.num_experts for m in anatomy.moe_layers]
    return [n for b in budgets if (n := empty_budget_note(b, ne, scope))]


# ------------------------------------------------------------------------------------------- store reads, cached
def store_state(store) -> tuple:
    """What changes whenever the store's results change: (path, number of runs, newest created_at, sizes and
    modification times of the file and its write-ahead log). A cache keyed by it is fresh after every run,
    import or delete, and a filter change on the Results page reads nothing again."""
    df = store.query("SELECT count(*) AS n, max(created_at) AS t FROM runs")
    files = [store.path, store.path.with_name(store.path.name + ".wal")]
    stats = tuple((p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None for p in files)
    return str(store.path), int(df.n.iloc[0]), str(df.t.iloc[0]), stats


@st.cache_data(max_entries=16, show_spinner=False)
def _store_read(path: str, state: tuple, what: str, args: str):
    import json
    from .store import Store
    store, a = Store(path), json.loads(args)
    if what == "downloads":   # (number of runs, CSV bytes, Parquet bytes) of one model's runs
        import io
        runs, buf = store.runs_frame(*a), io.BytesIO()
        runs.to_parquet(buf, index=False)
        return runs.key.nunique(), runs.to_csv(index=False).encode(), buf.getvalue()
    if what == "run_costs":
        from .energy import run_costs
        return run_costs(store, *a)
    return getattr(store, what)(*a)


def store_read(store, what: str, *args):
    """``store.<what>(*args)`` (summary_frame, runs_frame), ``energy.run_costs(store, *args)`` or "downloads"
    ((runs, CSV bytes, Parquet bytes) of ``store.runs_frame(*args)``), cached by
    ``store_state``: the Results page summarises 2,512 example runs once, not on every filter change. Arguments
    must be JSON-able; the frame returned is a copy (st.cache_data)."""
    import json
    return _store_read(str(store.path), store_state(store), what, json.dumps(args, sort_keys=True, default=str))
