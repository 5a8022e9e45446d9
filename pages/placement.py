"""Placement page: choose the digital budget, strategy, scope and dense modules; see which experts stay digital.

The settings a budget move does not change (strategy, scope, dense modules, hardware constants) come first and run
with the page; the budget slider and everything it changes are one fragment (ui.fragment), so a slider move reruns
only that view, not app.py, the sidebar or the settings. The limits expander builds its table and figure only while
it is open."""
import pyarrow as pa
import streamlit as st

from hetmoe_core import energy, figures, strategies, ui
from hetmoe_core.placement import DENSE_KINDS, DensePolicy, digital_share, overlap, place
from hetmoe_core.strategies import STRATEGIES as REGISTRY, get_strategy, strategy_scores
from hetmoe_core.validation import measured_caption, stored_strategy_scores

ui.frame()
st.title("Digital placement")
st.caption("The **digital budget** is the share of routed experts that run on digital hardware; the strategy ranks "
           "experts and the top ones get the digital slots. Every other routed expert runs on analog (AIMC) tiles.")
ss = st.session_state
h = ui.require_model()        # loads the model (or stops with the error) before the view's first run
label = strategies.label     # the live registry, the name itself for one it no longer holds


def needs_stats(strategy):
    return get_strategy(strategy).needs == "stats"      # the registry says what each strategy needs


# the measured strategies (oracle, local_error) place from the damage stored for the session's noise preset (the
# Evaluate page's): offered only when that measurement is stored, read from the store, never recomputed here
m_preset = ss.get("preset") or ui.DEFAULTS["preset"]
try:
    m_validation, m_scores = stored_strategy_scores(ss["source"], m_preset, dtype=ss["dtype"], device=ss["device"])
except (ValueError, RuntimeError, OSError):     # an unknown preset or a store another program holds
    m_validation, m_scores = None, {}
STRATEGIES = [n for n, s in REGISTRY.items() if s.needs != "measurement" or n in m_scores]
if ss.get("strategy") not in STRATEGIES:
    if ss.get("strategy") in REGISTRY:      # a measured strategy without its measurement: say so, not silently
        st.warning(ui.unavailable_strategy(ss["strategy"], m_preset))
    ss["strategy"] = "maxnn"

# the settings a slider move does not change: outside the view, drawn once per full run (a change reruns the page)
c1, c2 = st.columns(2)
c1.selectbox("Strategy", STRATEGIES, key="strategy", persist_state="session", format_func=label,
             help="MaxNNScore (paper), Activation frequency / weight (from calibration text), Router norm, Random; "
                  "Oracle and Local output error from the damage measured under a noise preset (Validate page).")
c1.caption(measured_caption(m_preset, m_validation, m_scores))
c2.radio("Scope", ["layer", "global"], key="scope", persist_state="session", horizontal=True,
         help="layer: the budget applies within each MoE layer (paper); global: one ranking over all experts.")
c1, c2 = st.columns(2)
with c1.expander("Dense modules (digital when ticked — the paper keeps all of them digital)"):
    cols = st.columns(3)
    for i, k in enumerate(DENSE_KINDS):
        c = cols[i % 3]
        ss.setdefault(f"dense_{k}", True)
        c.toggle(figures.KIND_LABELS[k], key=f"dense_{k}", persist_state="session",
                 disabled=not h.lm.anatomy.modules.get(k),
                 help=None if h.lm.anatomy.modules.get(k) else "this model has none")
with c2:
    hardware = ui.hardware_editor()


@ui.fragment
def view(hw):
    """The budget slider and everything it changes: a move reruns only this (not app.py, the sidebar, the settings
    above); ``hw`` is the hardware of the last full run."""
    h = ui.require_model()
    a = h.lm.anatomy
    sc = ui.scores(h)
    layers = [m.layer for m in a.moe_layers]
    st.slider("Digital budget (% of routed experts)", 0.0, 100.0, step=0.5, key="budget_pct",
              persist_state="session", format="%.1f%%",
              help="Paper: 12.5% and 25%. Per-layer scope gives every MoE layer round(budget × E) digital experts.")
    ui.sync_query_params()      # the budget in the URL (this run may be the fragment's alone)
    dense = DensePolicy(**{k: bool(ss[f"dense_{k}"]) for k in DENSE_KINDS})

    def placement_of(strategy, stats):
        return place(a, strategy, ui.budget(), scope=ss["scope"], dense=dense, stats=stats, scores=sc,
                     measured=m_scores.get(strategy))

    stats = ui.stats_for(h) if needs_stats(ss["strategy"]) else None   # the comparison below loads its own
    if needs_stats(ss["strategy"]) and stats is None:
        st.warning(f"{label(ss['strategy'])} needs activation statistics; choose another strategy.")
        st.stop()
    p = placement_of(ss["strategy"], stats)
    share = digital_share(p, a)

    # the heatmap is sent first, though drawn below the metrics and the energy block: it is what a move is watched for
    metrics_box, cost_box, energy_row = st.container(), st.container(), st.container()
    shown_strategy = ss["strategy"] if ss["strategy"] != "random" else "maxnn"     # random scores mean nothing
    values = strategy_scores(shown_strategy, num_experts=list(p.num_experts), scores=sc, stats=stats,
                             measured=m_scores.get(shown_strategy))
    vname = label(ss["strategy"]) if ss["strategy"] != "random" else "MaxNNScore"
    under = f" under {m_preset}" if ss["strategy"] in m_scores else ""     # measured: say under which noise
    extra = {"MaxNNScore": sc.get("maxnn")} if vname != "MaxNNScore" else None
    st.plotly_chart(figures.expert_heatmap(list(values), layers, f"{vname}{under} — red squares: digital experts",
                                           vname,
                                           digital=p.digital, extra=extra,
                                           log=ss["strategy"] in ("maxnn", "router_norm", "random")),
                    key="placement_heat")
    m = ui.metric_row(metrics_box, 4)   # wraps at narrow widths instead of cutting the values
    # the parameter share stays below 100 % at a 100 % budget: norms (and untied embeddings) are memory, neither
    # digital nor analog; the line under it says what the rest is, the routed experts' metric gives their share
    memory = [k for k, v in share["by_kind"].items() if v["memory"]]
    rest = (f"rest {100 * share['memory_params'] / share['total_params']:.2g}%: {' + '.join(memory)} (memory)"
            if share["memory_params"] else None)
    m[0].metric("Digital parameter share", f"{share['digital_share']:.1%}", rest, delta_color="off",
                delta_arrow="off", help=share["help"]["digital_share"])
    m[1].metric("Digital routed experts", f"{sum(share['per_layer_digital'])} / {sum(share['per_layer_experts'])}",
                f"{share['routed_digital_share']:.1%} of routed experts".replace(".0%", "%"), delta_color="off",
                delta_arrow="off", help=f"routed_digital_share {share['routed_digital_share']:.1%}: "
                                        + share["help"]["routed_digital_share"])
    m[2].metric("Analog parameters", f"{share['analog_params'] / 1e6:.2f} M",
                help=f"{share['analog_params'] / share['total_params']:.1%} of all parameters run on AIMC tiles")
    m[3].metric("Per layer", " ".join(str(x) for x in share["per_layer_digital"]), help="digital experts per MoE layer")

    # ------------------------------------------------------------ what the placement costs (hetmoe_core.energy)
    c1, c2 = energy_row.columns(2)
    batch = c1.select_slider("Batch size (tokens per decode step)", energy.BATCHES, key="energy_batch",
                             persist_state="session", help="Paper: 32. At batch 1 the digital part is memory-bound: every weight fetched "
                                  "from HBM serves one token.")
    measured = c2.toggle("Measured routing frequencies", key="energy_measured", persist_state="session",
                         help="Weight each expert by the share of calibration tokens routed to it (else uniform "
                              "top-k/E).")
    e_stats = (stats or ui.stats_for(h)) if measured else None
    shapes = ui.shapes(h)
    refs = {"this placement": p, **{energy.REFERENCE_LABELS[k]: q
                                    for k, q in energy.reference_placements(shapes).items()}}
    costs = {n: energy.cost(shapes, q, hw, batch, e_stats) for n, q in refs.items()}
    c, ref = costs["this placement"], costs[energy.REFERENCE_LABELS["all_digital"]]
    with cost_box:
        e = ui.metric_row(st, 4)
        e[0].metric("Energy per token", f"{c.energy_per_token_j * 1e6:.4g} µJ",
                    help=f"{c.tokens_per_j:,.0f} tokens per joule; {c.energy_per_token_j / ref.energy_per_token_j:.1%}"
                         f" of all-digital ({ref.energy_per_token_j * 1e6:.4g} µJ). {c.routing.capitalize()} routing.")
        e[1].metric("Throughput (tokens/s)", f"{c.tokens_per_s:,.0f}",
                    help=f"At batch {batch}; digital part {c.digital_bound}-bound; {c.latency_s * 1e6:.3g} µs per "
                         "step.")
        e[2].metric("AIMC tiles", f"{c.tiles:,}", help=f"{hw.analog.tile_size}² tiles on {c.chips} chip(s) of "
                    f"{hw.analog.tiles_per_chip}; {c.tile_utilization:.0%} of their cells hold weights.")
        e[3].metric("Digital weight memory", f"{c.digital_bytes / 1e6:,.1f} MB",
                    help=f"bf16 weights held by the digital accelerator(s): {c.accelerators} × {hw.digital.name}.")

    left, right = st.columns([3, 2])
    with left:
        st.plotly_chart(figures.share_bars(share["by_kind"], a.tied_lm_head), key="share_bars")
    with right:
        st.markdown("**Compare with another strategy**")
        others = [s for s in STRATEGIES if s != ss["strategy"]]
        if ss.get("strategy_b") not in others:
            ss["strategy_b"] = others[0]
        sb = st.selectbox("Second strategy", others, key="strategy_b", persist_state="session", format_func=label)
        sb_stats = stats if not needs_stats(sb) else (stats or ui.stats_for(h))
        if needs_stats(sb) and sb_stats is None:
            st.info(f"{label(sb)} needs activation statistics.")
        else:
            q = placement_of(sb, sb_stats)
            o = overlap(p, q)
            st.metric("Shared digital experts", f"{o['shared']} / {o['n_p']}",
                      help="Experts both strategies keep digital at this budget")
            st.caption(f"Jaccard overlap {o['jaccard']:.0%} (intersection / union of the two digital sets)."
                       if o["jaccard"] is not None else "No digital experts at this budget.")
            st.dataframe(pa.table({"MoE layer": [f"L{l}" for l in layers],     # arrow: no pandas conversion
                                   label(ss["strategy"]): [", ".join(map(str, d)) for d in p.digital],
                                   label(sb): [", ".join(map(str, d)) for d in q.digital]}), hide_index=True)

    # ------------------------------------------------------------ the cost beside its limits, against batch size
    with st.expander("Compared with the limits, and against batch size", key="limits_open",
                     on_change="rerun") as limits:
        if limits.open:          # built only while open: the batch sweep is most of a closed page's rerun
            si = figures.si     # 4602219.1855 tokens/s reads 4.60 M
            st.dataframe({"placement": list(costs),
                          "µJ/token": [si(x.energy_per_token_j * 1e6) for x in costs.values()],
                          "tokens/J": [si(x.tokens_per_j) for x in costs.values()],
                          "tokens/s": [si(x.tokens_per_s) for x in costs.values()],
                          "tiles": [x.tiles for x in costs.values()], "chips": [x.chips for x in costs.values()]},
                         hide_index=True)
            st.plotly_chart(figures.cost_vs_batch({n: [(b, energy.cost(shapes, q, hw, b, e_stats))
                                                       for b in energy.BATCHES] for n, q in refs.items()}),
                            key="cost_vs_batch")
            st.caption("Sources of every constant: the hardware constants' tooltips; model and assumptions: "
                       "`hetmoe_core/energy.py`.")


view(hardware)
