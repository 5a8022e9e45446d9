"""Streamlit-side helpers shared by ``app.py`` and ``pages/``: the cached model, scores and routing statistics, the
view state shared across pages and mirrored in the URL, and the background evaluation job.

No science lives here: every number comes from the core modules (models, scores, routing, placement, evaluate,
store). Importing this module imports streamlit.
"""
from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field

import streamlit as st


# ------------------------------------------------------------------------------------------- shared view state
DEFAULTS = {"source": "default", "device": "cpu", "dtype": "float32", "strategy": "maxnn", "budget_pct": 12.5,
            "scope": "layer", "preset": "paper-pcm-c1.5"}
QUERY = {"model": "source", "strategy": "strategy", "budget": "budget_pct", "preset": "preset"}
"""URL query parameter -> session-state key: a pasted link reproduces the view (budget in the URL is a fraction)."""


def _from_query(name: str, raw: str):
    """A URL value as session state, or ValueError when it is not valid."""
    if name == "budget":
        b = float(raw)
        if not 0.0 <= b <= 1.0:
            raise ValueError
        return round(b * 100, 3)
    if name == "strategy":
        from .scores import STRATEGIES
        if raw not in STRATEGIES:
            raise ValueError
    if name == "preset":
        from .noise import PRESETS
        if raw not in PRESETS:
            raise ValueError
    return raw


def init_state() -> None:
    """First run of a session: defaults, overridden by the URL's query parameters (bad values are ignored with a
    warning). Widgets keep their values across pages with ``persist_state="session"``."""
    ss = st.session_state
    if not ss.get("_initialised"):
        for k, v in DEFAULTS.items():
            ss.setdefault(k, v)
        for q, key in QUERY.items():
            if q in st.query_params:
                try:
                    ss[key] = _from_query(q, st.query_params[q])
                except ValueError:
                    ss["_query_warning"] = f"ignored the link's {q}={st.query_params[q]!r}"
        ss["source_kind"] = source_kind(ss["source"])
        if ss["source"].startswith("tiny:"):
            ss["source_tiny"] = ss["source"][5:]
        ss["source_text"] = ss["source"] if ss["source_kind"] in ("Hub id", "Local folder") else ""
        ss["_initialised"] = True


def sync_query_params() -> None:
    """Write the current view (model, strategy, budget, preset) into the URL (only values that changed)."""
    ss = st.session_state
    for q, key in QUERY.items():
        v = ss.get(key)
        if v is None:
            continue
        v = f"{float(v) / 100:g}" if q == "budget" else str(v)
        if st.query_params.get(q) != v:
            st.query_params[q] = v


def source_kind(source: str) -> str:
    """Sidebar radio label of a model source."""
    if source == "default":
        return "Default"
    if source.startswith("tiny:"):
        return "Tiny (random)"
    if source.startswith((".", "/", "~")):
        return "Local folder"
    return "Hub id"


def budget() -> float:
    """Digital budget as a fraction in [0, 1] (the sliders hold percent)."""
    return float(st.session_state.get("budget_pct", DEFAULTS["budget_pct"])) / 100.0


# ------------------------------------------------------------------------------------------- page frame
def frame(entry: bool = False) -> None:
    """Page set-up and the sidebar (model source, device, dtype), once per run.

    app.py calls ``frame(entry=True)`` before ``st.navigation``; every page calls ``frame()``, a no-op inside
    app.py's run. Streamlit runs a file of a ``pages/`` folder directly, without the entry script, while no
    session of the server process has called ``st.navigation`` yet (its pages-directory mode: a fresh server
    opened on a deep link, and AppTest on every run). A page that finds itself run that way switches the
    process to ``st.navigation`` mode and reruns once, through app.py, on the same page (under AppTest it draws
    the frame itself instead)."""
    ss = st.session_state
    if ss.get("_in_frame"):
        return
    if not entry:
        from streamlit import config
        from streamlit.runtime.pages_manager import PagesManager
        PagesManager.uses_pages_directory = False      # what st.navigation itself sets on its first call
        # AppTest resets the mode before every run (a rerun would drop a button click): frame the page here
        if not ss.get("_redirected") and not config.get_option("global.appTest"):
            ss["_redirected"] = True
            st.rerun()
    st.set_page_config(page_title="hetmoe", page_icon=":material/memory:", layout="wide")
    init_state()
    with st.sidebar:
        _sidebar()
    sync_query_params()


def _sidebar() -> None:
    ss = st.session_state
    st.markdown("### Model")
    kind = st.radio("Source", ["Default", "Hub id", "Local folder", "Tiny (random)"], key="source_kind",
                    persist_state="session", horizontal=True,
                    help="Default: the small OLMoE shipped with hetmoe. Hub id: org/name on the Hugging Face hub "
                         "(needs network). Local folder: config.json + *.safetensors. Tiny: random test models.")
    if kind == "Default":
        source = "default"
    elif kind == "Tiny (random)":
        from .models import TINY_FAMILIES
        source = "tiny:" + st.selectbox("Family", TINY_FAMILIES, key="source_tiny", persist_state="session")
    else:
        source = st.text_input("Hub id" if kind == "Hub id" else "Folder", key="source_text", persist_state="session",
                               placeholder="allenai/OLMoE-1B-7B-0924" if kind == "Hub id" else "/path/to/model",
                               help="Press Enter to load.").strip()
    c1, c2 = st.columns(2)
    devices = ["cpu"] + _cuda_devices()
    if ss.get("device") not in devices:
        ss["device"] = "cpu"
    c1.selectbox("Device", devices, key="device", persist_state="session")
    c2.selectbox("dtype", ["float32", "bfloat16", "float16"], key="dtype", persist_state="session",
                 help="Weights' number format. float32 on CPU is fastest and exact.")
    ss["source"] = source     # empty: pages say what to enter (load_model's ValueError)
    # filled by get_model() when a page loads the model, so that the page's first chart need not wait for it
    ss["_model_slot"] = st.empty()
    ss["_model_slot"].caption("Enter a model source above." if not source else f"Model: `{ss['source']}`")
    if (w := ss.pop("_query_warning", None)):
        st.warning(f"The link held an invalid value: {w}; the default is used instead.")


def _cuda_devices() -> list[str]:
    """cuda:N names once torch is imported (by the page's model or scores). The sidebar never imports torch itself,
    so a cold start draws the first chart sooner; the GPUs appear in the list from the next rerun on."""
    import sys
    torch = sys.modules.get("torch")
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch is not None else []


# ------------------------------------------------------------------------------------------- cached model
@dataclass(eq=False)
class ModelHandle:
    """A loaded model plus the lock that every dashboard use of its weights takes (evaluations make the weights
    noisy inside ``analog()``; scores and routing statistics must read them clean)."""
    lm: object                   # models.LoadedModel
    lock: threading.Lock = field(default_factory=threading.Lock)
    load_s: float = 0.0


def _release(handle: ModelHandle) -> None:
    """Eviction from the resource cache: drop the model and give its memory back."""
    handle.lm = None
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:   # releasing memory is best effort
        pass


@st.cache_resource(max_entries=2, on_release=_release, show_spinner=False)
def _load(source: str, device: str, dtype: str) -> ModelHandle:
    from .models import load_model
    t0 = time.perf_counter()
    lm = load_model(source, device=device, dtype=dtype)
    return ModelHandle(lm, load_s=time.perf_counter() - t0)


def get_model(show_errors: bool = True) -> ModelHandle | None:
    """The model chosen in the sidebar (loaded once per source/device/dtype; at most two kept in memory).

    A bad source shows st.error with what to do and returns None (no traceback)."""
    ss = st.session_state
    try:
        with st.spinner(f"Loading {ss['source']} …"):
            h = _load(ss["source"], ss["device"], ss["dtype"])
        a, slot = h.lm.anatomy, ss.get("_model_slot")
        if slot is not None:
            slot.caption(f"**{a.model_class}** · {len(a.moe_layers)} MoE layers · {a.moe_layers[0].num_experts} "
                         f"experts · top-{a.moe_layers[0].top_k} · {a.total_params / 1e6:.1f} M params  \n"
                         f"`{h.lm.fingerprint}`")
        return h
    except (ValueError, OSError) as e:
        if show_errors:
            st.error(f"Could not load model **{ss['source']}**: {e}\n\nChoose *Default* in the sidebar, or give a "
                     "local folder with config.json and *.safetensors, or a Hugging Face hub id (org/name) when the "
                     "hub is reachable.")
    except ImportError as e:
        if show_errors:
            st.error(f"Loading **{ss['source']}** needs a package that is not installed: {e}")
    return None


def require_model() -> ModelHandle:
    """get_model(), or stop the page (the error is already shown)."""
    h = get_model()
    if h is None:
        st.stop()
    return h


# ------------------------------------------------------------------------------------------- cached data
@st.cache_data(max_entries=8, show_spinner=False)
def expert_scores(fingerprint: str, dtype: str, _handle: ModelHandle):
    """scores.ExpertScores of the loaded model (cached by weights fingerprint and dtype; read under the model lock)."""
    from .scores import expert_scores as compute
    with _handle.lock:
        return compute(_handle.lm.anatomy)


@st.cache_data(max_entries=4, show_spinner=False)
def calibration(source: str | None = None) -> tuple[dict | None, str | None, str]:
    """(texts by domain, hash, message) for model ``source``: the default calibration text of evaluate (message: a
    note when it is the built-in tiny-model sentences, else ""), or (None, None, why not)."""
    try:
        from .evaluate import default_calibration
        from .routing import BUILTIN_NOTE, default_calibration as where_of, is_builtin
        texts, h = default_calibration(source)
        return texts, h, (f"Calibration: {BUILTIN_NOTE}." if is_builtin(where_of(source)[1]) else "")
    except (ValueError, ImportError, OSError) as e:
        return None, None, str(e)


@st.cache_data(max_entries=8, show_spinner=False)
def activation_stats(fingerprint: str, calib_hash: str, _handle: ModelHandle, _texts: dict):
    """routing.ActivationStats on the calibration text (also cached on disk by routing)."""
    from .routing import activation_stats as compute
    lm = _handle.lm
    with _handle.lock:
        return compute(lm.model, lm.tokenizer, lm.anatomy, _texts, fingerprint=fingerprint)


def stats_for(handle: ModelHandle, show: bool = True):
    """Activation statistics of the model on the default calibration text, or None (with an info message)."""
    texts, h, why = calibration(handle.lm.source)
    if texts is None:
        if show:
            st.info(f"Activation frequency / weight are not available yet: {why}")
        return None
    if why and show:
        st.caption(why)
    if handle.lock.locked():
        if show:
            st.info("An evaluation is running on this model; activation statistics appear when it finishes.")
        return None
    with st.spinner("Routing the calibration text through the model (once per model) …"):
        try:
            return activation_stats(handle.lm.fingerprint, h, handle, texts)
        except ValueError as e:
            if show:
                st.warning(f"Activation statistics failed: {e}")
            return None


# ------------------------------------------------------------------------------------------- background jobs
class Job:
    """A background evaluation: a thread running ``evaluate.evaluate_many`` with its own progress state.

    Lives in st.session_state; the page polls it from an ``st.fragment(run_every=...)``. The thread never calls
    Streamlit and opens its own store connections (evaluate/store open one per operation)."""

    def __init__(self, handle: ModelHandle, **kwargs):
        self.handle, self.kwargs = handle, kwargs
        self.cancel = threading.Event()
        self.done, self.total, self.results = 0, 0, []
        self.status, self.error = "running", None
        self.started = time.time()
        self.finished: float | None = None
        self.thread = threading.Thread(target=self._run, name="hetmoe-eval", daemon=True)
        self.thread.start()

    def _progress(self, done: int, total: int, result: dict) -> None:
        self.done, self.total = done, total
        self.results.append(result)

    def _run(self) -> None:
        from .evaluate import evaluate_many
        try:
            with self.handle.lock:
                evaluate_many(lm=self.handle.lm, progress=self._progress, cancel=self.cancel, **self.kwargs)
            self.status = "cancelled" if self.cancel.is_set() else "done"
        except ValueError as e:
            self.status, self.error = "error", str(e)
        except Exception as e:   # shown in the page as a message, never as a traceback
            self.status, self.error = "error", f"{type(e).__name__}: {e}"
        self.finished = time.time()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    @property
    def elapsed(self) -> float:
        """Seconds since the start (until the end once finished)."""
        return (self.finished or time.time()) - self.started

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


# ------------------------------------------------------------------------------------------- scores without a model
@st.cache_data(max_entries=8, show_spinner=False)
def _streamed_scores(fingerprint: str, folder: str):
    from .scores import stream_scores
    return stream_scores(folder)


def scores(handle: ModelHandle | None = None):
    """ExpertScores of the sidebar's model, cached by weights fingerprint.

    Without ``handle``, local safetensors folders (the default included) are read straight from the files
    (scores.stream_scores: no transformers import and no model build, so the Sensitivity page's first heatmap is
    quick). With ``handle`` (pages that place experts) the scores come from the loaded model's weights, exactly as
    evaluate's placements see them in the chosen dtype. None (error shown) if the model fails to load."""
    from pathlib import Path
    from .models import resolve_source
    source = st.session_state["source"]
    if handle is None:
        try:
            kind, where = resolve_source(source)
            if kind in ("default", "folder") and (Path(where) / "config.json").exists() \
                    and any(Path(where).glob("*.safetensors")):
                from .evaluate import source_fingerprint
                return _streamed_scores(source_fingerprint(source), where)
        except ValueError:
            pass   # fall through: loading shows the error with what to do
    handle = handle or get_model()
    return None if handle is None else expert_scores(handle.lm.fingerprint, handle.lm.anatomy.dtype, handle)


# ------------------------------------------------------------------------------------------- background validation
class ValidationJob:
    """A background ``sensitivity.validate`` (measured expert damage) with progress and cancel, like Job.

    Lives in st.session_state; the Validate page polls it from an ``st.fragment(run_every=...)``. The thread takes
    the model lock (noise is programmed into the weights while it measures) and never calls Streamlit. ``result``
    is Validation.to_dict() once done; it is also kept in the store (examples.put_validation) for the next visit."""

    def __init__(self, handle: ModelHandle, preset: str, seeds: int, tokens: int, store_path=None):
        self.handle, self.preset, self.seeds, self.tokens, self.store_path = handle, preset, seeds, tokens, store_path
        self.cancel = threading.Event()
        self.done, self.total = 0, 0
        self.status, self.error, self.result = "running", None, None
        self.started = time.time()
        self.finished: float | None = None
        self.thread = threading.Thread(target=self._run, name="hetmoe-validate", daemon=True)
        self.thread.start()

    def _progress(self, done, total=None, *_):
        self.done, self.total = int(done), int(total or 0)

    def _run(self) -> None:
        try:
            from .examples import put_validation
            from .routing import default_calibration
            from .sensitivity import validate
            from .store import Store
            store = Store(self.store_path)
            texts, _ = default_calibration(self.handle.lm.source)   # tiny: test models get the built-in sentences
            with self.handle.lock:
                v = validate(self.handle.lm, self.preset, seeds=self.seeds, texts=texts, tokens=self.tokens,
                             store=store, progress=self._progress, cancel=self.cancel.is_set)
            if self.cancel.is_set() or v is None:
                self.status = "cancelled"
            else:
                self.result = v.to_dict()
                put_validation(store, self.result)
                self.status = "done"
        except ImportError as e:
            self.status, self.error = "error", f"measured sensitivity is not available in this install ({e})"
        except ValueError as e:   # bad input; evaluate.Cancelled is not a ValueError and lands below
            self.status, self.error = ("cancelled", None) if self.cancel.is_set() else ("error", str(e))
        except Exception as e:   # shown in the page as a message, never as a traceback
            self.status, self.error = ("cancelled", None) if self.cancel.is_set() else \
                ("error", f"{type(e).__name__}: {e}")
        self.finished = time.time()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


# ------------------------------------------------------------------------------------------- hardware constants
def hardware_editor(key: str = "hw"):
    """A hardware preset and its constants, editable in an expander (labels, units, help and sources are read
    from the field metadata of ``hardware.DigitalConfig`` / ``AnalogConfig``). Returns the ``Hardware``; an
    invalid edit shows one warning and returns the preset unchanged."""
    from .hardware import HARDWARE, HARDWARE_DOCS, AnalogConfig, DigitalConfig, field_docs, get_hardware
    with st.expander("Hardware constants (units and sources in the tooltips)"):
        name = st.selectbox("Hardware preset", list(HARDWARE), key=f"{key}_preset", format_func=lambda n: n,
                            help=" · ".join(f"{n}: {d}" for n, d in HARDWARE_DOCS.items()))
        base, changes = HARDWARE[name], {"digital": {}, "analog": {}}
        for part, cls, title in (("digital", DigitalConfig, "Digital accelerator"),
                                 ("analog", AnalogConfig, "AIMC chip")):
            st.markdown(f"**{title}** · {getattr(base, part).name}")
            cols = st.columns(3)
            for i, f in enumerate(field_docs(cls)):
                v = getattr(getattr(base, part), f["name"])
                is_int = isinstance(v, int)
                w = cols[i % 3].number_input(
                    f"{f['name']} ({f['unit']})", value=v, min_value=1 if is_int else 1e-9,
                    step=1 if is_int else None, format=None if is_int else "%.4g",
                    key=f"{key}_{name}_{part}_{f['name']}",
                    help=f"{f['help']} Unit: {f['unit']}. Source: {f['source']}")
                if w != v:
                    changes[part][f["name"]] = int(w) if is_int else float(w)
        try:
            hw = get_hardware(name, **changes)
        except ValueError as e:
            st.warning(f"{e} — using the preset's values.")
            return base
        if changes["digital"] or changes["analog"]:
            st.caption("Edited: " + ", ".join(f"{p}.{k}" for p in changes for k in changes[p]))
    return hw
