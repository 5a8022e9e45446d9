"""Plotly figures of the dashboard (pure functions: arrays / frames in, ``go.Figure`` out); the Learn page's toy is
``hetmoe_core.toy``.

Heatmaps are MoE layer (rows, labelled by decoder layer) × routed expert (columns); layers with fewer experts are
padded with NaN (blank cells). Hover always names the layer, the expert and the values.
"""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from .strategies import criterion_labels

STRATEGY_LABELS = criterion_labels()   # the strategy registry's labels + the per-projection criteria

KIND_LABELS = {"routed_experts": "routed experts", "shared_experts": "shared experts", "router": "routers",
               "attention": "attention", "dense_mlp": "dense MLP", "lm_head": "LM head", "embeddings": "embeddings",
               "norms": "norms", "other": "other"}
_LAYOUT = dict(margin=dict(l=10, r=10, t=40, b=10))   # no template: Streamlit themes charts (and templates cost ~15 ms)

# One colour per strategy, the same on every chart (dashboard, report, energy plot); presets differ by dash and
# marker. Colours from Vega's Tableau-10 palette; MaxNNScore (the paper's criterion) in red.
STRATEGY_COLORS = {"maxnn": "#e45756", "frequency": "#4c78a8", "weight": "#72b7b2", "router_norm": "#f58518",
                   "random": "#9d755d", "oracle": "#54a24b", "local_error": "#b279a2", "ideal": "#222222"}
_EXTRA_COLORS = ("#eeca3b", "#ff9da6", "#bab0ac", "#17becf", "#bcbd22", "#8c564b")
PRESET_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
PRESET_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "star")
NOT_RESOLVED = "noise loss inside the noise: recovered fraction not shown"   # paired.INSIDE_NOISE + what we do


def strategy_color(strategy: str) -> str:
    """The strategy's colour (STRATEGY_COLORS); a strategy outside the registry gets a stable extra colour."""
    if strategy in STRATEGY_COLORS:
        return STRATEGY_COLORS[strategy]
    return _EXTRA_COLORS[sum(map(ord, str(strategy))) % len(_EXTRA_COLORS)]


def preset_index(preset) -> int:
    """Stable style index of a noise preset: its place in noise.PRESETS (so a preset keeps its dash and marker on
    every chart), a name outside the registry a fixed index from its characters."""
    from .noise import PRESETS
    names = [p for p in PRESETS if p != "ideal"]
    return names.index(preset) if preset in names else sum(map(ord, str(preset)))


def line_style(strategy: str, preset, variant: int = 0) -> dict:
    """Scatter kwargs of one (strategy, preset) line: colour = strategy, dash and marker = the preset
    (preset_index; ``variant`` shifts them for another config of the same preset, e.g. other ADC bits)."""
    i = (preset_index(preset) + variant) % len(PRESET_DASHES)
    c = strategy_color(strategy)
    return dict(line=dict(color=c, dash=PRESET_DASHES[i], width=2),
                marker=dict(color=c, symbol=PRESET_SYMBOLS[i], size=7))


LEGEND_SHARED_CHARS = 36
"""Longest legend name that shares a row with another: half of a chart at 820 px (a ~470 px plot) less the
entry's symbol, at ~5.3 px per character of the 11 px legend font. An edited preset's name ("MaxNNScore ·
paper-pcm-c1.5 (adc_bits=6, t_inference=3600)") is longer and ran into its neighbour."""


def legend_below(n_entries: int, plot_height: int = 300, per_row: int = 2, names=()) -> dict:
    """Layout kwargs of a chart whose legend sits in rows below the plot and never covers it: the figure grows by
    one row per ``per_row`` entries instead of squeezing the plot (``plot_height`` px of plotting area stays).
    Each entry is given 1 / ``per_row`` of the width (Plotly's ``entrywidthmode="fraction"``), so the rows drawn are
    the rows counted at any width (left to Plotly, a narrow figure put one entry per row and cut the tail off).
    ``names``: the entries' names; one longer than LEGEND_SHARED_CHARS gets a row to itself (per_row 1)."""
    if any(len(str(n)) > LEGEND_SHARED_CHARS for n in names):
        per_row = 1
    rows = -(-n_entries // per_row)
    bottom = 62 + 21 * rows                     # x-axis ticks and title, then the legend rows
    height = plot_height + 64 + bottom
    return dict(height=height, margin=dict(l=10, r=10, t=64, b=bottom),   # legend's top just under the x title
                legend=dict(orientation="h", yref="container", y=(bottom - 58) / height, yanchor="top", x=0,
                            xanchor="left", entrywidth=1 / per_row, entrywidthmode="fraction", font=dict(size=11)),
                xaxis=dict(automargin=True), yaxis=dict(automargin=True))


def si(x: float, digits: int = 3) -> str:
    """A number for a table cell, ``digits`` significant digits, large ones with an SI prefix: 4602219.19 ->
    '4.60 M', 53.7 -> '53.7', 0.605 -> '0.605', 2.2e-05 -> '2.2e-05' (the column header holds the unit, so a
    prefix never stacks on it below 1); '—' for None/NaN."""
    import math
    if x is None or x != x:
        return "—"
    x = float(f"{x:.{digits}g}")   # rounded first, so 999960 reads 1.00 M, not 1000 k
    if x == 0 or math.isinf(x):
        return f"{x:g}"
    if abs(x) < 1e-3:
        return f"{x:.{digits - 1}g}"
    e = max(0, min(4, math.floor(math.log10(abs(x)) / 3)))
    v = x / 1000.0 ** e
    return f"{v:.{max(0, digits - 1 - math.floor(math.log10(abs(v))))}f}" + ("", " k", " M", " G", " T")[e]


def _grid(values) -> np.ndarray:
    """list of per-layer [E_l] arrays -> float [L, max E] padded with NaN."""
    E = max(len(v) for v in values)
    out = np.full((len(values), E), np.nan)
    for i, v in enumerate(values):
        out[i, :len(v)] = np.asarray(v, dtype=float)
    return out


def kind_label(kind: str, tied_lm_head: bool = False) -> str:
    """Display name of a module kind; with a tied LM head the embedding table is also the LM head's matrix."""
    if kind == "embeddings" and tied_lm_head:
        return "embeddings = tied LM head"
    return KIND_LABELS.get(kind, kind)


def _bar_label(label: str) -> str:
    """A bar chart's category label on at most ~15 characters a line (Plotly breaks tick labels only at <br>):
    "embeddings = tied LM head" -> "embeddings =<br>tied LM head", so a chart in a narrow column keeps it whole."""
    words, lines = label.split(" "), [""]
    for w in words:
        lines[-1:] = [f"{lines[-1]} {w}".strip()] if len(lines[-1]) + len(w) < 15 or not lines[-1] \
            else [lines[-1], w]
    return "<br>".join(lines)


def param_breakdown(param_counts: dict, tied_lm_head: bool = False) -> go.Figure:
    """Horizontal bar chart of parameters per module kind (count and share of the total)."""
    items = sorted(((k, int(v)) for k, v in param_counts.items() if v), key=lambda kv: kv[1])
    total = sum(v for _, v in items) or 1
    labels = [_bar_label(kind_label(k, tied_lm_head)) for k, _ in items]
    vals = [v for _, v in items]
    fig = go.Figure(go.Bar(x=vals, y=labels, orientation="h", text=[f"{v / total:.1%}" for v in vals],
                           textposition="auto", hovertemplate="%{y}: %{x:,} parameters<extra></extra>",
                           marker_color="#4c78a8"))
    fig.update_layout(title=f"Parameters by module kind ({total:,} in all)", xaxis_title="parameters",
                      height=60 + 34 * len(items), yaxis=dict(automargin=True), **_LAYOUT)
    return fig


def expert_heatmap(values, layers, title: str, value_name: str, digital=None, extra: dict | None = None,
                   colorscale: str = "Viridis", log: bool = False, compact: bool = False) -> go.Figure:
    """Layer × expert heatmap of one per-expert quantity.

    values: per MoE layer [E] arrays; layers: decoder index of each MoE layer (row labels); digital: per layer
    tuples of digital expert ids (marked with a square outline) or None; extra: {name: per-layer [E] arrays} shown
    in the hover; log: colour by log10 of the value (hover keeps the raw value); compact: a small panel (one of
    several side by side: lower, automatic expert ticks).
    Built as one dict (a few ms; it is redrawn on every budget-slider move).
    """
    z = _grid(values)
    rows = [f"L{l}" for l in layers]
    names = [value_name] + list(extra or {})
    custom = np.stack([z] + [_grid(v) for v in (extra or {}).values()], axis=-1)
    hover = "layer %{y}, expert %{x}<br>" + "<br>".join(
        f"{n}: %{{customdata[{i}]:.4g}}" for i, n in enumerate(names)) + "<extra></extra>"
    with np.errstate(divide="ignore", invalid="ignore"):
        zc = np.log10(np.where(z > 0, z, np.nan)) if log else z
    data = [dict(type="heatmap", z=zc, x=list(range(z.shape[1])), y=rows, customdata=custom, hovertemplate=hover,
                 # the colour bar's title runs up its right side: written across the top, "log10 only-this damage
                 # (nats)" took ~190 px from the experts, whose 16 tick labels then turned and ran together
                 colorscale=colorscale, colorbar=dict(title=dict(text=("log10 " if log else "") + value_name,
                                                                 side="right"), thickness=14),
                 xgap=1, ygap=1)]
    ticks = 1 if z.shape[1] <= (8 if compact else 32) else None
    layout = dict(title=dict(text=title), height=max(220, 90 + (30 if compact else 36) * len(rows)), **_LAYOUT,
                  xaxis=dict(title=dict(text="routed expert"), dtick=ticks, range=[-0.5, z.shape[1] - 0.5]),
                  yaxis=dict(title=dict(text="MoE layer"), autorange="reversed", type="category"))
    if digital is not None:
        data.append(_outlines(digital))
        layout["yaxis2"] = dict(overlaying="y", range=[len(rows) - 0.5, -0.5], visible=False, fixedrange=True)
        layout["legend"] = dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom")
    return go.Figure(dict(data=data, layout=layout))


def _outlines(digital, inset: float = 0.12) -> dict:
    """One line trace drawing a square around every digital cell (row = MoE layer index, column = expert).

    One SVG path for all of them: a marker per expert (up to every routed expert at a 100 % budget) costs the
    browser one element each, redrawn on every budget-slider move. Drawn on a hidden numeric y axis (``y2``)
    laid over the heatmap's category rows (row i at position i)."""
    sq = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [-1, -1], [np.nan, np.nan]]) * [0.5 - inset, 0.5 - inset]
    cells = np.array([(e, i) for i, d in enumerate(digital) for e in d], dtype=float).reshape(-1, 2)
    pts = (cells[:, None, :] + sq[None]).reshape(-1, 2)
    return dict(type="scatter", x=pts[:, 0], y=pts[:, 1], yaxis="y2", mode="lines", name="digital",
                hoverinfo="skip", connectgaps=False, line=dict(color="#e45756", width=3, simplify=False))


def layer_colors(n: int) -> list[str]:
    """n distinct colours, one per MoE layer: Plotly's 24-colour qualitative palette, or evenly spaced samples of
    the Turbo scale beyond 24 layers (the default 10-colour cycle repeats from the 11th layer on)."""
    from plotly.colors import qualitative, sample_colorscale
    if n <= len(qualitative.Dark24):
        return list(qualitative.Dark24[:n])
    return sample_colorscale("Turbo", [i / (n - 1) for i in range(n)])


LOG_AXIS = dict(type="log", tickformat="~g", exponentformat="none")
"""A log axis whose every tick label is a full number ("0.4 0.5 … 1 2"), not Plotly's bare minor digits."""


def score_scatter(x_values, y_values, layers, x_name: str, y_name: str, log_x: bool = True) -> go.Figure:
    """Scatter of one per-expert quantity against another, one trace (and colour) per MoE layer, one point per
    expert in expert order (``scatter_pick`` reads a clicked point back); hover names layer and expert."""
    fig = go.Figure()
    colors = layer_colors(len(x_values))
    for i, (xv, yv) in enumerate(zip(x_values, y_values)):
        e = np.arange(len(xv))
        fig.add_trace(go.Scatter(
            x=np.asarray(xv, float), y=np.asarray(yv, float), mode="markers", name=f"L{layers[i]}",
            customdata=np.stack([np.full(len(e), layers[i]), e], axis=-1).tolist(),
            hovertemplate=(f"layer %{{customdata[0]}}, expert %{{customdata[1]}}<br>{x_name}: %{{x:.4g}}"
                           f"<br>{y_name}: %{{y:.4g}}<extra></extra>"),
            marker=dict(size=8, opacity=0.8, color=colors[i])))
    fig.update_layout(title=f"{y_name} vs {x_name}", xaxis_title=x_name, yaxis_title=y_name, height=380, **_LAYOUT)
    if log_x:
        fig.update_xaxes(**LOG_AXIS)
    return fig


def scatter_pick(event) -> tuple[int, int] | None:
    """(MoE layer index, expert id) of the first point selected on a ``score_scatter`` chart, or None.

    event: st.plotly_chart's selection state. Read from the point's trace (``curve_number``: one trace per MoE
    layer) and position (``point_index``: experts in order) rather than its customdata, which the browser may send
    as a typed-array object instead of a list."""
    points = ((event or {}).get("selection") or {}).get("points") or []
    for pt in points:
        c, i = pt.get("curve_number"), pt.get("point_index", pt.get("point_number"))
        if isinstance(c, int) and isinstance(i, int):
            return c, i
    return None


def neuron_histogram(neuron_norms: dict, layer: int, expert: int) -> go.Figure:
    """Histogram of one expert's neuron norms per projection (neuron_norms: projection -> [I] array)."""
    fig = go.Figure()
    for p, v in neuron_norms.items():
        v = np.asarray(v, float)
        fig.add_trace(go.Histogram(x=v, name=f"{p} (max {v.max():.3g})", opacity=0.6, nbinsx=40,
                                   hovertemplate=f"{p}: norm %{{x}}<br>%{{y}} neurons<extra></extra>"))
    fig.update_layout(barmode="overlay", title=f"Neuron L2 norms of expert {expert}, layer {layer}",
                      xaxis_title="L2 norm of the neuron's weight vector", yaxis_title="neurons", height=340,
                      **_LAYOUT)
    return fig


def share_bars(by_kind: dict, tied_lm_head: bool = False) -> go.Figure:
    """Stacked bars of digital / analog / memory parameters per module kind (placement.digital_share's by_kind)."""
    kinds = [k for k, v in by_kind.items() if v["params"]]
    labels = [_bar_label(kind_label(k, tied_lm_head)) for k in kinds]
    data = [dict(type="bar", y=labels, x=[by_kind[k][part] for k in kinds], name=part, orientation="h",
                 marker=dict(color=color), hovertemplate="%{y}: %{x:,} " + part + " parameters<extra></extra>")
            for part, color in (("digital", "#e45756"), ("analog", "#4c78a8"), ("memory", "#bab0ac"))]
    # the legend in one row under the axis title: at the plot's right it took a third of a narrow column from the
    # labels (cut to "beddings = tied LM head"), above the plot it ran into the title
    layout = dict(barmode="stack", title=dict(text="Where each module kind runs"),
                  xaxis=dict(title=dict(text="parameters")), yaxis=dict(automargin=True),
                  height=120 + 30 * len(kinds), **_LAYOUT,
                  legend=dict(orientation="h", yref="container", y=0, yanchor="bottom", x=0, xanchor="left",
                              font=dict(size=11)))
    layout["margin"] = dict(_LAYOUT["margin"], b=80)
    return go.Figure(dict(data=data, layout=layout))


AXIS_PAD = 0.08
"""Share of a metric chart's data span left free above and below it (metric_axis): ~24 px of a 300 px plot,
room for the outermost error-bar caps."""


def metric_axis(values, metric: str | None = None) -> dict:
    """y-axis settings (``fig.update_yaxes(**...)``) of a metric chart holding ``values`` (means, mean ± std, the
    reference lines): ticks with 4 significant digits, more when the values span little of their size (a perplexity
    axis from 3.0451e9 to 3.0453e9 read "3.045e+9" on every tick; Plotly's own format printed a float's binary
    expansion, "0.2000000000000000111", when every value was equal), and when the values span (almost) nothing —
    equal results, or a panel whose only point is the ideal reference line, which Plotly drew on -1…4 — a range
    of ± 5 % of the value (at least ± 0.05) around them. With ``metric`` (an lm-eval metric name, "[filter]"
    suffix allowed), that range stays within the metric's valid range (store_schema.METRIC_RANGES) plus 2 % of
    its width: an accuracy axis never runs to -0.5. Values that do span something get AXIS_PAD of the span free
    on each side (not clamped: a mean - std below 0 is drawn to its end): Plotly's autorange leaves a fixed 15 px,
    so the outermost error-bar cap sat on the bottom gridline, where it read as cut off by the axis."""
    from .store_schema import METRIC_RANGES
    v = np.asarray([x for x in np.ravel(np.asarray(values, dtype=float)) if np.isfinite(x)])
    axis = dict(tickformat=".4~g")
    if len(v) == 0:
        return axis
    lo, hi = float(v.min()), float(v.max())
    if hi - lo > 1e-9 * max(1.0, abs(hi)):      # never clamped: an error bar's end is drawn where it falls
        axis["range"] = [lo - AXIS_PAD * (hi - lo), hi + AXIS_PAD * (hi - lo)]
        step = (hi - lo) / 6                    # about Plotly's tick spacing
        digits = int(np.ceil(np.log10(max(abs(lo), abs(hi)) / step))) + 1 if max(abs(lo), abs(hi)) > 0 else 4
        axis["tickformat"] = f".{min(12, max(4, digits))}~g"   # neighbouring ticks never print alike
        return axis
    pad = max(0.05 * abs(hi), 0.05)
    r0, r1 = lo - pad, hi + pad
    vlo, vhi = METRIC_RANGES.get(str(metric or "").split("[", 1)[0], (-np.inf, np.inf))
    if np.isfinite(vlo) and np.isfinite(vhi):
        margin = 0.02 * (vhi - vlo)
        r0, r1 = max(r0, vlo - margin), min(r1, vhi + margin)
    axis["range"] = [r0, r1]
    return axis


def metric_vs_budget(frame, metric: str, ideal: float | None = None, all_analog: dict | None = None,
                     higher_is_better: bool = True, per_row: int = 2) -> go.Figure:
    """Metric against digital budget, one line per (strategy, preset) with mean ± std (over seeds) error bars.

    frame: store.Store.summary_frame rows of one task and metric (columns strategy, preset, budget, mean, std,
    n_seeds); ideal: the all-digital noise-free result (dashed line); all_analog: {preset: value} of the results
    with every routed expert analog (budget 0; dotted lines). Reference lines are named in the legend, which sits
    below the plot in rows of ``per_row`` entries (legend_below). Colour = strategy, dash and marker = preset.
    """
    fig = go.Figure()
    for (s, p), g in frame.groupby(["strategy", "preset"], sort=True):
        g = g.sort_values("budget")
        std = g["std"].astype(float).fillna(0).to_numpy()
        fig.add_trace(go.Scatter(
            x=g["budget"] * 100, y=g["mean"], mode="lines+markers", name=f"{STRATEGY_LABELS.get(s, s)} · {p}",
            error_y=dict(type="data", array=std, visible=True, color=strategy_color(s), thickness=1),
            **line_style(s, p),
            customdata=np.stack([std, g["n_seeds"].to_numpy()], axis=-1),
            hovertemplate=("budget %{x:.1f}%<br>" + metric + ": %{y:.4g} ± %{customdata[0]:.2g}"
                           "<br>%{customdata[1]} seed(s)<extra></extra>")))
    refs = [("ideal (all digital, no noise)", ideal, "dash")]
    refs += [(f"all routed experts analog · {p}", y, "dot") for p, y in (all_analog or {}).items()]
    for name, y, dash in refs:      # legend entries, not annotations: labels of close lines would overlap
        if y is not None and np.isfinite(y):
            fig.add_trace(go.Scatter(x=[-3, 103], y=[y, y], mode="lines", name=f"{name}: {y:.4g}",
                                     line=dict(dash=dash, color="#555", width=1.5),
                                     hovertemplate=f"{name}: {y:.4g}<extra></extra>"))
    fig.update_layout(title=f"{metric} vs digital budget" + ("" if higher_is_better else " (lower is better)"),
                      **legend_below(len(fig.data), per_row=per_row, names=[t.name for t in fig.data]))
    fig.update_xaxes(range=[-3, 103], title_text="digital budget (% of routed experts)")
    m, sd = frame["mean"].astype(float), frame["std"].astype(float).fillna(0)
    fig.update_yaxes(title_text=metric, **metric_axis([*(m - sd), *(m + sd), *(y for _, y, _ in refs
                                                                               if y is not None)], metric))
    return fig


# ------------------------------------------------------------------------------------------- paired recovery
NOTE_WIDTH = 52
"""Characters per line of a chart's note (recovery_vs_budget): ~340 px at 12 px, inside the plot of the report's
and the dashboard's narrowest chart (520 px), so a note never runs under the y-axis title or off the right edge."""


def _hidden_note(hidden) -> str:
    """The note of recovery_vs_budget for its rows without a fraction: per preset, why (recovered_note; for a
    deterministic preset, that its seeds are copies of one computation judged by lm-eval's stderr), wrapped at
    NOTE_WIDTH characters with <br>; the reason and "recovered fraction not shown" are never split (they are
    what a reader, and a search of the page, looks for)."""
    import textwrap
    keep = "recovered fraction not shown"
    lines = []
    for p, g in hidden.groupby("preset", sort=True):
        why = (g["recovered_note"].iloc[0] if "recovered_note" in g else "") or "no noise loss measured"
        head = why.split(" (")[0]
        text = f"{p} — {why.replace(head, head.replace(' ', chr(160)), 1)}: {keep.replace(' ', chr(160))}"
        if "n_computations" in g and (g["n_computations"] < g["n_seeds"]).all():
            text += (f" (deterministic preset: its {int(g['n_seeds'].max())} seeds share one computation, judged "
                     "by lm-eval's stderr, not by an interval over copies)")
        lines += [x.replace(chr(160), " ") for x in textwrap.wrap(text, NOTE_WIDTH, subsequent_indent="  ",
                                                                   break_long_words=False)]
    return "<br>".join(lines)


def recovery_vs_budget(frame, title: str = "Recovered fraction of the noise loss", per_row: int = 2) -> go.Figure:
    """Recovered fraction (A - X) / (A - I) against digital budget, one line per (strategy, preset).

    frame: paired.recovery_table (or combined_recovery) rows of one task/metric: strategy, preset, budget,
    recovered, recovered_lo, recovered_hi, n_seeds, optionally sampling_se_recovered and recovered_note. Error bars
    = 95% t interval over seeds (seed spread of the noise); the hover adds the task's sampling error in the same
    units. 0 = as bad as all routed experts analog, 1 = as good as all digital (dotted reference lines). Rows
    without a fraction (NaN: the noise loss is not resolved, paired.recovery_table's recovered_note) are not
    drawn; when no row has one the chart says so in words (NOT_RESOLVED) instead of plotting noise.
    """
    fig = go.Figure()
    shown = frame[frame["recovered"].astype(float).notna()] if len(frame) else frame
    for (s, p), g in shown.groupby(["strategy", "preset"], sort=True):
        g = g.sort_values("budget")
        m = g["recovered"].astype(float).to_numpy()
        up = np.nan_to_num(g["recovered_hi"].astype(float).to_numpy() - m)
        down = np.nan_to_num(m - g["recovered_lo"].astype(float).to_numpy())
        samp = (g["sampling_se_recovered"].astype(float).to_numpy() if "sampling_se_recovered" in g
                else np.full(len(g), np.nan))
        fig.add_trace(go.Scatter(
            x=g["budget"] * 100, y=m, mode="lines+markers", name=f"{STRATEGY_LABELS.get(s, s)} · {p}",
            error_y=dict(type="data", symmetric=False, array=up, arrayminus=down, visible=True,
                         color=strategy_color(s), thickness=1),
            **line_style(s, p),
            customdata=np.stack([g["recovered_lo"].astype(float), g["recovered_hi"].astype(float),
                                 g.get("n_computations", g["n_seeds"]).to_numpy(), samp], axis=-1),
            hovertemplate=("budget %{x:.1f}%<br>recovered %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}] "
                           "(95% CI over %{customdata[2]} distinct computations)<br>sampling error (lm-eval): "
                           "±%{customdata[3]:.3f}"
                           "<extra></extra>")))
    # labels on opposite sides of their lines, so they never collide however far the y axis stretches
    fig.add_hline(y=1, line_dash="dot", line_color="#555", annotation_text="ideal (all digital)",
                  annotation_position="top right")
    fig.add_hline(y=0, line_dash="dot", line_color="#555", annotation_text="all routed experts analog",
                  annotation_position="bottom left")
    hidden = frame[frame["recovered"].astype(float).isna()] if len(frame) else frame
    if len(hidden):      # say which presets have no fraction and why (paired.noise_loss), never plot noise
        fig.add_annotation(text=_hidden_note(hidden), showarrow=False, xref="paper", yref="paper", align="left",
                           bgcolor="rgba(255,255,255,0.85)", font=dict(size=12, color="#555"),
                           **(dict(x=0.5, y=0.5, xanchor="center", yanchor="middle") if not len(shown) else
                              dict(x=0.98, y=0.03, xanchor="right", yanchor="bottom")))
        if not len(shown):
            fig.update_yaxes(range=[-0.25, 1.25])
    fig.update_layout(title=title, **legend_below(len(fig.data), per_row=per_row))
    fig.update_xaxes(range=[-3, 103], title_text="digital budget (% of routed experts)")
    fig.update_yaxes(title_text="recovered fraction (A−X)/(A−I)")
    return fig


# ------------------------------------------------------------------------------------------- measured sensitivity
def _per_layer(experts: list[dict], field: str) -> list[list[float]]:
    """Validation 'experts' rows -> per-layer lists ordered by expert id (layers in order of first appearance)."""
    layers: dict = {}
    for r in experts:
        layers.setdefault(r["layer"], {})[r["expert"]] = np.nan if r.get(field) is None else r[field]
    return [[d[e] for e in sorted(d)] for d in layers.values()]


def _decoder_layers(experts: list[dict]) -> list:
    """Decoder-layer label of each MoE layer of Validation 'experts' rows (the MoE index if not given)."""
    return list(dict.fromkeys(r.get("decoder_layer", r["layer"]) for r in experts))


def damage_heatmap(validation: dict, field: str = "only_this") -> go.Figure:
    """Measured damage per expert (Validation.to_dict()): increase of mean token NLL in nats when only this expert
    runs analog ('only_this'), or NLL recovered when only it is digital ('all_but_this'); log colour, hover with
    the standard error over seeds."""
    ex = validation["experts"]
    layers = _decoder_layers(ex)
    name = "only-this damage (nats)" if field == "only_this" else "all-but-this recovery (nats)"
    values = _per_layer(ex, field)
    n_white = int(sum((np.asarray(v, float) <= 0).sum() for v in values))
    # one short subtitle line (Plotly never wraps a title): fits the full-width chart at 820 px (~470 px)
    note = (f"<br><sup>white: {n_white} expert(s) ≤ 0, no measurable damage (log colour; hover for the value)"
            "</sup>") if n_white else ""
    fig = expert_heatmap(values, layers, f"Measured {name} · {validation['preset']}{note}", name,
                         extra={"± se": _per_layer(ex, field + "_se")}, colorscale="Inferno", log=True)
    if n_white:                                  # room for the subtitle line above the plot
        fig.update_layout(margin_t=66, height=fig.layout.height + 26)
    return fig


DAMAGE_DECADES = 4
"""Decades of measured damage the Validate scatter shows below the largest one: an expert whose only-this damage is
under 1e-4 of the worst expert's is negligible beside it, and a tiny model's zero-ish damages (1e-24 nats: float
rounding of a difference of two NLLs) would otherwise stretch the log axis over twenty empty decades."""


def damage_scatter(criterion, damage, damage_se, layers, criterion_name: str, log: bool = True) -> go.Figure:
    """Each expert's criterion score (x) against its measured only-this damage (y, nats, error bar = se over seeds),
    coloured by MoE layer, log axes; hover names layer, expert and both values. Non-positive values cannot sit on a
    log axis: they are left out and counted in the title. So are damages more than DAMAGE_DECADES decades below the
    largest one (the y axis starts there and the title says how many experts lie below it)."""
    fig = go.Figure()
    dropped = below = 0
    ys = np.concatenate([np.asarray(v, float).ravel() for v in damage]) if len(damage) else np.array([])
    top = float(np.nanmax(ys)) if np.isfinite(ys).any() else 0.0
    floor = top * 10.0 ** -DAMAGE_DECADES if log and top > 0 else 0.0
    hi, lo = floor, np.inf
    for i, (xv, yv, sv) in enumerate(zip(criterion, damage, damage_se)):
        xv, yv, sv = (np.asarray(v, float) for v in (xv, yv, sv))
        e = np.arange(len(xv))
        ok = (xv > 0) & (yv > 0) if log else np.isfinite(xv) & np.isfinite(yv)
        dropped += int((~ok).sum())
        if log:
            low = ok & (yv < floor)
            below += int(low.sum())
            ok &= ~low
            if ok.any():
                hi = max(hi, float(np.nanmax(yv[ok] + np.nan_to_num(sv[ok]))))
                lo = min(lo, float(np.nanmin(yv[ok])))
        fig.add_trace(go.Scatter(
            x=xv[ok], y=yv[ok], mode="markers", name=f"L{layers[i]}", error_y=dict(type="data", array=sv[ok]),
            customdata=np.stack([np.full(ok.sum(), layers[i]), e[ok], sv[ok]], axis=-1),
            hovertemplate=(f"layer %{{customdata[0]}}, expert %{{customdata[1]}}<br>{criterion_name}: %{{x:.4g}}"
                           "<br>only-this damage: %{y:.4g} ± %{customdata[2]:.2g} nats<extra></extra>"),
            marker=dict(size=8, opacity=0.8)))
    notes = ([f"{dropped} expert{'' if dropped == 1 else 's'} ≤ 0 not on log axes"] if dropped else []) + \
        ([f"{below} below {floor:.1e} nats (10^-{DAMAGE_DECADES} of the largest) not shown"] if below else [])
    note = f"<br><sup>{'; '.join(notes)}</sup>" if notes else ""
    fig.update_layout(title=f"Measured damage vs {criterion_name}{note}", xaxis_title=criterion_name,
                      yaxis_title="only-this damage (nats)", height=380, **_LAYOUT)
    if notes:
        fig.update_layout(margin_t=64)
    if log:
        fig.update_xaxes(**LOG_AXIS)
        fig.update_yaxes(**LOG_AXIS)
        if floor > 0:      # from the lowest point shown: error bars reaching towards 0 (a damage inside its
            # standard error) would stretch Plotly's autorange down to 1e-24
            fig.update_yaxes(range=[np.log10(min(lo, top)) - 0.3, np.log10(max(hi, top)) + 0.15])
    return fig


def correlation_forest(correlations: list[dict], scope: str = "pooled") -> go.Figure:
    """Spearman and Kendall rank correlation of each criterion with measured damage, with 95% bootstrap intervals
    (Validation.to_dict()['correlations'] rows of one scope); a dotted line at 0 (no relation)."""
    rows = [r for r in correlations if str(r["scope"]) == scope]
    names = [STRATEGY_LABELS.get(r["criterion"], r["criterion"]) for r in rows]
    fig = go.Figure()
    for stat, color, dy in (("spearman", "#4c78a8", -0.15), ("kendall", "#f58518", 0.15)):
        v = np.array([r[stat] for r in rows], float)
        lo = np.array([r[f"{stat}_lo"] for r in rows], float)
        hi = np.array([r[f"{stat}_hi"] for r in rows], float)
        fig.add_trace(go.Scatter(
            x=v, y=np.arange(len(rows)) + dy, mode="markers", name=stat.capitalize(), marker=dict(color=color, size=9),
            error_x=dict(type="data", symmetric=False, array=np.nan_to_num(hi - v), arrayminus=np.nan_to_num(v - lo)),
            customdata=np.stack([lo, hi], axis=-1), text=names,
            hovertemplate=f"%{{text}}<br>{stat} %{{x:.3f}} [%{{customdata[0]:.3f}}, %{{customdata[1]:.3f}}]"
                          "<extra></extra>"))
    fig.add_vline(x=0, line_dash="dot", line_color="#555")
    fig.update_layout(title=f"Rank correlation with measured damage ({scope}), 95% CI", height=120 + 40 * len(rows),
                      xaxis=dict(title=dict(text="rank correlation"), range=[-1.05, 1.05]),
                      yaxis=dict(tickvals=list(range(len(rows))), ticktext=names, autorange="reversed"), **_LAYOUT)
    return fig


def dense_vs_experts(validation: dict) -> go.Figure:
    """Damage (nats, ± se over seeds) when one part alone runs analog: each dense module kind, each whole MoE
    layer's routed experts, and all routed experts together."""
    se = lambda d: np.nan if d.get("se") is None else d["se"]   # one seed: no standard error
    items = [(KIND_LABELS.get(d["kind"], d["kind"]), d["damage"], se(d), "#e45756") for d in validation["dense"]]
    items += [(f"MoE layer L{d.get('decoder_layer', d['layer'])} (all its experts)", d["damage"], se(d), "#4c78a8")
              for d in validation["layers"]]
    a = validation["all_experts"]
    items.append(("all routed experts", a["damage"], se(a), "#54a24b"))
    fig = go.Figure(go.Bar(
        y=[i[0] for i in items], x=[i[1] for i in items], orientation="h", marker_color=[i[3] for i in items],
        error_x=dict(type="data", array=[i[2] for i in items]), customdata=[i[2] for i in items],
        hovertemplate="%{y}: +%{x:.4g} ± %{customdata:.2g} nats<extra></extra>"))
    fig.update_layout(title=f"Damage of each part alone on AIMC · {validation['preset']}",
                      xaxis_title="increase of mean token NLL (nats)", height=100 + 28 * len(items), **_LAYOUT)
    return fig


def percent_ticks(top: float, n: int = 5) -> dict:
    """Axis kwargs for a 0…``top`` fraction axis drawn in percent: ~``n`` ticks on a 1-2-5 step, with as many
    decimals as the step needs, so no two ticks read the same (".0%" wrote 0.2 % steps "0% 0% 0% 1% 1% 1%")."""
    raw = max(top, 1e-12) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    decimals = max(0, -math.floor(math.log10(step * 100) + 1e-9))
    return dict(range=[0, top], tick0=0, dtick=step, tickformat=f".{decimals}%")


def _drift_top(rows: list[dict]) -> float:
    """Top of the routing-drift share axis: 15 % above the tallest bar (with its standard error), at least 1 %."""
    tall = [r["changed_share"] + (r.get("changed_share_se") or 0.0) for r in rows
            if r.get("changed_share") is not None and np.isfinite(r["changed_share"])]
    return max([0.01] + [1.15 * t for t in tall])


def routing_drift(validation: dict) -> go.Figure:
    """Per MoE layer: share of tokens whose top-k expert set changes under noise, and max/mean expert load before
    and after (Validation.to_dict()['routing_drift'])."""
    rows = validation.get("routing_drift") or []
    x = [f"L{r['layer']}" for r in rows]
    fig = go.Figure([
        go.Bar(x=x, y=[r["changed_share"] for r in rows], name="tokens whose top-k set changed",
               hovertemplate="%{x}: %{y:.1%} of tokens<extra></extra>"),
        go.Scatter(x=x, y=[r["load_max_over_mean_ideal"] for r in rows], name="max/mean load, ideal", yaxis="y2",
                   mode="markers+lines"),
        go.Scatter(x=x, y=[r["load_max_over_mean_noisy"] for r in rows], name="max/mean load, noisy", yaxis="y2",
                   mode="markers+lines")])
    # The right axis gets ticks of its own: Streamlit's theme syncs it to the left grid ("sync" ticks read
    # 1.937, 2.217, ...). It starts at 1, a perfectly balanced load (max = mean), the least the ratio can be.
    top = max([1.0] + [r[k] for r in rows for k in ("load_max_over_mean_ideal", "load_max_over_mean_noisy")])
    fig.update_layout(title="Routing drift under noise", height=340,
                      # an explicit range with room above the tallest bar: autorange drew it up to the frame's
                      # edge, where it read as cut off
                      yaxis=dict(title=dict(text="tokens with a changed top-k set (%)"),
                                 **percent_ticks(_drift_top(rows))),
                      yaxis2=dict(title=dict(text="max/mean expert load (×, 1 = balanced)"), overlaying="y",
                                  side="right", tickmode="auto", nticks=6, tickformat=".2~f", showgrid=False,
                                  range=[1, 1 + (top - 1) * 1.1 if top > 1 else 2]),
                      xaxis=dict(title=dict(text="MoE layer")), legend=dict(orientation="h", y=-0.3), **_LAYOUT)
    return fig


# ------------------------------------------------------------------------------------------- energy (energy.py)
def accuracy_vs_energy(points, metric: str, higher_is_better: bool = True, title: str | None = None) -> go.Figure:
    """Metric against energy per token, one point per configuration (``energy.config_points`` rows: strategy,
    budget, preset, mean, std, n_seeds, energy_per_token_j), colour = strategy and marker = preset as on every chart
    (line_style), error bars = std over seeds;
    the Pareto front (``energy.pareto_front``: no other configuration is cheaper and at least as good) drawn as a
    line. Hover names strategy, budget, preset and both values. x is logarithmic (J per token)."""
    from .energy import pareto_front
    fig = go.Figure()
    for (strategy, preset), g in points.groupby(["strategy", "preset"], sort=True):
        std = g["std"].astype(float).fillna(0).to_numpy()
        label = STRATEGY_LABELS.get(strategy, strategy)
        style = line_style(strategy, preset)["marker"]
        fig.add_trace(go.Scatter(
            x=g.energy_per_token_j, y=g["mean"], mode="markers", marker=dict(style, size=10),
            name=label if strategy == "ideal" else f"{label} · {preset}",
            error_y=dict(type="data", array=std, visible=True, color=style["color"], thickness=1),
            customdata=np.stack([[label] * len(g), (g.budget * 100).round(2), [str(preset)] * len(g), std,
                                 g.n_seeds.astype(int)], axis=-1),
            hovertemplate=("%{customdata[0]} · budget %{customdata[1]}% · %{customdata[2]}<br>"
                           "%{x:.3g} J/token<br>" + metric + " %{y:.4g} ± %{customdata[3]:.2g} "
                           "(%{customdata[4]} seeds)<extra></extra>")))
    if len(points):
        front = points.iloc[pareto_front(points.energy_per_token_j, points["mean"], higher_is_better)]
        fig.add_trace(go.Scatter(x=front.energy_per_token_j, y=front["mean"], mode="lines", name="Pareto front",
                                 line=dict(dash="dash", color="#555"), hoverinfo="skip"))
    fig.update_layout(title=title or f"{metric} vs energy per token" + ("" if higher_is_better else
                                                                       " (lower is better)"),
                      **legend_below(len(fig.data), names=[t.name for t in fig.data]))
    fig.update_xaxes(type="log", title_text="energy per token (J, log scale)")
    sd = points["std"].astype(float).fillna(0) if len(points) else []
    fig.update_yaxes(title_text=metric, **metric_axis([*(points["mean"] - sd), *(points["mean"] + sd)]
                                                      if len(points) else [], metric))
    return fig


def cost_vs_batch(rows: dict) -> go.Figure:
    """Tokens per joule and tokens per second against batch size, one line per placement.

    rows: {name: [(batch, energy.Cost), ...]}. Two panels sharing the x axis (log2 batch)."""
    from plotly.subplots import make_subplots
    fig = make_subplots(rows=1, cols=2, subplot_titles=("tokens per joule", "tokens per second"))
    colors = ("#e45756", "#4c78a8", "#72b7b2", "#f58518")
    for i, (name, pts) in enumerate(rows.items()):
        b = [x for x, _ in pts]
        for col, key in ((1, "tokens_per_j"), (2, "tokens_per_s")):
            fig.add_trace(go.Scatter(x=b, y=[getattr(c, key) for _, c in pts], mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=col == 1,
                                     line=dict(color=colors[i % len(colors)]),
                                     customdata=[c.digital_bound for _, c in pts],
                                     hovertemplate=f"{name}<br>batch %{{x}}<br>%{{y:.3g}} {key.replace('_', ' ')}"
                                                   "<br>digital part %{customdata}-bound<extra></extra>"),
                          row=1, col=col)
    fig.update_xaxes(type="log", title_text="batch size (tokens per decode step)", dtick=0.30103)
    fig.update_yaxes(type="log")
    fig.update_layout(height=360, legend=dict(orientation="h", y=-0.3), **_LAYOUT)
    return fig
