"""Start-up time of the commands that answer from the store, as ratios to ``python -c "import torch"`` in one run.

    python bench/bench_cli.py              # 5 rounds; the store gets one real result of the default model first
    python bench/bench_cli.py --rounds 9
    python bench/bench_cli.py --root /tmp/base   # time another checkout of hetmoe (e.g. before a change)

Each round times, in fresh interpreters and interleaved (so load on a shared machine hits all alike):
``import torch``, ``runs --json``, a cache-hit ``evaluate --json``, ``export`` and ``report``. Prints the median
wall time of each, its ratio to ``import torch`` (goal: runs and cache-hit evaluate <= 0.5) and the heavy modules
(torch, transformers, aihwkit, lm_eval) each command imported (goal: none).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TQDM_DISABLE": "1"}
HEAVY = ("torch", "transformers", "aihwkit", "lm_eval")
PROBE = ("import json, sys\nfrom hetmoe_core.cli import main\nrc = main(sys.argv[1:])\nsys.stdout.flush()\n"
         f"print('HEAVY=' + json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)\nsys.exit(rc)")


def timed(argv: list[str], root: Path) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, cwd=root, env=ENV)
    dt = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"{' '.join(argv[-6:])} failed:\n{out.stderr[-2000:]}")
    heavy = [ln[6:] for ln in out.stderr.splitlines() if ln.startswith("HEAVY=")]
    return dt, json.loads(heavy[-1]) if heavy else []


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--source", default="default")
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout of hetmoe whose commands are timed")
    a = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        store, snap, html = f"{d}/r.duckdb", f"{d}/s.zip", f"{d}/r.html"
        ev = ["evaluate", a.source, "--store", store, "--tasks", "hetmoe_cloze", "--limit", "1", "--json"]
        t0 = time.perf_counter()
        subprocess.run([py, "-m", "hetmoe_core", *ev], check=True, capture_output=True, cwd=a.root, env=ENV)
        print(f"first evaluate (computes 2 results): {time.perf_counter() - t0:.1f} s")
        cmds = {"import torch": [py, "-c", "import torch"],
                "runs --json": [py, "-c", PROBE, "runs", "--store", store, "--json"],
                "evaluate (cache hit)": [py, "-c", PROBE, *ev],
                "export": [py, "-c", PROBE, "export", "--store", store, snap, "--json", "--force"],
                "report": [py, "-c", PROBE, "report", snap, "--out", html, "--json", "--force"]}
        times, heavy = {k: [] for k in cmds}, {}
        for _ in range(a.rounds):
            for k, argv in cmds.items():
                if k == "export":
                    Path(snap).unlink(missing_ok=True)
                dt, heavy[k] = timed(argv, a.root)
                times[k].append(dt)
    base = statistics.median(times["import torch"])
    print(f"{a.root}: load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; medians of {a.rounds} rounds")
    for k, ts in times.items():
        med = statistics.median(ts)
        extra = "" if k == "import torch" else f"  imports {', '.join(heavy[k]) or 'none of ' + '/'.join(HEAVY)}"
        print(f"{k:<22} {med:6.2f} s  ratio to import torch {med / base:5.2f}{extra}")


if __name__ == "__main__":
    main()
