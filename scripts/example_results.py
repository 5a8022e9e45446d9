#!/usr/bin/env python
"""Compute the example results shipped with hetmoe and write their snapshot (never edit the snapshot by hand).

What a class needs on the default model: the ideal (all-digital) reference; every placement strategy (oracle
included once it exists) x digital budgets 0, 12.5, 25, 50, 100 % x presets paper-pcm-c1.5, paper-pcm-c2.5 x 5
seeds, scored by per-domain perplexity (the hetmoe_ppl_<domain> lm-eval tasks, 5 held-out test passages per
domain = 16,032 tokens); plus the measured sensitivity (``sensitivity.validate``) for both presets.

Work is shared, not repeated: evaluate_many memoises identical computations within a call (budget 0 is the same
all-analog model for every strategy; budget 1 keeps every routed expert digital), the presets are deterministic
given the seed, and every result is stored in the DuckDB store as soon as it is done, so a killed run resumes
where it stopped (cached keys are skipped). Seeds go outermost, so an interrupted run already holds every
strategy and budget on its first seeds.

    nohup python scripts/example_results.py > cache/example_results.log 2>&1 &   # hours on a shared 2-core CPU
    python scripts/example_results.py --export-only                             # rewrite the snapshot
    python scripts/example_results.py --store /tmp/ex.duckdb --from-snapshot hetmoe_core/assets/examples/default.zip \
        --export-only     # the shipped snapshot in this hetmoe's format, from its own results (nothing recomputed)
Output: hetmoe_core/assets/examples/default.zip (snapshot.export_snapshot format) and its manifest printed.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # busy-waiting OpenMP threads crawl on a shared CPU
for _v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_v, "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUDGETS = (0.0, 0.125, 0.25, 0.5, 1.0)
PRESETS = ("paper-pcm-c1.5", "paper-pcm-c2.5")
LIMIT = 5             # passages per domain: 7 x 5 = 35 test passages, 16,032 tokens (default tokenizer)
SEEDS = 5
VALIDATE_TOKENS = 16_384
BATCH = 32            # lm-eval batch (enters the cache key): 256-token windows, ~2x the throughput of 8 on CPU
DEFAULT_STORE = ROOT / "cache" / "examples.duckdb"
SNAPSHOT = ROOT / "hetmoe_core" / "assets" / "examples" / "default.zip"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def strategies(arg: str) -> list[str]:
    from hetmoe_core.placement import STRATEGIES
    return list(STRATEGIES) if arg == "all" else [s for s in arg.split(",") if s]


def run_evaluations(a, store) -> None:
    from hetmoe_core.evaluate import evaluate_many
    t0, n = time.time(), {"computed": 0, "cached": 0}

    def progress(done, total, r):
        n["cached" if r["cached"] else "computed"] += 1
        if not r["cached"]:
            log(f"{done}/{total} {r['task']} {r['strategy']} b={r['budget']} {r['preset']} seed={r['seed']} "
                f"{r['duration_s'] or 0:.1f} s")
    order = [int(x) for x in a.only_seeds.split(",")] if a.only_seeds else range(a.seeds)
    for seed in order:   # seed-major: an interrupted run holds every cell on its first seeds
        evaluate_many("default", store=store, strategies=strategies(a.strategies), budgets=list(BUDGETS),
                      presets=list(PRESETS), seeds=[seed], tasks="ppl", limit=a.limit, include_ideal=True, batch_size=BATCH,
                      progress=progress)
        log(f"seed {seed} done ({n['computed']} computed, {n['cached']} cached, {time.time() - t0:.0f} s)")


def run_validations(a, store) -> None:
    try:
        from hetmoe_core import sensitivity
    except ImportError:
        log("hetmoe_core.sensitivity not available yet: no validation stored")
        return
    from hetmoe_core.examples import put_validation
    from hetmoe_core.models import load_model
    lm = load_model("default")
    for preset in sorted(PRESETS, reverse=True):   # paper-pcm-c2.5 first: the larger effect
        t0 = time.time()
        v = sensitivity.validate(lm, preset, seeds=a.seeds, tokens=a.validate_tokens, store=store,
                                 progress=lambda d, t: None)
        d = v.to_dict()
        put_validation(store, d)   # kept as expert statistics: the snapshot carries them
        log(f"validate {preset}: {time.time() - t0:.0f} s, {a.validate_tokens} tokens, cached={d.get('cached')}, "
            f"best={d.get('best')}")


def keep_model_shapes(store, filters: dict) -> None:
    """The shapes of every exported model in the store (evaluate stores them as it computes; results computed before
    hetmoe stored shapes, or imported from an older snapshot, get them here), so that a report of the snapshot never
    builds the model. The model is loaded from its source and must have the fingerprint its results were keyed by."""
    from hetmoe_core.energy import keep_shapes
    from hetmoe_core.models import load_model
    for source, fp in store.runs_frame(filters)[["model_source", "model_fingerprint"]].drop_duplicates().values:
        if store.get_model_shapes(fp) is None:
            lm = load_model(source, tokenizer=False)
            if lm.fingerprint != fp:
                raise SystemExit(f"{source} now has fingerprint {lm.fingerprint}, its results {fp}: not the same "
                                 "weights, no shapes stored")
            keep_shapes(store, lm)
            log(f"model shapes of {source} ({fp}) stored")


def export(a, store) -> dict:
    from hetmoe_core.evaluate import task_aliases
    from hetmoe_core.snapshot import export_snapshot
    filters = {"model_source": ["default"], "preset": list(PRESETS) + ["ideal"], "task": task_aliases()["ppl"],
               "limit": [float(a.limit)], "seed": list(range(a.seeds)), "batch_size": [BATCH]}
    keys = None
    if a.strategies != "all":
        filters["strategy"] = strategies(a.strategies) + ["ideal"]
    out = Path(a.out).resolve()
    keep_model_shapes(store, filters)
    m = export_snapshot(store, out, keys=keys, filters=filters,   # the shipped snapshot is this script's own output
                        overwrite=a.force or out == SNAPSHOT.resolve())
    log(f"snapshot {a.out}: {Path(a.out).stat().st_size / 1e3:.0f} KB, "
        + ", ".join(f"{t} {v['rows']} rows" for t, v in m["tables"].items()))
    return m


CARD = ROOT / "hetmoe_core" / "assets" / "default" / "README.md"
MARK = ("<!-- sensitivity:start -->", "<!-- sensitivity:end -->")
METRIC = "bits_per_byte"   # log-scale, so the recovered fraction of a domain average is an average of nats


def _ci(m, lo, hi, digits=2) -> str:
    if m != m:
        return "n/a"
    return f"{m:.{digits}f}" if lo != lo else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def in_one_line(runs, tasks, lab) -> str:
    """The card's answer in one sentence, from the paired deltas of every preset and budget (never typed by hand)."""
    from hetmoe_core.paired import combined_deltas
    better, worse, seen, head = {}, {}, set(), []
    for preset in PRESETS:
        d = combined_deltas(runs[runs.preset.isin([preset, "ideal"])], "maxnn", tasks=tasks, metric=METRIC)
        d = d[d.n_seeds >= 2]
        o = d[d.a == "oracle"].sort_values("delta")
        if len(o):
            x = o.iloc[-1]
            head.append(f"{_ci(x.delta, x.delta_lo, x.delta_hi)} ({preset}, {x.budget:.1%})")
        d = d[d.a != "oracle"]
        seen |= set(d.a)
        for x in d.itertuples():   # delta = baseline - MaxNNScore: delta_hi < 0 -> MaxNNScore recovers more
            if x.delta_hi < 0 or x.delta_lo > 0:
                (better if x.delta_hi < 0 else worse).setdefault(lab(x.a), []).append(f"{preset} {x.budget:.1%}")
    where = lambda d: "; ".join(f"{k} ({', '.join(v)})" for k, v in sorted(d.items())) or "none"
    same = sorted(lab(s) for s in seen if lab(s) not in better and lab(s) not in worse)
    return (f"**In one line:** over both paper presets and budgets 12.5–50 % (5 seeds, paired, 95% CIs below), "
            f"MaxNNScore recovers significantly more of the noise loss than {where(better)}; significantly less than "
            f"{where(worse)}; " + (f"no difference is resolved against {', '.join(same)} nor in any other cell. "
                                   if same else "in every other cell the difference is inside the noise. ")
            + (f"The measured-damage oracle's largest headroom over MaxNNScore: {'; '.join(head)}. " if head else "")
            + "Its rank correlation with the measured damage is given at the end.")


def card_section(a, store) -> str:
    """The model card's measured section, from the stored example results only (rewritten on every run)."""
    import pandas as pd
    from hetmoe_core.evaluate import task_aliases
    from hetmoe_core.examples import n_seeds, stored_validations
    from hetmoe_core.figures import STRATEGY_LABELS
    from hetmoe_core.paired import combined_deltas, combined_recovery, t_interval
    lab = lambda s: STRATEGY_LABELS.get(s, s)
    runs = store.runs_frame({"model_source": ["default"], "limit": [float(a.limit)], "batch_size": [BATCH]})
    tasks = task_aliases()["ppl"]
    rec = combined_recovery(runs, tasks=tasks, metric=METRIC)
    rec = rec[rec.n_tasks == len(tasks)]   # a cell counts once every domain is measured
    out = [f"Measured by `scripts/example_results.py` (its snapshot ships as `hetmoe_core/assets/examples/default.zip`; "
           "the Results and Validate pages load it). Metric: bits per byte of the 7 `hetmoe_ppl_<domain>` tasks "
           f"({a.limit} held-out test passages per domain, 16,032 tokens), `fast` backend, budget per MoE layer, dense "
           "modules digital. **Recovered fraction** of the noise loss = (A − X) / (A − I) per seed (A: all 64 "
           "routed experts analog, I: ideal all-digital, X: the placement), averaged over the 7 domains, then mean "
           "and 95% Student-t interval over the noise seeds; every strategy sees the same seeds (paired). "
           "Everything below is rewritten by the script from the stored results; nothing is typed by hand.", ""]
    ideal = runs[(runs.strategy == "ideal") & (runs.metric == METRIC) & runs.task.isin(tasks)]
    out[0:0] = [in_one_line(runs, tasks, lab), ""]
    for preset in PRESETS:
        r = rec[rec.preset == preset]
        if r.empty:
            out.append(f"*{preset}: no results stored yet.*")
            continue
        an = runs[(runs.preset == preset) & (runs.budget == 0) & (runs.metric == METRIC) & runs.task.isin(tasks)]
        per_seed = an.groupby("seed").value.mean() - ideal.value.mean()
        m, lo, hi, _ = t_interval(per_seed.tolist())
        out.append(f"**{preset}**: all routed experts analog cost {_ci(m, lo, hi, 4)} bits/byte "
                   f"(domain mean, ideal {ideal.value.mean():.4f}; {len(per_seed)} seeds).")
        out.append("")
        budgets = [b for b in BUDGETS if 0 < b < 1]
        strategies = sorted(set(r.strategy), key=lambda s: (s != "maxnn", s))
        out.append("| strategy | " + " | ".join(f"{b:.1%} digital" for b in budgets) + " |")
        out.append("|---|" + "---|" * len(budgets))
        for s in strategies:
            cells = []
            for b in budgets:
                x = r[(r.strategy == s) & (r.budget == b)]
                cells.append("" if x.empty else _ci(x.recovered.iloc[0], x.recovered_lo.iloc[0], x.recovered_hi.iloc[0])
                             + f" (n={x.n_seeds.iloc[0]})")
            out.append(f"| {lab(s)} | " + " | ".join(cells) + " |")
        out.append("")
        d = combined_deltas(runs[runs.preset.isin([preset, "ideal"])], "maxnn", tasks=tasks, metric=METRIC)
        base = d[(d.a != "oracle") & (d.n_seeds >= 2)]
        if len(base):
            wins, losses = (base.delta_hi < 0).sum(), (base.delta_lo > 0).sum()
            out.append(f"*Verdict ({preset}):* of {len(base)} paired comparisons with a baseline (strategy × budget, "
                       f">= 2 seeds), MaxNNScore recovers significantly more in {wins}, significantly less in "
                       f"{losses}, and no difference is resolved in {len(base) - wins - losses}.")
            out.append("")
        if "oracle" not in set(d.a):
            out.append(f"*Oracle headroom ({preset}):* not measured yet (needs the oracle's evaluations; rerun the script).")
            out.append("")
        if len(d):
            out.append("MaxNNScore minus each other strategy (recovered fraction, paired on seeds, 95% CI):")
            out.append("")
            for s in sorted(set(d.a)):
                parts = []
                for b in budgets:
                    x = d[(d.a == s) & (d.budget == b)]
                    if x.empty:
                        continue
                    m, lo, hi = -x.delta.iloc[0], -x.delta_hi.iloc[0], -x.delta_lo.iloc[0]
                    word = ("no difference" if lo <= 0 <= hi else "MaxNNScore better" if m > 0 else f"{lab(s)} better") \
                        if lo == lo else "one seed"
                    parts.append(f"{b:.1%}: {_ci(m, lo, hi)} → {word}")
                what = "oracle headroom (oracle − MaxNNScore)" if s == "oracle" else f"vs {lab(s)}"
                if s == "oracle":
                    parts = [p.replace("MaxNNScore better", "MaxNNScore better (!)") for p in parts]
                    x = d[d.a == s]
                    parts = [f"{b:.1%}: {_ci(x[x.budget == b].delta.iloc[0], x[x.budget == b].delta_lo.iloc[0], x[x.budget == b].delta_hi.iloc[0])}"
                             for b in budgets if (x.budget == b).any()]
                out.append(f"- {what}: " + "; ".join(parts))
            out.append("")
    vals = {n: v for n, v in stored_validations(store).items()   # the script's own request only
            if v["tokens"] == a.validate_tokens and n_seeds(v["seeds"]) == a.seeds}
    if vals:
        out.append("Measured sensitivity (`validate`, only-this damage of each of the 64 experts on "
                   "calibration text): pooled rank correlation of each criterion with the measured damage, "
                   "95% bootstrap CI over experts and seeds.")
        out.append("")
        for name, v in sorted(vals.items()):
            pooled = [c for c in v.get("correlations", []) if str(c.get("scope")) == "pooled"]
            best = v.get("best") or {}
            out.append(f"- **{v['preset']}** ({n_seeds(v['seeds'])} seeds, {v['tokens']:,} tokens; all experts "
                       f"analog +{v['all_experts']['damage']:.4f} nats): "
                       + "; ".join(f"{lab(c['criterion'])} ρ={_ci(c['spearman'], c['spearman_lo'], c['spearman_hi'])}"
                                   for c in pooled)
                       + f". Best: {lab(best.get('criterion'))}, margin {best.get('margin', float('nan')):.3f} "
                       + ("(significant)." if best.get("significant") else "(inside the noise)."))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_card(a, store) -> None:
    text = CARD.read_text(encoding="utf-8")
    body = f"{MARK[0]}\n{card_section(a, store)}{MARK[1]}"
    if MARK[0] in text:
        head, rest = text.split(MARK[0], 1)
        text = head + body + rest.split(MARK[1], 1)[1]
    else:
        text = text.replace("## Reproduce", f"## Does MaxNNScore find the noise-sensitive experts here?\n\n{body}\n\n"
                                            "## Reproduce", 1)
    CARD.write_text(text, encoding="utf-8")
    log(f"model card section rewritten: {CARD}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=str(DEFAULT_STORE), help="DuckDB store the results go to (resumable)")
    ap.add_argument("--out", default=str(SNAPSHOT), help="snapshot to write")
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--limit", type=int, default=LIMIT, help="test passages per domain")
    ap.add_argument("--strategies", default="all", help="comma-separated, default every registered strategy")
    ap.add_argument("--only-seeds", default="", help="e.g. 4,3: this worker's seeds, in this order (a second "
                    "worker on the same store shares the work; the store's locks keep both safe)")
    ap.add_argument("--export-only", action="store_true", help="only write the snapshot of what is stored")
    ap.add_argument("--from-snapshot", default=None, metavar="ZIP", help="first import this snapshot into --store "
                    "(idempotent): with --export-only, rewrites a snapshot in this hetmoe's format from its own "
                    "results, nothing recomputed (the runs' origin then names the import)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out file (the shipped snapshot, "
                    "the default --out, is always rewritten: the script owns it)")
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--validate-tokens", type=int, default=VALIDATE_TOKENS, help="calibration tokens of each "
                    "validation (16384 = the oracle strategy's own measurement, which it then reuses)")
    ap.add_argument("--validate-only", action="store_true", help="only the sensitivities (and the snapshot)")
    ap.add_argument("--validate-first", action="store_true", help="measure the sensitivities before the "
                    "evaluations (the oracle strategy reuses them)")
    ap.add_argument("--card", action="store_true", help="also rewrite the model card's measured section")
    a = ap.parse_args()
    for name in ("lm_eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch
    torch.set_num_threads(int(os.environ.get("HETMOE_THREADS", "2")))
    from hetmoe_core.store import Store
    store = Store(a.store)
    if a.from_snapshot:
        from hetmoe_core.snapshot import import_snapshot
        log(f"imported {a.from_snapshot}: {import_snapshot(a.from_snapshot, store)['added']}")
    t0 = time.time()
    if not a.export_only:
        if (a.validate_first or a.validate_only) and not a.no_validate:
            run_validations(a, store)
        if not a.validate_only:
            run_evaluations(a, store)
        if not a.no_validate and not a.validate_first and not a.validate_only:
            run_validations(a, store)
    m = export(a, store)
    if a.card:
        write_card(a, store)
    print(json.dumps({"seconds": round(time.time() - t0), "snapshot": a.out,
                      "bytes": Path(a.out).stat().st_size, "tables": m["tables"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
