"""What the dashboard pages show, computed in the core: filters that keep their choice, budgets in percent, one
digital-share definition, the one rounding rule, readable figures, import messages in words."""
import numpy as np
import pandas as pd
import pytest

from hetmoe_core import figures, results, toy
from hetmoe_core.placement import (SHARE_HELP, Placement, budgets_from_percent, digital_count, digital_share,
                                   overlap, place)


def test_budget_rounding_is_round_half_up_everywhere():
    # 12.5 % of 4 experts is 0.5 and of 20 experts 2.5: half up gives 1 and 3 (Python's round gives 0 and 2)
    assert digital_count(0.125, 4) == 1 and round(0.125 * 4) == 0
    assert digital_count(0.125, 20) == 3 and round(0.125 * 20) == 2
    from hetmoe_core.models import load_model
    a = load_model("tiny:olmoe").anatomy
    p = place(a, "maxnn", 0.125)
    assert list(p.per_layer_digital) == [digital_count(0.125, m.num_experts) for m in a.moe_layers]


def test_learn_page_uses_placement_rounding():
    from pathlib import Path
    src = (Path(__file__).resolve().parent.parent / "pages" / "learn.py").read_text()
    assert "digital_count(0.125, m.num_experts)" in src and "round(0.125" not in src


def test_budgets_in_percent_with_errors_in_percent():
    assert budgets_from_percent("0, 12.5; 25 %") == [0.0, 0.125, 0.25]
    assert budgets_from_percent("12.5, 12.5,25, 12.5%") == [0.125, 0.25]   # each budget once
    with pytest.raises(ValueError, match="no budget given"):
        budgets_from_percent(" , ")
    with pytest.raises(ValueError, match=r"150 % is outside 0-100 %"):
        budgets_from_percent("12.5, 150")
    with pytest.raises(ValueError, match="'abc' is not a number"):
        budgets_from_percent("abc")


def test_overlap_is_jaccard_of_digital_sets():
    p = Placement("maxnn", 0.5, "layer", 0, (4, 4), ((0, 1), (2, 3)))
    q = Placement("random", 0.5, "layer", 0, (4, 4), ((1, 2), (2, 3)))
    o = overlap(p, q)
    assert o == {"shared": 3, "union": 5, "n_p": 4, "jaccard": 3 / 5}
    none = Placement("maxnn", 0.0, "layer", 0, (4, 4), ((), ()))
    assert overlap(none, none)["jaccard"] is None


def test_digital_share_one_definition_with_tied_head():
    """The tied LM head's table is digital at budget 0 (the Model page quotes the same number) and the result
    explains both shares."""
    from hetmoe_core.models import load_model
    a = load_model("default").anatomy
    assert a.tied_lm_head
    d = digital_share(Placement.all_analog(a), a)
    pc = a.param_counts
    assert d["digital_share"] == pytest.approx((pc["attention"] + pc["router"] + pc["embeddings"]) / a.total_params)
    assert d["routed_digital_share"] == 0.0
    assert d["help"] == SHARE_HELP and "tied LM head" in d["help"]["digital_share"]
    assert "experts" in d["help"]["routed_digital_share"]
    assert figures.kind_label("embeddings", True) == "embeddings = tied LM head"


def test_keep_selection_survives_option_changes():
    assert results.keep_selection(None, ["a", "b"]) == (["a", "b"], [])
    assert results.keep_selection(["b"], ["a", "b", "c"]) == (["b"], [])
    assert results.keep_selection(["b", "x"], ["a", "b"]) == (["b"], ["x"])
    assert results.keep_selection(["x"], ["a", "b"]) == (["a", "b"], ["x"])       # nothing left: show all, say so
    assert results.keep_selection([], ["a", "b"]) == ([], [])                     # the user's own empty choice


def test_limit_choices_and_rows():
    s = pd.DataFrame({"limit": [20.0, 1.0, np.nan, 1.0], "strategy": ["maxnn"] * 4})
    assert results.limit_choices(s) == [1, 20, results.ALL]
    assert len(results.at_limit(s, 1)) == 2 and len(results.at_limit(s, results.ALL)) == 1


def test_import_message_in_words():
    msg = results.import_message({"added": {"runs": 2, "metrics": 4, "placements": 0, "expert_stats": 0},
                                  "snapshot_rows": {"runs": 3, "metrics": 6, "placements": 0, "expert_stats": 0}})
    assert msg == ("Imported 2 results and 4 metric values; 1 result and 2 metric values were already in the "
                   "store.")
    assert "{" not in msg
    assert results.import_message({"added": {"runs": 0}, "snapshot_rows": {"runs": 1}}).startswith("Nothing new")


def test_scatter_pick_reads_trace_and_point_not_customdata():
    # what the browser sends for a numpy customdata: a typed-array object, not a list (KeyError: 0 before)
    event = {"selection": {"points": [{"curve_number": 2, "point_index": 5, "point_number": 5,
                                       "customdata": {"dtype": "f8", "bdata": "AAAAAAAAAEA="}}]}}
    assert figures.scatter_pick(event) == (2, 5)
    assert figures.scatter_pick({"selection": {"points": []}}) is None and figures.scatter_pick(None) is None


def test_layer_colours_distinct_and_log_ticks_full_numbers():
    for n in (4, 16, 24, 40):
        assert len(set(figures.layer_colors(n))) == n
    fig = figures.score_scatter([np.ones(3)] * 12, [np.ones(3)] * 12, list(range(12)), "a", "b")
    assert len({t.marker.color for t in fig.data}) == 12
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.tickformat == "~g"
    fig = figures.damage_scatter([np.array([0.5, 2.0])], [np.array([1e-3, 2e-3])], [np.array([1e-4, 1e-4])], [0], "c")
    assert {fig.layout.xaxis.tickformat, fig.layout.yaxis.tickformat} == {"~g"}   # Validate: "0.4", not "4"


def test_toy_at_zero_noise_draws_points_and_lesson_follows_numbers():
    fig = toy.toy_figure([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], 0, "c = 0")
    assert fig.layout.yaxis.type != "log" and list(fig.data[0].y) == [0.0, 0.0, 0.0]
    flat = toy.toy_lesson([1.0, 2.0, 3.0], [1.0, 1.1, 1.0])
    assert flat["top"] == 2 and flat["rank"] == 2 and flat["ratio"] == pytest.approx(1.0)
    outlier = toy.toy_lesson([1.0, 2.0, 9.0], [1.0, 1.2, 5.0])
    assert outlier["rank"] == 1 and outlier["ratio"] == pytest.approx(5.0 / 1.2) and outlier["r"] > 0.9
    assert toy.shows_outlier(outlier) and not toy.shows_outlier(flat)
    # the largest error but under OUTLIER_RATIO x the median: a trend, not an outlier
    assert not toy.shows_outlier(toy.toy_lesson([1.0, 2.0, 9.0], [1.0, 1.2, 1.5]))


def test_reference_lines_in_the_legend_not_overlapping_labels():
    frame = pd.DataFrame({"strategy": ["maxnn", "maxnn"], "preset": ["p", "p"], "budget": [0.0, 0.25],
                          "mean": [0.5, 0.6], "std": [np.nan, np.nan], "n_seeds": [1, 1]})
    fig = figures.metric_vs_budget(frame, "acc", 0.61, {"p": 0.6})
    assert not fig.layout.annotations
    names = [t.name for t in fig.data]
    assert "ideal (all digital, no noise): 0.61" in names and "all routed experts analog · p: 0.6" in names


def test_learn_matrix_pair_colour_bar_clears_the_right_panel_and_axes_are_named():
    w = np.random.default_rng(0).normal(0, 0.05, (16, 32))
    fig = toy.matrix_pair(w, w + 0.01, "t")
    left_bar = fig.data[0].colorbar
    assert left_bar.x + 0.05 < fig.layout.xaxis2.domain[0]          # bar (12 px) and its ticks before the y ticks
    assert left_bar.x >= fig.layout.xaxis.domain[1]                  # and not over the left heatmap
    assert [fig.data[0].colorbar.title.text, fig.data[1].colorbar.title.text] == ["weight", "error"]
    assert fig.layout.xaxis.title.text == fig.layout.xaxis2.title.text == "input (column of up_proj)"


def test_damage_heatmap_says_what_white_cells_are():
    experts = [{"layer": 0, "expert": e, "only_this": v, "only_this_se": 0.01}
               for e, v in enumerate([0.2, -0.01, 0.0, 0.05])]
    fig = figures.damage_heatmap({"experts": experts, "preset": "p"})
    assert "white: 2 expert(s) ≤ 0, no measurable damage" in fig.layout.title.text
    assert fig.layout.title.text.count("<br>") == 1                 # one subtitle line: a full-width chart holds it
    assert "white" not in figures.damage_heatmap({"experts": experts[:1], "preset": "p"}).layout.title.text


def test_routing_drift_right_axis_has_its_own_readable_ticks_and_units():
    """The load axis starts at 1 (balanced) with its own round ticks, not ticks synced to the share axis's grid
    (which read 1.937, 2.217, …); both axis titles carry their unit."""
    rows = [{"layer": i, "changed_share": c, "load_max_over_mean_ideal": a, "load_max_over_mean_noisy": b}
            for i, (c, a, b) in enumerate([(0.0, 2.7, 2.7), (0.05, 2.05, 2.0), (0.08, 3.06, 3.0)])]
    lay = figures.routing_drift({"routing_drift": rows}).layout
    assert lay.yaxis2.tickmode == "auto" and lay.yaxis2.range[0] == 1
    assert lay.yaxis2.range[1] == pytest.approx(1 + 2.06 * 1.1) and lay.yaxis2.tickformat == ".2~f"
    assert "(%)" in lay.yaxis.title.text and "1 = balanced" in lay.yaxis2.title.text
    assert lay.xaxis.title.text == "MoE layer"


def test_percent_axis_ticks_never_repeat_a_label():
    """A routing drift of ~0 gets a 0-1 % axis: ".0%" wrote its 0.2 % steps "0% 0% 0% 1% 1% 1%"; the step's own
    decimals now (percent_ticks), 1-2-5 steps."""
    for top, step, fmt in ((0.01, 0.002, ".1%"), (0.3, 0.1, ".0%"), (0.002, 0.0005, ".2%"), (1.0, 0.2, ".0%")):
        ax = figures.percent_ticks(top)
        assert (ax["dtick"], ax["tickformat"], ax["range"]) == (pytest.approx(step), fmt, [0, top])
        labels = [format(i * ax["dtick"], ax["tickformat"]) for i in range(int(top / ax["dtick"] + 1e-9) + 1)]
        assert len(set(labels)) == len(labels), labels
    rows = [{"layer": 0, "changed_share": 0.0, "load_max_over_mean_ideal": 2.0, "load_max_over_mean_noisy": 2.0}]
    assert figures.routing_drift({"routing_drift": rows}).layout.yaxis.tickformat == ".1%"


def test_long_legend_names_get_a_row_each_and_bar_labels_wrap():
    """An edited preset's legend name ran into its neighbour in a half-row; long module-kind labels break in two."""
    assert figures.legend_below(4)["legend"]["entrywidth"] == 0.5
    long = "MaxNNScore · paper-pcm-c1.5 (adc_bits=6, t_inference=3600)"
    assert figures.legend_below(4, names=[long, "ideal"])["legend"]["entrywidth"] == 1
    frame = pd.DataFrame({"strategy": ["maxnn"], "preset": ["paper-pcm-c1.5 (adc_bits=6, t_inference=3600)"],
                          "budget": [0.125], "mean": [0.1257], "std": [float("nan")], "n_seeds": [1]})
    fig = figures.metric_vs_budget(frame, "acc", 0.1314)
    assert fig.layout.legend.entrywidth == 1 and fig.data[0].name == long
    fig = figures.share_bars({"embeddings": {"params": 10, "digital": 10, "analog": 0, "memory": 0}}, True)
    assert list(fig.data[0].y) == ["embeddings =<br>tied LM head"] and fig.layout.legend.orientation == "h"


def test_damage_scatter_log_axis_spans_the_informative_damages_only():
    """A tiny model's damages: error bars reaching to ~0 and one damage of 1e-24 nats stretched the log axis to
    1e-24. The axis now starts just under the lowest damage within 10^-4 of the largest, and the title counts the
    experts below that and those <= 0."""
    crit = [np.array([0.02, 0.03, 0.05, 0.07, 0.1])]
    dmg = [np.array([1e-9, 1.5e-8, 1e-24, -2e-9, 2.6e-8])]
    se = [np.array([3e-9, 1e-9, 1e-9, 1e-9, 5e-8])]     # the first and last bars reach below 0
    fig = figures.damage_scatter(crit, dmg, se, [0], "MaxNNScore")
    lo, hi = fig.layout.yaxis.range
    assert lo == pytest.approx(np.log10(1e-9) - 0.3) and hi == pytest.approx(np.log10(2.6e-8 + 5e-8) + 0.15)
    assert list(fig.data[0].y) == [1e-9, 1.5e-8, 2.6e-8]
    assert "1 expert ≤ 0 not on log axes" in fig.layout.title.text
    assert "1 below 2.6e-12 nats (10^-4 of the largest) not shown" in fig.layout.title.text


def test_one_number_formatter_reads_rounding_as_0_and_missing_as_n_a():
    """results.number is the dashboard's and the CLI's formatter: float rounding (-1.056e-14, a std of 4.97e-16
    over five equal results) reads 0 at the shown precision, never "-0.0000"; missing values read n/a, never
    NaN, nan or None; real small numbers stay."""
    from hetmoe_core.results import NA, as_text, number
    assert number(-1.056e-14) == "0" and number(-4e-15, ".4f") == "0.0000" and number(4.97e-16, ".3g", 3.32) == "0"
    assert number(-0.00001, ".4f") == "0.0000" and number(4.5e-8, ".3g", 450.0) == "0" and number(4.5e-8) == "4.5e-08"
    assert [number(x) for x in (None, float("nan"), pd.NA, np.float64("nan"))] == [NA] * 4
    assert number(-1e-8) == "-1e-08" and number(0.00123) == "0.00123" and number(-5.111e4) == "-5.111e+04"
    assert list(as_text(pd.DataFrame({"m": [1.5, None, -3e-15]}), {"m": ".4f"}).m) == ["1.5000", NA, "0.0000"]


def test_cli_prints_numbers_as_the_dashboard_does(tmp_path, capsys, example_results):
    """`runs --summary` printed the recovered fraction at budget 0 as -4.192e-15, the spread of equal results as
    ± 4.97e-16 and missing numbers as NaN or blank; `runs` printed NaN where the dashboard says n/a."""
    from hetmoe_core.cli import main
    path = example_results(tmp_path / "ex.duckdb")
    where = ["--where", "task=hetmoe_ppl_bible_en", "--where", "strategy=maxnn,ideal",
             "--where", "preset=paper-pcm-c2.5,ideal"]
    assert main(["runs", "--store", str(path), "--summary", *where]) == 0
    out = capsys.readouterr().out
    assert "e-1" not in out and "NaN" not in out and "nan" not in out
    full = next(ln for ln in out.splitlines() if " maxnn " in ln and " 1.000 " in ln and "bits_per_byte" in ln)
    assert " ± 0 " in full                                  # five equal results at a full digital budget
    rec = [ln.split() for ln in out.split("recovered fraction of the")[1].splitlines() if " maxnn " in ln]
    at0 = next(r for r in rec if r[1] == "bits_per_byte" and r[4] == "0")
    assert at0[6:9] == ["0", "0", "0"] and at0[9] == "n/a"  # recovered and its interval; no lm-eval stderr
    assert main(["runs", "--store", str(path), *where, "--max-rows", "3"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:4]
    assert all(r.split()[8] == "n/a" for r in rows), rows   # stderr of a perplexity: none from lm-eval


def test_results_page_opens_on_the_sessions_last_run_else_the_most_results_at_the_newest_limit(tmp_path):
    """Task: the session's last evaluation when it is of the model shown, else the task with the most results (not
    the first by name). Limit: the session's run, else the newest stored result's limit (not the largest), else the
    last choice. On a real store: task "b" holds most results; its newest result ran limit 4 after a limit-20 one."""
    from hetmoe_core.store import Store
    st = Store(tmp_path / "r.duckdb")
    for i, (task, limit, seed) in enumerate([("a", 2, 0), ("b", 20, 0), ("b", 20, 1), ("b", 4, 0)]):
        st.put_result(f"k{i}", {"model_source": "default", "model_fingerprint": "fp", "strategy": "maxnn",
                                "budget": 0.25, "preset": "p", "seed": seed, "task": task, "limit": limit},
                      [{"task": task, "metric": "acc", "value": 0.5, "stderr": 0.1, "seed": seed}])
    rows = st.summary_frame()
    assert results.opening_task(rows, "fp", {}) == "b"                      # the most results, not "a" by name
    mine = {"model_fingerprint": "fp", "task": "a", "limit": 2}
    assert results.opening_task(rows, "fp", mine) == "a"                     # this session's run
    assert results.opening_task(rows, "fp", {**mine, "model_fingerprint": "other"}) == "b"   # of another model
    assert results.opening_task(rows, "fp", {**mine, "task": "gone"}) == "b"  # a task with no row here
    limits = results.limit_choices(rows[rows.task == "b"])
    assert limits == [4, 20]
    assert results.opening_limit(st, limits, "fp", "b", {}) == 0             # newest stored: 4, not the largest 20
    assert results.opening_limit(st, limits, "fp", "b", {**mine, "task": "b", "limit": 20}) == 1   # session's run
    assert results.opening_limit(st, limits, "fp", "b", mine) == 0           # its run was of task "a": the store
    assert results.opening_limit(st, limits, "fp", "b", {**mine, "task": "b", "limit": results.ALL}) == 1
    assert results.opening_limit(st, [4, 20, results.ALL], "fp", "b", {}) == 0
    assert results.session_run(None) == {}


def test_text_widths_fit_the_longest_text():
    """Results table columns as wide as their longest text (auto-sizing with pinned columns cut "MaxNNSc")."""
    view = pd.DataFrame({"strategy": ["ideal", "MaxNNScore"], "preset": ["ideal", "x" * 100]})
    assert results.text_widths(view, ("strategy", "preset", "absent")) == {"strategy": round(10 * 7.6 + 30),
                                                                           "preset": 420}
