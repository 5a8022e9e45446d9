"""The view state the dashboard's pages share (model source, device, dtype, strategy, digital budget, scope, noise
preset, dense modules, hardware constants, energy batch and routing) and its mirror in the URL: a pasted link
reproduces the view, and its bad values are named, not dropped.

Streamlit-side (st.session_state, st.query_params); no science here. Importing this module imports streamlit.
"""
from __future__ import annotations

import streamlit as st


DEFAULTS = {"source": "default", "device": "cpu", "dtype": "float32", "strategy": "maxnn", "budget_pct": 12.5,
            "scope": "layer", "preset": "paper-pcm-c1.5", "energy_batch": 32, "energy_measured": False}
QUERY = {"model": "source", "strategy": "strategy", "budget": "budget_pct", "scope": "scope", "preset": "preset"}
"""URL query parameter -> session-state key, always in the URL: a pasted link reproduces the view (budget in the URL
is a fraction). The settings below are in the URL only while they differ from their defaults (``view_params``)."""
ENERGY = {"batch": "energy_batch", "routing": "energy_measured"}
"""URL query parameter -> session-state key of Placement's energy settings, in the URL only while they differ from
``DEFAULTS``: batch (tokens per decode step, one of energy.BATCHES), routing ("measured" routing frequencies, or
"uniform")."""
ANALOG = "analog"
"""URL query parameter: the dense module kinds kept on analog (Placement's Dense modules toggles turned off), comma
separated in ``placement.DENSE_KINDS`` order; absent when every dense module is digital (the paper's default).
Session state: ``dense_<kind>`` (True = digital)."""
HW = "hw"
"""URL query parameter: the hardware preset of Placement's hardware-constants editor when it is not
``hardware.DEFAULT_HARDWARE`` or a constant is edited; each edited constant as ``hw.<digital|analog>.<field>``.
Session state: ``hw_preset`` and ``hardware_widget_key("hw", preset, part, field)`` (the editor's widgets), and
``hw_changes`` ({"preset", "digital": {field: value}, "analog": {…}}: the hardware the view shows, written by
``forms.hardware_editor``)."""


def hardware_widget_key(key: str, preset: str, part: str, field: str) -> str:
    """Session-state key of one constant's box in ``forms.hardware_editor(key)``."""
    return f"{key}_{preset}_{part}_{field}"


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
    if name == "scope" and raw not in ("layer", "global"):
        raise ValueError("layer or global")
    if name == "preset":
        from .noise import PRESETS
        if raw not in PRESETS:
            raise ValueError(f"one of {', '.join(PRESETS)}")
    return raw


def _number(raw: str, like):
    """A URL's constant as the type of the preset's value (int or float); ValueError when it is not one."""
    try:
        v = float(raw)
    except ValueError:
        raise ValueError("not a number") from None
    if isinstance(like, int) and not isinstance(like, bool):
        if not v.is_integer():
            raise ValueError("not a whole number")
        return int(v)
    return v


def _extra_from_query(params: dict, bad: list) -> dict:
    """Session state of the URL's optional parameters (``ENERGY``, ``ANALOG``, ``HW``, ``hw.<part>.<field>``):
    {key: value}; each bad parameter is appended to ``bad`` as the warning names it, and left out."""
    from .hardware import DEFAULT_HARDWARE, HARDWARE, get_hardware
    from .placement import DENSE_KINDS
    out: dict = {}
    if "batch" in params:
        from .energy import BATCHES
        try:
            b = _number(params["batch"], 1)
        except ValueError:
            b = None
        if b in BATCHES:
            out["energy_batch"] = b
        else:
            bad.append(f"batch={params['batch']!r} (one of {', '.join(map(str, BATCHES))})")
    if "routing" in params:
        if params["routing"] in ("measured", "uniform"):
            out["energy_measured"] = params["routing"] == "measured"
        else:
            bad.append(f"routing={params['routing']!r} (measured or uniform)")
    if ANALOG in params:
        kinds = [k.strip() for k in params[ANALOG].split(",") if k.strip()]
        unknown = [k for k in kinds if k not in DENSE_KINDS]
        if unknown:
            bad.append(f"{ANALOG}={params[ANALOG]!r} (dense module kinds, comma separated: {', '.join(DENSE_KINDS)})")
        else:
            out.update({f"dense_{k}": k not in kinds for k in DENSE_KINDS})
    name = params.get(HW, DEFAULT_HARDWARE)
    if name not in HARDWARE:
        bad.append(f"{HW}={name!r} (one of {', '.join(HARDWARE)})")
        return out
    changes: dict = {"digital": {}, "analog": {}}
    for q in sorted(params):
        if not q.startswith(HW + "."):
            continue
        part, _, field = q[len(HW) + 1:].partition(".")
        base = getattr(HARDWARE[name], part, None) if part in changes else None
        if base is None or field == "name" or not hasattr(base, field):
            bad.append(f"{q}={params[q]!r} (no such constant: hw.digital.<field> or hw.analog.<field>)")
            continue
        try:
            v = _number(params[q], getattr(base, field))
            get_hardware(name, **{part: {field: v}})       # the editor's range check (field metadata)
        except ValueError as e:
            bad.append(f"{q}={params[q]!r} ({e})")
            continue
        changes[part][field] = v
    if HW in params or changes["digital"] or changes["analog"]:
        out["hw_preset"] = name
        for part, fields in changes.items():
            out.update({hardware_widget_key("hw", name, part, f): v for f, v in fields.items()})
        out["hw_changes"] = {"preset": name, **changes}
    return out


def view_params() -> dict[str, str]:
    """The URL query parameters of the current view: every ``QUERY`` value, and ``ENERGY`` / ``ANALOG`` / ``HW`` /
    ``hw.<part>.<field>`` where they differ from the defaults — what a pasted link needs to show the same."""
    from .hardware import DEFAULT_HARDWARE
    from .placement import DENSE_KINDS
    ss, out = st.session_state, {}
    for q, key in QUERY.items():
        v = ss.get(key)
        if v is not None:
            out[q] = f"{float(v) / 100:g}" if q == "budget" else str(v)
    if int(ss.get("energy_batch", DEFAULTS["energy_batch"])) != DEFAULTS["energy_batch"]:
        out["batch"] = str(int(ss["energy_batch"]))
    if bool(ss.get("energy_measured", False)) != DEFAULTS["energy_measured"]:
        out["routing"] = "measured" if ss["energy_measured"] else "uniform"
    analog = [k for k in DENSE_KINDS if ss.get(f"dense_{k}", True) is False]
    if analog:
        out[ANALOG] = ",".join(analog)
    hw = ss.get("hw_changes") or {}
    edits = {f"{HW}.{part}.{f}": repr(float(v)) if isinstance(v, float) else str(v)   # repr: every digit back
             for part in ("digital", "analog") for f, v in sorted((hw.get(part) or {}).items())}
    if hw.get("preset", DEFAULT_HARDWARE) != DEFAULT_HARDWARE or edits:
        out[HW] = hw["preset"]
        out.update(edits)
    return out


def _optional(q: str) -> bool:
    """A URL parameter ``view_params`` writes only while it differs from the default (removed when it is back)."""
    return q in (ANALOG, HW, *ENERGY) or q.startswith(HW + ".")


def init_state() -> None:
    """First run of a session: defaults, overridden by the URL's query parameters (bad values are ignored with a
    warning). Widgets keep their values across pages with ``persist_state="session"``."""
    ss = st.session_state
    if not ss.get("_initialised"):
        from .models import shorten
        for k, v in DEFAULTS.items():
            ss.setdefault(k, v)
        bad = []   # every ignored parameter is named, not only the last
        for q, key in QUERY.items():
            if q in st.query_params:
                try:
                    ss[key] = _from_query(q, st.query_params[q])
                except ValueError as e:
                    bad.append(f"{q}={shorten(st.query_params[q])!r}" + (f" ({e})" if str(e) else ""))
        for k, v in _extra_from_query(dict(st.query_params.to_dict()), bad).items():
            ss[k] = v
        if bad:
            ss["_query_warning"] = bad
        ss["source_kind"] = source_kind(ss["source"])
        if ss["source"].startswith("tiny:"):
            ss["source_tiny"] = ss["source"][5:]
        ss["source_text"] = ss["source"] if ss["source_kind"] in ("Hub id", "Local folder") else ""
        ss["_initialised"] = True


def sync_query_params() -> None:
    """Write the current view (``view_params``: model, strategy, budget, scope, preset; dense modules and hardware
    where they differ from the defaults) into the URL: the values that changed, in one write (the browser adds a
    history entry per write: one per parameter made Back need several presses). A setting back at its default
    leaves the URL in the same single write (``from_dict`` of the whole new set)."""
    want = view_params()
    have = st.query_params.to_dict()
    changed = {q: v for q, v in want.items() if have.get(q) != v}
    gone = [q for q in have if _optional(q) and q not in want]
    if gone:
        st.query_params.from_dict({**{q: v for q, v in have.items() if q not in gone}, **changed})
    elif changed:
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
