"""Sensitivity page: per-expert MaxNNScore, its per-projection maxima, router norm and activation density."""
import numpy as np
import streamlit as st

from hetmoe_core import figures, ui

ui.frame()
st.title("Expert sensitivity")
st.caption("Which routed experts amplify analog noise? **MaxNNScore** (arXiv 2603.02633) multiplies, over the "
           "gate/up/down projections, the largest L2 norm of a neuron's weight vector. Large-norm experts are the "
           "ones to keep digital. Hover a cell for its values; pick an expert below for its neuron-norm histogram.")
ss = st.session_state

sc = ui.scores()
if sc is None:
    st.stop()
layers = [ls.layer for ls in sc.layers]
maxnn, rnorm = sc.get("maxnn"), sc.get("router_norm")
proj = {p: sc.get(p) for p in sc.layers[0].neuron_norms}
extra = {f"max ‖{p}‖": v for p, v in proj.items()}
extra["router norm"] = rnorm
# the first heatmap comes from the weights alone, before the model is built
st.plotly_chart(figures.expert_heatmap(maxnn, layers, "MaxNNScore per expert", "MaxNNScore", extra=extra,
                                       log=True), key="heat_maxnn")

h = ui.require_model()
stats = ui.stats_for(h)
freq = weight = None
if stats is not None:
    domains = ["all domains"] + list(stats.domains)
    if ss.get("sens_domain") not in domains:
        ss["sens_domain"] = "all domains"
    dom = st.selectbox("Calibration domain for activation density", domains, key="sens_domain",
                       persist_state="session",
                       help="Activation frequency = share of the domain's tokens the router sends to the expert "
                            f"(rows sum to top-k). {stats.num_tokens:,} calibration tokens in all.")
    s = stats if dom == "all domains" else stats.domain(dom)
    freq, weight = list(s.frequency), list(s.weight)
tab_p, tab_f, tab_w, tab_r = st.tabs(["Per-projection maxima", "Activation frequency", "Activation weight",
                                      "Router norm"])
with tab_p:
    cols = st.columns(len(proj))
    for c, (p, v) in zip(cols, proj.items()):
        c.plotly_chart(figures.expert_heatmap(v, layers, f"max neuron norm: {p}", f"max ‖{p}‖", compact=True),
                       key=f"heat_{p}")
with tab_r:
    st.plotly_chart(figures.expert_heatmap(rnorm, layers, "Router norm per expert (baseline)", "router norm",
                                           extra={"MaxNNScore": maxnn}), key="heat_router")

if freq is not None:
    with tab_f:
        st.plotly_chart(figures.expert_heatmap(freq, layers, f"Activation frequency ({dom})", "frequency",
                                               extra={"MaxNNScore": maxnn, "weight": weight}, colorscale="Blues"),
                        key="heat_freq")
    with tab_w:
        st.plotly_chart(figures.expert_heatmap(weight, layers, f"Mean routing weight when routed ({dom})",
                                               "weight", extra={"MaxNNScore": maxnn, "frequency": freq},
                                               colorscale="Greens"), key="heat_weight")
else:
    for t in (tab_f, tab_w):
        with t:
            st.info("Needs activation statistics from calibration text (see the message above the tabs).")

st.subheader("MaxNNScore vs activation frequency")
if freq is not None:
    ev = st.plotly_chart(figures.score_scatter(maxnn, freq, layers, "MaxNNScore", "activation frequency"),
                         key="sens_scatter", on_select="rerun", selection_mode="points")
    pick = figures.scatter_pick(ev)
    if pick is not None and pick != ss.get("_sens_pick"):
        ss["_sens_pick"] = pick                              # a click on the scatter picks the expert below
        ss["sens_layer"], ss["sens_expert"] = layers[pick[0]], pick[1]
    r = np.corrcoef(np.log(np.concatenate(maxnn)), np.concatenate(freq))[0, 1]
    st.caption(f"Pearson correlation of log MaxNNScore with frequency: {r:+.2f}. Click a point to inspect it.")
else:
    st.info("The scatter needs activation frequency (not available for this model yet).")

st.subheader("Neuron norms of one expert")


@st.fragment
def one_expert():
    """Choosing a layer or an expert reruns only this section (the heatmaps and the scatter above stay)."""
    c1, c2 = st.columns(2)
    if ss.get("sens_layer") not in layers:
        ss["sens_layer"] = layers[int(np.argmax([m.max() for m in maxnn]))]
    li = layers.index(c1.selectbox("MoE layer (decoder index)", layers, key="sens_layer", persist_state="session"))
    E = len(maxnn[li])
    if ss.get("sens_expert") not in range(E):
        ss["sens_expert"] = int(np.argmax(maxnn[li]))
    e = c2.selectbox("Expert", list(range(E)), key="sens_expert", persist_state="session",
                     format_func=lambda x: f"{x}  (MaxNNScore {maxnn[li][x]:.3g})")
    norms = {p: v[e] for p, v in sc.layers[li].neuron_norms.items()}
    st.plotly_chart(figures.neuron_histogram(norms, layers[li], e), key="hist")
    rank = int((maxnn[li] > maxnn[li][e]).sum()) + 1
    st.caption(f"Expert {e} ranks {rank} of {E} by MaxNNScore in layer {layers[li]}; its score is the product of the "
               "three maxima in the legend.")


one_expert()
