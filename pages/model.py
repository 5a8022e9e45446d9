"""Model page: anatomy summary and parameter breakdown of the model chosen in the sidebar."""
import pandas as pd
import streamlit as st

from hetmoe_core import figures, ui
from hetmoe_core.placement import SHARE_HELP, Placement, digital_share

ui.frame()
st.title("Model anatomy")
h = ui.require_model()
lm, a = h.lm, h.lm.anatomy
m0 = a.moe_layers[0]
s = a.summary()

st.caption(f"Source `{lm.source}` · fingerprint `{lm.fingerprint}` · loaded in {h.load_s:.1f} s")
c = st.columns(5)
c[0].metric("Family", a.family, help=a.model_class)
c[1].metric("Decoder layers", a.num_layers, help=f"{len(a.moe_layers)} of them are MoE layers")
c[2].metric("Routed experts / layer", m0.num_experts, help="Each token picks top-k of them via the router")
c[3].metric("Top-k", m0.top_k, help="Experts each token is routed to in every MoE layer")
c[4].metric("Parameters", f"{a.total_params / 1e6:.2f} M", help=f"{a.total_params:,} stored in {a.dtype}")

left, right = st.columns([3, 2])
with left:
    st.plotly_chart(figures.param_breakdown(a.param_counts, a.tied_lm_head), key="param_chart")
with right:
    st.markdown("**What runs where (paper default)**")
    routed = a.param_counts.get("routed_experts", 0)
    paper = digital_share(Placement.all_analog(a), a)       # budget 0: every routed expert analog
    tied = ("; the embedding table is also the tied LM head's matrix, so it counts as digital"
            if a.tied_lm_head else "")
    st.markdown(
        f"- **Routed experts** — {routed / a.total_params:.1%} of parameters; each token uses only "
        f"{m0.top_k} of {m0.num_experts} per layer. Candidates for analog (AIMC) tiles.\n"
        f"- **Dense modules** (attention, LM head, routers, shared experts, dense MLPs) — used by every token, kept "
        f"digital{tied}: a digital parameter share of **{paper['digital_share']:.1%}** with every routed expert "
        "analog (budget 0 on the Placement page).\n"
        "- **Embeddings / norms** — table lookups and element-wise ops: memory, not matrix-vector work"
        + (" (except a tied embedding table, above)." if a.tied_lm_head else "."),
        help=SHARE_HELP["digital_share"])
    st.markdown(f"Expert MLP: hidden {m0.hidden_size} → intermediate {m0.intermediate_size} "
                f"({'SwiGLU: gate, up, down' if m0.gated else 'up, down'}); "
                f"{'tied' if a.tied_lm_head else 'separate'} LM head.")

st.subheader("MoE layers")
st.dataframe(pd.DataFrame([{"MoE layer": m.index, "decoder layer": m.layer, "module": m.prefix,
                            "experts": m.num_experts, "top-k": m.top_k, "hidden": m.hidden_size,
                            "intermediate": m.intermediate_size, "shared experts": ", ".join(m.shared_names) or "—"}
                           for m in a.moe_layers]), hide_index=True)
with st.expander("Summary as JSON"):
    st.json(s)
