"""The dashboard in a real browser: `streamlit run app.py` on a free port, Debian's headless Chromium via Playwright.

Opens every page, drags the digital budget, runs a small evaluation, downloads a snapshot and the HTML report.
Screenshots go to test-artifacts/ (git-ignored). The store is a tmp DuckDB file (HETMOE_STORE).
"""
import os
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    store = tmp_path_factory.mktemp("store") / "results.duckdb"
    env = dict(os.environ, HETMOE_STORE=str(store), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, (ARTIFACTS / "server.log").read_text()
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", store
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        ctx = browser.new_context(viewport={"width": 1400, "height": 2000}, accept_downloads=True)
        yield ctx.new_page()
        browser.close()


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


def test_dashboard_in_chromium(server, page):
    base, store = server
    pg = page
    t0, times = time.time(), []
    for name, title in PAGES.items():
        pg.goto(f"{base}/{name}?model=default")
        pg.get_by_role("heading", level=1).filter(has_text=title).wait_for(timeout=90000)
        if name in CHARTS:
            pg.wait_for_selector(".js-plotly-plot", timeout=90000)
        idle(pg)
        no_errors(pg, name or "model")
        shot(pg, name or "model")
        times.append(f"{name or 'model'}: {time.time() - t0:.1f} s")
        if name in CHARTS:
            assert pg.locator(".js-plotly-plot").count() >= 1, f"no chart on {name or 'model'}"

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

    # Share: download a snapshot and the HTML report
    pg.goto(f"{base}/share?model=default")
    idle(pg)
    with pg.expect_download() as d:
        pg.get_by_role("button", name="Download snapshot (.zip)").click()
    snap = ARTIFACTS / "snapshot.zip"
    d.value.save_as(snap)
    assert "manifest.json" in zipfile.ZipFile(snap).namelist()
    with pg.expect_download() as d:
        pg.get_by_role("button", name="Download HTML report").click()
    report = ARTIFACTS / "report.html"
    d.value.save_as(report)
    html = report.read_text()
    assert "<html" in html.lower() and "plotly" in html.lower()
    pg.goto(report.as_uri())
    pg.wait_for_selector(".js-plotly-plot", timeout=30000)
    shot(pg, "report")

    # Validate: a small measurement (2 seeds, 256 tokens), then the same request answered from the store
    pg.goto(f"{base}/validate?model=default")
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
