"""hetmoe dashboard entry: `streamlit run app.py`."""
import streamlit as st

from hetmoe_core.models import load_model

st.set_page_config(page_title="hetmoe", layout="wide")


@st.cache_resource(max_entries=2)
def _model(source: str):
    return load_model(source)


st.title("hetmoe — heterogeneous analog-digital MoE workbench")
source = st.sidebar.text_input("Model", "default", help="'default', a hub id (org/name) or a local folder")
try:
    st.json(_model(source).anatomy.summary())
except ValueError as e:
    st.error(str(e))
