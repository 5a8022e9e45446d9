"""The view state the dashboard's pages share (model source, device, dtype, strategy, digital budget, scope, noise
preset) and its mirror in the URL: a pasted link reproduces the view, and its bad values are named, not dropped.

Streamlit-side (st.session_state, st.query_params); no science here. Importing this module imports streamlit.
"""
from __future__ import annotations

import streamlit as st


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
    """Write the current view (model, strategy, budget, preset) into the URL: the values that changed, in one write
    (the browser adds a history entry per write: one per parameter made Back need several presses)."""
    ss, changed = st.session_state, {}
    for q, key in QUERY.items():
        v = ss.get(key)
        if v is None:
            continue
        v = f"{float(v) / 100:g}" if q == "budget" else str(v)
        if st.query_params.get(q) != v:
            changed[q] = v
    if changed:
        st.query_params.update(changed)


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
