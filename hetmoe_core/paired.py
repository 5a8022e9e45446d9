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
Copies are not seeds. A deterministic preset (``NoiseConfig.deterministic``, e.g. DAC/ADC quantization only) has no
per-seed randomness: evaluate computes it once and stores the other seeds as copies (same ``compute_key``,
``shared_from`` set). Every statistic here counts *distinct computations* (``compute_key``; a result stored without
one counts once per seed unless its config is deterministic), never stored seeds: three copies of one number are one
observation, and a zero-width interval over them is not evidence. With one computation the only uncertainty left is
lm-eval's sampling error over the documents: the noise loss must exceed z_{0.975} x lm-eval's stderr of A
(noise_loss's one-seed rule), and a paired difference A - B must exceed z_{0.975} x sqrt(se_A^2 + se_B^2) to get a
verdict (per-document values are not stored, so the document-paired error cannot be formed; the sum of variances
bounds it from above when the two results' errors over the same documents are positively correlated, which is the
conservative side: inside it is "no difference").
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


def _computations(f: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Identity of the computation behind each row of a runs frame: its ``compute_key`` (the hash evaluate stores,
    equal for the seeds of a deterministic preset and for the shared all-analog budget-0 placement); without one
    (older stores, hand-made frames) the config minus the seed when the config is deterministic, else the run key
    (or the row) itself: one computation per stored seed. Second: whether the row's config is deterministic
    (summary's test: the ideal result, or a noise config without random parts; False when no config is stored)."""
    import json
    from .store import config_key
    from .summary import _deterministic, _without_seed
    out, det = [], []
    ck = f["compute_key"] if "compute_key" in f else pd.Series([None] * len(f), index=f.index)
    cfgs = f["config"] if "config" in f else pd.Series([None] * len(f), index=f.index)
    keys = f["key"] if "key" in f else pd.Series([f"row{i}" for i in range(len(f))], index=f.index)
    seen: dict = {}     # config text -> (deterministic, its seedless hash): one parse per run, not per metric row

    def parse(cfg):
        try:
            conf = json.loads(cfg) if isinstance(cfg, str) else None
        except json.JSONDecodeError:
            conf = None
        d = isinstance(conf, dict) and _deterministic(conf)
        return d, ("det:" + config_key(_without_seed(conf)) if d else None)
    for c, cfg, k in zip(ck, cfgs, keys):
        text = cfg if isinstance(cfg, str) else None
        if text not in seen:
            seen[text] = parse(text)
        d, seedless = seen[text]
        det.append(d)
        out.append(c if isinstance(c, str) and c else seedless or f"run:{k}")
    return pd.Series(out, index=f.index, dtype=object), pd.Series(det, index=f.index, dtype=bool)


def distinct(seeds, ident) -> list:
    """The seeds (in order) that start a new computation: the first of each ``ident(seed)`` value. Statistics over
    seeds run over these only, so copies of one deterministic result count once."""
    seen, out = set(), []
    for x in seeds:
        i = ident(x)
        if i not in seen:
            seen.add(i)
            out.append(x)
    return out


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
    f["_comp"], f["_det"] = _computations(f)
    return f


def _ideal_values(f: pd.DataFrame) -> dict:
    """(model, task, metric, limit) -> ideal value (the mean if several seeds were stored: they are identical)."""
    ideal = f[f.strategy == "ideal"]
    return {(m, t, me, None if math.isnan(lim) else lim): float(g.value.mean())
            for (m, t, me, lim), g in ideal.groupby(["model_fingerprint", "task", "metric", "limit"], dropna=False)}


def _per_seed(f: pd.DataFrame, min_loss: float, level: float = LEVEL):
    """Yield (group key, ideal, {(strategy, budget): {seed: (value, stderr, R, computation)}}, {seed: (analog
    value, computation)}, note, deterministic: every noisy config of the group is deterministic): note =
    noise_loss's reason the group's loss is not resolved ("" when it is; R is still given per seed), judged on
    the distinct all-analog computations only (copies of a deterministic result are one value, so one
    computation falls to noise_loss's stderr rule)."""
    ideals = _ideal_values(f)
    noisy = f[f.strategy != "ideal"]
    for key, g in noisy.groupby(GROUP, dropna=False):
        model, task, metric, lim = key[0], key[1], key[2], key[6]
        lim = None if (isinstance(lim, float) and math.isnan(lim)) else lim
        ideal = ideals.get((model, task, metric, lim))
        a0 = g[g.budget == 0]
        analog = a0.groupby("seed").value.mean().to_dict()   # every strategy: the same model
        acomp = a0.groupby("seed")["_comp"].agg(lambda c: tuple(sorted(set(c)))).to_dict()
        kept = distinct(sorted(analog), acomp.get)
        a_se = pd.to_numeric(a0.stderr, errors="coerce").groupby(a0.seed).mean().to_dict()
        note = noise_loss({x: analog[x] for x in kept}, ideal, {x: a_se.get(x) for x in kept}, _higher(g, metric),
                          level) if ideal is not None and analog else ""
        cells = {}
        for (s, b), c in g.groupby(["strategy", "budget"]):
            per = {}
            for seed, v, se, comp in zip(c.seed, c.value, c.stderr, c["_comp"]):
                r = math.nan
                if ideal is not None and seed in analog:
                    loss = analog[seed] - ideal
                    if abs(loss) > min_loss * max(abs(ideal), 1e-12):
                        r = (analog[seed] - v) / loss
                per[int(seed)] = (float(v), None if se is None or se != se else float(se), r,
                                  (acomp.get(seed), comp))    # R_s depends on both computations
            cells[(s, float(b))] = per
        yield _key(key), ideal, cells, {int(x): (float(analog[x]), acomp[x]) for x in analog}, note, \
            bool(g["_det"].all())


def recovery_table(frame: pd.DataFrame, min_loss: float = 1e-6, level: float = LEVEL,
                   require_resolved: bool = True) -> pd.DataFrame:
    """Recovered fraction of the noise loss per (model, task, metric, preset, backend, scope, limit, strategy, budget).

    frame: Store.runs_frame() (one row per run and metric; ideal rows included). Columns of the result: the GROUP
    columns, strategy, budget, n_seeds (seeds stored), n_computations (distinct computations among them: 1 for a
    deterministic preset however many seeds share it; the statistics use these only), seeds, ideal, analog (mean
    all-analog value over the computations), mean (the strategy's value), recovered, recovered_lo, recovered_hi
    (95% t interval over the computations; NaN with one), recovered_sd (seed spread), sampling_se (lm-eval
    stderr, metric units, mean over seeds; NaN if the metric has none), sampling_se_recovered
    (= sampling_se / |analog - ideal|) and recovered_note: "" or why the fraction is not defined (noise_loss:
    INSIDE_NOISE or NO_LOSS; recovered, recovered_lo/hi/sd and sampling_se_recovered are then NaN). Empty when there
    is no ideal or no budget-0 result to measure the loss from. ``require_resolved=False`` gives the raw per-seed
    ratios even where the loss is not resolved (recovered_note still says so).
    Raises ValueError if the frame lacks the store's columns.
    """
    rows = []
    for key, ideal, cells, analog, note, _det in _per_seed(_prepare(frame), min_loss, level):
        if ideal is None or not analog:
            continue
        a_kept = distinct(sorted(analog), lambda x: analog[x][1])
        a_mean = float(np.mean([analog[x][0] for x in a_kept]))
        for (s, b), per in sorted(cells.items()):
            seeds = sorted(per)
            kept = distinct(seeds, lambda x: per[x][3])     # (all-analog, this) computations: R_s's inputs
            hide = bool(note) and require_resolved
            m, lo, hi, sd = t_interval([per[x][2] for x in kept], level) if not hide else (math.nan,) * 4
            ses = [per[x][1] for x in kept if per[x][1] is not None]
            se = float(np.mean(ses)) if ses else math.nan
            loss = abs(a_mean - ideal) if not hide else 0.0
            rows.append({**dict(zip(GROUP, key)), "strategy": s, "budget": b, "n_seeds": len(seeds),
                         "n_computations": len(kept), "seeds": seeds, "ideal": ideal, "analog": a_mean,
                         "mean": float(np.mean([per[x][0] for x in kept])),
                         "recovered": m, "recovered_lo": lo, "recovered_hi": hi, "recovered_sd": sd,
                         "sampling_se": se, "sampling_se_recovered": se / loss if loss > 0 else math.nan,
                         "recovered_note": note})
    cols = GROUP + ["strategy", "budget", "n_seeds", "n_computations", "seeds", "ideal", "analog", "mean",
                    "recovered", "recovered_lo", "recovered_hi", "recovered_sd", "sampling_se",
                    "sampling_se_recovered", "recovered_note"]
    return pd.DataFrame(rows, columns=cols)


_OUTER = ["model_fingerprint", "metric", "preset", "backend", "scope", "limit", "strategy", "budget"]


def _combined_per_seed(frame, tasks, metric, min_loss) -> dict:
    """{(model, metric, preset, backend, scope, limit, strategy, budget): {seed: (mean over tasks of R_s,
    computation)}} plus "_n_tasks" and "_n_seeds" (seeds stored); a seed missing some task is left out (every kept
    seed averages the same tasks); computation = the tuple of the tasks' (all-analog, strategy) computations, so
    copies of deterministic results can be counted once."""
    f = _prepare(frame)
    if tasks is not None:
        f = f[f.task.isin(list(tasks))]
    if metric is not None:
        f = f[f.metric == metric]
    acc: dict = {}
    for key, _ideal, cells, _analog, _note, _det in _per_seed(f, min_loss):   # every task, resolved or not: as before
        k = dict(zip(GROUP, key))
        outer = (k["model_fingerprint"], k["metric"], k["preset"], k["backend"], k["scope"], k["limit"])
        for (s, b), per in cells.items():
            for seed, (_, _, r, comp) in per.items():
                acc.setdefault(outer + (s, b), {}).setdefault(seed, {})[k["task"]] = (r, comp)
    out = {}
    for k, seeds in acc.items():
        n_tasks = max(len(v) for v in seeds.values())
        out[k] = {s: (float(np.mean([r for r, _ in v.values()])), tuple(c for _, (_, c) in sorted(v.items())))
                  for s, v in seeds.items() if len(v) == n_tasks}
        out[k]["_n_tasks"], out[k]["_n_seeds"] = n_tasks, len(out[k])
    return out


def _seeds_of(per: dict) -> list:
    return sorted(x for x in per if not isinstance(x, str))


def combined_recovery(frame: pd.DataFrame, tasks=None, metric: str | None = None, min_loss: float = 1e-6,
                      level: float = LEVEL) -> pd.DataFrame:
    """Recovered fraction averaged over several tasks (e.g. the 7 per-domain perplexities), per seed first.

    For each seed, R_s = mean over ``tasks`` of that task's R_s (a seed missing a task is dropped), then the mean
    and 95% t interval over the distinct computations (copies of a deterministic result count once) as in
    recovery_table. Columns: model_fingerprint, metric, preset, backend, scope, limit, strategy, budget, n_seeds,
    n_computations, n_tasks, recovered, recovered_lo, recovered_hi, recovered_sd.
    ``tasks``: list of task names (default: all in the frame); ``metric``: one metric (default: every metric).
    """
    rows = []
    for k, per in sorted(_combined_per_seed(frame, tasks, metric, min_loss).items(),
                         key=lambda kv: tuple(str(x) for x in kv[0])):
        kept = distinct(_seeds_of(per), lambda x: per[x][1])
        m, lo, hi, sd = t_interval([per[x][0] for x in kept], level)
        rows.append(dict(zip(_OUTER, k), n_seeds=per["_n_seeds"], n_computations=len(kept), n_tasks=per["_n_tasks"],
                         recovered=m, recovered_lo=lo, recovered_hi=hi, recovered_sd=sd))
    return pd.DataFrame(rows, columns=_OUTER + ["n_seeds", "n_computations", "n_tasks", "recovered", "recovered_lo",
                                               "recovered_hi", "recovered_sd"])


def combined_deltas(frame: pd.DataFrame, baseline: str, tasks=None, metric: str | None = None,
                    min_loss: float = 1e-6, level: float = LEVEL) -> pd.DataFrame:
    """Paired difference of the task-averaged recovered fraction, each strategy minus ``baseline``, at each
    0 < budget < 1, on their common seeds (distinct computations only): delta (fraction units) with its 95% t
    interval, n_seeds, n_computations, n_tasks and verdict ("<a> better" / "<baseline> better" / "no difference"
    when the interval covers 0; "one computation: no interval" when the seeds are copies of one deterministic
    result, "one seed: no interval" for a single seed; a higher recovered fraction is better whatever the
    metric's direction)."""
    per = _combined_per_seed(frame, tasks, metric, min_loss)
    rows = []
    for k, pa in sorted(per.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        *outer, s, b = k
        if s == baseline or not 0 < b < 1 or (tuple(outer) + (baseline, b)) not in per:
            continue
        pb = per[tuple(outer) + (baseline, b)]
        common = sorted(set(_seeds_of(pa)) & set(_seeds_of(pb)))
        if not common:
            continue
        kept = distinct(common, lambda x: (pa[x][1], pb[x][1]))
        d, lo, hi, sd = t_interval([pa[x][0] - pb[x][0] for x in kept], level)
        verdict = ("no difference" if lo <= 0 <= hi else f"{s} better" if d > 0 else f"{baseline} better") \
            if lo == lo else "one seed: no interval" if len(common) == 1 else "one computation: no interval"
        rows.append(dict(zip(_OUTER[:-2], outer), budget=b, a=s, b=baseline, n_seeds=len(common),
                         n_computations=len(kept), n_tasks=min(pa["_n_tasks"], pb["_n_tasks"]), delta=d,
                         delta_lo=lo, delta_hi=hi, delta_sd=sd, verdict=verdict))
    return pd.DataFrame(rows, columns=_OUTER[:-2] + ["budget", "a", "b", "n_seeds", "n_computations", "n_tasks",
                                                     "delta", "delta_lo", "delta_hi", "delta_sd", "verdict"])


def paired_deltas(frame: pd.DataFrame, baseline: str | None = None, min_loss: float = 1e-6,
                  level: float = LEVEL, higher_is_better: dict | None = None,
                  require_resolved: bool = True) -> pd.DataFrame:
    """Paired differences between strategies at the same budget, preset and task, on their common seeds.

    For each pair (a, b) (every pair, or every strategy against ``baseline``) at each 0 < budget < 1:
    delta = mean over the common seeds' distinct computations of X_a - X_b (metric units) with its 95% t interval
    over them (delta_lo/hi: seed spread; NaN with one computation), the same for the recovered fraction
    (delta_recovered; NaN where the noise loss is not resolved, see noise_loss), n_seeds (common seeds stored),
    n_computations (distinct (a, b) computations among them: 1 for a deterministic preset), sampling_se (mean
    lm-eval stderr of the two results, metric units), sampling_lo/hi (only with one computation of a
    deterministic preset: delta ± z_{0.975} x sqrt(se_a^2 + se_b^2), lm-eval's sampling error, the only
    uncertainty left; see the module's note), basis ("seeds", "sampling error" or "" when nothing decides) and
    verdict: "no difference" when the interval of the basis covers 0, else "<a> better" / "<b> better" (by the
    metric's direction: ``higher_is_better`` {metric: bool}, default report.LOWER_IS_BETTER names are
    lower-better); "one seed: no interval" for one seed of a random preset, "one computation: no interval" for
    a deterministic one without a stderr. Budgets 0 and 1 are left out (every strategy places the same experts).
    """
    from scipy import stats
    from .report import LOWER_IS_BETTER
    hib = dict(higher_is_better or {})
    z = float(stats.norm.ppf(0.5 + level / 2))
    rows = []
    for key, _ideal, cells, _analog, note, det in _per_seed(_prepare(frame), min_loss, level):
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
                kept = distinct(common, lambda s: (pa[s][3][1], pc[s][3][1]))
                d, lo, hi, sd = t_interval([pa[s][0] - pc[s][0] for s in kept], level)
                rk = distinct(common, lambda s: (pa[s][3], pc[s][3]))     # R_s: A's computation counts too
                dr, rlo, rhi, _ = t_interval([pa[s][2] - pc[s][2] for s in rk], level) \
                    if not (note and require_resolved) else (math.nan,) * 4     # a fraction of an unresolved loss is not a measurement
                ses = [x for s in kept for x in (pa[s][1], pc[s][1]) if x is not None]
                slo = shi = math.nan
                if lo == lo:
                    basis, covers = "seeds", lo <= 0 <= hi
                elif len(kept) == 1 and (len(common) > 1 or det) and len(ses) == 2:
                    h = z * math.hypot(*ses)        # deterministic: lm-eval's sampling error is all there is
                    basis, slo, shi = "sampling error", d - h, d + h
                    covers = slo <= 0 <= shi
                else:
                    basis, covers = "", None
                if covers is None:
                    verdict = "one seed: no interval" if len(common) == 1 and not det else \
                        "one computation: no interval"
                elif covers:
                    verdict = "no difference"
                else:
                    verdict = f"{a} better" if (d > 0) == up else f"{c} better"
                rows.append({**k, "budget": b, "a": a, "b": c, "n_seeds": len(common), "n_computations": len(kept),
                             "delta": d, "delta_lo": lo, "delta_hi": hi, "delta_sd": sd, "delta_recovered": dr,
                             "delta_recovered_lo": rlo, "delta_recovered_hi": rhi,
                             "sampling_se": float(np.mean(ses)) if ses else math.nan, "sampling_lo": slo,
                             "sampling_hi": shi, "basis": basis, "verdict": verdict})
    cols = GROUP + ["budget", "a", "b", "n_seeds", "n_computations", "delta", "delta_lo", "delta_hi", "delta_sd",
                    "delta_recovered", "delta_recovered_lo", "delta_recovered_hi", "sampling_se", "sampling_lo",
                    "sampling_hi", "basis", "verdict"]
    return pd.DataFrame(rows, columns=cols)
