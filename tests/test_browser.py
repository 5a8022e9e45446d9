"""The dashboard in a real browser: `streamlit run app.py` on a free port, Debian's headless Chromium via Playwright.

Opens every page, drags the digital budget, runs a small evaluation, downloads a snapshot and the HTML report.
Screenshots go to test-artifacts/ (git-ignored). The store is a tmp DuckDB file (HETMOE_STORE).
"""
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
PAGES = {"": "Model anatomy", "learn": "Learn", "sensitivity": "Expert sensitivity", "validate": "Validate the criteria",
         "placement": "Digital placement", "evaluate": "Noisy evaluation", "results": "Results", "share": "Share"}
CHARTS = ("", "learn", "sensitivity", "placement")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(store: Path, name: str, **env_extra):
    """`streamlit run app.py` on a free port with ``store`` as HETMOE_STORE; yields the base URL."""
    port = _free_port()
    env = dict(os.environ, HETMOE_STORE=str(store), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", **env_extra)
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, (ARTIFACTS / f"{name}.log").read_text()
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "results.duckdb"
    with _serve(store, "server") as base:
        yield base, store


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


OUTSIDE = []
"""Every request the browser sent to another host than the app's (nothing may leave the machine)."""


def _new_page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 2000}, accept_downloads=True)
    pg = ctx.new_page()
    pg.on("request", lambda r: OUTSIDE.append(r.url)
          if not r.url.startswith(("http://127.0.0.1", "data:", "blob:", "file:")) else None)
    return pg


@pytest.fixture(scope="module")
def page(server, browser):
    return _new_page(browser)


def idle(pg, quiet_ms=800, timeout=90):
    """Wait until Streamlit's running indicator and every loading skeleton have been gone for ``quiet_ms``."""
    t0, since = time.time(), None
    while time.time() - t0 < timeout:
        running = pg.locator("[data-testid='stStatusWidget'], [data-testid='stSkeleton']").count() > 0
        since = None if running else (since or time.time())
        if since and (time.time() - since) * 1000 > quiet_ms:
            return
        pg.wait_for_timeout(100)
    raise AssertionError("the app kept running")


def no_errors(pg, name):
    assert pg.locator("[data-testid='stException']").count() == 0, f"exception element on {name}"
    text = pg.locator("[data-testid='stMain']").inner_text()
    assert "Traceback" not in text, f"traceback text on {name}"
    assert pg.locator("[data-testid='stAlertContentError']").count() == 0, f"error message on {name}: {text[:500]}"


def shot(pg, name):
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def walk(server, page):
    """Every page of the app opened once, in order, in the module's first tab (a fresh browser context): what the
    two tests below check of it. Opening the eight pages costs a cold server about 30 s, so it is done once.

    Returns {"t0": start (time.time()), "times": ["<page>: <s since t0> s"], "charts": {page: number of Plotly
    charts}, "errors": {page: AssertionError text of ``no_errors`` or None}, "outside": the requests sent to other
    hosts meanwhile, "deploy": Deploy buttons on the last page}."""
    base, _ = server
    pg = page
    OUTSIDE.clear()
    t0, times, charts, errors = time.time(), [], {}, {}
    for name, title in PAGES.items():
        pg.goto(f"{base}/{name}?model=default")
        pg.get_by_role("heading", level=1).filter(has_text=title).wait_for(timeout=90000)
        if name in CHARTS:
            pg.wait_for_selector(".js-plotly-plot", timeout=90000)
        idle(pg)
        try:
            no_errors(pg, name or "model")
            errors[name] = None
        except AssertionError as e:
            errors[name] = str(e)
        shot(pg, name or "model")
        times.append(f"{name or 'model'}: {time.time() - t0:.1f} s")
        charts[name] = pg.locator(".js-plotly-plot").count()
    deploy = pg.get_by_role("button", name="Deploy").count() + pg.locator("[data-testid='stAppDeployButton']").count()
    return {"t0": t0, "times": times, "charts": charts, "errors": errors, "outside": list(OUTSIDE), "deploy": deploy}


def test_dashboard_in_chromium(server, page, walk):
    base, store = server
    pg = page
    t0, times = walk["t0"], list(walk["times"])
    for name in PAGES:
        assert walk["errors"][name] is None, walk["errors"][name]
        if name in CHARTS:
            assert walk["charts"][name] >= 1, f"no chart on {name or 'model'}"

    # Placement: drag the budget to 100 % with the keyboard; the digital share and the URL follow
    pg.goto(f"{base}/placement?model=default&budget=0.125")
    idle(pg)
    share = pg.locator("[data-testid='stMetric']").filter(has_text="Digital parameter share")
    before = share.locator("[data-testid='stMetricValue']").inner_text()
    joules = pg.locator("[data-testid='stMetric']").filter(has_text="Energy per token")   # the energy block
    e_before = joules.locator("[data-testid='stMetricValue']").inner_text()
    pg.locator("[data-testid='stSlider'] input[type='range']").first.focus()
    pg.keyboard.press("End")
    idle(pg)
    after = share.locator("[data-testid='stMetricValue']").inner_text()
    assert float(after.rstrip("%")) > float(before.rstrip("%")), (before, after)
    e_after = joules.locator("[data-testid='stMetricValue']").inner_text()
    assert float(e_after.split()[0]) > float(e_before.split()[0]), (e_before, e_after)   # µJ: digital costs more
    assert "budget=1" in pg.url
    no_errors(pg, "placement after slider")
    shot(pg, "placement_100")

    # Evaluate: a small run with a progress bar, then the Results page shows it
    pg.goto(f"{base}/evaluate?model=default")
    idle(pg)
    limit = pg.locator("input[aria-label='Limit (documents per task, 0 = all)']")
    limit.fill("2")
    limit.press("Enter")
    idle(pg)
    pg.get_by_role("button", name="Run").click()
    pg.locator("[data-testid='stProgress']").wait_for(timeout=30000)      # one progress bar while it runs
    t_run = time.time()
    pg.get_by_text("Done:").wait_for(timeout=240000)
    times.append(f"evaluation: {time.time() - t_run:.1f} s (until {time.time() - t0:.1f} s)")
    idle(pg)
    no_errors(pg, "evaluate after run")
    shot(pg, "evaluate_done")
    pg.goto(f"{base}/results?model=default")
    idle(pg)
    assert pg.locator(".js-plotly-plot").count() == 2          # score vs budget, score vs energy per token
    assert pg.get_by_text("Pareto front").count() >= 1
    no_errors(pg, "results")
    shot(pg, "results_after_run")
    times.append(f"results after the run: until {time.time() - t0:.1f} s")

    # Share: download a snapshot and the HTML report
    pg.goto(f"{base}/share?model=default")
    idle(pg)
    with pg.expect_download() as d:
        pg.get_by_role("button", name="Download snapshot (.zip)").click()
    snap = ARTIFACTS / "snapshot.zip"
    d.value.save_as(snap)
    assert "manifest.json" in zipfile.ZipFile(snap).namelist()
    pg.get_by_role("button", name="Build the HTML report").click()   # built on request: seconds for many results
    pg.get_by_role("button", name="Download HTML report").wait_for(timeout=120000)
    with pg.expect_download() as d:
        pg.get_by_role("button", name="Download HTML report").click()
    report = ARTIFACTS / "report.html"
    d.value.save_as(report)
    html = report.read_text()
    assert "<html" in html.lower() and "plotly" in html.lower()
    pg.goto(report.as_uri())
    pg.wait_for_selector(".js-plotly-plot", timeout=30000)
    shot(pg, "report")
    times.append(f"snapshot and report: until {time.time() - t0:.1f} s")

    # Validate: a small measurement (2 seeds, 256 tokens), then the same request answered from the store. On the
    # tiny model (16 experts, under a second; the default's 64 take 15-25 s): the default's measurement through
    # the same page is checked number by number in test_validate_page.py
    pg.goto(f"{base}/validate?model=tiny:olmoe")
    idle(pg)
    seeds = pg.locator("input[aria-label='Seeds']")
    seeds.fill("2")
    seeds.press("Enter")
    idle(pg)
    pg.locator("[data-testid='stSelectbox']").filter(has_text="Tokens").click()
    pg.get_by_role("option", name="256", exact=True).click()
    idle(pg)
    t_val = time.time()
    pg.get_by_role("button", name="Measure").click()
    pg.get_by_text("Measured in").wait_for(timeout=600000)
    times.append(f"validate: {time.time() - t_val:.1f} s")
    idle(pg)
    no_errors(pg, "validate")
    assert pg.locator(".js-plotly-plot").count() >= 5   # damage/MaxNNScore heatmaps, scatter, correlations, dense
    shot(pg, "validate")
    pg.get_by_role("button", name="Measure").click()
    pg.get_by_text("From the store").wait_for(timeout=30000)
    idle(pg)
    no_errors(pg, "validate cached")
    times.append(f"end: {time.time() - t0:.1f} s")
    (ARTIFACTS / "timings.txt").write_text("\n".join(times) + "\n")


def nav(pg, name):
    """Click the sidebar navigation link ``name``."""
    pg.get_by_test_id("stSidebarNavItems").get_by_role("link", name=name, exact=True).click()


def sidebar_intact(pg, name):
    """The sidebar still holds the model source, device and dtype widgets (the white-screen bug wiped them)."""
    sb = pg.locator("[data-testid='stSidebarUserContent']")
    for label in ("Source", "Device", "dtype"):
        assert sb.get_by_text(label, exact=True).count() >= 1, f"sidebar lost {label!r} after {name}"


def test_errors_never_white_screen_and_enter_loads(server, browser, tmp_path):
    """H12: after an offline hub id, a bad budget, an invalid zip after a valid one, the sidebar stays and every
    page still draws; a hub id or a local folder + Enter loads the model or says clearly why not."""
    base, _ = server
    pg = _new_page(browser)
    pg.goto(f"{base}/placement?model=default")
    idle(pg)
    pg.get_by_text("Hub id", exact=True).click()
    idle(pg)
    box = pg.locator("input[aria-label='Hub id']")
    box.fill("someorg/not-a-model")
    box.press("Enter")
    idle(pg)
    err = pg.locator("[data-testid='stAlertContentError']")
    assert err.count() == 1 and "someorg/not-a-model" in err.inner_text() and "Default" in err.inner_text()
    sidebar_intact(pg, "an offline hub id")
    for name, title in (("sensitivity", "Expert sensitivity"), ("evaluate", "Noisy evaluation")):
        pg.get_by_role("link", name=name.capitalize()).click()
        pg.get_by_role("heading", level=1).filter(has_text=title).wait_for(timeout=60000)
        idle(pg)
        sidebar_intact(pg, f"navigating to {name} after the error")
    # a local folder (the shipped default's) + Enter loads it
    from hetmoe_core.models import DEFAULT_DIR
    pg.get_by_text("Local folder", exact=True).click()
    idle(pg)
    folder = pg.locator("input[aria-label='Folder']")
    folder.fill(str(DEFAULT_DIR))
    folder.press("Enter")
    idle(pg)
    assert "OlmoeForCausalLM" in pg.locator("[data-testid='stSidebarUserContent']").inner_text()
    no_errors(pg, "evaluate with a local folder")
    # a bad budget on Evaluate: a clear error in percent, then a good one: the page comes back whole
    budgets = pg.locator("input[aria-label='Digital budgets (%)']")
    budgets.fill("150")
    budgets.press("Enter")
    idle(pg)
    text = pg.locator("[data-testid='stAlertContentError']").inner_text()
    assert "150 %" in text and "0-100 %" in text and "[0, 1]" not in text
    sidebar_intact(pg, "a bad budget")
    budgets.fill("12.5")
    budgets.press("Enter")
    idle(pg)
    no_errors(pg, "evaluate after fixing the budget")
    nav(pg, "Share")
    pg.get_by_role("heading", level=1).filter(has_text="Share").wait_for(timeout=60000)
    idle(pg)
    sidebar_intact(pg, "share")
    nav(pg, "Placement")
    pg.get_by_role("heading", level=1).filter(has_text="Digital placement").wait_for(timeout=60000)
    idle(pg)
    no_errors(pg, "placement at the end")
    sidebar_intact(pg, "the whole walk")
    shot(pg, "no_white_screen")
    pg.context.close()


def test_no_request_leaves_the_machine_and_no_deploy_button(walk):
    """H19 / M4: every page of the app (the walk, in a fresh browser context), and not one request to another host
    (the page icon used to fetch a Material Symbols SVG from fonts.gstatic.com); no Deploy button."""
    assert len(walk["charts"]) == len(PAGES)
    assert walk["outside"] == [], sorted(set(walk["outside"]))
    assert walk["deploy"] == 0


def _tick_values(pg, chart, axis="xtick"):
    """Numbers of a Plotly chart's axis tick labels, as drawn (Unicode minus and thin spaces normalised)."""
    texts = chart.locator(f"g.{axis} text").all_text_contents()
    return [float(t.replace("\u2212", "-").replace("\u2009", "").replace(",", "")) for t in texts if t and t.strip()]


def test_sensitivity_click_picks_the_expert_and_log_ticks_read(server, browser):
    """H13: clicking a point of the MaxNNScore vs frequency scatter picks that expert (before: KeyError: 0 from
    Plotly's typed-array customdata); H18: log tick labels are full, increasing numbers ("0.4 0.5 … 1 2")."""
    base, _ = server
    pg = _new_page(browser)
    pg.goto(f"{base}/sensitivity?model=default")
    scatter = pg.locator("[data-testid='stPlotlyChart']").filter(has_text="activation frequency vs MaxNNScore")
    scatter.wait_for(timeout=90000)
    idle(pg)
    ticks = _tick_values(pg, scatter)
    assert len(ticks) >= 2 and ticks == sorted(ticks) and len(set(ticks)) == len(ticks), ticks
    points = scatter.locator("g.trace.scatter path.point")
    target = points.nth(points.count() - 1)      # the last trace's last expert
    target.scroll_into_view_if_needed()
    box = target.bounding_box()
    pg.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    idle(pg)
    no_errors(pg, "sensitivity after a click")
    layer = pg.locator("[data-testid='stSelectbox']").filter(has_text="MoE layer (decoder index)")
    expert = pg.locator("[data-testid='stSelectbox']").filter(has_text="Expert")
    from hetmoe_core.models import load_model
    a = load_model("default").anatomy
    assert layer.locator("input").input_value() == str(a.moe_layers[-1].layer)
    assert expert.locator("input").input_value().startswith(f"{a.moe_layers[-1].num_experts - 1} ")
    pg.context.close()


def test_learn_toy_keeps_state_and_reads_well(server, browser):
    """H18 in the browser: the toy's slider keeps its value after another page; its log axes read as increasing
    numbers; at c = 0 the chart still shows every expert (at 0)."""
    base, _ = server
    pg = _new_page(browser)
    pg.goto(f"{base}/learn?model=default")
    pg.locator("[data-testid='stPlotlyChart']").first.wait_for(timeout=90000)
    idle(pg)
    toy = pg.locator("[data-testid='stPlotlyChart']").filter(has_text="output error under").first
    for axis in ("xtick", "ytick"):
        ticks = _tick_values(pg, toy, axis)
        assert len(ticks) >= 2 and ticks == sorted(ticks), (axis, ticks)
    slider = pg.locator("[data-testid='stSlider']").filter(has_text="Programming noise scale c")
    slider.locator("input[type='range']").focus()
    pg.keyboard.press("Home")                     # c = 0
    idle(pg)
    zero = pg.locator("[data-testid='stPlotlyChart']").filter(has_text="c = 0").first
    zero.wait_for(timeout=60000)
    assert zero.locator("path.point").count() >= 16, "the c = 0 chart must still show the experts"
    assert "every expert's output error is 0" in zero.text_content()
    nav(pg, "Model")
    pg.get_by_role("heading", level=1).filter(has_text="Model anatomy").wait_for(timeout=60000)
    idle(pg)
    nav(pg, "Learn")
    pg.get_by_role("heading", level=1).filter(has_text="Learn").wait_for(timeout=60000)
    idle(pg)
    assert float(slider.locator("input[type='range']").input_value()) == 0.0
    pg.context.close()


def test_evaluate_run_disabled_and_cancel_answers(server, browser):
    """H17: while a sweep runs, Run is disabled; Cancel answers at once with a toast, and the sweep stops with
    what finished stored. The answer time goes to test-artifacts/timings_cancel.txt (speed lives in bench/)."""
    base, _ = server
    pg = _new_page(browser)
    pg.goto(f"{base}/evaluate?model=default")
    pg.get_by_role("heading", level=1).filter(has_text="Noisy evaluation").wait_for(timeout=60000)
    idle(pg)
    _run_sweep(pg)
    run = pg.get_by_role("button", name="Run")
    run.wait_for()
    assert run.is_disabled(), "Run must be disabled while the evaluation runs"
    cancel = pg.get_by_role("button", name="Cancel")
    cancel.wait_for(timeout=60000)
    t0 = time.time()
    cancel.click()
    # the answer: the toast, or the panel's "Cancelling …" / the outcome should a starved browser miss the
    # toast's 4 s on screen
    answered = pg.locator("[data-testid='stToast']").filter(has_text="Cancelling").or_(
        pg.get_by_text("Cancelling …")).or_(pg.get_by_text("Cancelled after")).first
    clicks = 1
    try:
        answered.wait_for(timeout=30000)
    except Exception:
        # Once in a CI run under heavy load the toast never came (not reproduced here in 6 runs, 3 of them with
        # 3 busy loops beside). Keep what the page showed, then tell a lost click (Cancel still offered: a user
        # clicks again) from a real failure (the run stopped on its own).
        shot(pg, "cancel_no_answer")
        text = pg.locator("[data-testid='stMain']").inner_text()
        (ARTIFACTS / "cancel_no_answer.txt").write_text(text)
        assert "The evaluation stopped" not in text and "Done:" not in text, text[:800]
        cancel.click()
        clicks = 2
        answered.wait_for(timeout=30000)
    answer = time.time() - t0
    pg.get_by_text("Cancelled after").wait_for(timeout=120000)
    stopped = time.time() - t0
    idle(pg)
    assert pg.get_by_role("button", name="Run").is_enabled()
    (ARTIFACTS / "timings_cancel.txt").write_text(f"toast after {answer:.2f} s ({clicks} click(s)), "
                                                 f"stopped after {stopped:.2f} s\n")
    pg.context.close()


def test_classroom_three_sessions_three_models(tmp_path, browser):
    """M1: three tabs on three models move their budget sliders at once against a server whose model cache has
    room for none: a model in use by one session's run is never released under it (before: 'NoneType' object
    has no attribute 'fingerprint')."""
    with _serve(tmp_path / "results.duckdb", "classroom", HETMOE_MODEL_CACHE_SHARE="1e-12") as base:
        pages = []
        for model in ("default", "tiny:olmoe", "tiny:mixtral"):
            pg = _new_page(browser)
            pg.goto(f"{base}/placement?model={model}")
            pg.locator("[data-testid='stMetric']").filter(has_text="Digital parameter share").wait_for(timeout=300000)
            pages.append(pg)
        for pg in pages:
            idle(pg)
        for _ in range(3):
            for key in ("End", "Home"):
                for pg in pages:              # all three before waiting: the runs overlap on the server
                    pg.locator("[data-testid='stSlider'] input[type='range']").first.focus()
                    pg.keyboard.press(key)
                for pg in pages:
                    idle(pg, quiet_ms=300, timeout=300)
                    assert pg.locator("[data-testid='stException']").count() == 0, \
                        pg.locator("[data-testid='stException']").first.inner_text()
                    no_errors(pg, "placement during the classroom run")
        for pg in pages:
            pg.context.close()


@pytest.fixture(scope="module")
def examples_server(tmp_path_factory, example_results):
    """A server whose store holds the example results (measured sensitivity of both paper presets included)."""
    store = example_results(tmp_path_factory.mktemp("examples") / "results.duckdb")
    with _serve(store, "examples_server") as base:
        yield base


_CUT = """() => {
  const out = [];
  const width = el => { const r = document.createRange(); r.selectNodeContents(el); return r.getBoundingClientRect().width; };
  document.querySelectorAll('[data-testid="stMetricValue"]').forEach(e =>
    out.push([e.innerText, Math.round(width(e)), e.getBoundingClientRect().width]));
  document.querySelectorAll('.js-plotly-plot').forEach(p => p.querySelectorAll('.gtitle').forEach(t =>
    out.push([t.textContent, Math.round(t.getBoundingClientRect().right), p.getBoundingClientRect().right])));
  return out; }"""
"""[text, right end or width of the text, room it has] of every metric value and chart title on the page."""


@pytest.mark.parametrize("size", [(1280, 800), (1920, 1080)])
def test_validate_cards_and_titles_are_not_cut(examples_server, browser, size):
    """The best criterion's label ("Max neuron norm of gate_proj") and the damage heatmap's subtitle fit their room
    at a laptop's and a desktop's width (a quarter-width card cut the label to "Max neuro…", one subtitle line ran
    past the half-width chart)."""
    pg = browser.new_page(viewport={"width": size[0], "height": size[1]})
    pg.goto(f"{examples_server}/validate?model=default")
    pg.get_by_text("Rank correlations").first.wait_for(timeout=120000)
    idle(pg)
    no_errors(pg, "validate")
    got = pg.evaluate(_CUT)
    assert any(t.startswith("Max neuron norm") or t in ("MaxNNScore", "Router norm") for t, _, _ in got)
    assert any("white:" in t for t, _, _ in got)
    cut = [(t, w, room) for t, w, room in got if w > room + 1]
    assert not cut, cut
    pg.screenshot(path=str(ARTIFACTS / f"validate_{size[0]}.png"), full_page=True)
    pg.close()


def test_reloaded_evaluate_page_shows_the_running_jobs_request(examples_server, browser):
    """A reload during a run brings back its progress (page_job) and now its form too: the inputs show the running
    request, not the defaults. The Backend radio group is reachable by its name (screen readers, get_by_role)."""
    pg = _new_page(browser)
    pg.goto(f"{examples_server}/evaluate?model=default")
    pg.get_by_role("heading", level=1).filter(has_text="Noisy evaluation").wait_for(timeout=60000)
    idle(pg)
    backend = pg.get_by_role("radiogroup", name="Backend")
    assert backend.count() == 1 and backend.get_by_role("radio", name="aihwkit").count() == 1
    _run_sweep(pg)
    assert "eval_job=" in pg.url
    pg.reload()
    pg.locator("[data-testid='stProgress']").wait_for(timeout=60000)    # the job found again
    idle(pg)
    shown = {label: pg.locator(f"input[aria-label='{label}']").input_value() for label in _SWEEP_FORM}
    assert shown == _SWEEP_FORM
    pg.get_by_role("button", name="Cancel").click()
    pg.get_by_text("Cancelled after").wait_for(timeout=120000)
    pg.context.close()


_CHIPS = """() => [...document.querySelectorAll('[data-testid="stMultiSelect"]')].map(ms => {
  const box = ms.getBoundingClientRect();
  return [ms.querySelector('label')?.textContent, [...ms.querySelectorAll('[data-tag] > span[title]')].map(t =>
    [t.title, Math.round(t.getBoundingClientRect().left), Math.round(t.getBoundingClientRect().right),
     t.scrollWidth - t.clientWidth]), Math.round(box.left), Math.round(box.right)]; })"""
"""[label, [[chip text, left, right, hidden px of its text]], left, right] of every multiselect on the page."""


@pytest.mark.parametrize("width", [820, 1280])
def test_results_filter_chips_are_not_cut(examples_server, browser, width):
    """Every filter's chips wrap inside their box and show their whole text, at a narrow and a laptop width: the
    Strategies chip 'Activation frequency' read 'cy' (a single scrolled row cut the chips at the column's edge),
    the Presets chip 'pap…' at 820 px and the Backends chip 'f…' at 1280 px (columns of a sixth of the page)."""
    pg = browser.new_page(viewport={"width": width, "height": 800})
    pg.goto(f"{examples_server}/results?model=default")
    pg.get_by_text("Paired differences between strategies").wait_for(timeout=120000)
    idle(pg)
    no_errors(pg, "results")
    got = {label: (chips, lo, hi) for label, chips, lo, hi in pg.evaluate(_CHIPS)}
    assert "Activation frequency" in [c[0] for c in got["Strategies"][0]] and len(got["Strategies"][0]) >= 7
    assert [c[0] for c in got["Backends"][0]] == ["fast"] and len(got["Presets"][0]) == 2
    for label, (chips, lo, hi) in got.items():
        assert all(lo <= left and right <= hi and hidden <= 0 for _, left, right, hidden in chips), \
            (label, chips, lo, hi)
    pg.close()


@pytest.mark.parametrize("width", [820, 1280])
def test_placement_metric_values_are_not_cut(examples_server, browser, width):
    """The Placement page's eight metrics show their whole values at 820 px (four columns cut "9.19…" µJ and
    "8,16…" tokens/s): they wrap onto further rows instead (ui.metric_row), and stay four in a row at 1280 px."""
    pg = browser.new_page(viewport={"width": width, "height": 1600})
    pg.goto(f"{examples_server}/placement?model=default")
    pg.get_by_text("Energy per token").first.wait_for(timeout=120000)
    idle(pg)
    no_errors(pg, "placement")
    got = [(t, w, room) for t, w, room in pg.evaluate(_CUT)]
    values = [t for t, _, _ in got]
    assert any(t.endswith("µJ") for t in values) and any(t.endswith(" MB") for t in values), values
    cut = [(t, w, room) for t, w, room in got if w > room + 1]
    assert not cut, cut
    tops = pg.evaluate("""() => [...document.querySelectorAll('[data-testid="stMetric"]')].map(m =>
        Math.round(m.getBoundingClientRect().top))""")
    assert len(tops) >= 8 and len(set(tops[:4])) == (1 if width == 1280 else 2), tops
    pg.close()


_TICKS = """() => [...document.querySelectorAll('.js-plotly-plot')].map(p => {
  const boxes = sel => [...p.querySelectorAll(sel)].map(t => { const r = t.getBoundingClientRect();
    return [t.textContent, r.left, r.right, r.top, r.bottom]; });
  return {x: boxes('.xtick text'), y: boxes('.ytick text'), left: p.getBoundingClientRect().left}; })"""
"""Per chart: x and y tick labels as [text, left, right, top, bottom] and the chart's left edge."""


def test_chart_tick_labels_read_apart_in_a_narrow_column(browser, tmp_path):
    """Charts drawn by Plotly in Chromium at the widths they get at 820 px: the damage heatmap's 16 expert labels do
    not overlap (beside the MaxNNScore heatmap they ran together), the routing-drift share axis of a ~0 drift has
    no two ticks alike ("0% 0% 0% 1% 1% 1%"), and the bar chart's module labels start inside the chart
    ("beddings = tied LM head")."""
    import numpy as np
    from hetmoe_core import figures
    rng = np.random.default_rng(0)
    experts = [{"layer": l, "expert": e, "only_this": float(v), "only_this_se": 1e-4}
               for l in range(4) for e, v in enumerate(rng.choice([-1e-3, 1e-5, 1e-3, 1e-2], 16))]
    drift = [{"layer": i, "changed_share": 1e-4 * i, "changed_share_se": None, "load_max_over_mean_ideal": 2.0,
              "load_max_over_mean_noisy": 2.0} for i in range(2)]
    kinds = {k: {"params": 10 ** 6, "digital": d, "analog": 10 ** 6 - d, "memory": 0}
             for k, d in (("embeddings", 10 ** 6), ("attention", 10 ** 6), ("experts", 10 ** 5))}
    figs = [(figures.damage_heatmap({"experts": experts, "preset": "paper-pcm-c1.5"}), 470),
            (figures.routing_drift({"routing_drift": drift}), 470), (figures.share_bars(kinds, True), 290)]
    html = "".join(f.to_html(full_html=False, include_plotlyjs=i == 0, default_width=w)
                   for i, (f, w) in enumerate(figs))
    (tmp_path / "charts.html").write_text(f"<html><body style='margin:0'>{html}</body></html>")
    pg = browser.new_page(viewport={"width": 820, "height": 1600})
    pg.goto(f"file://{tmp_path / 'charts.html'}")
    pg.wait_for_function("document.querySelectorAll('.js-plotly-plot .xtick').length > 0")
    heat, drift_ax, bars = pg.evaluate(_TICKS)
    xs = sorted(heat["x"], key=lambda t: t[1])
    assert [t[0] for t in xs] == [str(i) for i in range(16)]
    assert all(a[2] <= b[1] for a, b in zip(xs, xs[1:])), xs            # no two expert labels overlap
    shares = [t[0] for t in drift_ax["y"]]
    assert len(shares) >= 3 and len(set(shares)) == len(shares), shares
    assert all(t[1] >= bars["left"] for t in bars["y"]), bars["y"]
    assert any("tied LM head" in t[0] for t in bars["y"])
    pg.close()


_SWEEP_FORM = {"Limit (documents per task, 0 = all)": "4", "Seeds": "3", "Digital budgets (%)": "0, 25, 50, 75"}


def _run_sweep(pg) -> None:
    """Type a 4-budget x 3-seed sweep into the Evaluate form (each field confirmed with Enter), press Run and wait
    for its progress bar."""
    for label, value in _SWEEP_FORM.items():
        box = pg.locator(f"input[aria-label='{label}']")
        box.fill(value)
        box.press("Enter")
        idle(pg)
    pg.get_by_role("button", name="Run").click()
    pg.locator("[data-testid='stProgress']").wait_for(timeout=60000)


def test_back_button_needs_one_press_per_view(server, browser):
    """Each page view adds one browser-history entry: the view's parameters go into the URL in one write (each
    st.query_params item set was a history entry of its own: ~5 per view, so Back took several presses)."""
    base, _ = server
    pg = _new_page(browser)
    pg.goto(f"{base}/placement?model=default")
    written = "['strategy=', 'budget=', 'preset=', 'scope='].every(q => location.search.includes(q))"
    pg.wait_for_function(written, timeout=90000)     # the view is in the URL (a loaded machine may be slow)
    idle(pg)
    first = pg.evaluate("history.length")
    nav(pg, "Sensitivity")
    pg.wait_for_function("location.pathname.endsWith('/sensitivity') && " + written, timeout=90000)
    idle(pg)
    assert pg.evaluate("history.length") - first <= 1
    pg.go_back()
    idle(pg)
    assert "/placement" in pg.url, pg.url
    pg.context.close()


def test_share_link_opened_in_a_new_tab_keeps_the_scope(server, browser):
    """Placement with tiny:qwen3_moe, router norm, budget 0.375, scope global showed "Per layer 2 4"; the Share
    page's link, opened in a new tab, showed "3 3" (scope layer: the link carried no scope). Also a dense module
    turned analog travels with it."""
    base, _ = server
    pg = _new_page(browser)

    def per_layer(p):
        return (p.locator("[data-testid='stMetric']").filter(has_text="Per layer")
                .locator("[data-testid='stMetricValue']").inner_text())

    pg.goto(f"{base}/placement?model=tiny:qwen3_moe&strategy=router_norm&budget=0.375")
    pg.get_by_role("heading", level=1).filter(has_text="Digital placement").wait_for(timeout=90000)
    idle(pg)
    layer = per_layer(pg)
    pg.locator("[data-testid='stRadio']").filter(has_text="Scope").get_by_text("global", exact=True).click()
    idle(pg)
    shown = per_layer(pg)
    assert (layer, shown) == ("3 3", "2 4")
    assert "scope=global" in pg.url
    nav(pg, "Share")
    pg.get_by_role("heading", level=1).filter(has_text="Share").wait_for(timeout=90000)
    idle(pg)
    link = pg.locator("[data-testid='stCode'] code").first.inner_text().strip()
    assert link.startswith(f"{base}/placement?") and "scope=global" in link and "model=tiny%3Aqwen3_moe" in link, link
    tab = _new_page(browser)
    tab.goto(link)
    tab.get_by_role("heading", level=1).filter(has_text="Digital placement").wait_for(timeout=90000)
    idle(tab)
    assert per_layer(tab) == "2 4"
    no_errors(tab, "placement opened from the share link")
    pg.context.close()
    tab.context.close()
