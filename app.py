"""hetmoe dashboard entry: ``streamlit run app.py`` (listens on 127.0.0.1:8501, see .streamlit/config.toml).

The sidebar (hetmoe_core.ui.frame) chooses the model (default, hub id, local folder, tiny random), device and dtype;
the pages in ``pages/`` lay out widgets and call ``hetmoe_core``. Shared view state lives in st.session_state and in
the URL's query parameters (model, strategy, budget, preset). Navigation icons come from the Material Symbols font
bundled with Streamlit: no request leaves the machine.
"""
import streamlit as st

from hetmoe_core import ui

ui.frame(entry=True)
page = st.navigation([
    st.Page("pages/model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("pages/learn.py", title="Learn", icon=":material/school:"),
    st.Page("pages/sensitivity.py", title="Sensitivity", icon=":material/thermostat:"),
    st.Page("pages/validate.py", title="Validate", icon=":material/fact_check:"),
    st.Page("pages/placement.py", title="Placement", icon=":material/grid_on:"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/science:"),
    st.Page("pages/results.py", title="Results", icon=":material/monitoring:"),
    st.Page("pages/share.py", title="Share", icon=":material/share:"),
])
st.session_state["_redirected"] = False
with ui.page_run():          # the page's own ui.frame() call is a no-op; model holds end with the page
    page.run()
