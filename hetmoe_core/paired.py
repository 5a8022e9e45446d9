"""Paired statistics of stored results: the recovered fraction of the noise loss and strategy-vs-strategy deltas.

Every noisy result of one (model, task, metric, preset, backend, scope, limit) shares its noise seeds with the other
strategies and budgets (common random numbers: seed s programs the same conductance noise into an expert whether
MaxNNScore or Activation Frequency put it on AIMC), so comparisons are made seed by seed, then summarised:

* recovered fraction of the noise loss (per seed s, then mean over seeds)::

      R_s = (A_s - X_s) / (A_s - I)

  A_s = the all-experts-analog result (digital budget 0) of seed s, X_s = the strategy's result at its budget on
  seed s, I = the ideal all-digital result (no noise, one value). R = 0: nothing recovered (as all-analog);
  R = 1: all recovered (as ideal). The sign convention makes it valid for lower-is-better metrics (perplexity) and
  higher-is-better ones (accuracy) alike. A seed whose noise loss |A_s - I| is below ``min_loss`` (relative to
  |I|) gives no fraction (NaN): a ratio of two differences inside the rounding error is not a measurement.
  Nor does a group whose noise loss is not *resolved* (``noise_loss``): the loss A_s - I, signed so that > 0 means
  the noise made the metric worse, must have a 95% t interval over seeds above 0 (two or more seeds) or, with one
  seed, exceed 1.96 x lm-eval's stderr of A (a z test); a loss <= 0 or inside the noise would divide by noise and
  swing the fraction to any value (-25 was seen). Such rows have recovered = NaN and say why in recovered_note.
* paired delta between strategies a and b at one budget: d_s = X_{a,s} - X_{b,s} (metric units) and
  R_{a,s} - R_{b,s} (fraction units).

Intervals: 95% Student-t intervals over seeds, mean ± t_{0.975, n-1} · sd / sqrt(n) (scipy.stats.t), i.e. the
seed-to-seed spread of the noise (n >= 2; None for one seed). Beside them, the task's *sampling* error — lm-eval's
stderr of the metric over the task's items, in metric units, mean over seeds — and the same divided by the noise
loss |A - I| (its size in fraction units), so a reader sees both: the seed interval says whether another noise
draw would change the answer, the sampling error whether another sample of documents might. The paired seed
differences share the documents too, so their item-sampling error is smaller than either result's; we show the
single results' stderr as a conservative scale. A delta whose interval covers 0 is reported as "no difference".
Sources: paired (common random numbers) comparison, e.g. Law, *Simulation Modeling and Analysis*, ch. 10;
lm-eval's stderr from lm_eval.api.metrics (bootstrap or analytic per metric).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

GROUP = ["model_fingerprint", "task", "metric", "preset", "backend", "scope", "limit"]
LEVEL = 0.95
INSIDE_NOISE = "noise loss inside the noise"
NO_LOSS = "no noise loss (all routed experts analog is not worse than ideal)"


def t_half_width(se: float, n: int, level: float = LEVEL) -> float:
    """Half width of the Student-t interval (scipy.stats.t, n - 1 degrees of freedom) of a mean of ``n`` values
    with standard error ``se``; NaN for fewer than two values."""
    from scipy import stats
    return float(stats.t.ppf(0.5 + level / 2, n - 1)) * se if n >= 2 else math.nan


def t_interval(x, level: float = LEVEL) -> tuple[float, float, float, float]:
    """(mean, lo, hi, sd) of the finite values of ``x`` with a Student-t interval (scipy.stats.t); lo/hi are NaN
    for fewer than two values, everything NaN for none. sd is the sample standard deviation (ddof 1)."""
    x = np.asarray([v for v in x if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return (math.nan,) * 4
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan, math.nan
    sd = float(x.std(ddof=1))
    h = t_half_width(sd / math.sqrt(len(x)), len(x), level)
    return m, m - h, m + h, sd


def noise_loss(analog: dict, ideal: float, analog_se: dict | None = None, higher_is_better: bool = True,
               level: float = LEVEL) -> str:
    """Why the noise loss A - I of one group is not resolved, or "" when it is.

    analog: {seed: all-routed-experts-analog value A_s}; ideal: the all-digital value I; analog_se: {seed: lm-eval
    stderr of A_s (metric units) or None}. The signed loss l_s = I - A_s (higher-is-better metric) or A_s - I (lower
    is better) is > 0 when the noise hurts. Not resolved: mean l <= 0 (NO_LOSS); with >= 2 seeds the 95% Student-t
    interval of l over seeds (t_interval) reaches 0; with one seed l <= z_{0.975} x stderr (normal approximation of
    lm-eval's sampling error, scipy.stats.norm) (INSIDE_NOISE). One seed without a stderr: resolved if l > 0.
    """
    from scipy import stats
    seeds = sorted(analog)
    loss = [(ideal - analog[s]) if higher_is_better else (analog[s] - ideal) for s in seeds]
    m, lo, _hi, _sd = t_interval(loss, level)
    if not m > 0:
        return NO_LOSS
    if len(loss) >= 2:
        return INSIDE_NOISE if not lo > 0 else ""
    se = (analog_se or {}).get(seeds[0])
    if se is not None and se == se and m <= float(stats.norm.ppf(0.5 + level / 2)) * se:
        return INSIDE_NOISE
    return ""


def _higher(g: pd.DataFrame, metric: str) -> bool:
    """Direction of ``metric``: as stored with it (lm-eval's higher_is_better), else by name (report's list)."""
    if "higher_is_better" in g:
        hib = g["higher_is_better"].dropna()
        if len(hib):
            return bool(hib.iloc[0])
    from .report import LOWER_IS_BETTER
    return metric not in LOWER_IS_BETTER


def _key(row) -> tuple:
    return tuple(None if (isinstance(v, float) and math.isnan(v)) else v for v in row)


def _prepare(frame: pd.DataFrame) -> pd.DataFrame:
    need = set(GROUP) | {"strategy", "budget", "seed", "value"}
    if missing := need - set(frame.columns):
        raise ValueError(f"results frame lacks columns {sorted(missing)}; pass Store.runs_frame()")
    f = frame.dropna(subset=["metric", "value"]).copy()
    if "stderr" not in f:
        f["stderr"] = np.nan
    f["limit"] = f["limit"].astype(float)
    return f


def _ideal_values(f: pd.DataFrame) -> dict:
    """(model, task, metric, limit) -> ideal value (the mean if several seeds were stored: they are identical)."""
    ideal = f[f.strategy == "ideal"]
    return {(m, t, me, None if math.isnan(lim) else lim): float(g.value.mean())
            for (m, t, me, lim), g in ideal.groupby(["model_fingerprint", "task", "metric", "limit"], dropna=False)}


def _per_seed(f: pd.DataFrame, min_loss: float, level: float = LEVEL):
    """Yield (group key, ideal, {(strategy, budget): {seed: (value, stderr, R)}}, {seed: analog value}, note):
    note = noise_loss's reason the group's loss is not resolved ("" when it is; R is still given per seed)."""
    ideals = _ideal_values(f)
    noisy = f[f.strategy != "ideal"]
    for key, g in noisy.groupby(GROUP, dropna=False):
        model, task, metric, lim = key[0], key[1], key[2], key[6]
        lim = None if (isinstance(lim, float) and math.isnan(lim)) else lim
        ideal = ideals.get((model, task, metric, lim))
        a0 = g[g.budget == 0]
        analog = a0.groupby("seed").value.mean().to_dict()   # every strategy: the same model
        note = noise_loss(analog, ideal, pd.to_numeric(a0.stderr, errors="coerce").groupby(a0.seed).mean()
                          .to_dict(), _higher(g, metric), level) \
            if ideal is not None and analog else ""
        cells = {}
        for (s, b), c in g.groupby(["strategy", "budget"]):
            per = {}
            for seed, v, se in zip(c.seed, c.value, c.stderr):
                r = math.nan
                if ideal is not None and seed in analog:
                    loss = analog[seed] - ideal
                    if abs(loss) > min_loss * max(abs(ideal), 1e-12):
                        r = (analog[seed] - v) / loss
                per[int(seed)] = (float(v), None if se is None or se != se else float(se), r)
            cells[(s, float(b))] = per
        yield _key(key), ideal, cells, analog, note


def recovery_table(frame: pd.DataFrame, min_loss: float = 1e-6, level: float = LEVEL,
                   require_resolved: bool = True) -> pd.DataFrame:
    """Recovered fraction of the noise loss per (model, task, metric, preset, backend, scope, limit, strategy, budget).

    frame: Store.runs_frame() (one row per run and metric; ideal rows included). Columns of the result: the GROUP
    columns, strategy, budget, n_seeds, seeds, ideal, analog (mean all-analog value over the seeds), mean (the
    strategy's value), recovered, recovered_lo, recovered_hi (95% t interval over seeds), recovered_sd (seed spread),
    sampling_se (lm-eval stderr, metric units, mean over seeds; NaN if the metric has none), sampling_se_recovered
    (= sampling_se / |analog - ideal|) and recovered_note: "" or why the fraction is not defined (noise_loss:
    INSIDE_NOISE or NO_LOSS; recovered, recovered_lo/hi/sd and sampling_se_recovered are then NaN). Empty when there
    is no ideal or no budget-0 result to measure the loss from. ``require_resolved=False`` gives the raw per-seed
    ratios even where the loss is not resolved (recovered_note still says so).
    Raises ValueError if the frame lacks the store's columns.
    """
    rows = []
    for key, ideal, cells, analog, note in _per_seed(_prepare(frame), min_loss, level):
        if ideal is None or not analog:
            continue
        a_mean = float(np.mean(list(analog.values())))
        for (s, b), per in sorted(cells.items()):
            seeds = sorted(per)
            hide = bool(note) and require_resolved
            m, lo, hi, sd = t_interval([per[x][2] for x in seeds], level) if not hide else (math.nan,) * 4
            ses = [per[x][1] for x in seeds if per[x][1] is not None]
            se = float(np.mean(ses)) if ses else math.nan
            loss = abs(a_mean - ideal) if not hide else 0.0
            rows.append({**dict(zip(GROUP, key)), "strategy": s, "budget": b, "n_seeds": len(seeds), "seeds": seeds,
                         "ideal": ideal, "analog": a_mean, "mean": float(np.mean([per[x][0] for x in seeds])),
                         "recovered": m, "recovered_lo": lo, "recovered_hi": hi, "recovered_sd": sd,
                         "sampling_se": se, "sampling_se_recovered": se / loss if loss > 0 else math.nan,
                         "recovered_note": note})
    cols = GROUP + ["strategy", "budget", "n_seeds", "seeds", "ideal", "analog", "mean", "recovered", "recovered_lo",
                    "recovered_hi", "recovered_sd", "sampling_se", "sampling_se_recovered", "recovered_note"]
    return pd.DataFrame(rows, columns=cols)


_OUTER = ["model_fingerprint", "metric", "preset", "backend", "scope", "limit", "strategy", "budget"]


def _combined_per_seed(frame, tasks, metric, min_loss) -> dict:
    """{(model, metric, preset, backend, scope, limit, strategy, budget): {seed: mean over tasks of R_s}}; a seed
    missing some task is left out (every kept seed averages the same tasks)."""
    f = _prepare(frame)
    if tasks is not None:
        f = f[f.task.isin(list(tasks))]
    if metric is not None:
        f = f[f.metric == metric]
    acc: dict = {}
    for key, _ideal, cells, _analog, _note in _per_seed(f, min_loss):   # every task, resolved or not: as before
        k = dict(zip(GROUP, key))
        outer = (k["model_fingerprint"], k["metric"], k["preset"], k["backend"], k["scope"], k["limit"])
        for (s, b), per in cells.items():
            for seed, (_, _, r) in per.items():
                acc.setdefault(outer + (s, b), {}).setdefault(seed, {})[k["task"]] = r
    out = {}
    for k, seeds in acc.items():
        n_tasks = max(len(v) for v in seeds.values())
        out[k] = {s: float(np.mean(list(v.values()))) for s, v in seeds.items() if len(v) == n_tasks}
        out[k]["_n_tasks"] = n_tasks
    return out


def combined_recovery(frame: pd.DataFrame, tasks=None, metric: str | None = None, min_loss: float = 1e-6,
                      level: float = LEVEL) -> pd.DataFrame:
    """Recovered fraction averaged over several tasks (e.g. the 7 per-domain perplexities), per seed first.

    For each seed, R_s = mean over ``tasks`` of that task's R_s (a seed missing a task is dropped), then the mean
    and 95% t interval over seeds as in recovery_table. Columns: model_fingerprint, metric, preset, backend, scope,
    limit, strategy, budget, n_seeds, n_tasks, recovered, recovered_lo, recovered_hi, recovered_sd.
    ``tasks``: list of task names (default: all in the frame); ``metric``: one metric (default: every metric).
    """
    rows = []
    for k, per in sorted(_combined_per_seed(frame, tasks, metric, min_loss).items(),
                         key=lambda kv: tuple(str(x) for x in kv[0])):
        vals = [v for s, v in per.items() if s != "_n_tasks"]
        m, lo, hi, sd = t_interval(vals, level)
        rows.append(dict(zip(_OUTER, k), n_seeds=len(vals), n_tasks=per["_n_tasks"], recovered=m, recovered_lo=lo,
                         recovered_hi=hi, recovered_sd=sd))
    return pd.DataFrame(rows, columns=_OUTER + ["n_seeds", "n_tasks", "recovered", "recovered_lo", "recovered_hi",
                                               "recovered_sd"])


def combined_deltas(frame: pd.DataFrame, baseline: str, tasks=None, metric: str | None = None,
                    min_loss: float = 1e-6, level: float = LEVEL) -> pd.DataFrame:
    """Paired difference of the task-averaged recovered fraction, each strategy minus ``baseline``, at each
    0 < budget < 1, on their common seeds: delta (fraction units) with its 95% t interval, n_seeds, n_tasks and
    verdict ("<a> better" / "<baseline> better" / "no difference" when the interval covers 0; a higher recovered
    fraction is better whatever the metric's direction)."""
    per = _combined_per_seed(frame, tasks, metric, min_loss)
    rows = []
    for k, pa in sorted(per.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        *outer, s, b = k
        if s == baseline or not 0 < b < 1 or (tuple(outer) + (baseline, b)) not in per:
            continue
        pb = per[tuple(outer) + (baseline, b)]
        common = sorted(x for x in set(pa) & set(pb) if x != "_n_tasks")
        if not common:
            continue
        d, lo, hi, sd = t_interval([pa[x] - pb[x] for x in common], level)
        verdict = ("no difference" if lo <= 0 <= hi else f"{s} better" if d > 0 else f"{baseline} better") \
            if lo == lo else "one seed: no interval"
        rows.append(dict(zip(_OUTER[:-2], outer), budget=b, a=s, b=baseline, n_seeds=len(common),
                         n_tasks=min(pa["_n_tasks"], pb["_n_tasks"]), delta=d, delta_lo=lo, delta_hi=hi,
                         delta_sd=sd, verdict=verdict))
    return pd.DataFrame(rows, columns=_OUTER[:-2] + ["budget", "a", "b", "n_seeds", "n_tasks", "delta", "delta_lo",
                                                     "delta_hi", "delta_sd", "verdict"])


def paired_deltas(frame: pd.DataFrame, baseline: str | None = None, min_loss: float = 1e-6,
                  level: float = LEVEL, higher_is_better: dict | None = None,
                  require_resolved: bool = True) -> pd.DataFrame:
    """Paired differences between strategies at the same budget, preset and task, on their common seeds.

    For each pair (a, b) (every pair, or every strategy against ``baseline``) at each 0 < budget < 1:
    delta = mean over common seeds of X_a - X_b (metric units) with its 95% t interval, the same for the recovered
    fraction (delta_recovered; NaN where the noise loss is not resolved, see noise_loss), n_seeds, sampling_se (mean lm-eval stderr of the two results, metric units), and
    verdict: "no difference" when the interval of delta covers 0, else "<a> better" / "<b> better" (by the
    metric's direction: ``higher_is_better`` {metric: bool}, default report.LOWER_IS_BETTER names are lower-better).
    Budgets 0 and 1 are left out (every strategy places the same experts there).
    """
    from .report import LOWER_IS_BETTER
    hib = dict(higher_is_better or {})
    rows = []
    for key, _ideal, cells, _analog, note in _per_seed(_prepare(frame), min_loss, level):
        k = dict(zip(GROUP, key))
        up = hib.get(k["metric"], k["metric"] not in LOWER_IS_BETTER)
        budgets = sorted({b for _, b in cells if 0 < b < 1})
        strategies = sorted({s for s, _ in cells})
        for b in budgets:
            have = [s for s in strategies if (s, b) in cells]
            pairs = [(a, baseline) for a in have if a != baseline] if baseline in have else \
                [(a, c) for i, a in enumerate(have) for c in have[i + 1:]] if baseline is None else []
            for a, c in pairs:
                pa, pc = cells[(a, b)], cells[(c, b)]
                common = sorted(set(pa) & set(pc))
                if not common:
                    continue
                d, lo, hi, sd = t_interval([pa[s][0] - pc[s][0] for s in common], level)
                dr, rlo, rhi, _ = t_interval([pa[s][2] - pc[s][2] for s in common], level) \
                    if not (note and require_resolved) else (math.nan,) * 4     # a fraction of an unresolved loss is not a measurement
                ses = [x for s in common for x in (pa[s][1], pc[s][1]) if x is not None]
                if not (lo <= 0 <= hi) and lo == lo:
                    verdict = f"{a} better" if (d > 0) == up else f"{c} better"
                else:
                    verdict = "no difference" if lo == lo else "one seed: no interval"
                rows.append({**k, "budget": b, "a": a, "b": c, "n_seeds": len(common), "delta": d, "delta_lo": lo,
                             "delta_hi": hi, "delta_sd": sd, "delta_recovered": dr, "delta_recovered_lo": rlo,
                             "delta_recovered_hi": rhi, "sampling_se": float(np.mean(ses)) if ses else math.nan,
                             "verdict": verdict})
    cols = GROUP + ["budget", "a", "b", "n_seeds", "delta", "delta_lo", "delta_hi", "delta_sd", "delta_recovered",
                    "delta_recovered_lo", "delta_recovered_hi", "sampling_se", "verdict"]
    return pd.DataFrame(rows, columns=cols)
