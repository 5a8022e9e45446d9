"""Share page: a link to the current view, snapshot export / import, and the HTML report."""
import tempfile
from pathlib import Path
from urllib.parse import urlencode

import streamlit as st

from hetmoe_core import results, ui
from hetmoe_core.report import write_report
from hetmoe_core.snapshot import SnapshotError, export_snapshot, import_snapshot, read_snapshot
from hetmoe_core.store import Store, shown_path

UPLOAD_MB = 50      # also server.maxUploadSize in .streamlit/config.toml

ui.frame()
st.title("Share")
ss = st.session_state

st.subheader("Link to this view")
params = ui.view_params()      # every setting that changes what Placement shows (view_state.view_params)
base = (getattr(st.context, "url", None) or "http://127.0.0.1:8501/").split("?")[0].rstrip("/")
base = base.rsplit("/share", 1)[0]
st.code(f"{base}/placement?{urlencode(params)}", language=None)
st.caption("Opens the Placement page with the same model, strategy, digital budget, scope, noise preset, dense "
           "modules and hardware constants (every page keeps these in its URL; dense modules and hardware only "
           "where they differ from the defaults).")

store = ui.store_or_stop(Store)
counts = ui.store_or_stop(store.counts)
st.subheader("Export")
h = ui.get_model(show_errors=False)
scope = st.radio("Results to export", ["this model", "all models"], horizontal=True, key="share_scope",
                 disabled=h is None, index=1 if h is None else 0)
filters = {"model_fingerprint": h.lm.fingerprint} if (h is not None and scope == "this model") else None
n = len(store.runs_frame(filters).key.unique()) if counts["runs"] else 0
st.caption(f"{n} stored run(s) selected from `{shown_path(store.path)}`.")


@st.cache_data(max_entries=4, show_spinner="Writing the snapshot …")
def _snapshot(path: str, signature: str, fingerprint: str | None) -> bytes:
    """Snapshot zip bytes of the store at ``path`` (cached until the store changes: ``signature``)."""
    with tempfile.TemporaryDirectory() as d:
        export_snapshot(Store(path), Path(d) / "snapshot.zip",
                        filters={"model_fingerprint": fingerprint} if fingerprint else None)
        return (Path(d) / "snapshot.zip").read_bytes()


@st.cache_data(max_entries=4, show_spinner="Writing the HTML report …")
def _report(_source: str, signature: str) -> bytes:
    """HTML report bytes of a store or snapshot file (cached per content ``signature``)."""
    with tempfile.TemporaryDirectory() as d:
        write_report(_source, Path(d) / "report.html")
        return (Path(d) / "report.html").read_bytes()


def _report_wanted(col, signature: str, key: str) -> bool:
    """True once the user asked for the HTML report of this content (a report of thousands of results takes tens of
    seconds, so it is built on request, not whenever the page is drawn); stays True until the content changes."""
    ss = st.session_state
    if ss.get(key) == signature:
        return True
    if col.button("Build the HTML report", key=key + "_btn", help="Tables and figures of every result in one "
                  "self-contained page; seconds to a minute for thousands of results."):
        ss[key] = signature
        return True
    return False


# bytes are made when the page is drawn (cached), not on click: a deferred download callable can be dropped by
# Streamlit's media-file cleanup when another session of the server ends between the drawing and the click
sig = store.signature()
c1, c2 = st.columns(2)
if n:
    c1.download_button("Download snapshot (.zip)", _snapshot(str(store.path), sig, filters and h.lm.fingerprint),
                       "hetmoe_snapshot.zip", "application/zip", key="dl_snapshot",
                       help="Parquet tables + manifest; no code, no pickle.")
    if _report_wanted(c2, f"{store.path}|{sig}", "share_build_report"):
        c2.download_button("Download HTML report", _report(str(store.path), f"{store.path}|{sig}"),
                           "hetmoe_report.html", "text/html", key="dl_report",
                           help="One self-contained page (plotly.js embedded): tables and figures of every stored "
                                "result.")
if n == 0:
    st.info("Nothing to export yet: run an evaluation first.")


def manifest_sig(manifest: dict) -> str:
    """Content signature of a snapshot: the sha256 of each of its tables."""
    return ",".join(f"{t}:{v.get('sha256')}" for t, v in sorted(manifest.get("tables", {}).items()))


st.subheader("Import")
up = st.file_uploader(f"Snapshot (.zip, at most {UPLOAD_MB} MB)", type=["zip"], key="share_upload",
                      max_upload_size=UPLOAD_MB,
                      help="Validated before anything is written: names, sizes, checksums, schema. Never executed.")
if up is not None:
    data = up.getvalue()
    if len(data) > UPLOAD_MB << 20:
        st.error(f"{up.name} is {len(data) / 2**20:.1f} MB; the limit is {UPLOAD_MB} MB.")
        st.stop()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "upload.zip"
        path.write_bytes(data)
        try:
            manifest, tables = read_snapshot(path)
        except (SnapshotError, ValueError) as e:
            why = str(e).replace(str(path), up.name)   # the server's temporary path means nothing to the user
            st.error(why if why.startswith(up.name) else f"{up.name} is not a valid hetmoe snapshot: {why}")
            st.stop()
        st.success(f"Valid snapshot from hetmoe {manifest.get('hetmoe_version', '?')}, created "
                   f"{manifest.get('created_at', '?')}: {results.snapshot_contents(tables)}.")
        c1, c2 = st.columns(2)
        if c1.button("Import into the store", type="primary", key="share_import"):
            try:
                st.success(results.import_message(import_snapshot(path, store)) + " See the Results page.")
            except (SnapshotError, ValueError) as e:
                st.error(f"Import failed, the store is unchanged: {str(e).replace(str(path), up.name)}")
        try:
            if _report_wanted(c2, manifest_sig(manifest), "share_build_upload_report"):
                c2.download_button("HTML report of this snapshot", _report(str(path), manifest_sig(manifest)),
                                   "hetmoe_snapshot_report.html", "text/html", key="dl_upload_report")
        except ValueError as e:
            c2.info(f"No report: {e}")
