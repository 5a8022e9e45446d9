"""Dashboard pages through Streamlit's AppTest: real app script, real default model, real DuckDB store in tmp."""
import io
import time
import zipfile
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def app(query=None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(query or {})
    return at.run()


def page(at, name) -> AppTest:
    at.switch_page(f"pages/{name}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def keys(node, out=None) -> set:
    """User keys of every element rendered in this run (sidebar included)."""
    out = set() if out is None else out
    if isinstance(getattr(node, "key", None), str):
        out.add(node.key)
    for child in (getattr(node, "children", None) or {}).values():
        keys(child, out)
    return out


def metric(at, label):
    return next(m.value for m in at.metric if m.label == label)


def eval_task() -> str:
    from hetmoe_core.evaluate import task_aliases
    local = task_aliases()["local"]
    return "hetmoe_cloze" if "hetmoe_cloze" in local else (local[0] if local else "paper_boolq")


def test_every_page_renders_with_its_widgets(store_env):
    at = app()
    assert not at.exception and at.title[0].value == "Model anatomy"
    assert metric(at, "Top-k") and at.sidebar.radio(key="source_kind").value == "Default"
    expected = {"learn": ("toy_c",), "sensitivity": ("sens_layer", "sens_expert"),
                "placement": ("budget_pct", "strategy", "scope", "strategy_b"),
                "evaluate": ("preset", "ev_strategies", "ev_budgets", "ev_tasks", "ev_seeds", "ev_limit", "ev_backend"),
                "results": (), "share": ()}
    for name, want in expected.items():
        page(at, name)
        assert not at.error, (name, [e.value for e in at.error])
        missing = set(want) - keys(at._tree)
        assert not missing, (name, missing)
    page(at, "sensitivity")
    charts = at.get("plotly_chart")
    assert len(charts) >= 5          # MaxNNScore, 3 projections, router norm (+ density, scatter, histogram)


def test_budget_slider_changes_digital_share_and_url(store_env):
    at = page(app(), "placement")
    assert at.slider(key="budget_pct").value == 12.5
    shares = {}
    for b in (0.0, 25.0, 100.0):
        at.slider(key="budget_pct").set_value(b).run()
        assert not at.exception
        shares[b] = float(metric(at, "Digital parameter share").rstrip("%"))
        assert at.query_params["budget"] == f"{b / 100:g}"
    assert shares[0.0] < shares[25.0] < shares[100.0]
    n_experts = sum(m.num_experts for m in _anatomy().moe_layers)
    assert metric(at, "Digital routed experts") == f"{n_experts} / {n_experts}"
    # state is shared across pages: the Evaluate page proposes the budget set here
    page(at, "evaluate")
    assert at.text_input(key="ev_budgets").value == "100"


def _anatomy():
    from hetmoe_core.models import load_model
    return load_model("default").anatomy


def test_link_reproduces_view(store_env):
    at = page(app({"strategy": "router_norm", "budget": "0.25", "preset": "paper-pcm-c2.5"}), "placement")
    assert at.slider(key="budget_pct").value == 25.0
    assert at.selectbox(key="strategy").value == "router_norm"
    page(at, "evaluate")
    assert at.selectbox(key="preset").value == "paper-pcm-c2.5"


def test_bad_model_source_is_a_friendly_error(store_env):
    at = app({"model": "/no/such/folder"})      # a link's bad model: one sidebar line, the default model instead
    assert not at.exception and at.sidebar.radio(key="source_kind").value == "Default"
    assert "model='/no/such/folder' (/no/such/folder is not a folder with a model" in at.sidebar.warning[0].value
    at.sidebar.radio(key="source_kind").set_value("Local folder").run().run()   # AppTest draws the box a run later
    at.sidebar.text_input(key="source_text").set_value("/no/such/folder").run()
    assert not at.exception
    assert at.error and "Could not load model" in at.error[0].value and "sidebar" in at.error[0].value


def test_learn_toy_error_grows_with_maxnn(store_env):
    at = page(app(), "learn")
    r0 = float(metric(at, "Correlation (log score, log error)"))
    assert r0 > 0.5                       # the paper's point: larger max neuron norm, larger output error
    at.slider(key="toy_c").set_value(0.0).run()
    assert not at.exception and any("c = 0" in i.value for i in at.info)


def _wait(at, timeout=150):
    t0 = time.time()
    while True:
        job = at.session_state["eval_job"]
        if not job.running:
            at.run()                      # the page's last rerun after the job ended
            return job
        assert time.time() - t0 < timeout, "evaluation did not finish"
        time.sleep(0.5)
        at.run()


def test_run_stores_rows_and_rerun_is_a_cache_hit(store_env):
    from hetmoe_core.store import Store
    at = page(app(), "evaluate")
    at.multiselect(key="ev_tasks").set_value([eval_task()])
    at.number_input(key="ev_limit").set_value(4)
    at.run()
    assert any("0 cached" in m.value for m in at.markdown)
    at.button(key="ev_run").click().run()
    job = _wait(at)
    assert job.status == "done", job.error
    assert len(job.results) == 2 and not any(r["cached"] for r in job.results)   # ideal + one noisy result
    assert Store(store_env).counts()["runs"] == 2
    assert any(s.value.startswith("Done: 2 results") for s in at.success)
    # the same configuration again: answered from the store, shown as cached before and after Run
    assert any("2 cached" in m.value for m in at.markdown)
    at.button(key="ev_run").click().run()
    job2 = _wait(at, timeout=30)
    assert job2 is not job and all(r["cached"] for r in job2.results)   # from the store (speed: bench/bench_cli.py)
    assert [r["metrics"] for r in job2.results] == [r["metrics"] for r in job.results]
    assert Store(store_env).counts()["runs"] == 2
    # Results page draws it; Share page exports it and imports a snapshot into another store
    page(at, "results")
    assert at.get("plotly_chart") and [b.label for b in at.get("download_button")] == ["CSV", "Parquet"]


def test_share_imports_a_valid_snapshot_and_rejects_garbage(store_env, tmp_path, monkeypatch):
    from hetmoe_core.snapshot import export_snapshot
    from hetmoe_core.store import Store
    src = Store(tmp_path / "src.duckdb")
    src.put_result("k1", {"model_source": "default", "strategy": "maxnn", "budget": 0.125, "preset": "ideal",
                          "seed": 0, "task": "t", "scope": "layer", "backend": "fast"},
                   [{"task": "t", "metric": "acc", "value": 0.5, "stderr": 0.1, "seed": 0}])
    export_snapshot(src, tmp_path / "snap.zip")
    at = page(app(), "share")
    at.file_uploader(key="share_upload").set_value(("bad.zip", b"not a zip", "application/zip")).run()
    assert not at.exception and at.error[0].value == "bad.zip is not a hetmoe snapshot (not a zip archive)"
    assert Store(store_env).counts()["runs"] == 0
    at.file_uploader(key="share_upload").set_value(
        ("snap.zip", (tmp_path / "snap.zip").read_bytes(), "application/zip")).run()
    assert not at.error and any("Valid snapshot" in s.value for s in at.success)
    assert not at.get("download_button")                      # the HTML report is built on request only
    at.button(key="share_build_upload_report_btn").click().run()
    assert not at.exception and len(at.get("download_button")) == 1
    at.button(key="share_import").click().run()
    imported = [s.value for s in at.success if "Imported" in s.value]
    assert imported and imported[0].startswith("Imported 1 result and 1 metric value") and "{" not in imported[0]
    assert Store(store_env).counts()["runs"] == 1
    # a zip with a path-escaping member is refused and the store stays as it is
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../evil.py", "print('x')")
    at.file_uploader(key="share_upload").set_value(("evil.zip", buf.getvalue(), "application/zip")).run()
    assert "not a valid hetmoe snapshot" in at.error[0].value and Store(store_env).counts()["runs"] == 1
    assert "upload.zip" not in at.error[0].value   # no server temp path in a message


def sweep_of_ten() -> AppTest:
    """The Evaluate page set for a 10-result sweep (ideal + budgets 0, 25, 50 % x 3 seeds, one task, limit 4)."""
    at = page(app(), "evaluate")
    at.multiselect(key="ev_tasks").set_value([eval_task()])
    at.number_input(key="ev_limit").set_value(4)
    at.number_input(key="ev_seeds").set_value(3)
    return at.text_input(key="ev_budgets").set_value("0, 25, 50").run()


def test_cancel_stops_a_running_sweep(store_env):
    from hetmoe_core.store import Store
    at = sweep_of_ten()
    assert any(m.value.startswith("**10 results**") for m in at.markdown)     # ideal + 3 budgets x 3 seeds
    at.button(key="ev_run").click().run()
    assert at.get("progress"), "one progress bar while the job runs"
    assert at.button(key="ev_run").disabled, "Run is disabled while the job runs"
    at.button(key="ev_cancel").click().run()
    assert any(t.value.startswith("Cancelling") for t in at.toast), "Cancel answers with a toast at once"
    job = _wait(at)
    assert job.status == "cancelled" and len(job.results) < 10
    assert any("Cancelled after" in w.value for w in at.warning)
    assert not at.button(key="ev_run").disabled, "Run is enabled again once the job has stopped"
    assert Store(store_env).counts()["runs"] == len(job.results)   # what finished is stored, nothing else


def _put(store, key, preset, limit, budget, value, strategy="maxnn", seed=0):
    store.put_result(key, {"model_source": "default", "model_fingerprint": "fp", "strategy": strategy,
                           "budget": budget, "preset": preset, "seed": seed, "task": "t", "scope": "layer",
                           "backend": "fast", "limit": limit},
                     [{"task": "t", "metric": "acc", "value": value, "stderr": 0.1, "seed": seed}])


def test_results_limit_change_keeps_valid_filters(store_env):
    """H14: changing Limit keeps the presets still offered, names those that went, never a blank unexplained."""
    from hetmoe_core.store import Store
    store = Store(store_env)
    for i, (preset, limit) in enumerate([("pa", 20), ("pb", 20), ("pa", 1), ("pc", 1)]):
        _put(store, f"k{i}", preset, limit, 0.125, 0.5 + i / 100)
    _put(store, "ideal20", "ideal", 20, 1.0, 0.7, strategy="ideal")
    at = page(app(), "results")
    assert at.selectbox(key="res_limit").value == 20
    at.multiselect(key="res_presets").set_value(["pa"]).run()
    at.selectbox(key="res_limit").set_value(1).run()
    assert not at.exception
    assert at.multiselect(key="res_presets").value == ["pa"]          # kept: pa exists at limit 1 too
    at.multiselect(key="res_presets").set_value(["pc"]).run()
    at.selectbox(key="res_limit").set_value(20).run()                 # pc has no result at limit 20
    assert at.multiselect(key="res_presets").value == ["pa", "pb"]
    assert any("pc: no results here (limit 20)" in c.value for c in at.caption)
    at.multiselect(key="res_presets").set_value([]).run()
    assert any("no preset selected" in i.value for i in at.info)


def test_model_and_placement_agree_on_the_digital_share(store_env):
    """H16: the Model page and the Placement page at budget 0 quote one digital share (tied LM head digital)."""
    at = app()
    text = " ".join(m.value for m in at.markdown)
    import re
    quoted = re.search(r"digital parameter share of \*\*([0-9.]+)%\*\*", text).group(1)
    page(at, "placement")
    at.slider(key="budget_pct").set_value(0.0).run()
    assert metric(at, "Digital parameter share") == f"{quoted}%"
    helps = {m.label: m.help for m in at.metric}
    assert "tied LM head" in helps["Digital parameter share"] and "routed_digital_share" in \
        helps["Digital routed experts"]


def test_evaluate_budget_error_in_percent(store_env):
    """H17: a budget outside the % field's range is named in percent, not as a fraction."""
    at = page(app(), "evaluate")
    at.text_input(key="ev_budgets").set_value("12.5, 150").run()
    assert not at.exception
    msg = at.error[0].value
    assert "150 % is outside 0-100 %" in msg and "[0, 1]" not in msg
    assert at.sidebar.radio(key="source_kind").value == "Default"    # the sidebar stays after the error


def test_learn_widgets_keep_state_and_lesson_follows_numbers(store_env):
    """H18: the toy's widgets keep their values across pages; the lesson never claims an outlier the numbers
    do not show."""
    import re
    at = page(app(), "learn")
    at.slider(key="toy_c").set_value(2.5).run()
    at.selectbox(key="toy_layer").set_value(1).run()
    page(at, "model")
    page(at, "learn")
    assert at.slider(key="toy_c").value == 2.5 and at.selectbox(key="toy_layer").value == 1
    for layer in range(len(_anatomy().moe_layers)):
        at.selectbox(key="toy_layer").set_value(layer).run()
        text = " ".join(m.value for m in at.markdown if "the layer's median" in m.value)
        ratio = float(re.search(r"([0-9.]+)× the layer's median", text).group(1))
        place = re.search(r"median, (?:the largest|only the (\d+)(?:st|nd|rd|th) largest) of the", text)
        rank = int(place.group(1) or 1)
        if "removes the largest errors" in text:
            assert rank == 1 and ratio >= 1.5, text


def test_evaluate_noise_widgets_come_from_the_field_metadata(store_env):
    """L2: the noise parameters' help, unit and range are NoiseConfig's field metadata (noise.field_docs), not a
    copy on the page: tile_size allows 1 to 8192, dac_bits 1 to 24 with 0 for an ideal DAC (the range is stated in
    the help and checked by NoiseConfig, not by widget bounds: see test_newcomer's adc_bits=99)."""
    from hetmoe_core.noise import field_docs
    docs = field_docs()
    at = page(app(), "evaluate")
    preset = at.selectbox(key="preset").value
    tile = at.number_input(key=f"nz_{preset}_tile_size")
    assert tile.help == (f"{docs['tile_size']['help']}\n\nAllowed: 1 to 8192 {docs['tile_size']['unit']}. "
                         f"Source: {docs['tile_size']['source']}.") and docs["tile_size"]["allowed"] == (1, 8192)
    dac = at.number_input(key=f"nz_{preset}_dac_bits")
    assert dac.label == "dac_bits (bits, 0 = ideal DAC)" and "Allowed: 1 to 24 bits, or 0 for ideal DAC." in dac.help
    assert at.number_input(key=f"nz_{preset}_t_inference").label == "t_inference (s)"
    assert at.selectbox(key=f"nz_{preset}_noise_model").options == list(docs["noise_model"]["allowed"])
    # an edit within the range changes the configuration; the field's own range check stays the judge
    at.number_input(key=f"nz_{preset}_tile_size").set_value(256).run()
    assert not at.exception and any("tile_size = 256" in c.value for c in at.caption)


def test_a_reloaded_evaluate_page_finds_its_running_job_and_cancels_it(store_env):
    """A reload is a new session: the URL's job id brings back the progress bar and Cancel of the running job."""
    at = sweep_of_ten()
    at.button(key="ev_run").click().run()
    job = at.session_state["eval_job"]
    assert job.id in str(at.query_params["eval_job"])        # the job's id is in the page's URL
    again = page(app({"eval_job": job.id}), "evaluate")     # the reloaded tab: same URL, new session
    assert again.session_state["eval_job"] is job and again.get("progress")
    # its form shows the running job's request, not the defaults (budgets 12.5 %, 1 seed, limit 20)
    assert again.text_input(key="ev_budgets").value == "0, 25, 50"
    assert (again.number_input(key="ev_seeds").value, again.number_input(key="ev_limit").value) == (3, 4)
    assert again.multiselect(key="ev_tasks").value == [eval_task()]
    assert any(m.value.startswith("**10 results**") for m in again.markdown)
    assert again.radio(key="ev_backend").value == "fast" and again.radio(key="ev_backend").label == "Backend"
    assert again.button(key="ev_run").disabled
    again.button(key="ev_cancel").click().run()
    job.thread.join(120)
    assert job.status == "cancelled"
    fresh = page(app(), "evaluate")                           # another browser without the id sees no job
    assert "eval_job" not in fresh.session_state


def test_evaluate_measures_routing_drift_of_the_placement(store_env):
    """Evaluate shows the routing drift of the sweep's first noisy placement: digital budget 0 under strong noise
    changes some top-k sets in the later MoE layers, never in the first (its router sees only digital input)."""
    at = page(app(), "evaluate")
    assert {"Oracle (measured damage)", "Local output error"} <= set(at.multiselect(key="ev_strategies").options)
    at.text_input(key="ev_budgets").set_value("0").run()
    at.button(key="ev_drift").click().run()
    assert not at.exception and not at.error
    rows = at.session_state["ev_drift_rows"][1]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3] and rows[0]["changed_share"] == 0.0
    assert 0 < max(r["changed_share"] for r in rows) < 1
    assert at.get("plotly_chart")
    import json   # the table read a raw "None" for the one-seed SE; the tallest bar touched the frame's top
    table = at.dataframe[-1].value
    assert "None" not in table.to_string() and set(table["± SE over seeds"]) == {"n/a"}
    assert list(table["MoE layer"]) == ["L0", "L1", "L2", "L3"]
    assert table["tokens with a changed top-k set"][0] == "0.0%"
    top = json.loads(at.get("plotly_chart")[-1].proto.spec)["layout"]["yaxis"]["range"][1]
    assert top == 1.15 * max(r["changed_share"] for r in rows)


def test_results_after_example_results_read_well(store_env):
    """An empty store's Results page offers the example results (shipped with the package); after "Load example
    results" they are stored, and the page reads well: full-width charts whose legend sits below the plot, one colour
    per strategy (Activation frequency and Router norm no longer share a blue), and table cells without a value read
    "n/a" with a caption saying why, never "None"."""
    import json
    from hetmoe_core.examples import EXAMPLES
    from hetmoe_core.figures import STRATEGY_COLORS
    from hetmoe_core.store import Store
    assert EXAMPLES.is_file(), "the example snapshot ships with the package"
    at = page(app(), "results")
    at.button(key="res_load_examples").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert Store(store_env).counts()["runs"] > 0
    charts = at.get("plotly_chart")
    assert len(charts) >= 2   # metric vs budget beside the recovered fraction
    score, rec = (json.loads(c.proto.spec) for c in charts[:2])
    for fig in (score, rec):
        lay = fig["layout"]
        assert lay["legend"]["yref"] == "container" and lay["legend"]["yanchor"] == "top"
        rows = -(-len(fig["data"]) // 2)
        assert lay["margin"]["b"] >= 62 + 21 * rows and lay["height"] - lay["margin"]["b"] - lay["margin"]["t"] >= 300
    colour = {}
    for tr in score["data"]:
        if " · " in tr["name"] and not tr["name"].startswith("all routed"):
            colour.setdefault(tr["name"].split(" · ")[0], set()).add(tr["line"]["color"])
    assert all(len(c) == 1 for c in colour.values()) and len(colour) >= 7      # one colour per strategy
    assert colour["Activation frequency"] == {STRATEGY_COLORS["frequency"]} != colour["Router norm"]
    assert len({next(iter(c)) for c in colour.values()}) == len(colour)        # and no two strategies share one
    table = next(d.value for d in at.dataframe if "n_seeds" in d.value and "strategy" in d.value)
    paired = next(d.value for d in at.dataframe if "sampling SE" in d.value)
    assert set(paired["sampling SE"]) == {"n/a"}                               # word_perplexity: no lm-eval stderr
    assert "MaxNNScore" in set(paired["strategy A"]) | set(paired["strategy B"])   # labels and % as on the charts
    assert "maxnn" not in set(paired["strategy A"]) and set(paired["digital budget"]) <= {"12.5%", "25%", "50%",
                                                                                          "75%"}
    assert "Activation frequency" in set(table.strategy)
    ideal = table[table.strategy == "ideal"].iloc[0]
    assert ideal["std"] == "n/a" and "None" not in table.to_string() and "None" not in paired.to_string()
    captions = " ".join(c.value for c in at.caption)
    assert "sampling SE n/a: lm-eval reports no standard error for word_perplexity" in captions
    assert "std n/a: a single result" in captions


def test_placement_offers_measured_strategies_only_when_stored(store_env):
    """Oracle and Local output error are offered on the Placement page once the damage under the session's noise
    preset is stored (the example results hold it), and place exactly by that stored measurement; before, one line
    says why they are absent and where to measure."""
    import numpy as np
    from hetmoe_core.examples import load_examples
    from hetmoe_core.placement import place
    from hetmoe_core.store import Store
    from hetmoe_core.validation import stored_validation
    at = page(app(), "placement")
    assert "Oracle (measured damage)" not in at.selectbox(key="strategy").options
    captions = " ".join(c.value for c in at.caption)
    assert "not offered" in captions and "paper-pcm-c1.5" in captions and "Validate page" in captions
    load_examples(Store(store_env))
    at = page(app(), "placement")
    assert {"Oracle (measured damage)", "Local output error"} <= set(at.selectbox(key="strategy").options)
    assert "damage measured under **paper-pcm-c1.5**" in " ".join(c.value for c in at.caption)
    v = stored_validation("default", "paper-pcm-c1.5", store=Store(store_env, read_only=True))
    a = _anatomy()
    for strategy, scores in (("oracle", v.only_this()),
                             ("local_error", [np.array([r["score_local_error"] for r in v.experts if r["layer"] == i])
                                              for i in range(len(a.moe_layers))])):
        at.selectbox(key="strategy").set_value(strategy).run()
        at.slider(key="budget_pct").set_value(25.0).run()
        assert not at.exception, [e.value for e in at.exception]
        want = place(a, strategy, 0.25, measured=scores).digital
        table = next(d.value for d in at.dataframe if "MoE layer" in d.value)
        shown = [tuple(int(x) for x in cell.split(", ")) for cell in table.iloc[:, 1]]
        assert shown == [tuple(d) for d in want] and all(len(d) == 4 for d in want)   # 25% of 16 experts


def test_learn_hint_points_to_a_layer_with_an_outlier_or_says_none_has(store_env):
    """The toy's "try another layer" hint is true for the model shown: on the default model no layer has a single
    outlier at c = 1.5 (before, every layer sent the reader to another), so the page says so; on tiny DeepSeek-V2
    the second layer names the first, which shows one."""
    import re
    at = page(app(), "learn")
    for layer in range(len(_anatomy().moe_layers)):
        at.selectbox(key="toy_layer").set_value(layer).run()
        text = " ".join(m.value for m in at.markdown if "the layer's median" in m.value)
        assert "No MoE layer of this model has a single outlier expert at c = 1.5" in text, text
        assert "another layer" not in text and "removes the largest errors" not in text
    at = page(app({"model": "tiny:deepseek_v2"}), "learn")
    at.selectbox(key="toy_layer").set_value(1).run()
    text = " ".join(m.value for m in at.markdown if "the layer's median" in m.value)
    target = re.search(r"Choose MoE layer L(\d+) above", text)
    assert target, text
    at.selectbox(key="toy_layer").set_value(at.selectbox(key="toy_layer").options.index(f"L{target.group(1)}")).run()
    text = " ".join(m.value for m in at.markdown if "the layer's median" in m.value)
    assert "removes the largest errors" in text, text


def test_placement_at_full_budget_says_every_routed_expert_is_digital(store_env):
    """At a 100 % budget the parameter share reads 99.9 % on the default model (its 4,352 norm parameters are memory):
    the line under it names that rest, and the routed experts' metric reads 100 %."""
    at = page(app(), "placement")
    at.slider(key="budget_pct").set_value(100.0).run()
    m = {x.label: x for x in at.metric}
    assert m["Digital parameter share"].value == "99.9%"
    assert m["Digital parameter share"].delta == "rest 0.052%: norms (memory)"
    assert m["Digital routed experts"].value == "64 / 64" and m["Digital routed experts"].delta == \
        "100% of routed experts"
    at.slider(key="budget_pct").set_value(12.5).run()
    assert {x.label: x.delta for x in at.metric}["Digital routed experts"] == "12.5% of routed experts"


def url(at) -> dict:
    """The page's URL query as {name: value} (AppTest keeps a list per name)."""
    return {k: v[-1] if isinstance(v, list) else v for k, v in at.query_params.items()}


def test_share_link_carries_scope_dense_modules_and_hardware(store_env):
    """Placement at scope global showed one placement, the Share page's link opened in a new tab another (scope
    layer): the link carried model, strategy, budget and preset only. Now scope always, dense modules, hardware
    (preset and edited constants) and the energy batch where they differ from the defaults; a new session opened on
    the link shows the same numbers."""
    from urllib.parse import parse_qsl, urlsplit
    at = page(app({"strategy": "router_norm", "budget": "0.375"}), "placement")
    layer_scope = metric(at, "Per layer")
    at.radio(key="scope").set_value("global").run()
    at.toggle(key="dense_attention").set_value(False).run()
    at.selectbox(key="hw_preset").set_value("a100+pcm").run()
    at.number_input(key="hw_a100+pcm_analog_tile_size").set_value(256).run()
    at.number_input(key="hw_a100+pcm_digital_hbm_bandwidth").set_value(2.5).run()
    at.select_slider(key="energy_batch").set_value(8).run()
    assert not at.exception and not at.warning
    labels = ("Per layer", "Digital parameter share", "Analog parameters", "Energy per token", "AIMC tiles",
              "Throughput (tokens/s)")
    shown = {k: metric(at, k) for k in labels}
    assert shown["Per layer"] != layer_scope, (shown, layer_scope)       # global scope places otherwise here
    want = {"model": "default", "strategy": "router_norm", "budget": "0.375", "scope": "global",
            "preset": "paper-pcm-c1.5", "analog": "attention", "hw": "a100+pcm", "hw.analog.tile_size": "256",
            "hw.digital.hbm_bandwidth": "2.5", "batch": "8"}
    assert url(at) == want                             # the page's own URL
    page(at, "share")
    link = at.code[0].value
    assert link.startswith("http://127.0.0.1:8501/placement?") and dict(parse_qsl(urlsplit(link).query)) == want
    new = AppTest.from_file(APP, default_timeout=120)                    # the link opened in a new tab
    new.query_params.update(dict(parse_qsl(urlsplit(link).query)))
    new.switch_page("pages/placement.py").run()
    assert not new.exception and not new.sidebar.warning
    assert (new.radio(key="scope").value, new.toggle(key="dense_attention").value, new.selectbox(key="hw_preset").value,
            new.number_input(key="hw_a100+pcm_analog_tile_size").value, new.select_slider(key="energy_batch").value
            ) == ("global", False, "a100+pcm", 256, 8)
    assert {k: metric(new, k) for k in labels} == shown
    # back to the defaults: the optional parameters leave the URL
    new.toggle(key="dense_attention").set_value(True).run()
    new.selectbox(key="hw_preset").set_value("h100+pcm").run()
    new.select_slider(key="energy_batch").set_value(32).run()
    assert url(new) == {k: v for k, v in want.items() if k in ("model", "strategy", "budget",
                                                                                  "scope", "preset")}


def test_a_links_bad_scope_dense_or_hardware_is_one_warning_line(store_env):
    at = app({"scope": "diagonal", "analog": "attention,wings", "hw": "a100+pcm", "hw.analog.tile_size": "-5",
              "hw.analog.colour": "red", "hw.digital.peak_tflops": "lots", "batch": "3", "routing": "sideways"})
    assert not at.exception
    (w,) = [x.value for x in at.sidebar.warning]
    assert w.startswith("The link held 7 invalid values, ignored (the default is used instead): ") and "\n" not in w
    for part in ("scope='diagonal' (layer or global)", "analog='attention,wings' (dense module kinds",
                 "hw.analog.tile_size='-5' (AIMC chip constant out of range: tile_size=-5",
                 "hw.analog.colour='red' (no such constant", "hw.digital.peak_tflops='lots' (not a number)",
                 "batch='3' (one of 1, 2, 4, 8, 16, 32, 64, 128, 256)", "routing='sideways' (measured or uniform)"):
        assert part in w, (part, w)
    page(at, "placement")
    # the valid ones are kept: the hardware preset; the rest at its defaults
    assert (at.radio(key="scope").value, at.toggle(key="dense_attention").value,
            at.selectbox(key="hw_preset").value) == ("layer", True, "a100+pcm")
    assert at.number_input(key="hw_a100+pcm_analog_tile_size").value == 512
    assert url(at) == {"model": "default", "strategy": "maxnn", "budget": "0.125", "scope": "layer",
                                         "preset": "paper-pcm-c1.5", "hw": "a100+pcm"}
