"""Paired recovery statistics on real stored results: a tiny model's noisy evaluations in a real DuckDB file."""
import math

import numpy as np
import pytest
import torch

from hetmoe_core.evaluate import evaluate_many
from hetmoe_core.models import LoadedModel, load_model
from hetmoe_core.paired import (INSIDE_NOISE, NO_LOSS, combined_deltas, combined_recovery, noise_loss, paired_deltas,
                                recovery_table, t_interval)
from hetmoe_core.store import Store


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    lm = load_model("tiny:olmoe")
    with torch.no_grad():   # random 0.05-scale weights predict near-uniformly; x10 makes the noise visible
        for p in lm.model.parameters():
            if p.dim() >= 2:
                p.mul_(10)
    lm = LoadedModel(lm.model, lm.tokenizer, lm.anatomy, "tiny-x10", "test:tiny-olmoe-x10")
    db = tmp_path_factory.mktemp("paired") / "r.duckdb"
    evaluate_many("tiny-x10", lm=lm, store=db, strategies=["maxnn", "router_norm"], budgets=[0.0, 0.5, 1.0],
                  presets=["paper-pcm-c2.5"], seeds=2, tasks=["hetmoe_ppl_sotu", "hetmoe_ppl_pycode"], limit=1)
    return Store(db, create=False).runs_frame().assign(_db=str(db))


def test_tiny_models_loss_is_inside_the_noise_so_no_fraction(stored):
    """The tiny model's noise loss is ~1e-4 bits and changes sign between seeds: no fraction, a reason instead."""
    t = recovery_table(stored)
    assert t.recovered.isna().all() and t.recovered_lo.isna().all() and set(t.recovered_note) <= {INSIDE_NOISE, NO_LOSS}
    s = stored[(stored.task == "hetmoe_ppl_sotu") & (stored.metric == "bits_per_byte")]
    ideal = s[s.strategy == "ideal"].value.iloc[0]
    loss = [s[(s.budget == 0) & (s.seed == x) & (s.strategy == "maxnn")].value.iloc[0] - ideal for x in range(2)]
    m, lo, hi, _ = t_interval(loss)           # lower is better: A - I > 0 is a loss
    row = t[(t.task == "hetmoe_ppl_sotu") & (t.metric == "bits_per_byte")].iloc[0]
    assert row.recovered_note == (NO_LOSS if m <= 0 else INSIDE_NOISE if lo <= 0 else "")
    assert paired_deltas(stored).delta_recovered.isna().all()   # nor a difference of two such fractions


def test_all_digital_recovers_one_and_all_analog_zero(stored):
    t = recovery_table(stored, require_resolved=False)           # the raw per-seed ratios, arithmetic checked
    assert set(t.task) == {"hetmoe_ppl_sotu", "hetmoe_ppl_pycode"} and (t.n_seeds == 2).all()
    assert (t.ideal != t.analog).all()                       # the noise costs something on every metric
    b0, b1 = t[t.budget == 0], t[t.budget == 1]
    assert len(b0) == len(b1) == 2 * 3 * 2                   # 2 tasks x 3 metrics x 2 strategies
    assert (b0.recovered == 0).all() and (b0.recovered_sd == 0).all()
    assert (b1.recovered == 1).all() and (b1.recovered_lo == 1).all() and (b1.recovered_hi == 1).all()
    mid = t[t.budget == 0.5]
    assert np.isfinite(mid.recovered).all() and not np.allclose(mid.recovered, 0)
    assert (mid.recovered_lo < mid.recovered).all() and (mid.recovered < mid.recovered_hi).all()
    # recomputed by hand for one cell, seed by seed
    row = mid[(mid.task == "hetmoe_ppl_sotu") & (mid.metric == "bits_per_byte") & (mid.strategy == "maxnn")].iloc[0]
    s = stored[(stored.task == "hetmoe_ppl_sotu") & (stored.metric == "bits_per_byte")]
    ideal = s[s.strategy == "ideal"].value.iloc[0]
    r = []
    for seed in range(2):
        a = s[(s.budget == 0) & (s.seed == seed) & (s.strategy == "maxnn")].value.iloc[0]
        x = s[(s.budget == 0.5) & (s.seed == seed) & (s.strategy == "maxnn")].value.iloc[0]
        r.append((a - x) / (a - ideal))
    assert row.recovered == pytest.approx(np.mean(r), rel=1e-12)
    from scipy import stats
    h = stats.t.ppf(0.975, 1) * np.std(r, ddof=1) / math.sqrt(2)
    assert (row.recovered_lo, row.recovered_hi) == pytest.approx((np.mean(r) - h, np.mean(r) + h), rel=1e-12)


def test_combined_over_tasks_and_paired_deltas(stored):
    c = combined_recovery(stored, metric="bits_per_byte")
    assert (c.n_tasks == 2).all() and (c.n_seeds == 2).all()
    assert (c[c.budget == 0].recovered == 0).all() and (c[c.budget == 1].recovered == 1).all()
    cd = combined_deltas(stored, baseline="maxnn", metric="bits_per_byte")
    assert len(cd) == 1 and (cd.a.iloc[0], cd.budget.iloc[0], cd.n_seeds.iloc[0], cd.n_tasks.iloc[0]) == \
        ("router_norm", 0.5, 2, 2)
    mid = c[c.budget == 0.5].set_index("strategy").recovered   # same seeds: mean of differences = difference of means
    assert cd.delta.iloc[0] == pytest.approx(mid["router_norm"] - mid["maxnn"], abs=1e-12)
    assert (cd.verdict.iloc[0] == "no difference") == (cd.delta_lo.iloc[0] <= 0 <= cd.delta_hi.iloc[0])
    d = paired_deltas(stored)
    assert set(d.budget) == {0.5} and set(zip(d.a, d.b)) == {("maxnn", "router_norm")}
    for r in d.itertuples():
        covers = r.delta_lo <= 0 <= r.delta_hi
        assert (r.verdict == "no difference") == covers
        if not covers:
            lower_better = r.metric in ("word_perplexity", "byte_perplexity", "bits_per_byte")
            assert r.verdict == ("maxnn better" if (r.delta < 0) == lower_better else "router_norm better")
    import pandas as pd
    twin = stored[stored.strategy == "maxnn"].assign(strategy="twin")   # the same results under another name
    same = paired_deltas(pd.concat([stored, twin]), baseline="maxnn")
    same = same[same.a == "twin"]
    assert len(same) == 2 * 3 and (same.delta == 0).all() and (same.verdict == "no difference").all()


def test_report_and_cli_show_recovery_and_paired_deltas(stored, tmp_path):
    import json
    import subprocess
    import sys
    from hetmoe_core.report import write_report
    db = stored._db.iloc[0]
    out = write_report(db, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert out["recovery_figures"] == 2 and out["paired"] == 2   # 2 tasks x word_perplexity (the headline metric)
    assert "recovered fraction of the noise loss" in html and "Paired differences between strategies" in html
    p = subprocess.run([sys.executable, "-m", "hetmoe_core", "runs", "--store", db, "--summary", "--json"],
                       capture_output=True, text=True, check=True)
    d = json.loads(p.stdout)
    rec = {(r["task"], r["metric"], r["strategy"], r["budget"]): r for r in d["recovery"]}
    cell = rec[("hetmoe_ppl_sotu", "bits_per_byte", "maxnn", 0.0)]    # the tiny model's loss is inside the noise
    assert cell["recovered"] is None and cell["recovered_note"] in (INSIDE_NOISE, NO_LOSS)
    assert {r["verdict"] for r in d["paired"]} <= {"no difference", "maxnn better", "router_norm better"}
    text = subprocess.run([sys.executable, "-m", "hetmoe_core", "runs", "--store", db, "--summary"],
                          capture_output=True, text=True, check=True).stdout
    assert "paired deltas a - b" in text and "recovered fraction" in text
    assert "recovered fraction not shown" in text and "not shown" in text.split("recovered fraction of the")[1]


def test_t_interval_edge_cases():
    assert all(math.isnan(v) for v in t_interval([]))
    m, lo, hi, sd = t_interval([2.0])
    assert m == 2.0 and math.isnan(lo) and math.isnan(sd)
    m, lo, hi, sd = t_interval([1.0, 1.0, 1.0])
    assert (m, lo, hi, sd) == (1.0, 1.0, 1.0, 0.0)


def test_noise_loss_resolved_only_outside_the_noise():
    """Seeds: the 95% t interval of the loss must stay above 0; one seed: above 1.96 x lm-eval's stderr."""
    assert noise_loss({0: 0.50, 1: 0.52, 2: 0.48}, 0.70) == ""                 # accuracy down 0.2 on every seed
    assert noise_loss({0: 0.71, 1: 0.68, 2: 0.70}, 0.70) == INSIDE_NOISE      # -0.01, +0.02, 0: interval covers 0
    assert noise_loss({0: 0.72, 1: 0.73}, 0.70) == NO_LOSS                    # noise *raised* the accuracy
    assert noise_loss({0: 0.68}, 0.70, {0: 0.015}) == INSIDE_NOISE            # 0.02 <= 1.96 x 0.015
    assert noise_loss({0: 0.68}, 0.70, {0: 0.005}) == ""                      # 0.02 > 1.96 x 0.005
    assert noise_loss({0: 0.68}, 0.70, {0: None}) == ""                       # no stderr: the sign decides
    assert noise_loss({0: 262.0, 1: 263.0, 2: 262.5}, 260.0, higher_is_better=False) == ""   # perplexity up: a loss
    assert noise_loss({0: 262.0, 1: 263.0}, 260.0, higher_is_better=False) == INSIDE_NOISE   # t(1 dof) = 12.7
    assert noise_loss({0: 259.0}, 260.0, higher_is_better=False) == NO_LOSS


def test_recovery_table_hides_unresolved_groups_in_a_real_store(tmp_path):
    """Three presets of one task in a real DuckDB store: a resolved loss keeps its per-seed fraction; a loss that
    changes sign between seeds, and one where the noise helps, give NaN and their reason."""
    from hetmoe_core.evaluate import source_fingerprint
    from hetmoe_core.sweep import plan
    analog = {"paper-pcm-c2.5": [0.50, 0.52, 0.48], "paper-pcm-c1.5": [0.71, 0.68, 0.70],
              "paper-dac-adc-8bit": [0.72, 0.72, 0.72]}
    st = Store(tmp_path / "r.duckdb")
    for s in plan("default", fingerprint=source_fingerprint("default"), budgets=(0.0, 0.5), seeds=3,
                  presets=list(analog)):
        a = analog.get(s.preset, [0.0] * 3)[s.seed]
        value = 0.70 if s.ideal else a if s.budget == 0 else a + 0.1
        st.put_result(s.key, {**s.row(), "duration_s": 1.0},
                      [{"task": s.task.name, "metric": "acc", "value": value, "stderr": 0.01, "seed": s.seed,
                        "higher_is_better": True}])
    t = recovery_table(Store(tmp_path / "r.duckdb", create=False, read_only=True).runs_frame())
    half = t[t.budget == 0.5].set_index("preset")
    want = np.mean([0.1 / (0.70 - a) for a in analog["paper-pcm-c2.5"]])   # (A - X) / (A - I), X = A + 0.1
    assert half.loc["paper-pcm-c2.5", "recovered"] == pytest.approx(want, rel=1e-9)
    assert half.loc["paper-pcm-c2.5", "recovered_note"] == ""
    assert math.isnan(half.loc["paper-pcm-c1.5", "recovered"]) and half.loc["paper-pcm-c1.5", "recovered_note"] == \
        INSIDE_NOISE
    assert math.isnan(half.loc["paper-dac-adc-8bit", "recovered"]) and \
        half.loc["paper-dac-adc-8bit", "recovered_note"] == NO_LOSS
    from hetmoe_core.figures import recovery_vs_budget
    fig = recovery_vs_budget(t[t.preset == "paper-pcm-c1.5"])          # nothing resolved: words, not a line
    assert len(fig.data) == 0 and "recovered fraction not shown" in fig.layout.annotations[-1].text
    fig = recovery_vs_budget(t)
    assert [tr.name for tr in fig.data] == ["MaxNNScore · paper-pcm-c2.5"]
    assert list(fig.data[0].y) == pytest.approx([0.0, want])


# The newcomer's README sweep (hetmoe_cloze, perplexity, 50 documents): lm-eval's values and stderrs as stored.
IDEAL_PPL, IDEAL_SE = 132.136294, 77.992672
DAC = {0.0: {"maxnn": (132.160807, 77.536519), "frequency": (132.160807, 77.536519)},
       0.125: {"maxnn": (131.537419, 77.594032), "frequency": (133.876589, 79.159301)},
       0.25: {"maxnn": (131.961295, 77.669981), "frequency": (133.250430, 78.276572)}}
PCM = {0.0: [142.211607, 135.297190, 141.290230], 0.125: {"maxnn": [143.674644, 135.552827, 139.850984],
                                                          "frequency": [134.488721, 128.286873, 136.376553]}}


def _sweep_store(path, dac=DAC, se_scale=1.0, compute_key=True):
    """A real store holding a sweep as evaluate stores it: paper-dac-adc-8bit is deterministic, so each (strategy,
    budget) is computed once (seed 0) and seeds 1, 2 are copies (same compute_key, shared_from = seed 0's key;
    budget 0 is one model for both strategies); paper-pcm-c2.5 computes every seed."""
    from hetmoe_core.evaluate import source_fingerprint
    from hetmoe_core.sweep import plan
    st = Store(path)
    first = {}
    for s in plan("default", fingerprint=source_fingerprint("default"), budgets=(0.0, 0.125), seeds=3,
                  presets=["paper-dac-adc-8bit", "paper-pcm-c2.5"], strategies=["maxnn", "frequency"], limit=50):
        if s.ideal:
            v, se, comp = IDEAL_PPL, IDEAL_SE, "ideal"
        elif s.preset == "paper-dac-adc-8bit":
            (v, se), comp = dac[s.budget][s.strategy], f"dac-{s.budget}-{s.strategy if s.budget else ''}"
        else:
            v = PCM[0.0][s.seed] if s.budget == 0 else PCM[s.budget][s.strategy][s.seed]
            se, comp = 0.58 * v, f"pcm-{s.budget}-{s.strategy if s.budget else ''}-{s.seed}"
        shared = first.setdefault(comp, s.key)
        st.put_result(s.key, {**s.row(), "duration_s": 1.0, "compute_key": comp if compute_key else None,
                              "shared_from": None if shared == s.key else shared},
                      [{"task": s.task.name, "metric": "perplexity", "value": v, "stderr": se * se_scale,
                        "seed": s.seed, "higher_is_better": False}])
    return Store(path, create=False, read_only=True).runs_frame()


def test_deterministic_preset_seeds_are_one_computation_judged_by_sampling_error(tmp_path):
    """Three copies of one deterministic result are one observation: the 0.02 perplexity noise loss against
    lm-eval's stderr of 77.5 is inside the noise (no fraction; before: +25 and -70 drawn), and A - B = 2.34 against
    a sampling error of ~111 is "no difference" (before: "maxnn better" from the zero-width interval [2.339, 2.339]
    over copies). The random preset's three seeds stay three computations."""
    from scipy import stats
    runs = _sweep_store(tmp_path / "r.duckdb")
    t = recovery_table(runs).set_index(["preset", "strategy", "budget"])
    dac = t.loc["paper-dac-adc-8bit"]
    assert (dac.n_seeds == 3).all() and (dac.n_computations == 1).all()
    assert dac.recovered.isna().all() and (dac.recovered_note == INSIDE_NOISE).all()
    assert (t.loc["paper-pcm-c2.5"].n_computations == 3).all()
    d = paired_deltas(runs).set_index(["preset", "budget"])
    row = d.loc[("paper-dac-adc-8bit", 0.125)]
    h = stats.norm.ppf(0.975) * math.hypot(79.159301, 77.594032)
    assert (row.a, row.b, row.n_seeds, row.n_computations) == ("frequency", "maxnn", 3, 1)
    assert row.delta == pytest.approx(133.876589 - 131.537419, abs=1e-9) and math.isnan(row.delta_lo)
    assert (row.sampling_lo, row.sampling_hi) == pytest.approx((2.33917 - h, 2.33917 + h), abs=1e-5)
    assert h == pytest.approx(217.256, abs=1e-3)
    assert (row.basis, row.verdict) == ("sampling error", "no difference") and math.isnan(row.delta_recovered)
    pcm = d.loc[("paper-pcm-c2.5", 0.125)]
    diffs = [PCM[0.125]["frequency"][i] - PCM[0.125]["maxnn"][i] for i in range(3)]
    assert pcm.n_computations == 3 and pcm.basis == "seeds" and math.isnan(pcm.sampling_lo)
    assert (pcm.delta_lo, pcm.delta_hi) == pytest.approx(t_interval(diffs)[1:3], rel=1e-9)
    c = combined_deltas(runs, baseline="maxnn").set_index("preset")
    assert c.loc["paper-dac-adc-8bit", "n_computations"] == 1 and \
        c.loc["paper-dac-adc-8bit", "verdict"] == "one computation: no interval"
    assert (combined_recovery(runs).set_index("preset").loc["paper-dac-adc-8bit", "n_computations"] == 1).all()
    # a store without compute keys (older schema): the deterministic config alone makes the copies one computation
    old = _sweep_store(tmp_path / "old.duckdb", compute_key=False)
    assert (recovery_table(old).set_index("preset").loc["paper-dac-adc-8bit", "n_computations"] == 1).all()
    assert paired_deltas(old).set_index(["preset", "budget"]).loc[("paper-dac-adc-8bit", 0.125), "verdict"] == \
        "no difference"


def test_deterministic_preset_outside_the_sampling_error_gets_a_verdict_and_one_fraction(tmp_path):
    """With lm-eval stderrs 10^4 x smaller the same numbers are resolved: the loss 0.0245 > 1.96 x 0.00775, so one
    fraction per cell (no interval: one computation), and A - B = 2.34 > 1.96 x 0.0111: MaxNNScore better (lower
    perplexity)."""
    runs = _sweep_store(tmp_path / "r.duckdb", se_scale=1e-4)
    t = recovery_table(runs).set_index(["preset", "strategy", "budget"]).loc["paper-dac-adc-8bit"]
    a, i = 132.160807, IDEAL_PPL
    assert (t.recovered_note == "").all() and t.recovered_lo.isna().all()
    assert t.loc[("maxnn", 0.125), "recovered"] == pytest.approx((a - 131.537419) / (a - i), rel=1e-9)
    assert t.loc[("frequency", 0.125), "recovered"] == pytest.approx((a - 133.876589) / (a - i), rel=1e-9)
    row = paired_deltas(runs).set_index(["preset", "budget"]).loc[("paper-dac-adc-8bit", 0.125)]
    assert (row.basis, row.verdict) == ("sampling error", "maxnn better") and row.sampling_lo > 0


def test_deterministic_preset_as_the_results_page_report_and_cli_show_it(tmp_path):
    import subprocess
    import sys
    from hetmoe_core.figures import NOTE_WIDTH, recovery_vs_budget
    from hetmoe_core.results import paired_view
    runs = _sweep_store(tmp_path / "r.duckdb")
    view, notes = paired_view(paired_deltas(runs), "perplexity")
    row = view[view.preset == "paper-dac-adc-8bit"].iloc[0]
    assert row["seeds"] == "1 computation (deterministic preset; 3 seeds share it)"
    assert (row["95% interval"], row["sampling interval"], row["verdict"]) == ("n/a", "[-214.9, 219.6]",
                                                                               "no difference")
    assert view[view.preset == "paper-pcm-c2.5"].iloc[0]["seeds"] == "3"
    assert any("copies of one computation" in n for n in notes)
    fig = recovery_vs_budget(recovery_table(runs))
    assert len(fig.data) == 0                           # neither preset's loss is resolved: nothing drawn
    note = fig.layout.annotations[-1].text
    assert "paper-dac-adc-8bit — noise loss inside the noise: recovered fraction not shown" in note.replace(
        "<br>  ", " ") and "3 seeds share one computation" in note.replace("<br>  ", " ")
    assert max(len(x) for x in note.split("<br>")) <= NOTE_WIDTH
    text = subprocess.run([sys.executable, "-m", "hetmoe_core", "runs", "--store", str(tmp_path / "r.duckdb"),
                           "--summary"], capture_output=True, text=True, check=True).stdout
    paired = text.split("paired deltas a - b")[1]
    assert "maxnn better" not in paired and "frequency better" not in paired
    assert "1 computation (deterministic preset; 3 seeds share it)" in paired and "-214.9" in paired
