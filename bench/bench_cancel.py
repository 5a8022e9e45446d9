"""How fast Cancel stops a running evaluation / validation (prints figures; never a test).

    python bench/bench_cancel.py [--cancels 5] [--validate 3] [--browser 3 [--sweeps 2]] [--seed 0]

Core: the dashboard's own background jobs (``jobs.Job``, ``jobs.ValidationJob``) on the default model, each on a fresh
store; cancel() at a random moment (seeded) and the time until the job reports stopped (its thread ended, status
"cancelled"). For each cancel it names where the job's thread was while it kept running after the cancel (the
innermost hetmoe / lm-eval frames, sampled every 10 ms), so a slow cancel points at the code that did not check.
Evaluate sweep = the browser test's: hetmoe_cloze, limit 4, seeds 0..2, budgets 0/25/50/75 %, batch 8.

Overhead of the fine-grained checks: one forward of 32 x 256 tokens with and without the cancel pre-hooks on every
decoder layer (interleaved repetitions; median ratio, 1.00 = no cost).

Browser (``--browser N``): ``streamlit run app.py`` and headless Chromium; Run, then Cancel at a random moment;
times from the click to the toast, to the "Cancelled" message, and to Run being enabled again. Then the cost of the
page's polling (every 0.5 s while a job runs; --sweeps, slow): whole sweeps run from the page vs. the same sweep as a job of this
process without a page, alternating (the server is another process on the same cores).

The goal: the page answers within 2 s of the click. Run it on a quiet machine (``/work/quiet.sh`` here).
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(v, "1")
GOAL_S = 2.0
SWEEP = dict(strategies=["maxnn"], budgets=[0.0, 0.25, 0.5, 0.75], presets=["paper-pcm-c1.5"], seeds=3,
             tasks=["hetmoe_cloze"], limit=4, backend="fast", batch_size=8, scope="layer")


def _where(thread: threading.Thread) -> str:
    """Innermost hetmoe / lm-eval / datasets / torch frames of a running thread, innermost first."""
    frame = sys._current_frames().get(thread.ident)
    if frame is None:
        return "?"
    names = [f"{Path(f.filename).stem}:{f.name}" for f in traceback.extract_stack(frame)
             if any(p in f.filename for p in ("hetmoe_core", "lm_eval", "datasets", "torch/utils"))]
    return " < ".join(names[-3:][::-1]) or "?"


def cancel_once(start, delay: float) -> dict:
    """Start a job, cancel it after ``delay`` s; the time to stopped and where its thread spent it."""
    job = start()
    t_end = time.time() + delay
    while time.time() < t_end and job.running:
        time.sleep(0.01)
    if not job.running:
        return {"delay": delay, "latency": None, "status": job.status, "where": {}}
    t0 = time.perf_counter()
    job.cancel.set()
    seen = collections.Counter()
    while job.running:
        seen[_where(job.thread)] += 1
        time.sleep(0.01)
    return {"delay": delay, "latency": time.perf_counter() - t0, "status": job.status, "where": seen,
            "kept": job.done}


def core(n_eval: int, n_val: int, rng: random.Random) -> list[float]:
    from hetmoe_core import jobs, ui
    handle = ui.MODELS.hold(("default", "cpu", "float32"), "bench")
    tmp = Path(tempfile.mkdtemp(prefix="bench_cancel_"))
    lat = []
    for name, n, lo, hi, start in (
            ("evaluate", n_eval, 0.5, 5.0,
             lambda p: jobs.Job(handle, source="default", store=str(p), **SWEEP)),
            ("validate", n_val, 0.5, 6.0,
             lambda p: jobs.ValidationJob(handle, "paper-pcm-c1.5", 5, 16384, p))):
        for i in range(n):
            store = tmp / f"{name}{i}.duckdb"
            r = cancel_once(lambda: start(store), rng.uniform(lo, hi))
            if r["latency"] is None:
                print(f"{name} #{i}: finished ({r['status']}) before the cancel at {r['delay']:.1f} s")
                continue
            lat.append(r["latency"])
            top = ", ".join(f"{w} ({c * 10} ms)" for w, c in r["where"].most_common(2))
            print(f"{name} #{i}: cancel at {r['delay']:.1f} s -> {r['status']} after {r['latency'] * 1e3:.0f} ms, "
                  f"{r['kept']} results kept · busy in: {top or '-'}")
    ui.MODELS.release("bench")
    return lat


def overhead(reps: int = 15) -> tuple[float, float, float]:
    """Cost of the cancel checks in one 32 x 256-token forward of the default model.

    Returns (direct, spread, estimate): ``direct`` the median time ratio hooked / plain over ``reps`` alternating
    pairs of forwards and ``spread`` the half-width of the middle 50% of those ratios (on a busy machine the spread
    is larger than the effect); ``estimate`` = hooks per forward x the measured cost of one hooked call of an
    empty module (minus the plain call), divided by the median plain forward time: the same quantity without the
    machine's noise."""
    import torch
    from torch import nn
    from hetmoe_core.evaluate import cancel_hooks
    from hetmoe_core.models import load_model
    lm = load_model("default")
    ids = torch.randint(0, lm.model.config.vocab_size, (32, 256))
    ev = threading.Event()

    def fwd(hooked: bool) -> float:
        with cancel_hooks(lm.model, lm.anatomy, ev.is_set if hooked else None), torch.no_grad():
            t = time.perf_counter()
            lm.model(input_ids=ids, use_cache=False)
            return time.perf_counter() - t
    fwd(False)
    ratios, plain = [], []
    for i in range(reps):
        a, b = (fwd(False), fwd(True)) if i % 2 else (lambda b, a: (a, b))(fwd(True), fwd(False))
        ratios.append(b / a)
        plain.append(a)
    q = statistics.quantiles(ratios, n=4)
    # one check: a hooked call of an empty module minus a plain one
    probe, x, n = nn.Identity(), torch.zeros(1), 20000

    def calls() -> float:
        t = time.perf_counter()
        for _ in range(n):
            probe(x)
        return (time.perf_counter() - t) / n
    bare = min(calls() for _ in range(3))
    h = probe.register_forward_pre_hook(lambda m, a: ev.is_set() and None)
    hooked = min(calls() for _ in range(3))
    h.remove()
    with cancel_hooks(lm.model, lm.anatomy, ev.is_set):
        n_hooks = sum(len(m._forward_pre_hooks) for m in lm.model.modules())
    estimate = n_hooks * max(hooked - bare, 0.0) / statistics.median(plain)
    return statistics.median(ratios), (q[2] - q[0]) / 2, estimate


def _fill(pg, budgets: str) -> None:
    from test_browser import idle
    pg.get_by_role("heading", level=1).filter(has_text="Noisy evaluation").wait_for(timeout=60000)
    idle(pg)
    for label, value in (("Limit (documents per task, 0 = all)", "4"), ("Seeds", "3"), ("Digital budgets (%)", budgets)):
        box = pg.locator(f"input[aria-label='{label}']")
        box.fill(value)
        box.press("Enter")
        idle(pg)


def browser(n: int, rng: random.Random, sweeps: int) -> tuple[list[dict], list[tuple[float, float]]]:
    """End-to-end in Chromium: seconds from the Cancel click to the toast, the Cancelled message, Run enabled;
    then ``sweeps`` whole sweeps run through the page (polled every 0.5 s) and, alternating, the same sweep as
    a job of this process with no page at all: (page s, no-page s) pairs."""
    import re
    sys.path.insert(0, str(ROOT / "tests"))
    from playwright.sync_api import sync_playwright
    from test_browser import ARGS, CHROMIUM, _new_page, _serve
    from hetmoe_core import jobs, ui
    out, pairs = [], []
    budgets = lambda i: ", ".join(f"{x + i}" for x in (0, 25, 50, 75))  # noqa: E731  (nothing from the store)
    with tempfile.TemporaryDirectory() as tmp, _serve(Path(tmp) / "s.duckdb", "bench_cancel") as base, \
            sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for i in range(n):
            pg = _new_page(b)
            pg.goto(f"{base}/evaluate?model=default")
            _fill(pg, budgets(i))
            pg.get_by_role("button", name="Run").click()
            cancel = pg.get_by_role("button", name="Cancel")
            cancel.wait_for(timeout=60000)
            pg.wait_for_timeout(int(rng.uniform(1.0, 5.0) * 1000))
            t0 = time.time()
            cancel.click()
            pg.locator("[data-testid='stToast']").filter(has_text="Cancelling").wait_for(timeout=30000)
            toast = time.time() - t0
            pg.get_by_text("Cancelled after").wait_for(timeout=60000)
            stopped = time.time() - t0
            run = pg.get_by_role("button", name="Run")
            while not run.is_enabled():
                pg.wait_for_timeout(20)
            enabled = time.time() - t0
            out.append({"toast": toast, "stopped": stopped, "enabled": enabled})
            print(f"browser #{i}: toast {toast:.2f} s · 'Cancelled' {stopped:.2f} s · Run enabled {enabled:.2f} s")
            pg.context.close()
        handle = ui.MODELS.hold(("default", "cpu", "float32"), "bench")
        for k in range(sweeps):
            pg = _new_page(b)
            pg.goto(f"{base}/evaluate?model=default")
            _fill(pg, budgets(n + k))
            pg.get_by_role("button", name="Run").click()
            done = pg.get_by_text(re.compile(r"^Done: \d+ results in"))
            done.wait_for(timeout=180000)
            page_s = float(re.search(r"in ([0-9.]+) s", done.inner_text()).group(1))
            pg.context.close()
            job = jobs.Job(handle, source="default", store=str(Path(tmp) / f"core{k}.duckdb"),
                         **{**SWEEP, "budgets": [(x + n + k) / 100 for x in (0, 25, 50, 75)]})
            job.thread.join()
            pairs.append((page_s, job.elapsed))
            print(f"sweep #{k}: {page_s:.1f} s with the page polling, {job.elapsed:.1f} s as a job without a page")
        ui.MODELS.release("bench")
        b.close()
    return out, pairs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cancels", type=int, default=5, help="evaluations started and cancelled")
    ap.add_argument("--validate", type=int, default=3, help="validations started and cancelled")
    ap.add_argument("--browser", type=int, default=0, help="cancels through Chromium (end to end)")
    ap.add_argument("--sweeps", type=int, default=0, help="with --browser: whole sweeps with / without the page")
    ap.add_argument("--seed", type=int, default=0, help="seed of the cancel moments")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    lat = core(a.cancels, a.validate, rng)
    if lat:
        print(f"core: median {statistics.median(lat) * 1e3:.0f} ms, max {max(lat) * 1e3:.0f} ms from cancel() to "
              f"stopped over {len(lat)} cancels (goal: the page answers within {GOAL_S:g} s)")
    ratio, spread, estimate = overhead()
    print(f"cancel pre-hooks on every decoder layer, MoE block and LM head: forward time x{ratio:.3f} ± {spread:.3f} "
          f"timed directly; x{1 + estimate:.5f} from the cost of one check (1.000 = no cost)")
    if a.browser:
        rows, pairs = browser(a.browser, rng, a.sweeps)
        for k in ("toast", "stopped", "enabled"):
            print(f"browser {k}: median {statistics.median(r[k] for r in rows):.2f} s, max {max(r[k] for r in rows):.2f} s")
        print(f"goal: 'Cancelled' shown and Run enabled within {GOAL_S:g} s of the click")
        if pairs:
            print(f"whole sweep with the page polling / without a page: x{statistics.median(p / q for p, q in pairs):.2f}"
                  f" (median of {len(pairs)} alternating pairs; includes the page's own reruns)")


if __name__ == "__main__":
    main()
