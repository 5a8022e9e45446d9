"""Dashboard speed on the default model (prints figures; never a test).

    python bench/bench_dashboard.py            # all three measurements (~1 min)
    python bench/bench_dashboard.py --no-browser

1. slider, direct: server work of one budget-slider move from cached scores — place() + digital_share() + the
   heatmap figure + its JSON (what st.plotly_chart sends) — median / p95 over budgets 0..100 % in 0.5 % steps.
2. slider, AppTest: a whole rerun of the Placement page (app frame + page) after slider.set_value(), as Streamlit's
   script runner executes it (AppTest reruns the whole page; in a browser the slider reruns only the page's
   fragment); median / p95 over 20 moves. Target < 150 ms.
3. cold start: `streamlit run app.py` spawned fresh, headless Chromium opens /sensitivity; seconds from the spawn
   until the first heatmap is drawn in the page, and the server's CPU seconds by then (independent of other load on
   the machine). Target < 5 s.
4. click -> redraw in Chromium: on Placement, a budget-slider key press (End / Home) until the heatmap shows the new
   digital experts; on Sensitivity, choosing another expert until its neuron-norm histogram is redrawn; timed in
   the page from the key press to the DOM change. Median and p90 over the moves; per move, where the work goes:
   the server's CPU ms, Chromium's CPU ms (renderer = React + Plotly) and the websocket bytes received.
   Goal (issue K item 5): median < 300 ms on both pages.

    python bench/bench_dashboard.py --redraw-only --moves 10      # measurement 4 only (~1 min)
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))
for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(v, "1")
os.environ.setdefault("HETMOE_STORE", str(Path(tempfile.mkdtemp()) / "bench.duckdb"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def slider_direct():
    from hetmoe_core import figures
    from hetmoe_core.models import load_model
    from hetmoe_core.placement import digital_share, place
    from hetmoe_core.scores import expert_scores
    lm = load_model("default")
    a, sc = lm.anatomy, expert_scores(lm.anatomy)
    layers = [m.layer for m in a.moe_layers]
    times, size = [], 0
    for i in range(201):
        t = time.perf_counter()
        p = place(a, "maxnn", i / 200, scores=sc)
        digital_share(p, a)
        size = len(figures.expert_heatmap(sc.get("maxnn"), layers, "t", "MaxNNScore", digital=p.digital,
                                          log=True).to_json())
        times.append(time.perf_counter() - t)
    return times[1:], (f"{a.model_class}, {len(layers)} MoE layers x {a.moe_layers[0].num_experts} experts; "
                       f"placement heatmap JSON at 100 %: {size / 1e3:.1f} kB")


def slider_apptest():
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    at.switch_page("pages/placement.py").run()
    at.slider(key="budget_pct").set_value(25.0).run()   # warm every cache
    times = []
    for i in range(20):
        v = float((i * 7) % 100)
        t = time.perf_counter()
        at.slider(key="budget_pct").set_value(v).run()
        times.append(time.perf_counter() - t)
        assert not at.exception, at.exception
    return times


def cold_start(model: str):
    from playwright.sync_api import sync_playwright
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                                 "--server.address", "127.0.0.1", "--server.headless", "true"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.05)
            t_up = time.perf_counter() - t0
            page.goto(f"http://127.0.0.1:{port}/sensitivity?model={model}")
            page.wait_for_selector(".js-plotly-plot .heatmaplayer, .js-plotly-plot .hm", timeout=60000)
            t_heat = time.perf_counter() - t0
            cpu = psutil.Process(proc.pid).cpu_times()      # load-independent: the server's own CPU seconds
            cpu_s = cpu.user + cpu.system
        finally:
            from bench_soak import stop_server
            stop_server(proc)
            browser.close()
    return t_up, t_heat, cpu_s


HIST_JS = """([e]) => { for (const c of document.querySelectorAll("[data-testid='stPlotlyChart']"))
    if (c.textContent.includes(`Neuron L2 norms of expert ${e},`)) return window.__t0 ? performance.now() - window.__t0 : -1;
  return false; }"""


def browser_cpu_s() -> dict:
    """CPU seconds so far of this process's Chromium children, by kind (renderer: the page's main thread, where
    React and Plotly run; gpu: compositing, in software here; browser: the rest). Independent of other load."""
    out = {}
    for c in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(c.cmdline())
            if "chrom" not in cmd:
                continue
            kind = "renderer" if "--type=renderer" in cmd else "gpu" if "--type=gpu-process" in cmd else "browser"
            t = c.cpu_times()
            out[kind] = out.get(kind, 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return out


class Meter:
    """Per move: the server's CPU ms, Chromium's CPU ms by kind, websocket bytes the page received."""

    def __init__(self, proc, pg):
        self.proc, self.bytes = proc, [0]
        pg.on("websocket", lambda ws: ws.on("framereceived", lambda f: self.bytes.__setitem__(
            0, self.bytes[0] + len(f))))

    def start(self):
        from bench_soak import cpu_s
        self.c0, self.b0, self.n0 = cpu_s(self.proc), browser_cpu_s(), self.bytes[0]

    def per_move(self, n) -> dict:
        from bench_soak import cpu_s
        b = browser_cpu_s()
        return {"server": (cpu_s(self.proc) - self.c0) / n * 1e3,
                **{k: (v - self.b0.get(k, 0.0)) / n * 1e3 for k, v in b.items()},
                "ws_kb": (self.bytes[0] - self.n0) / n / 1e3}


def redraw(n_moves: int):
    """Chromium on a fresh server: {page: (click -> redraw ms list, per-move costs)} for Placement and Sensitivity."""
    from playwright.sync_api import sync_playwright
    from bench_soak import KEY_JS, moves, open_session, redraw_ms, start_server, stop_server
    proc, base = start_server([])
    out = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            pg = open_session(browser, base, "default")
            meter = Meter(proc, pg)
            pg.reload()                                   # the websocket opens after the meter listens
            pg.wait_for_timeout(3000)
            moves([pg], 2)
            meter.start()
            t = moves([pg], n_moves)
            out["Placement (budget slider)"] = (t, meter.per_move(n_moves))
            pg.goto(f"{base}/sensitivity?model=default")
            pg.wait_for_function(HIST_JS.replace("${e},", ""), arg=[0], timeout=180000)
            pg.wait_for_timeout(1000)
            pg.evaluate(KEY_JS)
            box = pg.locator("[data-testid='stSelectbox']").filter(has_text="Expert").locator("input")
            sens_ms = []
            meter.start()
            for i in range(n_moves):
                box.click()
                pg.keyboard.type(str(i % 16))
                pg.wait_for_timeout(100)
                pg.evaluate("() => { window.__t0 = 0; }")
                pg.keyboard.press("Enter")
                sens_ms.append(redraw_ms(pg, HIST_JS, [i % 16]))
                pg.wait_for_timeout(150)
            out["Sensitivity (expert choice)"] = (sens_ms, meter.per_move(n_moves))
            browser.close()
    finally:
        stop_server(proc)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-browser", action="store_true", help="skip the cold-start measurement (needs Chromium)")
    ap.add_argument("--model", default="default", help="model source of the cold start (default, a folder, ...)")
    ap.add_argument("--moves", type=int, default=20, help="clicks per page in the Chromium redraw measurement")
    ap.add_argument("--redraw-only", action="store_true", help="only measurement 4 (Chromium click -> redraw)")
    args = ap.parse_args()
    browser = args.redraw_only or not args.no_browser
    if args.redraw_only:
        args.no_browser = True
    d, model = ([], "") if args.redraw_only else slider_direct()
    if not args.redraw_only:
        report_server_side(d, model, args)
    if browser and Path(CHROMIUM).exists():
        for name, (t, c) in redraw(args.moves).items():
            print(f"click -> redraw, {name}: median {statistics.median(t):.0f} ms (goal < 300 ms -> ratio "
                  f"{statistics.median(t) / 300:.2f}), p90 {pct(t, 0.9):.0f} ms over {len(t)} moves")
            print(f"    per move: server CPU {c.pop('server'):.0f} ms, websocket {c.pop('ws_kb'):.1f} kB received, "
                  "Chromium CPU " + ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(c.items())) +
                  " (CPU time: less load-dependent than wall time)")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def report_server_side(d, model, args):
    print(f"model: default ({model})")
    print(f"slider, direct (place + share + heatmap JSON): median {statistics.median(d) * 1e3:.1f} ms, "
          f"p95 {pct(d, 0.95) * 1e3:.1f} ms over {len(d)} budgets")
    t = slider_apptest()
    print(f"slider, AppTest full rerun of the Placement page: median {statistics.median(t) * 1e3:.0f} ms, "
          f"p95 {pct(t, 0.95) * 1e3:.0f} ms over {len(t)} moves; target 150 ms -> ratio "
          f"{statistics.median(t) / 0.150:.2f}")
    if not args.no_browser and Path(CHROMIUM).exists():
        up, heat, cpu = cold_start(args.model)
        print(f"cold start ({args.model}): server healthy after {up:.1f} s, first Sensitivity heatmap drawn after "
              f"{heat:.1f} s from spawn ({cpu:.1f} CPU s in the server); target 5 s -> ratio {heat / 5:.2f}")
    elif not args.no_browser:
        print(f"cold start: skipped ({CHROMIUM} not installed)")


if __name__ == "__main__":
    main()
