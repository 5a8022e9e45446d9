"""Standalone HTML report of stored results (a snapshot or a store): opens offline, plotly.js embedded.

Sections: score table (mean ± std over seeds per strategy, budget and preset, with the ideal all-digital result),
one figure per task, headline metric and limit (score vs digital budget in %, one line per strategy × preset, error
bars = std over seeds, dashed line = ideal at the same limit) beside its recovered fraction of the noise loss
(hetmoe_core.paired: per seed, 95% t intervals), the paired differences between strategies, score vs energy per token
(one point per configuration, Pareto front; ``energy.run_costs``), and the placements used.
"""
from __future__ import annotations

import contextlib
import html
import json
import os
import tempfile
from pathlib import Path

from .store import Store, atomic_write, output_path, shown_path

HEADLINE = ("acc", "acc_norm", "word_perplexity", "perplexity")   # plotted; every metric is in the table
VARIANT_COLUMNS = ("backend", "dtype", "batch_size", "num_fewshot", "analog_dense")   # besides the preset; the limit
# splits figures (results.chart_groups)
# Deprecated: metric direction is stored with each metric (store.summary_frame "higher_is_better", from lm-eval's
# results); this list remains only for pages/results.py until it reads that column.
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def report_data(source: str | os.PathLike | Store):
    """(summary DataFrame, placements DataFrame) of a snapshot file (.zip) or a store (path or Store).

    A snapshot is validated and imported into a temporary store first (snapshot.import_snapshot's checks apply).
    """
    with _opened(source) as store:
        return store.summary_frame(), store.placements_frame()


@contextlib.contextmanager
def _opened(source: str | os.PathLike | Store):
    """The Store of a snapshot (imported into a temporary store for the block), a store path or a Store."""
    if isinstance(source, Store):
        yield source
        return
    path = Path(source)
    if path.suffix == ".zip" or (path.is_file() and path.read_bytes()[:2] == b"PK"):
        from .snapshot import import_snapshot
        with tempfile.TemporaryDirectory() as d:
            store = Store(Path(d) / "report.duckdb")
            import_snapshot(path, store)
            yield store
        return
    if not path.is_file():
        raise ValueError(f"no snapshot or store at {path}")
    yield Store(path, create=False, read_only=True)


def _energy_figures(store: Store, summary) -> tuple[list, list[str]]:
    """Score vs energy per token (energy.run_costs on the default hardware at batch 32), one figure per model, task,
    headline metric and limit, one point per configuration; and notes for models whose config could not be read."""
    from . import energy, figures
    from .results import chart_groups, limit_label
    figs, notes = [], []
    for fp in sorted(summary.model_fingerprint.dropna().unique()):
        runs, note = energy.run_costs(store, fp)
        if runs is None:
            notes.append(f"{fp}: {note}")
            continue
        for task, metric, limit, g in chart_groups(runs):      # limits never share a figure
            if metric not in HEADLINE:
                continue
            higher = _direction(metric, summary[summary.metric == metric]) is not False
            arrow = "higher is better" if higher else "lower is better"
            fig = figures.accuracy_vs_energy(
                energy.config_points(g), metric, higher,
                title=f"{task} — {metric} ({arrow})<br>vs energy per token · {limit_label(limit)}<br>"
                      f"<sup>{energy.DEFAULT_HARDWARE}, {note}</sup>")
            fig.update_layout(margin_t=100, height=fig.layout.height + 36)   # three title lines
            figs.append(fig)
    return figs, notes


def _recovery_figures(runs) -> dict:
    """{(task, metric, limit): recovered-fraction figure} for the headline metrics (hetmoe_core.paired), limit as
    results.chart_groups gives it (an int or results.ALL)."""
    from .figures import recovery_vs_budget
    from .paired import recovery_table
    from .results import chart_groups, limit_label
    rec = recovery_table(runs[runs.metric.isin(HEADLINE)])
    return {(t, m, lim): recovery_vs_budget(g, f"{t} — recovered fraction of the noise loss<br>"
                                               f"({m}) · {limit_label(lim)}")
            for t, m, lim, g in chart_groups(rec)}


def _fmt(mean, std) -> str:
    if mean is None:
        return ""
    s = f"{mean:.4g}"
    return s if std is None or std != std else f"{s} ± {std:.2g}"


def _score(mean, std, deterministic) -> str:
    return f"{mean:.4g} (deterministic)" if deterministic and mean is not None else _fmt(mean, std)


def _direction(metric: str, rows) -> bool | None:
    """Higher is better? As lm-eval declared it, stored with the metric; older results ask lm-eval's registry."""
    stored = rows["higher_is_better"].dropna() if "higher_is_better" in rows else []
    if len(stored):
        return bool(stored.iloc[0])
    from .tasks import higher_is_better
    return higher_is_better(metric)


def _figures(summary) -> list:
    """One figure per (task, headline metric, limit) (results.chart_groups): score vs digital budget in % of routed
    experts, as the dashboard draws it; the dashed ideal line is the all-digital result at the same limit."""
    import plotly.graph_objects as go
    from .figures import STRATEGY_LABELS, legend_below, line_style, metric_axis
    from .results import chart_groups, limit_label
    figs = []
    for task, metric, limit, g in chart_groups(summary):
        if metric not in HEADLINE:
            continue
        fig = go.Figure()
        ideal = g[g.strategy == "ideal"]
        noisy = g[g.strategy != "ideal"]
        varied = [c for c in VARIANT_COLUMNS if noisy[c].nunique(dropna=False) > 1]   # never one line for two configs
        variants = sorted({k[2:] for k in noisy.groupby(["strategy", "preset"] + varied, dropna=False).groups},
                          key=str)   # strategy: colour; preset and variant: dash and marker
        for k, line in noisy.groupby(["strategy", "preset"] + varied, sort=True, dropna=False):
            line = line.sort_values("budget")
            name = " · ".join([STRATEGY_LABELS.get(k[0], k[0]), k[1]] + [f"{c}={v}" for c, v in zip(varied, k[2:])])
            style = line_style(k[0], k[1], variants.index(k[2:]))
            fig.add_trace(go.Scatter(
                x=line.budget * 100, y=line["mean"], mode="lines+markers", name=name, **style,
                error_y=dict(type="data", array=line["std"].fillna(0).tolist(), visible=True,
                             color=style["line"]["color"], thickness=1),
                customdata=line[["n_seeds"]].to_numpy(),
                hovertemplate="budget %{x:.1f}%<br>%{y:.4g} (n=%{customdata[0]} seeds)<extra></extra>"))
        if len(ideal):
            fig.add_hline(y=float(ideal["mean"].iloc[0]), line_dash="dash", line_color="black",
                          annotation_text="ideal (all digital)", annotation_position="top left")
        arrow = {True: "higher is better", False: "lower is better"}.get(_direction(metric, g), "direction unknown")
        fig.update_layout(title=f"{task} — {metric} ({arrow})<br>vs digital budget · {limit_label(limit)}",
                          showlegend=True, **legend_below(len(fig.data)))
        fig.update_xaxes(range=[-3, 103], ticksuffix="%",    # budgets in percent, as on the dashboard
                         title_text="digital budget (% of routed experts)")
        sd = noisy["std"].astype(float).fillna(0)
        fig.update_yaxes(title_text=metric, **metric_axis([*(noisy["mean"] - sd), *(noisy["mean"] + sd),
                                                           *ideal["mean"].iloc[:1]], metric))
        fig.update_layout(meta=[task, metric, limit])   # pairs the figure with its recovered-fraction figure
        figs.append(fig)
    return figs


def _cell(v) -> str:
    """Table text of one value: missing values (None, NaN) are an empty cell, never the word "None"."""
    return "" if v is None or (isinstance(v, float) and v != v) else html.escape(str(v))


def _table(df, cols, tips: dict | None = None) -> str:
    """An HTML table; past 20 rows it scrolls inside a box of its own (the page stays short). ``tips``: {column:
    text} shown when the pointer rests on that header (results.PAIRED_HELP for the paired table)."""
    def th(c):
        tip = (tips or {}).get(c)
        return f"<th title='{html.escape(tip, quote=True)}'>" if tip else "<th>"
    head = "".join(f"{th(c)}{html.escape(str(c))}</th>" for c in cols)
    rows = "".join("<tr>" + "".join(f"<td>{_cell(r[c])}</td>" for c in cols) + "</tr>"
                   for r in df.to_dict("records"))
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    return f"<div class='scroll'>{table}</div>" if len(df) > 20 else table


def _paired_section(deltas) -> str:
    """The paired-differences table as the Results page shows it (results.paired_view: strategy labels, budgets
    in %, n/a with a footnote of why), or a line saying there is nothing to compare."""
    from .results import PAIRED_HELP, paired_view
    if not len(deltas):
        return "<p>no strategies to compare on common seeds</p>"
    view, notes = paired_view(deltas, context=True)
    return _table(view, list(view.columns), PAIRED_HELP) + "".join(
        f"<p class='note'>{html.escape(n)}</p>" for n in notes)


def _plotlyjs() -> str:
    """plotly.js once for the whole page (offline), as plotly.py ships it."""
    from plotly.offline import get_plotlyjs
    return f"<script>{get_plotlyjs()}</script>"


def _slot(fig, embedded: list) -> str:
    """An empty div for ``fig``; its compact JSON (no per-figure template: one shared below) joins ``embedded``."""
    from plotly.io.json import to_json_plotly
    d = fig.to_plotly_json()
    d["layout"].pop("template", None)
    embedded.append(to_json_plotly(d))
    return f"<div class='fig' id='fig{len(embedded) - 1}' style='height:{int(fig.layout.height or 450)}px'></div>"


def _draw_script(embedded: list) -> str:
    """One JSON block of every figure and one script that draws each as it scrolls near the viewport (a report
    of 40 charts opens at once instead of drawing all of them first); the plotly_white template is shared."""
    import plotly.io as pio
    from plotly.io.json import to_json_plotly
    template = to_json_plotly(pio.templates["plotly_white"].to_plotly_json())
    data = ("[" + ",".join(embedded) + "]").replace("</", "<\\/")
    return f"""<script type="application/json" id="figures">{data}</script>
<script>(function(){{const F=JSON.parse(document.getElementById('figures').textContent),T={template};
function draw(el){{const f=F[+el.id.slice(3)];f.layout.template=T;
Plotly.newPlot(el,f.data,f.layout,{{responsive:true,displaylogo:false}});}}
const els=document.querySelectorAll('.fig');
if(!('IntersectionObserver' in window)){{els.forEach(draw);return;}}
const io=new IntersectionObserver(es=>es.forEach(e=>{{if(e.isIntersecting){{io.unobserve(e.target);draw(e.target);}}}}),
{{rootMargin:'600px 0px'}});els.forEach(el=>io.observe(el));}})();</script>"""


def write_report(source: str | os.PathLike | Store, out: str | os.PathLike, title: str = "hetmoe results",
                 overwrite: bool = False) -> dict:
    """Write the HTML report of ``source`` (snapshot .zip, store path or Store) to ``out``.

    Returns {"path", "results" (summary rows), "figures", "placements"}. Raises ValueError when there is no result,
    or when ``out`` is a folder, exists and ``overwrite`` is False, or is the source itself (store.output_path).
    """
    from .figures import NOT_RESOLVED
    from .paper_tasks import MISSING_NOTE, PAPER_TASKS
    from .results import limit_label, percent, strategy_label
    out = output_path(out, overwrite, protect=[getattr(source, "path", source)])
    with _opened(source) as store:
        summary, placements = store.summary_frame(), store.placements_frame()
        if summary.empty:
            raise ValueError("no stored results to report; run `evaluate` or `sweep` first")
        efigs, enotes = _energy_figures(store, summary)
        runs = store.runs_frame()
    summary = summary.sort_values(["task", "metric", "strategy", "preset", "budget"]).reset_index(drop=True)
    figs = _figures(summary)
    from .paired import paired_deltas
    rec_figs = _recovery_figures(runs)
    embedded: list = []              # every figure's JSON, drawn by one script when it scrolls into view
    parts = []
    for fig in figs:
        rf = rec_figs.get(tuple(fig.layout.meta or ()))   # metric vs budget beside its recovered fraction
        parts.append("<div class='pair'>" + "".join(_slot(f, embedded) for f in (fig, rf) if f is not None)
                     + "</div>")
    deltas = paired_deltas(runs[runs.metric.isin(HEADLINE)])
    eparts = ["<div class='pair'>" + "".join(_slot(f, embedded) for f in efigs[i:i + 2]) + "</div>"
              for i in range(0, len(efigs), 2)]
    enote = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in enotes)
    table = summary.assign(score=[_score(m, s, d) for m, s, d in zip(summary["mean"], summary["std"],
                                                                      summary["deterministic"])],
                           digital_share=summary.digital_share.map(lambda x: "" if x != x else f"{x:.3f}"),
                           limit=summary["limit"].map(limit_label), strategy=summary.strategy.map(strategy_label),
                           **{"budget %": summary.budget.map(lambda b: f"{b * 100:g}")})
    cols = ["task", "metric", "strategy", "budget %", "preset", "backend", "dtype", "batch_size", "num_fewshot",
            "analog_dense", "score", "n_seeds", "digital_share", "limit", "model_source", "origins"]
    ptable = ""
    if len(placements):
        p = placements.assign(per_layer_digital=[json.dumps([len(d) for d in json.loads(x)["digital"]])
                                                 for x in placements.placement],
                              strategy=placements.strategy.map(strategy_label),
                              **{"digital budget": placements.budget.map(percent)})
        ptable = _table(p, ["key", "model_fingerprint", "strategy", "digital budget", "scope", "seed",
                            "per_layer_digital"])
    note = f"<p class='note'>{html.escape(MISSING_NOTE)}</p>" if summary.task.isin(list(PAPER_TASKS)).any() else ""
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em auto;padding:0 2em;max-width:1500px}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}
th{{background:#f3f3f3;position:sticky;top:0}}.note{{color:#555}}
.pair{{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:1.5em;margin-bottom:1.5em}}
.fig{{min-width:0;overflow:hidden}}.scroll{{max-height:32em;overflow:auto;border:1px solid #ddd;margin-bottom:1em}}
</style>{_plotlyjs()}
</head><body><h1>{html.escape(title)}</h1>
<p>{len(summary)} scores (mean ± sample std over seeds) from {html.escape(shown_path(getattr(source, 'path', source)))}.</p>{note}
<h2>Score vs digital budget</h2>{''.join(parts) or '<p>no headline metric to plot</p>'}
<p class='note'>Right: recovered fraction of the noise loss (A−X)/(A−I) per seed on the same seeds (A = all routed
experts analog, I = ideal), mean with its 95% t interval over seeds; the hover adds lm-eval's sampling error. Where
the noise loss A−I is not resolved (its 95% interval over seeds reaches 0, one seed within 1.96 × lm-eval's stderr, or
no loss at all; a deterministic preset's seeds are copies of one computation and count as one seed) the chart says
“{html.escape(NOT_RESOLVED)}” instead of plotting a ratio of noise.</p>
<h2>Paired differences between strategies</h2>
<p class='note'>A − B on common seeds, mean [95% t interval]; “no difference” when the interval covers 0 (for a
deterministic preset, one computation, the sampling interval A − B ± 1.96 × √(SE_A² + SE_B²) of lm-eval).
Strategies by their chart labels (hover a header for its meaning); `runs --summary --json` keeps machine names and
budget fractions.</p>
{_paired_section(deltas)}
<h2>Score vs energy per token</h2><p class='note'>One point per configuration; energy per token of its placement
from hetmoe_core/energy.py (hardware figures and their sources: hetmoe_core/hardware.py); dashed: Pareto front.</p>
{''.join(eparts) or '<p>no headline metric to plot</p>'}{enote}
<h2>Scores</h2>{_table(table, cols)}
<h2>Placements</h2>{ptable or '<p>none stored</p>'}
{_draw_script(embedded)}
</body></html>"""
    with atomic_write(out) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    return {"path": str(out), "results": len(summary), "figures": len(figs), "recovery_figures": len(rec_figs),
            "paired": len(deltas), "energy_figures": len(efigs),
            "placements": len(placements)}
