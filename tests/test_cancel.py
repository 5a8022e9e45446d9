"""Cancel stops a running evaluation / validation within one layer's forward: the dashboard's own background jobs
(jobs.Job, jobs.ValidationJob) on the real default model and a real DuckDB store in tmp, cancelled from this thread
while the job's thread is inside a forward pass. Bounds count the modules entered after the cancel, never
seconds (bench/bench_cancel.py measures the latency itself)."""
import threading
import time

import pytest
import torch

from hetmoe_core import jobs, ui


@pytest.fixture(scope="module")
def handle():
    h = ui.MODELS.hold(("default", "cpu", "float32"), "test_cancel")
    yield h
    ui.MODELS.release("test_cancel")


def _cancel_inside_forward(model, start, armed) -> tuple:
    """Start a job; once ``armed(job)`` holds, cancel it from this thread as soon as its thread enters decoder
    layer 0 of a forward. Returns (job, modules entered after the cancel, modules one forward enters): every
    decoder layer and the LM head are counted by a pre-hook registered before the job's own cancel checks, so an
    entry the cancel stops still counts."""
    inside, box, entered = threading.Event(), {}, []
    modules = [*model.get_decoder().layers, model.get_output_embeddings()]

    def hook(m, _a):
        entered.append(m)
        if m is modules[0] and "job" in box and armed(box["job"]) and not inside.is_set():
            inside.set()
    hooks = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        job = box["job"] = start()
        assert inside.wait(300), f"the job never reached a forward after arming (status {job.status}: {job.error})"
        before = len(entered)
        job.cancel.set()
        job.thread.join(300)
        assert not job.thread.is_alive(), "the job still runs 300 s after its cancel"
        return job, len(entered) - before, len(modules)
    finally:
        for h in hooks:
            h.remove()


def test_evaluate_cancel_stops_within_one_layer(handle, tmp_path):
    """Cancelled in the middle of a noisy task's forward: at most the module running then and the one whose check
    raises are entered after the cancel (before: the check ran once per full forward, so the rest of that forward
    ran, and the task's lm-eval bookkeeping and the next unit's noise programming ran unchecked: the next unit's
    forwards would enter more layers). Counted, not timed (bench/bench_cancel.py times the latency)."""
    from hetmoe_core.store import Store
    store = tmp_path / "r.duckdb"
    clean = {n: p.detach().clone() for n, p in handle.lm.model.named_parameters()}
    job, after, per_forward = _cancel_inside_forward(
        handle.lm.model,
        lambda: jobs.Job(handle, source="default", store=str(store), strategies=["maxnn"], budgets=[0.0, 0.25, 0.5],
                       presets=["paper-pcm-c1.5"], seeds=2, tasks=["hetmoe_cloze"], limit=4, batch_size=8,
                       backend="fast", scope="layer"),
        armed=lambda j: j.done >= 3)         # the ideal reference and two noisy results are stored
    assert job.status == "cancelled", job.error
    assert per_forward > 3 and after <= 2, f"{after} of the {per_forward} modules of a forward ran after the cancel"
    assert 3 <= len(job.results) < 7
    assert Store(store).counts()["runs"] == len(job.results)      # what finished stays stored, nothing else
    assert all(torch.equal(p, clean[n]) for n, p in handle.lm.model.named_parameters())   # restored bit for bit


def test_validate_cancel_stops_within_one_layer(handle, tmp_path):
    """Cancelled inside the noisy base pass: at most two modules entered after the cancel (before: the check ran
    once per pass, so the rest of the pass, LM head included, ran after the cancel)."""
    lm = handle.lm
    clean = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    job, after, per_forward = _cancel_inside_forward(
        lm.model, lambda: jobs.ValidationJob(handle, "paper-pcm-c1.5", 2, 1024, tmp_path / "v.duckdb"),
        armed=lambda j: j.done >= 1)         # the clean base pass is done: this is the noisy one
    assert job.status == "cancelled" and job.result is None, job.error
    assert per_forward > 3 and after <= 2, f"{after} of the {per_forward} modules of a forward ran after the cancel"
    assert all(torch.equal(p, clean[n]) for n, p in lm.model.named_parameters())   # restored bit for bit


def test_evaluate_job_names_the_measurement_it_makes_first(handle, tmp_path, example_results):
    """An Oracle sweep whose damage under the preset is not stored says from its first poll that it measures it
    (before: "0 / ? results · loading the model and the tasks" for the minutes the measurement took); with the
    measurement stored (the example results) it says nothing of the kind."""
    kw = dict(source="default", strategies=["oracle"], budgets=[0.25], presets=["paper-pcm-c1.5"], seeds=1,
              tasks=["hetmoe_cloze"], limit=2, batch_size=8, backend="fast", scope="layer")
    job = jobs.Job(handle, store=str(tmp_path / "empty.duckdb"), **kw)
    step, total = job.step, job.total
    job.cancel.set()
    job.thread.join(300)
    assert total == 2           # the ideal reference and one noisy result, known before any result
    assert step == ("measuring per-expert damage under paper-pcm-c1.5 for Oracle (measured damage): 4 layers × 16 "
                    "experts, each alone on analog, × 5 seeds on 16,384 calibration tokens (minutes on a CPU; "
                    "stored, so later runs skip it)")
    example_results(tmp_path / "ex.duckdb")
    job = jobs.Job(handle, store=str(tmp_path / "ex.duckdb"), **kw)
    step = job.step
    job.cancel.set()
    job.thread.join(300)
    assert step is None
    kw["strategies"] = ["local_error"]      # never stored: always measured, on one calibration pass per seed
    job = jobs.Job(handle, store=str(tmp_path / "ex.duckdb"), **kw)
    step = job.step
    job.cancel.set()
    job.thread.join(300)
    assert step == ("measuring Local output error under paper-pcm-c1.5: 4 layers × 16 experts × 3 seeds on 4,096 "
                    "calibration tokens")


def test_evaluate_job_says_it_waits_for_another_run_on_the_model(handle, tmp_path):
    """A second session's Run on the same model waits for the model lock; its progress says so (before: "loading
    the model and the tasks" for as long as the other run took), and a Cancel while waiting ends it."""
    kw = dict(source="default", strategies=["maxnn"], budgets=[0.25], presets=["paper-pcm-c1.5"], seeds=1,
              tasks=["hetmoe_cloze"], limit=2, batch_size=8, backend="fast", scope="layer")
    with handle.lock:                     # the other session's run
        job = jobs.Job(handle, store=str(tmp_path / "s.duckdb"), **kw)
        deadline = time.time() + 30
        while not job.waiting and time.time() < deadline:
            time.sleep(0.05)
        assert job.waiting and job.running and job.done == 0
        job.cancel.set()
        job.thread.join(30)
    assert not job.running and job.status == "cancelled" and not job.waiting and job.results == []


def test_measurement_step_names_the_edited_preset(handle, tmp_path):
    """The oracle's progress line names the noise as the plan line does: "<preset> (edited: adc_bits)"."""
    from hetmoe_core.evaluate import plan
    from hetmoe_core.store import Store
    specs = plan("default", strategies=["oracle"], budgets=[0.25], presets=["paper-dac-adc-8bit"], seeds=1,
                 tasks=["hetmoe_cloze"], limit=2, batch_size=8, backend="fast", scope="layer",
                 preset_overrides={"adc_bits": 6}, fingerprint=handle.lm.fingerprint)
    step = jobs.measurement_step(handle.lm, specs, Store(tmp_path / "s.duckdb"))
    assert step.startswith("measuring per-expert damage under paper-dac-adc-8bit (edited: adc_bits) for Oracle"), step


def test_evaluate_job_progress_counts_the_measurement_forwards(tmp_path):
    """While a Local output error sweep measures before its first result, the job's progress line counts the
    measurement's forwards ("measuring … : 3 / 10 forwards"), read inside the measurement's own forwards (before:
    the plan's step text, no count, for all that time)."""
    owner = "test_cancel_tiny"
    h = ui.MODELS.hold(("tiny:olmoe", "cpu", "float32"), owner)
    seen = []
    hook = h.lm.model.get_decoder().layers[0].register_forward_pre_hook(
        lambda *_: seen.append(getattr(box.get("job"), "step", None)))
    box = {}
    try:
        box["job"] = job = jobs.Job(h, source="tiny:olmoe", store=str(tmp_path / "s.duckdb"),
                                    strategies=["local_error"], budgets=[0.25], presets=["paper-pcm-c1.5"], seeds=1,
                                    tasks=["paper_arc_easy"], limit=1, batch_size=8, backend="fast", scope="layer")
        job.thread.join(300)
    finally:
        hook.remove()
        ui.MODELS.release(owner)
    assert job.status == "done", job.error
    counted = [s for s in seen if s and s.endswith(" forwards")]
    assert counted, seen[:3]
    done, total = counted[-1].removeprefix("measuring Local output error under paper-pcm-c1.5: ").split(" forwards")[
        0].split(" / ")
    assert done == total == "13"      # 1 calibration forward + 2 layers x 3 seeds x (clean, noisy)


def test_validation_job_waiting_counts_in_its_own_unit(handle, tmp_path):
    """A Validate measurement queued behind an evaluation said "0 / ? results · waiting…": it counts forwards, and
    their number is unknown until it measures; an evaluation keeps its results count. A sweep cancelled before any
    result finished said "Cancelled after 0 results (those are stored)"."""
    from hetmoe_core.evaluate import cancelled_line
    with handle.lock:                     # the evaluation that holds the model
        job = jobs.ValidationJob(handle, "paper-pcm-c1.5", 1, 256, str(tmp_path / "s.duckdb"))
        deadline = time.time() + 30
        while not job.waiting and time.time() < deadline:
            time.sleep(0.05)
        text = jobs.waiting_text(job)
        job.total, job.unit = 42, "results"          # as an evaluation's Job counts
        counted = jobs.waiting_text(job)
        job.cancel.set()
        job.thread.join(30)
    assert text.startswith("waiting for another run on this model to finish · ") and "results" not in text, text
    assert counted.startswith("0 / 42 results · waiting for another run"), counted
    assert cancelled_line(0) == "Cancelled after 0 results: none had finished, so nothing was stored."
    assert cancelled_line(1) == "Cancelled after 1 result (those are stored)."
