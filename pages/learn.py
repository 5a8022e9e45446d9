"""Learn page: analog in-memory computing for a class, an interactive noise toy, and a guided walk."""
import numpy as np
import streamlit as st

from hetmoe_core import ui
from hetmoe_core.noise import get_preset
from hetmoe_core.placement import digital_count
from hetmoe_core.toy import lesson_head, matrix_pair, shows_outlier, toy_expert_errors, toy_figure, toy_lesson

ui.frame()
st.title("Learn: why some experts must stay digital")
ss = st.session_state

with st.expander("1 · What is analog in-memory computing (AIMC)?", expanded=True):
    st.markdown("""
A neural network spends most of its time on **matrix-vector products** `y = W x`. On a digital chip every weight is
fetched from memory and multiplied in a processor: moving the weights costs more energy than the arithmetic.

An **AIMC tile** stores the weight matrix *in place* as the **conductances** `G` (in µS) of a crossbar of memory
devices (phase-change memory, PCM, or resistive RAM). Apply the input as voltages on the rows: by Ohm's law each device
passes a current `G·V`, and by Kirchhoff's law the currents of a column add up. The column currents *are* `W x`,
computed in one step without moving a single weight. Tiles are finite (here 512 × 512); larger matrices are split.
""")
with st.expander("2 · DAC and ADC: the digital ↔ analog borders"):
    st.markdown("""
Inputs arrive as numbers and must become voltages: a **DAC** (digital-to-analog converter) with a few bits
(the paper: 8 bits → 255 levels) quantizes each token's input, scaled to its absolute maximum. The column currents
go back to numbers through an **ADC** with a fixed range (its *bound*): outputs beyond it clip, outputs inside are
rounded to the ADC's levels. Both add a small error to every matrix-vector product.
""")
with st.expander("3 · Programming noise, read noise and drift"):
    st.markdown("""
Writing a conductance is imprecise: the programmed device lands near, not on, its target — **programming noise**,
a Gaussian whose spread depends on the target (measured on PCM chips; aihwkit's `PCMLikeNoiseModel`; the paper scales
it by a factor *c*, 1.5 and 2.5). Each read adds **read noise**, and PCM conductances **drift** down over time
`G(t) = G(t₀)·(t/t₀)^(−ν)` — evaluated at an inference time `t_inference` (e.g. one day) and partly undone by
**global drift compensation**. Weights are scaled so that each output channel's largest |w| maps to the largest
conductance: the noise is relative to that channel's maximum.
""")
with st.expander("4 · Mixture-of-Experts and the paper's idea (arXiv 2603.02633)"):
    st.markdown("""
A Mixture-of-Experts (MoE) layer holds many **routed experts** (small MLPs); a **router** sends each token to its
**top-k** of them. Experts hold most of the parameters but each is used by few tokens — ideal for dense, cheap
analog storage. Attention, the LM head, routers and shared experts are used by every token and are a small share of
the parameters: keep them **digital**.

Which experts suffer most from analog noise? Those with **large-norm neurons**: a neuron's output error scales with
its weights' magnitude, and the error then flows through the nonlinearity and the down projection. The paper scores
each expert by **MaxNNScore** = ∏ over gate, up, down of the largest neuron L2 norm, and spends a small **digital
budget** (e.g. 12.5 % of the experts) on the highest-scoring ones. No retraining needed.
""")

st.header("Try it: noise on one layer's experts")
h = ui.require_model()
a = h.lm.anatomy
c1, c2, c3 = st.columns(3)
if ss.get("toy_layer") not in range(len(a.moe_layers)):
    ss["toy_layer"] = 0
li = c1.selectbox("MoE layer", range(len(a.moe_layers)), format_func=lambda i: f"L{a.moe_layers[i].layer}",
                  key="toy_layer", persist_state="session")
m = a.moe_layers[li]
c = c2.slider("Programming noise scale c", 0.0, 5.0, 1.5, 0.25, key="toy_c",
              help="Multiplies the PCM programming-noise spread (aihwkit PCMLikeNoiseModel prog_noise_scale). "
                   "The paper uses 1.5 and 2.5.", persist_state="session")
if ss.get("toy_expert") not in range(m.num_experts):
    ss["toy_expert"] = 0
show = c3.selectbox("Expert to look at", range(m.num_experts), key="toy_expert", persist_state="session")


@st.cache_data(max_entries=64, show_spinner=False)
def toy(fingerprint: str, layer: int, c: float, show: int, _h):
    noise = get_preset("paper-pcm-c1.5", prog_noise_scale=c) if c > 0 else get_preset("ideal")
    with _h.lock:
        return toy_expert_errors(_h.lm.anatomy.moe_layers[layer], noise, seed=0, show=show)


def show_toy():
    with st.spinner("Programming the experts onto simulated tiles …"):
        res = toy(h.lm.fingerprint, li, float(c), int(show), h)
    left, right = st.columns([3, 2])
    with left:
        st.plotly_chart(toy_figure(res["maxnn"], res["error"], m.layer, f"PCM noise, c = {c:g}", show),
                        key="toy_scatter")
    with right:
        if c > 0:
            les = toy_lesson(res["maxnn"], res["error"])
            st.metric("Correlation (log score, log error)", f"{les['r']:+.2f}")
            st.markdown(_lesson(les, float(c)))
        else:
            st.info("c = 0: programming is exact; move the slider.")
    st.plotly_chart(matrix_pair(res["up"], res["up_noisy"], f"Expert {show}: up projection [I × H] — "
                                        f"MaxNNScore {res['maxnn'][show]:.3g}"), key="toy_matrix")


def _outlier_layers(c: float) -> list[int]:
    """MoE layers (indices) whose toy at noise scale ``c`` shows an outlier (same seed and inputs as the toy)."""
    out = []
    for i in range(len(a.moe_layers)):
        r = toy(h.lm.fingerprint, i, c, 0, h)
        if shows_outlier(toy_lesson(r["maxnn"], r["error"])):
            out.append(i)
    return out


def _elsewhere(c: float) -> str:
    """Where this model shows an outlier at noise scale ``c``, or that no layer of it does."""
    others = [i for i in _outlier_layers(c) if i != li]
    if others:
        names = ", ".join(f"L{a.moe_layers[i].layer}" for i in others)
        return f"Choose MoE layer {names} above to see one expert stand out."
    return (f"No MoE layer of this model has a single outlier expert at c = {c:g}: in all of them the trend, "
            "not one expert, decides which experts the budget keeps digital.")


def _lesson(les: dict, c: float) -> str:
    """The toy's take-away, worded after what this layer (and, for a pointer, the model's other layers) shows."""
    head = lesson_head(les)
    if shows_outlier(les):
        return head + (" Moving the few high-score experts to digital removes the largest errors at a small "
                       "cost.")
    if les["r"] >= 0.5:
        return head + (" No single expert stands out here (their scores are close), but the trend holds across all "
                       "of them "
                       f"(r = {les['r']:+.2f}): higher score, larger error. " + _elsewhere(c))
    return head + (f" Here the link is weak (r = {les['r']:+.2f}): the scores of this layer's experts are close, so "
                   "the ranking matters little. " + _elsewhere(c))


if h.lock.locked():
    st.info("An evaluation is running on this model (its weights are noisy meanwhile); the toy runs when it ends.")
else:
    show_toy()

st.header("Guided walk through the model")
maxnn = [ls.maxnn for ls in ui.scores(h).layers]
L, E = int(np.argmax([x.max() for x in maxnn])), None
E = int(np.argmax(maxnn[L]))
st.markdown(f"""
1. **Model** — {a.model_class}: {a.num_layers} decoder layers, {len(a.moe_layers)} of them MoE with
   {m.num_experts} routed experts and top-{m.top_k}; routed experts hold
   {a.param_counts['routed_experts'] / a.total_params:.0%} of the parameters.
2. **Sensitivity** — the heatmap of MaxNNScore: expert {E} of layer {a.moe_layers[L].layer} scores highest
   ({maxnn[L][E]:.3g}). Compare it with how often tokens use it (activation frequency).
3. **Placement** — drag the digital budget: at 12.5 % each layer keeps its top
   {digital_count(0.125, m.num_experts)} expert(s) digital; see the digital parameter share and how far MaxNNScore
   and activation frequency agree.
4. **Evaluate** — run the preset *paper-pcm-c1.5* on a small task limit: the bar shows progress; results are
   cached, so running it again is instant.
5. **Results** — accuracy or perplexity against the budget per strategy, between the ideal (all digital) and
   the all-analog reference lines.
6. **Share** — download a snapshot and an HTML report; the page's link reproduces what you see.
""")
cols = st.columns(5)
for col, (p, t) in zip(cols, [("pages/model.py", "Model"), ("pages/sensitivity.py", "Sensitivity"),
                              ("pages/placement.py", "Placement"), ("pages/evaluate.py", "Evaluate"),
                              ("pages/results.py", "Results")]):
    col.page_link(p, label=f"→ {t}")
