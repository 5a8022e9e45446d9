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
    # Placement's measured strategies place by it, though it is not the 5 seeds x 16,384 tokens Evaluate asks
    from hetmoe_core.validation import stored_strategy_scores
    placed, scores = stored_strategy_scores("default", "paper-pcm-c2.5", store=Store(store_env))
    assert (len(placed.seeds), placed.tokens) == (2, 256) and set(scores) == {"oracle", "local_error"}
    assert [list(x) for x in scores["oracle"]] == [list(x) for x in placed.only_this()]
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


def test_measurements_stored_by_the_command_line_are_found_whatever_seeds_and_tokens(store_env, capsys):
    """README's `validate … --seeds 5 --tokens 2048` stored a measurement the dashboard never found: the Validate page
    said "Not stored yet … (stored results of other presets: …)" and offered no 2048 tokens, Placement's oracle said
    none was stored. Here two CLI measurements (2 seeds x 256 and 1 seed x 128 tokens: 128 is no offered choice) of a
    tiny model."""
    from hetmoe_core.cli import main
    from hetmoe_core.fingerprints import source_fingerprint
    from hetmoe_core.store import Store
    from hetmoe_core.validation import stored_measurements
    src, preset = "tiny:qwen3_moe", "paper-pcm-c2.5"
    for seeds, tokens in ((1, 128), (2, 256)):
        assert main(["validate", src, "--preset", preset, "--seeds", str(seeds), "--tokens", str(tokens),
                     "--store", str(store_env), "--json"]) == 0
    capsys.readouterr()
    found = stored_measurements(Store(store_env), source_fingerprint(src), preset)
    assert [(len(d["seeds"]), d["tokens"]) for d in found] == [(2, 256), (1, 128)]      # largest first
    assert stored_measurements(Store(store_env), source_fingerprint(src), "paper-pcm-c1.5") == []
    big = found[0]

    at = AppTest.from_file(APP, default_timeout=180)      # opened on the page: a link to it with the tiny model
    at.query_params.update({"model": src})
    at.switch_page("pages/validate.py").run()
    assert at.session_state["source"] == src
    at.selectbox(key="val_preset").set_value(preset).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not any(c.value.startswith("Not stored yet") for c in at.caption)
    assert not any("Press **Measure**" in i.value for i in at.info)
    # the largest stored measurement is opened: the form holds its request, the cards its numbers
    assert (at.number_input(key="val_seeds").value, at.selectbox(key="val_tokens").value) == (2, 256)
    assert at.selectbox(key="val_tokens").options == ["128", "256", "1,024", "4,096", "16,384", "65,536"]
    assert at.selectbox(key="val_stored").options == ["2 seeds × 256 tokens", "1 seed × 128 tokens"]
    assert next(m.value for m in at.metric if m.label == "clean NLL (nats/token)") == f"{big['clean_nll']:.4f}"
    assert any(c.value.startswith("2 seeds × 256 tokens of ") for c in at.caption), [c.value for c in at.caption]
    # the other stored combination, chosen from the list
    at.selectbox(key="val_stored").set_value((1, 128)).run()
    assert (at.number_input(key="val_seeds").value, at.selectbox(key="val_tokens").value) == (1, 128)
    assert any(c.value.startswith("1 seed × 128 tokens of ") for c in at.caption)
    assert not any(c.value.startswith("Not stored yet") for c in at.caption)

    # Placement: a link's strategy=oracle places by the stored measurement of the preset, and says which one
    pl = AppTest.from_file(APP, default_timeout=180)
    pl.query_params.update({"model": src, "preset": preset, "strategy": "oracle"})
    pl.switch_page("pages/placement.py").run()
    assert not pl.exception, [e.value for e in pl.exception]
    assert not any("none of this model is stored" in w.value for w in pl.warning), [w.value for w in pl.warning]
    assert pl.selectbox(key="strategy").value == "oracle"
    line = next(c.value for c in pl.caption if "by the damage measured under" in c.value)
    assert f"**{preset}**" in line and "2 seeds × 256 tokens" in line, line


def test_time_estimate_times_a_forward_of_the_measurements_size(store_env):
    """1 seed x 256 tokens said "about 6 min here at most (137 forwards × 2.4 s)" — the time of a forward of 8,192
    tokens — for a run of 12 s. The forward is now timed at the measurement's own size (256 tokens: one sequence;
    16,384: 32 sequences = 8,192 per forward), and the estimate bounds a real run from above."""
    import re
    at = open_page("validate")
    at.selectbox(key="val_preset").set_value("paper-pcm-c2.5").run()

    def estimate(seeds, tokens):
        at.number_input(key="val_seeds").set_value(seeds)
        at.selectbox(key="val_tokens").set_value(tokens).run()
        text = next(c.value for c in at.caption if c.value.startswith("Not stored yet"))
        m = re.search(r"about ([\d.]+) (s|min|h) here at most \(([\d,]+) forwards of ([\d,]+) tokens × ([\d.e-]+) s, "
                      r"one forward of that size timed on this machine; ([\d,]+) forwards and 5 s more for the criteria", text)
        assert m, text
        num = lambda g: float(m.group(g).replace(",", ""))          # noqa: E731
        return {"seconds": num(1) * {"s": 1, "min": 60, "h": 3600}[m.group(2)], "forwards": num(3),
                "forward_tokens": num(4), "forward_s": num(5), "extra": num(6)}

    big, small = estimate(5, 16384), estimate(1, 256)
    assert (big["forwards"], big["forward_tokens"], big["extra"]) == (1370, 8192, 274)
    assert (small["forwards"], small["forward_tokens"], small["extra"]) == (137, 256, 137)
    # 32x the tokens per forward: the per-forward time grows with them (measured ~33x; at least 8x on a busy CPU)
    assert big["forward_s"] > 8 * small["forward_s"], (big, small)
    assert small["seconds"] < 120, small          # was "about 6 min"
    at.button(key="val_run").click().run()
    job = _wait(at)
    assert job.status == "done" and not job.result["cached"]
    assert job.elapsed <= small["seconds"] + 1, (job.elapsed, small)     # an upper bound ("about N s" is rounded)


def test_the_pages_choice_among_stored_measurements():
    """validation.stored_requests / token_choices / shown_measurement: what the Validate page lists, offers and shows
    (stored_measurements' list is largest first)."""
    from hetmoe_core.validation import shown_measurement, stored_requests, token_choices
    stored = [dict(preset="paper-pcm-c2.5", seeds=[0, 1, 2, 3, 4], tokens=2048, tag="a"),
              dict(preset="paper-pcm-c1.5", seeds=2, tokens=256, tag="b"),
              dict(preset="paper-pcm-c2.5", seeds=[0], tokens=2048, tag="c"),
              dict(preset="paper-pcm-c2.5", seeds=1, tokens=2048, tag="d")]          # same request as "c", older
    assert stored_requests(stored, "paper-pcm-c2.5") == [(5, 2048), (1, 2048)]
    assert stored_requests(stored, "paper-pcm-c1.5") == [(2, 256)] and stored_requests(stored, "x") == []
    assert token_choices(stored) == [256, 1024, 2048, 4096, 16384, 65536]
    assert token_choices([], 300) == [256, 300, 1024, 4096, 16384, 65536]
    v, exact = shown_measurement(stored, "paper-pcm-c2.5", 1, 2048)
    assert (v["tag"], exact) == ("c", True)
    v, exact = shown_measurement(stored, "paper-pcm-c2.5", 3, 4096)      # not stored: the preset's largest
    assert (v["tag"], exact) == ("a", False)
    assert shown_measurement(stored, "aihwkit-pcm-drift", 5, 16384) == (None, False)
