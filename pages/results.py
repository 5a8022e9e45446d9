"""Results page: stored results from the DuckDB store — metric vs budget, a filterable table, downloads."""
import io

import pandas as pd
import streamlit as st

from hetmoe_core import energy, figures, ui
from hetmoe_core.hardware import HARDWARE

ui.frame()
st.title("Results")
ss = st.session_state
try:
    from hetmoe_core.report import LOWER_IS_BETTER
    from hetmoe_core.store import Store
    store = Store()
    summary = store.summary_frame()
except ImportError as e:
    st.info(f"The results store is not available yet ({e}).")
    st.stop()
except (ValueError, RuntimeError) as e:
    st.error(f"Could not open the results store: {e}\n\nSet HETMOE_STORE to another file or close the program "
             "holding it.")
    st.stop()
st.caption(f"Store `{store.path}` · {len(summary)} summary rows (mean ± std over seeds).")
if summary.empty:
    st.info("No results stored yet. Run an evaluation on the **Evaluate** page (or `python -m hetmoe_core`).")
    st.page_link("pages/evaluate.py", label="→ Evaluate")
    from hetmoe_core.examples import EXAMPLES, load_examples
    if EXAMPLES.is_file():
        st.markdown("Or load the **example results** of the default model (every strategy × digital budgets "
                    "0–100 % × two paper presets, per-domain perplexity; computed by scripts/example_results.py).")
        if st.button("Load example results", type="primary", key="res_load_examples"):
            try:
                load_examples(store)
                st.rerun()
            except ValueError as e:
                st.error(str(e))
    st.stop()

# ---------------------------------------------------------------- filters
h = ui.get_model(show_errors=False)
models = sorted(summary.model_fingerprint.dropna().unique())
cur = h.lm.fingerprint if h is not None else None
c1, c2, c3, c4 = st.columns(4)
names = {f: ", ".join(summary[summary.model_fingerprint == f].model_source.unique()) for f in models}
model = c1.selectbox("Model", models, index=models.index(cur) if cur in models else 0, key="res_model",
                     format_func=lambda f: f"{names[f]} ({f[:20]})")
s = summary[summary.model_fingerprint == model]
task = c2.selectbox("Task", sorted(s.task.unique()), key="res_task")
s = s[s.task == task]
metrics = sorted(s.metric.unique())
prefer = [m for m in ("acc", "acc_norm", "word_perplexity", "perplexity") if m in metrics]
metric = c3.selectbox("Metric", metrics, index=metrics.index(prefer[0]) if prefer else 0, key="res_metric")
s = s[s.metric == metric]
limits = sorted(s["limit"].dropna().unique().tolist()) + (["all"] if s["limit"].isna().any() else [])
lim = c4.selectbox("Limit (documents)", limits, index=len(limits) - 1, key="res_limit",
                   help="Results with different limits are not comparable.")
s = s[s["limit"].isna()] if lim == "all" else s[s["limit"] == lim]
noisy = s[s.strategy != "ideal"]
c1, c2, c3 = st.columns(3)
presets = c1.multiselect("Presets", sorted(noisy.preset.unique()), default=sorted(noisy.preset.unique()),
                         key="res_presets")
strategies = c2.multiselect("Strategies", sorted(noisy.strategy.unique()), default=sorted(noisy.strategy.unique()),
                            key="res_strategies", format_func=lambda x: figures.STRATEGY_LABELS.get(x, x))
backends = c3.multiselect("Backends", sorted(noisy.backend.unique()), default=sorted(noisy.backend.unique()),
                          key="res_backends")
shown = noisy[noisy.preset.isin(presets) & noisy.strategy.isin(strategies) & noisy.backend.isin(backends)]
ideal = s[s.strategy == "ideal"]["mean"]
analog = {p: float(g["mean"].mean()) for p, g in shown[shown.budget == 0].groupby("preset")}

chart_l, chart_r = st.columns(2)
chart_l.plotly_chart(figures.metric_vs_budget(shown, metric, float(ideal.iloc[0]) if len(ideal) else None, analog,
                                              higher_is_better=metric not in LOWER_IS_BETTER), key="res_chart")
if not analog:
    st.caption("Run a budget of 0 % to draw the all-analog reference line.")

# paired statistics: the same seeds for every strategy and budget (hetmoe_core.paired)
from hetmoe_core.paired import paired_deltas, recovery_table
runs = store.runs_frame({"model_fingerprint": model, "task": task})
runs = runs[(runs.metric == metric) & (runs["limit"].isna() if lim == "all" else runs["limit"] == lim)]
runs = runs[(runs.strategy == "ideal") | (runs.preset.isin(presets) & runs.strategy.isin(strategies)
                                          & runs.backend.isin(backends))]
rec = recovery_table(runs)
if len(rec):
    chart_r.plotly_chart(figures.recovery_vs_budget(rec, f"Recovered fraction of the noise loss · {metric}"),
                         key="res_recovery")
    chart_r.caption("(A−X)/(A−I) per seed on the same seeds, mean with its 95% t interval over seeds (error bars); "
                    "the hover adds the task's sampling error (lm-eval stderr ÷ noise loss). 0 = all routed experts "
                    "analog (A), 1 = ideal all digital (I).")
else:
    chart_r.info("The recovered fraction needs the ideal result and a 0 % budget result on the same seeds.")
pd_ = paired_deltas(runs)
if len(pd_):
    st.subheader("Paired differences between strategies")
    st.caption("a − b on their common seeds (metric units), mean with 95% t interval; “no difference” when the "
               "interval covers 0. sampling_se: lm-eval's stderr of one result, for scale.")
    st.dataframe(pd_[["preset", "budget", "a", "b", "n_seeds", "delta", "delta_lo", "delta_hi", "delta_recovered",
                      "sampling_se", "verdict"]], hide_index=True,
                 column_config={c: st.column_config.NumberColumn(format="%.4g")
                                for c in ("delta", "delta_lo", "delta_hi", "delta_recovered", "sampling_se")})

# ---------------------------------------------------------------- score vs energy per token (hetmoe_core.energy)
st.subheader(f"{metric} vs energy per token")
e1, e2 = st.columns(2)
hw_name = e1.selectbox("Hardware", list(HARDWARE), key="res_hw", help="Presets of hetmoe_core/hardware.py (sources "
                       "there); edit single constants on the Placement page.")
batch = e2.select_slider("Batch size (tokens per decode step)", energy.BATCHES, value=32, key="res_batch")
runs_e, note = energy.run_costs(store, model, hw_name, batch)
if runs_e is None:
    st.info(f"No energy figures: {note}.")
else:
    keep = (runs_e.task == task) & (runs_e.metric == metric) & (runs_e["limit"].isna() if lim == "all"
                                                                 else runs_e["limit"] == lim)
    keep &= (runs_e.strategy == "ideal") | (runs_e.preset.isin(presets) & runs_e.strategy.isin(strategies)
                                            & runs_e.backend.isin(backends))
    st.plotly_chart(figures.accuracy_vs_energy(energy.config_points(runs_e[keep]), metric,
                                               higher_is_better=metric not in LOWER_IS_BETTER), key="res_energy")
    st.caption(f"One point per configuration (mean ± std over seeds), energy of its placement on {hw_name} "
               f"({note}); dashed: the Pareto front — no other configuration is cheaper and at least as good.")

st.subheader("Table")
table = shown.assign(**{"budget %": shown.budget * 100}).drop(columns=["budget"])
cols = ["strategy", "budget %", "preset", "backend", "scope", "mean", "std", "n_seeds", "digital_share", "seeds",
        "limit", "model_source"]
table = pd.concat([s[s.strategy == "ideal"].assign(**{"budget %": 100.0}), table], ignore_index=True)
st.dataframe(table[[c for c in cols if c in table]], hide_index=True,
             column_config={"mean": st.column_config.NumberColumn(format="%.4f"),
                            "std": st.column_config.NumberColumn(format="%.4f"),
                            "digital_share": st.column_config.NumberColumn("digital share", format="%.3f")})

st.subheader("Download")
runs = store.runs_frame({"model_fingerprint": model})
st.caption(f"All {runs.key.nunique()} stored runs of this model, one row per (run, metric).")
d1, d2 = st.columns(2)
d1.download_button("CSV", runs.to_csv(index=False).encode(), "hetmoe_results.csv", "text/csv", key="dl_csv")
buf = io.BytesIO()
runs.to_parquet(buf, index=False)
d2.download_button("Parquet", buf.getvalue(), "hetmoe_results.parquet", "application/octet-stream", key="dl_parquet")
