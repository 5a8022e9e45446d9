"""Validate page and example results through Streamlit's AppTest: real app, real default model, real measurement
(256 tokens, 2 seeds), real DuckDB store in tmp."""
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def open_page(name, model=None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params.update({"model": model} if model else {})
    at.run()
    at.switch_page(f"pages/{name}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _wait(at, timeout=900):
    t0 = time.time()
    while True:
        job = at.session_state["val_job"]
        if not job.running:
            at.run()
            return job
        assert time.time() - t0 < timeout, "measurement did not finish"
        time.sleep(0.5)


def test_validate_measures_then_answers_from_the_store(store_env):
    """On the default model (64 experts), 2 seeds x 256 tokens."""
    from hetmoe_core.examples import stored_validations
    from hetmoe_core.store import Store
    n_experts = 64
    at = open_page("validate")
    assert at.title[0].value == "Validate the criteria"
    at.number_input(key="val_seeds").set_value(2)
    at.selectbox(key="val_tokens").set_value(256)
    at.selectbox(key="val_preset").set_value("paper-pcm-c2.5").run()
    at.button(key="val_run").click().run()
    job = _wait(at)
    assert job.status == "done", job.error
    v = job.result
    assert not v["cached"] and len(v["seeds"]) == 2 and v["tokens"] == 256 and len(v["experts"]) == n_experts
    assert not at.exception and any(s.value.startswith("Measured in") for s in at.success)
    charts = at.get("plotly_chart")
    assert len(charts) >= 5   # damage + MaxNNScore heatmaps, scatter, correlation forest, dense vs experts
    assert {m.label for m in at.metric} >= {"clean NLL (nats/token)", "all routed experts analog", "best criterion"}
    table = at.dataframe[-1].value                            # the correlation table names criteria as the charts do
    assert list(table.columns[:4]) == ["criterion", "spearman", "spearman_lo", "spearman_hi"]
    assert {"MaxNNScore", "Max neuron norm of gate_proj"} <= set(table.criterion)
    assert list(table.spearman) == sorted(table.spearman, reverse=True)
    kept = stored_validations(Store(store_env), v["model_fingerprint"])
    assert len(kept) == 1 and next(iter(kept.values()))["experts"] == v["experts"]
    # the same request again: from the store at once, the same numbers
    at.button(key="val_run").click().run()
    job2 = _wait(at, timeout=60)
    assert job2 is not job and job2.result["cached"]   # from the store, not measured again
    assert job2.result["experts"] == v["experts"]
    assert any(s.value.startswith("From the store") for s in at.success)
    # a fresh session shows the stored measurement without measuring
    at2 = open_page("validate")
    at2.number_input(key="val_seeds").set_value(2)
    at2.selectbox(key="val_tokens").set_value(256)
    at2.selectbox(key="val_preset").set_value("paper-pcm-c2.5").run()
    assert "val_job" not in at2.session_state and len(at2.get("plotly_chart")) >= 5


def test_validate_cancel_answers_and_enables_measure(store_env):
    """Cancel during a measurement: a toast at once, the job stops (status cancelled, nothing stored), the page
    says so and Measure is enabled again (it is disabled while the job runs)."""
    from hetmoe_core.examples import stored_validations
    from hetmoe_core.fingerprints import source_fingerprint
    from hetmoe_core.store import Store
    at = open_page("validate")
    at.number_input(key="val_seeds").set_value(3)
    at.selectbox(key="val_tokens").set_value(4096).run()
    at.button(key="val_run").click().run()
    job = at.session_state["val_job"]
    assert job.running and at.button(key="val_run").disabled, "Measure is disabled while the job runs"
    at.button(key="val_cancel").click().run()
    assert any(t.value.startswith("Cancelling") for t in at.toast)
    job = _wait(at, timeout=120)
    assert job.status == "cancelled" and job.result is None
    assert any(w.value.startswith("Cancelled") for w in at.warning) and not at.exception
    assert not at.button(key="val_run").disabled, "Measure is enabled again once the job has stopped"
    assert stored_validations(Store(store_env), source_fingerprint("default")) == {}


def test_results_first_shows_the_task_with_the_most_results(store_env, example_results):
    """One stray result of another task (a cancelled run at limit 1) must not hide the example curves."""
    from hetmoe_core.fingerprints import source_fingerprint
    from hetmoe_core.store import Store
    st = Store(example_results(store_env))
    st.put_result("stray", {"model_source": "default", "model_fingerprint": source_fingerprint("default"),
                            "strategy": "maxnn", "budget": 0.125, "preset": "paper-pcm-c1.5", "seed": 0,
                            "task": "hetmoe_cloze", "limit": 1.0, "scope": "layer", "backend": "fast"},
                  [{"task": "hetmoe_cloze", "metric": "acc", "value": 0.5, "stderr": 0.1, "seed": 0}])
    at = open_page("results")
    assert at.selectbox(key="res_task").value.startswith("hetmoe_ppl_")
    assert len(at.get("plotly_chart")) >= 2


def test_one_seed_says_its_spread_is_unknown(store_env):
    """With 1 seed the warning said "(± 0), not resolved from zero" and the caption "1 seeds × 256 tokens"."""
    at = open_page("validate")
    at.number_input(key="val_seeds").set_value(1)
    at.selectbox(key="val_tokens").set_value(256)
    at.selectbox(key="val_preset").set_value("paper-pcm-c2.5").run()
    assert any(c.value.startswith("Not stored yet: measuring 1 seed × 256 tokens") for c in at.caption)
    at.button(key="val_run").click().run()
    assert _wait(at).status == "done"
    warning = next(w.value for w in at.warning if "not resolved from zero" in w.value)
    assert "(± n/a with 1 seed), not resolved from zero" in warning and "Measure 2 or more seeds" in warning, warning
    assert any(c.value.startswith("1 seed × 256 tokens of ") for c in at.caption), [c.value for c in at.caption]


def test_a_reloaded_validate_page_shows_the_running_measurements_request(store_env):
    """A reload while a measurement runs: the form shows the job's preset, seeds and tokens (not the defaults
    5 seeds x 16,384 tokens), so the result it ends with matches the request the form shows."""
    at = open_page("validate")
    at.number_input(key="val_seeds").set_value(2)
    at.selectbox(key="val_tokens").set_value(256)
    at.selectbox(key="val_preset").set_value("paper-pcm-c2.5").run()
    at.button(key="val_run").click().run()
    job = at.session_state["val_job"]
    assert job.id in str(at.query_params["val_job"])
    again = AppTest.from_file(APP, default_timeout=180)          # the reloaded tab: same URL, new session
    again.query_params.update({"val_job": job.id})
    again.run()
    again.switch_page("pages/validate.py").run()
    assert not again.exception, [e.value for e in again.exception]
    assert again.session_state["val_job"] is job
    assert (again.selectbox(key="val_preset").value, again.number_input(key="val_seeds").value,
            again.selectbox(key="val_tokens").value) == ("paper-pcm-c2.5", 2, 256)
    if job.running:
        again.button(key="val_cancel").click().run()
    job.thread.join(120)
    assert job.status in ("cancelled", "done")


def test_out_of_range_or_huge_seeds_are_refused_with_measure_disabled(store_env):
    """Validate's Seeds box was an integer box with its own bounds: a typed "1e9" read as 1 (Streamlit's parseInt)
    and -3 stayed red while Measure used the old value. Now the Evaluate form's one line, and Measure is disabled."""
    at = open_page("validate")
    assert at.number_input(key="val_seeds").help == ("Noise seeds 0..N-1, the same for every expert.\n\n"
                                                      "Allowed: a whole number from 1 to 20.")
    for typed, shown in ((-3, "-3 is outside"), (1e9, "1,000,000,000 is outside"), (2.5, "2.5 is not a whole")):
        at.number_input(key="val_seeds").set_value(typed).run()
        assert [e.value for e in at.error] == [f"Seeds: {shown}{' the allowed range' if 'outside' in shown else ' number'}"
                                               "; type a whole number from 1 to 20."], [e.value for e in at.error]
        assert at.button(key="val_run").disabled
    at.number_input(key="val_seeds").set_value(3).run()
    assert not at.error and not at.button(key="val_run").disabled
