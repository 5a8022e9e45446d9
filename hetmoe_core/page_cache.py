"""What the dashboard's pages read often, cached across reruns and sessions: the model's expert scores (also streamed
from the safetensors files without a model), calibration text, routing statistics, module shapes, and reads of the
results store keyed by its state (``store_state``), so a filter change reads nothing again.

Streamlit-side (st.cache_resource / st.cache_data); every number comes from the core modules. Importing this module
imports streamlit.
"""
from __future__ import annotations

import streamlit as st

from .modelcache import ModelHandle


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
    if handle is None:
        from .ui import get_model     # the sidebar's model, held for this run (ui owns the model cache)
        handle = get_model()
    return None if handle is None else expert_scores(handle.lm.fingerprint, handle.lm.anatomy.dtype, handle)


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


_LAST: dict = {}
"""(store path, what, arguments) -> the last value ``store_read`` returned, served while another process writes the
store (DuckDB lets no one read a file another process holds read-write); the newest ``_LAST_MAX`` kept."""
_LAST_MAX = 32


def store_read(store, what: str, *args):
    """``store.<what>(*args)`` (summary_frame, runs_frame), ``energy.run_costs(store, *args)`` or "downloads"
    ((runs, CSV bytes, Parquet bytes) of ``store.runs_frame(*args)``), cached by
    ``store_state``: the Results page summarises 2,512 example runs once, not on every filter change. Arguments
    must be JSON-able; the frame returned is a copy (st.cache_data).

    While another process writes the store (``store_file.StoreBusy`` after a few seconds, not the store's whole
    timeout), the same read's last answer in this server is returned and the page says once, in one line, that it
    shows results as last read; with no earlier answer StoreBusy propagates (the page shows its one line)."""
    import copy
    import json
    from .store_file import StoreBusy
    a = json.dumps(args, sort_keys=True, default=str)
    key = (str(store.path), what, a)
    try:
        out = _store_read(str(store.path), store_state(store), what, a)
    except StoreBusy as e:
        if key not in _LAST:
            raise
        from .ui import store_busy
        store_busy(e, stale=True)
        return copy.deepcopy(_LAST[key])
    _LAST.pop(key, None)
    _LAST[key] = out        # st.cache_data handed this call a copy of its own: kept as is (no second copy of
    while len(_LAST) > _LAST_MAX:   # every frame on every rerun); the stale answer is copied when served
        _LAST.pop(next(iter(_LAST)))
    return out
