"""Validate page: measured expert sensitivity under a noise preset beside the criteria that claim to predict it."""
import numpy as np
import pandas as pd
import streamlit as st

from hetmoe_core import figures, forms, jobs, ui
from hetmoe_core.evaluate import measurement_line
from hetmoe_core.validation import (calibration_source, correlation_table, damage_resolved, seeds_text,
                                   shown_measurement, signed, spread_text, stored_measurements, stored_requests,
                                   token_choices)

ui.frame()
st.title("Validate the criteria")
st.caption("Does MaxNNScore find the experts that really suffer on AIMC? Each expert alone is put on analog tiles "
           "(everything else digital) and the increase of the mean token NLL on calibration text is **measured**, "
           "over several noise seeds (the same seeds and tokens for every expert, so differences are paired). "
           "Then each criterion's rank correlation with that damage is given with a 95% bootstrap interval.")
ss = st.session_state

from hetmoe_core.examples import EXAMPLES, load_examples, n_seeds
from hetmoe_core.noise import PRESETS
from hetmoe_core.store import Store

store = ui.store_or_stop(Store)
h = ui.require_model()
fp = h.lm.fingerprint
stored = ui.store_or_stop(lambda: stored_measurements(store, fp))   # every preset, any seeds/tokens, largest first
if not stored and EXAMPLES.is_file() and ss["source"] == "default":
    st.info("No measured sensitivity of this model in the store yet. The example results hold it for both paper "
            "presets (computed by scripts/example_results.py).")
    if st.button("Load example results", key="val_load_examples"):
        try:
            load_examples(store)
            st.rerun()
        except ValueError as e:
            st.error(str(e))

# ---------------------------------------------------------------- request
presets = [p for p in PRESETS if p != "ideal"]
if ss.get("val_preset") not in presets:
    ss["val_preset"] = ss.get("preset") if ss.get("preset") in presets else presets[0]


def open_stored(request) -> None:
    """Put a stored (seeds, tokens) request into the form (before its widgets are drawn, or in a callback)."""
    ss["val_seeds"], ss["val_tokens"] = float(request[0]), int(request[1])


# a preset opened (first visit, or another preset chosen): the form opens its largest stored measurement, if any
if ss.get("_val_opened") != ss["val_preset"] and (first := stored_requests(stored, ss["val_preset"])):
    open_stored(first[0])
jobs.restore_form("val_job")   # a reload: the form shows the running measurement's request, not the defaults
ss["_val_opened"] = ss["val_preset"]
tokens_offered = token_choices(stored, ss.get("val_tokens"))
c1, c2, c3, c4 = st.columns([2, 1, 1, 1])
preset = c1.selectbox("Noise preset", presets, key="val_preset")
# a float box shown as a whole number: Streamlit's integer box reads a typed "1e9" as 1 (forms.sweep_number_problem)
seeds_typed = c2.number_input("Seeds", value=5.0, step=1.0, format="%g", key="val_seeds",
                              help=forms.sweep_number_help("seeds", "Noise seeds 0..N-1, the same for every expert."))
seeds_problem = forms.sweep_number_problem(seeds=seeds_typed)
seeds = int(seeds_typed) if seeds_problem is None else 1
tokens = int(c3.selectbox("Tokens", tokens_offered, index=tokens_offered.index(16384), key="val_tokens",
                          format_func=lambda t: f"{t:,}",
                          help="calibration tokens the damage is measured on (the default model's validation "
                               "text); every token count stored for this model is offered"))
job = jobs.page_job("val_job")   # after a reload: the job the URL names
running = job is not None and job.running


def _start():
    """Measure's callback: the job starts before the page is drawn, so Measure is drawn disabled while it runs."""
    ss["val_job"] = jobs.ValidationJob(h, ss["val_preset"], int(ss["val_seeds"]), int(ss["val_tokens"]), store.path)


c4.button("Measure", type="primary", disabled=running or seeds_problem is not None, key="val_run", on_click=_start,
          help="Disabled while a measurement runs." if running else seeds_problem or
          "Stored results come back at once; a new request runs in the background.")
if seeds_problem:
    st.error(seeds_problem)
    st.stop()
if combos := stored_requests(stored, preset):      # this preset's stored requests: choosing one opens it
    ss["val_stored"] = (seeds, tokens) if (seeds, tokens) in combos else None
    st.selectbox(f"Stored under {preset} ({len(combos)})", combos, index=None, key="val_stored",
                 format_func=lambda c: f"{seeds_text(c[0])} × {c[1]:,} tokens",
                 placeholder="a new request (not stored)",
                 on_change=lambda: open_stored(ss["val_stored"]) if ss["val_stored"] else None,
                 help="The measurements of this model stored under this preset (from this page, the command line "
                      "or the example results), largest first. Choosing one shows it.")


def ended(j) -> None:
    if j.status == "done":
        cached = (j.result or {}).get("cached")
        st.success(f"{'From the store' if cached else 'Measured'} in {j.elapsed:.1f} s.")
    elif j.status == "cancelled":
        st.warning("Cancelled; nothing was stored for this request.")
    else:
        st.error(f"The measurement stopped: {j.error}")


jobs.job_progress("val_job", lambda j: (measurement_line(None, j.preset, j.done, j.total) if j.total else
                                       "measuring") + f" · {j.elapsed:.0f} s", ended,
                cancel_key="val_cancel",
                cancel_note="Cancelling: the measurement stops within one layer's forward; nothing is stored.")

# ---------------------------------------------------------------- which result to show
stored = ui.store_or_stop(lambda: stored_measurements(store, fp))
if job is not None and job.result is not None and job.result.get("model_fingerprint") == fp:
    v = job.result
else:
    v, exact = shown_measurement(stored, preset, seeds, tokens)    # the request, else this preset's largest
    if not exact and not running:
        st.caption(f"Not stored yet: measuring {seeds_text(seeds)} × {tokens:,} tokens takes "
                   f"{ui.measurement_time(h, seeds, tokens)}.")
if v is None:
    st.info("Press **Measure** to measure each expert's damage under this preset"
            + (" (stored results of other presets: " + ", ".join(sorted({d['preset'] for d in stored}))
               + ")." if stored else "."))
    st.stop()
nv = n_seeds(v["seeds"])
if (v["preset"], nv, v["tokens"]) != (preset, seeds, tokens):
    st.caption(f"Showing the stored measurement closest to the request: {v['preset']}, {seeds_text(nv)}, "
               f"{v['tokens']:,} tokens.")

cal = v.get("calibration") or {}
best = v.get("best") or {}
resolved = damage_resolved(v)
# the best criterion's label ("Max neuron norm of down_proj") needs a wide column: a quarter of the page cut it
m1, m2 = st.columns(2)
m3, m4 = st.columns([3, 1])
m1.metric("clean NLL (nats/token)", f"{v['clean_nll']:.4f}")
m2.metric("all routed experts analog", signed(v["all_experts"]["damage"]),
          help=f"{spread_text(v['all_experts']['se'], nv)} (standard error of the mean)")
if resolved:
    m3.metric("best criterion", figures.STRATEGY_LABELS.get(best.get("criterion"), best.get("criterion") or "—"),
              help="highest pooled Spearman correlation with the measured only-this damage")
    m4.metric("margin over the next", f"{best.get('margin', float('nan')):.3f}",
              "significant" if best.get("significant") else "inside the noise", delta_color="off")
else:
    m3.metric("best criterion", "none can be judged",
              help="the all-analog damage is not resolved from zero, so every correlation ranks noise")
    m4.metric("margin over the next", "—")
    st.warning(f"With every routed expert on analog the NLL changes by {signed(v['all_experts']['damage'])} "
               f"({spread_text(v['all_experts']['se'], nv)}), not resolved from zero: no criterion can be judged "
               "under this preset. " + ("Measure 2 or more seeds, or choose a noisier preset or more tokens."
                                        if nv < 2 else "Choose a noisier preset or more tokens."))
st.caption(f"{seeds_text(nv)} × {v['tokens']:,} tokens of {calibration_source(v)} "
           f"(hash {str(cal.get('hash', ''))[:12]}) · noise {v['preset']}.")

# ---------------------------------------------------------------- heatmaps: measured vs MaxNNScore
sc = ui.scores(h)
layers = figures._decoder_layers(v["experts"])
# one above the other, each the page's width: side by side each got ~400 px, squeezing 16 expert labels together
st.plotly_chart(figures.damage_heatmap(v), key="val_heat_damage")
if sc is not None:
    st.plotly_chart(figures.expert_heatmap(sc.get("maxnn"), [ls.layer for ls in sc.layers], "MaxNNScore per expert",
                                              "MaxNNScore", log=True), key="val_heat_maxnn")


# ---------------------------------------------------------------- criterion vs damage
def criterion_values(name: str):
    """Per-layer arrays of a criterion's scores as the measurement saw them (experts' score_<name>), or None."""
    if not all(f"score_{name}" in r for r in v["experts"]):
        return None
    return figures._per_layer(v["experts"], f"score_{name}")


damage = figures._per_layer(v["experts"], "only_this")
damage_se = figures._per_layer(v["experts"], "only_this_se")
criteria = list(dict.fromkeys(r["criterion"] for r in v.get("correlations", [])))
drawable = [c for c in criteria if criterion_values(c) is not None]
st.subheader("Criterion vs measured damage")
if drawable:
    crit = st.selectbox("Criterion", drawable, key="val_criterion",
                        format_func=lambda c: figures.STRATEGY_LABELS.get(c, c))
    st.plotly_chart(figures.damage_scatter(criterion_values(crit), damage, damage_se, layers,
                                           figures.STRATEGY_LABELS.get(crit, crit)), key="val_scatter")
else:
    st.info("No criterion of the correlation table can be drawn for this model.")

st.subheader("Rank correlations (95% bootstrap CI over experts and seeds)")
corr = pd.DataFrame(v.get("correlations", []))
if len(corr):
    scopes = [str(s) for s in dict.fromkeys(corr.scope)]
    scope = st.selectbox("Scope", scopes, key="val_scope", help="pooled over all MoE layers, or one layer")
    st.plotly_chart(figures.correlation_forest(v["correlations"], scope), key="val_forest")
    st.dataframe(correlation_table(v["correlations"], scope), hide_index=True,
                 column_config={c: st.column_config.NumberColumn(format="%.3f")
                                for c in corr.columns if c.startswith(("spearman", "kendall"))})

st.subheader("Dense modules vs experts")
st.plotly_chart(figures.dense_vs_experts(v), key="val_dense")
if v.get("routing_drift"):
    st.plotly_chart(figures.routing_drift(v), key="val_drift")
