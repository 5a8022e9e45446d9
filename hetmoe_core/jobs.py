"""Background jobs of the dashboard's pages: an evaluation (``Job``) and a sensitivity measurement
(``ValidationJob``) in a thread each, with progress, cancel and a final status, the progress panel that polls them
(``job_progress``) and the URL link that finds a page's job again after a reload (``page_job``).

A job's thread never calls Streamlit and opens its own store connections; it holds its model in the dashboard's
model cache (``ui.MODELS``) until it ends. Importing this module imports streamlit.
"""
from __future__ import annotations

import contextlib
import secrets
import threading
import time

import streamlit as st

from .modelcache import ModelHandle
from .ui import MODELS
_JOBS: dict = {}
"""Recent background jobs by (session-state key, job id): a reloaded page is a new session, and finds its job again
through the id its URL carries (``page_job``)."""


def page_job(key: str):
    """The page's background job: this session's ``st.session_state[key]``, or, after a reload of the page (a new
    session), the job whose id the URL names (``?<key>=<id>``), so a running job never drops out of view with
    its Cancel button. Writes the current job's id into the URL. Returns the ``_BackgroundJob`` or None."""
    ss = st.session_state
    job = ss.get(key)
    if job is None and st.query_params.get(key):
        job = _JOBS.get((key, st.query_params[key]))
        if job is not None:
            ss[key] = job
        else:                    # a stale or mistyped link: say so once, keep the rest of the link
            st.warning(unknown_job(key, st.query_params[key]))
            del st.query_params[key]
    if job is not None and st.query_params.get(key) != job.id:
        _JOBS[(key, job.id)] = job
        st.query_params[key] = job.id
    now = time.time()
    for k, j in list(_JOBS.items()):   # keep running jobs and those ended within the hour
        if not j.running and now - (j.finished or now) > 3600:
            del _JOBS[k]
    return job


JOB_WORDS = {"eval_job": ("evaluation", "Run", "the Results page"), "val_job": ("measurement", "Measure", "this page")}
"""What a page's job is called, the button that starts one and where its stored outcome shows (``unknown_job``)."""


def unknown_job(key: str, job_id: str) -> str:
    """The one line a page shows for a link whose ``?<key>=<id>`` names no job this server knows (mistyped, or
    ended over an hour ago, or the server restarted since): what finished is stored; start it again."""
    from .models import shorten
    what, button, where = JOB_WORDS.get(key, ("job", "its button", "this page"))
    return (f"The link's {key}={shorten(job_id, 40)!r} names no {what} on this server (a finished one is kept for an "
            f"hour; a restarted server forgets them). What it finished is stored and {where} shows it; press "
            f"**{button}** to start a new {what}.")


def recovered_job(key: str):
    """The job a reloaded page finds through its URL (``page_job``), returned only on the run that brings it into
    this new session (else None): the page refills its form from the job's request before drawing the widgets, so
    the form shows what is running rather than the defaults."""
    if key in st.session_state or not st.query_params.get(key):
        return None
    return page_job(key)


def restore_form(key: str) -> None:
    """After a reload (``recovered_job``), put the running job's request into the page's widgets
    (``job.form_values()``) before they are drawn, so the form and the result shown agree; else nothing."""
    if (back := recovered_job(key)) is not None:
        st.session_state.update(back.form_values())


class _BackgroundJob:
    """A thread doing one long piece of work for a page, with progress, cancel and a final status.

    Lives in st.session_state; the page polls it from an ``st.fragment(run_every=...)``. The thread never calls
    Streamlit and opens its own store connections. The job holds its model in the cache until it ends, so no other
    session's load can release it meanwhile. Subclasses fill :meth:`_work` (status "done" unless it returns another).
    """
    name = "hetmoe-job"

    def __init__(self, handle: ModelHandle):
        self.handle = MODELS.hold(handle.key, self)    # the same entry, or reloaded if it left the cache since
        self.cancel = threading.Event()
        self.cancelled_at: float | None = None
        self.done, self.total = 0, 0
        self.status, self.error = "running", None
        self.waiting = False   # True while another job on this model holds its lock (the progress text says so)
        self.started = time.time()
        self.finished: float | None = None
        self.id = secrets.token_hex(4)   # names the job in its page's URL (page_job)
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def _work(self) -> str | None:
        raise NotImplementedError

    def form_values(self) -> dict:
        """The page's widget values (by widget key) of this job's request (``restore_form``)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _model_lock(self):
        """The model's lock (``ModelHandle.lock``: one job at a time programs noise into its weights); while
        another session's job holds it, ``waiting`` is True. Yields False when cancelled before it got the lock."""
        lock = self.handle.lock
        if not lock.acquire(blocking=False):
            self.waiting = True
            while not lock.acquire(timeout=0.2):
                if self.cancel.is_set():
                    self.waiting = False
                    yield False
                    return
            self.waiting = False
        try:
            yield True
        finally:
            lock.release()

    def _run(self) -> None:
        try:
            status = self._work()
            self.status = "cancelled" if self.cancel.is_set() else (status or "done")
        except ValueError as e:   # bad input; evaluate.Cancelled is not a ValueError and lands below
            self.status, self.error = ("cancelled", None) if self.cancel.is_set() else ("error", str(e))
        except Exception as e:   # shown in the page as a message, never as a traceback
            self.status, self.error = ("cancelled", None) if self.cancel.is_set() else \
                ("error", f"{type(e).__name__}: {e}")
        finally:
            MODELS.release(self)
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
        return min(1.0, self.done / self.total) if self.total else 0.0


def job_progress(key: str, running_text, ended, *, cancel_key: str, cancel_note: str, poll_s: float = 0.5,
                 wait_s: float = 1.0) -> None:
    """The progress panel of the background job kept in ``st.session_state[key]`` (a ``_BackgroundJob``).

    An ``st.fragment`` that reruns alone every ``poll_s`` seconds while the job runs: a progress bar captioned
    ``running_text(job)`` and a Cancel button (widget key ``cancel_key``) whose click sets the job's cancel event
    and shows the toast ``cancel_note`` at once. The job then stops within one layer's forward (the core's cancel
    checks); meanwhile the panel waits for its thread up to ``wait_s`` seconds per run instead of the next poll, so
    the outcome shows as soon as it stops (so the answer to Cancel does not wait for a poll, and the poll can stay
    slow enough to cost the computation nothing: every fragment run is a script run, which Streamlit ends with a
    full garbage collection under the GIL). Once the job has ended, ``ended(job)`` draws its outcome and the whole
    page reruns once: buttons disabled during the run are enabled again and the polling stops."""
    ss = st.session_state
    job = ss.get(key)

    def cancel(j):
        j.cancel.set()
        j.cancelled_at = time.time()
        st.toast(cancel_note, icon="⏹️")

    @st.fragment(run_every=poll_s if job is not None and job.running else None)
    def panel():
        j = ss.get(key)
        if j is None:
            return
        if j.running and j.cancel.is_set():
            j.thread.join(wait_s)
        if j.running:
            text = waiting_text(j) or running_text(j)
            if j.cancel.is_set():
                st.progress(j.fraction, text=f"Cancelling … {text}")
            else:
                st.progress(j.fraction, text=text)
                st.button("Cancel", key=cancel_key, on_click=cancel, args=(j,))
            return
        if ss.get(f"_{key}_seen") is not j:      # the job just ended: rerun the whole page once, which draws
            ss[f"_{key}_seen"] = j                # the outcome (drawn here too, it would show twice meanwhile)
            st.rerun(scope="app")
        ended(j)
    panel()


def waiting_text(job) -> str | None:
    """A job's progress line while it waits for another run on its model ("waiting for another run on this model to
    finish") or runs a long step before its first result (``Job.step``), counted in the job's own unit
    (``job.unit``: results, or a measurement's forwards) once its total is known; None otherwise (the page's own
    line)."""
    step = "waiting for another run on this model to finish" if job.waiting else getattr(job, "step", None)
    if not step:
        return None
    count = f"{job.done:,} / {job.total:,} {job.unit} · " if job.total else ""
    return f"{count}{step} · {job.elapsed:.0f} s"


class Job(_BackgroundJob):
    """A background evaluation: ``evaluate.evaluate_many`` on the held model, one progress step per result, each
    result written to the store as it is done (what the page shows as done is stored; a cancel has nothing to write)."""
    name = "hetmoe-eval"
    unit = "results"

    def __init__(self, handle: ModelHandle, **kwargs):
        self.kwargs, self.results = kwargs, []
        total, self.step = self._planned(handle)
        super().__init__(handle)
        self.total = self.total or total    # "0 / 42 results" from the first poll, not "0 / ?"

    def _planned(self, handle: ModelHandle) -> tuple[int, str | None]:
        """(results in the sweep, ``measurement_step`` of its plan), before the thread starts, so the first poll
        already says what the job does; (0, None) when the request is bad (the thread reports that error)."""
        from .evaluate import plan
        from .store import Store
        kw = {k: v for k, v in self.kwargs.items() if k not in ("source", "store", "calibration")}
        try:
            specs = plan(self.kwargs.get("source", "default"), fingerprint=handle.lm.fingerprint, **kw)
            return len(specs), measurement_step(handle.lm, specs, Store(self.kwargs.get("store")),
                                                self.kwargs.get("calibration"))
        except (ValueError, RuntimeError, OSError):
            return 0, None

    def form_values(self) -> dict:
        """The Evaluate page's widget values (by widget key) of this job's request: noise preset and its edited
        parameters (``nz_<preset>_<name>``; 0 where an optional parameter is None, as the widget shows it),
        strategies, budgets in percent, tasks, seeds, limit (0 = all), backend, batch size, and the Placement
        page's scope and dense-module switches it used."""
        from .noise import field_docs
        from .placement import percent_text
        kw, docs = self.kwargs, field_docs()
        preset = kw["presets"][0]
        form = {"preset": preset, "ev_strategies": list(kw["strategies"]), "ev_budgets": percent_text(kw["budgets"]),
                "ev_tasks": list(kw["tasks"]), "ev_seeds": float(kw["seeds"]), "ev_limit": float(kw["limit"] or 0),
                "ev_backend": kw["backend"], "ev_batch": float(kw["batch_size"]), "scope": kw["scope"],
                **{f"dense_{k}": bool(v) for k, v in (kw.get("dense") or {}).items()}}
        for name, v in (kw.get("preset_overrides") or {}).items():
            number = isinstance(docs[name]["allowed"][0], (int, float)) and not isinstance(v, bool)
            form[f"nz_{preset}_{name}"] = float(v or 0) if number else v   # the page's number boxes are float boxes
        return form

    def _progress(self, done: int, total: int, result: dict) -> None:
        self.done, self.total = done, total
        self.results.append(result)
        if not result.get("cached"):    # the first computed result: any measurement before it is done
            self.step = None

    def _measuring(self, line: str, done: int, total: int) -> None:
        """A measured strategy's measurement moved on: the progress names it with its count
        (``evaluate.measurement_line``: "measuring expert damage under … : 37 / 1,370 forwards")."""
        self.step = line

    def _work(self) -> None:
        from .evaluate import evaluate_many
        with self._model_lock() as held:
            if held:
                evaluate_many(lm=self.handle.lm, progress=self._progress, cancel=self.cancel, write_every_s=0,
                              measure_progress=self._measuring, **self.kwargs)


def measurement_step(lm, specs, store, calibration: dict | None = None) -> str | None:
    """What an evaluation measures before its first noisy result, for its progress text, or None when nothing:
    the per-expert damage the oracle places by (``sensitivity.measured_scores``: minutes on a CPU) under each
    noise the plan's missing results need that the store does not hold (``validation.stored_validation``, the
    request evaluate makes), and the Local Output Error (one calibration pass per seed, never stored).

    lm: the loaded model (its anatomy sizes the step); specs: ``evaluate.plan``'s RunSpecs; store: a Store;
    calibration: the calibration text evaluate gets (None: the model's default). Raises ValueError for bad specs."""
    from .criteria import LOCAL_ERROR_SEEDS, LOCAL_ERROR_TOKENS
    from .noise import NoiseConfig, preset_label
    from .sensitivity import ORACLE_SEEDS, ORACLE_TOKENS
    from .strategies import STRATEGIES, label
    from .validation import stored_validation
    have = store.existing_keys(s.key for s in specs)
    need: dict = {}
    for s in specs:
        if s.key not in have and not s.ideal and STRATEGIES[s.strategy].needs == "measurement":
            need.setdefault((s.strategy, s.noise), s)
    ne = [m.num_experts for m in lm.anatomy.moe_layers]
    size = f"{len(ne)} layers × {ne[0]} experts" if len(set(ne)) == 1 else f"{sum(ne)} experts in {len(ne)} layers"
    steps = []
    for (strategy, noise), s in need.items():
        if strategy == "oracle":
            if stored_validation(lm.source, NoiseConfig(**dict(noise)), texts=calibration, store=store,
                                 dtype=s.dtype, device=s.device) is not None:
                continue
            steps.append(f"measuring per-expert damage under {preset_label(s.preset, noise)} for {label(strategy)}: {size}, each alone "
                         f"on analog, × {ORACLE_SEEDS} seeds on {ORACLE_TOKENS:,} calibration tokens (minutes on "
                         "a CPU; stored, so later runs skip it)")
        else:
            steps.append(f"measuring {label(strategy)} under {preset_label(s.preset, noise)}: {size} × {len(LOCAL_ERROR_SEEDS)} seeds on "
                         f"{LOCAL_ERROR_TOKENS:,} calibration tokens")
    return "; then ".join(steps) or None


class ValidationJob(_BackgroundJob):
    """A background ``sensitivity.validate`` (measured expert damage) with progress and cancel, like Job.

    The thread takes the model lock (noise is programmed into the weights while it measures). ``result`` is
    Validation.to_dict() once done; it is also kept in the store (examples.put_validation) for the next visit."""
    name = "hetmoe-validate"
    unit = "forwards"   # sensitivity.measure's progress counts batched forwards (measurement_forwards)

    def __init__(self, handle: ModelHandle, preset: str, seeds: int, tokens: int, store_path=None):
        self.preset, self.seeds, self.tokens, self.store_path, self.result = preset, seeds, tokens, store_path, None
        super().__init__(handle)

    def form_values(self) -> dict:
        """The Validate page's widget values of this request: noise preset, seeds, calibration tokens."""
        return {"val_preset": self.preset, "val_seeds": float(self.seeds), "val_tokens": int(self.tokens)}

    def _progress(self, done, total=None, *_):
        self.done, self.total = int(done), int(total or 0)

    def _work(self) -> str | None:
        from .examples import put_validation
        from .sensitivity import validate
        from .store import Store
        store = Store(self.store_path)
        with self._model_lock() as held:   # texts=None: the model's default calibration, named in the result
            v = validate(self.handle.lm, self.preset, seeds=self.seeds, texts=None, tokens=self.tokens,
                         store=store, progress=self._progress, cancel=self.cancel.is_set) if held else None
        if self.cancel.is_set() or v is None:
            return "cancelled"
        self.result = v.to_dict()
        put_validation(store, self.result)
