"""What a newcomer met driving the dashboard: each test asserts the value that was wrong (AppTest, default model,
real DuckDB store in tmp)."""
from test_app import app, page

from hetmoe_core.models import load_model


def test_measurement_forwards_is_what_measure_counts():
    """The oracle's time estimate counts the forwards measure() really makes (its progress total)."""
    from hetmoe_core.sensitivity import calibration_tokens, measure, measurement_forwards
    from hetmoe_core.validation import _texts
    lm = load_model("tiny:olmoe")
    ids = calibration_tokens(lm.tokenizer, _texts(None, lm.source)[0], 64, seq_len=32)
    seen = []
    measure(lm, "paper-dac-adc-8bit", ids, seeds=1, progress=lambda d, n: seen.append(n))
    assert measurement_forwards(lm.anatomy, seeds=1, tokens=64, seq_len=32) == seen[-1]


def test_oracle_says_before_run_that_it_measures_first(store_env):
    at = page(app(), "evaluate")
    assert not any("Oracle" in w.value for w in at.warning)
    at.multiselect(key="ev_strategies").set_value(["maxnn", "oracle"]).run()
    note = next(w.value for w in at.warning if "Oracle" in w.value)
    assert "none is stored" in note and "1,370 forwards" in note and "Validate" in note, note
    page(at, "validate")   # the Validate page gives the same estimate before Measure
    assert any(c.value.startswith("Not stored yet: measuring 5 seeds × 16,384 tokens takes about ")
               and "(1,370 forwards of 8,192 tokens × " in c.value for c in at.caption)


def test_decimal_comma_in_budgets_is_one_clear_line(store_env):
    from hetmoe_core.ui import budgets_from_text
    assert budgets_from_text("0, 12.5;25 50") == [0.0, 0.125, 0.25, 0.5]
    at = page(app(), "evaluate")
    at.text_input(key="ev_budgets").set_value("12,5").run()
    assert [e.value for e in at.error] == ["Digital budgets (%): '12,5' is ambiguous: use a dot for decimals (12.5); "
                                           "separate budgets with a comma and a space, a semicolon or spaces (12, 5)."]


def test_edited_preset_is_marked_and_tile_size_1_warns(store_env):
    at = page(app(), "evaluate")
    p = at.selectbox(key="preset").value
    at.number_input(key=f"nz_{p}_tile_size").set_value(1).run()
    at.number_input(key=f"nz_{p}_t_inference").set_value(86400.0).run()
    assert f"under **{p} (edited: t_inference, tile_size)**" in " ".join(m.value for m in at.markdown) or \
        f"under **{p} (edited: tile_size, t_inference)**" in " ".join(m.value for m in at.markdown)
    slow = next(w.value for w in at.warning if "tile_size = 1" in w.value)
    from hetmoe_core.models import load_model
    from hetmoe_core.noise import tile_partials
    a = load_model("default").anatomy
    shapes = [(2 * m.intermediate_size, m.hidden_size) for m in a.moe_layers] + \
        [(m.hidden_size, m.intermediate_size) for m in a.moe_layers]
    assert f"{tile_partials(shapes, 1) / tile_partials(shapes, 512):,.0f}x" in slow


def test_results_open_on_the_latest_results(store_env):
    """An earlier CLI run at limit 20, then a dashboard run at limit 5: the page opens on limit 5 (it opened on the
    largest limit, 20, and said "No results" for the run just made)."""
    from test_app import _put
    from hetmoe_core.store import Store
    store = Store(store_env)
    _put(store, "cli", "pa", 20, 0.125, 0.5)
    _put(store, "ideal20", "ideal", 20, 1.0, 0.7, strategy="ideal")
    _put(store, "dash", "pb", 5, 0.25, 0.6)
    at = page(app(), "results")
    assert at.selectbox(key="res_limit").value == 5
    assert at.multiselect(key="res_presets").value == ["pb"]


def test_cached_store_reads_see_a_new_result(store_env):
    """The Results page's cached summary (ui.store_read, keyed by ui.store_state) is fresh after a new result."""
    from test_app import _put
    from hetmoe_core import ui
    from hetmoe_core.store import Store
    store = Store(store_env)
    _put(store, "a", "pa", 20, 0.125, 0.5)
    first = ui.store_read(store, "summary_frame")
    assert ui.store_read(store, "summary_frame").equals(first)
    _put(store, "b", "pb", 20, 0.25, 0.6)
    assert sorted(ui.store_read(store, "summary_frame").preset) == ["pa", "pb"] and list(first.preset) == ["pa"]


def test_metric_axes_and_results_filters_read_well(store_env):
    """Equal accuracies gave a tick "0.2000000000000000111"; an only-ideal report panel spanned -1…4; the filter
    chips were cut ("Activation frequency" read "cy")."""
    import json
    from test_app import _put
    from hetmoe_core.figures import metric_axis
    from hetmoe_core.report import _figures
    from hetmoe_core.store import Store
    assert metric_axis([0.2, 0.2, 0.2]) == {"tickformat": ".4~g", "range": [0.15000000000000002, 0.25]}
    assert metric_axis([0.0]) == {"tickformat": ".4~g", "range": [-0.05, 0.05]}
    assert [round(x, 12) for x in metric_axis([0.1, 0.3])["range"]] == [0.084, 0.316]   # 8 % of the span: caps
    assert metric_axis([0.0], "acc") == {"tickformat": ".4~g", "range": [-0.02, 0.05]}   # an accuracy stays >= -2 %
    assert metric_axis([1.0], "acc_norm[none]")["range"] == [0.95, 1.02]
    assert metric_axis([3.0], "perplexity")["range"] == [2.85, 3.15]                    # no finite top: unclipped
    import pandas as pd
    from hetmoe_core.figures import accuracy_vs_energy
    pts = pd.DataFrame(dict(strategy=["ideal", "maxnn"], budget=[1.0, 0.25], preset=["none", "p"], mean=[0.0, 0.0],
                            std=[0.0, float("nan")], n_seeds=[1, 1], energy_per_token_j=[2e-3, 1e-3]))
    assert list(accuracy_vs_energy(pts, "acc").layout.yaxis.range) == [-0.02, 0.05]    # was Plotly's -0.5…1
    store = Store(store_env)
    for k, b in (("a", 0.0), ("b", 0.5)):
        _put(store, k, "pa", 20, b, 0.2)
    _put(store, "i", "ideal", 20, 1.0, 0.2, strategy="ideal")
    at = page(app(), "results")
    y = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["yaxis"]
    assert y["tickformat"] == ".4~g" and y["range"] == [0.15000000000000002, 0.25]
    assert at.multiselect(key="res_strategies").proto.wrap and at.multiselect(key="res_presets").proto.wrap
    only_ideal = store.summary_frame()
    fig = _figures(only_ideal[only_ideal.strategy == "ideal"])[0]      # a panel with the ideal line alone
    assert list(fig.layout.yaxis.range) == [0.15000000000000002, 0.25]


def test_a_link_with_three_bad_values_names_all_three(store_env):
    at = app({"strategy": "nonsense", "budget": "abc", "preset": "zzz"})
    w = next(x.value for x in at.warning if "link" in x.value)
    assert w.startswith("The link held 3 invalid values, ignored (the default is used instead): strategy='nonsense'"
                        " (one of ") and "budget='abc' (a fraction between 0 and 1, e.g. 0.125)" in w \
        and "preset='zzz' (one of ideal, " in w
    assert at.session_state["strategy"] == "maxnn" and at.session_state["budget_pct"] == 12.5


def test_done_banner_is_the_previous_runs_once_inputs_change_and_plan_lists_real_modules(store_env):
    from test_app import _wait, eval_task
    from hetmoe_core.fingerprints import source_fingerprint
    from hetmoe_core.store import Store
    Store(store_env).put_result("cli", {    # an earlier CLI result of the same model and task at limit 20
        "model_source": "default", "model_fingerprint": source_fingerprint("default"), "strategy": "maxnn",
        "budget": 0.125, "preset": "paper-pcm-c1.5", "seed": 0, "task": eval_task(), "limit": 20.0, "scope": "layer",
        "backend": "fast"}, [{"task": eval_task(), "metric": "acc", "value": 0.5, "stderr": 0.1, "seed": 0}])
    at = page(app(), "evaluate")
    plan = next(c.value for c in at.caption if c.value.startswith("Placement page:"))
    assert "dense modules digital: attention, LM head, routers (" in plan and "shared" not in plan, plan
    at.multiselect(key="ev_tasks").set_value([eval_task()])
    at.number_input(key="ev_limit").set_value(4)
    at.run()
    at.button(key="ev_run").click().run()
    assert _wait(at).status == "done"
    assert any(s.value.startswith("Done: 2 results") for s in at.success)
    at.number_input(key="ev_limit").set_value(3).run()
    assert not any(s.value.startswith("Done:") for s in at.success)
    assert any(i.value.startswith("Previous run, with other settings than the form shows now: done, 2 results")
               for i in at.info)
    page(at, "results")   # opens on what was just run (limit 4), not on the CLI run's larger limit 20
    assert at.selectbox(key="res_task").value == eval_task() and at.selectbox(key="res_limit").value == 4


def test_oracle_note_is_gone_when_the_measurement_is_stored(store_env, example_results):
    """The example results carry the oracle's measurement under paper-pcm-c1.5: no 'measures it first' note."""
    example_results(store_env)
    at = page(app({"preset": "paper-pcm-c1.5"}), "evaluate")
    at.multiselect(key="ev_strategies").set_value(["oracle"]).run()
    assert not any("Oracle" in w.value for w in at.warning), [w.value for w in at.warning]
    at.selectbox(key="preset").set_value("ideal").run()
    assert not any("Oracle" in w.value for w in at.warning)


def test_budget_typos_are_refused_and_a_sub_percent_budget_is_noted(store_env):
    import pytest
    from hetmoe_core.ui import budgets_from_text
    with pytest.raises(ValueError, match=r"'12 ,5' is ambiguous: use a dot for decimals \(12.5\)"):
        budgets_from_text("12 ,5")
    with pytest.raises(ValueError, match="'1_0' is not a number"):
        budgets_from_text("1_0")
    assert budgets_from_text("12 , 5") == [0.12, 0.05]
    at = page(app(), "evaluate")
    at.text_input(key="ev_budgets").set_value("0.25, 25").run()
    assert not at.error
    assert [i.value for i in at.info if "Digital budgets" in i.value] == [
        "Digital budgets (%): 0.25 % keeps no expert digital in any layer (same as 0 %); did you mean 25?"]


def test_empty_choices_speak_the_page_and_keep_run_disabled(store_env):
    at = page(app(), "evaluate")
    at.multiselect(key="ev_strategies").set_value([]).run()
    assert [e.value for e in at.error] == ["Choose at least one strategy above (Strategies)."]
    assert at.button(key="ev_run").disabled
    at.multiselect(key="ev_strategies").set_value(["maxnn"]).run()
    at.multiselect(key="ev_tasks").set_value([]).run()
    assert [e.value for e in at.error] == ["Choose at least one task above (Tasks)."]
    assert at.button(key="ev_run").disabled
    at = page(app({"model": "tiny:olmoe"}), "placement")
    at.selectbox(key="strategy").set_value("frequency").run()
    note = [c.value for c in at.caption if c.value.startswith("Calibration: built-in sentences")]
    assert note == ["Calibration: built-in sentences (7 short texts, for tiny: test models only; load a real model "
                    "for real statistics)."], [c.value for c in at.caption]


def test_bad_links_say_which_value_and_keep_the_rest(store_env):
    """Three links a newcomer pasted were silently half-ignored: an unknown job id, a model that is no model, and
    the oracle under the ideal preset (no measurement can exist). Each now shows one line naming the value and what
    to do, and the link's valid parts stay."""
    at = page(app({"eval_job": "unknown", "budget": "0.25"}), "evaluate")
    w = [x.value for x in at.warning if "eval_job" in x.value]
    assert len(w) == 1 and w[0].startswith("The link's eval_job='unknown' names no evaluation on this server") \
        and "press **Run**" in w[0], w
    assert "eval_job" not in at.query_params and at.text_input(key="ev_budgets").value == "25"
    at = app({"model": "garbage", "strategy": "random"})    # results?model=garbage: the sidebar says it once
    w = " ".join(x.value for x in at.sidebar.warning)
    assert "The link held an invalid value" in w and "model='garbage'" in w and "hub id" in w, w
    page(at, "results")
    assert at.session_state["source"] == "default" and at.session_state["strategy"] == "random"
    at = page(app({"strategy": "oracle", "preset": "ideal", "budget": "0.25"}), "placement")
    w = [x.value for x in at.warning if "strategy=oracle" in x.value]
    assert len(w) == 1 and "**ideal** damages nothing: showing MaxNNScore instead" in w[0], w
    assert at.session_state["strategy"] == "maxnn" and at.session_state["preset"] == "ideal" \
        and at.slider(key="budget_pct").value == 25.0


def test_out_of_range_noise_value_is_refused_in_one_line_not_silently_replaced(store_env):
    """adc_bits=99 showed the field red (the widget's own bound) while the run used the old 8. The widget has no
    bound of its own now, so the value reaches NoiseConfig, whose field metadata refuses it in one line naming the
    allowed range, and nothing can run with another value meanwhile."""
    at = page(app(), "evaluate")
    p = at.selectbox(key="preset").value
    adc = at.number_input(key=f"nz_{p}_adc_bits")
    assert not adc.proto.has_max and not adc.proto.has_min and "Allowed: 1 to 24 bits, or 0 for ideal ADC." in adc.help
    adc.set_value(99).run()
    assert [e.value for e in at.error] == ["noise parameter not allowed: adc_bits=99: allowed an integer in [1, 24] "
                                           "bits, or None for ideal ADC; change the parameter named above."]
    assert "ev_run" not in [b.key for b in at.button]
    at.number_input(key=f"nz_{p}_adc_bits").set_value(1e9).run()   # typed "1e9": an integer box read it as 1
    assert [e.value for e in at.error] == ["noise parameter not allowed: adc_bits=1000000000: allowed an integer in "
                                           "[1, 24] bits, or None for ideal ADC; change the parameter named above."]
    at.number_input(key=f"nz_{p}_adc_bits").set_value(6).run()
    assert not at.error and any("adc_bits = 6" in c.value for c in at.caption)


def test_strategy_chips_follow_the_registry_not_machine_names(store_env):
    """The Results page's strategy chips read "Activation frequency, Local output error, MaxNNScore, …" (machine
    names sorted: frequency < local_error < maxnn); they follow the registry's order, MaxNNScore first."""
    from test_app import _put
    from hetmoe_core.store import Store
    from hetmoe_core.strategies import STRATEGIES, ordered
    assert ordered(["zeta", "ideal", "local_error", "maxnn", "maxnn"]) == ["maxnn", "local_error", "ideal", "zeta"]
    store = Store(store_env)
    names = ["random", "local_error", "frequency", "oracle", "maxnn"]
    for i, s in enumerate(names):
        _put(store, f"k{i}", "pa", 20, 0.25, 0.5 + i / 100, strategy=s)
    at = page(app(), "results")
    chips = at.multiselect(key="res_strategies")
    assert chips.options == [STRATEGIES[n].label for n in ("maxnn", "frequency", "random", "oracle", "local_error")]
    assert chips.value == ["maxnn", "frequency", "random", "oracle", "local_error"]


def test_hardware_constant_below_its_range_is_refused_not_silently_kept(store_env):
    """The hardware editor had the same widget bound (min 1e-9): 0 pJ/MAC was held red in the browser while the
    view kept the preset's value. 0 now reaches get_hardware, whose field metadata refuses it in one line."""
    at = page(app(), "placement")
    mac = at.number_input(key="hw_h100+pcm_digital_mac_energy")
    assert not mac.proto.has_min and not mac.proto.has_max and "Allowed: 0.0001 to 1000." in mac.help
    mac.set_value(0.0).run()
    assert any("mac_energy=0.0: allowed a number in [0.0001, 1000] pJ/MAC" in w.value for w in at.warning), \
        [w.value for w in at.warning]


def test_dotted_budgets_joined_by_a_bare_comma_are_two_budgets(store_env):
    """"12.5,25" is 12.5 % and 25 % (the dot marks the decimals, so the comma separates); it was refused as
    "'5,25' is ambiguous", a fragment of what was typed. Without a dot the refusal quotes the whole text."""
    import pytest
    from hetmoe_core.ui import budgets_from_text
    assert budgets_from_text("12.5,25") == [0.125, 0.25]
    assert budgets_from_text("1.5,2,3") == [0.015, 0.02, 0.03]
    with pytest.raises(ValueError, match=r"^'0, 12,5' is ambiguous: use a dot for decimals \(0, 12.5\); .*\(0, 12, 5\)$"):
        budgets_from_text("0, 12,5")
    at = page(app(), "evaluate")
    at.text_input(key="ev_budgets").set_value("12.5,12.5").run()
    assert not at.error and not at.button(key="ev_run").disabled
    at.text_input(key="ev_budgets").set_value("12.5,25").run()
    assert not at.error and not at.button(key="ev_run").disabled
    assert any(m.value.startswith("**3 results** in this sweep") for m in at.markdown), [m.value for m in at.markdown]


def test_out_of_range_seeds_limit_batch_are_refused_in_one_line_with_run_disabled(store_env):
    """Seeds -3, Limit 99,999,999, Batch size 0 showed the field red (the widget's own bound) while the summary kept
    "2 results" and Run used the old value. No widget bound now: one line naming the allowed range, Run disabled."""
    at = page(app(), "evaluate")
    assert not at.number_input(key="ev_seeds").proto.has_min and "from 1 to 20" in at.number_input(key="ev_seeds").help
    for key, bad, line in (("ev_seeds", -3, "Seeds: -3 is outside the allowed range; type a whole number from 1 to 20."),
                           ("ev_limit", 99999999, "Limit (documents per task, 0 = all): 99,999,999 is outside the "
                                                  "allowed range; type a whole number from 0 to 100,000."),
                           ("ev_batch", 0, "Batch size: 0 is outside the allowed range; type a whole number from 1 "
                                           "to 256."),
                           # a float box: "1e9" typed reads 1e9 (an integer box's parseInt read it as 1, silently)
                           ("ev_limit", 1e9, "Limit (documents per task, 0 = all): 1,000,000,000 is outside the "
                                             "allowed range; type a whole number from 0 to 100,000."),
                           ("ev_seeds", 2.5, "Seeds: 2.5 is not a whole number; type a whole number from 1 to 20.")):
        good = at.number_input(key=key).value
        at.number_input(key=key).set_value(bad).run()
        assert [e.value for e in at.error] == [line]
        assert at.button(key="ev_run").disabled and not any("in this sweep" in m.value for m in at.markdown)
        at.number_input(key=key).set_value(good).run()
        assert not at.error and not at.button(key="ev_run").disabled


def test_learn_lesson_says_where_the_top_expert_ranks():
    """The Learn page read "rank 11 of 16 by error" next to "r = +0.97", which looked like a contradiction."""
    from hetmoe_core.toy import lesson_head, toy_lesson
    les = toy_lesson([1.0, 2.0, 3.0, 3.1], [1.0, 2.0, 4.0, 3.0])     # the top score is the 2nd largest error
    assert (les["top"], les["rank"], les["n"]) == (3, 2, 4)
    assert lesson_head(les).endswith("1.2× the layer's median, only the 2nd largest of the 4 experts' errors.")
    assert "the largest of the 4" in lesson_head({**les, "rank": 1})
    assert "only the 11th largest" in lesson_head({**les, "rank": 11})


def test_metric_ticks_never_print_alike():
    """A perplexity axis spanning 3.0451e9…3.0453e9 printed "3.045e+9" on every tick with 4 significant digits."""
    from hetmoe_core.figures import metric_axis
    assert metric_axis([3.0451e9, 3.0453e9])["tickformat"] == ".6~g"
    assert metric_axis([0.2, 0.6])["tickformat"] == ".4~g"
    assert metric_axis([132.14, 132.16])["tickformat"] == ".6~g"
