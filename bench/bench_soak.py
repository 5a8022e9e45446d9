"""Classroom soak of the dashboard in headless Chromium (prints figures; never a test).

    python bench/bench_soak.py                      # 1 and 3 sessions, model switches, RSS per step (~3 min)
    python bench/bench_soak.py --moves 10 --switches 4
    python bench/bench_soak.py --server-arg=--runner.postScriptGC=false      # the control run of issue M
    HETMOE_GC_FREEZE=0 python bench/bench_soak.py                            # without ui's gc.freeze()

One `streamlit run app.py` server; N browser sessions on /placement, each on its own model (default, tiny:olmoe,
tiny:mixtral). Steps: one session moving the budget slider (End / Home), then three sessions moving theirs at the
same time, then model switches in one session, then every session closed and the server left idle. Printed per
step: the server's RSS (psutil, MiB) and the median / p90 of click -> redrawn chart: milliseconds from the key press
in the page until the placement heatmap shows the new digital experts (all of them at 100 %, none at 0 %),
timed in the page itself (key-press event to the DOM change). Goals (issue M): median < 300 ms with one session,
< 1 s with three at once, RSS flat after the sessions close.
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
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MODELS = ("default", "tiny:olmoe", "tiny:mixtral")
HEAT = "red squares: digital experts"
SQUARES = """(c) => { let n = c.querySelectorAll('g.scatterlayer path.point').length;
    for (const p of c.querySelectorAll('g.scatterlayer path.js-line')) n += ((p.getAttribute('d') || '').match(/M/g) || []).length;
    return n; }"""
"""Digital experts drawn in a heatmap chart: a marker each (before) or one square of the outline path each (``M``)."""
COUNT_JS = """([title]) => { const squares = """ + SQUARES + """;
  for (const c of document.querySelectorAll("[data-testid='stPlotlyChart']"))
    if (c.textContent.includes(title)) return squares(c);
  return -1; }"""
WAIT_JS = """([title, n]) => { const squares = """ + SQUARES + """;
  for (const c of document.querySelectorAll("[data-testid='stPlotlyChart']"))
    if (c.textContent.includes(title) && squares(c) === n) return window.__t0 ? performance.now() - window.__t0 : -1;
  return false; }"""
KEY_JS = """() => { if (!window.__keyed) { window.__keyed = true;
  document.addEventListener('keydown', () => { window.__t0 = performance.now(); }, true); } }"""
"""Each key press stamps ``window.__t0`` in the page: WAIT_JS returns ms from it to the redraw, on the page's own
clock (no round trip to this process is counted), checked on each DOM mutation."""


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra_args, env_extra=None):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HETMOE_STORE=str(Path(tempfile.mkdtemp()) / "soak.duckdb"), **(env_extra or {}))
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true", *extra_args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            assert proc.poll() is None, "the server exited"
            time.sleep(0.1)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:      # a loaded machine: do not leave the server behind
        proc.kill()
        proc.wait(15)


def rss_mib(proc) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 2**20


def cpu_s(proc) -> float:
    """The server's own CPU seconds so far (user + system, all threads): independent of other load."""
    c = psutil.Process(proc.pid).cpu_times()
    return c.user + c.system


def open_session(browser, base, model):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1600})
    pg = ctx.new_page()
    pg.goto(f"{base}/placement?model={model}&budget=0")
    pg.wait_for_function(WAIT_JS, arg=[HEAT, 0], timeout=180000)
    pg.wait_for_timeout(500)
    return pg


def experts(pg) -> int:
    """Digital markers at 100 %: every routed expert of the session's model."""
    return pg.locator("[data-testid='stMetric']").filter(has_text="Digital routed experts") \
        .locator("[data-testid='stMetricValue']").inner_text().split("/")[1].strip()


ON_MUTATION = """([arg, timeout]) => new Promise((resolve, reject) => {
  const cond = %s;
  const obs = new MutationObserver(() => { const r = cond(arg); if (r !== false) { obs.disconnect(); resolve(r); } });
  const r = cond(arg);
  if (r !== false) return resolve(r);
  obs.observe(document.body, {childList: true, subtree: true, attributes: true, characterData: true});
  setTimeout(() => { obs.disconnect(); reject(new Error('no redraw within ' + timeout + ' ms')); }, timeout); })"""


def redraw_ms(pg, predicate: str, arg, timeout_ms: int = 120000) -> float:
    """Wait until ``predicate`` (a WAIT_JS-like function of ``arg``) holds, checked in the page on each DOM
    mutation; ms from the last key press (window.__t0) to that moment, on the page's clock."""
    return float(pg.evaluate(ON_MUTATION % predicate, [arg, timeout_ms]))


def moves(pages, n_moves) -> list[float]:
    """n_moves slider moves on every page at once (End, Home, ...); ms from each press to that page's redraw."""
    totals = {id(pg): int(experts(pg)) for pg in pages}
    out = []
    for pg in pages:
        pg.evaluate(KEY_JS)
    for i in range(n_moves):
        key, want = ("End", None) if i % 2 == 0 else ("Home", 0)
        for pg in pages:
            pg.evaluate("() => { window.__t0 = 0; }")
            pg.locator("[data-testid='stSlider'] input[type='range']").first.focus()
            pg.keyboard.press(key)
        for pg in pages:
            n = totals[id(pg)] if want is None else 0
            out.append(redraw_ms(pg, WAIT_JS, [HEAT, n]))
        for pg in pages:        # the run after the redraw (URL sync, bars) ends before the next move
            pg.wait_for_timeout(150)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moves", type=int, default=20, help="slider moves per step and session")
    ap.add_argument("--switches", type=int, default=10, help="model switches in the switching step")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `streamlit run` option (repeatable)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright
    proc, base = start_server(args.server_arg)
    print(f"server {' '.join(args.server_arg) or '(defaults)'}, HETMOE_GC_FREEZE="
          f"{os.environ.get('HETMOE_GC_FREEZE', '1')}; RSS at start {rss_mib(proc):.0f} MiB")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            one = open_session(browser, base, MODELS[0])
            moves([one], 2)                                   # warm: every cache of the page filled
            cpu0 = cpu_s(proc)
            t = moves([one], args.moves)
            cpu = (cpu_s(proc) - cpu0) / len(t) * 1e3
            print(f"1 session : click -> redraw median {statistics.median(t):.0f} ms, p90 {pct(t, 0.9):.0f} ms "
                  f"over {len(t)} moves (goal < 300 ms); server CPU {cpu:.0f} ms per move; "
                  f"RSS {rss_mib(proc):.0f} MiB")
            pages = [one] + [open_session(browser, base, m) for m in MODELS[1:]]
            print(f"3 sessions open: RSS {rss_mib(proc):.0f} MiB")
            t = moves(pages, args.moves)
            print(f"3 sessions: click -> redraw median {statistics.median(t):.0f} ms, p90 {pct(t, 0.9):.0f} ms "
                  f"over {len(t)} moves at once (goal < 1000 ms); RSS {rss_mib(proc):.0f} MiB")
            switch = ["tiny:qwen2_moe", "default", "tiny:olmoe", "tiny:mixtral"]
            for i in range(args.switches):
                m = switch[i % len(switch)]
                one.goto(f"{base}/placement?model={m}&budget=0")
                one.wait_for_function(WAIT_JS, arg=[HEAT, 0], timeout=180000)
                print(f"switch {i + 1:2d} to {m:15s}: RSS {rss_mib(proc):.0f} MiB")
            for pg in pages:
                pg.context.close()
            browser.close()
        t_close, closed = time.time(), []
        for wait in (5, 10, 15):
            time.sleep(wait)
            closed.append(rss_mib(proc))
            print(f"sessions closed, idle {time.time() - t_close:3.0f} s: RSS {closed[-1]:.0f} MiB")
        print(f"RSS after the sessions closed: {closed[0]:.0f} -> {closed[-1]:.0f} MiB, change "
              f"{closed[-1] - closed[0]:+.0f} MiB (goal: flat, within +-10 MiB -> "
              f"{'met' if abs(closed[-1] - closed[0]) <= 10 else 'NOT met'})")
    finally:
        stop_server(proc)
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
