"""The HTML report's charts: one per (task, metric, limit), budget in %, the ideal line from the same limit, and a
missing limit said in words — checked on the HTML written from a real DuckDB store."""
import base64
import json
import re

import numpy as np
import pytest

from hetmoe_core.evaluate import plan, source_fingerprint
from hetmoe_core.report import write_report
from hetmoe_core.results import ALL, chart_groups, limit_label
from hetmoe_core.store import Store

FP = source_fingerprint("default")
IDEAL = {4: 0.71, None: 0.83}          # the all-digital result differs per limit


def _put(st: Store, limit):
    """Ideal + maxnn at budgets 0, 12.5 % and 50 % on hetmoe_cloze with ``limit`` documents (None: all)."""
    for s in plan("default", fingerprint=FP, tasks="hetmoe_cloze", budgets=(0.0, 0.125, 0.5), limit=limit):
        value = IDEAL[limit] if s.ideal else 0.4 + s.budget / 10
        st.put_result(s.key, {**s.row(), "duration_s": 1.0, "digital_share": 0.2},
                      [{"task": s.task.name, "metric": "acc", "value": value, "stderr": 0.01, "seed": s.seed}])


def _figures(html: str) -> list[dict]:
    """The plotly figures embedded in the report ({"data", "layout"} each)."""
    m = re.search(r'<script type="application/json" id="figures">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


def _values(a) -> list:
    """A plotly array as JSON holds it: a list, or (plotly >= 6) typed binary {"dtype", "bdata" (base64)}."""
    if isinstance(a, dict):
        return np.frombuffer(base64.b64decode(a["bdata"]), dtype=a["dtype"]).tolist()
    return list(a)


def test_report_has_one_chart_per_limit_in_percent_with_its_own_ideal(tmp_path):
    st = Store(tmp_path / "r.duckdb")
    _put(st, 4)
    _put(st, None)
    groups = chart_groups(st.summary_frame())
    assert [(t, m, lim, len(g)) for t, m, lim, g in groups] == [("hetmoe_cloze", "acc", 4, 4),
                                                                 ("hetmoe_cloze", "acc", ALL, 4)]
    assert limit_label(float("nan")) == limit_label(None) == limit_label(ALL) == "all documents"
    assert limit_label(4.0) == "4 documents per task"

    rep = write_report(st, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert rep["figures"] == 2 and rep["recovery_figures"] == 2
    figs = _figures(html)
    assert len(figs) == 4
    rec = [f["layout"]["title"]["text"] for f in figs if "recovered fraction" in f["layout"]["title"]["text"]]
    assert sorted(t.split(" · ")[-1] for t in rec) == ["4 documents per task", "all documents"]
    by_title = {f["layout"]["title"]["text"]: f for f in figs if "recovered fraction" not in f["layout"]["title"]["text"]}
    four = next(f for t, f in by_title.items() if "4 documents per task" in t)
    every = next(f for t, f in by_title.items() if "all documents" in t)
    for f, ideal in ((four, IDEAL[4]), (every, IDEAL[None])):
        (line,) = f["data"]                                     # one strategy line: limits never share a chart
        assert _values(line["x"]) == [0.0, 12.5, 50.0]                   # budget in %, as on the dashboard
        assert _values(line["y"]) == pytest.approx([0.4, 0.4125, 0.45])
        assert f["layout"]["xaxis"]["range"] == [-3, 103] and "%" in f["layout"]["xaxis"]["title"]["text"]
        (hline,) = f["layout"]["shapes"]                        # the ideal line of this chart's own limit
        assert hline["y0"] == hline["y1"] == pytest.approx(ideal)
    # no "nan" anywhere the report speaks (plotly.js itself, the first script, is skipped)
    body = html[html.index("</script>", html.index("plotly.js v")):]
    assert not re.search(r"\bnan\b", body, re.I), re.search(r".{60}\bnan\b.{60}", body, re.I | re.S)
    assert "limit nan" not in html and "<td>all documents</td>" in html and "<td>4 documents per task</td>" in html
    assert "<td>12.5</td>" in html and "<td>0.125</td>" not in html   # the table's budget is in % too


def test_energy_figures_are_split_by_limit_too(tmp_path):
    """Score vs energy per token: results at limit 4 and at every document give one figure each."""
    from hetmoe_core.models import anatomy_of, tiny_model
    from hetmoe_core.placement import place
    a = anatomy_of(tiny_model("olmoe"))
    st = Store(tmp_path / "r.duckdb")
    for i, (limit, b) in enumerate((lim, b) for lim in (4, None) for b in (0.0, 0.5)):
        p = place(a, "maxnn", b)
        st.put_result(f"k{i}", {"model_source": "tiny:olmoe", "model_fingerprint": "tiny:olmoe:seed0",
                                "strategy": "maxnn", "budget": b, "scope": "layer", "preset": "paper-pcm-c1.5",
                                "seed": 0, "backend": "fast", "task": "hetmoe_cloze", "limit": limit,
                                "placement_key": p.key},
                      [{"task": "hetmoe_cloze", "metric": "acc", "value": 0.4 + b / 10, "seed": 0}],
                      {"key": p.key, "model_fingerprint": "tiny:olmoe:seed0", "strategy": "maxnn", "budget": b,
                       "scope": "layer", "seed": 0, "placement": p.to_json()})
    rep = write_report(st, tmp_path / "r.html")
    titles = [f["layout"]["title"]["text"] for f in _figures((tmp_path / "r.html").read_text())]
    energy = [t for t in titles if "energy per token" in t]
    assert rep["figures"] == 2 and rep["energy_figures"] == 2 and len(energy) == 2
    assert any("4 documents per task" in t for t in energy) and any("all documents" in t for t in energy)


def _put_two(st: Store, stderr: float | None = 0.01):
    """Ideal + MaxNNScore and Activation frequency at budgets 0 and 50 % under two presets, 3 seeds: paper-pcm-c2.5
    loses 0.2 accuracy on every seed (resolved), paper-pcm-c1.5's loss changes sign between seeds (inside the noise)."""
    from hetmoe_core.sweep import plan
    analog = {"paper-pcm-c2.5": [0.50, 0.52, 0.48], "paper-pcm-c1.5": [0.71, 0.68, 0.70]}
    for s in plan("default", fingerprint=FP, strategies=["maxnn", "frequency"], budgets=(0.0, 0.5), seeds=3,
                  presets=list(analog)):
        a = analog.get(s.preset, [0.0] * 3)[s.seed]
        value = 0.70 if s.ideal else a if s.budget == 0 else a + (0.1 if s.strategy == "maxnn" else 0.05)
        st.put_result(s.key, {**s.row(), "duration_s": 1.0, "digital_share": 0.2},
                      [{"task": s.task.name, "metric": "acc", "value": value, "stderr": stderr, "seed": s.seed,
                        "higher_is_better": True}])


def _paired_table(html: str) -> tuple[list[str], list[list[str]], str]:
    """(headers, rows of cells, the notes after it) of the report's paired-differences table."""
    sec = html.split("<h2>Paired differences between strategies</h2>")[1].split("<h2>")[0]
    heads = [re.sub("<[^>]+>", "", h) for h in re.findall(r"<th[^>]*>.*?</th>", sec)]
    rows = [re.findall(r"<td>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", sec.split("<tbody>")[1])]
    return heads, rows, sec.split("</table>")[1]


def test_report_paired_table_reads_as_the_charts_labels_percent_and_na(tmp_path):
    """The paired table names strategies as the charts do and budgets in %, like the Results page; a metric without
    lm-eval stderr reads "n/a" with a footnote of why, never a blank cell."""
    st = Store(tmp_path / "r.duckdb")
    _put_two(st, stderr=None)
    write_report(st, tmp_path / "r.html")
    heads, rows, notes = _paired_table((tmp_path / "r.html").read_text())
    assert heads[:9] == ["task", "metric", "limit", "preset", "digital budget", "strategy A", "strategy B", "seeds",
                         "A − B"]
    row = dict(zip(heads, rows[0]))
    assert (row["digital budget"], row["strategy A"], row["strategy B"]) == ("50%", "Activation frequency",
                                                                            "MaxNNScore")
    assert row["verdict"] == "MaxNNScore better" and float(row["A − B"]) == pytest.approx(-0.05)
    assert all(dict(zip(heads, r))["sampling SE"] == "n/a" for r in rows) and len(rows) == 2   # two presets
    assert "sampling SE n/a: lm-eval reports no standard error for acc" in notes
    assert not any(c in ("", "maxnn", "frequency", "0.5") for r in rows for c in r)


def test_report_one_plotlyjs_strategy_colours_and_no_fraction_inside_the_noise(tmp_path):
    from hetmoe_core.figures import NOT_RESOLVED, STRATEGY_COLORS
    st = Store(tmp_path / "r.duckdb")
    _put_two(st)
    write_report(st, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    figs = _figures(html)
    assert html.count("plotly.js v") == 1 and not any("template" in f["layout"] for f in figs)   # one library,
    score, rec = figs[:2]                                                                         # one template
    colour = {}
    for tr in score["data"] + rec["data"]:       # colour = strategy on every chart, dash = preset
        colour.setdefault(tr["name"].split(" · ")[0], set()).add(tr["line"]["color"])
    assert colour == {"MaxNNScore": {STRATEGY_COLORS["maxnn"]}, "Activation frequency": {STRATEGY_COLORS["frequency"]}}
    dashes = {tr["name"].split(" · ")[1]: tr["line"]["dash"] for tr in score["data"]}
    assert dashes["paper-pcm-c1.5"] != dashes["paper-pcm-c2.5"]
    # the recovered fraction: only the resolved preset is drawn, and the chart says why the other is not
    assert sorted(tr["name"] for tr in rec["data"]) == ["Activation frequency · paper-pcm-c2.5",
                                                        "MaxNNScore · paper-pcm-c2.5"]
    mx = next(tr for tr in rec["data"] if tr["name"].startswith("MaxNNScore"))
    assert _values(mx["y"]) == pytest.approx([0.0, np.mean([0.1 / (0.70 - a) for a in (0.50, 0.52, 0.48)])])
    assert any(NOT_RESOLVED.split(":")[0] in a["text"] for a in rec["layout"]["annotations"])
    # the legend sits below the plot and the figure grows for it instead of shrinking the plot
    assert score["layout"]["legend"]["yref"] == "container" and score["layout"]["margin"]["b"] >= 60 + 21 * 2


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium (Debian's, via Playwright) for this module's drawing checks."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_report_charts_do_not_overlap_in_chromium(tmp_path, chromium):
    """Rendered in headless Chromium at 1300 and 1920 px: every drawn chart keeps inside its own box."""
    st = Store(tmp_path / "r.duckdb")
    _put_two(st)
    write_report(st, tmp_path / "r.html")
    js = """() => [...document.querySelectorAll('.fig')].filter(e => e.querySelector('.main-svg')).map(e => {
        const r = e.querySelector('.main-svg').getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })"""
    for width in (1300, 1920):
        page = chromium.new_page(viewport={"width": width, "height": 1400})
        page.goto((tmp_path / "r.html").as_uri())
        page.wait_for_function("document.querySelectorAll('.fig .main-svg').length >= 2", timeout=30000)
        boxes = page.evaluate(js)
        assert len(boxes) >= 2
        (l1, t1, r1, b1), (l2, t2, r2, b2) = boxes[:2]
        assert abs(t1 - t2) < 1 and r1 <= l2 and r2 <= width     # side by side, no overlap, on screen
        for i, (l, t, r, bt) in enumerate(boxes):
            for (l_, t_, r_, b_) in boxes[i + 1:]:
                assert r <= l_ + 1 or r_ <= l + 1 or bt <= t_ + 1 or b_ <= t + 1
        page.close()


def test_legend_rows_drawn_are_the_rows_counted_at_any_width(tmp_path, chromium):
    """A score chart with 7 strategies x 2 presets + references, drawn in Chromium in a 606 px cell (the report's
    grid at 1300 px) and a 1000 px one: the whole legend lies inside the figure (before: Plotly put one entry per
    row in the narrow cell, so the last six entries fell below the figure's bottom edge)."""
    import pandas as pd
    import plotly.io as pio
    from hetmoe_core.figures import STRATEGY_LABELS, metric_vs_budget
    rows = [dict(strategy=s, preset=p, budget=b, mean=1 + b + i / 10, std=0.01, n_seeds=5)
            for i, s in enumerate(list(STRATEGY_LABELS)[:7]) for p in ("paper-pcm-c1.5", "paper-pcm-c2.5")
            for b in (0.125, 0.25, 0.5)]
    fig = metric_vs_budget(pd.DataFrame(rows), "word_perplexity", ideal=1.0,
                           all_analog={"paper-pcm-c1.5": 1.5, "paper-pcm-c2.5": 2.0}, higher_is_better=False)
    assert len(fig.data) == 17
    html = pio.to_html(fig, include_plotlyjs=True, full_html=True, default_width="100%",
                       config={"responsive": True})
    inside = """() => { const L = document.querySelector('.legend').getBoundingClientRect(),
        F = document.querySelector('.main-svg').getBoundingClientRect(); return [L.bottom, F.bottom, L.right, F.right]; }"""
    for width in (606, 1000):
        (tmp_path / "f.html").write_text(html.replace("<body>", f"<body style='width:{width}px;margin:0'>"))
        page = chromium.new_page(viewport={"width": width, "height": 1200})
        page.goto((tmp_path / "f.html").as_uri())
        page.wait_for_selector(".legend", timeout=30000)
        lb, fb, lr, fr = page.evaluate(inside)
        assert lb <= fb + 1 and lr <= fr + 1, (width, lb, fb, lr, fr)
        page.close()


def test_recovery_note_and_error_bars_stay_inside_the_plot_in_chromium(tmp_path, chromium):
    """The README sweep's shape drawn in headless Chromium at 1300 px: the "no noise loss … not shown" note of the
    recovered-fraction chart lies inside the plot, right of the y-axis title (before: one 100-character line,
    centred, that ran under the title and off the right edge), and the accuracy chart's outermost error-bar caps
    keep 6 % of the plot's height from its edges (before: Plotly's autorange left 15 px, 5 %, and the lowest cap
    sat on the bottom gridline, where it read as cut off by the axis)."""
    from hetmoe_core.sweep import plan
    st = Store(tmp_path / "r.duckdb")
    acc = {"paper-dac-adc-8bit": [0.18] * 3, "paper-pcm-c2.5": [0.14, 0.16, 0.18]}   # ideal 0.16: no loss
    for s in plan("default", fingerprint=FP, strategies=["maxnn"], budgets=(0.0, 0.125), seeds=3, limit=50,
                  presets=list(acc)):
        det = s.preset == "paper-dac-adc-8bit"
        st.put_result(s.key, {**s.row(), "duration_s": 1.0, "compute_key": f"{s.preset}{s.budget}"
                              f"{'' if det else s.seed}" if not s.ideal else "ideal"},
                      [{"task": s.task.name, "metric": "acc", "value": 0.16 if s.ideal else acc[s.preset][s.seed],
                        "stderr": 0.05, "seed": s.seed, "higher_is_better": True}])
    write_report(st, tmp_path / "r.html")
    page = chromium.new_page(viewport={"width": 1300, "height": 1400})
    page.goto((tmp_path / "r.html").as_uri())
    page.wait_for_function("document.querySelectorAll('.fig .main-svg').length >= 2", timeout=30000)
    box = "e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; }"
    figs = page.query_selector_all(".fig")
    rec = next(f for f in figs if "recovered fraction of the noise loss" in f.text_content())
    score = next(f for f in figs if "acc (higher is better)" in f.text_content())
    pl, pt, pr, pb = rec.query_selector(".nsewdrag").evaluate(box)          # the plot area
    note = rec.query_selector_all(".annotation")[-1]
    assert "no noise loss" in note.text_content()
    nl, nt, nr, nb = note.evaluate(box)
    assert rec.query_selector(".ytitle").evaluate(box)[2] < nl and pl <= nl and nr <= pr and pt <= nt and nb <= pb
    pl, pt, pr, pb = score.query_selector(".nsewdrag").evaluate(box)
    bars = [b.evaluate(box) for b in score.query_selector_all(".errorbar path")]
    room = 0.06 * (pb - pt)
    assert bars and all(pt + room < t and b < pb - room for _, t, _, b in bars if b > t), (pt, pb, bars)
    page.close()
