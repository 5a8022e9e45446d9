"""What the dashboard's forms say and check: the hardware-constants editor, the time and note of a measured
strategy's measurement, a noise field's allowed range, a measured strategy that cannot be offered, and the Evaluate
form's budgets and empty choices, each as one line in the form's own words.

Streamlit-side where a widget or the session is involved; ranges and help come from the dataclasses' field
metadata. Importing this module imports streamlit.
"""
from __future__ import annotations

import streamlit as st

from .modelcache import ModelHandle


# ------------------------------------------------------------------------------------------- hardware constants
def hardware_editor(key: str = "hw"):
    """A hardware preset and its constants, editable in an expander (labels, units, help and sources are read
    from the field metadata of ``hardware.DigitalConfig`` / ``AnalogConfig``). Returns the ``Hardware``; an
    invalid edit shows one warning and returns the preset unchanged."""
    from .hardware import HARDWARE, HARDWARE_DOCS, AnalogConfig, DigitalConfig, field_docs, get_hardware
    from .view_state import hardware_widget_key
    # the widgets keep their values across pages (persist_state) and the hardware shown goes to
    # st.session_state[f"{key}_changes"] ({"preset", "digital", "analog"}), which the link carries (view_state)
    with st.expander("Hardware constants (units and sources in the tooltips)"):
        name = st.selectbox("Hardware preset", list(HARDWARE), key=f"{key}_preset", format_func=lambda n: n,
                            persist_state="session",
                            help=" · ".join(f"{n}: {d}" for n, d in HARDWARE_DOCS.items()))
        base, changes = HARDWARE[name], {"digital": {}, "analog": {}}
        for part, cls in (("digital", DigitalConfig), ("analog", AnalogConfig)):
            title = cls.PART
            st.markdown(f"**{title}** · {getattr(base, part).name}")
            cols = st.columns(3)
            for i, f in enumerate(field_docs(cls)):
                v = getattr(getattr(base, part), f["name"])
                is_int = isinstance(v, int)
                # no widget bound: a browser holds an out-of-range entry red and sends the old value, so the
                # view would silently keep it; get_hardware's range check (field metadata) refuses it below
                w = cols[i % 3].number_input(
                    f"{f['name']} ({f['unit']})", value=v,
                    step=1 if is_int else None, format=None if is_int else "%.4g",
                    key=hardware_widget_key(key, name, part, f["name"]), persist_state="session",
                    help=f"{f['help']} Unit: {f['unit']}. Allowed: {f['allowed'][0]:g} to {f['allowed'][1]:g}. "
                         f"Source: {f['source']}")
                if w != v:
                    changes[part][f["name"]] = int(w) if is_int else float(w)
        try:
            hw = get_hardware(name, **changes)
        except ValueError as e:
            st.warning(f"{e} — using the preset's values.")
            st.session_state[f"{key}_changes"] = {
                "preset": name, "digital": {}, "analog": {}}
            return base
        st.session_state[f"{key}_changes"] = {"preset": name, **changes}
        if changes["digital"] or changes["analog"]:
            st.caption("Edited: " + ", ".join(f"{p}.{k}" for p in changes for k in changes[p]))
    return hw


@st.cache_resource(max_entries=32, show_spinner=False)
def _forward_seconds(fingerprint: str, dtype: str, device: str, tokens: int, _handle: ModelHandle) -> float:
    """sensitivity.forward_seconds of the loaded model for a forward of ``tokens`` tokens, timed once per model
    (weights fingerprint, dtype, device) and forward size."""
    from .sensitivity import forward_seconds
    return forward_seconds(_handle.lm, tokens)


def _duration(seconds: float) -> str:
    return (f"about {seconds / 3600:.1f} h" if seconds > 5400 else f"about {seconds / 60:.0f} min" if seconds > 90
            else f"about {seconds:.0f} s")


def measurement_time(handle: ModelHandle, seeds: int, tokens: int) -> str:
    """How long measuring the damage (``sensitivity.validate``) of the held model takes here, in words with its
    basis: "about 14 min here at most (1,370 forwards of 8,192 tokens × 0.5 s, one forward of that size timed on
    this machine; 274 forwards and 5 s more for the criteria and the bootstrap)" (``sensitivity.measurement_estimate``: the
    forward is timed at the measurement's own size)."""
    from .sensitivity import forward_tokens, measurement_estimate
    ft = forward_tokens(tokens)
    fs = _forward_seconds(handle.lm.fingerprint, st.session_state["dtype"], st.session_state["device"], ft, handle)
    e = measurement_estimate(handle.lm, seeds=seeds, tokens=tokens, forward_s=fs)
    return (f"{_duration(e['seconds'])} here at most ({e['forwards']:,} forwards of {ft:,} tokens × {fs:.2g} s, one "
            f"forward of that size timed on this machine; {e['extra_forwards']:,} forwards and {e['fixed_s']:g} s more "
            "for the criteria and the bootstrap)")


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
            f"Validate page (any seeds and tokens; Evaluate's oracle measures {ORACLE_SEEDS} seeds × "
            f"{ORACLE_TOKENS:,} tokens), then choose this strategy again.")


BUDGETS_HELP = ("Percentages of routed experts kept digital, e.g. 0, 12.5, 25. Decimals take a dot (12.5); budgets "
                "are separated by commas, semicolons or spaces. Without a dot anywhere, a comma between two digits "
                "(12,5) is refused, since it reads as 12.5 in Europe and as 12 and 5 elsewhere; once a dot marks the "
                "decimals (12.5,25), every comma separates budgets.")


def budgets_from_text(text: str) -> list[float]:
    """The Evaluate page's digital budgets (percent text, see BUDGETS_HELP) as fractions in [0, 1]
    (placement.budgets_from_percent after the separators are checked).

    A decimal dot anywhere in the text makes every comma a separator ("12.5,25" is 12.5 % and 25 %). Without one, a
    comma with digits on both sides ("12,5", "12 ,5") is a decimal comma or a separator: ValueError says so in one
    line that quotes the whole text and its readings ("12, 5" is unambiguous)."""
    import re
    from .placement import budgets_from_percent
    pairs = [] if "." in text else list(re.finditer(r"(\d)\s*,(?=\d)", text))
    if pairs:
        def reading(sep):
            out, at = [], 0
            for m in pairs:
                out += [text[at:m.end(1)], sep]
                at = m.end()
            return "".join(out + [text[at:]]).strip()
        dec = reading(".")
        if not all(re.fullmatch(r"\d+(\.\d+)?%?", t) for t in re.split(r"[\s,;]+", dec.strip(" ,;")) if t):
            dec = "e.g. " + re.sub(r"\s*,", ".", re.search(r"\d+\s*,\d+", text).group())   # 12,5,25: no one reading
        raise ValueError(f"'{text.strip()}' is ambiguous: use a dot for decimals ({dec}); separate budgets with a "
                         f"comma and a space, a semicolon or spaces ({reading(', ')})")
    return budgets_from_percent(re.sub(r"\s+", ",", text.strip()))


# The Evaluate form's whole-number fields: label, allowed range and help, the one source of the widgets' labels, help
# and the range check (the lower bounds are sweep._check_grid's; 0 = all documents for Limit)
SWEEP_NUMBERS = {
    "seeds": ("Seeds", 1, 20, "Noise seeds 0..N-1; results show mean ± std."),
    "limit": ("Limit (documents per task, 0 = all)", 0, 100000,
              "lm-eval --limit: a small number gives a quick, rough answer."),
    "batch_size": ("Batch size", 1, 256, "lm-eval --batch_size: requests scored per forward pass."),
}


def sweep_number_help(name: str, text: str | None = None) -> str:
    """A SWEEP_NUMBERS field's tooltip: its help (``text`` where a page words it for its own use, as Validate's
    Seeds) and allowed range."""
    _, lo, hi, own = SWEEP_NUMBERS[name]
    return f"{text or own}\n\nAllowed: a whole number from {lo} to {hi:,}."


def sweep_number_problem(**values) -> str | None:
    """The Evaluate form's one line for the first SWEEP_NUMBERS value outside its range (the widgets carry no bounds
    of their own: a browser would hold such an entry red and send the old value, so Run would use it silently);
    None when all are allowed. ``values``: field name -> the number typed, a float: the page's boxes are float boxes
    shown as "%g", since Streamlit's integer box reads "1e9" as 1 (parseInt) where a float box reads 1e9."""
    for name, v in values.items():
        label, lo, hi, _ = SWEEP_NUMBERS[name]
        whole = float(v).is_integer()
        if not whole or not lo <= v <= hi:
            shown = f"{int(v):,}" if whole else f"{v:g}"
            why = "is outside the allowed range" if whole else "is not a whole number"
            return f"{label}: {shown} {why}; type a whole number from {lo} to {hi:,}."
    return None


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
