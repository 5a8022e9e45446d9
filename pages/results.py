"""Results page: stored results from the DuckDB store — metric vs budget, a filterable table, downloads."""
import streamlit as st

from hetmoe_core import energy, figures, results, ui
from hetmoe_core.hardware import HARDWARE
from hetmoe_core.paired import paired_deltas, recovery_table
from hetmoe_core.placement import SHARE_HELP
from hetmoe_core.store import Store, shown_path
from hetmoe_core.strategies import ordered

ui.frame()
st.title("Results")
ss = st.session_state
store = ui.store_or_stop(Store)
summary = ui.store_or_stop(lambda: ui.store_read(store, "summary_frame"))
st.caption(f"Store `{shown_path(store.path)}` · {len(summary)} summary rows (mean ± std over seeds).")
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
just_run = results.session_run(ss.get("eval_job"))   # the page opens on it (results.opening_task / _limit)
c1, c2, c3, c4 = st.columns(4)
names = {f: ", ".join(summary[summary.model_fingerprint == f].model_source.unique()) for f in models}
model = c1.selectbox("Model", models, index=models.index(cur) if cur in models else 0, key="res_model",
                     format_func=lambda f: f"{names[f]} ({f[:20]})")
s = summary[summary.model_fingerprint == model]
tasks = sorted(s.task.unique())
task = c2.selectbox("Task", tasks, index=tasks.index(results.opening_task(s, model, just_run)), key="res_task")
s = s[s.task == task]
metrics = sorted(s.metric.unique())
prefer = [m for m in ("acc", "acc_norm", "word_perplexity", "perplexity") if m in metrics]
metric = c3.selectbox("Metric", metrics, index=metrics.index(prefer[0]) if prefer else 0, key="res_metric")
s = s[s.metric == metric]
limits = results.limit_choices(s)
lim = c4.selectbox("Limit (documents)", limits, index=results.opening_limit(store, limits, model, task, just_run),
                   key="res_limit", help="Results with different limits are not comparable.")
s = results.at_limit(s, lim)
noisy = s[s.strategy != "ideal"]


def _remember(key):
    ss[f"_{key}_chosen"] = list(ss[key])          # the user's own choice, kept while the options change


def kept_filter(col, label, column, key, order=sorted, **kw):
    """A multiselect whose choice survives a change of its options (another limit, task or metric): values still
    offered stay selected; when none is left, every option is shown and the page says which ones went. ``order``
    lists the options (strategies: the registry's order, not their machine names')."""
    options = order(noisy[column].unique())
    kept, dropped = results.keep_selection(ss.get(f"_{key}_chosen"), options)
    ss[key] = kept
    chosen = col.multiselect(label, options, key=key, on_change=_remember, args=(key,), wrap=True, **kw)
    if dropped:
        col.caption(f"{', '.join(map(str, dropped))}: no results here (limit {lim}); showing all {label.lower()}.")
    return chosen


# strategies on a row of their own (the most and longest chips), then presets (an edited preset's name is long)
# and backends side by side while both fit, else one under the other: in columns a chip read "f…" at 1280 px and
# "pap…" at 820 px
strategies = kept_filter(st, "Strategies", "strategy", "res_strategies", order=ordered,
                         format_func=lambda x: figures.STRATEGY_LABELS.get(x, x))
c1, c2 = ui.filter_row(st, (440, 220))
presets = kept_filter(c1, "Presets", "preset", "res_presets")
backends = kept_filter(c2, "Backends", "backend", "res_backends")
shown = noisy[noisy.preset.isin(presets) & noisy.strategy.isin(strategies) & noisy.backend.isin(backends)]
ideal, analog = results.references(s, shown)
higher = results.higher_is_better(metric, s)

# one chart per row: a legend of every strategy x preset fits below the plot instead of squeezing it
st.plotly_chart(figures.metric_vs_budget(shown, metric, ideal, analog, higher_is_better=higher),
                key="res_chart")
if noisy.empty:
    st.info(f"Only the ideal (all-digital) result is stored for {task} at limit {lim}: run a noisy evaluation with "
            "this limit on the **Evaluate** page.")
elif shown.empty:
    empty = [n for n, v in (("preset", presets), ("strategy", strategies), ("backend", backends)) if not v]
    st.info(f"Nothing to draw: no {' and no '.join(empty)} selected. Pick at least one above."
            if empty else "No stored result matches these filters together; widen one of them.")
elif not analog:
    st.caption("Run a budget of 0 % with these presets to draw the all-analog reference line.")

# paired statistics: the same seeds for every strategy and budget (hetmoe_core.paired)
runs = results.paired_runs(ui.store_read(store, "runs_frame", {"model_fingerprint": model, "task": task}),
                           metric, lim, presets, strategies, backends)
rec = recovery_table(runs)
if len(rec):
    st.plotly_chart(figures.recovery_vs_budget(rec, f"Recovered fraction of the noise loss · {metric}"),
                    key="res_recovery")
    st.caption("(A−X)/(A−I) per seed on the same seeds, mean with its 95% t interval over seeds (error bars); "
                    "the hover adds the task's sampling error (lm-eval stderr ÷ noise loss). 0 = all routed experts "
                    "analog (A), 1 = ideal all digital (I). Where the noise loss A−I is inside the noise (its 95% "
                    "interval over seeds reaches 0, or one seed within 1.96 × lm-eval's stderr) the fraction "
                    "would divide by noise: it is not drawn and the chart says so. A deterministic preset's "
                    "seeds are copies of one computation: it counts as one seed.")
else:
    st.info("The recovered fraction needs the ideal result and a 0 % budget result on the same seeds.")
pd_ = paired_deltas(runs)
if len(pd_):
    st.subheader("Paired differences between strategies")
    st.caption("A − B on their common seeds (metric units), mean with 95% t interval; “no difference” when the "
               "interval covers 0. A deterministic preset (one computation shared by its seeds) is judged by "
               "lm-eval's sampling error instead (sampling interval). sampling SE: lm-eval's stderr of one result, "
               "for scale. Hover a column header for its meaning; the downloads keep machine names (a, b, budget "
               "as a fraction).")
    view, notes = results.paired_view(pd_, metric)
    st.dataframe(view, hide_index=True, key="res_paired",
                 column_config={c: st.column_config.Column(help=h) for c, h in results.PAIRED_HELP.items()})
    for n in notes:
        st.caption(n)

# ---------------------------------------------------------------- score vs energy per token (hetmoe_core.energy)
st.subheader(f"{metric} vs energy per token")
e1, e2 = st.columns(2)
hw_name = e1.selectbox("Hardware", list(HARDWARE), key="res_hw", help="Presets of hetmoe_core/hardware.py (sources "
                       "there); edit single constants on the Placement page.")
batch = e2.select_slider("Batch size (tokens per decode step)", energy.BATCHES, value=32, key="res_batch")
runs_e, note = ui.store_read(store, "run_costs", model, hw_name, batch)
if runs_e is None:
    st.info(f"No energy figures: {note}.")
else:
    keep = (runs_e.task == task) & (runs_e.metric == metric) & (runs_e["limit"].isna() if lim == results.ALL
                                                                 else runs_e["limit"] == lim)
    keep &= (runs_e.strategy == "ideal") | (runs_e.preset.isin(presets) & runs_e.strategy.isin(strategies)
                                            & runs_e.backend.isin(backends))
    st.plotly_chart(figures.accuracy_vs_energy(energy.config_points(runs_e[keep]), metric,
                                               higher_is_better=higher), key="res_energy")
    st.caption(f"One point per configuration (mean ± std over seeds), energy of its placement on {hw_name} "
               f"({note}); dashed: the Pareto front — no other configuration is cheaper and at least as good.")
    if left_out := energy.unpriced(runs_e[keep]):
        st.caption(f"Not on this chart (no stored placement fits the model's shapes, so no energy): "
                   f"{'; '.join(left_out)}.")

st.subheader("Table")
view, notes = results.summary_view(results.summary_table(s, shown))
st.dataframe(view, hide_index=True, key="res_table",
             column_config={"digital_share": st.column_config.TextColumn("digital share",
                                                                         help=SHARE_HELP["digital_share"]),
                            # kept in view when the wide table scrolls sideways (the mean was cut at the edge)
                            **{c: st.column_config.Column(pinned=True) for c in ("budget %", "mean", "std")},
                            # as wide as their longest text: auto-sizing cut "MaxNNSc", "paper-pc"
                            **{c: st.column_config.Column(pinned=c == "strategy", width=w)
                               for c, w in results.text_widths(view, ("strategy", "preset")).items()}})
for n in notes:
    st.caption(n)

st.subheader("Download")
n_runs, csv, parquet = ui.store_read(store, "downloads", {"model_fingerprint": model})
st.caption(f"All {n_runs} stored runs of this model, one row per (run, metric).")
d1, d2 = st.columns(2)
d1.download_button("CSV", csv, "hetmoe_results.csv", "text/csv", key="dl_csv")
d2.download_button("Parquet", parquet, "hetmoe_results.parquet", "application/octet-stream", key="dl_parquet")
